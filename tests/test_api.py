"""RexOmni end to end on tiny checkpoints: exact decoding against transformers, structured output in
the grammar through real bundles, the result dictionaries, and the torch-free ort path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

from rexedge.export.bundle import export_bundle
from rexedge.runtime.api import RexOmni
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.results.parse import parse_prediction
from rexedge.runtime.request.preprocess import preprocess
from rexedge.runtime.request.prompts import build_task_prompt, encode_prompt
from test_loop import groups_of, response_pattern

NEW_TOKENS = 24
# the official wrapper's result keys, then rexedge's additions
OFFICIAL_KEYS = {"success", "image_size", "resized_size", "task", "prompt", "raw_output", "extracted_predictions",
                 "inference_time", "num_output_tokens", "num_prompt_tokens", "generation_time", "tokens_per_second"}
EXTRA_KEYS = {"output_token_ids", "detections", "absent", "stop_reason", "padding_tokens", "timings"}


def random_image(seed: int, low: int = 40, high: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    height, width = rng.integers(low, high, 2)
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def bundle_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("api") / "bundle", progress=False)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Qwen2_5_VLForConditionalGeneration:
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exact_models(tiny_checkpoint: Path, bundle_dir: Path) -> dict[str, RexOmni]:
    return {"ort": RexOmni(bundle_dir, "ort", decoding="exact", max_tokens=NEW_TOKENS),
            "torch": RexOmni(tiny_checkpoint, "torch", decoding="exact", max_tokens=NEW_TOKENS)}


def transformers_tokens(reference, model: RexOmni, image: np.ndarray, task: str, categories: list[str],
                        penalty: float = 1.05) -> list[int]:
    """transformers' greedy generate on the inputs rexedge builds (prompt ids, pixel patches, grid)."""
    pre = preprocess(image, cfg=model.config)
    prompt = build_task_prompt(task, categories, image_size=pre.image_size)
    input_ids = torch.tensor([encode_prompt(model.tokenizer, model.ids, prompt, pre.num_image_tokens)])
    settings = GenerationConfig(do_sample=False, repetition_penalty=penalty, max_new_tokens=NEW_TOKENS,
                                eos_token_id=[model.ids.im_end, model.ids.endoftext], pad_token_id=model.ids.endoftext)
    with torch.no_grad():
        out = reference.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            pixel_values=torch.tensor(pre.pixel_patches), image_grid_thw=torch.tensor([pre.grid_thw]),
            mm_token_type_ids=(input_ids == model.config.image_token_id).int(), generation_config=settings)
    return out[0, input_ids.shape[1]:].tolist()


SHAPES = [(90, 150), (200, 130)]  # (height, width): a 5x6 merged grid (not whole windows) and a 7x4 one


