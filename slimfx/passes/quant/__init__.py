"""Quantization passes: quant-insert (fake-quant nodes), calibrate, lower-int8; observers and schemes."""

from slimfx.passes.quant import calibrate, fake_quant, insert, lower, observers

__all__ = ["calibrate", "fake_quant", "insert", "lower", "observers"]
