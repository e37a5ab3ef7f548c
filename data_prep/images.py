"""Turn the bytes of one input image into shard records.

Per input, in this order (every refusal is a counted skip reason, never an exception):

1. ``empty``: zero bytes.
2. ``not_image``: Pillow recognises none of the accepted formats in the header.
3. ``too_large_pixels``: width x height from the *header* exceeds ``max_pixels``; checked
   before any pixel is decoded, so a decompression bomb costs a header parse.
4. ``too_small``: the shorter side is below ``min_side``.
5. ``corrupt``: decoding fails (truncated stream, broken chunk, bad Huffman table...).

Then:

- a baseline/progressive JPEG that is already RGB and within ``max_side`` is stored
  byte-for-byte (no generation loss, no encode cost). It is still decoded once, at 1/8
  scale through libjpeg's DCT scaling (``draft``), which both proves the whole stream
  decodes and feeds the perceptual hash at a fraction of a full decode's cost;
- everything else is converted to RGB 8-bit and encoded once to JPEG at ``jpeg_quality``
  (Pillow's default 4:2:0 chroma subsampling, no optimisation pass: speed over a few %);
- an image whose longer side exceeds ``max_side`` is cut into a near-equal grid of
  ``ceil(W/max_side) x ceil(H/max_side)`` tiles, emitted in row-major order, each tile's
  source suffixed with ``#x0,y0,x1,y1``. Tile sides are ``floor`` or ``ceil`` of
  ``W/nx``, which is above ``max_side/2``; ``min_side <= max_side/2`` (enforced by
  :class:`PackOptions`) therefore means no tile is ever under ``min_side``.

Mode conversion:

- 16-bit and 32-bit single-channel images (``I;16*``, ``I``, ``F``) are *stretched*:
  values between the image's own 0.5th and 99.5th percentiles (finite values only) map
  linearly to 0..255 and the rest is clipped. Percentiles rather than min/max because
  remote-sensing rasters routinely carry a few saturated or no-data pixels that would
  otherwise squash the whole image into a handful of grey levels. When the percentiles
  coincide the min/max range is used; a constant image becomes black. Truncating
  (Pillow's own ``I;16 -> L``) would clip a 12-bit sensor image to near-white.
- images with alpha (RGBA, LA, palette with transparency) are composited over black:
  transparent pixels in remote sensing are no-data, and black is how no-data usually
  looks in the other sources.
- gray, bilevel, palette, CMYK, YCbCr: Pillow's standard conversion to RGB.
- EXIF orientation is not applied, so a passthrough JPEG and a re-encoded image store
  the raw pixel grid alike (GPU decoders do not apply it either).
- multi-frame files (GIF, multi-page TIFF): the first frame.
"""
from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_prep.phash import HASH_SIZE, phash_blocks
from selectivemae_ds.errors import ConfigError

ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")
"""Pillow plugins allowed to parse inputs: limits the parsers exposed to untrusted files.
Multi-picture JPEGs (MPO) open through the JPEG plugin and are re-encoded (first frame)."""

STRETCH_PERCENTILES: tuple[float, float] = (0.5, 99.5)

DEFAULT_MIN_SIDE = 64
DEFAULT_MAX_SIDE = 1024
DEFAULT_MAX_PIXELS = 16384 * 16384
DEFAULT_JPEG_QUALITY = 95

# Our own pixel limit (checked from the header) replaces Pillow's global one; leaving
# Pillow's in place would turn large legitimate scenes into warnings or errors that do
# not follow --max-pixels.
Image.MAX_IMAGE_PIXELS = None

DAMAGED_FILE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error)
"""What Pillow raises for a header it recognised but cannot parse, or data it cannot decode:
all mean the file is damaged."""

HEAD_BYTES = 64 * 1024
"""Bytes read first from every input: the signature and, for all but odd TIFFs, the header."""
MAX_BYTES_PER_PIXEL = 16
"""Most bytes an accepted file may spend per declared pixel of its first frame: twice the
densest layout Pillow opens (uncompressed 16-bit RGBA, 8 bytes), for extra pages/overviews."""
HEADER_SLACK_BYTES = 16 * 1024 * 1024
"""Metadata allowance on top of the pixels (EXIF, ICC, XMP, GeoTIFF tags, thumbnails); also
how far into a non-TIFF file its header (the image size) may lie."""

Image.init()
_ACCEPTS = tuple((fmt, Image.OPEN[fmt][1]) for fmt in ACCEPTED_FORMATS)
"""Pillow's own signature tests of the accepted formats (what ``Image.open`` tries)."""


def signature_format(head: bytes) -> str | None:
    """The accepted format whose signature the first bytes carry, else None."""
    prefix = head[:16]
    for fmt, accept in _ACCEPTS:
        if accept(prefix):
            return fmt
    return None


def not_image_detail(head: bytes) -> str:
    """The skip detail of a ``not_image`` input: deterministic (no object addresses)."""
    return (f"no accepted format ({', '.join(ACCEPTED_FORMATS)}) recognises the content; "
            f"it starts with {head[:8].hex(' ') or 'nothing'}")


def too_many_pixels(width: int, height: int, max_pixels: int) -> str | None:
    """The ``too_large_pixels`` detail when ``width x height`` exceeds the limit, else None."""
    if width * height > max_pixels:
        return f"{width}x{height} = {width * height} px > {max_pixels}"
    return None


