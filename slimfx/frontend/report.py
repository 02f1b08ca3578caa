"""The report of `slimfx run` (DIR/report.json) and its rendering by `slimfx report DIR`: a terminal table
and PNG plots (matplotlib, Agg backend, imported only when plotting).

report.json holds: model, recipe (name, stages) or null, pipeline, calib, frontend, params/state bytes
before and after, max_output_error (max |original - compressed| on the example inputs), accuracy_before /
accuracy_after (percent on the digits test split, only when the model takes digits inputs, else null),
passes (the PassManager records), stages (params after each stage; accuracy and state bytes on the first
and last), layers (one row per weight layer and per other state owner, see
:mod:`slimfx.frontend.layer_report`: params, sparsity, bits, kernel, MACs, SQNR vs float, state bytes before
and after), totals (params, bytes on disk, MACs, CPU latency before and after) and checks (the
--min-accuracy / --max-output-error bounds).
"""

from __future__ import annotations

import json
import os
import textwrap
from typing import Any

import torch
import torch.nn as nn

from slimfx.errors import SlimfxError

REPORT = "report.json"


def digits_layout(inputs: tuple) -> bool | None:
    """True for [N,1,8,8] (image) inputs, False for [N,64], None when the model does not take digits."""
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        return None
    shape = tuple(inputs[0].shape[1:])
    return True if shape == (1, 8, 8) else False if shape == (64,) else None


