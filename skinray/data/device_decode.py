"""JPEG decode on the model's device: nvJPEG on a GPU (``torchvision.io.decode_jpeg``), libjpeg on CPU.

For GPU nodes whose CPUs cannot decode full-resolution JPEGs as fast as the GPU segments them: the
CPU tasks only read the bytes and screen the header (``skinray.data.decode.screen_jpeg``: size limit,
truncation, EXIF orientation), and the segmenter actor decodes on its GPU, applies the orientation
and resizes there. torchvision applies EXIF orientation only on CPU, so it is applied here, the same
way on either device. An image the device decoder refuses (nvJPEG has no CMYK, for one) comes back
as None for the caller to decode on CPU with ``skinray.data.decode.decode``, which then also names
the reason when that fails too.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["decode_jpegs", "orient"]


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A C×H×W image as EXIF ``orientation`` (1–8) says to show it.

    >>> x = torch.arange(6).reshape(1, 2, 3)
    >>> orient(x, 6).tolist()  # 90° clockwise
    [[[3, 0], [4, 1], [5, 2]]]
    """
    if orientation in (5, 6, 7, 8):
        image = image.transpose(1, 2)  # orientation 5 is the transpose itself
    flips = {2: [2], 3: [1, 2], 4: [1], 6: [2], 7: [1, 2], 8: [1]}.get(orientation)
    return image.flip(flips) if flips else image


def _decode(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision marks its image decoders as moving to TorchCodec; they are what we have here.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad image fails the whole batched call: go one by one
            decoded = []
            for item in data:
                try:
                    decoded.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded


def decode_jpegs(
    data: Sequence[bytes],
    orientations: Sequence[int],
    size: tuple[int, int],
    device: torch.device,
) -> list[np.ndarray | None]:
    """JPEGs decoded on ``device``, oriented, and resized to ``size`` (height, width) with
    antialiased bilinear interpolation: H×W×3 uint8 arrays, None for any the decoder refused."""
    if not data:
        return []
    tensors = [torch.frombuffer(bytearray(item), dtype=torch.uint8) for item in data]
    images = []
    for image, orientation in zip(_decode(tensors, device), orientations, strict=True):
        if image is None:
            images.append(None)
            continue
        image = orient(image, orientation)
        resized = F.interpolate(
            image[None].float(), size=tuple(size), mode="bilinear", antialias=True
        )
        pixels = resized[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
        images.append(pixels.cpu().numpy())
    return images
