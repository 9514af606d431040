"""Durations as people write them (--time-budget 6h) and as the console prints them; no ray, no torch here."""

from __future__ import annotations

import re

from laray.errors import LarayError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class BudgetError(LarayError):
    """A time budget that cannot be read or applied."""


def parse_duration(text: str) -> float:
    """'45s', '90m', '6h', '2d', '1h30m', '1.5h' -> seconds. A bare number is refused: seconds or minutes?"""
    compact = re.sub(r"\s+", "", str(text)).lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", compact)
    if not parts or "".join(n + u for n, u in parts) != compact or sum(float(n) for n, _ in parts) <= 0:
        raise BudgetError(
            f"bad time budget {text!r}: give a positive duration with units s, m, h or d (45s, 90m, 6h, 2d, 1h30m)"
        )
    return sum(float(n) * _UNITS[u] for n, u in parts)


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
