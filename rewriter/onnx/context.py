"""What surrounds an attention site: token grid, prefix tokens, windows, self/cross, rotary.

These facts decide which passes apply (a window pass needs a grid and knows to keep CLS global), so
they are traced from the graph's meaning rather than from node names: the patch embedding is a Conv
whose stride equals its kernel, Swin-style windows are a rank-6 Reshape `[B, H/w, w, W/w, w, C]`,
self-attention is Q and K projected from the same token stream.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import onnx_ir as ir

from attnrewrite.ir.graph import dims, is_constant
from attnrewrite.layout import heads_folded
from attnrewrite.onnx.softmax_fusion import reduced_axes

#: Ops that move or project tokens without mixing them with other token streams.
_PROJECTION_OPS = {
    "Reshape", "Transpose", "Mul", "Div", "Add", "Sub", "MatMul", "Gemm", "Gather", "Split", "Slice",
    "Squeeze", "Unsqueeze", "Cast", "Identity", "Concat", "Neg", "Expand", "Einsum", "Tile",
}
#: Per-element maths: applied to one token at a time, whatever the layout (L2-normalised Q and K
#: in Swin V2 and cosine attention, RMSNorm chains).
_ELEMENTWISE_OPS = {
    "Sqrt", "Pow", "Reciprocal", "Clip", "Max", "Min", "Abs", "Exp", "Sigmoid", "Tanh", "Erf", "Relu",
    "QuantizeLinear", "DequantizeLinear",  # QDQ models' fake quantisation
}
#: Normalisations over the trailing (feature) axis: per-token, like q/k-norm in DiT, SD3 and EVA.
_NORMALIZATIONS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}
#: onnxruntime's fused residual + LayerNorm: both data inputs are token-aligned, always the last axis.
_SKIP_NORMALIZATIONS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}
#: Reductions that stay inside one token when they reduce only the last (feature) axis.
_FEATURE_REDUCTIONS = {"ReduceL2", "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceMax", "LpNormalization"}
#: For these, only the first input carries data (the rest are shapes, indices, axes, exponents).
_DATA_INPUT_ONLY = {
    "Reshape", "Expand", "Slice", "Gather", "Unsqueeze", "Squeeze", "Tile", "Split", "Pow", "Clip",
    "QuantizeLinear", "DequantizeLinear", *_FEATURE_REDUCTIONS, *_NORMALIZATIONS,
}
_CONST = object()
#: Most prefix tokens we accept (CLS + distillation + registers are at most a handful).
MAX_PREFIX_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a site's surroundings say about it: self/cross, rotary, token grid, windows, instances."""

    kind: str
    rotary: bool
    window: tuple[int, ...] | None
    grid: tuple[int, ...] | None
    prefix_tokens: int | None
    suffix_tokens: int
    instances: int
    notes: tuple[str, ...]
    #: the tokens were made by a convolution (image, video or feature map): their order is spatial
    vision: bool = False


def describe(reading, model: ir.Model, const_memo: dict, token_memo: dict | None = None) -> Geometry:
    """The geometry of a freshly read site (`reading` has q, k, q_len, kv_len, num_heads, output_layout).

    `token_memo` is shared by all sites of one detection: token streams run through every layer, so
    without it each site would walk the whole residual stream again (quadratic in depth)."""
    sources: dict = {} if token_memo is None else token_memo
    src_q = token_source(reading.q, sources, const_memo)
    src_k = token_source(reading.k, sources, const_memo)
    same_len = reading.q_len is None or reading.kv_len is None or reading.q_len == reading.kv_len
    kind = "self" if src_q is src_k and src_q is not _CONST and same_len else "cross"
    tokens = reading.q_len if kind == "self" else reading.kv_len
    grid = window = prefix = None
    suffix, notes = 0, []
    partition = find_window_partition(reading.k)
    embedding = None
    if partition is not None:  # windows cut from an [B, H, W, C] map: spatial by construction
        (grid, window), prefix, vision = partition, 0, True
    elif reading.output_layout == "units":
        # Hiera: tokens are unrolled into mask units (a strided interleave, not row-major), so no conv's
        # grid describes their order, even where the counts agree (one unit over a small image)
        vision = True
        notes.append("tokens are unrolled into mask units: no row-major token grid")
    else:
        embedding = find_embedding(reading.k)
        vision = embedding is not None
        found = embedding.grid if embedding is not None else None
        if found is None and tokens:
            found = find_flattened_feature_map(reading.k, tokens)
            vision = vision or found is not None
        if found is not None and tokens is not None:
            found = _with_frames(found, embedding, reading, tokens)
            extra = tokens - math.prod(found)
            if 0 <= extra <= MAX_PREFIX_TOKENS:
                grid, prefix = found, extra
                if extra:
                    layout = find_token_layout(reading.k, math.prod(found))
                    if layout is not None and sum(layout) == extra and layout[1]:
                        prefix, suffix = layout
                        notes.append(f"{layout[1]} tokens follow the patch tokens (e.g. detection tokens)")
            else:
                notes.append(f"patch grid {'x'.join(map(str, found))} does not match {tokens} tokens")
        elif found is not None:
            grid = found
    return Geometry(kind=kind, rotary=has_rotary(reading.q, const_memo), window=window, grid=grid,
                    prefix_tokens=prefix, suffix_tokens=suffix, vision=vision,
                    instances=_instances(reading, grid, window), notes=tuple(notes))


