"""Bytes → RGB uint8: the one place every image-format quirk is handled.

``decode(data, target_size)`` returns a ``DecodedImage``: H×W×3 RGB uint8 pixels (resized with
``INTER_AREA`` to ``target_size`` when given), the image's size as stored (after EXIF orientation),
and the reduced JPEG decode it used; or it raises an ``ImageDecodeError`` subclass whose message names
the source and the reason, so a scoring job can turn the failure into a row of its errors table.

Handled here, with OpenCV (checked on opencv-python-headless 5.0):
- EXIF orientation: every mode used below applies it, the reduced JPEG modes included, in JPEG, PNG
  and WebP alike. ``IMREAD_UNCHANGED`` is the one mode that skips it, so it is never used.
- Greyscale and palette images come out as three equal channels; CMYK JPEGs are converted by libjpeg.
- Alpha is dropped, keeping the colour stored under it (see ``_FULL``).
- 16-bit samples are scaled to 8 bits (65535 → 255), not truncated to their low byte. AVIF's 10- and
  12-bit samples come through OpenCV's 8-bit mode, which scales them by their own depth.
- Truncated JPEGs: libjpeg pads a cut-off scan with grey and OpenCV returns it without complaint, so
  a JPEG with no end-of-image marker after its image data is refused.
- Decompression bombs: JPEG and PNG sizes are read from the header (SOFn, IHDR) before any pixel is
  decoded, and other formats' (GIF, BMP, TIFF, WebP, …) by Pillow's lazy ``Image.open``: a 35-byte
  GIF that declares 20000×20000 took 2.7 GB to decode before its size was checked. A format Pillow
  cannot read is checked after decoding, bounded meanwhile by OpenCV's own limit
  (``OPENCV_IO_MAX_IMAGE_PIXELS``, 2^30 by default).
- Speed: a JPEG much larger than the target is decoded at 1/2, 1/4 or 1/8 scale by libjpeg
  (``IMREAD_REDUCED_COLOR_n``), several times faster than a full decode and resize.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "CorruptImage",
    "DecodedImage",
    "EmptyImage",
    "ImageDecodeError",
    "JpegScreen",
    "TooManyPixels",
    "UnsupportedImage",
    "decode",
    "decode_mask",
    "encode_png",
    "screen_jpeg",
]

#: ISIC archive images reach ~24 MP; 100 MP leaves room for any camera and stops decompression bombs.
DEFAULT_MAX_PIXELS = 100_000_000

# Three channels in 8 or 16 bits, with EXIF orientation applied. Alpha is dropped rather than
# composited: only IMREAD_UNCHANGED returns alpha, and it ignores EXIF orientation; and dermoscopy has
# no meaningful transparency, so a backdrop we would invent (white, black) is no truer than the colour
# the file stores under its transparent pixels.
_FULL = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH
_REDUCED = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# OpenCV's 16-bit mode gives AVIF's 10- and 12-bit samples unscaled (0..1023), which the 16-bit
# mapping would take for near black; its 8-bit mode scales them.
_AVIF_BRANDS = (b"avif", b"avis")
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_SOS, _JPEG_EOI, _JPEG_APP1 = 0xDA, 0xD9, 0xE1
_EXIF_ORIENTATION_TAG = 0x0112


class ImageDecodeError(ValueError):
    """Bytes that cannot become RGB pixels; the message names the source and why."""


class EmptyImage(ImageDecodeError):
    """Zero bytes."""


class CorruptImage(ImageDecodeError):
    """Not an image, an unreadable one, or a truncated one."""


class UnsupportedImage(ImageDecodeError):
    """A readable image whose samples have no defined mapping to 8-bit RGB (float, signed)."""


class TooManyPixels(ImageDecodeError):
    """More than ``max_pixels`` pixels: refused before decoding where the header tells the size."""


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # H×W×3 uint8, C-contiguous; target_size when one was given
    original_size: tuple[int, int]  # (height, width) as stored, after EXIF orientation
    scale_denominator: int  # 1, 2, 4 or 8: the reduced JPEG decode used


@dataclass(frozen=True)
class JpegScreen:
    shown_size: tuple[int, int]  # (height, width) after EXIF orientation
    orientation: int  # EXIF orientation 1–8, still to be applied to the decoded pixels


@dataclass(frozen=True)
class _JpegHeader:
    size: tuple[int, int] | None  # (height, width) from the SOFn segment, as stored
    orientation: int  # EXIF orientation, 1 (as stored) to 8

    @property
    def rotated(self) -> bool:  # orientations 5–8: shown with height and width swapped
        return self.orientation in (5, 6, 7, 8)

    scan_start: int | None  # offset of the first SOS segment; None when the data ends before it


def decode(
    data: bytes,
    target_size: tuple[int, int] | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    source: str = "<bytes>",
) -> DecodedImage:
    """Decode an encoded image to RGB uint8, resized to ``target_size`` (height, width) if given.

    ``source`` (a URI or file name) only labels error messages. Raises ``EmptyImage``,
    ``CorruptImage``, ``UnsupportedImage`` or ``TooManyPixels``, all ``ImageDecodeError``.

    >>> decode(encode_png(np.zeros((30, 40, 3), np.uint8)), (8, 8)).original_size
    (30, 40)
    """
    if target_size is not None and (len(target_size) != 2 or min(target_size) < 1):
        raise ValueError(f"target_size must be (height, width) >= 1, got {target_size}")
    if len(data) == 0:
        raise EmptyImage(f"{source}: empty file (0 bytes)")
    jpeg = _read_jpeg_header(data) if data.startswith(_JPEG_MAGIC) else None
    header_size = jpeg.size if jpeg is not None else _header_size(data)
    if header_size is not None:
        _check_pixels(header_size, max_pixels, source)
    if jpeg is not None:
        _check_complete(jpeg, data, source)

    shown = None
    if jpeg is not None and jpeg.size is not None:
        shown = jpeg.size[::-1] if jpeg.rotated else jpeg.size
    denominator = _reduction(shown, target_size) if shown is not None else 1
    full = cv2.IMREAD_COLOR if _is_avif(data) else _FULL
    pixels = _imdecode(data, _REDUCED.get(denominator, full), source)
    if header_size is None:
        _check_pixels(pixels.shape[:2], max_pixels, source)
    rgb = _to_rgb(pixels, source)

    original_size = rgb.shape[:2]
    if denominator > 1:
        original_size = shown
        if rgb.shape[:2] != _reduced_size(shown, denominator):
            # OpenCV read the EXIF orientation differently from _read_jpeg_header: trust the pixels.
            original_size = shown[::-1]
    if target_size is not None and rgb.shape[:2] != tuple(target_size):
        rgb = cv2.resize(rgb, (target_size[1], target_size[0]), interpolation=cv2.INTER_AREA)
    return DecodedImage(
        rgb=np.ascontiguousarray(rgb),
        original_size=(int(original_size[0]), int(original_size[1])),
        scale_denominator=denominator,
    )


def decode_mask(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "<bytes>"
) -> np.ndarray:
    """A mask file → (H, W) uint8 grey levels at its own resolution, with ``decode``'s checks (empty,
    size from the header, unreadable) and its errors."""
    if len(data) == 0:
        raise EmptyImage(f"{source}: empty mask file (0 bytes)")
    size = _header_size(data)
    if size is not None:
        _check_pixels(size, max_pixels, source)
    mask = _imdecode(data, cv2.IMREAD_GRAYSCALE, source)
    if size is None:
        _check_pixels(mask.shape[:2], max_pixels, source)
    return mask


def screen_jpeg(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "<bytes>"
) -> JpegScreen | None:
    """For decoding elsewhere (nvJPEG on a GPU): the checks ``decode`` makes before any pixel is
    decoded, and the EXIF orientation to apply after. None when ``data`` is no JPEG with a
    readable header, for ``decode`` to handle. Raises ``EmptyImage``, ``TooManyPixels`` or
    ``CorruptImage`` (truncated) as ``decode`` would.
    """
    if len(data) == 0:
        raise EmptyImage(f"{source}: empty file (0 bytes)")
    if not data.startswith(_JPEG_MAGIC):
        return None
    jpeg = _read_jpeg_header(data)
    if jpeg.size is None:
        return None
    _check_pixels(jpeg.size, max_pixels, source)
    _check_complete(jpeg, data, source)
    return JpegScreen(jpeg.size[::-1] if jpeg.rotated else jpeg.size, jpeg.orientation)


def encode_png(array: np.ndarray) -> bytes:
    """A uint8 mask (H×W) or RGB image (H×W×3) as PNG bytes, lossless; ``decode`` reads it back."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or not (
        array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)
    ):
        raise ValueError(f"encode_png takes H×W or H×W×3 uint8, got {array.dtype} {array.shape}")
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise ValueError(f"OpenCV could not encode an array of shape {array.shape} as PNG")
    return encoded.tobytes()