def header_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) declared by the header within ``head``, or None when it does not parse
    from these bytes alone (a TIFF whose directory lies further into the file)."""
    try:
        with warnings.catch_warnings():
            # A cut-off TIFF directory makes Pillow warn about "corrupt EXIF data": expected here.
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(head), formats=ACCEPTED_FORMATS) as im:
                return im.size
    except DAMAGED_FILE_ERRORS:
        return None


def byte_budget(width: int, height: int) -> int:
    """Most bytes an accepted file declaring ``width x height`` may hold."""
    return width * height * MAX_BYTES_PER_PIXEL + HEADER_SLACK_BYTES


@dataclass(frozen=True)
class PackOptions:
    """Per-image processing options (part of the resume fingerprint); invalid values raise
    :class:`ConfigError` naming the flag."""

    min_side: int = DEFAULT_MIN_SIDE
    """Inputs whose shorter side is below this are skipped as ``too_small``."""
    max_side: int = DEFAULT_MAX_SIDE
    """Longer side above this: the image is sliced into tiles of at most this side."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Header-declared width x height above this: skipped as ``too_large_pixels``."""
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    """Quality of the one JPEG encode for inputs that are not passed through."""

    def __post_init__(self) -> None:
        if self.min_side < 1:
            raise ConfigError(f"--min-side must be >= 1, got {self.min_side}")
        if self.max_side > 65535:
            raise ConfigError(f"--max-side must be <= 65535 (stored as uint16), got {self.max_side}")
        if 2 * self.min_side > self.max_side:
            raise ConfigError(
                f"--min-side ({self.min_side}) must be at most half of --max-side ({self.max_side}): "
                "tiles of a sliced image can be as small as just over max-side/2")
        if self.max_pixels < self.min_side * self.min_side:
            raise ConfigError(f"--max-pixels ({self.max_pixels}) is below min-side^2")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")


@dataclass
class Record:
    """One stored image: encoded JPEG plus the index values the shard keeps."""

    data: bytes
    height: int
    width: int
    phash: int
    source: str


@dataclass
class Outcome:
    """What one input produced: records, or the reason it was skipped."""

    records: list[Record] = field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    sliced: bool = False
    passthrough: bool = False


def tile_boxes(width: int, height: int, max_side: int) -> list[tuple[int, int, int, int]]:
    """Near-equal grid of ceil(W/max) x ceil(H/max) boxes (x0, y0, x1, y1), row-major."""
    nx = max(1, math.ceil(width / max_side))
    ny = max(1, math.ceil(height / max_side))
    xs = [i * width // nx for i in range(nx + 1)]
    ys = [j * height // ny for j in range(ny + 1)]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(ny) for i in range(nx)]


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linear percentile stretch of a single-channel array to uint8 (rule in module doc)."""
    arr = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    valid = arr[finite]
    lo, hi = np.percentile(valid, STRETCH_PERCENTILES)
    if hi <= lo:
        lo, hi = float(valid.min()), float(valid.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (np.where(finite, arr, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any supported mode -> RGB 8-bit (rules in the module docstring)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        gray = Image.fromarray(stretch_to_uint8(np.asarray(im)))
        return gray.convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def hash_input(im: Image.Image) -> np.ndarray:
    """The 32x32 luminance block a perceptual hash is computed from."""
    small = im.convert("L").resize((HASH_SIZE, HASH_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64)


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def process_image(data: bytes, source: str, opts: PackOptions) -> Outcome:
    """Records of one input (see the module docstring for the rules)."""
    if not data:
        return Outcome(reason="empty", detail="zero-byte file")
    try:
        im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        # Pillow's own text names the BytesIO object's address: not reproducible.
        return Outcome(reason="not_image", detail=not_image_detail(data))
    except DAMAGED_FILE_ERRORS as e:
        return Outcome(reason="corrupt", detail=f"{type(e).__name__}: {e}")
    with im:
        width, height = im.size
        if width <= 0 or height <= 0:
            return Outcome(reason="corrupt", detail=f"header declares {width}x{height}")
        too_large = too_many_pixels(width, height, opts.max_pixels)
        if too_large is not None:
            return Outcome(reason="too_large_pixels", detail=too_large)
        if min(width, height) < opts.min_side:
            return Outcome(reason="too_small", detail=f"{width}x{height}, min side {opts.min_side}")
        sliced = max(width, height) > opts.max_side
        try:
            if im.format == "JPEG" and im.mode == "RGB" and not sliced:
                # Decode at 1/8 scale: proves the stream is complete and yields the hash input.
                im.draft("RGB", (HASH_SIZE, HASH_SIZE))
                im.load()
                block = hash_input(im)
                return Outcome(records=[Record(data, height, width, int(phash_blocks(block[None])[0]), source)],
                               passthrough=True)
            im.load()
            rgb = to_rgb8(im)
            boxes = tile_boxes(width, height, opts.max_side) if sliced else [(0, 0, width, height)]
            tiles = [rgb.crop(box) if sliced else rgb for box in boxes]
            hashes = phash_blocks(np.stack([hash_input(t) for t in tiles]))
            records = []
            for box, tile, h in zip(boxes, tiles, hashes):
                name = f"{source}#{box[0]},{box[1]},{box[2]},{box[3]}" if sliced else source
                records.append(Record(encode_jpeg(tile, opts.jpeg_quality), box[3] - box[1], box[2] - box[0],
                                      int(h), name))
        except DAMAGED_FILE_ERRORS as e:
            return Outcome(reason="corrupt", detail=f"{type(e).__name__}: {e}")
    return Outcome(records=records, sliced=sliced)