def calibration_batches(kind: str, inputs: tuple, batch_size: int = 64, count: int = 16) -> list[tuple]:
    """``count`` input batches for calibration: digits train images/rows, or standard normal noise."""
    if kind == "digits":
        image = digits_layout(inputs)
        if image is None:
            shapes = [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
            raise SlimfxError(f"--calib digits needs a model input shaped [N,1,8,8] or [N,64], got {shapes}; "
                              f"use --calib random")
        from slimfx.datasets import load_digits

        train, _ = load_digits(image=image)
        return [(x,) for x, _ in train.batches(batch_size)][:count]
    if kind == "random":
        generator = torch.Generator().manual_seed(0)
        return [tuple(torch.randn((batch_size, *t.shape[1:]), generator=generator, dtype=t.dtype)
                      if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
                for _ in range(count)]
    raise SlimfxError(f"unknown calibration data {kind!r}; use digits or random")


def _leaves(value: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def max_output_error(original: nn.Module, compressed: nn.Module, inputs: tuple) -> float:
    """Max |original(x) - compressed(x)| over every output tensor (output structures must match)."""
    ref, out = _leaves(original(*inputs)), _leaves(compressed(*inputs))
    if len(ref) != len(out):
        raise SlimfxError(f"the compressed model returns {len(out)} tensors, the original {len(ref)}")
    return max((float((a.float() - b.float()).abs().max()) for a, b in zip(ref, out) if a.numel()), default=0.0)


def digits_accuracy(model: nn.Module, inputs: tuple) -> float | None:
    """Top-1 accuracy (percent) on the digits test split, or None when the model does not take digits."""
    image = digits_layout(inputs)
    if image is None:
        return None
    from slimfx.datasets import accuracy, load_digits

    _, test = load_digits(image=image)
    return accuracy(model, test)


def stage_sizes(report: dict[str, Any], stages: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Params after each stage, from the pass records; ``stages`` is (label, number of passes) in order."""
    records = report.get("passes", [])
    out = [{"stage": "input", "pipeline": "", "params": report.get("params_before")}]
    index = 0
    for label, count in stages:
        chunk = records[index:index + count]
        index += count
        out.append({"stage": label, "pipeline": ",".join(r.get("text", r.get("name", "")) for r in chunk),
                    "params": chunk[-1]["params_after"] if chunk else out[-1]["params"]})
    if len(out) > 1:  # accuracy and state bytes are measured on the input and the final model only
        out[0].update(accuracy=report.get("accuracy_before"), bytes=report.get("state_bytes_before"))
        out[-1].update(accuracy=report.get("accuracy_after"), bytes=report.get("state_bytes_after"))
    return out


def write_report(report: dict[str, Any], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    return path


def read_report(directory: str) -> dict[str, Any]:
    path = directory if directory.endswith(".json") else os.path.join(directory, REPORT)
    if not os.path.isfile(path):
        raise SlimfxError(f"{path} is missing: `slimfx run MODEL ... --out DIR` writes DIR/{REPORT}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise SlimfxError(f"{path} is not valid JSON: {exc}") from None




def _table(rows: list[tuple[str, ...]], right: frozenset[int] = frozenset()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)


def _num(value: Any, fmt: str = ",") -> str:
    return "-" if value is None else format(value, fmt)


def _sqnr_text(row: dict[str, Any]) -> str:
    value = row.get("sqnr_db")
    if value is None:
        return "n/a" if row.get("sqnr_note") else "-"
    return value if isinstance(value, str) else f"{value:.1f}"


def render_layers(layers: list[dict[str, Any]]) -> str:
    """The per-layer table (one row per weight layer and per other state owner) and its SQNR notes."""
    header = ("layer", "kind", "params", "sparsity", "bits w/a", "kernel", "MACs", "SQNR dB", "bytes before",
              "bytes after")
    rows = [header]
    for r in layers:
        bits = "-" if r.get("weight_bits") is None else f"{r['weight_bits']}/{_num(r.get('act_bits'))}"
        sparsity = "-" if r.get("sparsity") is None else f"{r['sparsity']:.1%}"
        rows.append((r["layer"], r.get("kind", "-"), _num(r.get("params", r.get("params_after"))), sparsity, bits,
                     r.get("kernel") or "-", _num(r.get("macs")), _sqnr_text(r), _num(r.get("bytes_before")),
                     _num(r.get("bytes_after"))))
    notes = [f"  {r['layer']}: {r['sqnr_note']}" for r in layers
             if r.get("sqnr_note") and r.get("sqnr_note") != "identical outputs"]
    text = _table(rows, right=frozenset({2, 3, 6, 7, 8, 9}))
    return text + ("\nSQNR (end to end, vs the float original) notes:\n" + "\n".join(notes) if notes else "")


def render_totals(totals: dict[str, Any]) -> str:
    """Before / after / ratio of params, bytes on disk, MACs and CPU latency."""
    rows = [("totals", "before", "after", "after/before")]
    for label, key, fmt in (("params", "params", ","), ("bytes on disk", "bytes_on_disk", ","),
                            ("MACs", "macs", ","), ("CPU latency (ms)", "latency_ms", ".3f")):
        before, after = totals.get(f"{key}_before"), totals.get(f"{key}_after")
        ratio = f"{after / before:.2f}x" if before and after is not None else "-"
        rows.append((label, _num(before, fmt), _num(after, fmt), ratio))
    shape = totals.get("latency_input")
    return _table(rows, right=frozenset({1, 2, 3})) + (
        f"\nlatency: median per call on an input of shape {shape}, {totals.get('torch_threads')} torch threads"
        if shape else "")


def render(report: dict[str, Any]) -> str:
    """The report as terminal text: a summary, the totals, the per-pass table and the per-layer table."""
    recipe = report.get("recipe") or {}
    lines = [
        f"model       {report.get('model', '?')}" + (f"  (recipe {recipe.get('name')})" if recipe.get("name") else ""),
        f"pipeline    {report.get('pipeline', '')}",
        f"params      {_num(report.get('params_before'))} -> {_num(report.get('params_after'))}",
        f"state bytes {_num(report.get('state_bytes_before'))} -> {_num(report.get('state_bytes_after'))}",
        f"max output error  {_num(report.get('max_output_error'), '.3g')}",
    ]
    if report.get("accuracy_after") is not None:
        lines.append(f"accuracy    {_num(report.get('accuracy_before'), '.2f')}% -> "
                     f"{_num(report.get('accuracy_after'), '.2f')}% (digits test split)")
    for check in report.get("checks", []):
        lines.append(f"check       {check['bound']} {check['limit']}: measured {check['value']:.6g} "
                     f"{'ok' if check['ok'] else 'FAILED'}")
    if report.get("totals"):
        lines += ["", render_totals(report["totals"])]
    rows = [("pass", "contract", "params before", "params after", "max abs diff", "seconds")]
    for r in report.get("passes", []):
        rows.append((r.get("text", r.get("name", "")), str(r.get("contract", "")), _num(r.get("params_before")),
                     _num(r.get("params_after")), _num(r.get("max_abs_diff"), ".3g"), _num(r.get("seconds"), ".3f")))
    lines += ["", _table(rows)]
    if report.get("layers"):
        lines += ["", render_layers(report["layers"])]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layers(layers: list[dict[str, Any]], path: str, title: str = "per layer") -> str | None:
    """layers.png: weight sparsity, weight / activation bits and SQNR of every weight layer (None: no rows)."""
    rows = [r for r in layers if r.get("kind") != "state" and r.get("weight_bits") is not None]
    if not rows:
        return None
    plt = _pyplot()
    xs = list(range(len(rows)))
    sqnr = [(x, float(r["sqnr_db"])) for x, r in zip(xs, rows) if isinstance(r.get("sqnr_db"), (int, float))]
    fig, axes = plt.subplots(3 if sqnr else 2, 1, sharex=True, figsize=(max(6, 0.7 * len(rows) + 2), 7))
    axes[0].bar(xs, [100 * (r.get("sparsity") or 0) for r in rows], color="tab:red")
    axes[0].set_ylabel("zero weights (%)")
    axes[0].set_ylim(0, 100)
    axes[0].set_title(textwrap.fill(title, 90), fontsize=8)
    axes[1].bar([x - 0.2 for x in xs], [r["weight_bits"] for r in rows], 0.4, label="weights")
    axes[1].bar([x + 0.2 for x in xs], [r.get("act_bits") or 0 for r in rows], 0.4, label="activations")
    axes[1].set_ylabel("bits")
    axes[1].set_yticks([4, 8, 16, 32])
    axes[1].legend(fontsize=8)
    if sqnr:
        axes[2].plot([x for x, _ in sqnr], [v for _, v in sqnr], "o-", color="tab:purple")
        axes[2].set_ylabel("SQNR vs float (dB)")
    axes[-1].set_xticks(xs, [f"{r['layer']}\n{r.get('kernel') or ''}" for r in rows], rotation=45, ha="right",
                        fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_stages(stages: list[dict[str, Any]], path: str, title: str = "per stage") -> str | None:
    """stages.png: size (bytes when every stage has them, else params) as bars and accuracy (where measured)
    as a line on a second axis (None: no stages)."""
    if not stages:
        return None
    plt = _pyplot()
    use_bytes = all(s.get("bytes") is not None for s in stages)
    xs = list(range(len(stages)))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(stages) + 2), 4))
    bars = ax.bar(xs, [(s.get("bytes") if use_bytes else s.get("params")) or 0 for s in stages], color="tab:green")
    if not use_bytes:
        ax.bar_label(bars, [f"{s['bytes']:,} B" if s.get("bytes") is not None else "" for s in stages], fontsize=7)
    ax.set_ylabel("bytes" if use_bytes else "float parameters (int8 weights are buffers)")
    ax.set_xticks(xs, [s["stage"] for s in stages], rotation=30, ha="right")
    measured = [(x, s["accuracy"]) for x, s in zip(xs, stages) if s.get("accuracy") is not None]
    if measured:
        acc = ax.twinx()
        acc.plot([x for x, _ in measured], [a for _, a in measured], "o-", color="tab:blue")
        acc.set_ylabel("accuracy (%)", color="tab:blue")
        low = min(a for _, a in measured)
        acc.set_ylim(max(0.0, low - 5), 100.5)
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_plots(report: dict[str, Any], directory: str) -> list[str]:
    """layers.png (per-layer sparsity, bits and SQNR) and stages.png (size and accuracy per stage) in
    ``directory``; returns the paths written (a plot without data is skipped)."""
    os.makedirs(directory, exist_ok=True)
    title = f"{report.get('model', '')}  {report.get('pipeline', '')}".strip()
    written = [plot_layers(report.get("layers", []), os.path.join(directory, "layers.png"), title[:100]),
               plot_stages(report.get("stages", []), os.path.join(directory, "stages.png"),
                           f"size and accuracy per stage ({report.get('model', '')})")]
    return [p for p in written if p]
