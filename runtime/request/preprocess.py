"""Image preprocessing for the vision encoder: load, resize, normalize, cut into patches.

numpy + Pillow only, so the ``ort`` and ``trt`` backends run without torch. The output
matches the Qwen2-VL image processor that Rex-Omni uses (PIL bicubic resize to the
``smart_resize`` size, CLIP normalization, a still image repeated to two frames).
"""

from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.vision_layout import VisionLayout, vision_layout

# Rex-Omni's pixel budget: 16 and 2560 merged tokens of 28 x 28 pixels.
MIN_PIXELS = 16 * 28 * 28
MAX_PIXELS = 2560 * 28 * 28
# The reference refuses images more elongated than this (longer side / shorter side).
MAX_ASPECT_RATIO = 200

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# (x / 255 - mean) / std folded into one multiply-add per value
_SCALE = (1.0 / (255.0 * np.array(CLIP_STD))).astype(np.float32)
_OFFSET = (-np.array(CLIP_MEAN) / np.array(CLIP_STD)).astype(np.float32)

# Pillow modes holding 16-bit (or wider integer) samples.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
ChannelOrder = Literal["rgb", "bgr"]


class ImageError(RexEdgeError, ValueError):
    """An image that cannot be read or used: missing, corrupt, empty, or of the wrong shape."""


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """The (height, width) the model sees: multiples of ``factor``, area within [min, max] pixels.

    Each side is rounded to the nearest multiple of ``factor`` (Python ``round``: halves
    to even). If that area exceeds ``max_pixels`` both sides shrink by the same ratio and
    round down; if it is below ``min_pixels`` both grow and round up. Each side is at
    least ``factor``.
    """
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    factor = _positive_int(factor, "factor")
    min_pixels, max_pixels = _positive_int(min_pixels, "min_pixels"), _positive_int(max_pixels, "max_pixels")
    if min_pixels > max_pixels:
        raise ImageError(f"min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image of {width}x{height} (WxH) has an aspect ratio of {max(height, width) / min(height, width):.1f}; "
            f"expected at most {MAX_ASPECT_RATIO} (crop or pad it first)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return max(factor, h_bar), max(factor, w_bar)


def load_image(image: ImageInput, channel_order: ChannelOrder = "rgb") -> Image.Image:
    """Any supported image as an 8-bit RGB PIL image.

    Accepts a file path (``str`` / ``os.PathLike``), a PIL image, or a numpy uint8 array
    of shape HxWx3 (colour), HxWx4 (colour + alpha) or HxW (grayscale). Numpy arrays are
    taken as RGB(A) unless ``channel_order="bgr"`` says BGR(A), as OpenCV produces.

    Conversion to RGB:
    - transparency (RGBA, LA, a palette with a transparent index, ...) is composited on a
      white background, as the reference does (the transformers image processor Rex-Omni
      runs, and qwen_vl_utils, which Rex-Omni's vLLM path uses). Dropping alpha instead
      would expose whatever colour the encoder stored under transparent pixels (often
      black), which the model never saw in training.
    - grayscale, palette, CMYK, ... go through Pillow's ``convert("RGB")``;
    - 16-bit grayscale is scaled to 8 bits (value / 257). Here we deliberately differ
      from the reference, whose ``convert("RGB")`` clips every value above 255 to white.
    EXIF orientation is not applied (neither does the reference): output coordinates
    refer to the pixel grid as stored in the file.
    """
    if channel_order not in ("rgb", "bgr"):
        raise ImageError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    if isinstance(image, Image.Image):
        _check_not_empty(image.size, "PIL image")
        return _to_rgb(image, "PIL image")
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, channel_order)
    if isinstance(image, (str, os.PathLike)):
        return _open_path(Path(image))
    raise ImageError(
        f"image must be a file path, a PIL image or a numpy uint8 HxWx3 array; got {type(image).__name__}"
    )


