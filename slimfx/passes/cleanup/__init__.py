"""Cleanup passes, all with the exact contract: dce, canonicalize, fold-bn, decompose-attention, verify."""

from slimfx.passes.cleanup import canonicalize, dce, decompose_attention, fold_bn, verify_pass

__all__ = ["canonicalize", "dce", "decompose_attention", "fold_bn", "verify_pass"]
