"""decode(): real files built in memory become RGB pixels of the right size, or a typed error that
names the file and the reason."""

from __future__ import annotations

import io as stdio
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from skinray.data.decode import (
    CorruptImage,
    EmptyImage,
    ImageDecodeError,
    TooManyPixels,
    UnsupportedImage,
    decode,
    decode_mask,
    encode_png,
    screen_jpeg,
)
from skinray.data.synthetic import synthetic_sample


def _jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def _opencv_bytes(pixels: np.ndarray, extension: str) -> bytes:
    ok, data = cv2.imencode(extension, pixels)
    assert ok
    return data.tobytes()


def _pillow_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = stdio.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _exif_jpeg(rgb: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _pillow_bytes(Image.fromarray(rgb), "JPEG", exif=exif, quality=95)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and a valid IHDR chunk claiming width×height RGB pixels, and no pixel data."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 64


def _with_jpeg_size(data: bytes, height: int, width: int) -> bytes:
    """A real baseline JPEG whose SOF0 segment is rewritten to claim height×width pixels."""
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


@pytest.fixture(scope="module")
def large_image() -> np.ndarray:
    """4000 wide × 3000 tall, the size of a full-resolution ISIC archive image."""
    return cv2.resize(synthetic_sample(2, 300).image, (4000, 3000), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def large_jpeg(large_image) -> bytes:
    return _jpeg(large_image, 85)


def test_jpeg_decodes_to_nearly_the_encoded_pixels():
    sample = synthetic_sample(1, (96, 128))
    decoded = decode(_jpeg(sample.image))
    assert decoded.rgb.shape == (96, 128, 3) and decoded.rgb.dtype == np.uint8
    assert decoded.rgb.flags.c_contiguous
    assert decoded.original_size == (96, 128) and decoded.scale_denominator == 1
    assert np.abs(decoded.rgb.astype(int) - sample.image).mean() < 3  # JPEG noise only


@pytest.mark.parametrize("encode", [_jpeg, encode_png], ids=["jpeg", "png"])
def test_channels_come_out_in_rgb_order(encode):
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    pixel = decode(encode(red)).rgb[8, 8]
    assert pixel[0] > 240 and pixel[1] < 15 and pixel[2] < 15


@pytest.mark.parametrize("target_size", [(64, 64), (40, 100), (300, 200)])
def test_target_size_gives_exactly_that_shape(target_size):
    data = _jpeg(synthetic_sample(3, (120, 160)).image)
    decoded = decode(data, target_size)
    assert decoded.rgb.shape == (*target_size, 3)
    assert decoded.rgb.flags.c_contiguous
    assert decoded.original_size == (120, 160)


def test_a_large_jpeg_is_decoded_at_one_eighth_scale_and_reports_its_stored_size(
    large_image, large_jpeg
):
    decoded = decode(large_jpeg, (256, 256))
    assert decoded.rgb.shape == (256, 256, 3)
    assert decoded.scale_denominator == 8  # 3000 / 8 = 375 >= 256
    assert decoded.original_size == (3000, 4000)
    direct = cv2.resize(large_image, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(decoded.rgb.astype(int) - direct).mean() < 3


@pytest.mark.parametrize(
    ("target_size", "denominator"),
    [((375, 500), 8), ((376, 500), 4), ((512, 512), 4), ((750, 1001), 2), ((1501, 10), 1)],
)
def test_the_largest_reduction_that_keeps_each_side_at_least_the_target_is_used(
    large_jpeg, target_size, denominator
):
    decoded = decode(large_jpeg, target_size)
    assert decoded.scale_denominator == denominator
    assert decoded.rgb.shape == (*target_size, 3)


@pytest.mark.parametrize("extension", [".jpg", ".png"])
def test_greyscale_becomes_three_equal_channels(extension):
    grey = synthetic_sample(3, 64).image.mean(axis=2).astype(np.uint8)
    rgb = decode(_opencv_bytes(grey, extension)).rgb
    assert rgb.shape == (64, 64, 3)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    if extension == ".png":
        assert np.array_equal(rgb[..., 0], grey)


def test_alpha_is_dropped_keeping_the_colour_stored_under_it():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 30, 10)
    rgba[:, :4, 3] = 255  # left half opaque, right half fully transparent
    rgb = decode(_pillow_bytes(Image.fromarray(rgba), "PNG")).rgb
    assert rgb.shape == (8, 8, 3)
    assert tuple(rgb[0, 0]) == (200, 30, 10)
    assert tuple(rgb[0, 7]) == (200, 30, 10)


def test_grey_with_alpha_becomes_three_equal_channels():
    grey_alpha = np.zeros((8, 8, 2), np.uint8)
    grey_alpha[..., 0] = 90
    grey_alpha[:4, :, 1] = 255
    rgb = decode(_pillow_bytes(Image.fromarray(grey_alpha), "PNG")).rgb
    assert rgb.shape == (8, 8, 3)
    assert (rgb == 90).all()


@pytest.mark.parametrize("extension", [".png", ".tiff"])
def test_sixteen_bit_samples_are_scaled_not_truncated(extension):
    values = np.array([[65535, 32768, 0, 257, 4660]], np.uint16)  # 4660 = 0x1234, low byte 0x34
    rgb = decode(_opencv_bytes(values, extension)).rgb
    assert rgb.shape == (1, 5, 3)
    assert rgb[0, :, 0].tolist() == [255, 128, 0, 1, 18]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_cmyk_jpeg_becomes_rgb_close_to_the_source_colour():
    colour = (200, 60, 30)
    data = _pillow_bytes(Image.new("RGB", (640, 480), colour).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(stdio.BytesIO(data)).mode == "CMYK"  # the file really is CMYK
    full = decode(data)
    assert np.abs(full.rgb[240, 320].astype(int) - colour).max() <= 8
    reduced = decode(data, (60, 80))
    assert reduced.scale_denominator == 8
    assert np.abs(reduced.rgb[30, 40].astype(int) - colour).max() <= 8


def test_exif_rotated_jpeg_comes_out_upright_with_its_upright_size():
    stored = np.zeros((40, 100, 3), np.uint8)  # wide as stored
    stored[:, :10] = 255  # a white band at the left edge as stored
    decoded = decode(_exif_jpeg(stored, orientation=6))  # 6: turn 90° clockwise to display
    assert decoded.rgb.shape == (100, 40, 3)
    assert decoded.original_size == (100, 40)
    assert decoded.rgb[:10].mean() > 200 and decoded.rgb[20:].mean() < 20  # the band is on top


def test_a_cut_short_exif_block_is_read_as_opencv_reads_it():
    # Cut after any byte of its TIFF block (orientation 6), the EXIF gives the size OpenCV's own
    # decode shows, upright only once the orientation entry is whole; never an exception, which
    # would fail a scoring task on every retry.
    exif = Image.Exif()
    exif[0x0112] = 6
    tiff = exif.tobytes().removeprefix(b"Exif\x00\x00")
    plain = cv2.imencode(".jpg", np.zeros((40, 100, 3), np.uint8))[1].tobytes()
    shapes = []
    for cut in range(len(tiff) + 1):
        body = b"Exif\x00\x00" + tiff[:cut]
        data = plain[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + plain[2:]
        opencv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        shapes.append(decode(data).rgb.shape)
        assert shapes[-1] == opencv.shape, cut
    assert shapes[0] == (40, 100, 3) and shapes[-1] == (100, 40, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_decode_applies_exif_orientation_like_the_full_decode(orientation):
    data = _exif_jpeg(synthetic_sample(7, (160, 256)).image, orientation)
    full = decode(data)
    upright_height, upright_width = full.rgb.shape[:2]
    assert (upright_height, upright_width) == ((256, 160) if orientation >= 5 else (160, 256))
    target = (upright_height // 4, upright_width // 4)
    reduced = decode(data, target)
    assert reduced.scale_denominator == 4
    assert reduced.original_size == full.original_size == (upright_height, upright_width)
    expected = cv2.resize(full.rgb, target[::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.rgb.astype(int) - expected).mean() < 4  # a flip would differ by ~30


def _app1(tiff: bytes) -> bytes:
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def _orientation_tiff(orientation: int | None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return exif.tobytes().removeprefix(b"Exif\x00\x00")


@pytest.mark.parametrize(
    "first, second", [(6, 1), (1, 6), (None, 6), (9, 6)], ids=["6-1", "1-6", "none-6", "9-6"]
)
def test_of_two_exif_blocks_the_one_opencv_reads_orients_the_image(first, second):
    # OpenCV takes the first block with an orientation tag; the header walk kept the last, so the
    # reduced decode's scale, the stored size and the device path's rotation followed another one.
    stored = cv2.imencode(".jpg", synthetic_sample(12, (600, 1000)).image)[1].tobytes()
    data = stored[:2] + _app1(_orientation_tiff(first)) + _app1(_orientation_tiff(second))
    data += stored[2:]
    opencv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2]
    assert decode(data).original_size == opencv
    reduced = decode(data, (40, 100))
    assert reduced.original_size == opencv and reduced.scale_denominator == (
        4 if opencv == (1000, 600) else 8
    )
    assert screen_jpeg(data).shown_size == opencv


def test_bytes_before_a_jpeg_marker_are_skipped_as_libjpeg_skips_them():
    data = _jpeg(synthetic_sample(13, 64).image)
    quantisation = data.index(b"\xff\xdb")
    for junk in (b"\x00\x17", b"\x12\xff\x00\xff\xff"):  # FF 00 is no marker
        padded = data[:quantisation] + junk + data[quantisation:]
        opencv = cv2.imdecode(np.frombuffer(padded, np.uint8), cv2.IMREAD_COLOR)
        assert opencv is not None  # libjpeg decodes it (with a warning)
        assert np.array_equal(decode(padded).rgb, decode(data).rgb), junk


def test_exif_orientation_of_a_png_is_applied_like_a_jpeg():
    stored = synthetic_sample(8, (40, 100)).image
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode(_pillow_bytes(Image.fromarray(stored), "PNG", exif=exif))
    assert np.array_equal(decoded.rgb, np.rot90(stored, k=-1))
    assert decoded.original_size == (100, 40)


def test_zero_bytes_is_an_empty_image():
    with pytest.raises(EmptyImage, match="s3://archive/lesion.jpg: empty file"):
        decode(b"", source="s3://archive/lesion.jpg")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02], ids=["half", "most", "header-only"])
def test_a_truncated_jpeg_is_corrupt_not_half_grey(keep):
    data = _jpeg(synthetic_sample(4, 64).image)
    with pytest.raises(CorruptImage, match="cut.jpg: truncated JPEG"):
        decode(data[: int(len(data) * keep)], source="cut.jpg")


def test_bytes_after_the_jpeg_end_marker_are_tolerated():
    data = _jpeg(synthetic_sample(5, 64).image)
    with_trailer = decode(data + b"camera trailer \x00\x01\x02" * 20)
    assert np.array_equal(with_trailer.rgb, decode(data).rgb)


def test_a_truncated_png_is_corrupt():
    data = encode_png(synthetic_sample(6, 64).image)
    with pytest.raises(CorruptImage, match="cut.png: not a decodable PNG"):
        decode(data[: len(data) // 2], source="cut.png")


@pytest.mark.parametrize(
    "data",
    [np.random.default_rng(0).bytes(4096), b"patient notes, not an image\n" * 20],
    ids=["random-bytes", "text"],
)
def test_random_bytes_and_a_text_file_named_jpg_are_corrupt(data):
    with pytest.raises(CorruptImage, match="notes.jpg: not a decodable image"):
        decode(data, source="notes.jpg")


def test_floating_point_samples_are_unsupported():
    data = _opencv_bytes(np.full((8, 8, 3), 0.5, np.float32), ".tiff")
    with pytest.raises(UnsupportedImage, match="scan.tiff: float32 samples"):
        decode(data, source="scan.tiff")


@pytest.mark.parametrize("encode", [_jpeg, encode_png], ids=["jpeg", "png"])
def test_the_pixel_limit_is_checked_from_the_header_before_decoding(encode):
    data = encode(synthetic_sample(5, 100).image)
    assert decode(data, max_pixels=10_000).rgb.shape == (100, 100, 3)  # the limit is inclusive
    with pytest.raises(
        TooManyPixels, match="big: 100×100 = 10,000 pixels exceeds the limit of 999"
    ):
        decode(data, max_pixels=999, source="big")
    # Cut in half the file cannot be decoded, yet the header alone is enough to refuse it.
    with pytest.raises(TooManyPixels, match="big: 100×100"):
        decode(data[: len(data) // 2], max_pixels=999, source="big")


def _gif_screen_only(width: int, height: int) -> bytes:
    """A 35-byte GIF whose logical screen is width×height, holding one 1×1 frame."""
    data = (
        b"GIF89a" + struct.pack("<HH", width, height) + b"\x80\x00\x00" + b"\x00" * 3 + b"\xff" * 3
    )
    data += b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00"
    return data + b"\x02\x02\x44\x01\x00\x3b"


def _bmp_rle8(width: int, height: int) -> bytes:
    """A 1 KB run-length BMP of width×height pixels that ends at once (all black)."""
    palette, pixels = b"\x00" * 1024, b"\x00\x01"
    offset = 14 + 40 + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return header + info + palette + pixels


@pytest.mark.parametrize("build", [_gif_screen_only, _bmp_rle8], ids=["gif", "bmp"])
def test_gif_and_bmp_bombs_are_refused_from_their_headers_without_decoding(build, monkeypatch):
    # A 12000×12000 GIF of 35 bytes took 1.0 GB to decode before its size was checked.
    data = build(12_000, 12_000)
    with pytest.raises(TooManyPixels, match="bomb: 12000×12000 = 144,000,000 pixels exceeds"):
        decode(data, source="bomb")
    with pytest.raises(TooManyPixels, match="bomb: "):  # beyond Pillow's own limit too
        decode(build(20_000, 20_000), source="bomb")

    def no_decoding(*args):
        raise AssertionError("decoded before the size was checked")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(TooManyPixels):
        decode(data, source="bomb")
    with pytest.raises(TooManyPixels):
        decode_mask(data, source="bomb")
    # A limit above Pillow's own (179 MP) is still checked from the header.
    with pytest.raises(TooManyPixels, match="bomb: 20000×20000 = 400,000,000 pixels"):
        decode(build(20_000, 20_000), max_pixels=300_000_000, source="bomb")


@pytest.mark.parametrize("extension", [".gif", ".bmp", ".tiff", ".webp"])
def test_other_formats_within_the_limit_decode_as_before(extension):
    image = synthetic_sample(11, (48, 64)).image
    data = _opencv_bytes(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), extension)
    decoded = decode(data, max_pixels=48 * 64)
    assert decoded.original_size == (48, 64)
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), 4)
    assert np.array_equal(decoded.rgb, expected)
    with pytest.raises(TooManyPixels, match="x: 64×48 = 3,072 pixels"):
        decode(data, max_pixels=48 * 64 - 1, source="x")


def test_ten_and_twelve_bit_avif_are_scaled_by_their_own_depth():
    if not cv2.haveImageWriter(".avif"):
        pytest.skip("this OpenCV writes no AVIF")
    for depth, level in ((10, 1000), (12, 4000)):
        pixels = np.full((48, 64, 3), level, np.uint16)
        ok, data = cv2.imencode(".avif", pixels, [cv2.IMWRITE_AVIF_DEPTH, depth])
        assert ok
        expected = round(level / (2**depth - 1) * 255)  # 249 and 249; read as 16-bit: 4 and 16
        assert np.abs(decode(data.tobytes()).rgb.astype(int) - expected).max() <= 1, depth
        # An AVIF may give another major brand and name AVIF among its compatible ones.
        data = data.tobytes()
        assert b"avif" in data[16 : struct.unpack_from(">I", data)[0]]
        general = data[:8] + b"mif1" + data[12:]
        assert np.abs(decode(general).rgb.astype(int) - expected).max() <= 1, depth


def test_a_png_header_claiming_ten_gigapixels_is_refused_without_decoding():
    # Decoding would need 30 GB; the PNG holds no pixel data, so only the header can say "too many".
    with pytest.raises(TooManyPixels, match="bomb.png: 100000×100000 = 10,000,000,000 pixels"):
        decode(_png_header_only(100_000, 100_000), source="bomb.png")


def test_a_jpeg_header_claiming_four_gigapixels_is_refused_without_decoding():
    data = _with_jpeg_size(_jpeg(synthetic_sample(9, 32).image), 65_000, 65_000)
    with pytest.raises(TooManyPixels, match="bomb.jpg: 65000×65000"):
        decode(data, source="bomb.jpg")


_FAILURES = {
    "empty": (b"", EmptyImage),
    "truncated": (_jpeg(synthetic_sample(10, 32).image)[:300], CorruptImage),
    "text": (b"not an image at all", CorruptImage),
    "float": (_opencv_bytes(np.zeros((4, 4, 3), np.float32), ".tiff"), UnsupportedImage),
    "bomb": (_png_header_only(100_000, 100_000), TooManyPixels),
}


@pytest.mark.parametrize("case", _FAILURES)
def test_every_error_names_its_source_and_is_a_value_error(case):
    data, error = _FAILURES[case]
    source = f"s3://bucket/isic/{case}.jpg"
    with pytest.raises(error) as raised:
        decode(data, source=source)
    assert source in str(raised.value)
    assert isinstance(raised.value, ImageDecodeError) and isinstance(raised.value, ValueError)


def test_a_bad_target_size_is_a_caller_error_not_an_image_error():
    with pytest.raises(ValueError, match="target_size") as raised:
        decode(encode_png(np.zeros((4, 4), np.uint8)), (0, 4))
    assert not isinstance(raised.value, ImageDecodeError)


def test_encode_png_round_trips_masks_and_rgb_exactly():
    sample = synthetic_sample(11, 48)
    mask_png = encode_png(sample.mask)
    assert np.array_equal(cv2.imdecode(np.frombuffer(mask_png, np.uint8), -1), sample.mask)
    assert np.array_equal(decode(encode_png(sample.image)).rgb, sample.image)


@pytest.mark.parametrize(
    "array", [np.zeros((4, 4), bool), np.zeros((4, 4), np.uint16), np.zeros((4, 4, 4), np.uint8)]
)
def test_encode_png_refuses_anything_but_uint8_masks_and_rgb(array):
    with pytest.raises(ValueError, match="H×W or H×W×3 uint8"):
        encode_png(array)
