"""Artifacts that leave slimfx: ONNX QDQ export (:func:`export_qdq`)."""

from slimfx.export.onnx_qdq import QDQExport, QDQExportError, export_qdq

__all__ = ["QDQExport", "QDQExportError", "export_qdq"]
