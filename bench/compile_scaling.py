"""Compile-time scaling: slimfx (trace + meta + verify + fold-bn + dce) vs torch.ao prepare_fx.

On generated deep residual CNNs (conv-bn-relu-conv-bn + residual add per block) of 250, 1000 and 4000
blocks, each measurement runs in a fresh child process (one torch thread) so that peak memory is its own.
Prints wall and CPU seconds, the scaling ratio t(4000)/t(1000) (linear is 4.0; target <= 4.5), peak RSS,
and slimfx/peer ratios. CPU seconds (process time) are reported beside wall seconds because our machines
are shared: other processes inflate wall time, not this process's CPU time.

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
    cpu_start = time.process_time()
    start = time.perf_counter()
    if tool == "slimfx":
        import slimfx

        program = slimfx.trace(model, inputs, frontend="fx")
        traced = time.perf_counter()
        out = slimfx.run_pipeline(program, "fold-bn,dce", verify_each=True, check_numerics=False)
        seconds = time.perf_counter() - start
        detail = {"cpu_seconds": time.process_time() - cpu_start, "trace+meta": traced - start,
                  "fold-bn": out.log[0].seconds, "dce": out.log[1].seconds, "nodes": len(program.graph.nodes),
                  "nodes_after": len(out.graph.nodes)}
    else:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_fx

        # prepare_fx recurses once per node along a chain; the default limit fails at ~1000 blocks
        sys.setrecursionlimit(1_000_000)
        prepared = prepare_fx(model, get_default_qconfig_mapping(), inputs)
        seconds = time.perf_counter() - start
        detail = {"cpu_seconds": time.process_time() - cpu_start, "nodes_after": len(prepared.graph.nodes)}
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
    print("\n| blocks | nodes | slimfx wall s | slimfx CPU s | slimfx peak MiB | prepare_fx wall s | prepare_fx CPU s "
          "| prepare_fx peak MiB | slimfx / prepare_fx (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for blocks in sizes:
        s, p = by[("slimfx", blocks)], by[("prepare_fx", blocks)]

        def cell(r: dict, key: str) -> str:
            return f"{r[key]:.2f}" if key in r else r.get("error", "n/a")

        ratio = f"{s['cpu_seconds'] / p['cpu_seconds']:.2f}" if "cpu_seconds" in s and "cpu_seconds" in p else "n/a"
        print(f"| {blocks} | {s.get('nodes', '?')} | {cell(s, 'seconds')} | {cell(s, 'cpu_seconds')} | "
              f"{s.get('peak_rss_mib', 0):.0f} | {cell(p, 'seconds')} | {cell(p, 'cpu_seconds')} | "
              f"{p.get('peak_rss_mib', 0):.0f} | {ratio} |")
    for tool in ("slimfx", "prepare_fx"):
        a, b = by.get((tool, 1000), {}), by.get((tool, 4000), {})
        if "cpu_seconds" in a and "cpu_seconds" in b:
            print(f"{tool}: t(4000)/t(1000) = {b['seconds'] / a['seconds']:.2f} wall, "
                  f"{b['cpu_seconds'] / a['cpu_seconds']:.2f} CPU (linear = 4.0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
