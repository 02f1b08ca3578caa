"""Artifacts: a compressed model saved as model.safetensors + manifest.json, reloaded bit-for-bit.

No pickle anywhere. The manifest records how the model was made (pipeline text, frontend, example input
specs, versions), a hash of the IR (the generated code) and every state tensor's shape and dtype. Loading
rebuilds the structure by replaying the pipeline on ``model_factory()`` — every pass's structural decision
depends on the architecture and the options only, except where a pass ranks weights globally (then the
rebuilt shapes differ and loading says so) — and then loads the saved tensors, so outputs are identical.
Truncated, corrupted or mismatched artifacts raise ArtifactError saying what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slimfx.errors import ArtifactError, SlimfxError
from slimfx.frontend.api import Compressed
from slimfx.frontend.trace import trace
from slimfx.ir.program import Program
from slimfx.passes.manager import run_pipeline
from slimfx.passes.pipeline import Pipeline

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
FORMAT = 1


def ir_hash(program: Program) -> str:
    """A hash of the program's generated code: equal hashes mean the same graph."""
    return hashlib.sha256(program.module.code.encode()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save(compressed: Compressed | Program, directory: str) -> str:
    """Write ``directory``/model.safetensors and manifest.json; returns the directory."""
    from slimfx import __version__

    program = compressed.program if isinstance(compressed, Compressed) else compressed
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in program.module.state_dict().items()}
    save_file(state, os.path.join(directory, WEIGHTS))
    with open(os.path.join(directory, WEIGHTS), "rb") as f:
        weights_sha = hashlib.sha256(f.read()).hexdigest()
    manifest = {
        "format": FORMAT,
        "slimfx_version": __version__,
        "torch_version": torch.__version__,
        "pipeline": program.pipeline_text(),
        "frontend": "export" if program.dialect == "aten" else "fx",
        "training": program.training,
        "example_inputs": [{"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for t in program.example_inputs],
        "ir_hash": ir_hash(program),
        "weights_sha256": weights_sha,
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in state.items()},
        "passes": [{"name": r.name, "options": r.options} for r in program.provenance],
    }
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, default=str)
    return directory


def _read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"{path} is missing: a slimfx artifact folder holds {MANIFEST} and {WEIGHTS}")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is corrupted, save it again") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {manifest.get('format')!r}; this slimfx reads format {FORMAT}")
    return manifest


def _read_weights(directory: str, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(path):
        raise ArtifactError(f"{path} is missing")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != manifest["weights_sha256"]:
        raise ArtifactError(f"{path} does not match its manifest (sha256 differs): truncated or modified")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path} cannot be read: {exc}") from None


def _structure_only(pipeline_text: str) -> Pipeline:
    """The saved pipeline without its values-only passes (training): the saved tensors hold their result."""
    from slimfx.passes.base import get_pass

    return Pipeline([spec for spec in Pipeline.parse(pipeline_text) if not get_pass(spec.name).values_only])


def load(directory: str, model_factory: Callable[[], nn.Module]) -> Compressed:
    """Rebuild the compressed model saved in ``directory`` from ``model_factory()`` (the uncompressed
    architecture); its outputs are bit-identical to the saved model's."""
    manifest = _read_manifest(directory)
    weights = _read_weights(directory, manifest)
    specs = manifest["example_inputs"]
    inputs = tuple(torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"])) for spec in specs)
    try:
        model = model_factory()
        if not isinstance(model, nn.Module):
            raise ArtifactError(f"model_factory() returned {type(model).__name__}; it must build the nn.Module")
        # a fresh module is in training mode; the saved one may not be (BatchNorm would use batch statistics)
        program = trace(model.train(bool(manifest.get("training", False))), inputs, frontend=manifest["frontend"])
        # structure only: calibration reads zeros, qparams and weights are overwritten by the saved tensors
        program.calibration_data = [inputs]
        program = run_pipeline(program, _structure_only(manifest["pipeline"]), verify_each=False,
                               check_numerics=False, inplace=True)
    except SlimfxError as exc:
        raise ArtifactError(f"replaying {manifest['pipeline']!r} on model_factory() failed: {exc}") from exc
    state = program.module.state_dict()
    for name, spec in manifest["tensors"].items():
        if name not in state:
            raise ArtifactError(f"model_factory() does not rebuild tensor {name!r}: is it the same architecture?")
        if list(state[name].shape) != spec["shape"]:
            raise ArtifactError(
                f"tensor {name!r} is {list(state[name].shape)} when rebuilt but {spec['shape']} in the artifact: "
                "the pipeline's structure depends on the weights (e.g. global pruning) or the model differs")
    extra = set(state) - set(manifest["tensors"])
    if extra:
        raise ArtifactError(f"the rebuilt model has tensors the artifact lacks: {sorted(extra)[:5]}")
    if ir_hash(program) != manifest["ir_hash"]:
        raise ArtifactError("the rebuilt program's graph differs from the saved one (IR hash mismatch): "
                            "model_factory() or the slimfx version differs from the ones that saved it")
    program.module.load_state_dict(weights, strict=True)
    return Compressed(program.module, program, {"loaded_from": directory, "pipeline": manifest["pipeline"]})
