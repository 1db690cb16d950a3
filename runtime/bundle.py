"""Loading and checking a bundle: the directory ``rexedge export`` writes and every backend runs.

Layout (format version 1)::

    manifest.json        what is here (see below), with its own digest
    tokenizer.json       the tokenizer, special and coordinate tokens included
    vision.onnx (+ .data)  patch rows + VisionLayout arrays -> image embeddings
    decoder.onnx (+ .data) embeddings + M-RoPE positions + KV cache -> hidden states
    embed_tokens.npy     the tied embedding [vocab, hidden] float32: the head (the
                         coordinate rows are a slice of it) and the input lookup table
    head.onnx (+ .data)  weight-quantized bundles only: the full-vocabulary head, hidden ->
                         logits, with the table as int8 MatMulNBits (manifest: head.graph)

``manifest.json`` holds the format name and version, the source checkpoint's digest, the
model config (the published config.json layout), precision and decoder flavour, the
special and coordinate token ids, each graph's inputs/outputs with the ranges of their
symbolic dimensions, the head's shape and coordinate rows, and the sha256 and size of
every other file. ``manifest_sha256`` is the sha256 of the manifest's canonical JSON
without that key, so an edited manifest is refused too.

numpy only (plus the tokenizer): loading a bundle never imports torch or onnx.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from rexedge.runtime.config import ConfigError, RexOmniConfig
from rexedge.runtime.errors import RexEdgeError
from rexedge.runtime.hash_cache import HashCache, sha256_file
from rexedge.runtime.manifest import (
    CONFIG,
    DATA,
    DECODER,
    DIGEST_KEY,
    DIMS,
    FILE,
    FILES,
    FLAVOUR,
    FORMAT,
    FORMAT_KEY,
    FORMAT_VERSION,
    GRAPHS,
    HEAD,
    HEAD_GRAPH,
    INPUTS,
    INT8,
    MANIFEST,
    OUTPUTS,
    PIXELS,
    PRECISION,
    PRECISIONS,
    TOKENIZER_FILE,
    TOKENS,
    VERSION_KEY,
    VISION,
    WEIGHT_FORMATS,
    WEIGHTS,
    pixels_entry,
)


class BundleError(RexEdgeError, ValueError):
    """A bundle directory that cannot be used: wrong format version, missing or altered file."""


def _file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without its digest key."""
    content = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class GraphSpec:
    """One graph of the bundle: its file, external-data file, inputs/outputs and dimension ranges."""

    file: str
    data: str | None
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]
    dims: Mapping[str, tuple[int, int]]
    weights: Mapping[str, Any] | None = None   # the quantized weights' entry, None for float weights

    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]


@dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: Mapping[str, Any]
    config: RexOmniConfig
    precision: str
    flavour: str
    vision: GraphSpec
    decoder: GraphSpec

    @property
    def token_ids(self) -> Mapping[str, Any]:
        return self.manifest[TOKENS]

    @property
    def coord_rows(self) -> tuple[int, int]:
        """[start, stop) of the coordinate tokens' rows in the embedding table."""
        start, stop = self.manifest[HEAD]["coord_rows"]
        return int(start), int(stop)

    def path(self, name: str) -> Path:
        return self.directory / name

    def load_embed_table(self, mmap: bool = True) -> np.ndarray:
        """The tied embedding [vocab, hidden] float32, memory-mapped read-only by default."""
        head = self.manifest[HEAD]
        table = np.load(self.path(head[FILE]), mmap_mode="r" if mmap else None, allow_pickle=False)
        if table.dtype != np.float32 or list(table.shape) != list(head["shape"]):
            raise BundleError(
                f"{self.path(head[FILE])}: holds {table.dtype} {list(table.shape)}, "
                f"the manifest says float32 {head['shape']}")
        return table

    @property
    def pixels(self) -> tuple[int, int] | None:
        """(min_pixels, max_pixels) the model was trained for, recorded at export; None: the official defaults."""
        entry = self.manifest.get(PIXELS)
        return None if entry is None else (int(entry["min_pixels"]), int(entry["max_pixels"]))

    @property
    def head_graph(self) -> Mapping[str, Any] | None:
        """The quantized full-vocabulary head graph's entry ({file, data, weights}), None when the float table serves."""
        return self.manifest[HEAD].get(HEAD_GRAPH)

    def load_tokenizer(self) -> Any:
        """The bundle's tokenizer (``rexedge.runtime.request.tokenizer.Tokenizer``), checked against the manifest's ids."""
        from rexedge.runtime.request.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_file(self.path(TOKENIZER_FILE))
        found = json.loads(json.dumps(asdict(tokenizer.ids)))
        if found != dict(self.token_ids):
            raise BundleError(f"{self.path(TOKENIZER_FILE)}: its token ids differ from {MANIFEST}'s '{TOKENS}'")
        return tokenizer


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such bundle directory (create one with `rexedge export`)")
    if not path.is_file():
        hint = ("it holds a checkpoint: run it with the torch backend (--backend torch), or make a bundle of it "
                "with `rexedge export`" if (directory / "config.json").is_file()
                else "create one with `rexedge export`")
        raise BundleError(f"{path}: missing; {directory} is not a rexedge bundle ({hint})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e}); the file is damaged, re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get(FORMAT_KEY) != FORMAT:
        raise BundleError(f"{path}: not a rexedge bundle manifest (no \"{FORMAT_KEY}\": \"{FORMAT}\")")
    version = manifest.get(VERSION_KEY)
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version!r}, this rexedge reads version {FORMAT_VERSION}; "
            f"re-export the bundle with this rexedge")
    if manifest.get(DIGEST_KEY) != manifest_digest(manifest):
        raise BundleError(f"{path}: altered after export (its {DIGEST_KEY} does not match its content)")
    return manifest


def _graph(manifest: Mapping[str, Any], name: str, where: Path) -> GraphSpec:
    try:
        g = manifest[GRAPHS][name]
        return GraphSpec(file=g[FILE], data=g.get(DATA), inputs=tuple(g[INPUTS]), outputs=tuple(g[OUTPUTS]),
                         dims={k: (int(lo), int(hi)) for k, (lo, hi) in g[DIMS].items()}, weights=g.get(WEIGHTS))
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{where}: graph entry {name!r} is incomplete ({e!r})") from None


def _verify_files(directory: Path, files: Mapping[str, Mapping[str, Any]], hashes: bool) -> None:
    cache = HashCache() if hashes else None
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"{path}: {size} bytes, {MANIFEST} records {entry['bytes']}: the file was altered")
        if cache is not None and cache.sha256(path) != entry["sha256"]:
            raise BundleError(f"{path}: sha256 differs from {MANIFEST}: the file was altered")
    if cache is not None:
        cache.save()


