"""Attention sites in a `torch.export` graph: `aten.scaled_dot_product_attention` and the hand-written
`softmax(scale · q @ kᵀ + bias) @ v` (matmuls or einsums), described by the ONNX front-end's `SiteInfo`.

Q/K/V are [B, heads, tokens, dim], or [B·heads, tokens, dim] as `nn.MultiheadAttention` computes them
when it returns its weights (`need_weights=True`, the default): such a site is seen as one head per
batch entry (`folded_heads`), which every pass handles as is; what a pass fits per head (linear maps,
the hybrid's γ) is then shared by the folded heads.

Shapes come from the fake tensors `torch.export` leaves in `node.meta["val"]`. The token grid comes
from the patch embedding: a conv whose stride equals its kernel (ViT, DeiT, DINOv2); the tokens in
front of the grid (CLS, registers) are the prefix.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from attnrewrite.site import SiteInfo

aten = torch.ops.aten
SDPA = {aten.scaled_dot_product_attention.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
TRANSPOSE = {aten.transpose.int}
PASS_THROUGH = {aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.to.dtype, aten._to_copy.default}
#: users that only check a value (transformers' `softmax(..., dtype=float32)` leaves one)
CHECKS = {aten._assert_tensor_metadata.default}


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """What a pass reads off a site's Q/K/V/bias: a name and a static shape."""

    name: str
    shape: tuple[int | None, ...]
    dtype = None  # float32: the torch front-end traces float modules


