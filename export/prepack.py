"""``rexedge prepack BUNDLE``: ONNX Runtime's optimized graphs with prepacked weights for this CPU.

Each graph (vision, decoder, and a weight-quantized bundle's head) is opened once with rexedge's
session options plus ONNX Runtime's documented settings for saving the optimized model
(``optimized_model_filepath``, ``session.optimized_model_external_initializers_file_name``,
``session.optimized_model_external_initializers_min_size_in_bytes`` and
``session.save_external_prepacked_constant_initializers``); the files go into the bundle and its
manifest's ``prepacked`` record for this target (:mod:`rexedge.runtime.backends.prepacked`).
Tensors under 1 KiB stay in the graph file: shape inference must read small constants (Reshape's
shape), which it cannot from external data.

Disk: the saved data holds the original weights and their prepacked form (3B int4 bundle: decoder
1.44 -> 3.05 GB, vision 2.68 -> 5.35 GB, head 0.32 -> 0.65 GB); memory does not grow, since the
prepacked weights are memory-mapped instead of allocated and the originals are no longer read.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import onnxruntime as ort

from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.graph_session import CPU, DISABLED_OPTIMIZERS, session_options
from rexedge.runtime.backends.prepacked import cpu_target, prepacked_record, source_graphs
from rexedge.runtime.bundle import load_bundle, update_manifest
from rexedge.runtime.errors import RexEdgeError

MIN_EXTERNAL_BYTES = 1024


class PrepackError(RexEdgeError, ValueError):
    """A bundle whose graphs cannot be prepacked here."""


def prepack_bundle(bundle_dir: str | Path, threads: int | None = None, progress: bool = True) -> dict[str, str]:
    """Write this CPU's prepacked graphs into the bundle and record them; returns their files by graph."""
    bundle = load_bundle(bundle_dir)
    if bundle.flavour != "ort":
        raise PrepackError(f"{bundle.directory}: a {bundle.flavour!r} bundle runs on TensorRT (rexedge build); "
                           f"prepacking is for the ort flavour on a CPU")
    target = cpu_target()
    files = {graph: f"{graph}.{target}.prepacked.onnx" for graph in source_graphs(bundle)}
    staging = bundle.directory / ".prepack.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for graph, source in source_graphs(bundle).items():
            started = time.perf_counter()
            options = session_options(threads)
            # its warning that a graph optimized at this level may hold hardware-specific optimizations is
            # why the files are named by the CPU target: not worth showing every user
            options.log_severity_level = 3
            options.optimized_model_filepath = str(staging / files[graph])
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             files[graph] + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             str(MIN_EXTERNAL_BYTES))
            options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
            ort.InferenceSession(str(bundle.path(source)), options, providers=CPU,
                                 disabled_optimizers=DISABLED_OPTIMIZERS.get(bundle.precision, []))
            if progress:
                size = sum(p.stat().st_size for p in staging.glob(files[graph] + "*"))
                print(f"prepack: {graph}  {size / 2 ** 20:.1f} MiB  {time.perf_counter() - started:.1f} s", flush=True)
        written = sorted(p.name for p in staging.iterdir())
        for name in written:
            (staging / name).replace(bundle.path(name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    others = [r for r in bundle.manifest.get(schema.PREPACKED, []) if r.get("target") != target]
    update_manifest(bundle.directory, {schema.PREPACKED: others + [prepacked_record(bundle, target, files)]},
                    added_files=written)
    if progress:
        print(f"prepack: recorded prepacked graphs for {target} in {bundle.directory / schema.MANIFEST}")
    return files


def remove_prepacked(bundle_dir: str | Path, progress: bool = True) -> list[str]:
    """Take this CPU's prepacked graphs out of the bundle (its record, then its files); returns the files removed."""
    bundle = load_bundle(bundle_dir, verify_hashes=False)
    target = cpu_target()
    records = bundle.manifest.get(schema.PREPACKED, [])
    removed = sorted(n for r in records if r.get("target") == target
                     for f in r[schema.FILES].values() for n in (f, f + ".data"))
    update_manifest(bundle.directory, {schema.PREPACKED: [r for r in records if r.get("target") != target]},
                    removed_files=removed)
    for name in removed:   # after the manifest stops listing them: a reader never finds a listed file missing
        bundle.path(name).unlink(missing_ok=True)
    if progress:
        print(f"prepack: removed {len(removed)} files of {target} from {bundle.directory}")
    return removed