@contextmanager
def staged_bundle(out: Path, error: type[Exception], label: str = "") -> Iterator[Path]:
    """A fresh ``OUT.partial`` directory to write a bundle into, renamed to ``out`` when the block ends.

    ``out`` must not exist or be empty (else ``error``, its message starting with ``label``
    and the path); if the block fails the partial directory is removed, so a bundle appears
    whole or not at all."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise error(f"{label}{out}: already exists and is not an empty directory")
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def seal_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """List every file of ``directory`` (sha256 and size) in ``manifest``, sign it, and write it there."""
    manifest = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    manifest[FILES] = {p.name: _file_entry(p) for p in sorted(directory.iterdir()) if p.name != MANIFEST}
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, so the digest sees what a reader sees
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def update_manifest(path: str | Path, updates: Mapping[str, Any], added_files: Iterable[str] = (),
                    removed_files: Iterable[str] = ()) -> dict[str, Any]:
    """Set top-level manifest entries, list new files (sha256 and size) in a bundle and unlist removed ones;
    returns the new manifest.

    The manifest is checked first (an altered one is refused, not re-signed), the digest is
    recomputed over the result, and the file is replaced atomically: a reader sees the old
    manifest or the new one, never half of one. Used to record engines built into a bundle.
    """
    directory = Path(path)
    manifest = _read_manifest(directory)
    manifest.update(json.loads(json.dumps(dict(updates))))  # tuples -> lists, as a reader will see them
    files = dict(manifest[FILES])
    cache = HashCache()   # remembered, so the next load does not hash the new files again
    for name in added_files:
        file = directory / name
        if not file.is_file():
            raise BundleError(f"{file}: cannot be listed in {MANIFEST}, it does not exist")
        files[name] = {"sha256": cache.sha256(file), "bytes": file.stat().st_size}
    cache.save()
    for name in removed_files:
        files.pop(name, None)
    manifest[FILES] = dict(sorted(files.items()))
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    staging = directory / (MANIFEST + ".partial")
    staging.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(staging, directory / MANIFEST)
    return manifest


def load_bundle(path: str | Path, verify_hashes: bool = True) -> Bundle:
    """Open a bundle directory and check it: format version, manifest digest, every file's size and sha256.

    ``verify_hashes=False`` checks presence and sizes only (hashing the 3B model's graphs
    reads every byte once, several seconds on an edge device). Hashes of files unchanged since
    they were last hashed are remembered (:mod:`rexedge.runtime.hash_cache`): only the first load
    of a bundle reads it whole.
    """
    directory = Path(path)
    manifest = _read_manifest(directory)
    where = directory / MANIFEST
    try:
        files = manifest[FILES]
        config = RexOmniConfig.from_dict(manifest[CONFIG])
        precision, flavour = manifest[PRECISION], manifest[FLAVOUR]
    except KeyError as e:
        raise BundleError(f"{where}: missing entry {e}") from None
    except ConfigError as e:
        raise BundleError(f"{where}: {CONFIG}: {e}") from None
    if precision not in (*PRECISIONS, INT8):
        raise BundleError(f"{where}: {PRECISION} {precision!r}, expected one of {(*PRECISIONS, INT8)}")
    pixels = manifest.get(PIXELS)
    if pixels is not None:
        try:
            pixels_entry(pixels.get("min_pixels"), pixels.get("max_pixels"))
        except (AttributeError, ValueError) as e:
            raise BundleError(f"{where}: {PIXELS} {pixels!r}: {e}") from None
    vision, decoder = _graph(manifest, VISION, where), _graph(manifest, DECODER, where)
    for name, graph in ((VISION, vision), (DECODER, decoder)):
        if graph.weights is not None and graph.weights.get("format") not in WEIGHT_FORMATS:
            raise BundleError(f"{where}: graph {name!r} {WEIGHTS} format {graph.weights.get('format')!r}, expected "
                              f"one of {WEIGHT_FORMATS}")
    needed = [vision.file, decoder.file, manifest[HEAD][FILE], TOKENIZER_FILE]
    needed += [g.data for g in (vision, decoder) if g.data]
    head_graph = manifest[HEAD].get(HEAD_GRAPH)
    if head_graph is not None:
        if not isinstance(head_graph, dict) or not {FILE, DATA, WEIGHTS} <= head_graph.keys() \
                or head_graph[WEIGHTS].get("format") not in WEIGHT_FORMATS:
            raise BundleError(f"{where}: {HEAD}.{HEAD_GRAPH} is incomplete: expected {FILE}, {DATA} and {WEIGHTS} "
                              f"with a format in {WEIGHT_FORMATS}")
        needed += [head_graph[FILE], head_graph[DATA]]
    unlisted = [n for n in needed if n not in files]
    if unlisted:
        raise BundleError(f"{where}: {', '.join(unlisted)} not listed under '{FILES}'")
    _verify_files(directory, files, verify_hashes)
    return Bundle(directory, manifest, config, precision, flavour, vision, decoder)
