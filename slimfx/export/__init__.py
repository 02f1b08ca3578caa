"""Artifacts that leave slimfx: saved models that reload bit-for-bit (:func:`save`, :func:`load`) and
ONNX QDQ export (:func:`export_qdq`)."""

from slimfx.export.artifact import load, save
from slimfx.export.onnx_qdq import QDQExport, QDQExportError, export_qdq

__all__ = ["QDQExport", "QDQExportError", "export_qdq", "load", "save"]