@dataclass(frozen=True, eq=False)
class PreprocessedImage:
    """One image ready for the vision encoder, and the sizes the rest of the pipeline needs.

    pixel_patches: float32 [N, patch_dim] with N = grid_h * grid_w. Rows go over 2x2
        merge blocks in raster order and TL, TR, BL, BR inside a block; values in a row
        are ordered [channel][frame][y][x] (the still image repeated to 2 frames).
    grid_thw: (1, grid_h, grid_w) in 14-pixel patches.
    image_size / resized_size: (width, height) of the original / resized image;
        coordinate bins map back to image_size.
    num_image_tokens: <|image_pad|> tokens the prompt needs (one per 2x2 block).
    layout: the vision encoder's window permutation, its inverse and rotary positions
        (``rexedge.runtime.request.vision_layout``; cached and shared between images of one size).
    """

    pixel_patches: np.ndarray
    grid_thw: tuple[int, int, int]
    image_size: tuple[int, int]
    resized_size: tuple[int, int]
    num_image_tokens: int
    layout: VisionLayout

    @property
    def merged_grid_hw(self) -> tuple[int, int]:
        """(rows, cols) of image tokens: the grid ``rope_positions`` takes."""
        return self.layout.merged_grid


def preprocess(
    image: ImageInput,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    cfg: RexOmniConfig | None = None,
    channel_order: ChannelOrder = "rgb",
) -> PreprocessedImage:
    """Load ``image`` (see ``load_image``), resize, normalize and cut it into patch rows."""
    cfg = cfg if cfg is not None else RexOmniConfig()
    rgb = load_image(image, channel_order)
    width, height = rgb.size
    resized_h, resized_w = smart_resize(height, width, cfg.image_factor, min_pixels, max_pixels)
    if (resized_w, resized_h) != rgb.size:
        rgb = rgb.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    pixels = np.asarray(rgb)  # [H, W, 3] uint8

    patch, merge, frames = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    grid_h, grid_w = resized_h // patch, resized_w // patch
    # a view: (block row, block col, row in block, col in block, channel, y, x)
    blocks = pixels.reshape(grid_h // merge, merge, patch, grid_w // merge, merge, patch, 3)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
    patches = np.empty(blocks.shape[:5] + (frames, patch, patch), dtype=np.float32)
    first_frame = patches[:, :, :, :, :, 0]
    # normalize while gathering into patch order: one pass over the uint8 pixels
    np.multiply(blocks, _SCALE[:, None, None], out=first_frame)
    first_frame += _OFFSET[:, None, None]
    patches[:, :, :, :, :, 1:] = first_frame[:, :, :, :, :, None]  # a still image: every frame the same
    pixel_patches = patches.reshape(grid_h * grid_w, -1)
    pixel_patches.flags.writeable = False
    return PreprocessedImage(
        pixel_patches=pixel_patches,
        grid_thw=(1, grid_h, grid_w),
        image_size=(width, height),
        resized_size=(resized_w, resized_h),
        num_image_tokens=grid_h * grid_w // (merge * merge),
        layout=vision_layout(grid_h, grid_w, merge, cfg.window_merged),
    )


# helpers -------------------------------------------------------------------


def _positive_int(value: object, name: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ImageError(f"{name} must be an integer, got {value!r}") from None
    if number <= 0:
        raise ImageError(f"{name} must be positive, got {number}")
    return number


def _check_not_empty(size: tuple[int, int], what: str) -> None:
    if size[0] <= 0 or size[1] <= 0:
        raise ImageError(f"{what} is empty ({size[0]}x{size[1]} pixels, WxH)")


def _to_rgb(image: Image.Image, what: str) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_INTEGER_MODES:
        samples = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if image.mode == "F":
        raise ImageError(f"{what} holds floating-point samples (mode F), whose range is unknown; give 8-bit data")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray, channel_order: ChannelOrder) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"numpy image must have dtype uint8, got {array.dtype} (scale to 0..255 first)")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        if channel_order == "bgr":
            array = array[..., [2, 1, 0, 3][: array.shape[2]]]
    elif array.ndim != 2:
        raise ImageError(
            f"numpy image must have shape HxWx3 (colour), HxWx4 (with alpha) or HxW (grayscale), got {array.shape}"
        )
    _check_not_empty((array.shape[1], array.shape[0]), "numpy image")
    # Pillow infers the mode from the shape: HxW -> L, HxWx3 -> RGB, HxWx4 -> RGBA
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)), "numpy image")


def _open_path(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{path}: no such image file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, expected an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes), expected an image")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now, so a truncated file fails here and not mid-pipeline
            _check_not_empty(opened.size, str(path))
            rgb = _to_rgb(opened, str(path))
            # closing the file releases the pixels of `opened`, so keep a copy if it was RGB already
            return opened.copy() if rgb is opened else rgb
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: unreadable or corrupt image ({e})") from None
