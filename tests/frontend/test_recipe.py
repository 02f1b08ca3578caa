"""YAML recipes: stages expand to validated pipeline text; errors name the key path and the closest value."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from slimfx.errors import PipelineError
from slimfx.frontend.recipe import load_recipe, parse_recipe
from slimfx.passes.pipeline import Pipeline

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "recipes" / "digits-prune-int8.yaml"


def parse(text: str):
    return parse_recipe(yaml.safe_load(textwrap.dedent(text)))


def test_example_recipe_expands_to_pipeline_text():
    recipe = load_recipe(EXAMPLE)
    assert recipe.name == "digits-prune-int8"
    assert [s.kind for s in recipe.stages] == ["cleanup", "prune", "quant", "lower"]
    text = str(recipe.pipeline())
    assert text == ("canonicalize,fold-bn,prune-channels{sparsity=0.5,importance=l1},"
                    "quant-insert{weights=int7-per-channel,activations=int8-per-tensor},"
                    "calibrate{batches=8,progress=false},lower-int8")
    assert Pipeline.parse(text) == recipe.pipeline()


def test_shorthands_and_passes_stage():
    recipe = parse("""
        stages:
          - cleanup: fold-bn
          - prune: prune-nm
          - passes: "dce,verify"
          - passes: [{prune-magnitude: {sparsity: 0.25, scope: global}}, apply-masks]
          - quant: {calibrate: false}
          - lower: {target: int8, activations: keep}
    """)
    assert str(recipe.pipeline()) == ("fold-bn,prune-nm,dce,verify,prune-magnitude{sparsity=0.25,scope=global},"
                                      "apply-masks,quant-insert,lower-int8{activations=keep}")


@pytest.mark.parametrize("text, path, hint", [
    ("stages: [{prune: {sparsty: 0.5}}]", "stages[0].prune.sparsty:", "did you mean 'sparsity'"),
    ("stages: [{cleanup: [canonicalize]}, {prnue: {}}]", "stages[1].prnue:", "did you mean 'prune'"),
    ("stages: [{cleanup: [canonicalize, fold-bm]}]", "stages[0].cleanup[1]:", "did you mean 'fold-bn'"),
    ("stages: [{prune: {pass: prune-chanels}}]", "stages[0].prune.pass:", "did you mean 'prune-channels'"),
    ("stages: [{quant: {weigths: int8-per-channel}}]", "stages[0].quant.weigths:", "did you mean 'weights'"),
    ("stages: [{quant: {calibrate: {batchs: 2}}}]", "stages[0].quant.calibrate.batchs:", "did you mean 'batches'"),
    ("stages: [{prune: {sparsity: lots}}]", "stages[0].prune.sparsity:", "expects float"),
    ("stages: [{prune: {importance: l1, sparsity: 1.5}}]", "stages[0].prune.sparsity:", "[0, 1)"),
    ("stages: [{lower: int4}]", "stages[0].lower.target:", "did you mean 'int8'"),
    ("stages: [{cleanup: [prune-nm]}]", "stages[0].cleanup[0]:", "not an exact pass"),
    ("stages: [{passes: 'dce,fold-bm'}]", "stages[0].passes:", "did you mean 'fold-bn'"),
    ("stagse: []", "stagse:", "did you mean 'stages'"),
    ("name: x", "stages:", "non-empty list"),
    ("stages: [{distill: {epoch: 3}}]", "stages[0].distill.epoch:", "did you mean 'epochs'"),
    ("stages: [{distill: {temperature: hot}}]", "stages[0].distill.temperature:", "expects float"),
    ("stages: [{distill: {alpha: 1.5}}]", "stages[0].distill.alpha:", "must be in [0, 1]"),
    ("stages: [{distill: {amp: fp8}}]", "stages[0].distill.amp:", "one of auto|off|bf16|fp16"),
    ("stages: [{distill: false}]", "stages[0].distill:", "to skip distillation remove the stage"),
    ("stages: [{distill: 3}]", "stages[0].distill:", "expected a mapping of distill options"),
    ("stages: [{distil: {}}]", "stages[0].distil:", "did you mean 'distill'"),
])
def test_errors_name_the_key_path(text, path, hint):
    with pytest.raises(PipelineError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith(path), message
    assert hint in message


def test_unknown_option_lists_allowed_values():
    with pytest.raises(PipelineError, match=r"allowed: sparsity, target_macs, importance"):
        parse("stages: [{prune: {sparsty: 0.5}}]")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_recipe(bad)


def test_distill_stage_takes_the_pass_options_or_its_defaults():
    recipe = parse("""
        stages:
          - prune: {pass: prune-magnitude, sparsity: 0.5}
          - distill: {epochs: 5, temperature: 2, features: auto, amp: bf16}
          - distill: true
          - distill:
    """)
    assert [s.kind for s in recipe.stages] == ["prune", "distill", "distill", "distill"]
    assert str(recipe.pipeline()) == ("prune-magnitude{sparsity=0.5},"
                                      "distill{epochs=5,temperature=2.0,features=auto,amp=bf16},distill,distill")


@pytest.mark.parametrize("name, kinds, pipeline", [
    ("digits-prune-kd.yaml", ["cleanup", "prune", "distill"],
     "canonicalize,prune-channels{sparsity=0.5,importance=l1},"
     "distill{epochs=10,lr=0.003,schedule=cosine,temperature=4.0,alpha=0.5}"),
    ("digits-qat-kd-int8.yaml", ["cleanup", "quant", "passes", "distill", "passes", "lower"],
     "canonicalize,fold-bn,quant-insert{weights=int8-per-channel,activations=int7-per-tensor},"
     "calibrate{batches=8,progress=false},qat-prepare,distill{epochs=3,lr=0.001,temperature=4.0,alpha=0.9},"
     "qat-freeze,lower-int8"),
])
def test_distillation_example_recipes(name, kinds, pipeline):
    recipe = load_recipe(EXAMPLE.parent / name)
    assert recipe.name == name.removesuffix(".yaml")
    assert [s.kind for s in recipe.stages] == kinds
    assert str(recipe.pipeline()) == pipeline