@dataclasses.dataclass(frozen=True)
class TorchSite:
    """A `SiteInfo` plus the fx nodes that carry it (the torch counterpart of `AttentionSite`)."""

    id: str
    info: SiteInfo
    q_node: torch.fx.Node
    k_node: torch.fx.Node
    v_node: torch.fx.Node
    bias_node: torch.fx.Node | None
    output_node: torch.fx.Node
    #: Q/K/V are [B·heads, tokens, dim] (heads folded into the batch); passes see [B·heads, 1, tokens, dim]
    folded_heads: bool = False
    #: the bias is a boolean mask (True: attend), as transformers' SDPA path passes; variants get it additive
    bool_mask: bool = False
    anchor = None
    verified = True

    def __getattr__(self, name: str):
        if name in {f.name for f in dataclasses.fields(SiteInfo)}:
            return getattr(self.info, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def layer(self) -> int:
        return int(self.id.rsplit("_", 1)[-1])

    def _ref(self, node):
        if node is None:
            return None
        shape = tuple(_shape(node))
        return TensorRef(node.name, shape[:1] + (1,) + shape[1:] if self.folded_heads and len(shape) == 3 else shape)

    @property
    def q(self) -> TensorRef:
        return self._ref(self.q_node)

    @property
    def k(self) -> TensorRef:
        return self._ref(self.k_node)

    @property
    def v(self) -> TensorRef:
        return self._ref(self.v_node)

    @property
    def bias(self) -> TensorRef | None:
        return self._ref(self.bias_node)

    def with_info(self, **changes) -> TorchSite:
        return dataclasses.replace(self, info=dataclasses.replace(self.info, **changes))

    def to_json(self) -> dict:
        return {"id": self.id, **{f.name: getattr(self.info, f.name) for f in dataclasses.fields(SiteInfo)},
                "output": self.output_node.name}


def _shape(node) -> tuple[int | None, ...]:
    """Static dims as ints, symbolic ones (the batch axis) as None."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if val is None or not hasattr(val, "shape"):
        return ()
    return tuple(int(d) if isinstance(d, int) or (hasattr(d, "node") and d.node.is_constant()) else None
                 for d in val.shape)


def detect(gm: torch.fx.GraphModule) -> tuple[list[TorchSite], list[tuple[str, str]]]:
    """(sites in execution order, [(node, why it is not a site)])."""
    grid = patch_grid(gm)
    sites, rejected = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA:
            found = _from_sdpa(node)
        elif node.target in SOFTMAX:
            found = _from_softmax(node)
        else:
            continue
        if isinstance(found, str):
            rejected.append((node.name, found))
            continue
        q, k, v, bias, scale, output, op = found
        shapes = [_shape(x) for x in (q, k, v)]
        folded = all(len(s) == 3 for s in shapes) and (bias is None or len(_shape(bias)) == 3)
        if folded:
            shapes = [s[:1] + (1,) + s[1:] for s in shapes]
        if any(len(s) != 4 for s in shapes):
            rejected.append((node.name, f"Q/K/V are not [B, heads, tokens, dim] or [B·heads, tokens, dim] "
                                        f"(shapes {shapes})"))
            continue
        (b, h, n, d), (_, _, nk, _), (_, _, _, dv) = shapes
        bias_shape = _shape(bias) if bias is not None else None
        if folded and bias_shape is not None:
            bias_shape = bias_shape[:1] + (1,) + bias_shape[1:]
        prefix, vision = None, grid is not None
        if grid is not None and n == nk and n >= grid[0] * grid[1]:
            prefix = n - grid[0] * grid[1]
        info = SiteInfo(op=op, num_heads=h, head_dim=d, q_len=n, kv_len=nk, scale=float(scale),
                        bias_kind="none" if bias is None else "input",
                        bias_per_key=bias is None or (len(bias_shape) >= 2 and bias_shape[-2] == 1),
                        kind="self" if n == nk else "cross", instances=1, window=None,
                        grid=grid if prefix is not None else None, prefix_tokens=prefix, suffix_tokens=0,
                        rotary=False, output_layout="bhnd", vision=vision and prefix is not None)
        sites.append(TorchSite(f"attn_{len(sites)}", info, q, k, v, bias, output, folded, _is_bool(bias)))
    return sites, rejected


def _is_bool(node) -> bool:
    return node is not None and getattr(node.meta.get("val"), "dtype", None) == torch.bool


def patch_grid(gm: torch.fx.GraphModule) -> tuple[int, int] | None:
    """(H, W) of the one patch embedding (a conv with stride = kernel), else None."""
    grids = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.conv2d.default, aten.convolution.default):
            weight = _shape(node.args[1])
            stride = node.args[3] if len(node.args) > 3 else [1, 1]
            stride = list(stride) * (2 // len(stride)) if isinstance(stride, (list, tuple)) else [stride, stride]
            if len(weight) == 4 and list(weight[2:]) == stride and max(stride) > 1:
                out = _shape(node)
                grids.append((out[2], out[3]))
    return grids[0] if len(grids) == 1 else None


def _from_sdpa(node):
    args = list(node.args) + [None] * 6
    q, k, v = args[:3]
    mask = node.kwargs.get("attn_mask", args[3])
    causal = node.kwargs.get("is_causal", args[5] or False)
    scale = node.kwargs.get("scale", None)
    if causal:
        return "causal attention (is_causal=True): the passes here are for bidirectional attention"
    if node.kwargs.get("enable_gqa"):
        return "grouped-query attention (enable_gqa)"
    d = _shape(q)[-1] if _shape(q) else 0
    scale = scale if scale is not None else 1 / math.sqrt(d)
    return q, k, v, mask, scale, node, "aten.scaled_dot_product_attention"


def _from_softmax(node):
    """softmax(scale·q@kᵀ [+ bias]) @ v, the scale a constant multiplier or divisor on either side."""
    if node.args[1] not in (-1, len(_shape(node)) - 1):
        return "softmax is not over the last axis"
    x, bias, scale = node.args[0], None, 1.0
    if x.op == "call_function" and x.target in (aten.add.Tensor,):
        a, b = x.args[:2]
        x, bias = (a, b) if _has_matmul(a) else (b, a)
    while x.op == "call_function" and x.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(x.args[1], (int, float)):
        scale = scale * x.args[1] if x.target == aten.mul.Tensor else scale / x.args[1]
        x = x.args[0]
    if x.op == "call_function" and x.target == aten.einsum.default:
        q, k = _einsum_operands(x, "qk")
        if q is None:
            return "the softmax input is an einsum, but not q·kᵀ over the last axis ('...id,...jd->...ij')"
    elif x.op == "call_function" and x.target in MATMUL:
        q, kt = x.args[:2]
        k = _untransposed(kt)
        if k is None:
            return "the key operand is not kᵀ (a transpose of the last two axes)"
    else:
        return "the softmax input is not scale · q @ kᵀ (+ bias)"
    while q.op == "call_function" and q.target in (aten.mul.Tensor,) and isinstance(q.args[1], (int, float)):
        scale, q = scale * q.args[1], q.args[0]
    weights, user = node, _single_user(node)
    while user is not None and user.op == "call_function" and user.target in PASS_THROUGH:
        weights, user = user, _single_user(user)
    if user is not None and user.op == "call_function" and user.target == aten.einsum.default:
        first, v = _einsum_operands(user, "pv")
        if first is weights:
            return q, k, v, bias, scale, user, "aten.softmax"
    if user is None or user.op != "call_function" or user.target not in MATMUL or user.args[0] is not weights:
        return "the attention weights are not multiplied by V exactly once"
    out = user
    return q, k, out.args[1], bias, scale, out, "aten.softmax"


def _einsum_operands(node, role: str):
    """The two operands of an einsum that is q·kᵀ (`...id,...jd->...ij`, role "qk") or P·V
    (`...ij,...jd->...id`, role "pv") with the same leading (batch, head) letters; (None, None) otherwise."""
    equation, operands = node.args[0], node.args[1]
    lhs, _, out = equation.replace(" ", "").partition("->")
    parts = lhs.split(",")
    if len(parts) != 2 or len(operands) != 2 or "." in equation or min(map(len, parts + [out])) < 3:
        return None, None
    (a, b), lead = parts, out[:-2]
    if a[:-2] != lead or b[:-2] != lead or len(set(a + b)) != len(lead) + 3:
        return None, None
    i, j = out[-2:]
    if role == "qk":
        ok = a[-2] == i and b[-2] == j and a[-1] == b[-1] and a[-1] not in out
    else:
        ok = a[-2:] == i + b[-2] and b[-1] == j and b[-2] not in out
    return tuple(operands) if ok else (None, None)


def _has_matmul(node) -> bool:
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        if node.target in MATMUL:
            return True
        if node.target not in (aten.mul.Tensor, aten.div.Tensor):
            return False
        node = node.args[0]
    return False


def _single_user(node):
    users = [u for u in node.users if not (u.op == "call_function" and u.target in CHECKS)]
    return users[0] if len(users) == 1 else None


def _untransposed(kt):
    """k for kᵀ written as transpose(k, -2, -1) (either order of axes) or permute(0, 1, 3, 2)."""
    if kt.op != "call_function":
        return None
    rank = len(_shape(kt))
    if kt.target in TRANSPOSE:
        axes = sorted(a % rank for a in kt.args[1:3])
        return kt.args[0] if axes == [rank - 2, rank - 1] else None
    if kt.target == aten.permute.default and list(kt.args[1]) == [0, 1, 3, 2]:
        return kt.args[0]
    return None

