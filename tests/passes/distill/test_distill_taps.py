"""distill-taps / strip-taps: features come out named, the original output is untouched, stripping restores the
program exactly; pair_stages pairs resolution stages of a student and a teacher."""


import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import slimfx
import slimfx.passes.distill  # noqa: F401  (registers distill-taps, strip-taps)
from slimfx.errors import PassError
from slimfx.ir.meta import tensor_meta
from slimfx.passes.base import get_pass
from slimfx.passes.distill.taps import TAPS_KEY, output_node, pair_stages, strip_taps, tap_record
from slimfx.testing import strategies as sst
from slimfx.zoo import DigitsCNN, DigitsMLP


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return slimfx.trace(DigitsCNN().eval(), (torch.randn(4, 1, 8, 8),))


def _apply(program, name, **options):
    """Run one pass the way the manager does (clone, run, recompile, re-propagate meta), minus its numerics check."""
    return slimfx.run_pipeline(program, [get_pass(name)(**options)], check_numerics=False)


def _features(program, inputs, names):
    values = {}
    env = torch.fx.Interpreter(program.module)
    original_run_node = env.run_node

    def run_node(node):
        result = original_run_node(node)
        if node.name in names:
            values[node.name] = result
        return result

    env.run_node = run_node
    with torch.no_grad():
        env.run(*inputs)
    return values


def test_taps_return_original_output_and_named_features(cnn):
    x = torch.randn(5, 1, 8, 8)
    tapped = _apply(cnn, "distill-taps", student=["relu_1", "pool"])
    logits, feats = tapped(x)
    assert torch.equal(logits, cnn(x))
    assert list(feats) == ["relu_1", "pool"]
    expected = _features(cnn, (x,), {"relu_1", "pool"})
    assert all(torch.equal(feats[k], expected[k]) for k in feats)
    metas = {n.name: tensor_meta(n) for n in tapped.graph.nodes}
    assert tapped.output_spec == (cnn.output_spec, {"relu_1": metas["relu_1"], "pool": metas["pool"]})
    record = tap_record(tapped)
    assert record.names == ("relu_1", "pool") and record.role == "student"
    assert tap_record(tapped.clone()) == record  # the record lives on the output node, so copies keep it
    slimfx.verify(tapped)
    assert tap_record(cnn) is None  # the input program is not mutated


def test_strip_taps_restores_outputs_code_and_spec_exactly(cnn):
    x = torch.randn(3, 1, 8, 8)
    tapped = _apply(cnn, "distill-taps", student=["features.*"])
    names = tap_record(tapped).names
    # functional ops inside features.2 (relu, add) match by their module path, not only call_module nodes
    assert len(names) == 13 and {"relu", "add", "relu_1"} <= set(names)
    stripped = _apply(tapped, "strip-taps")
    assert torch.equal(stripped(x), cnn(x))
    assert stripped.module.code == cnn.module.code
    assert stripped.output_spec == cnn.output_spec
    assert TAPS_KEY not in output_node(stripped).meta
    slimfx.verify(stripped)
    assert [r.name for r in stripped.provenance] == ["distill-taps", "strip-taps"]


def test_tapping_twice_adds_taps_and_one_strip_removes_all(cnn):
    once = _apply(cnn, "distill-taps", student=["pool"])
    twice = _apply(once, "distill-taps", student=["flatten"])
    assert list(twice(torch.randn(2, 1, 8, 8))[1]) == ["pool", "flatten"]
    back = _apply(twice, "strip-taps")
    assert back.module.code == cnn.module.code


def test_passes_compare_only_the_original_output():
    # The contract covers the original output; the manager gets that part from comparable_outputs.
    program = slimfx.trace(DigitsMLP(hidden=8).eval(), (torch.randn(2, 64),))
    tap_manager = slimfx.PassManager("distill-taps{student=[act]}", check_numerics=False)
    tapped = tap_manager.run(program)
    x = tapped.example_inputs
    ref, out = tap_manager.passes[0].comparable_outputs(program(*x), tapped(*x))
    assert torch.equal(ref, out)
    strip_manager = slimfx.PassManager("strip-taps", check_numerics=False)
    stripped = strip_manager.run(tapped)
    ref, out = strip_manager.passes[0].comparable_outputs(tapped(*x), stripped(*x))
    assert torch.equal(ref, out)


