"""Saved size of a lowered int8 model: the int8 weights take about a quarter of the fp32 bytes on disk."""

import copy

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import slimfx
import slimfx.passes.quant.insert  # noqa: F401  (registers the passes)
import slimfx.passes.quant.lower  # noqa: F401
from slimfx.kernels import Int8Linear
from slimfx.passes.quant.calibrate import set_calibration_data


class Tower(nn.Module):
    def __init__(self, width=256, depth=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def test_saved_int8_weights_are_a_quarter_of_fp32_plus_scales(tmp_path):
    torch.manual_seed(0)
    model = Tower().eval()
    x = torch.randn(8, 256)
    program = set_calibration_data(slimfx.trace(model, (x,)), [torch.randn(8, 256) for _ in range(4)])
    lowered = slimfx.run_pipeline(program, "quant-insert,calibrate{progress=false},lower-int8")
    assert sum(isinstance(m, Int8Linear) for m in lowered.module.modules()) == 4

    fp32_path, int8_path = tmp_path / "fp32.safetensors", tmp_path / "int8.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fp32_path))
    state = lowered.module.state_dict()
    assert not any(v.dtype == torch.float32 and v.dim() == 2 for v in state.values())  # no float weight left
    save_file({k: v.contiguous() for k, v in state.items()}, str(int8_path))

    fp32_bytes, int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
    # 4 x (256*256 int8 + 256 fp32 scales + 256 fp32 bias + act qparams) over 4 x (256*256 + 256) fp32,
    # ~0.257, plus each file's JSON header.
    assert 0.24 <= int8_bytes / fp32_bytes <= 0.30, (int8_bytes, fp32_bytes)

    reloaded = copy.deepcopy(lowered.module)
    for buffer in reloaded.buffers():
        buffer.zero_()
    reloaded.load_state_dict(load_file(str(int8_path)))
    assert torch.equal(reloaded(x), lowered.module(x))
