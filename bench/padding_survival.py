"""Does every request survive a model that chooses the embedding's padding rows? (issue 19)

A random ``cpu-bench`` checkpoint (the real vocabulary: 151,936 embedding rows, of which
151,665..151,935 have no text) with its padding rows drawn like the others, as a real
checkpoint's are, exported to a bundle; the ``ort`` backend in exact mode (the full head, so the
padding rows can win); random 200x260 images; ``max_tokens=400``. Before the fix, 3 of 8
requests raised ``TokenizerError``. Prints one line per request and a JSON summary.

    python -P -m rexedge.bench.padding_survival --requests 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from rexedge.runtime.api import RexOmni
from rexedge.runtime.results.result import Result


def run(bundle: Path, requests: int, max_tokens: int, seed: int) -> dict:
    model = RexOmni(bundle, backend="ort", decoding="exact", max_tokens=max_tokens)
    rows, vocab = model.backend.embed_table.shape[0], model.tokenizer.vocab_size
    rng = np.random.default_rng(seed)
    records = []
    for index in range(requests):
        image = rng.integers(0, 256, (260, 200, 3), dtype=np.uint8)   # 200 wide, 260 high
        start = time.perf_counter()
        try:
            [official] = model.inference(image, task="detection", categories=["cup", "door handle"])
            result = Result.from_official(official)
        except Exception as error:  # what the issue saw: a request that raises is the finding
            record = {"request": index, "error": f"{type(error).__name__}: {error}"}
        else:
            ids = result.output_token_ids
            record = {"request": index, "stop_reason": result.stop_reason, "tokens": len(ids),
                      "padding_tokens": result.padding_tokens,
                      "padding_ids": sorted({t for t in ids if t >= vocab}),
                      "detections": len(result.detections)}
        record["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(record), flush=True)
        records.append(record)
    return {"bundle": str(bundle), "embedding_rows": rows, "tokenizer_ids": vocab, "max_tokens": max_tokens,
            "completed": sum("error" not in r for r in records), "requests": requests,
            "padding_tokens": sum(r.get("padding_tokens", 0) for r in records),
            "requests_with_padding": sum(r.get("padding_tokens", 0) > 0 for r in records), "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle to use (default: make the cpu-bench one in a temp dir)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from rexedge.export.bundle import export_bundle
            from rexedge.export.fixtures.tiny import write_tiny_checkpoint

            checkpoint = write_tiny_checkpoint(Path(tmp) / "checkpoint", preset="cpu-bench", padding_rows="random")
            bundle = export_bundle(checkpoint, Path(tmp) / "bundle", progress=False)
        summary = run(bundle, args.requests, args.max_tokens, args.seed)
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
