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
    from slimfx.kernels.dispatch import main_table

    print(main_table())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from slimfx.demo import main as demo_main

    return demo_main(args.out)


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
    p.set_defaults(func=cmd_kernels)
    p = sub.add_parser("demo", help="the end-to-end demo on scikit-learn's digits (train, distill, prune, int8)")
    p.add_argument("--out", default="slimfx-demo", help="folder for the per-stage weights and report.json")
    p.set_defaults(func=cmd_demo)
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
