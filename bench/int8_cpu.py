"""int8 on CPU, as a user gets it: lowered int8 linears and convs vs fp32 and torch.ao; ONNX QDQ under onnxruntime.

Table 1, per M x K x N: a one-Linear program through ``quant-insert,calibrate,lower-int8`` with 7-bit static
activations (``activations=int7-per-tensor``, torch.ao's reduce_range), with 8-bit ones and 7-bit weights
(``weights=int7-per-channel``) — the two schemes fbgemm / oneDNN compute exactly on AVX2 — with both at 7 bits
(slimfx's avx2 kernel's fastest path), with the default 8-bit activations and weights, and with 8-bit dynamic
activations
(``lower-int8{activations=dynamic-per-tensor-u8}``, ONNX's DynamicQuantizeLinear) and 7-bit weights; Int8Linear
directly (``bench/kernels.py``'s modes); torch.ao's dynamic quantized Linear; fp32 nn.Linear. Table 2, per conv
shape: a one-Conv2d program lowered the same ways, on NCHW and channels-last inputs, vs fp32 conv (both layouts;
the ratio is against the faster) and torch.ao's static quantized conv (x86 qconfig: quantize, quantized::conv2d,
dequantize). Each row names the kernel the dispatcher chose; Table 3 lists every candidate it timed or
rejected in this run. Table 4: onnxruntime latency of slimfx's QDQ export of a small MLP (int8 and int7
weights) against the fp32 ONNX export of the same MLP (and slimfx's own lowered program in torch).
Errors: max |y - ref| / max |ref| against the fp32 layer and against the lowered layer's own fake-quant
simulation (0 = bit-identical). Targets (reported against, not assumed): >= 2x vs fp32 at the large shapes,
>= 1x vs torch.ao.

    python bench/int8_cpu.py            # 4 linear + 5 conv shapes (several minutes on 2 cores)
    python bench/int8_cpu.py --quick    # 2 + 2 smaller shapes, short budgets (~1-2 minutes)
"""

from __future__ import annotations

import argparse
import copy
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

from kernels import direct_int8_modules, markdown, time_interleaved  # noqa: E402
from machine import machine_line  # noqa: E402

import slimfx  # noqa: E402
import slimfx.passes.quant.insert  # noqa: E402, F401  (registers the passes)
import slimfx.passes.quant.lower  # noqa: E402, F401
from slimfx.export import export_qdq  # noqa: E402
from slimfx.kernels import Int8Conv2d, Int8Linear, cpu_kernels, dispatch  # noqa: E402
from slimfx.passes.quant.calibrate import set_calibration_data  # noqa: E402

SHAPES = [(256, 1024, 1024), (512, 1024, 4096), (512, 4096, 1024), (1024, 4096, 4096)]
QUICK_SHAPES = [(256, 1024, 1024), (512, 1024, 4096)]
# (batch, in channels, height = width, out channels, kernel, stride, groups): ResNet-like layers, a 1x1
# projection and a depthwise conv
CONV_SHAPES = [(16, 64, 56, 64, 3, 1, 1), (16, 128, 28, 128, 3, 1, 1), (16, 256, 14, 256, 3, 1, 1),
               (16, 256, 28, 64, 1, 1, 1), (16, 128, 56, 128, 3, 1, 128)]
QUICK_CONV_SHAPES = [(8, 64, 28, 64, 3, 1, 1), (8, 128, 28, 128, 3, 1, 128)]
# quant-insert schemes (weights, activations, lower-int8 options) -> row label. On AVX2 without VNNI, 8-bit codes x
# 8-bit weights saturate int16 pair sums in fbgemm / oneDNN / onnxruntime; 7-bit codes or 7-bit weights do not.
SCHEMES = {("int8-per-channel", "int7-per-tensor", ""): "7-bit static",
           ("int7-per-channel", "int8-per-tensor", ""): "8-bit static, 7-bit weights",
           ("int8-per-channel", "int8-per-tensor", ""): "8-bit static (default)",
           # 7-bit codes x 7-bit weights: slimfx's own AVX2 kernel (a quarter fewer multiplies)
           ("int7-per-channel", "int7-per-tensor", ""): "7-bit static, 7-bit weights"}
#: linears also quantize their input at run time: ONNX's 8-bit DynamicQuantizeLinear with 7-bit weights
LINEAR_SCHEMES = {**SCHEMES, ("int7-per-channel", "none", "{activations=dynamic-per-tensor-u8}"):
                  "8-bit dynamic, 7-bit weights",
                  ("int7-per-channel", "none", "{activations=dynamic-per-tensor}"): "7-bit dynamic, 7-bit weights"}


def lowered_programs(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor],
                     scheme: tuple[str, str, str]) -> tuple[slimfx.Program, slimfx.Program]:
    """``model`` through quant-insert{weights=..., activations=...},calibrate: (the fake-quant simulation, it
    lowered with ``lower-int8`` and the scheme's options)."""
    program = set_calibration_data(slimfx.trace(model, (example,)), calibration)
    weights, activations, lower_options = scheme
    simulated = slimfx.run_pipeline(
        program, f"quant-insert{{weights={weights},activations={activations}}},calibrate{{progress=false}}")
    return simulated, slimfx.run_pipeline(simulated, f"lower-int8{lower_options}")


