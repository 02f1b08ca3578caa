import io
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx.errors import ContractError, PassError, PipelineError
from slimfx.passes import (
    Contract,
    Pass,
    PassResult,
    get_analysis,
    register_analysis,
    register_pass,
    unregister_pass,
)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.drop(self.bn(self.conv(x)).relu())
        return self.head(y.mean((2, 3)))


@pytest.fixture
def program():
    return slimfx.trace(Small().eval(), torch.randn(2, 3, 8, 8))


def test_run_pipeline_never_mutates_its_input(program):
    before = (program.module.code, {k: v.clone() for k, v in program.module.state_dict().items()})
    out = slimfx.run_pipeline(program, "canonicalize,fold-bn,dce")
    assert program.module.code == before[0]
    assert all(torch.equal(v, before[1][k]) for k, v in program.module.state_dict().items())
    assert out.pipeline_text() == "canonicalize,fold-bn,dce"
    assert program.pipeline_text() == ""
    assert [r.text for r in out.provenance] == ["canonicalize", "fold-bn", "dce"]


def test_instruments_timing_statistics_and_numerics(program):
    out = slimfx.run_pipeline(program, "canonicalize,fold-bn,dce")
    by_name = {r.name: r for r in out.log}
    assert all(r.seconds >= 0 for r in out.log)
    assert by_name["fold-bn"].stats == {"folded": 1}
    assert by_name["canonicalize"].nodes_after < by_name["canonicalize"].nodes_before  # dropout removed
    assert by_name["fold-bn"].params_after < by_name["fold-bn"].params_before  # the folded BN is gone
    assert by_name["fold-bn"].max_abs_diff is not None and by_name["fold-bn"].max_abs_diff < 1e-4


def test_dump_ir_before_and_after_named_pass(program, tmp_path):
    stream = io.StringIO()
    slimfx.run_pipeline(program, "canonicalize,fold-bn", dump_ir_before=["fold-bn"],
                        dump_ir_after="fold-bn", dump_to=stream)
    text = stream.getvalue()
    assert "IR before fold-bn" in text and "IR after fold-bn" in text
    assert "IR after canonicalize" not in text
    before, after = text.split("IR after fold-bn")
    assert "batch_norm" in before and "batch_norm" not in after
    slimfx.run_pipeline(program, "canonicalize,fold-bn", dump_ir_after="all", dump_to=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["001-after_canonicalize.txt", "002-after_fold-bn.txt"]


@dataclass
class ScaleOptions:
    factor: float = 2.0


def _register_broken_exact_pass():
    @register_pass
    class ScaleWeights(Pass):
        """Scales every linear weight (a broken pass claiming to be exact, for tests)."""

        name = "test-scale-weights"
        contract = Contract.EXACT
        Options = ScaleOptions

        def run(self, program):
            for node in program.nodes_of(slimfx.OpKind.LINEAR):
                lin = program.module.get_submodule(node.target)
                lin.weight.data.mul_(self.options.factor)
            return PassResult()

    return ScaleWeights


def test_a_pass_breaking_its_exact_contract_raises_contract_error(program):
    _register_broken_exact_pass()
    try:
        with pytest.raises(ContractError, match="test-scale-weights.*promises exact"):
            slimfx.run_pipeline(program, "test-scale-weights{factor=3}")
        out = slimfx.run_pipeline(program, "test-scale-weights{factor=1}")
        assert out.pipeline_text() == "test-scale-weights{factor=1}"
    finally:
        unregister_pass("test-scale-weights")


def test_function_passes_and_bounded_contracts():
    @dataclass
    class NoiseOptions:
        amount: float = 1e-3

    @register_pass(name="test-add-noise", contract="bounded", options=NoiseOptions)
    def add_noise(program, options):
        """Adds a constant to the linear bias and states the bound."""
        for node in program.nodes_of(slimfx.OpKind.LINEAR):
            program.module.get_submodule(node.target).bias.data.add_(options.amount)
        return PassResult(bound=options.amount)

    try:
        program = slimfx.trace(nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4))
        out = slimfx.run_pipeline(program, "test-add-noise{amount=0.01}")
        assert out.log[-1].bound == pytest.approx(0.01)
        assert "test-add-noise" in [cls.name for cls in slimfx.list_passes()]
    finally:
        unregister_pass("test-add-noise")


