"""What fused kernels exist, which passes they serve and which TensorRT plugin carries them.

Plain data, importable without triton or torch, so `attnrewrite kernels` can list them anywhere.
"""

from __future__ import annotations

import dataclasses

#: the custom ONNX domain of plugin nodes, and the TensorRT plugin namespace they register under
PLUGIN_DOMAIN = "attnrewrite.trt"
PLUGIN_NAMESPACE = "attnrewrite"
PLUGIN_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    name: str
    plugin: str  # TensorRT plugin / ONNX op_type (never an ONNX operator name)
    passes: tuple[str, ...]
    semantics: str
    formats: str


KERNELS = (
    KernelInfo("window_attention", "WindowAttention", ("window", "block"),
               "Swin W-MSA / SW-MSA (cut-point shift), partial last window masked, prefix tokens global",
               "fp16, bf16, fp32 I/O; fp32 accumulation"),
    KernelInfo("neighborhood_attention", "NeighborhoodAttention", ("neighborhood",),
               "NATTEN clamp semantics, dilation (DiNA), 2-D grids and 1-D sequences, prefix tokens global",
               "fp16, bf16, fp32 I/O; fp32 accumulation"),
    KernelInfo("block_sparse_prepare", "BlockSparseAttention", ("paro",),
               "lays Q/K/V out in each head's PARO order, quantised once (Q/K per token, V per channel per block)",
               "int8 Q/K (±127, or ±7: the INT4 range in int8 containers), int8 V; optional K smoothing"),
    KernelInfo("block_sparse_attention", "BlockSparseAttention", ("paro",),
               "PARO tables: kept key blocks per query block, global tokens dense, online softmax",
               "int8 or float Q·Kᵀ, int8 (P̃ at 1/127) or float P·V; fp16, bf16, fp32 I/O"),
)

#: stated where it is listed: no native INT4 dot in Triton 3.9 for sm_80/sm_90
INT4_NOTE = ("INT4 Q·Kᵀ runs as ±7 values in int8 containers: Triton 3.9 has no int4 tl.dot for sm_80/sm_90, "
             "so it has INT4's accuracy and int8's speed")


def by_plugin() -> dict[str, tuple[KernelInfo, ...]]:
    out: dict[str, tuple[KernelInfo, ...]] = {}
    for k in KERNELS:
        out[k.plugin] = out.get(k.plugin, ()) + (k,)
    return out
