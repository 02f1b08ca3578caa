"""Trace a model, run a cleanup pipeline with IR dumps, and check the numerics contract."""

import torch

import slimfx
from slimfx.zoo import get_model

model, inputs = get_model("resnet-mini")
program = slimfx.trace(model, inputs)  # torch.fx, with untraceable submodules kept as leaves
print(program.num_params(), "parameters,", len(program.graph.nodes), "nodes")

with open("ir.txt", "w") as dump:
    result = slimfx.run_pipeline(program, "canonicalize,fold-bn,dce", dump_ir_after=["fold-bn"], dump_to=dump)
for run in result.log:
    print(f"{run.text:14} {run.contract:8} {run.seconds * 1e3:7.1f} ms  nodes {run.nodes_before}->{run.nodes_after}  "
          f"max|diff| {run.max_abs_diff:.2e}")
with torch.no_grad():
    print("max |eager - compressed| =", (model(*inputs) - result(*inputs)).abs().max().item())