def test_bad_pass_registrations_are_refused():
    with pytest.raises(PipelineError, match="kebab-case"):
        @register_pass
        class Bad(Pass):
            """Doc."""

            name = "Bad_Name"

    with pytest.raises(PipelineError, match="already registered"):
        @register_pass
        class Clash(Pass):
            """Doc."""

            name = "dce"


def test_analyses_are_cached_and_invalidated_unless_preserved(program):
    calls, seen = [], []

    @register_analysis("test-node-count")
    def node_count(p):
        calls.append(1)
        return len(p.graph.nodes)

    @register_pass
    class Probe(Pass):
        """Records whether the analysis is cached, then computes it (for tests)."""

        name = "test-probe"
        contract = Contract.EXACT
        preserves = frozenset({"meta", "test-node-count"})

        def run(self, program):
            seen.append("test-node-count" in program.analyses)
            get_analysis(program, "test-node-count")
            return PassResult(changed=False)

    try:
        assert get_analysis(program, "test-node-count") == get_analysis(program, "test-node-count")
        assert len(calls) == 1
        seen.clear()
        slimfx.run_pipeline(program, "test-probe,verify,test-probe,dce,test-probe")
        # cached after the first probe; verify preserves everything; dce preserves only meta
        assert seen == [False, True, False]
    finally:
        unregister_pass("test-probe")
    with pytest.raises(PassError, match="unknown analysis"):
        get_analysis(program, "no-such-analysis")


def test_pass_crash_is_wrapped_with_pass_name(program):
    @register_pass
    class Crashes(Pass):
        """Raises deep inside (for tests)."""

        name = "test-crashes"
        contract = Contract.CHANGES

        def run(self, program):
            raise IndexError("deep")

    try:
        with pytest.raises(PassError, match="pass 'test-crashes' failed: IndexError: deep"):
            slimfx.run_pipeline(program, "test-crashes")
    finally:
        unregister_pass("test-crashes")


def test_pipeline_from_pass_objects_round_trips_to_text(program):
    from slimfx.passes.cleanup.fold_bn import FoldBatchNorm

    out = slimfx.run_pipeline(program, [FoldBatchNorm(strict=False), "dce"])
    assert out.pipeline_text() == "fold-bn{strict=false},dce"


def test_pass_objects_with_list_options_round_trip_to_text():
    from slimfx.passes.prune.magnitude import PruneMagnitude

    p = PruneMagnitude(sparsity=0.25, ignore=["head.*", "stem"])
    assert p.text() == "prune-magnitude{sparsity=0.25,ignore=[head.*,stem]}"
    again = slimfx.Pipeline.parse(p.text()).passes()[0]
    assert again.options.ignore == ["head.*", "stem"]


def test_a_pass_that_breaks_the_program_is_blamed_even_when_it_claims_to_keep_the_metadata(program):
    @register_pass
    class BreaksShapes(Pass):
        """Swaps in a weight of the wrong width and claims the shapes are unchanged (for tests)."""

        name = "test-breaks-shapes"
        contract = Contract.CHANGES
        preserves = frozenset({"meta"})

        def run(self, program):
            linear = next(m for m in program.module.modules() if isinstance(m, nn.Linear))
            linear.weight = nn.Parameter(torch.randn(linear.out_features, linear.in_features + 3))

    try:
        with pytest.raises(PassError, match="pass 'test-breaks-shapes' left a program that no longer runs"):
            slimfx.run_pipeline(program, "test-breaks-shapes", check_numerics=False)
    finally:
        unregister_pass("test-breaks-shapes")
