"""Image preprocessing against transformers' PIL Qwen2-VL image processor (the one Rex-Omni runs)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from rexedge.runtime.config import RexOmniConfig
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.request.preprocess import (
    MAX_PIXELS,
    MIN_PIXELS,
    ImageError,
    PreprocessedImage,
    load_image,
    preprocess,
    smart_resize,
)
from rexedge.runtime.request.vision_layout import vision_layout


@pytest.fixture(scope="module")
def reference() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})


def check_against_reference(ours: PreprocessedImage, reference: Qwen2VLImageProcessorPil, pil: Image.Image) -> None:
    """pil: what the reference is given (it converts to RGB itself)."""
    expected = reference(images=pil, return_tensors="np")
    grid = tuple(int(v) for v in expected["image_grid_thw"][0])
    assert ours.grid_thw == grid
    assert ours.resized_size == (grid[2] * 14, grid[1] * 14)
    assert ours.image_size == pil.size
    assert ours.num_image_tokens == grid[1] * grid[2] // 4
    assert ours.merged_grid_hw == (grid[1] // 2, grid[2] // 2)
    assert ours.pixel_patches.dtype == np.float32
    assert ours.pixel_patches.shape == expected["pixel_values"].shape
    np.testing.assert_allclose(ours.pixel_patches, expected["pixel_values"], rtol=0, atol=1e-5)


def random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# smart_resize -----------------------------------------------------------------


def test_smart_resize_matches_transformers() -> None:
    rng = np.random.default_rng(0)
    sizes = [(int(rng.integers(1, 4000)), int(rng.integers(1, 4000))) for _ in range(400)]
    sizes += [(1, 200), (200, 1), (14, 14), (42, 42), (70, 98), (2000, 2000), (28, 5600), (3, 599)]
    for height, width in sizes:
        if max(height, width) / min(height, width) > 200:
            continue
        for min_pixels, max_pixels in [(MIN_PIXELS, MAX_PIXELS), (56 * 56, 28 * 28 * 1280), (784, 784 * 64)]:
            expected = hf_qwen2_vl.smart_resize(height, width, 28, min_pixels, max_pixels)
            assert smart_resize(height, width, 28, min_pixels, max_pixels) == expected, (height, width)


def test_smart_resize_documented_example() -> None:
    assert smart_resize(810, 1440) == (812, 1428)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 10), "height must be positive"),
        ((10, -3), "width must be positive"),
        ((10.5, 10), "height must be an integer"),
        ((1, 201), "aspect ratio"),
        ((4021, 20), "aspect ratio"),
        ((100, 100, 28, 5000, 4000), "min_pixels 5000 is larger"),
        ((100, 100, 0), "factor must be positive"),
    ],
)
def test_smart_resize_errors(args: tuple, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        smart_resize(*args)


def test_aspect_ratio_limit_is_the_reference_one() -> None:
    assert smart_resize(1, 200) == hf_qwen2_vl.smart_resize(1, 200, 28, MIN_PIXELS, MAX_PIXELS)
    with pytest.raises(ValueError):
        hf_qwen2_vl.smart_resize(1, 201, 28, MIN_PIXELS, MAX_PIXELS)


# pixel values ------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width",
    [
        (37, 61),  # upscaled to min_pixels
        (479, 641),
        (810, 1440),  # docs/model.md example: 1428x812, grid (1, 58, 102), 1,479 tokens
        (1333, 1601),  # above max_pixels: downscaled
        (23, 4001),  # aspect ratio 174
        (28, 28 * 16),  # already a valid size: no resize at all
    ],
)
def test_pixels_match_transformers(reference: Qwen2VLImageProcessorPil, height: int, width: int) -> None:
    array = random_rgb(np.random.default_rng(height * 7 + width), height, width)
    ours = preprocess(array)
    check_against_reference(ours, reference, Image.fromarray(array))
    if (height, width) == (810, 1440):
        assert ours.resized_size == (1428, 812) and ours.grid_thw == (1, 58, 102) and ours.num_image_tokens == 1479


def test_random_odd_sizes_and_pixel_budgets(reference: Qwen2VLImageProcessorPil) -> None:
    rng = np.random.default_rng(1)
    small = Qwen2VLImageProcessorPil(size={"shortest_edge": 784 * 4, "longest_edge": 784 * 40})
    for _ in range(4):
        height, width = int(rng.integers(5, 700)) | 1, int(rng.integers(5, 700)) | 1
        array = random_rgb(rng, height, width)
        check_against_reference(preprocess(array), reference, Image.fromarray(array))
        check_against_reference(
            preprocess(array, min_pixels=784 * 4, max_pixels=784 * 40), small, Image.fromarray(array)
        )


def test_row_layout_by_hand() -> None:
    """One patch row pinned down independently: block raster order, TL TR BL BR, [channel][frame][y][x]."""
    rng = np.random.default_rng(2)
    array = random_rgb(rng, 56, 84)  # already a valid size, so no resampling: 4x6 patches
    ours = preprocess(array, min_pixels=28 * 28, max_pixels=56 * 84)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    normalized = (array / 255.0 - mean) / std
    # row 4 * 4 + 3: block (row 1, col 1) -> patches rows 2..3, cols 2..3; slot 3 (bottom right) -> patch (3, 3)
    patch = normalized[3 * 14 : 4 * 14, 3 * 14 : 4 * 14]  # [y, x, channel]
    expected = np.stack([patch.transpose(2, 0, 1)] * 2, axis=1).reshape(-1)  # [channel][frame][y][x]
    np.testing.assert_allclose(ours.pixel_patches[4 * 4 + 3], expected, atol=1e-5)


def test_layout_comes_from_vision_layout() -> None:
    ours = preprocess(random_rgb(np.random.default_rng(3), 100, 300))
    _, grid_h, grid_w = ours.grid_thw
    expected = vision_layout(grid_h, grid_w)
    np.testing.assert_array_equal(ours.layout.window_index, expected.window_index)
    np.testing.assert_array_equal(ours.layout.rotary_pos, expected.rotary_pos)


def test_tiny_config_gives_the_same_patches() -> None:
    array = random_rgb(np.random.default_rng(4), 61, 37)
    np.testing.assert_array_equal(
        preprocess(array).pixel_patches, preprocess(array, cfg=RexOmniConfig.preset("tiny")).pixel_patches
    )


def test_output_is_read_only() -> None:
    ours = preprocess(random_rgb(np.random.default_rng(5), 40, 40))
    with pytest.raises(ValueError):
        ours.pixel_patches[0, 0] = 1.0


# input kinds --------------------------------------------------------------------


def test_path_pil_and_numpy_inputs_agree(reference: Qwen2VLImageProcessorPil, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    array = random_rgb(rng, 97, 131)
    png = tmp_path / "image.png"
    Image.fromarray(array).save(png)
    jpeg = tmp_path / "image.jpg"
    Image.fromarray(array).save(jpeg, quality=90)

    from_array = preprocess(array)
    check_against_reference(from_array, reference, Image.fromarray(array))
    for same in (preprocess(png), preprocess(str(png)), preprocess(Image.fromarray(array))):
        np.testing.assert_array_equal(same.pixel_patches, from_array.pixel_patches)
    with Image.open(jpeg) as decoded:
        check_against_reference(preprocess(jpeg), reference, decoded.copy())


def test_bgr_arrays(reference: Qwen2VLImageProcessorPil) -> None:
    rng = np.random.default_rng(7)
    rgb = random_rgb(rng, 83, 59)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    np.testing.assert_array_equal(
        preprocess(bgr, channel_order="bgr").pixel_patches, preprocess(rgb).pixel_patches
    )
    rgba = np.concatenate([rgb, rng.integers(0, 256, (83, 59, 1), dtype=np.uint8)], axis=2)
    bgra = np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]])
    check_against_reference(preprocess(bgra, channel_order="bgr"), reference, Image.fromarray(rgba, "RGBA"))


def _palette_image(rng: np.random.Generator, transparent: bool) -> Image.Image:
    image = Image.fromarray(rng.integers(0, 16, (71, 53), dtype=np.uint8), "P")
    image.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist())
    if transparent:
        image.info["transparency"] = 3
    return image


@pytest.mark.parametrize("kind", ["L", "1", "LA", "RGBA", "P", "P+transparency", "CMYK", "numpy-gray", "numpy-rgba"])
def test_other_modes_convert_like_the_reference(reference: Qwen2VLImageProcessorPil, kind: str) -> None:
    rng = np.random.default_rng(len(kind))
    if kind == "P":
        pil = _palette_image(rng, transparent=False)
    elif kind == "P+transparency":
        pil = _palette_image(rng, transparent=True)
    elif kind == "numpy-gray":
        array = rng.integers(0, 256, (45, 67), dtype=np.uint8)
        check_against_reference(preprocess(array), reference, Image.fromarray(array, "L"))
        return
    elif kind == "numpy-rgba":
        array = rng.integers(0, 256, (45, 67, 4), dtype=np.uint8)
        check_against_reference(preprocess(array), reference, Image.fromarray(array, "RGBA"))
        return
    else:
        bands = {"L": 1, "1": 1, "LA": 2, "RGBA": 4, "CMYK": 4}[kind]
        array = rng.integers(0, 256, (45, 67, bands), dtype=np.uint8)
        pil = Image.fromarray(array[:, :, 0], "L").convert("1") if kind == "1" else Image.fromarray(
            array.squeeze(2) if bands == 1 else array, kind
        )
    check_against_reference(preprocess(pil), reference, pil)
    assert load_image(pil).mode == "RGB"


def test_transparent_pixels_become_white() -> None:
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    rgba[..., :3] = 17
    rgba[:, 20:, 3] = 255
    rgb = np.asarray(load_image(rgba))
    assert (rgb[:, :20] == 255).all() and (rgb[:, 20:] == 17).all()


def test_sixteen_bit_grayscale_is_scaled_not_clipped(reference: Qwen2VLImageProcessorPil, tmp_path: Path) -> None:
    # The reference's convert("RGB") clips 16-bit samples at 255; we scale by 1/257 instead,
    # so the reference here is its output on the 8-bit image that scaling gives.
    rng = np.random.default_rng(8)
    samples = rng.integers(0, 65536, (51, 77), dtype=np.uint16)
    samples[0, 0], samples[0, 1] = 0, 65535
    path = tmp_path / "gray16.png"
    Image.fromarray(samples).save(path)
    eight_bit = np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8)
    rgb = np.asarray(load_image(path))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [255, 255, 255]
    check_against_reference(preprocess(path), reference, Image.fromarray(eight_bit, "L"))


# errors ------------------------------------------------------------------------


def _truncated_png(tmp_path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(random_rgb(np.random.default_rng(9), 64, 64)).save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    return path


def _noise_file(tmp_path: Path) -> Path:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(10).integers(0, 256, 1024, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda tmp: tmp / "missing.jpg", "missing.jpg: no such image file"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: _noise_file(tmp), "noise.png: not an image"),
        (lambda tmp: _empty_file(tmp), r"empty.jpg: empty file \(0 bytes\)"),
        (lambda tmp: _truncated_png(tmp), "truncated.png: unreadable or corrupt"),
        (lambda tmp: Image.new("RGB", (0, 5)), "PIL image is empty"),
        (lambda tmp: Image.new("F", (5, 5)), "floating-point"),
        (lambda tmp: np.zeros((0, 5, 3), np.uint8), "numpy image is empty"),
        (lambda tmp: np.zeros((5, 5, 3), np.float32), "dtype uint8, got float32"),
        (lambda tmp: np.zeros((5, 5, 3), np.uint16), "dtype uint8, got uint16"),
        (lambda tmp: np.zeros((5, 5, 2), np.uint8), r"shape HxWx3.*\(5, 5, 2\)"),
        (lambda tmp: np.zeros((1, 5, 5, 3), np.uint8), r"shape HxWx3.*\(1, 5, 5, 3\)"),
        (lambda tmp: [[0, 0, 0]], "got list"),
    ],
)
def test_bad_inputs_are_clear_errors(tmp_path: Path, make_input, message: str) -> None:
    image = make_input(tmp_path)
    with pytest.raises(ImageError, match=message) as info:
        preprocess(image)
    assert isinstance(info.value, RexEdgeError)


def test_bad_channel_order() -> None:
    with pytest.raises(ImageError, match="channel_order"):
        load_image(np.zeros((5, 5, 3), np.uint8), channel_order="RGB")


def test_extreme_aspect_ratio_is_an_error() -> None:
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess(np.zeros((2, 500, 3), np.uint8))


def test_no_torch_needed() -> None:
    code = (
        "import sys\n"
        "import rexedge.runtime.request.preprocess, rexedge.runtime.request.positions\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
