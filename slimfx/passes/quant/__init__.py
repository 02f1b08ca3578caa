"""Quantization passes: quant-insert (fake-quant nodes), calibrate, lower-int8, QAT (qat-prepare, qat-fold-bn,
qat-freeze), smooth-quant, quant-keep-float (sensitivity); observers and schemes."""

from slimfx.passes.quant import calibrate, fake_quant, insert, lower, observers, qat, sensitivity, smooth

__all__ = ["calibrate", "fake_quant", "insert", "lower", "observers", "qat", "sensitivity", "smooth"]
