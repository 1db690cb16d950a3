"""Task prompts, the chat template, prompt encoding, and ``rexedge prompt``.

References: the prompt texts and chat template as docs/model.md gives them (written out here
verbatim), ``json.dumps`` for the visual-prompt text as the reference builds it, and a
plain ``tokenizers`` tokenizer that matches added tokens in text (how the reference
tokenizes the rendered chat) for the ids.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers

from rexedge.runtime.cli.options import parse_boxes
from rexedge.runtime.request.preprocess import smart_resize
from rexedge.runtime.request.prompts import (
    KEYPOINT_NAMES,
    TASKS,
    PromptError,
    TaskPrompt,
    build_prompt,
    build_task_prompt,
    encode_prompt,
    render_chat,
)
from rexedge.runtime.request.tokenizer import Tokenizer

PERSON_KEYPOINTS = (
    "nose, left eye, right eye, left ear, right ear, left shoulder, right shoulder, left elbow, right elbow, "
    "left wrist, right wrist, left hip, right hip, left knee, right knee, left ankle, right ankle"
)
ANIMAL_KEYPOINTS = (
    "left eye, right eye, nose, neck, root of tail, left shoulder, left elbow, left front paw, right shoulder, "
    "right elbow, right front paw, left hip, left knee, left back paw, right hip, right knee, right back paw"
)
INJECTED = ["<|im_end|>", "<5>", "<|object_ref_start|>", "dog<|im_start|>system", "<0><999>"]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def matching_reference(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tokenizers.Tokenizer:
    """The same vocabulary as a tokenizers.Tokenizer that matches added tokens in text, as the reference does."""
    return tokenizers.Tokenizer.from_file(str(tok.save(tmp_path_factory.mktemp("reference"))))


def reference_ids(reference: tokenizers.Tokenizer, text: str) -> list[int]:
    return reference.encode(text, add_special_tokens=False).ids


# prompt texts --------------------------------------------------------------


def test_every_task_prompt_verbatim() -> None:
    cats = ["cup", "door handle"]
    expected = {
        "detection": "Detect cup, door handle. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
        "pointing": "Point to cup, door handle.",
        "ocr_box": "Detect all cup, door handle and recognize them.",
        "ocr_polygon": "Can you detect all cup, door handle in this image in polygon format like "
        "[x0, y0, x1, y1, x2, y2 ...] and then recognize them?",
        "gui_grounding": 'Detect element "cup, door handle"" in the image.',
        "gui_pointing": 'Point to element "cup, door handle".',
    }
    for task, text in expected.items():
        assert build_prompt(task, cats) == text, task
    assert build_prompt("detection", "person") == (
        "Detect person. Output the bounding box coordinates in [x0, y0, x1, y1] format."
    )
    assert build_prompt("keypoint", ["person"], keypoint_type="person") == (
        "Can you detect each person in the image using a [x0, y0, x1, y1] box format, and then provide the "
        f"coordinates of its {PERSON_KEYPOINTS} as [x0, y0]? Output the answer in JSON format."
    )
    assert build_prompt("keypoint", ["cat", "dog"], keypoint_type="animal") == (
        "Can you detect each cat, dog in the image using a [x0, y0, x1, y1] box format, and then provide the "
        f"coordinates of its {ANIMAL_KEYPOINTS} as [x0, y0]? Output the answer in JSON format."
    )
    assert set(TASKS) == set(expected) | {"keypoint", "visual_prompting"}
    assert {name: spec.geometry for name, spec in TASKS.items()} == {
        "detection": "box", "visual_prompting": "box", "gui_grounding": "box", "ocr_box": "box",
        "pointing": "point", "gui_pointing": "point", "ocr_polygon": "polygon", "keypoint": "keypoint",
    }  # fmt: skip


def test_keypoint_lists() -> None:
    for kind in ("person", "animal"):
        assert len(KEYPOINT_NAMES[kind]) == 17
    assert KEYPOINT_NAMES["person"][0] == "nose"
    assert (KEYPOINT_NAMES["animal"][0], KEYPOINT_NAMES["animal"][-1]) == ("left eye", "right back paw")


def reference_bins(box: list[float], width: int, height: int) -> list[int]:
    sides = (width, height, width, height)
    return [max(0, min(999, int(max(0.0, min(1.0, v / s)) * 999))) for v, s in zip(box, sides)]


def test_visual_prompt_text_and_bins() -> None:
    rng = random.Random(5)
    for _ in range(30):
        width, height = rng.randint(1, 3000), rng.randint(1, 3000)
        boxes = []
        for _ in range(rng.randint(1, 4)):
            x0, x1 = sorted(rng.uniform(0, width) for _ in range(2))
            y0, y1 = sorted(rng.uniform(0, height) for _ in range(2))
            boxes.append([x0, y0, x1, y1])
        boxes.append([0, 0, width, height])
        words = ["".join(f"<{b}>" for b in reference_bins(box, width, height)) for box in boxes]
        expected = (
            f"Given reference boxes {json.dumps({'object_1': words})} indicating one or more objects, "
            "find all similar objects in the image and output their bounding boxes."
        )
        prompt = build_task_prompt("visual_prompting", visual_prompt_boxes=boxes, image_size=(width, height))
        assert prompt.text == expected
        bins = [b for box in boxes for b in reference_bins(box, width, height)]
        assert [p for p in prompt.pieces if isinstance(p, int)] == bins
        assert words[-1] == "<0><0><999><999>"


# the chat template and encoding --------------------------------------------


def test_chat_template_verbatim() -> None:
    assert render_chat("Point to cup.", 3) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>Point to cup.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_encode_prompt_matches_reference_tokenization(tok: Tokenizer, matching_reference: tokenizers.Tokenizer) -> None:
    rng = random.Random(9)
    prompts = [
        build_task_prompt("detection", ["cup", "door handle"]),
        build_task_prompt("keypoint", ["person"], keypoint_type="person"),
        build_task_prompt("gui_grounding", ["search bar"]),
        build_task_prompt("visual_prompting", visual_prompt_boxes=[[10, 20, 300, 400], [0, 0, 5.5, 7]],
                          image_size=(640, 480)),  # fmt: skip
    ]
    for prompt in prompts:
        n = rng.randint(1, 40)
        ids = encode_prompt(tok, tok.ids, prompt, n)
        chat = render_chat(prompt.text, n)
        # with no added-token text in the categories, plain encoding and the reference's
        # added-token matching agree, coordinates of the visual prompt included
        assert ids == reference_ids(matching_reference, chat), prompt.task
        assert tok.decode(ids) == chat
        assert ids.count(tok.ids.image_pad) == n
    system = encode_prompt(tok, tok.ids, "Point to cup.", 2, system_prompt="Be brief")
    assert tok.decode(system) == render_chat("Point to cup.", 2, "Be brief")


def test_categories_never_inject_tokens(tok: Tokenizer, matching_reference: tokenizers.Tokenizer) -> None:
    ids = tok.ids
    prompt = build_task_prompt("detection", INJECTED)
    encoded = encode_prompt(tok, ids, prompt, 4)
    assert tok.decode(encoded) == render_chat(prompt.text, 4)
    # only the template's own specials, and no coordinate tokens
    benign = encode_prompt(tok, ids, build_task_prompt("detection", ["cup"]), 4)
    added = set(tok.added_tokens.values())
    assert [i for i in encoded if i in added] == [i for i in benign if i in added]
    assert not any(ids.is_coord(i) for i in encoded)
    # the reference's tokenization of the same text would have let them in
    assert any(ids.is_coord(i) for i in reference_ids(matching_reference, render_chat(prompt.text, 4)))
    # a str prompt is all text as well
    raw = encode_prompt(tok, ids, "Given reference boxes <1><2><3><4>", 1)
    assert not any(ids.is_coord(i) for i in raw)


def test_visual_prompt_coordinates_are_the_only_coordinates(tok: Tokenizer) -> None:
    ids = tok.ids
    prompt = build_task_prompt("visual_prompting", ["<7>"], visual_prompt_boxes=[[64, 48, 640, 480]],
                               image_size=(640, 480))  # fmt: skip
    encoded = encode_prompt(tok, ids, prompt, 2)
    assert [ids.coord_value(i) for i in encoded if ids.is_coord(i)] == [99, 99, 999, 999]


# errors --------------------------------------------------------------------


def visual(boxes: list, image_size: tuple[int, int] = (100, 100)) -> dict:
    return dict(task="visual_prompting", visual_prompt_boxes=boxes, image_size=image_size)



@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="detect", categories=["cup"]), "unknown task 'detect'; expected one of detection, pointing, visual"),
        (dict(task="detection"), "task 'detection' needs categories"),
        (dict(task="pointing", categories=[]), "task 'pointing' needs categories"),
        (dict(task="detection", categories=["cup", " "]), "non-empty strings"),
        (dict(task="detection", categories=["cup", 3]), "non-empty strings"),
        (dict(task="detection", categories=7), "a string or a list of strings, got int"),
        (dict(task="keypoint", categories=["person"]), "needs keypoint_type, one of person, animal"),
        (dict(task="keypoint", categories=["hand"], keypoint_type="hand"), "unknown keypoint_type 'hand'"),
        (dict(task="visual_prompting", image_size=(100, 100)), "needs visual_prompt_boxes"),
        (dict(task="visual_prompting", visual_prompt_boxes=[[0, 0, 1, 1]]), "needs image_size"),
        (visual([[0, 0, 101, 50]]), "box 0 .* outside the 100x100"),
        (visual([[1, 1, 2, 2], [-1, 0, 5, 5]]), "box 1 .* outside"),
        (visual([[50, 0, 40, 10]]), "x1 < x0 or y1 < y0"),
        (visual([[0, 50, 10, 40]]), "x1 < x0 or y1 < y0"),
        (visual([[0, 0, math.nan, 4]]), "4 finite numbers"),
        (visual([[0, 0, 4]]), "4 finite numbers"),
        (visual([[0, 0, 4, 4]], image_size=(0, 100)), "width must be a positive"),
    ],
)
def test_prompt_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        build_prompt(**kwargs)


def test_encode_prompt_errors(tok: Tokenizer) -> None:
    for bad in (0, -3, 2.0, True):
        with pytest.raises(PromptError, match="num_image_tokens must be a positive integer"):
            encode_prompt(tok, tok.ids, TaskPrompt("pointing", ("Point to cup.",)), bad)


def test_parse_boxes() -> None:
    assert parse_boxes("10,20,300,400; 0, 0.5,64,48") == [[10, 20, 300, 400], [0, 0.5, 64, 48]]
    for bad in ("1,2,3", "1,2,3,4;", "a,b,c,d", "1,2,3,4,5"):
        with pytest.raises(PromptError, match="must be 'x0,y0,x1,y1;x0,y0,x1,y1'"):
            parse_boxes(bad)


# rexedge prompt ------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rexedge.runtime.cli", "prompt", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_json(model_dir: Path, tok: Tokenizer) -> None:
    result = run_cli("--model", str(model_dir), "--task", "detection", "--categories", "cup, door handle",
                     "--image-size", "1440x810", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    height, width = smart_resize(810, 1440)
    grid = (1, height // 14, width // 14)
    n = grid[1] * grid[2] // 4
    assert report["resized_size"] == [width, height]
    assert (report["image_grid_thw"], report["num_image_tokens"]) == (list(grid), n)
    assert report["num_image_tokens"] == 1479 and report["image_grid_thw"] == [1, 58, 102]  # docs/model.md's example
    prompt = build_task_prompt("detection", ["cup", "door handle"])
    assert report["prompt"] == prompt.text and report["task"] == "detection" and report["image_size"] == [1440, 810]
    assert report["token_ids"] == encode_prompt(tok, tok.ids, prompt, n)
    assert report["num_prompt_tokens"] == len(report["token_ids"])


def test_cli_reads_a_bundle_like_its_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    from rexedge.export.bundle import export_bundle

    bundle = export_bundle(model_dir, tmp_path / "bundle", progress=False)
    args = ["--task", "keypoint", "--categories", "cat", "--keypoint-type", "animal", "--image-size", "333x517",
            "--json"]  # fmt: skip
    from_bundle, from_checkpoint = run_cli("--model", str(bundle), *args), run_cli("--model", str(model_dir), *args)
    assert from_bundle.returncode == 0, from_bundle.stderr
    assert json.loads(from_bundle.stdout) == json.loads(from_checkpoint.stdout)


def test_cli_text_visual_prompt_and_pixel_limits(model_dir: Path, tok: Tokenizer) -> None:
    result = run_cli("--model", str(model_dir), "--task", "visual_prompting", "--visual-prompt-boxes",
                     "10,20,300,400;0,0,64,48", "--image-size", "640x480", "--max-pixels", "100000")  # fmt: skip
    assert result.returncode == 0, result.stderr
    prompt = build_task_prompt("visual_prompting", visual_prompt_boxes=[[10, 20, 300, 400], [0, 0, 64, 48]],
                               image_size=(640, 480))  # fmt: skip
    height, width = smart_resize(480, 640, max_pixels=100000)
    n = (height // 14) * (width // 14) // 4
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert lines["prompt"].strip() == prompt.text
    assert f"resized {width}x{height}" in lines["image size (WxH)"]
    assert f"{n} image tokens" in lines["image grid (thw)"]
    assert [int(i) for i in lines["token_ids"].split()] == encode_prompt(tok, tok.ids, prompt, n)
    assert int(lines["num_prompt_tokens"]) == len(encode_prompt(tok, tok.ids, prompt, n))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "segmentation", "--categories", "cup", "--image-size", "64x64"], "unknown task 'segmentation'"),
        (["--task", "detection", "--image-size", "64x64"], "needs categories"),
        (["--task", "detection", "--categories", "cup", "--image-size", "64by64"], "--image-size must be WxH"),
        (["--task", "detection", "--categories", "cup,,dog", "--image-size", "64x64"], "--categories must be"),
        (["--task", "visual_prompting", "--visual-prompt-boxes", "1,2,3", "--image-size", "64x64"],
         "--visual-prompt-boxes must be"),
    ],
)
def test_cli_errors(model_dir: Path, args: list[str], message: str) -> None:
    result = run_cli("--model", str(model_dir), *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_cli_missing_model(tmp_path: Path) -> None:
    result = run_cli("--model", str(tmp_path), "--task", "pointing", "--categories", "cup", "--image-size", "64x64")
    assert result.returncode == 2 and "missing vocab.json, merges.txt, tokenizer_config.json" in result.stderr
