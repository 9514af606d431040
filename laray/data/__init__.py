"""Data: photo folders and CSV listings to verified, cached uint8 image batches.

sources (list files) -> decode (one file) -> cache (decode all once) -> dataref (a data set by reference)
-> dataset (`load_dataset`, `open_dataset`); augment and prefetch feed training; check is `laray data check`.
No torch at import time in sources and decode, so the CLI checks a listing before paying for torch.
"""
