"""Settings a user writes or the tool chooses, all torch-free so the CLI checks them before importing torch.

config (the two stages' settings), space (search spaces), defaults (settings by data and device),
duration (`6h`, `90m`).
"""
