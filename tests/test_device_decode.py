"""JPEG decode on the model's device (here the CPU path of torchvision's decoder, the GPU one being
nvJPEG): the same pixels, orientation and size as the CPU decoder, and the header screen before it."""

from __future__ import annotations

import io as stdio

import numpy as np
import pytest
import torch
from PIL import Image

from skinray.data.decode import (
    CorruptImage,
    EmptyImage,
    TooManyPixels,
    decode,
    encode_png,
    screen_jpeg,
)
from skinray.data.device_decode import decode_jpegs, orient
from skinray.data.synthetic import synthetic_sample

CPU = torch.device("cpu")


def _jpeg(rgb: np.ndarray, orientation: int = 1, **kwargs) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = stdio.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", exif=exif, quality=95, **kwargs)
    return buffer.getvalue()


def _stored() -> np.ndarray:
    """Asymmetric in both directions, so any wrong flip or turn shows."""
    image = synthetic_sample(3, (96, 160)).image.copy()
    image[:20, :40] = (250, 20, 20)
    image[-12:, -60:] = (20, 20, 250)
    return image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decode_orients_like_opencv(orientation):
    data = _jpeg(_stored(), orientation)
    screened = screen_jpeg(data)
    reference = decode(data).rgb  # OpenCV applies the EXIF orientation itself
    assert screened.orientation == orientation
    assert screened.shown_size == reference.shape[:2]
    (pixels,) = decode_jpegs([data], [orientation], screened.shown_size, CPU)
    assert pixels.shape == reference.shape and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - reference).mean() < 1.5
    if orientation != 1:  # ignoring the orientation is caught: the test can fail
        (unoriented,) = decode_jpegs([data], [1], screened.shown_size[::-1], CPU)
        if unoriented.shape == reference.shape:
            assert np.abs(unoriented.astype(int) - reference).mean() > 20


def test_device_decode_resizes_like_the_cpu_decode():
    data = _jpeg(synthetic_sample(5, (600, 800)).image)
    (pixels,) = decode_jpegs([data], [1], (64, 80), CPU)
    reference = decode(data, (64, 80)).rgb  # reduced decode + INTER_AREA
    assert pixels.shape == (64, 80, 3)
    assert np.abs(pixels.astype(int) - reference).mean() < 3


def test_a_batch_with_one_undecodable_jpeg_keeps_the_others():
    good = _jpeg(_stored())
    scan = good.index(b"\xff\xda")
    broken = good[: scan + 20] + bytes(200) + b"\xff\xd9"  # a valid header, a scan of zeros
    decoded = decode_jpegs([good, broken, good], [1, 1, 1], (32, 32), CPU)
    assert decoded[0] is not None and decoded[2] is not None
    assert np.array_equal(decoded[0], decoded[2])
    # libjpeg pads or refuses a broken scan; either way nothing raised and the batch went on.
    assert decoded[1] is None or decoded[1].shape == (32, 32, 3)


def test_orient_turns_clockwise_for_6_and_counter_clockwise_for_8():
    x = torch.arange(6).reshape(1, 2, 3)
    assert orient(x, 6).tolist() == [[[3, 0], [4, 1], [5, 2]]]
    assert orient(x, 8).tolist() == [[[2, 5], [1, 4], [0, 3]]]
    assert orient(x, 1) is x


def test_screen_refuses_what_decode_refuses_before_any_pixel():
    data = _jpeg(_stored())
    with pytest.raises(EmptyImage):
        screen_jpeg(b"", source="s3://a/empty.jpg")
    with pytest.raises(TooManyPixels, match="s3://a/big.jpg"):
        screen_jpeg(data, max_pixels=96 * 160 - 1, source="s3://a/big.jpg")
    with pytest.raises(CorruptImage, match="truncated"):
        screen_jpeg(data[: len(data) // 2], source="s3://a/cut.jpg")
    assert screen_jpeg(encode_png(_stored())) is None  # not a JPEG: decoded on CPU as before
    assert screen_jpeg(data).shown_size == (96, 160)
    assert screen_jpeg(_jpeg(_stored(), 6)).shown_size == (160, 96)
