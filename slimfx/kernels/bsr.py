"""The block-sparse row (BSR) weight layout used by the block-sparse linear kernels.

A weight ``W [N, K]`` is cut into ``(bh, bw)`` blocks. Row-block ``r`` (rows ``r*bh .. r*bh+bh-1``)
keeps its nonzero blocks ``values[crow[r]:crow[r+1]]`` whose block-column indices are
``col_indices[crow[r]:crow[r+1]]`` (ascending). This is torch's ``sparse_bsr`` layout with int32
indices, kept as a plain dataclass so kernels can read the raw arrays.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from slimfx.errors import KernelError


@dataclass(frozen=True)
class BSRWeight:
    """A block-sparse ``[N, K]`` weight.

    ``crow_indices`` int32 ``[N // bh + 1]``, ``col_indices`` int32 ``[nnz_blocks]``,
    ``values`` ``[nnz_blocks, bh, bw]`` in the float dtype of the source weight.
    """

    shape: tuple[int, int]
    block: tuple[int, int]
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        (N, K), (bh, bw) = self.shape, self.block
        if bh < 1 or bw < 1 or N % bh or K % bw:
            raise KernelError(f"BSRWeight: shape {self.shape} must be divisible by block {self.block}")
        if self.crow_indices.dtype != torch.int32 or self.crow_indices.shape != (N // bh + 1,):
            raise KernelError(f"BSRWeight: crow_indices must be int32 [{N // bh + 1}], got "
                              f"{tuple(self.crow_indices.shape)} {self.crow_indices.dtype}")
        nnz = self.col_indices.shape[0] if self.col_indices.dim() == 1 else -1
        if self.col_indices.dtype != torch.int32 or nnz < 0:
            raise KernelError(f"BSRWeight: col_indices must be 1-D int32, got "
                              f"{tuple(self.col_indices.shape)} {self.col_indices.dtype}")
        if self.values.shape != (nnz, bh, bw):
            raise KernelError(f"BSRWeight: values must be [nnz_blocks={nnz}, {bh}, {bw}], got "
                              f"{tuple(self.values.shape)}")

    @property
    def nnz_blocks(self) -> int:
        """Number of stored (nonzero) blocks."""
        return int(self.col_indices.shape[0])

    @property
    def density(self) -> float:
        """Fraction of the ``(N/bh) * (K/bw)`` blocks that are stored."""
        (N, K), (bh, bw) = self.shape, self.block
        return self.nnz_blocks / ((N // bh) * (K // bw))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: torch.device | str) -> BSRWeight:
        """The same weight with its arrays on ``device``."""
        return BSRWeight(self.shape, self.block, self.crow_indices.to(device), self.col_indices.to(device),
                         self.values.to(device))


def dense_to_bsr(w: torch.Tensor, block: tuple[int, int]) -> BSRWeight:
    """Convert a dense ``[N, K]`` weight to BSR, keeping every block that has any nonzero element.

    ``N`` must be divisible by ``block[0]`` and ``K`` by ``block[1]`` (else :class:`KernelError`).
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.dtype.is_floating_point:
        got = f"{tuple(w.shape)} {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise KernelError(f"dense_to_bsr: w must be a 2-D float tensor [N, K], got {got}")
    N, K = w.shape
    bh, bw = block
    if bh < 1 or bw < 1 or N % bh or K % bw:
        raise KernelError(f"dense_to_bsr: weight shape ({N}, {K}) is not divisible by block ({bh}, {bw}); "
                          f"pad the weight or choose a block that divides both dims")
    blocks = w.reshape(N // bh, bh, K // bw, bw).permute(0, 2, 1, 3)  # [R, C, bh, bw]
    keep = (blocks != 0).any(dim=3).any(dim=2)  # [R, C]
    crow = torch.zeros(N // bh + 1, dtype=torch.int32, device=w.device)
    crow[1:] = keep.sum(dim=1).cumsum(0)
    # nonzero() enumerates row-major, so column indices come out ascending within each row-block.
    col = keep.nonzero()[:, 1].to(torch.int32)
    values = blocks[keep].contiguous()
    return BSRWeight((N, K), (bh, bw), crow, col, values)


def bsr_to_dense(w: BSRWeight) -> torch.Tensor:
    """The dense ``[N, K]`` weight (zeros where no block is stored)."""
    (N, K), (bh, bw) = w.shape, w.block
    blocks = torch.zeros(N // bh, K // bw, bh, bw, dtype=w.values.dtype, device=w.values.device)
    counts = (w.crow_indices[1:] - w.crow_indices[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(N // bh, device=w.values.device), counts)
    blocks[rows, w.col_indices.long()] = w.values
    return blocks.permute(0, 2, 1, 3).reshape(N, K)


def to_torch_bsr(w: BSRWeight) -> torch.Tensor:
    """The weight as a ``torch.sparse_bsr`` tensor (for torch's own BSR matmul)."""
    # dense_to_bsr builds valid indices; torch's (opt-in) invariant check would cost a sync on GPU.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        return torch.sparse_bsr_tensor(w.crow_indices, w.col_indices, w.values, size=w.shape,
                                       dtype=w.values.dtype, device=w.values.device, check_invariants=False)


def to_torch_csr(w: BSRWeight) -> torch.Tensor:
    """The weight as a ``torch.sparse_csr`` tensor with int32 indices (zeros inside stored blocks dropped).

    int32 because that is MKL's (LP64) index type: torch converts int64 indices, ``to_sparse_csr``'s
    default, to int32 on every matmul call, a copy of all ``nnz`` column indices.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = bsr_to_dense(w).to_sparse_csr()
        if csr.values().numel() >= 2**31:
            return csr  # int32 cannot index it; torch keeps int64 and converts per call
        return torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                       csr.values(), size=w.shape, dtype=w.values.dtype,
                                       device=w.values.device, check_invariants=False)
