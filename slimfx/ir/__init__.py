"""What a program IS: the Program, the op table, metadata, the verifier and the printer."""

from slimfx.ir.meta import TensorMeta
from slimfx.ir.ops import OpKind, kind
from slimfx.ir.program import LeafRecord, PassRecord, Program
from slimfx.ir.verify import verify

__all__ = ["LeafRecord", "OpKind", "PassRecord", "Program", "TensorMeta", "kind", "verify"]
