"""The benchmark's table (text) and plot (PNG) from its JSON document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STAGE_COLUMNS = (("preprocess_ms", "preproc"), ("vision_ms", "vision"), ("prefill_ms", "prefill"),
                 ("ttft_ms", "TTFT"), ("decode_ms_per_token", "ms/tok"), ("host_ms_per_token", "host/tok"),
                 ("end_to_end_ms", "e2e ms"))


def _median(metric: dict[str, Any] | None) -> str:
    return "-" if metric is None else f"{metric['median']:.1f}"


def table(result: dict[str, Any]) -> str:
    """One line per record: medians (ms) per stage, rates, speedups, peak RSS; then the step kinds
    (steps, the tokens they appended and how many of those were forced)."""
    header = ["scenario", "backend", "tokens", *(label for _, label in STAGE_COLUMNS), "tok/s", "box/s",
              "x e2e", "x tok", "RSS MB", "load s"]
    rows = []
    for r in result["records"]:
        m, speedup = r["metrics"], r["speedup_vs_baseline"]
        rows.append([r["scenario"], r["backend"], str(r["output_tokens"]),
                     *(_median(m[key]) for key, _ in STAGE_COLUMNS),
                     f"{m['tokens_per_s']['median']:.1f}", f"{m['boxes_per_s']['median']:.2f}",
                     "-" if speedup is None else f"{speedup['end_to_end']:.2f}",
                     "-" if speedup is None else f"{speedup['decode_per_token']:.2f}",
                     f"{r['memory']['peak_rss_bytes'] / 2**20:.0f}", f"{r['load_s']:.1f}"])
    lines = [_format(header, rows)]
    step_header = ["scenario", "backend", "kind", "steps", "tokens", "forced", "ms/step", "p90", "head ms", "ms/tok",
                   "MB read", "floor ms", "% bw"]
    step_rows = []
    for r in result["records"]:
        for kind, s in r["steps"].items():
            step_rows.append([r["scenario"], r["backend"], kind, str(s["steps"]), str(s["tokens"]), str(s["forced_tokens"]),
                              f"{s['ms_per_step']['median']:.2f}", f"{s['ms_per_step']['p90']:.2f}",
                              f"{s['head_ms_per_step']['median']:.2f}", f"{s['ms_per_token']['median']:.2f}",
                              f"{s['bytes_per_step'] / 1e6:.1f}",
                              "-" if s["floor_ms_per_step"] is None else f"{s['floor_ms_per_step']:.2f}",
                              "-" if s["bandwidth_pct"] is None else f"{s['bandwidth_pct']:.0f}"])
    machine = result["machine"]
    bandwidth = "unknown" if machine["bandwidth_gbs"] is None else f"{machine['bandwidth_gbs']} GB/s ({machine['bandwidth_source']})"
    lines += ["", f"decode steps by kind (medians over repeats; floor at {bandwidth})", _format(step_header, step_rows)]
    return "\n".join(lines)


def _format(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in [header, *rows])


def plot(result: dict[str, Any], out: str | Path) -> Path:
    """Two panels: stacked stage latency per scenario and backend; ms per token by step kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["records"]
    labels = [f"{r['scenario']}\n{r['backend']}" for r in records]
    fig, (stages_ax, steps_ax) = plt.subplots(1, 2, figsize=(max(8.0, 1.4 * len(records) + 4), 5))
    bottom = [0.0] * len(records)
    for key, name in (("preprocess_ms", "preprocess"), ("vision_ms", "vision"), ("prefill_ms", "prefill"),
                      ("decode_ms", "decode")):
        heights = [r["metrics"][key]["median"] for r in records]
        stages_ax.bar(labels, heights, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    stages_ax.set_ylabel("ms (median)")
    stages_ax.set_title("latency per stage")
    stages_ax.legend()
    plt.setp(stages_ax.get_xticklabels(), rotation=30, ha="right", fontsize=7)

    kinds = sorted({kind for r in records for kind in r["steps"]})
    width = 0.8 / max(len(kinds), 1)
    for i, kind in enumerate(kinds):
        xs = [j + i * width for j in range(len(records))]
        ys = [r["steps"][kind]["ms_per_token"]["median"] if kind in r["steps"] else 0.0 for r in records]
        steps_ax.bar(xs, ys, width=width, label=kind)
    steps_ax.set_xticks([j + 0.4 - width / 2 for j in range(len(records))], labels)
    steps_ax.set_ylabel("ms per token")
    steps_ax.set_title("decode per token, by step kind")
    steps_ax.legend()
    plt.setp(steps_ax.get_xticklabels(), rotation=30, ha="right", fontsize=7)
    fig.suptitle(f"{result['model']['name']} on {result['machine']['device_name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
