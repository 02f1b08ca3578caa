"""Compositions on real data (scikit-learn digits), each one pipeline with a distill pass in it:

1. a student pruned to 50% of its channels recovers to within 1 point of its dense teacher (the example recipe
   examples/recipes/digits-prune-kd.yaml);
2. a QAT student with ternary (int2) weights, which post-training quantization takes from 99% to ~60%, is
   distilled from its float teacher back to within 1 point;
3. the int8 QAT + KD example recipe ends in real int8 kernels within 1 point of the float teacher.

The teacher is the float model compress() was given (its default teacher).
"""

from pathlib import Path

import pytest
import torch

import slimfx
from slimfx.datasets import accuracy, load_digits, train_classifier
from slimfx.frontend.recipe import load_recipe
from slimfx.ir.ops import OpKind
from slimfx.kernels import Int8Conv2d, Int8Linear
from slimfx.zoo import DigitsCNN

RECIPES = Path(__file__).resolve().parents[3] / "examples" / "recipes"




@pytest.fixture(scope="module")
def teacher(one_thread):
    """A DigitsCNN trained for 6 epochs (99.1% test accuracy), the digits splits and 8 calibration batches."""
    train, test = load_digits()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = train_classifier(DigitsCNN(), train, epochs=6, seed=0)
    calib = [(x,) for x, _ in train.batches(64)][:8]
    return model, train, test, calib


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_pruned_student_recovers_from_its_dense_teacher_in_one_recipe(teacher):
    model, train, test, _ = teacher
    teacher_acc = accuracy(model, test)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = load_recipe(RECIPES / "digits-prune-kd.yaml")
    without_distill = slimfx.Pipeline([spec for spec in recipe.pipeline() if spec.name != "distill"])
    pruned_only = slimfx.compress(model, without_distill, (train.x[:8],))
    out = slimfx.compress(model, recipe.pipeline(), (train.x[:8],), train_data=train)

    pruned_acc, recovered_acc = accuracy(pruned_only.module, test), accuracy(out.module, test)
    print(f"\nteacher {teacher_acc:.2f}% ({_params(model)} params); 50% channels pruned {pruned_acc:.2f}% "
          f"({_params(out.module)} params); after distill {recovered_acc:.2f}%")
    assert [p["name"] for p in out.report["passes"]] == ["canonicalize", "prune-channels", "distill"]
    assert out.report["distill_epochs"] is None  # the pipeline distilled: no second fine-tuning after it
    assert out.report["params_after"] < 0.35 * out.report["params_before"]
    assert teacher_acc > 98.5
    assert recovered_acc >= teacher_acc - 1.0, (teacher_acc, recovered_acc)
    assert recovered_acc > pruned_acc
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the teacher is untouched


def test_qat_student_with_ternary_weights_recovers_from_its_float_teacher(teacher):
    model, train, test, calib = teacher
    teacher_acc = accuracy(model, test)
    quantize = "quant-insert{weights=int2-per-channel},calibrate{progress=false}"
    ptq = slimfx.compress(model, quantize, (train.x[:8],), calib_data=calib)
    qat = slimfx.compress(model, f"{quantize},qat-prepare,distill{{epochs=5,lr=3e-3,schedule=cosine}},qat-freeze",
                          (train.x[:8],), calib_data=calib, train_data=train)

    ptq_acc, qat_acc = accuracy(ptq.module, test), accuracy(qat.module, test)
    print(f"\nteacher {teacher_acc:.2f}%; int2 weights: post-training {ptq_acc:.2f}%, QAT + KD {qat_acc:.2f}%")
    assert ptq_acc < teacher_acc - 20.0  # ternary weights without training are far off: the test is not trivial
    assert qat_acc >= teacher_acc - 1.0, (teacher_acc, qat_acc)
    fq = qat.program.nodes_of(OpKind.FAKE_QUANT)
    assert len(fq) == len(ptq.program.nodes_of(OpKind.FAKE_QUANT)) > 0
    assert all(type(qat.program.module.get_submodule(n.target)).__name__ == "FakeQuantize" for n in fq)  # frozen


def test_int8_qat_kd_recipe_lowers_to_int8_kernels_near_the_float_teacher(teacher):
    model, train, test, calib = teacher
    teacher_acc = accuracy(model, test)
    recipe = load_recipe(RECIPES / "digits-qat-kd-int8.yaml")
    out = slimfx.compress(model, recipe.pipeline(), (train.x[:8],), calib_data=calib, train_data=train)

    names = [p["name"] for p in out.report["passes"]]
    assert names.index("qat-prepare") < names.index("distill") < names.index("qat-freeze") < names.index("lower-int8")
    lowered = [m for m in out.module.modules() if isinstance(m, Int8Linear)]
    assert len(lowered) == 1  # the classifier
    convs = [m for m in out.module.modules() if isinstance(m, Int8Conv2d)]
    assert len(convs) == 4 and all(m.act_bits == 7 for m in convs)  # every conv, with 7-bit activation codes
    qat_acc = accuracy(out.module, test)
    print(f"\nteacher {teacher_acc:.2f}%; int8 QAT + KD, lowered: {qat_acc:.2f}%")
    assert qat_acc >= teacher_acc - 1.0, (teacher_acc, qat_acc)


def test_feature_distillation_leaves_no_taps_or_adapters_in_a_physically_pruned_program(teacher):
    model, train, _, _ = teacher
    pruned = slimfx.run_pipeline(slimfx.trace(model, (train.x[:8],)), "prune-channels{sparsity=0.5}")
    pruned.train_data, pruned.teacher = train, model
    tuned = slimfx.run_pipeline(pruned, "distill{epochs=2,features=auto,feature_weight=0.5}")
    assert [n.name for n in tuned.graph.nodes] == [n.name for n in pruned.graph.nodes]
    assert {k: v.shape for k, v in tuned.module.state_dict().items()} == \
        {k: v.shape for k, v in pruned.module.state_dict().items()}
    assert tuned(train.x[:8]).shape == (8, 10)
    assert tuned.log[-1].stats["loss_final"] < tuned.log[-1].stats["loss_first"]