def parity_image(shape: tuple[int, int]) -> np.ndarray:
    return (np.random.default_rng(shape[0]).random((*shape, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def expected_tokens(reference, exact_models: dict):
    """transformers' tokens per (image shape, penalty), each generated once."""
    cache: dict[tuple, list[int]] = {}

    def get(shape: tuple[int, int], penalty: float) -> list[int]:
        if (shape, penalty) not in cache:
            cache[shape, penalty] = transformers_tokens(reference, exact_models["ort"], parity_image(shape),
                                                        "detection", ["cup", "dog"], penalty)
        return cache[shape, penalty]
    return get


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_exact_decoding_is_token_identical_to_transformers(expected_tokens, exact_models: dict, shape: tuple) -> None:
    expected = expected_tokens(shape, 1.05)
    # the comparison means something: 20+ varied tokens before any end token
    assert len(expected) >= 20 and len(set(expected)) > 10, expected
    for name, model in exact_models.items():
        [result] = model.inference(parity_image(shape), task="detection", categories=["cup", "dog"])
        assert result["output_token_ids"] == expected, name
        assert result["stop_reason"] == "max_new_tokens" and result["num_output_tokens"] == NEW_TOKENS


def test_exact_decoding_follows_the_penalty(expected_tokens, bundle_dir: Path) -> None:
    """A stronger penalty changes transformers' answer, and rexedge's the same way."""
    model = RexOmni(bundle_dir, "ort", decoding="exact", max_tokens=NEW_TOKENS, repetition_penalty=1.5)
    changed = 0
    for shape in SHAPES:
        expected = expected_tokens(shape, 1.5)
        [result] = model.inference(parity_image(shape), task="detection", categories=["cup", "dog"])
        assert result["output_token_ids"] == expected
        changed += expected != expected_tokens(shape, 1.05)
    assert changed, "the penalty changed no answer: these inputs cannot tell whether it is applied"


@pytest.fixture(scope="module")
def structured(tiny_checkpoint: Path, bundle_dir: Path) -> dict[str, RexOmni]:
    # a phrase holds at most 256 ids: 400 tokens fit a group of the tiny model's; the torch backend
    # (10x slower) is compared on a prefix
    return {"ort": RexOmni(bundle_dir, "ort", max_tokens=400), "torch": RexOmni(tiny_checkpoint, "torch", max_tokens=40)}


@pytest.mark.parametrize("task, categories", [("detection", ["cup", "dog"]), ("pointing", ["cup", "dog"]),
                                              ("ocr_polygon", ["text"])])
def test_structured_output_of_real_bundles_is_in_the_grammar(structured: dict, task: str, categories: list) -> None:
    """Random images until an answer holds a group (a random model mostly answers <|im_end|> at once)."""
    pattern = response_pattern(task)
    for seed in range(150):
        image = random_image(seed)
        [result] = structured["ort"].inference(image, task=task, categories=categories)
        if result["stop_reason"] != "eos":
            continue  # a runaway answer cut by max_tokens is a prefix; the fake-backend tests cover those
        text = result["raw_output"]
        assert pattern.fullmatch(text), f"image {seed}: not in the {task} grammar: {text!r}"
        groups = groups_of(text, task)
        expected = [(phrase, bins) for phrase, geoms in groups for bins in geoms or ()]
        assert [(d.phrase, d.bins) for d in result["detections"]] == expected
        if groups:
            break
    else:
        pytest.fail(f"no image made the tiny model answer {task} with a group")
    # the typed detections and the official parser agree on every phrase the parser reads
    parsed = parse_prediction(text, *result["image_size"], task)
    for det in result["detections"]:
        if det.phrase.strip() and "<" not in det.phrase:
            assert det.to_official() in parsed[det.phrase.strip()]
    # the torch backend decodes the same answer
    torch_result = structured["torch"].inference(image, task=task, categories=categories)[0]
    assert torch_result["output_token_ids"] == result["output_token_ids"][:40]


def test_result_dictionaries(structured: dict, tmp_path: Path) -> None:
    model = structured["ort"]
    path = tmp_path / "frame.png"
    Image.fromarray(random_image(1)).save(path)
    bgr = random_image(2)[:, :, ::-1]
    results = model.inference([str(path), bgr], task="pointing", categories=[["cup"], ["dog", "door handle"]],
                              channel_order="bgr")
    assert len(results) == 2
    for result in results:
        assert set(result) == OFFICIAL_KEYS | EXTRA_KEYS
        assert result["success"] is True and result["task"] == "pointing"
        assert result["num_output_tokens"] == len(result["output_token_ids"]) >= 1
        assert result["stop_reason"] in ("eos", "max_new_tokens", "max_boxes", "zero_box", "repeated_box",
                                         "context_full")
        assert result["inference_time"] >= result["generation_time"] >= 0
        assert set(result["timings"]) >= {"preprocess_s", "vision_s", "prefill_s", "decode_s"}
        json.dumps({k: v for k, v in result.items() if k != "detections"})  # plain data
    assert results[0]["prompt"] == "Point to cup." and results[1]["prompt"] == "Point to dog, door handle."
    assert results[0]["image_size"] == Image.open(path).size
    # channel_order applies to arrays: the BGR frame gives the answer its RGB twin gives
    again = model.inference(bgr[:, :, ::-1].copy(), task="pointing", categories=["dog", "door handle"])
    assert again[0]["output_token_ids"] == results[1]["output_token_ids"]


def test_api_errors(bundle_dir: Path, structured: dict) -> None:
    model = structured["ort"]
    with pytest.raises(RexEdgeError, match="expected at least one image"):
        model.inference([], task="detection", categories=["cup"])
    with pytest.raises(RexEdgeError, match="2 per-image lists for 3 images"):
        model.inference([random_image(0)] * 3, task="detection", categories=[["a"], ["b"]])
    with pytest.raises(RexEdgeError, match="unknown decoding mode 'fast'"):
        RexOmni(bundle_dir, decoding="fast")
    with pytest.raises(RexEdgeError, match="max_new_tokens must be a positive integer, got 0"):
        RexOmni(bundle_dir, max_tokens=0)
    with pytest.raises(RexEdgeError, match="temperature must be >= 0"):
        RexOmni(bundle_dir, temperature=-1.0)


def test_running_a_bundle_never_imports_torch(bundle_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(random_image(3)).save(path)
    code = (
        "import sys\n"
        "for name in ('torch', 'onnx', 'safetensors', 'transformers'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "from rexedge.runtime.api import RexOmni\n"
        f"model = RexOmni({str(bundle_dir)!r}, max_tokens=300)\n"
        f"[result] = model.inference({str(path)!r}, task='pointing', categories=['cup'])\n"
        "print(result['num_output_tokens'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 1