def _check_complete(jpeg: _JpegHeader, data: bytes, source: str) -> None:
    # rfind from the scan on: entropy-coded data never holds FFD9, an EXIF thumbnail's EOI comes
    # before the scan, and bytes some cameras append after the EOI are tolerated.
    if jpeg.scan_start is None or data.rfind(b"\xff\xd9", jpeg.scan_start) < 0:
        raise CorruptImage(
            f"{source}: truncated JPEG (no end-of-image marker after the image data)"
        )


def _check_pixels(size: tuple[int, int], max_pixels: int, source: str) -> None:
    height, width = int(size[0]), int(size[1])
    if height * width > max_pixels:
        raise TooManyPixels(
            f"{source}: {width}×{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,}"
        )


def _reduction(shown: tuple[int, int], target: tuple[int, int] | None) -> int:
    """The largest of 8, 4, 2 that leaves both sides at least the target's, else 1."""
    if target is None:
        return 1
    for denominator in (8, 4, 2):
        if all(side // denominator >= want for side, want in zip(shown, target, strict=True)):
            return denominator
    return 1


def _reduced_size(size: tuple[int, int], denominator: int) -> tuple[int, int]:
    # libjpeg's scaled output is ceil(side / denominator).
    return (-(-size[0] // denominator), -(-size[1] // denominator))


def _imdecode(data: bytes, flags: int, source: str) -> np.ndarray:
    kind = "JPEG" if data.startswith(_JPEG_MAGIC) else "PNG" if data.startswith(_PNG_MAGIC) else ""
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as error:
        reason = str(error).strip().splitlines()[-1]
        if "validateInputImageSize" in str(error):  # OpenCV's own pixel limit, for other formats
            raise TooManyPixels(f"{source}: beyond OpenCV's pixel limit ({reason})") from error
        raise CorruptImage(f"{source}: not a decodable image ({reason})") from error
    if pixels is None:
        raise CorruptImage(f"{source}: not a decodable {kind or 'image'} ({len(data):,} bytes)")
    return pixels


def _to_rgb(pixels: np.ndarray, source: str) -> np.ndarray:
    if pixels.dtype == np.uint16:
        # round(x / 257) maps 0..65535 onto 0..255 (65535 → 255, 32768 → 128); keeping the low byte
        # would turn a bright image into noise. In place of numpy's two uint32 temporaries (a
        # 98 MP image peaked at 2.85 GB), the same rounding for all 65,536 values.
        pixels = cv2.convertScaleAbs(pixels, alpha=1 / 257)
    elif pixels.dtype != np.uint8:
        raise UnsupportedImage(
            f"{source}: {pixels.dtype} samples have no fixed range to map onto 8-bit RGB"
        )
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise UnsupportedImage(f"{source}: decoded to shape {pixels.shape}, not three channels")
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def _is_avif(data: bytes) -> bool:
    """An ISO-BMFF file whose ``ftyp`` box names AVIF among its brands (major or compatible: a
    ``mif1`` file may hold AVIF)."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return False
    box = data[8 : min(struct.unpack_from(">I", data)[0], len(data))]
    brands = [box[0:4], *(box[i : i + 4] for i in range(8, len(box) - 3, 4))]
    return any(brand in _AVIF_BRANDS for brand in brands)


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk, which the format requires to come first."""
    if not data.startswith(_PNG_MAGIC) or len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", data, 16)
    return height, width


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR, else from the header Pillow reads without decoding
    (GIF's logical screen, BMP, TIFF's first image, WebP, …); None where neither can tell."""
    size = _png_size(data)
    if size is not None:
        return size
    # Pillow's own bomb check would refuse, at its own limit, sizes ours may allow: ours decides.
    # Decode tasks run one at a time in their process, so the module setting is restored unseen.
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
        return None  # not a format Pillow reads, or a header it cannot: OpenCV will say
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return height, width


def _read_jpeg_header(data: bytes) -> _JpegHeader:
    """Walk the segments before the first scan: size (SOFn), EXIF rotation (APP1), scan start.
    Of several EXIF blocks the first with an orientation tag counts, as in OpenCV's reader."""
    size, orientation, position = None, None, 2
    while position + 4 <= len(data):
        if data[position] != 0xFF or data[position + 1] == 0x00:
            # Bytes before a marker: libjpeg skips them (with a warning) to the next 0xFF that
            # starts a marker (FF 00 is a stuffed data byte, not one).
            position = data.find(b"\xff", position + 1)
            if position < 0:
                break
            continue
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == _JPEG_EOI:
            break
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        if marker == _JPEG_SOS:
            return _JpegHeader(size, orientation or 1, position)
        (length,) = struct.unpack_from(">H", data, position + 2)
        if marker in _JPEG_SOF and position + 9 <= len(data):
            size = struct.unpack_from(">HH", data, position + 5)
        elif (
            orientation is None
            and marker == _JPEG_APP1
            and data.startswith(b"Exif\x00\x00", position + 4)
        ):
            orientation = _exif_orientation(data[position + 10 : position + 2 + length])
        position += 2 + max(length, 2)
    return _JpegHeader(size, orientation or 1, None)


def _exif_orientation(tiff: bytes) -> int | None:
    """The EXIF orientation in IFD0, 1–8 (1, as stored, when out of range); None without the tag."""
    if tiff[:4] not in (b"II*\x00", b"MM\x00*") or len(tiff) < 8:
        return None
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, _type, _count, value = struct.unpack_from(order + "HHIH", tiff, entry)
        if tag == _EXIF_ORIENTATION_TAG:
            return value if 1 <= value <= 8 else 1
    return None
