"""PARO's block tables in the form the block-sparse kernel reads, built from a plan or a plugin node.

numpy only: the ONNX side (`onnx_nodes`) writes these tables as node attributes, and the kernel
launchers (torch, TensorRT) read them back, so both directions live here.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class BlockTables:
    """PARO's tables as the block-sparse kernels read them (int32, `-1` = padding slot).

    Positions are each head's order of the blocked tokens (`blocks` count them in blocks), then the
    global tokens in their own trailing blocks, so one prepared layout holds every key a query sees."""

    order: np.ndarray  # [h, (nb + ngb)·block]: position → token
    blocks: np.ndarray  # [h, nb, kept]: kept key blocks per query block
    global_idx: np.ndarray  # [G]: tokens every query attends to, and that attend to every key
    block: int

    @property
    def global_blocks(self) -> int:
        return cdiv(len(self.global_idx), self.block)

    @classmethod
    def from_paro(cls, frame, tables) -> "BlockTables":
        heads, nb, _ = tables.blocks.shape
        glob = np.asarray(frame.global_idx, np.int32)
        order = np.full((heads, (nb + cdiv(len(glob), tables.block)) * tables.block), -1, np.int32)
        for h in range(heads):
            tokens = frame.order(tables.orders[h])
            order[h, :len(tokens)] = tokens
            order[h, nb * tables.block:nb * tables.block + len(glob)] = glob
        return cls(order, tables.blocks.astype(np.int32), glob, tables.block)

    @classmethod
    def from_fields(cls, fields: dict, heads: int, tokens: int) -> "BlockTables":
        """Read back the tables a `BlockSparseAttention` node carries (see `onnx_nodes._block_sparse`)."""
        block, kept = int(fields["block"]), int(fields["kept"])
        order = np.asarray(fields["order"], np.int32).reshape(heads, -1)
        blocks = np.asarray(fields["blocks"], np.int32).reshape(heads, -1, kept)
        prefix, suffix = int(fields["global_prefix"]), int(fields["global_suffix"])
        glob = np.concatenate([np.arange(prefix), np.arange(tokens - suffix, tokens)]).astype(np.int32)
        return cls(order, blocks, glob, block)
