"""Per-image random augmentation of a whole batch on its device, seeded by a generator.

Random resized crop and horizontal flip as one affine resampling per image,
then brightness, contrast and saturation jitter, then (each optional, off by default)
grey-scale and Gaussian blur for a share of the images. Works on float images in [0, 1],
before normalisation. Random draws come from a CPU generator, so the same seed
gives the same augmentation on CPU and CUDA; an option that is off draws nothing,
so turning one on leaves the draws of the others as they were for that batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GREY_WEIGHTS = (0.299, 0.587, 0.114)

# Blur's standard deviation as a share of the image side: SimCLR's 0.1-2.0 px at 224 px (Chen et al. 2020,
# arXiv:2002.05709, appendix A), scaled so that a 64 px image is blurred as much as a 224 px one.
BLUR_SIGMA = (0.1 / 224, 2.0 / 224)


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def augment_batch(
    images: torch.Tensor,
    gen: torch.Generator,
    min_area: float = 0.5,
    jitter: float = 0.4,
    flip: bool = True,
    grey: float = 0.0,
    blur: float = 0.0,
) -> torch.Tensor:
    """images (b, 3, H, W) float in [0, 1] -> augmented, same shape, clamped to [0, 1].

    flip: mirror half of the images left-right (the draw is made either way, so that turning it
    off leaves every other draw of the same seed as it was).
    jitter: brightness, contrast and saturation factors drawn in [1 - jitter, 1 + jitter] (0: none).
    grey: the share of images turned grey (their colour dropped); blur: the share blurred.
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
    luma = (out * weights).sum(1, keepdim=True)
    out = luma + (out - luma) * factors()  # saturation
    out = out.clamp_(0.0, 1.0)
    if grey > 0:
        chosen = (torch.rand(b, generator=gen) < grey).to(images.device).view(b, 1, 1, 1)
        out = torch.where(chosen, (out * weights).sum(1, keepdim=True).expand_as(out), out)
    if blur > 0:
        chosen = torch.rand(b, generator=gen) < blur
        sigma = _uniform(gen, b, *BLUR_SIGMA) * images.shape[-1]
        out = torch.where(chosen.to(images.device).view(b, 1, 1, 1), gaussian_blur(out, sigma), out)
    return out


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image (b, 3, H, W) blurred with its own standard deviation sigma (b,) in pixels, separably."""
    b, c, h, w = images.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1).clamp_min(1e-3)) ** 2)
    kernels = (kernels / kernels.sum(1, keepdim=True)).to(images.device, images.dtype)  # (b, 2r + 1)
    kernels = kernels.repeat_interleave(c, 0)  # one per channel of each image: (b * c, 2r + 1)
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernels.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernels.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)
