"""Progress inside a long epoch: images done, img/s and the time left, at most once per interval.

At Danish Fungi size an epoch takes many minutes and the per-epoch line comes only at its end, so
a stage says how far it is every `interval_s` (30 s; $LARAY_PROGRESS_S for another):

    autoencoder epoch 3: 12,800/48,000 images, 41 img/s, 14 min 20 s left in the epoch

The first line comes only once the interval has passed, so a short epoch prints nothing. The
training loop calls the reporter once per batch; between lines that costs a clock read and a
comparison. Where the lines go is the caller's sink: `laray train` prints them, a sweep's trial
and its stage-1 task print them on their worker, whose output Ray forwards to the driver's console.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

from laray.errors import ConfigError
from laray.settings.duration import duration

DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "LARAY_PROGRESS_S"  # seconds between in-epoch lines (tests use a tiny one)


@dataclasses.dataclass(frozen=True)
class EpochProgress:
    """One in-epoch report; str() is the line the console shows."""

    stage: str  # "autoencoder" or "local aggregation"
    epoch: int  # from 1
    done: int  # images trained on so far in this epoch
    total: int  # images the epoch trains on
    images_per_s: float  # since the epoch began
    left_s: float  # the rest of the epoch at that rate

    def __str__(self) -> str:
        return (
            f"{self.stage} epoch {self.epoch}: {self.done:,}/{self.total:,} images, "
            f"{self.images_per_s:,.0f} img/s, {duration(self.left_s)} left in the epoch"
        )


ProgressSink = Callable[[EpochProgress], None]


def progress_interval_s(value: float | None = None) -> float:
    """`value` when given, else $LARAY_PROGRESS_S, else 30 s; anything but a number > 0 is a ConfigError."""
    source = "progress interval" if value is not None else INTERVAL_ENV
    text = value if value is not None else os.environ.get(INTERVAL_ENV)
    if text is None:
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(text)
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds > 0:  # NaN too; inf is allowed: no lines at all
        raise ConfigError(f"{source} must be a number of seconds > 0, got {text!r}")
    return seconds


class EpochReporter:
    """Called once per batch with its size; hands the sink an EpochProgress at most once per interval.

    clock: seconds, monotonic (time.monotonic; tests pass a fake). With no sink it only counts.
    """

    def __init__(
        self,
        stage: str,
        epoch: int,
        total: int,
        sink: ProgressSink | None,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stage, self.epoch, self.total, self.sink = stage, epoch, total, sink
        self.interval_s, self.clock = interval_s, clock
        self.done = 0
        self.began = clock()
        self.next_at = self.began + interval_s  # nothing before one interval: a short epoch says nothing

    def __call__(self, images: int) -> None:
        self.done += images
        if self.sink is None:
            return
        now = self.clock()
        if now < self.next_at:
            return
        # From now, not from the last due time: a batch longer than the interval gives one line, not a burst.
        self.next_at = now + self.interval_s
        rate = self.done / max(now - self.began, 1e-9)
        self.sink(EpochProgress(self.stage, self.epoch, self.done, self.total, rate, (self.total - self.done) / rate))


def stage1_epoch_line(label: str, record: dict) -> str:
    """A stage-1 epoch's line on a sweep's console (`stage 1 (seed 0): epoch 3 loss 0.0905 549 img/s`), printed
    by whichever process trains it: a Ray task, a data-parallel chief, or a trial training its own."""
    return f"{label}: epoch {record['epoch']} loss {record['loss']:.4f} {record['images_per_s']:.0f} img/s"
