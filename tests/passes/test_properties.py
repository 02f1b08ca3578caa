"""Property tests: every registered pass keeps its contract on random models (100 examples each).

A new pass registered in slimfx gets these tests with no extra code.
"""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfx
from slimfx.passes.base import registry
from slimfx.testing import check_contract
from slimfx.testing import strategies as sst

# Passes that need data the random models don't carry (calibration batches, teachers) opt out here
# and are property-tested in their own modules. distill needs labelled data and a teacher, and the random
# models' outputs are not class logits (tests/passes/distill/test_distill_pass.py).
NEEDS_EXTRA_INPUTS = {"calibrate", "distill"}
PASSES = sorted(name for name in registry() if name not in NEEDS_EXTRA_INPUTS and not name.startswith("test-"))


@pytest.mark.parametrize("pass_name", PASSES)
@settings(max_examples=100)
@given(pair=sst.programs_with_cases(frontend="any"))
def test_every_pass_keeps_its_contract_on_random_models(pass_name, pair):
    program, case = pair
    report = check_contract(pass_name, program, extra_inputs=[case.fresh_inputs(seed=1)])
    assert report.result.pipeline_text() == pass_name
    slimfx.verify(report.result)


@settings(max_examples=60)
@given(pair=sst.programs_with_cases(frontend="any"), pipeline=sst.registered_pipelines(PASSES))
def test_random_pipelines_keep_contracts_and_verify_after_every_pass(pair, pipeline):
    program, case = pair
    check_contract(pipeline, program, extra_inputs=[case.fresh_inputs(seed=2)])


@settings(max_examples=100)
@given(case=sst.models(), frontend=st.sampled_from(["fx", "export"]))
def test_both_frontends_match_the_eager_model_bit_exactly(case, frontend):
    program = slimfx.trace(case.module, case.example_inputs, frontend=frontend)
    # Eager nn.MultiheadAttention in eval takes a fused fast path that tracing cannot take; torch.export
    # decomposes it, so there (and only there) results agree to float rounding instead of bit-exactly.
    fused_mha = frontend == "export" and any(isinstance(m, nn.MultiheadAttention) for m in case.module.modules())
    with torch.no_grad():
        for inputs in (case.example_inputs, case.fresh_inputs(seed=3)):
            got, expected = program(*inputs), case.module(*inputs)
            if fused_mha:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(got, expected)
    slimfx.verify(program)
