"""Structured pruning, measured: slimfx prune-channels vs Torch-Pruning (DepGraph) on the same models.

For a ResNet-style CNN and a ViT-style model (both defined in slimfx.zoo), 50% channel pruning with L1
importance: params ratio, MACs ratio, CPU latency ratio (pruned / dense) and time to prune (best of
``--prune-runs`` calls with the tools taking turns, so neither is charged for warm-up or for a slow spell
of the VM), also as a ratio to Torch-Pruning's. slimfx is timed twice: as compress() runs by default
(trace, the pass, IR verification after it and the numerics check that runs the model before and after),
and with verification and the numerics check off, which is the work Torch-Pruning does (trace + prune; it
checks nothing). Torch-Pruning's time does not include the model copy it needs (it prunes in place); slimfx's
includes its private copy. MACs and params are counted with Torch-Pruning's
own counter for both tools (one yardstick). Torch-Pruning is an optional bench dependency:
``pip install --no-deps torch-pruning``.

    python bench/prune_speed.py [--sparsity 0.5] [--batch 32] [--repeats 20] [--prune-runs 12]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import machine_line  # noqa: E402

import slimfx  # noqa: E402
from slimfx.demo import latency_ms  # noqa: E402
from slimfx.zoo import get_model  # noqa: E402


def count(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, x)
    return float(macs), float(params)


def prune_slimfx(model: nn.Module, inputs: tuple, sparsity: float, checks: bool = True) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    # the product API: traces a private copy (the user's model is untouched), checks contracts, reports
    result = slimfx.compress(model, f"prune-channels{{sparsity={sparsity},importance=l1}}", inputs,
                             verify_each=checks, check_numerics=checks)
    return result.module, time.perf_counter() - start


def prune_slimfx_unchecked(model: nn.Module, inputs: tuple, sparsity: float) -> tuple[nn.Module, float]:
    return prune_slimfx(model, inputs, sparsity, checks=False)


def prune_torch_pruning(model: nn.Module, inputs: tuple, sparsity: float) -> tuple[nn.Module, float]:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    start = time.perf_counter()
    outputs = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]  # the classifier keeps its classes
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.MetaPruner(
        model, inputs[0], importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=sparsity,
        ignored_layers=outputs, num_heads=heads, prune_head_dims=False, prune_num_heads=bool(heads),
    )
    pruner.step()
    return model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prune-runs", type=int, default=12, help="rounds of pruning calls; each tool's best counts")
    parser.add_argument("--models", default="resnet-mini,vit-mini")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the latency runs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"torch threads: {torch.get_num_threads()}; batch {args.batch}; sparsity {args.sparsity}\n")
    print("| model | tool | time to prune ms | time / Torch-Pruning's | params ratio | MACs ratio "
          "| latency ms (dense -> pruned) | latency ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model, inputs = get_model(name)
        x = torch.randn(args.batch, *inputs[0].shape[1:])
        dense_macs, dense_params = count(model, inputs[0])
        dense_ms = latency_ms(model, x, args.repeats)
        tools = (("slimfx", prune_slimfx), ("slimfx, checks off", prune_slimfx_unchecked),
                 ("Torch-Pruning", prune_torch_pruning))
        # the first call pays one-time costs (imports, lazy initialisation) and this VM's speed drifts by
        # tens of percent over seconds: the tools take turns, round after round, and each keeps its best time
        results: dict[str, tuple[nn.Module, float] | Exception] = {}
        for _ in range(args.prune_runs):
            for tool, prune in tools:
                if isinstance(results.get(tool), Exception):
                    continue
                try:
                    pruned, seconds = prune(model, inputs, args.sparsity)
                except Exception as exc:  # report the peer's failure instead of crashing the comparison
                    results[tool] = exc
                    continue
                best = results.get(tool)
                results[tool] = (pruned, seconds if best is None else min(seconds, best[1]))
        peer = results.get("Torch-Pruning")
        peer_seconds = peer[1] if isinstance(peer, tuple) else None
        for tool, _ in tools:
            outcome = results[tool]
            if isinstance(outcome, Exception):
                print(f"| {name} | {tool} | failed: {type(outcome).__name__}: {str(outcome)[:80]} | | | | | |")
                continue
            pruned, seconds = outcome
            vs_peer = f"{seconds / peer_seconds:.2f}" if peer_seconds else "-"
            try:
                macs, params = count(pruned, inputs[0])
                ms = latency_ms(pruned, x, args.repeats)
            except Exception as exc:  # a pruned model that no longer runs is a result too
                print(f"| {name} | {tool} | {seconds * 1e3:.1f} | {vs_peer} | pruned model fails to run: "
                      f"{type(exc).__name__}: {str(exc)[:70]} | | | |")
                continue
            dense_ms = min(dense_ms, latency_ms(model, x, args.repeats))  # re-measured: the machine drifts
            print(f"| {name} | {tool} | {seconds * 1e3:.1f} | {vs_peer} | {params / dense_params:.3f} | "
                  f"{macs / dense_macs:.3f} | {dense_ms:.2f} -> {ms:.2f} | {ms / dense_ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
