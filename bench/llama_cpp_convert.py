"""Run llama.cpp's own ``convert_hf_to_gguf.py`` on a Rex-Omni checkpoint (bench-only; see llama_cpp_setup.sh).

    python -P -m rexedge.bench.llama_cpp_convert CKPT --llama-cpp DIR -- --outtype f16 --outfile X.gguf [--mmproj]

Everything after ``--`` goes to the converter unchanged. Its tokenizer checks would refuse Rex-Omni's
tokenizer; tokens do not change speed, so this shim works around them without touching llama.cpp's files:

1. Rex-Omni's 1,000 coordinate tokens ``<0>``..``<999>`` are added tokens that re-use ordinary vocabulary ids
   (150643..151642, see docs/model.md). transformers re-numbers them past the vocabulary and the converter's
   ``max(vocab) < vocab_size`` check fails. The converter reads a *view* of the checkpoint instead: a temporary
   directory of symbolic links to the weights and config, with a ``tokenizer_config.json`` whose added tokens
   that re-use a vocabulary id are dropped (those ids keep their vocab.json strings; same count, same ids).
2. The converter names the BPE pre-tokenizer by hashing the tokens of a fixed text, and refuses hashes it does
   not know (a random checkpoint's tokenizer has none it knows). ``get_vocab_base_pre`` is replaced for this
   run by the answer it gives the published Qwen2.5-VL tokenizer, ``qwen2``.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
from pathlib import Path

QWEN2_PRE_TOKENIZER = "qwen2"
CONVERTER = "convert_hf_to_gguf.py"
TOKENIZER_CONFIG = "tokenizer_config.json"


def write_converter_view(checkpoint: Path, view: Path) -> int:
    """Link every file of ``checkpoint`` into ``view``; write its tokenizer config without re-used ids.

    Returns how many added tokens were dropped.
    """
    vocab_ids = set(json.loads((checkpoint / "vocab.json").read_text(encoding="utf-8")).values())
    for item in checkpoint.iterdir():
        if item.name != TOKENIZER_CONFIG:
            (view / item.name).symlink_to(item.resolve())
    config = json.loads((checkpoint / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    added = config.get("added_tokens_decoder", {})
    kept = {key: token for key, token in added.items() if int(key) not in vocab_ids}
    config["added_tokens_decoder"] = kept
    dropped = {token["content"] for key, token in added.items() if key not in kept}
    if "additional_special_tokens" in config:
        config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if t not in dropped]
    (view / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=1), encoding="utf-8")
    return len(added) - len(kept)


def run_converter(llama_cpp: Path, model_dir: Path, converter_args: list[str]) -> None:
    """llama.cpp's converter as ``python convert_hf_to_gguf.py ARGS MODEL``, its pre-tokenizer named ``qwen2``."""
    script = llama_cpp / CONVERTER
    if not script.is_file():
        raise SystemExit(f"--llama-cpp {llama_cpp}: no {CONVERTER} there (the llama.cpp source directory, "
                         f"made by bench/llama_cpp_setup.sh)")
    sys.path[:0] = [str(llama_cpp / "gguf-py"), str(llama_cpp)]
    from conversion.base import TextModel  # llama.cpp's converter package, found on the path set above

    TextModel.get_vocab_base_pre = lambda self, tokenizer: QWEN2_PRE_TOKENIZER
    sys.argv = [str(script), *converter_args, str(model_dir)]
    runpy.run_path(str(script), run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="arguments after -- go to convert_hf_to_gguf.py")
    parser.add_argument("checkpoint", type=Path, help="a Rex-Omni checkpoint directory (published layout)")
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's source directory")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    converter_args = argv[split + 1:]
    if not (args.checkpoint / "config.json").is_file():
        raise SystemExit(f"{args.checkpoint}: not a checkpoint directory (no config.json)")
    with tempfile.TemporaryDirectory(prefix="rexedge-gguf-view-") as tmp:
        dropped = write_converter_view(args.checkpoint, Path(tmp))
        print(f"llama_cpp_convert: {dropped} added tokens re-using vocabulary ids left out of the converter's view; "
              f"pre-tokenizer {QWEN2_PRE_TOKENIZER}", flush=True)
        run_converter(args.llama_cpp, Path(tmp), converter_args)


if __name__ == "__main__":
    main()
