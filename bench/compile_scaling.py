"""Compile-time scaling: slimfx (trace + meta + verify + fold-bn + dce) vs torch.ao prepare_fx.

On generated deep residual CNNs (conv-bn-relu-conv-bn + residual add per block) of 250, 1000 and 4000
blocks, each measurement runs in a fresh child process so that peak memory is its own. Prints seconds,
the scaling ratio t(4000)/t(1000) (linear is 4.0; target <= 4.5), peak RSS, and slimfx/peer ratios.

    python bench/compile_scaling.py [--blocks 250,1000,4000] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import machine_line  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(tool: str, blocks: int) -> dict:
    import warnings

    import torch

    from slimfx.zoo import deep_residual_cnn

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model = deep_residual_cnn(blocks)
    inputs = (torch.randn(1, 3, 8, 8),)
    base = _peak_rss_mib()
    start = time.perf_counter()
    if tool == "slimfx":
        import slimfx

        program = slimfx.trace(model, inputs, frontend="fx")
        traced = time.perf_counter()
        out = slimfx.run_pipeline(program, "fold-bn,dce", verify_each=True, check_numerics=False)
        seconds = time.perf_counter() - start
        detail = {"trace+meta": traced - start, "fold-bn": out.log[0].seconds, "dce": out.log[1].seconds,
                  "nodes": len(program.graph.nodes), "nodes_after": len(out.graph.nodes)}
    else:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_fx

        # prepare_fx recurses once per node along a chain; the default limit fails at ~1000 blocks
        sys.setrecursionlimit(1_000_000)
        prepared = prepare_fx(model, get_default_qconfig_mapping(), inputs)
        seconds = time.perf_counter() - start
        detail = {"nodes_after": len(prepared.graph.nodes)}
    return {"tool": tool, "blocks": blocks, "seconds": seconds, "peak_rss_mib": _peak_rss_mib(),
            "rss_over_model_mib": _peak_rss_mib() - base, **detail}


def measure(tool: str, blocks: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", tool, str(blocks)]
    # a deep recursion needs a deep C stack too
    prefix = ["bash", "-c", 'ulimit -s unlimited 2>/dev/null || ulimit -s 1048576; exec "$@"', "_"]
    try:
        done = subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "blocks": blocks, "error": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"tool": tool, "blocks": blocks, "error": f"exit {done.returncode}: {last[:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="250,1000,4000")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "BLOCKS"), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write all measurements to this file")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    print(machine_line())
    print("one thread per process; each measurement in a fresh process\n")
    sizes = [int(b) for b in args.blocks.split(",")]
    rows = []
    for blocks in sizes:
        for tool in ("slimfx", "prepare_fx"):
            row = measure(tool, blocks, args.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["tool"], r["blocks"]): r for r in rows}
    print("\n| blocks | nodes | slimfx s | slimfx peak MiB | prepare_fx s | prepare_fx peak MiB "
          "| slimfx / prepare_fx |")
    print("|---|---|---|---|---|---|---|")
    for blocks in sizes:
        s, p = by[("slimfx", blocks)], by[("prepare_fx", blocks)]
        s_t = f"{s['seconds']:.2f}" if "seconds" in s else s["error"]
        p_t = f"{p['seconds']:.2f}" if "seconds" in p else p["error"]
        ratio = f"{s['seconds'] / p['seconds']:.2f}" if "seconds" in s and "seconds" in p else "n/a"
        print(f"| {blocks} | {s.get('nodes', '?')} | {s_t} | {s.get('peak_rss_mib', 0):.0f} | {p_t} | "
              f"{p.get('peak_rss_mib', 0):.0f} | {ratio} |")
    for tool in ("slimfx", "prepare_fx"):
        if 1000 in sizes and 4000 in sizes and "seconds" in by[(tool, 1000)] and "seconds" in by[(tool, 4000)]:
            print(f"{tool}: t(4000)/t(1000) = {by[(tool, 4000)]['seconds'] / by[(tool, 1000)]['seconds']:.2f}"
                  " (linear = 4.0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
