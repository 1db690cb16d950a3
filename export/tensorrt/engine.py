"""TensorRT engines for a bundle: ``rexedge build BUNDLE --precision fp16|int8``, and finding them again.

An engine runs only on the GPU model and TensorRT version it was built with, so engines
are built on the device itself and named by what they depend on::

    {graph}.{gpu}.sm{major}{minor}.trt{version}.{precision}.engine
    e.g. decoder.nvidia-jetson-agx-orin.sm87.trt10.3.0.fp16.engine

and recorded under the manifest's ``engines`` (one record per target and precision:
GPU, compute capability, TensorRT version, precision, files, optimization-profile
names in index order, build settings, the most rows per decode call), with each engine file's sha256 added to
``files`` through :func:`rexedge.runtime.bundle.update_manifest`, so the bundle's hash
checks cover engines like every other file. :func:`select_engines` finds the record for
this machine, or says what the bundle holds and what this machine is.

Building (TensorRT 10 Python API): the graph is checked statically first
(:mod:`rexedge.export.tensorrt.ops`), then ``OnnxParser.parse_from_file`` (external weights
are read beside the graph), one ``IOptimizationProfile`` per manifest profile, the
workspace limit (``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``), FP16 /
INT8 flags, an optional timing cache read before and written after, progress through
an ``IProgressMonitor``, and ``build_serialized_network``. INT8 is explicit
quantization: the graphs must carry QuantizeLinear/DequantizeLinear nodes (from
``rexedge calibrate``); TensorRT's implicit calibrator is deprecated since 10.1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from rexedge.export.tensorrt.profiles import decode_batch
from rexedge.runtime import manifest as schema
from rexedge.runtime.backends.trt_engines import (
    ENGINE_PRECISIONS,
    GRAPHS,
    EngineError,
    current_target,
    engine_record,
    import_tensorrt,
    record_target,
)
from rexedge.runtime.bundle import Bundle, load_bundle, update_manifest


def _has_qdq(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def _source_bundle(bundle_dir: Path, precision: str, calib: str | Path | None) -> Bundle:
    """The bundle whose graphs are built: BUNDLE, or for int8 the calibrated bundle given with --calib."""
    if precision not in ENGINE_PRECISIONS:
        raise EngineError(f"precision {precision!r}: expected one of {list(ENGINE_PRECISIONS)}")
    bundle = load_bundle(bundle_dir)
    if calib is not None:
        if precision != schema.INT8:
            raise EngineError("--calib names the INT8 (Q/DQ) bundle written by `rexedge calibrate`; it goes with "
                              "--precision int8 only")
        calibrated = load_bundle(calib)
        if calibrated.manifest[schema.SOURCE]["digest"] != bundle.manifest[schema.SOURCE]["digest"]:
            raise EngineError(f"{calib}: calibrated from another checkpoint than {bundle_dir} (source digests differ)")
        bundle = calibrated
    if bundle.flavour != "trt":
        raise EngineError(f"{bundle.directory}: its decoder is the {bundle.flavour!r} flavour; TensorRT needs "
                          f"`rexedge export CHECKPOINT --flavour trt`")
    if precision == schema.INT8:
        missing = [g for g in GRAPHS if not _has_qdq(bundle.path(getattr(bundle, g).file))]
        if missing:
            raise EngineError(f"{bundle.directory}: the {' and '.join(missing)} graph(s) have no QuantizeLinear/"
                              f"DequantizeLinear nodes; INT8 engines are built from explicitly quantized graphs: "
                              f"run `rexedge calibrate` and pass its output with --calib")
    return bundle


class _Progress:
    """TensorRT build phases on stderr as tqdm bars (an ``IProgressMonitor`` subclass made at run time)."""

    @staticmethod
    def make(trt: Any, label: str) -> Any:
        from tqdm import tqdm

        class Monitor(trt.IProgressMonitor):
            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)
                self._bars: dict[str, Any] = {}

            def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                depth = 1 + sum(1 for _ in self._bars)
                self._bars[phase_name] = tqdm(total=num_steps, desc=f"{label}: {phase_name}", position=depth,
                                              leave=False, unit="step")

            def step_complete(self, phase_name: str, step: int) -> bool:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.n = step + 1
                    bar.refresh()
                return True  # False would cancel the build

            def phase_finish(self, phase_name: str) -> None:
                bar = self._bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

        return Monitor()


def _build_one(trt: Any, onnx_path: Path, profiles: list[Mapping[str, Any]], precision: str,
               workspace_gb: float | None, timing_cache: Path | None, progress: bool, label: str) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2 ** 30))
    config.set_flag(trt.BuilderFlag.FP16)  # int8 too: layers between Q/DQ pairs run in fp16, not fp32
    if precision == schema.INT8:
        config.set_flag(trt.BuilderFlag.INT8)
    for spec in profiles:
        profile = builder.create_optimization_profile()
        for name, shapes in spec["shapes"].items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    if progress and hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _Progress.make(trt, label)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    if cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def build_engines(bundle_dir: str | Path, precision: str = "fp16", calib: str | Path | None = None,
                  workspace_gb: float | None = None, timing_cache: str | Path | None = None,
                  device: str = "cuda", progress: bool = True) -> dict[str, Any]:
    """Build the vision and decoder engines for this machine and record them; returns the manifest record."""
    from rexedge.export.tensorrt.ops import require_trt_compatible
    from rexedge.runtime.backends.cuda_memory import open_cuda, parse_cuda_device

    bundle = _source_bundle(Path(bundle_dir), precision, calib)
    for graph in GRAPHS:
        require_trt_compatible(bundle.path(getattr(bundle, graph).file))
    if workspace_gb is not None and workspace_gb <= 0:
        raise EngineError(f"--workspace must be a positive number of GB, got {workspace_gb}")
    trt = import_tensorrt()
    target = current_target(trt, open_cuda(parse_cuda_device(device, "rexedge build")))
    cache = Path(timing_cache) if timing_cache is not None else None
    record = engine_record(target, precision,
                           {g: [p["name"] for p in bundle.manifest[schema.GRAPHS][g][schema.PROFILES]] for g in GRAPHS},
                           {"workspace_gb": workspace_gb, "timing_cache": str(cache) if cache else None},
                           max_batch=decode_batch(bundle.manifest[schema.GRAPHS][schema.DECODER][schema.PROFILES],
                                                  schema.INPUTS_EMBEDS))
    timings = {}
    for graph in GRAPHS:
        spec = bundle.manifest[schema.GRAPHS][graph]
        started = time.perf_counter()
        if progress:
            print(f"build: {graph} engine ({precision}) for {target.describe()}", flush=True)
        blob = _build_one(trt, bundle.path(spec[schema.FILE]), spec[schema.PROFILES], precision, workspace_gb, cache,
                          progress, graph)
        partial = bundle.path(record[schema.FILES][graph] + ".partial")
        partial.write_bytes(blob)
        partial.replace(bundle.path(record[schema.FILES][graph]))
        timings[graph] = time.perf_counter() - started
    others = [r for r in bundle.manifest.get(schema.ENGINES, [])
              if not (record_target(r) == target and r[schema.PRECISION] == precision)]
    update_manifest(bundle.directory, {schema.ENGINES: others + [record]}, added_files=record[schema.FILES].values())
    if progress:
        for graph in GRAPHS:
            size = bundle.path(record[schema.FILES][graph]).stat().st_size
            print(f"build: {record[schema.FILES][graph]}  {size / 2 ** 20:.1f} MiB  {timings[graph]:.0f} s")
        print(f"build: recorded {precision} engines for {target.describe()} in {bundle.directory / schema.MANIFEST}")
    return record


def build_command(args: Any) -> None:
    """``rexedge build BUNDLE --precision fp16|int8 [--calib DIR] [--workspace GB] [--timing-cache FILE]``."""
    build_engines(args.bundle, precision=args.precision, calib=args.calib, workspace_gb=args.workspace,
                  timing_cache=args.timing_cache, device=args.device, progress=not args.quiet)
