"""Weight-only int8 / int4 bundles against the float bundle: cosine of final hidden states and coordinate logits.

Random weights give nearly flat logits, so token agreement says little there (issue 18 item 8);
this measures what the quantized weights do to the numbers the head sees. One detection request
(a synthetic image, fixed seed) goes through each bundle in turn, one bundle in memory at a time
(the 3B float bundle is ~15 GB resident):

- the float bundle (first) encodes the image, prefills, and decodes ``--steps`` greedy tokens over
  the full vocabulary of its float table: the reference hidden states and tokens;
- every other bundle prefills the same embeddings (all bundles share the fp32 vision weights, so the
  reference's image embeddings are reused instead of re-running vision) and is teacher-forced on
  the reference's tokens.

Per position (the prefill's last token, then each step): cosine of the final hidden states; cosine
of the coordinate logits (the float table's 1,000 coordinate rows applied to each hidden state)
and whether their argmax agrees; whether the full-vocabulary argmax through the bundle's own head
(the int8 head graph of a weight-quantized bundle) agrees with the reference's.

    python -P -m rexedge.bench.weights_quality --bundle float=B --bundle int8=B --bundle int4=B
        [--steps 32] [--image-size 448x448] [--threads N] [--json OUT]

The reference may also be the checkpoint on the torch backend (``--bundle float=torch:CHECKPOINT``,
float32 in memory: the 3B model's float bundle is 14 GB of disk).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from rexedge.bench.metrics import cpu_name
from rexedge.bench.scenarios import synthetic_image
from rexedge.calib.quality import _cosine
from rexedge.runtime.backends import load_backend
from rexedge.runtime.decode.head import Sampling
from rexedge.runtime.request.encode import embed_prompt, encode_task
from rexedge.runtime.request.positions import decode_positions
from rexedge.runtime.request.preprocess import preprocess

CATEGORIES = ["cup", "door handle", "person"]


def _run(backend: Any, embeds: np.ndarray, positions: np.ndarray, rope_delta: int, forced: list[int] | None,
         steps: int) -> tuple[np.ndarray, list[int], list[float]]:
    """Hidden states [steps, H] (prefill's last, then after each step), the head's greedy tokens, step times.

    ``forced``: the tokens appended after each position (teacher forcing); None: the greedy token."""
    head = backend.make_head(Sampling(repetition_penalty=1.0))
    hidden = np.array(backend.prefill(embeds, positions))
    rows, chosen, times = [], [], []
    for i in range(steps):
        rows.append(hidden)
        chosen.append(head.choose_full(hidden)[0])
        if i + 1 < steps:
            token = chosen[-1] if forced is None else forced[i]
            start = time.perf_counter()
            hidden = np.array(backend.step(np.array([token], np.int64),
                                           decode_positions(backend.cache_length, rope_delta)))
            times.append(time.perf_counter() - start)
    return np.stack(rows), chosen, times


def measure(bundles: dict[str, tuple[str, Path]], steps: int, image_size: tuple[int, int], threads: int | None,
            log: Any = print) -> dict[str, Any]:
    """The comparison of every bundle with the first (see the module docstring), as a JSON-ready dict."""
    names = list(bundles)
    reference: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        log(f"weights_quality: loading {name} ({bundles[name][0]} backend, {bundles[name][1]})")
        start = time.perf_counter()
        kind, path = bundles[name]
        options = {"threads": threads} if kind == "ort" else {}
        backend = load_backend(kind, path, max_context=4096, **options)
        load_s = time.perf_counter() - start
        if not reference:
            image = preprocess(synthetic_image(image_size), cfg=backend.config)
            task = encode_task(backend.tokenizer, image, "detection", CATEGORIES)
            start = time.perf_counter()
            image_embeds = backend.encode_image(image)
            ids = backend.tokenizer.ids
            reference = {"vision_s": time.perf_counter() - start, "task": task,
                         "coords": slice(ids.coord_start, ids.coord_start + ids.num_coords),
                         "table": np.array(backend.embed_table[ids.coord_start:ids.coord_start + ids.num_coords]),
                         "embeds": embed_prompt(backend.embed_table, task.prompt_ids, image_embeds, ids.image_pad)}
        task = reference["task"]
        start = time.perf_counter()
        hidden, chosen, times = _run(backend, reference["embeds"], task.positions, task.rope_delta,
                                     reference.get("tokens"), steps)
        run_s = time.perf_counter() - start
        coord_logits = hidden.astype(np.float64) @ reference["table"].T.astype(np.float64)
        row: dict[str, Any] = {"load_s": round(load_s, 2), "prefill_and_steps_s": round(run_s, 2),
                               "step_ms_median": round(statistics.median(times) * 1e3, 1) if times else None}
        if "tokens" not in reference:
            reference.update(tokens=chosen, hidden=hidden, coord_logits=coord_logits)
        else:
            hidden_cos = _cosine(reference["hidden"], hidden)
            coord_cos = _cosine(reference["coord_logits"], coord_logits)
            row.update(hidden_cosine_mean=float(hidden_cos.mean()), hidden_cosine_min=float(hidden_cos.min()),
                       coord_logit_cosine_mean=float(coord_cos.mean()), coord_logit_cosine_min=float(coord_cos.min()),
                       coord_argmax_agreement=float((reference["coord_logits"].argmax(-1)
                                                     == coord_logits.argmax(-1)).mean()),
                       token_agreement=float(np.mean([a == b for a, b in zip(reference["tokens"], chosen)])))
        rows[name] = row
        log(f"weights_quality: {name}: {row}")
        del backend
        gc.collect()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)},
            "request": {"task": "detection", "categories": CATEGORIES, "image_size": list(image_size),
                        "prompt_tokens": int(reference["task"].prompt_ids.shape[0]), "positions": steps},
            "reference": names[0], "bundles": {n: f"{k}:{p}" for n, (k, p) in bundles.items()}, "rows": rows}


def _bundle_arg(text: str) -> tuple[str, tuple[str, Path]]:
    name, sep, path = text.partition("=")
    kind, colon, rest = path.partition(":")
    kind, path = (kind, rest) if colon and kind in ("ort", "torch") else ("ort", path)
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--bundle {text!r}: expected NAME=PATH or NAME=torch:CHECKPOINT")
    return name, (kind, Path(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=_bundle_arg, action="append", required=True,
                        help="NAME=PATH (a bundle, ort backend) or NAME=torch:CHECKPOINT (the compact model in "
                        "float32, when a float bundle does not fit on the disk); the first is the reference")
    parser.add_argument("--steps", type=int, default=32, help="positions compared (prefill + steps - 1 decode steps)")
    parser.add_argument("--image-size", default="448x448", help="WIDTHxHEIGHT of the synthetic image")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args(argv)
    bundles = dict(args.bundle)
    if len(bundles) < 2 or args.steps < 1:
        parser.error("need at least two bundles (the first is the reference) and --steps >= 1")
    width, height = (int(v) for v in args.image_size.split("x"))
    result = measure(bundles, args.steps, (width, height), args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["rows"], indent=1))


if __name__ == "__main__":
    main()
