"""int8 on CPU, as a user gets it: lowered int8 linears vs fp32 and torch.ao, and ONNX QDQ under onnxruntime.

Table 1, per M x K x N: a program with one Linear taken through ``quant-insert,calibrate,lower-int8``
(static per-tensor activations, what the pipeline produces), Int8Linear directly in ``dynamic_per_token``
and ``dynamic_per_tensor`` modes, torch.ao's dynamic quantized Linear, and fp32 nn.Linear; ms and the
ratios against fp32 and torch.ao, measured in one run. Table 2: onnxruntime latency of slimfx's QDQ export
of a small MLP (int8 and int7 weights) against the fp32 ONNX export of the same MLP (and slimfx's own
lowered program in torch).
Targets (reported against, not assumed): >= 2x vs fp32 at the large shapes, >= 1x vs torch.ao.

    python bench/int8_cpu.py            # 4 shapes, 256x1024x1024 .. 1024x4096x4096 (a few minutes on 2 cores)
    python bench/int8_cpu.py --quick    # 2 shapes, short budgets (< 1 minute)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import markdown, time_ms  # noqa: E402
from machine import machine_line  # noqa: E402

import slimfx  # noqa: E402
import slimfx.passes.quant.insert  # noqa: E402, F401  (registers the passes)
import slimfx.passes.quant.lower  # noqa: E402, F401
from slimfx.export import export_qdq  # noqa: E402
from slimfx.kernels import Int8Linear, cpu_kernels  # noqa: E402
from slimfx.passes.quant.calibrate import set_calibration_data  # noqa: E402

SHAPES = [(256, 1024, 1024), (512, 1024, 4096), (512, 4096, 1024), (1024, 4096, 4096)]
QUICK_SHAPES = [(256, 1024, 1024), (512, 1024, 4096)]
PIPELINE = "quant-insert,calibrate{progress=false},lower-int8"


def lowered_program(model: nn.Module, k: int, rows: int = 64) -> slimfx.Program:
    """``model`` through quant-insert, calibrate (4 random batches) and lower-int8."""
    g = torch.Generator().manual_seed(1)
    program = slimfx.trace(model, (torch.randn(rows, k, generator=g),))
    set_calibration_data(program, [torch.randn(rows, k, generator=g) for _ in range(4)])
    return slimfx.run_pipeline(program, PIPELINE)


def ao_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def bench_linear(shapes, budget_s: float) -> str:
    rows = []
    for m, k, n in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(k, n).eval()
        x = torch.randn(m, k)
        with torch.no_grad():
            ref = linear(x)
            t_fp32 = time_ms(partial(linear, x), budget_s)
            ao = ao_dynamic(nn.Sequential(linear))
            t_ao = time_ms(partial(ao, x), budget_s)
            results = []
            program = lowered_program(nn.Sequential(linear), k)
            (module,) = [mod for mod in program.module.modules() if isinstance(mod, Int8Linear)]
            program.module(x)  # the dispatcher measures its candidates once for this shape, outside the timing
            t = time_ms(partial(program.module, x), budget_s)
            results.append((f"slimfx lowered program, {module.mode} [{module.last_kernel}]", t, program.module(x)))
            for mode in ("dynamic_per_token", "dynamic_per_tensor"):
                direct = Int8Linear.from_float(linear, mode=mode)
                direct(x)
                t = time_ms(partial(direct, x), budget_s)
                results.append((f"slimfx Int8Linear {mode} [{direct.last_kernel}]", t, direct(x)))
            results.append(("torch.ao dynamic quantized Linear", t_ao, ao(x)))
        for name, t, y in results:
            rows.append([f"{m}x{k}x{n}", name, t, t_fp32 / t, t_ao / t, cpu_kernels.relative_error(y, ref)])
        rows.append([f"{m}x{k}x{n}", "fp32 nn.Linear", t_fp32, 1.0, t_ao / t_fp32, 0.0])
        print(f"  linear {m}x{k}x{n} done", file=sys.stderr, flush=True)
    return markdown(["M x K x N", "implementation [kernel]", "ms", "vs fp32", "vs torch.ao",
                     "max rel err vs fp32"], rows)


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_onnx_mlp(width: int, depth: int, batch: int, budget_s: float) -> str:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return f"onnxruntime skipped: not installed ({e.name})"
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i < depth - 1 else [])
    model = nn.Sequential(*layers).eval()
    x = torch.randn(batch, width)
    g = torch.Generator().manual_seed(1)
    program = set_calibration_data(slimfx.trace(model, (x,)),
                                   [torch.randn(batch, width, generator=g) for _ in range(4)])
    fake_quant = slimfx.run_pipeline(program, "quant-insert,calibrate{progress=false}")
    fake_quant7 = slimfx.run_pipeline(program, "quant-insert{weights=int7-per-channel},calibrate{progress=false}")
    lowered = slimfx.run_pipeline(fake_quant, "lower-int8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        paths = {name: Path(tmp) / f"{name}.onnx" for name in ("fp32", "qdq8", "qdq7")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(paths["fp32"]), dynamo=False, opset_version=17,
                              input_names=["input_0"], output_names=["output_0"])
        export_qdq(fake_quant, paths["qdq8"])
        export_qdq(fake_quant7, paths["qdq7"])
        ref, sim, sim7 = model(x), fake_quant.module(x), fake_quant7.module(x)
        feed = {"input_0": x.numpy()}
        runs = [("onnxruntime fp32 export", paths["fp32"], sim),
                ("onnxruntime slimfx QDQ export, int8 weights", paths["qdq8"], sim),
                ("onnxruntime slimfx QDQ export, int7 weights", paths["qdq7"], sim7)]
        times = {}
        for name, path, expected in runs:
            session = ort_session(path)
            y = torch.from_numpy(session.run(None, feed)[0])
            times[name] = time_ms(partial(session.run, None, feed), budget_s)
            rows.append([name, times[name], cpu_kernels.relative_error(y, ref),
                         cpu_kernels.relative_error(y, expected)])
        lowered.module(x)
        t = time_ms(partial(lowered.module, x), budget_s)
        y = lowered.module(x)
        rows.append(["slimfx lowered program (torch, Int8Linear)", t, cpu_kernels.relative_error(y, ref),
                     cpu_kernels.relative_error(y, sim)])
        t_torch = time_ms(partial(model, x), budget_s)
        rows.append(["torch fp32 eager", t_torch, 0.0, cpu_kernels.relative_error(ref, sim)])
    base = times["onnxruntime fp32 export"]
    rows = [row[:2] + [base / row[1]] + row[2:] for row in rows]
    return (f"onnxruntime {ort.__version__}, graph optimizations ORT_ENABLE_ALL, "
            f"{torch.get_num_threads()} intra-op threads\n\n"
            + markdown(["implementation", "ms", "vs ort fp32", "max rel err vs fp32",
                        "max rel err vs its fake-quant sim (int8 weights for fp32 rows)"], rows)
            + "\n\nint7 weights: onnxruntime's fused u8s8 kernels saturate int16 pair sums with full 8-bit weights "
              "on x86 CPUs without VNNI (vpmaddubsw); `quant-insert{weights=int7-per-channel}` avoids it.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 shapes, short budgets (< 1 minute)")
    parser.add_argument("--use-cache", action="store_true",
                        help="reuse the dispatcher's disk cache (default: measure afresh in a temp dir)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(machine_line())
    print(f"threads: torch {torch.get_num_threads()}; quantized engine {torch.backends.quantized.engine} "
          f"of {torch.backends.quantized.supported_engines}")
    budget = 0.2 if args.quick else 1.0
    with tempfile.TemporaryDirectory() as cache_dir:
        if not args.use_cache:
            os.environ["SLIMFX_CACHE_DIR"] = cache_dir
        print("\n## int8 linear (best-of-runs ms; vs X = X ms / ms; max rel err vs the fp32 layer)\n")
        print(bench_linear(QUICK_SHAPES if args.quick else SHAPES, budget), flush=True)
        width, depth, batch = 1024, 3, 256
        print(f"\n## ONNX QDQ export under onnxruntime: MLP of {depth} x {width}-wide linears, batch {batch} "
              "(best-of-runs ms)\n")
        print(bench_onnx_mlp(width, depth, batch, budget))
    print(f"\n(total {time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