def _with_frames(grid: tuple[int, ...], embedding: Embedding | None, reading, tokens: int) -> tuple[int, ...]:
    """A Conv2d applied to each frame (frames folded into its batch) makes an F×H×W token grid.

    F is the Conv's batch over the site's batch when both are static; otherwise the token Concat
    that joins the prefix tokens with F·H·W patch tokens says it."""
    if len(grid) != 2:
        return grid
    area = grid[0] * grid[1]
    frames = None
    q_batch = (dims(reading.q) or [None])[0]
    if embedding is not None and isinstance(embedding.batch, int) and isinstance(q_batch, int) and q_batch > 0 \
            and reading.output_layout == "bhnd" and embedding.batch % q_batch == 0:
        frames = embedding.batch // q_batch
    elif not 0 <= tokens - area <= MAX_PREFIX_TOKENS or tokens >= 2 * area:
        frames = _frames_from_token_concat(reading.k, area)
    if frames and frames > 1 and 0 <= tokens - frames * area <= MAX_PREFIX_TOKENS:
        return (frames, *grid)
    return grid


def _frames_from_token_concat(value: ir.Value, area: int, limit: int = 400) -> int | None:
    """F from the token Concat that joins the prefix tokens with F·H·W patch tokens."""
    for sizes in _token_concats(value, limit):
        multiples = [n // area for n in sizes if isinstance(n, int) and n > area and n % area == 0]
        if multiples:
            return multiples[0]
    return None


def _instances(reading, grid, window) -> int:
    """Independent attention problems per run: the batch (without folded heads), or windows per image."""
    batch = (dims(reading.q) or [None])[0]
    if isinstance(batch, int):
        heads = reading.num_heads
        folded = heads_folded(reading.output_layout) and heads
        return batch // heads if folded and batch % heads == 0 else batch
    if window and grid:
        return (grid[0] // window[0]) * (grid[1] // window[1])
    return 1


def token_source(value: ir.Value, memo: dict, const_memo: dict, depth: int = 0):
    """The value where this tensor's token stream was last mixed with another (or `_CONST`)."""
    if value in memo:
        return memo[value]
    if is_constant(value, memo.setdefault("__shape_memo__", {}), shapes_are_constant=True):
        memo[value] = _CONST
        return _CONST
    node = value.producer()
    if node is None or depth > 64 or not _keeps_tokens_apart(node):
        memo[value] = value
        return value
    inputs = node.inputs[:1] if node.op_type in _DATA_INPUT_ONLY else node.inputs
    found = {
        id(s): s
        for s in (token_source(i, memo, const_memo, depth + 1) for i in inputs if i is not None)
        if s is not _CONST
    }
    # nothing dynamic came through the data inputs, yet the value is not constant: the tokens start
    # here (an embedding Gather of token ids, whose table is the "data" input)
    result = value if not found else next(iter(found.values())) if len(found) == 1 else value
    memo[value] = result
    return result


def _keeps_tokens_apart(node: ir.Node) -> bool:
    """Does `node` leave each token's data unmixed with other tokens' (so the stream passes through)?"""
    if node.op_type in _PROJECTION_OPS or node.op_type in _ELEMENTWISE_OPS or node.op_type in _SKIP_NORMALIZATIONS:
        return True
    if node.op_type not in _FEATURE_REDUCTIONS and node.op_type not in _NORMALIZATIONS:
        return False
    rank = len(node.inputs[0].shape) if node.inputs[0] is not None and node.inputs[0].shape is not None else None
    if node.op_type in _NORMALIZATIONS or node.op_type == "LpNormalization":
        # LayerNorm-style ops normalise axes [axis, rank): per token only when axis is the last
        axes = [node.attributes["axis"].value if "axis" in node.attributes else -1]
    else:
        axes = reduced_axes(node)
    return rank is not None and axes is not None and len(axes) == 1 and axes[0] in (-1, rank - 1)


def has_rotary(q: ir.Value, const_memo: dict, limit: int = 64) -> bool:
    """Q built as `x·cos + rotate(x)·sin` with position tables: Add of two Muls by token-shaped constants."""
    seen, queue = set(), collections.deque([q])
    while queue and len(seen) < limit:
        value = queue.popleft()
        node = value.producer()
        if node is None or id(node) in seen or node.op_type not in _PROJECTION_OPS:
            continue
        seen.add(id(node))
        if node.op_type in ("Add", "Sub") and all(_is_position_product(i, const_memo) for i in node.inputs):
            return True
        if node.op_type in ("MatMul", "Gemm") and any(is_constant(i, const_memo) for i in node.inputs):
            continue  # reached the projection: rotary is applied after it, never before
        queue.extend(i for i in node.inputs if i is not None and not is_constant(i, const_memo))
    return False


def _is_position_product(value: ir.Value | None, const_memo: dict) -> bool:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Mul":
        return False
    for operand in node.inputs:
        if is_constant(operand, const_memo):
            shape = dims(operand)
            if shape is not None and len(shape) >= 2 and sum(1 for d in shape if d not in (1, None)) >= 2:
                return True
    return False


def find_window_partition(value: ir.Value, limit: int = 80) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(grid, window) from the nearest rank-6 window-partition Reshape above `value`, if any."""
    for node in _ancestors(value, limit, stop_at_softmax=True):
        if node.op_type != "Reshape":
            continue
        out = dims(node.outputs[0])
        src = dims(node.inputs[0])
        if out is None or src is None or len(out) != 6 or None in out[1:]:
            continue
        _, nh, wh, nw, ww, _c = out
        h, w = nh * wh, nw * ww
        if not _partition_order(node.outputs[0]):
            continue  # e.g. Hiera's unroll, which interleaves strides rather than cutting windows
        if (len(src) == 4 and src[1:3] == [h, w]) or (len(src) == 3 and src[1] == h * w):
            if (nh, nw) != (1, 1) or (wh, ww) == (h, w):
                return (h, w), (wh, ww)
    return None


def _partition_order(value: ir.Value) -> bool:
    """A window partition `[B, H/w, w, W/w, w, C]` is followed by the window-major permutation
    (0, 1, 3, 2, 4, 5), or by nothing that reorders it."""
    for node in value.consumers():
        if node.op_type == "Transpose":
            perm = list(node.attributes["perm"].value) if "perm" in node.attributes else None
            if perm != [0, 1, 3, 2, 4, 5]:
                return False
    return True


@dataclasses.dataclass(frozen=True)
class Embedding:
    """The convolution nearest above a site's tokens: `grid` is set for a patch embedding (stride ==
    kernel > 1): (H, W) from a Conv2d, (F, H, W) from a Conv3d tubelet embedding. `batch` is the
    Conv's static batch (frames folded into it when a Conv2d embeds each frame)."""

    grid: tuple[int, ...] | None
    batch: int | None


def find_embedding(value: ir.Value, limit: int = 50_000) -> Embedding | None:
    """The nearest patch embedding above `value`, else the nearest convolution over two or more
    spatial axes (tokens made from a feature map: their order is spatial even when no grid can be
    read), else None.

    A 1-D convolution (Whisper's and wav2vec2's audio front ends, a Conv1d positional embedding) is
    not a feature map: its one axis is the token axis, so its tokens are a sequence, in order."""
    other = None
    for node in _ancestors(value, limit, stop_at_softmax=False):
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        out = dims(node.outputs[0])
        batch = out[0] if out else None
        if node.op_type == "Conv" and _is_patchify(node) and out is not None and len(out) in (4, 5) \
                and None not in out[2:]:
            return Embedding(tuple(out[2:]), batch)
        if _spatial_rank(node) != 1:
            other = other or Embedding(None, batch)
    return other


def _spatial_rank(node: ir.Node) -> int | None:
    """Spatial axes of a convolution, from its output or weight rank (None when neither is known)."""
    for value in (node.outputs[0], node.inputs[1] if len(node.inputs) > 1 else None):
        shape = dims(value) if value is not None else None
        if shape is not None:
            return len(shape) - 2
    return None


def _is_patchify(node: ir.Node) -> bool:
    """A patch embedding: stride = kernel (ViT), or overlapping patches, every stride ≥ 2 and at most
    its kernel (AST's 16×16 patches at stride 10, PVT-v2's and SegFormer's 7×7 at stride 4). Either
    way the tokens are its output pixels in row-major order."""
    kernel = list(node.attributes["kernel_shape"].value) if "kernel_shape" in node.attributes else None
    strides = list(node.attributes["strides"].value) if "strides" in node.attributes else None
    if kernel is None:
        wdims = dims(node.inputs[1])
        kernel = wdims[2:] if wdims else None
    if not kernel or strides is None or len(strides) != len(kernel):
        return False
    if strides == kernel:
        return max(kernel) >= 2
    return all(2 <= s <= k for s, k in zip(strides, kernel))


def find_patch_grid(value: ir.Value, limit: int = 50_000) -> tuple[int, ...] | None:
    """Grid of the nearest patch embedding above `value` (see `_is_patchify`)."""
    found = find_embedding(value, limit)
    return found.grid if found is not None else None


def find_token_layout(value: ir.Value, grid_tokens: int, limit: int = 400) -> tuple[int, int] | None:
    """(tokens before, tokens after) the patch tokens, from the nearest token-axis Concat that joins
    them with learned tokens: `cat(cls, patches, det)` in YOLOS puts 5 tokens after the grid, while
    DeiT and DINOv2 put theirs in front. None when no such Concat is found (extra tokens are then
    taken to be in front, the common layout)."""
    for sizes in _token_concats(value, limit):
        if None in sizes or grid_tokens not in sizes:
            continue
        at = sizes.index(grid_tokens)
        return sum(sizes[:at]), sum(sizes[at + 1:])
    return None


def _token_concats(value: ir.Value, limit: int):
    """Token counts of the inputs of each `[B, N, C]` Concat along the token axis above `value`,
    nearest first (None for a count that is not static)."""
    for node in _ancestors(value, limit, stop_at_softmax=True):
        if node.op_type != "Concat" or len(node.inputs) < 2:
            continue
        out = dims(node.outputs[0])
        if out is None or len(out) != 3:
            continue
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        if axis % 3 != 1:
            continue
        yield [(dims(i) or [None] * 3)[1] if i is not None else None for i in node.inputs]


def find_flattened_feature_map(value: ir.Value, tokens: int, limit: int = 60) -> tuple[int, int] | None:
    """(H, W) of the nearest conv feature map flattened into the `tokens` tokens above `value`, for
    token streams with no patch embedding: diffusion UNets' spatial transformers (`x.view(B, C, H·W)`
    or `x.permute(0, 2, 3, 1).reshape(B, H·W, C)`), ConvNet-plus-attention hybrids.

    A head merge `[B, N, h, d] → [B, N, h·d]` has the same shapes as an NCHW flatten, so the
    flattened tensor must come from convolution or normalisation of a feature map, not from attention.
    """
    for node in _ancestors(value, limit, stop_at_softmax=True):
        if node.op_type != "Reshape":
            continue
        src, out = dims(node.inputs[0]), dims(node.outputs[0])
        if src is None or out is None or len(src) != 4 or len(out) != 3:
            continue
        nchw, nhwc = (src[2], src[3]), (src[1], src[2])
        if None not in nchw and out[:2] == [src[0], src[1]] and out[2] == nchw[0] * nchw[1] == tokens:
            grid = nchw
        elif None not in nhwc and out[0] == src[0] and out[1] == nhwc[0] * nhwc[1] == tokens and out[2] == src[3]:
            grid = nhwc
        else:
            continue
        if _from_feature_map(node.inputs[0]):
            return grid
    return None


#: Ops that make a feature map, and the per-pixel ops allowed between them and the flatten.
_FEATURE_MAP_OPS = {"Conv", "ConvTranspose", "InstanceNormalization", "GroupNormalization", "BatchNormalization",
                    "Resize"}
_PER_PIXEL_OPS = {"Transpose", "Reshape", "Add", "Mul", "Sub", "Div", "Sigmoid", "Relu", "Identity", "Cast"}


def _from_feature_map(value: ir.Value, depth: int = 8) -> bool:
    node = value.producer()
    for _ in range(depth):
        if node is None:
            return False
        if node.op_type in _FEATURE_MAP_OPS:
            return True
        if node.op_type not in _PER_PIXEL_OPS:
            return False
        dynamic = [i for i in node.inputs if i is not None and i.producer() is not None and i.const_value is None]
        if not dynamic:
            return False
        node = dynamic[0].producer()
    return False


def _ancestors(value: ir.Value, limit: int, *, stop_at_softmax: bool):
    """Producer nodes above `value`, nearest first (breadth-first), at most `limit` of them."""
    seen: set[int] = set()
    queue = collections.deque([value])
    while queue and len(seen) < limit:
        node = queue.popleft().producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if stop_at_softmax and (node.op_type == "Softmax" or _applies_weights(node)):
            continue
        queue.extend(i for i in node.inputs if i is not None and i.producer() is not None)


def _applies_weights(node: ir.Node) -> bool:
    """Is `node` another attention's `weights · V` product? Walks that look for a site's own
    structure (its window partition, its head split) must not leave through it into the layer
    before: ViTDet's global layers would otherwise inherit the window of the windowed layer above."""
    if node.op_type not in ("MatMul", "Einsum"):
        return False
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        while producer is not None and producer.op_type in ("Cast", "Identity", "Dropout"):
            producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        if producer is not None and producer.op_type == "Softmax":
            return True
    return False


def heads_from_reshape(q: ir.Value, head_dim: int | None, limit: int = 12) -> int | None:
    """For `[B·h, N, d]` layouts: h = E / d from the Reshape that split the embedding E into heads."""
    if head_dim is None:
        return None
    ancestors = list(_ancestors(q, limit, stop_at_softmax=True))
    tokens = (dims(q) or [None, None])[1]
    for node in ancestors:  # the fold itself: `[B, h, N, d] → [B·h, N, d]` names h outright
        src, out = dims(node.inputs[0]) if node.op_type == "Reshape" else None, dims(node.outputs[0])
        if src and out and len(src) == 4 and len(out) == 3 and src[-1] == out[-1] == head_dim \
                and src[2] == out[1] == tokens and isinstance(src[1], int) and src[1] > 0:
            return src[1]
    for node in ancestors:
        if node.op_type != "Reshape":
            continue
        src, out = dims(node.inputs[0]), dims(node.outputs[0])
        if not (src and out and out[-1] == head_dim and src[-1] and src[-1] % head_dim == 0 and src[-1] > head_dim):
            continue
        heads = out[-2] if len(out) >= 2 else None
        if heads == 3 and len(out) >= 3 and isinstance(out[-3], int) and out[-3] * 3 * head_dim == src[-1]:
            return out[-3]  # BLOOM packs per head: `[.., 3·E] → [.., h, 3, d]`
        if isinstance(heads, int) and heads > 0 and src[-1] % (heads * head_dim) == 0:
            return heads  # `[.., E] → [.., h, d]`, or a packed `[.., 3·E] → [.., 3, h, d]`
        return src[-1] // head_dim
    return None


__all__ = ["Geometry", "describe", "heads_from_reshape"]
