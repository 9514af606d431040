"""Per-image random augmentation of a whole batch on its device, seeded by a generator.

Random resized crop and horizontal flip as one affine resampling per image,
then brightness, contrast and saturation jitter. Works on float images in [0, 1],
before normalisation. Random draws come from a CPU generator, so the same seed
gives the same augmentation on CPU and CUDA.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GREY_WEIGHTS = (0.299, 0.587, 0.114)


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def augment_batch(images: torch.Tensor, gen: torch.Generator, min_area: float = 0.5, jitter: float = 0.4,
                  flip: bool = True) -> torch.Tensor:
    """images (b, 3, H, W) float in [0, 1] -> augmented, same shape, clamped to [0, 1].

    flip: mirror half of the images left-right (the draw is made either way, so that turning it
    off leaves every other draw of the same seed as it was).
    """
    b = len(images)
    # Crop of relative area in [min_area, 1] and aspect ratio in [3/4, 4/3], anywhere inside the image.
    area = _uniform(gen, b, min_area, 1.0)
    ratio = torch.exp(_uniform(gen, b, math.log(3 / 4), math.log(4 / 3)))
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = _uniform(gen, b, -1.0, 1.0) * (1 - w)  # in affine_grid's [-1, 1] coordinates
    cy = _uniform(gen, b, -1.0, 1.0) * (1 - h)
    mirrored = torch.rand(b, generator=gen) < 0.5
    flip = torch.where(mirrored & flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (b, H, W, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def factors():  # (b, 1, 1, 1) multiplicative factors in [1 - jitter, 1 + jitter]
        return _uniform(gen, b, 1 - jitter, 1 + jitter).to(images.device, images.dtype).view(b, 1, 1, 1)

    weights = torch.tensor(GREY_WEIGHTS, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    out = out * factors()  # brightness
    mean_grey = (out * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    out = mean_grey + (out - mean_grey) * factors()  # contrast
    grey = (out * weights).sum(1, keepdim=True)
    out = grey + (out - grey) * factors()  # saturation
    return out.clamp_(0.0, 1.0)
