"""The `slimfx` command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import torch

from slimfx.errors import SlimfxError


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape expects integers like 1,3,32,32, got {text!r}") from None


def cmd_passes(args: argparse.Namespace) -> int:
    from slimfx.passes.base import list_passes
    from slimfx.passes.options import option_types, type_name

    for cls in list_passes():
        print(f"{cls.name}  [{cls.contract.value}]  {cls.summary()}")
        hints = option_types(cls.Options)
        for f in dataclasses.fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            print(f"    {f.name}: {type_name(hints[f.name])} = {default}")
    return 0


def layer_table(program) -> str:
    """A per-layer table: node, kind, params, output shape."""
    from slimfx.ir.meta import meta_of
    from slimfx.ir.ops import KIND_INFO

    rows = [("node", "kind", "target", "params", "output")]
    for node in program.graph.nodes:
        kind = program.kind(node)
        if not KIND_INFO[kind].params and not (node.op == "call_module"):
            continue
        params = 0
        if node.op == "call_module":
            params = sum(p.numel() for p in program.module.get_submodule(node.target).parameters())
        else:
            for arg in node.all_input_nodes:
                if arg.op == "get_attr":
                    value = program.module.get_parameter(arg.target) if arg.target in dict(
                        program.module.named_parameters()) else None
                    params += value.numel() if value is not None else 0
        rows.append((node.name, kind.value, str(node.target)[:40], f"{params:,}", str(meta_of(node))))
    rows.append(("total", "", "", f"{program.num_params():,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_inspect(args: argparse.Namespace) -> int:
    from slimfx.frontend.model_ref import load_model
    from slimfx.frontend.trace import trace

    model, inputs = load_model(args.model)
    if args.input_shape:
        inputs = (torch.randn(*args.input_shape),)
    if inputs is None:
        raise SlimfxError(f"{args.model!r} gives no example inputs; pass --input-shape, e.g. 1,3,32,32")
    program = trace(model.eval(), inputs, frontend=args.frontend)
    if args.pipeline:
        from slimfx.passes.manager import run_pipeline

        program = run_pipeline(program, args.pipeline)
    print(program)
    print()
    print(layer_table(program))
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(program.to_dot())
        print(f"\nwrote {args.dot}")
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from slimfx.kernels.dispatch import cache_path, forget_choices, main_table

    if args.remeasure:
        print(f"dropped {forget_choices()} cached choices of this machine from {cache_path()}")
    print(main_table())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from slimfx.demo import main as demo_main

    return demo_main(args.out)


def cmd_recipe_check(args: argparse.Namespace) -> int:
    from slimfx.frontend.recipe import load_recipe

    print(load_recipe(args.recipe).pipeline())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import os
    import time

    from slimfx.export.artifact import save
    from slimfx.frontend import report as rep
    from slimfx.frontend.api import compress
    from slimfx.frontend.layer_report import layer_report
    from slimfx.frontend.model_ref import load_model
    from slimfx.passes.pipeline import Pipeline

    recipe = None
    if args.recipe:
        from slimfx.frontend.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        pipeline = recipe.pipeline()
        stages = [(f"{i}:{s.kind}", len(s.specs)) for i, s in enumerate(recipe.stages)]
    else:
        pipeline = Pipeline.parse(args.pipeline)
        stages = [(spec.name, 1) for spec in pipeline]
    model, inputs = load_model(args.model)
    if args.input_shape:
        inputs = (torch.randn(*args.input_shape, generator=torch.Generator().manual_seed(0)),)
    if inputs is None:
        raise SlimfxError(f"{args.model!r} gives no example inputs; pass --input-shape, e.g. 1,3,32,32")
    model = model.eval()
    if args.min_accuracy is not None and rep.digits_layout(inputs) is None:
        raise SlimfxError("--min-accuracy is measured on the digits test split and needs a model input shaped "
                          "[N,1,8,8] or [N,64]; use --max-output-error for other models")
    calib = rep.calibration_batches(args.calib, inputs) if args.calib else None
    if any(spec.name == "distill" for spec in pipeline) and not args.train:
        raise SlimfxError(f"the {'recipe' if recipe else 'pipeline'} has a distill pass, which fine-tunes on "
                          "labelled data: add --train digits (the teacher is the input model unless --teacher "
                          "MODEL names another)")
    if args.teacher and not args.train:
        raise SlimfxError("--teacher is the model to distill from, which needs training data: add --train digits")
    train = None
    if args.train:
        if rep.digits_layout(inputs) is None:
            shapes = [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
            raise SlimfxError(f"--train digits needs a model input shaped [N,1,8,8] or [N,64], got {shapes}")
        from slimfx.datasets import load_digits

        train, _ = load_digits(image=rep.digits_layout(inputs))
    teacher = load_model(args.teacher)[0].eval() if args.teacher else None
    start = time.perf_counter()
    compressed = compress(model, pipeline, inputs, calib_data=calib, train_data=train, teacher=teacher,
                          frontend=args.frontend)
    seconds = time.perf_counter() - start
    save(compressed, args.out)
    report = {"model": args.model, "recipe": recipe.as_dict() if recipe else None, "calib": args.calib,
              "train": args.train, "teacher": args.teacher or (args.model if args.train else None),
              "artifact": args.out, "compress_seconds": seconds, **compressed.report}
    report["max_output_error"] = rep.max_output_error(model, compressed.module, inputs)
    report["accuracy_before"] = rep.digits_accuracy(model, inputs)
    report["accuracy_after"] = rep.digits_accuracy(compressed.module, inputs)
    report["stages"] = rep.stage_sizes(report, stages)
    report.update(layer_report(model, compressed.program, inputs, artifact=args.out, frontend=args.frontend))
    checks = []
    if args.min_accuracy is not None:
        value = report["accuracy_after"]
        checks.append({"bound": "--min-accuracy", "limit": args.min_accuracy, "value": value,
                       "ok": value >= args.min_accuracy, "what": "accuracy (%) on the digits test split",
                       "failed": "is below"})
    if args.max_output_error is not None:
        value = report["max_output_error"]
        checks.append({"bound": "--max-output-error", "limit": args.max_output_error, "value": value,
                       "ok": value <= args.max_output_error, "what": "max output error vs the original model",
                       "failed": "exceeds"})
    report["checks"] = checks
    rep.write_report(report, os.path.join(args.out, rep.REPORT))
    if args.report:
        rep.write_report(report, args.report)
    print(f"pipeline: {report['pipeline']}")
    print(f"params {report['params_before']:,} -> {report['params_after']:,}; state bytes "
          f"{report['state_bytes_before']:,} -> {report['state_bytes_after']:,}; "
          f"max output error {report['max_output_error']:.3g}")
    totals = report["totals"]
    print(f"bytes on disk {totals['bytes_on_disk_before']:,} -> {totals['bytes_on_disk_after']:,}; MACs "
          f"{totals['macs_before']:,} -> {totals['macs_after']:,}; CPU latency {totals['latency_ms_before']:.3f} -> "
          f"{totals['latency_ms_after']:.3f} ms")
    if report["accuracy_after"] is not None:
        print(f"digits test accuracy {report['accuracy_before']:.2f}% -> {report['accuracy_after']:.2f}%")
    print(f"wrote {args.out} (artifact, {rep.REPORT})" + (f" and {args.report}" if args.report else ""))
    failed = [c for c in checks if not c["ok"]]
    for c in failed:
        print(f"slimfx: check failed: {c['what']} {c['value']:.6g} {c['failed']} the limit {c['bound']} "
              f"{c['limit']:g}", file=sys.stderr)
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from slimfx.frontend.report import read_report, render, write_plots

    report = read_report(args.dir)
    print(render(report))
    for path in write_plots(report, args.dir):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimfx", description="A compiler for neural-network compression.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("passes", help="list every pass with its options, defaults, contract and summary")
    p.set_defaults(func=cmd_passes)
    p = sub.add_parser("inspect", help="trace a model and print its IR and a per-layer table")
    p.add_argument("model", help="pkg.module:factory, path/to/file.py:factory, or a built-in model name")
    p.add_argument("--frontend", default="auto", choices=["auto", "fx", "export"])
    p.add_argument("--input-shape", type=_parse_shape, default=None, help="e.g. 1,3,32,32")
    p.add_argument("--pipeline", default=None, help="run this pipeline before printing")
    p.add_argument("--dot", default=None, help="also write the graph as Graphviz DOT to this file")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("kernels", help="measure and print the CPU kernel dispatcher's choices")
    p.add_argument("--remeasure", action="store_true",
                   help="drop this machine's cached choices first and measure again (e.g. after a busy spell)")
    p.set_defaults(func=cmd_kernels)
    p = sub.add_parser("demo", help="the end-to-end demo on scikit-learn's digits (train, distill, prune, int8)")
    p.add_argument("--out", default="slimfx-demo", help="folder for the per-stage weights and report.json")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("recipe", help="work with YAML recipes (see slimfx.frontend.recipe for the schema)")
    recipe_sub = p.add_subparsers(dest="recipe_command", required=True)
    q = recipe_sub.add_parser("check", help="validate a recipe and print its pipeline text")
    q.add_argument("recipe", help="path/to/recipe.yaml")
    q.set_defaults(func=cmd_recipe_check)
    p = sub.add_parser("run", help="compress a model with a recipe or pipeline, save the artifact and a report")
    p.add_argument("model", help="pkg.module:factory, path/to/file.py:factory, or a built-in model name")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--recipe", default=None, help="path/to/recipe.yaml")
    how.add_argument("--pipeline", default=None, help="pipeline text, e.g. fold-bn,prune-channels{sparsity=0.5}")
    p.add_argument("--calib", choices=["digits", "random"], default=None,
                   help="calibration batches: the digits train split ([N,1,8,8] or [N,64] inputs) or randn")
    p.add_argument("--train", choices=["digits"], default=None,
                   help="labelled data for distillation: the digits train split; used by the distill passes of "
                        "the pipeline, or (without one) to fine-tune for 3 epochs after it")
    p.add_argument("--teacher", default=None,
                   help="model to distill from (a MODEL reference); default with --train: the input model")
    p.add_argument("--out", required=True, help="folder for the artifact and report.json")
    p.add_argument("--report", default=None, help="also write the JSON report to this path")
    p.add_argument("--min-accuracy", type=float, default=None, help="fail (exit 1) below this digits accuracy (%%)")
    p.add_argument("--max-output-error", type=float, default=None,
                   help="fail (exit 1) when max |original - compressed| on the example inputs exceeds this")
    p.add_argument("--frontend", default="auto", choices=["auto", "fx", "export"])
    p.add_argument("--input-shape", type=_parse_shape, default=None, help="e.g. 1,3,32,32")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="print the report of `slimfx run` and write PNG plots next to it")
    p.add_argument("dir", help="the --out folder of `slimfx run`")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SlimfxError as exc:
        print(f"slimfx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