def ao_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def ao_static_conv(conv: nn.Conv2d, calibration: list[torch.Tensor]) -> nn.Module:
    """torch.ao eager static quantization of one conv (x86 qconfig: 7-bit activations, per-channel weights)."""
    from torch.ao import quantization as tq

    model = nn.Sequential(tq.QuantStub(), copy.deepcopy(conv), tq.DeQuantStub()).eval()
    model.qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare(model, inplace=True)
        with torch.no_grad():
            for batch in calibration:
                model(batch)
        tq.convert(model, inplace=True)
    return model


def _kernel_of(program: slimfx.Program, cls: type) -> str:
    kernels = {m.last_kernel for m in program.module.modules() if isinstance(m, cls)}
    return ",".join(sorted(k or "?" for k in kernels))


def bench_linear(shapes, budget_s: float) -> str:
    rows = []
    for m, k, n in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(k, n).eval()
        x = torch.randn(m, k)
        g = torch.Generator().manual_seed(1)
        calibration = [torch.randn(64, k, generator=g) for _ in range(4)]
        with torch.no_grad():
            ref = linear(x)
            ao = ao_dynamic(nn.Sequential(linear))
            fns = {"fp32": partial(linear, x), "ao": partial(ao, x)}
            labels, errors_vs_sim = {"ao": "torch.ao dynamic quantized Linear"}, {}
            for scheme, label in LINEAR_SCHEMES.items():
                simulated, lowered = lowered_programs(nn.Sequential(linear), calibration[0], calibration, scheme)
                lowered.module(x)  # the dispatcher measures its candidates once for this shape, outside the timing
                fns[label] = partial(lowered.module, x)
                labels[label] = f"slimfx lowered, {label} [{_kernel_of(lowered, Int8Linear)}]"
                errors_vs_sim[label] = cpu_kernels.relative_error(lowered.module(x), simulated.module(x))
            for name, direct in direct_int8_modules(linear, x).items():
                fns[name] = partial(direct, x)
                labels[name] = f"slimfx Int8Linear {name} [{direct.last_kernel}]"
            # every implementation in turns (round after round), each keeping its best: the VM drifts
            times = time_interleaved(fns, budget_s)
            t_fp32, t_ao = times.pop("fp32"), times["ao"]
            ordered = [name for name in fns if name not in ("fp32", "ao")] + ["ao"]
            results = [(labels[name], times[name], fns[name](), errors_vs_sim.get(name, "-")) for name in ordered]
        for name, t, y, vs_sim in results:
            rows.append([f"{m}x{k}x{n}", name, t, t_fp32 / t, t_ao / t, cpu_kernels.relative_error(y, ref), vs_sim])
        rows.append([f"{m}x{k}x{n}", "fp32 nn.Linear", t_fp32, 1.0, t_ao / t_fp32, 0.0, "-"])
        print(f"  linear {m}x{k}x{n} done", file=sys.stderr, flush=True)
    return markdown(["M x K x N", "implementation [kernel]", "ms", "vs fp32", "vs torch.ao",
                     "max rel err vs fp32", "vs its simulation"], rows)


