"""The bundled settings a run takes when the user names none, chosen by the data and the devices.

    the embedded digits              demo         search_spaces/demo.yaml
    photos, training on CUDA         default      search_spaces/default.yaml
    photos, no CUDA for training     photos-cpu   search_spaces/photos-cpu.yaml

`laray sweep` searches the chosen space. `laray train` takes the same space's fixed settings and
its `recipe` (one value for each searched setting), so that the two commands agree. No torch here:
the choice is made before the CLI pays for that import.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from dataclasses import dataclass

from laray.data.dataref import DIGITS
from laray.settings.config import AutoEncoderConfig, LAConfig
from laray.settings.space import SIZE_LIMITS, SWEEP_SET, SearchSpace, load_space
from laray.settings.stage1_search import STAGE1_SEARCHABLE, ae_config_of, la_part

DEMO, GPU_PHOTOS, CPU_PHOTOS = "demo", "default", "photos-cpu"


@dataclass(frozen=True)
class Choice:
    """A bundled space and why it was chosen."""

    space: str
    reason: str

    def announcement(self, how_to_choose: str) -> str:
        """The first console line of a run that did not name its settings."""
        return (
            f"settings: {self.space} (search_spaces/{self.space}.yaml): {self.reason}; "
            f"choose others with {how_to_choose}"
        )


def cuda_available() -> bool:
    """Whether this machine has an NVIDIA GPU, as its driver (NVML) reports, without importing torch.

    The CLI decides its settings before importing torch, so that a usage error costs no import.
    CUDA_VISIBLE_DEVICES set to "" or "-1" hides the GPUs, as it does from PyTorch and Ray. Should
    PyTorch still not reach the GPU, training fails there with a message naming --device.
    Tests replace this function to fake a GPU, or its absence.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:  # no NVIDIA driver
        return False
    if nvml.nvmlInit_v2() != 0:
        return False
    try:
        count = ctypes.c_uint(0)
        return nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 and count.value > 0
    finally:
        nvml.nvmlShutdown()


def choose(spec: str, cuda: bool, no_cuda_reason: str = "no CUDA device here") -> Choice:
    """The bundled settings for the data set `spec` names, trained on CUDA or not."""
    if spec == DIGITS:
        return Choice(DEMO, "the embedded digits, sized for a CPU")
    if cuda:
        return Choice(GPU_PHOTOS, "photos, trained on CUDA (vgg16_bn at 224 px)")
    return Choice(CPU_PHOTOS, f"photos and {no_cuda_reason}, so sized for a CPU")


def train_configs(space: SearchSpace) -> tuple[AutoEncoderConfig, LAConfig]:
    """What `laray train` starts from with this space: its fixed settings and its recipe (no held-out split).

    The recipe's stage1_* values (laray.settings.stage1_search) go to the auto-encoder's settings.
    """
    unsplit = {name: getattr(LAConfig(), name) for name in SWEEP_SET}  # the sweep's own: laray train scores all
    return ae_config_of(space.ae, space.recipe), dataclasses.replace(space.la, **la_part(space.recipe), **unsplit)


def recipe_point(space: SearchSpace, n_images: int) -> dict:
    """The recipe as a point of the searched space: what `laray train` would run, one value per searched setting.

    Each searched setting takes the space's `recipe:` value, else its fixed (or default) value, as
    train_configs does (a stage1_* setting: the fixed auto-encoder's, so that without a recipe value the first
    trial starts from the stage 1 the sweep trains before its trials); k_neighbours and n_centroids clipped to
    what n_images allows, as the sweep's ranges are.
    The sweep runs it as its first trial and re-runs it beside the search's best in the confirmation.
    """
    ae, la = train_configs(space)
    point = {}
    for name in space.search:
        value = getattr(ae, STAGE1_SEARCHABLE[name]) if name in STAGE1_SEARCHABLE else getattr(la, name)
        if name in SIZE_LIMITS:
            low, high = SIZE_LIMITS[name](n_images)
            value = min(max(value, low), high)
        point[name] = value
    return point


def fit_to_size(la: LAConfig, defaults: LAConfig, n_images: int) -> LAConfig:
    """k_neighbours and n_centroids still at the bundled values, clipped to what n_images allows.

    The sweep clips its searched ranges the same way (laray.settings.space); a value the user set is left
    for LAConfig.check_data_size to refuse by name.
    """
    changes = {}
    for name, limits in SIZE_LIMITS.items():
        low, high = limits(n_images)
        if getattr(la, name) == getattr(defaults, name):
            changes[name] = min(max(getattr(la, name), low), high)
    return dataclasses.replace(la, **changes)


def demo_configs() -> tuple[AutoEncoderConfig, LAConfig]:
    """The digits' CPU-sized settings: both stages in half a minute on 2 cores."""
    return train_configs(load_space(DEMO))