def test_pipeline_with_numerics_checks_accepts_taps_round_trip(cnn):
    result = slimfx.run_pipeline(cnn, "distill-taps{student=[relu_1]},strip-taps")
    assert result.module.code == cnn.module.code


def test_default_options_change_nothing_and_strip_on_untapped_is_a_no_op(cnn):
    for name in ("distill-taps", "strip-taps"):
        result = slimfx.run_pipeline(cnn, name)
        assert result.module.code == cnn.module.code and not result.log[-1].changed


def test_teacher_role_and_errors(cnn):
    tapped = _apply(cnn, "distill-taps", student=["pool"], teacher=["flatten"], role="teacher")
    assert tap_record(tapped).names == ("flatten",) and tap_record(tapped).role == "teacher"
    with pytest.raises(PassError, match="role=student or role=teacher"):
        _apply(cnn, "distill-taps", student=["pool"], teacher=["flatten"])
    with pytest.raises(PassError, match=r"student pattern 'nothing\*' matches no tensor-valued node"):
        _apply(cnn, "distill-taps", student=["nothing*"])


def test_strip_taps_function_reports_whether_it_changed_anything(cnn):
    program = cnn.clone()
    assert strip_taps(program) is False


def test_taps_work_on_the_export_dialect():
    model = DigitsMLP(hidden=8).eval()
    program = slimfx.trace(model, (torch.randn(2, 64),), frontend="export")
    name = next(n.name for n in program.graph.nodes if n.op == "call_function" and "relu" in str(n.target))
    tapped = _apply(program, "distill-taps", student=[name])
    x = torch.randn(2, 64)  # exported programs keep the example batch size
    logits, feats = tapped(x)
    assert torch.equal(logits, program(x)) and feats[name].shape == (2, 8)
    assert tapped.module.code != program.module.code
    stripped = _apply(tapped, "strip-taps")
    assert torch.equal(stripped(x), program(x)) and stripped.module.code == program.module.code


def test_pair_stages_pairs_resolution_stages_of_a_pruned_student(cnn):
    pruned = slimfx.run_pipeline(cnn, "prune-channels{sparsity=0.5}")
    pairs = pair_stages(pruned, cnn)
    assert [(s.name, t.name) for s, t in pairs] == [("relu_1", "relu_1"), ("pool", "pool"), ("flatten", "flatten")]
    s_shapes = [tensor_meta(s).shape for s, _ in pairs]
    t_shapes = [tensor_meta(t).shape for _, t in pairs]
    assert s_shapes == [(4, 16, 8, 8), (4, 16, 4, 4), (4, 256)]
    assert t_shapes == [(4, 32, 8, 8), (4, 32, 4, 4), (4, 512)]


def test_pair_stages_between_mlps_pairs_the_classifier_inputs():
    s = slimfx.trace(DigitsMLP(hidden=8), (torch.randn(2, 64),))
    t = slimfx.trace(DigitsMLP(hidden=32), (torch.randn(2, 64),))
    assert [(a.name, b.name) for a, b in pair_stages(s, t)] == [("act", "act")]


@settings(max_examples=30)
@given(pair=sst.programs_with_cases(frontend="any"), data=st.data())
def test_tapping_random_nodes_of_random_models_round_trips_exactly(pair, data):
    program, case = pair
    candidates = [n.name for n in program.graph.nodes
                  if n.op in ("call_module", "call_function", "call_method") and tensor_meta(n) is not None]
    assume(candidates)
    names = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=4, unique=True))
    tapped = _apply(program, "distill-taps", student=names)  # verify() ran: output_spec matches the new outputs
    taps = tap_record(tapped).names
    assert set(names) <= set(taps)
    for inputs in (case.example_inputs, case.fresh_inputs(seed=1)):
        original, feats = tapped(*inputs)
        reference = program(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(original),
                                                     torch.utils._pytree.tree_leaves(reference), strict=True))
        expected = _features(program, inputs, set(taps))
        assert list(feats) == list(taps) and all(torch.equal(feats[k], expected[k]) for k in taps)
    stripped = _apply(tapped, "strip-taps")
    assert stripped.module.code == program.module.code and stripped.output_spec == program.output_spec
    assert tap_record(stripped) is None
