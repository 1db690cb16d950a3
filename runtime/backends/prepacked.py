"""Finding a bundle's prepacked graphs for this CPU (what the ort backend loads when they exist).

Most of the time spent making the CPU sessions of a weight-quantized bundle is ONNX Runtime
prepacking constant weights for this processor's kernels (MatMulNBits, the vision graph's Gemm) and
optimizing the graphs: at the 3B shapes, 5.6-8.2 s of sessions on the development CPU (bench/RESULTS.md).
``rexedge prepack BUNDLE`` (:mod:`rexedge.export.prepack`) has ONNX Runtime write each graph once
as it optimized it, with the prepacked weights in its external data
(``session.save_external_prepacked_constant_initializers``); loading that graph memory-maps them
and skips both the prepacking and the optimizations. The packing depends on the instruction set and
the onnxruntime version, so the files are named by a target::

    {graph}.{machine}-{cpu flags digest}.ort{version}.prepacked.onnx   (+ .data)
    e.g. decoder.x86_64-3f2a9c1d0b7e.ort1.32.0.prepacked.onnx

and recorded under the manifest's ``prepacked`` (one record per target: the files per graph and the
sha256 of the graph and weight files they were made from), each file listed in ``files`` so the bundle's hash checks
cover them. A record for another target, or for graphs that changed since, is not used.
"""

from __future__ import annotations

import hashlib
import platform
from typing import Any, Mapping

import onnxruntime as ort

from rexedge.runtime import manifest as schema
from rexedge.runtime.bundle import Bundle

HEAD_GRAPH = "head"   # the key of a weight-quantized bundle's head graph among the graphs


def cpu_target() -> str:
    """What a prepacked graph depends on: the machine, its CPU's feature flags and the onnxruntime version."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line.split(":", 1)[1] for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:   # not Linux: the processor's name is what the platform says about it
        flags = platform.processor()
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    return f"{platform.machine().lower() or 'cpu'}-{digest}.ort{ort.__version__}"


def source_graphs(bundle: Bundle) -> dict[str, str]:
    """The bundle's graph files by name: vision, decoder and (weight-quantized bundles) head."""
    graphs = {schema.VISION: bundle.vision.file, schema.DECODER: bundle.decoder.file}
    if bundle.head_graph is not None:
        graphs[HEAD_GRAPH] = bundle.head_graph[schema.FILE]
    return graphs


def _sources(bundle: Bundle) -> dict[str, str]:
    """sha256 of every graph file and its weights' file, by file name: what the prepacked graphs were made from."""
    names = list(source_graphs(bundle).values()) + [g.data for g in (bundle.vision, bundle.decoder) if g.data]
    if bundle.head_graph is not None:
        names.append(bundle.head_graph[schema.DATA])
    return {name: bundle.manifest[schema.FILES][name]["sha256"] for name in sorted(names)}


def prepacked_record(bundle: Bundle, target: str, files: Mapping[str, str]) -> dict[str, Any]:
    """The manifest entry of one target's prepacked graphs (see the module docstring)."""
    return {"target": target, schema.FILES: dict(files), "sources": _sources(bundle)}


def prepacked_graphs(bundle: Bundle, target: str | None = None) -> dict[str, str]:
    """This CPU's prepacked graph files by graph name, or {} when the bundle has none for it."""
    target = cpu_target() if target is None else target
    sources = _sources(bundle)
    for record in bundle.manifest.get(schema.PREPACKED, []):
        if record.get("target") == target and record.get("sources") == sources:
            return dict(record[schema.FILES])
    return {}
