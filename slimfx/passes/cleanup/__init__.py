"""Cleanup passes, all with the exact contract: dce, canonicalize, fold-bn, verify."""

from slimfx.passes.cleanup import canonicalize, dce, fold_bn, verify_pass

__all__ = ["canonicalize", "dce", "fold_bn", "verify_pass"]