def bench_conv(shapes, budget_s: float) -> str:
    rows = []
    for batch, cin, size, cout, kernel, stride, groups in shapes:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups).eval()
        x = torch.randn(batch, cin, size, size)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(1)
        calibration = [torch.randn(min(batch, 4), cin, size, size, generator=g) for _ in range(3)]
        shape = f"{batch}x{cin}x{size}x{size} {kernel}x{kernel}/{stride} g{groups} -> {cout}"
        with torch.no_grad():
            ref = conv(x)
            conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
            ao = ao_static_conv(conv, calibration)
            fns = {"fp32 nn.Conv2d, NCHW": partial(conv, x), "fp32 nn.Conv2d, channels_last": partial(conv_cl, x_cl)}
            outputs, errors_vs_sim = {"fp32 nn.Conv2d, NCHW": ref, "fp32 nn.Conv2d, channels_last": conv_cl(x_cl)}, {}
            for scheme, label in SCHEMES.items():
                simulated, lowered = lowered_programs(nn.Sequential(conv), calibration[0], calibration, scheme)
                for layout, inputs in (("NCHW", x), ("channels_last", x_cl)):
                    y = lowered.module(inputs)  # the dispatcher measures once per shape and layout
                    name = f"slimfx lowered, {label}, {layout} [{_kernel_of(lowered, Int8Conv2d)}]"
                    fns[name], outputs[name] = partial(lowered.module, inputs), y
                    errors_vs_sim[name] = cpu_kernels.relative_error(y, simulated.module(inputs))
            ao_name = "torch.ao static quantized Conv2d (7-bit act)"
            fns[ao_name], outputs[ao_name] = partial(ao, x), ao(x)
            times = time_interleaved(fns, budget_s)  # in turns: the VM's slow spells hit every implementation
            t_fp32 = min(times["fp32 nn.Conv2d, NCHW"], times["fp32 nn.Conv2d, channels_last"])
            t_ao = times[ao_name]
            results = [(name, times[name], outputs[name], errors_vs_sim.get(name, "-")) for name in fns]
        for name, t, y, vs_sim in results:
            rows.append([shape, name, t, t_fp32 / t, t_ao / t, cpu_kernels.relative_error(y, ref), vs_sim])
        print(f"  conv {shape} done", file=sys.stderr, flush=True)
    return markdown(["N x C x H x W kernel/stride groups -> O", "implementation [kernel]", "ms",
                     "vs best fp32", "vs torch.ao", "max rel err vs fp32", "vs its simulation"], rows)


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # ORT's pool spin-waits after each run by default, stealing the cores from whatever is timed next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
    lowered7 = slimfx.run_pipeline(fake_quant7, "lower-int8")
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
        fns, outputs, expected = {}, {}, {}
        for name, path, want in [("onnxruntime fp32 export", paths["fp32"], sim),
                                 ("onnxruntime slimfx QDQ export, int8 weights", paths["qdq8"], sim),
                                 ("onnxruntime slimfx QDQ export, int7 weights", paths["qdq7"], sim7)]:
            session = ort_session(path)
            fns[name] = partial(session.run, None, feed)
            outputs[name], expected[name] = torch.from_numpy(fns[name]()[0]), want
        for weights, program, want in [("int8", lowered, sim), ("int7", lowered7, sim7)]:
            y = program.module(x)  # the dispatcher measures once, outside the timing
            name = f"slimfx lowered program, {weights} weights (torch) [{_kernel_of(program, Int8Linear)}]"
            fns[name], outputs[name], expected[name] = partial(program.module, x), y, want
        fns["torch fp32 eager"], outputs["torch fp32 eager"], expected["torch fp32 eager"] = partial(model, x), ref, sim
        times = time_interleaved(fns, budget_s)  # in turns: the VM's slow spells hit every implementation
        for name in fns:
            rows.append([name, times[name], cpu_kernels.relative_error(outputs[name], ref),
                         cpu_kernels.relative_error(outputs[name], expected[name])])
    base = times["onnxruntime fp32 export"]
    rows = [row[:2] + [base / row[1]] + row[2:] for row in rows]
    return (f"onnxruntime {ort.__version__}, graph optimizations ORT_ENABLE_ALL, "
            f"{torch.get_num_threads()} intra-op threads\n\n"
            + markdown(["implementation", "ms", "vs ort fp32", "max rel err vs fp32",
                        "max rel err vs its fake-quant sim (int8 weights' for fp32 rows)"], rows)
            + "\n\nint7 weights: onnxruntime's fused u8s8 kernels saturate int16 pair sums with full 8-bit weights "
              "on x86 CPUs without VNNI (vpmaddubsw); `quant-insert{weights=int7-per-channel}` avoids it.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 linear + 2 conv shapes, short budgets")
    parser.add_argument("--use-cache", action="store_true",
                        help="reuse the dispatcher's disk cache (default: measure afresh in a temp dir)")
    parser.add_argument("--only", choices=("linear", "conv", "onnx"), help="run only this table")
    args = parser.parse_args(argv)
    wanted = {args.only} if args.only else {"linear", "conv", "onnx"}
    start = time.perf_counter()
    print(machine_line())
    print(f"threads: torch {torch.get_num_threads()}; quantized engine {torch.backends.quantized.engine} "
          f"of {torch.backends.quantized.supported_engines}")
    budget = 0.2 if args.quick else 1.0
    with tempfile.TemporaryDirectory() as cache_dir:
        if not args.use_cache:
            os.environ["SLIMFX_CACHE_DIR"] = cache_dir
        if "linear" in wanted:
            print("\n## int8 linear (best-of-runs ms; vs X = X ms / ms)\n")
            print(bench_linear(QUICK_SHAPES if args.quick else SHAPES, budget), flush=True)
        if "conv" in wanted:
            print("\n## int8 conv2d (best-of-runs ms; vs X = X ms / ms)\n")
            print(bench_conv(QUICK_CONV_SHAPES if args.quick else CONV_SHAPES, budget), flush=True)
        if wanted & {"linear", "conv"}:
            print("\n## the dispatcher's choices in this run (every candidate's time, every rejection)\n")
            print(dispatch.format_choice_table(dispatch.choice_table()), flush=True)
        if "onnx" in wanted:
            width, depth, batch = 1024, 3, 256
            print(f"\n## ONNX QDQ export under onnxruntime: MLP of {depth} x {width}-wide linears, batch {batch} "
                  "(best-of-runs ms)\n")
            print(bench_onnx_mlp(width, depth, batch, budget))
    print(f"\n(total {time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
