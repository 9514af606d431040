"""Read the next batches of uint8 images in a background thread while the current step runs.

A read from the memory-mapped cache (a numpy copy, plus disk reads on a cold cache) can
overlap with a training step: the GPU runs asynchronously and the main thread spends the
step waiting for it (loss.item()), without the GIL. One thread reading `depth` batches ahead
through a bounded queue is enough to hide the read (benchmarks/data_feed.py measures it).
Batches come out in exactly the order given and everything random (augmentation) stays in
the consumer's thread, so training is bit-identical to reading in the loop.

    with BatchPrefetcher(dataset, batches, device) as feed:
        for indices, images in feed:
            x = model_batch(images, device)      # laray.data.dataset: to the device, normalised
"""

from __future__ import annotations

import queue
import threading

import torch

_END = object()  # the reader's last item: every batch has been delivered


class BatchPrefetcher:
    """Iterates over (indices, uint8 (b, 3, H, W) batch) for `batches` (index arrays), in their order.

    One daemon thread reads up to `depth` batches ahead with `dataset.uint8_batch`; on CUDA it
    puts them in pinned memory so that model_batch's copy to the GPU is asynchronous.
    depth=0 reads in the consumer's thread (the synchronous path, for comparison).
    An exception in the reader is re-raised by the iteration. Use it as a context manager
    (or call close()): leaving early stops and joins the thread.
    """

    def __init__(self, dataset, batches, device: str | torch.device = "cpu", depth: int = 3):
        self.dataset, self.batches = dataset, list(batches)
        self.pin = torch.device(device).type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._read_all, name="laray-prefetch", daemon=True)
            self._thread.start()

    def _read(self, indices) -> torch.Tensor:
        images = self.dataset.uint8_batch(indices)
        return images.pin_memory() if self.pin else images

    def _put(self, item) -> bool:
        """Wait for room in the queue; give up (False) once close() was called, so the thread never hangs on put."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _read_all(self) -> None:
        try:
            for indices in self.batches:
                if self._stop.is_set() or not self._put((indices, self._read(indices))):
                    return
            self._put(_END)
        except BaseException as error:  # whatever it is, the consumer re-raises it (batches are tuples)
            self._put(error)

    def __iter__(self):
        if self._thread is None:
            for indices in self.batches:
                yield indices, self._read(indices)
            return
        if self._stop.is_set():
            raise RuntimeError("BatchPrefetcher is closed")
        while (item := self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
        self._stop.set()  # a second iteration finds nothing to wait for

    def __len__(self) -> int:
        return len(self.batches)

    def close(self) -> None:
        """Stop the reader and wait for it; safe to call more than once."""
        self._stop.set()
        if self._thread is not None:
            while True:  # drop what was read ahead (pinned memory, too) and wake a put() waiting for room
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join()  # at most the read in progress, then the reader sees the flag

    def __enter__(self) -> "BatchPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
