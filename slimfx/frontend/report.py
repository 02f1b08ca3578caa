"""The report of `slimfx run` (DIR/report.json) and its rendering by `slimfx report DIR`: a terminal table
and PNG plots (matplotlib, Agg backend).

report.json holds: model, recipe (name, stages) or null, pipeline, calib, frontend, params/state bytes
before and after, max_output_error (max |original - compressed| on the example inputs), accuracy_before /
accuracy_after (percent on the digits test split, only when the model takes digits inputs, else null),
passes (the PassManager records), stages (params after each stage), layers (state bytes and parameter
counts per layer before and after) and checks (the --min-accuracy / --max-output-error bounds).
"""

from __future__ import annotations

import json
import os
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


def layer_sizes(before: nn.Module, after: nn.Module) -> list[dict[str, Any]]:
    """Per layer (module path of each state tensor): state bytes and parameter counts before and after."""
    rows: dict[str, dict[str, Any]] = {}

    def add(module: nn.Module, when: str) -> None:
        params = {name for name, _ in module.named_parameters()}
        for name, tensor in module.state_dict().items():
            layer = name.rpartition(".")[0] or name
            row = rows.setdefault(layer, {"layer": layer, "bytes_before": 0, "bytes_after": 0,
                                          "params_before": 0, "params_after": 0})
            row[f"bytes_{when}"] += tensor.numel() * tensor.element_size()
            if name in params:
                row[f"params_{when}"] += tensor.numel()

    add(before, "before")
    add(after, "after")
    return list(rows.values())


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


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _num(value: Any, fmt: str = ",") -> str:
    return "-" if value is None else format(value, fmt)


def render(report: dict[str, Any]) -> str:
    """The report as terminal text: a summary, the per-pass table and the per-layer table."""
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
    rows = [("pass", "contract", "params before", "params after", "max abs diff", "seconds")]
    for r in report.get("passes", []):
        rows.append((r.get("text", r.get("name", "")), str(r.get("contract", "")), _num(r.get("params_before")),
                     _num(r.get("params_after")), _num(r.get("max_abs_diff"), ".3g"), _num(r.get("seconds"), ".3f")))
    lines += ["", _table(rows)]
    layers = report.get("layers", [])
    if layers:
        rows = [("layer", "bytes before", "bytes after", "params before", "params after")]
        rows += [(r["layer"], _num(r["bytes_before"]), _num(r["bytes_after"]), _num(r["params_before"]),
                  _num(r["params_after"])) for r in layers]
        lines += ["", _table(rows)]
    return "\n".join(lines)


def write_plots(report: dict[str, Any], directory: str) -> list[str]:
    """layers.png (state bytes per layer before/after) and stages.png (params after each stage) in ``directory``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    layers = report.get("layers", [])
    if layers:
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(layers) + 2), 4))
        xs = range(len(layers))
        ax.bar([x - 0.2 for x in xs], [r["bytes_before"] for r in layers], 0.4, label="before")
        ax.bar([x + 0.2 for x in xs], [r["bytes_after"] for r in layers], 0.4, label="after")
        ax.set_xticks(list(xs), [r["layer"] for r in layers], rotation=45, ha="right")
        ax.set_ylabel("state bytes")
        ax.set_title("size per layer")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(directory, "layers.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    stages = report.get("stages", [])
    if stages:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(stages) + 2), 4))
        ax.bar(range(len(stages)), [s["params"] or 0 for s in stages], color="tab:green")
        ax.set_xticks(range(len(stages)), [s["stage"] for s in stages], rotation=30, ha="right")
        ax.set_ylabel("float parameters")
        ax.set_xlabel("int8 kernels hold their weights in buffers, not parameters", fontsize=8)
        ax.set_title(f"parameters after each stage; state bytes {_num(report.get('state_bytes_before'))} -> "
                     f"{_num(report.get('state_bytes_after'))}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(directory, "stages.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
