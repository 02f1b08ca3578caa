"""Mode switches on torch.export's modules, whose .train()/.eval() raise NotImplementedError."""

import torch

import slimfx
from slimfx.ir.modes import eval_mode, set_training
from slimfx.zoo import get_model


def test_set_training_and_eval_mode_work_on_exported_modules():
    model, x = get_model("digits-mlp")
    program = slimfx.trace(model, x, frontend="export")
    module = program.module
    set_training(module, True)
    assert all(m.training for m in module.modules())
    with eval_mode(module):
        assert not any(m.training for m in module.modules())
    assert all(m.training for m in module.modules())
    set_training(module, False)
    assert not any(m.training for m in module.modules())


def test_compress_calibrates_an_exported_program_in_place():
    model, x = get_model("digits-mlp")
    # compress rewrites its private traced program in place: calibrate must not call the refused .eval()
    result = slimfx.compress(model, "quant-insert,calibrate{progress=false}", x, calib_data=[x],
                             frontend="export")
    assert result.program.dialect == "aten"
    torch.testing.assert_close(result(*x), model(*x), rtol=0.1, atol=0.1)
