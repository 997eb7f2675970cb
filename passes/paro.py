"""`paro` (lossy): token-reordered block-sparse attention, optionally on integers (PAROAttention).

Per head, the grid tokens are put in an order where attention is block-shaped (row-major `hw`,
column-major `wh`, `tile:T` tiles; for F×H×W video the 6 axis orders), the blocked sequence is cut
into blocks of `block` tokens, and every query block attends to the same number of key blocks, the
ones that carried the most attention mass on calibration (its diagonal block always). Prefix and
suffix tokens (CLS, registers, YOLOS detection tokens; on text the first `global_tokens`) stay in place
and global: their rows attend to everything and every query attends to them (ALGORITHMS.md §0, §7).

PARO's own order metric is not published in a form we could verify (§10); here a head takes the order
that keeps the most calibration attention mass at the requested density, the quantity the block mask
is judged by. Identity wins ties, so at density 1.0 nothing is reordered.

Emission: one static Gather per operand lays out each query block with its kept key tokens (global
ones first) as dense batched MatMuls `[B, h, blocks, block, keys]`, and one Gather puts the outputs
back in token order. `bits=8|4` quantises exactly as `quant` does with per-token Q/K scales
(dynamic, computed before the gathers); `bits=16` is float, sparsity only.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from attnrewrite.passes import quantize as Qz
from attnrewrite.passes.ops import const, float_type, key_row
from attnrewrite.passes.quant import bool_param, opset_reason, product_format
from attnrewrite.passes.spatial.common import GLOBAL_TOKENS
from attnrewrite.registry import BasePass, Param, Plan, positive_int
from attnrewrite.site import AttentionSite

AXIS_ORDERS_3D = tuple("".join(p) for p in itertools.permutations("fhw"))
#: what a masked (padding) key slot adds to its logit; finite so no row can turn into NaN
MASKED = -1e30


def order_param(text: str) -> str:
    if text in ("auto", "none", "hw", "wh") or text in AXIS_ORDERS_3D:
        return text
    kind, _, size = text.partition(":")
    if kind == "tile" and size.isdigit() and int(size) > 0:
        return f"tile:{int(size)}"
    raise ValueError("expected auto, none, hw, wh, tile:T or an order of f, h, w (e.g. hwf)")


def density_param(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError("density must be in (0, 1]")
    return value


def bits_param(text: str) -> int:
    value = int(text)
    if value not in (4, 8, 16):
        raise ValueError("bits must be 4, 8 or 16 (16: float, sparsity only)")
    return value


# --- token orders and block tables (numpy) ---------------------------------------------------


def grid_order(name: str, grid: tuple[int, ...]) -> np.ndarray:
    """perm with perm[p] = the grid token (row-major index) placed at position p."""
    coords = np.indices(grid).reshape(len(grid), -1)
    if name in ("none", "hw", "fhw"):
        return np.arange(coords.shape[1])
    if len(grid) == 2 and name == "wh":
        return np.lexsort((coords[0], coords[1]))
    if len(grid) == 2 and name.startswith("tile:"):
        size = int(name[5:])
        r, c = coords
        return np.lexsort((c % size, r % size, c // size, r // size))
    if len(grid) == 3 and name in AXIS_ORDERS_3D:
        axis = {"f": 0, "h": 1, "w": 2}
        return np.lexsort(tuple(coords[axis[a]] for a in reversed(name)))
    raise ValueError(f"order {name} does not fit a {len(grid)}-D grid")


def candidate_orders(reorder: str, grid: tuple[int, ...] | None, block: int) -> tuple[tuple[str, ...], str | None]:
    """The orders `fit` may choose from, and a note when the request had to fall back to `none`."""
    if reorder == "none":
        return ("none",), None
    if grid is None:
        return ("none",), f"reorder={reorder} needs a token grid and none was traced: tokens keep their order"
    if reorder != "auto":
        try:
            grid_order(reorder, grid)
        except ValueError as exc:
            return ("none",), f"{exc}: tokens keep their order"
        return (reorder,), None
    if len(grid) == 3:
        return AXIS_ORDERS_3D, None
    tile = math.isqrt(block)
    tiles = (f"tile:{tile}",) if 1 < tile < min(grid) else ()
    return ("hw", "wh", *tiles), None


@dataclasses.dataclass(frozen=True)
class Frame:
    """Which tokens are global (attend to and are attended by all) and which are blocked; the grid
    tokens are `blocked[grid_start : grid_start + prod(grid)]`, the only ones an order moves."""

    tokens: int
    global_idx: tuple[int, ...]
    blocked: tuple[int, ...]
    grid: tuple[int, ...] | None
    grid_start: int

    def order(self, name: str) -> np.ndarray:
        """Positions → tokens of the blocked sequence under an order (the rest stay in place)."""
        blocked = np.asarray(self.blocked)
        if self.grid is None or name == "none":
            return blocked
        size = int(np.prod(self.grid))
        out = blocked.copy()
        out[self.grid_start:self.grid_start + size] = blocked[self.grid_start:self.grid_start + size][grid_order(name, self.grid)]
        return out


def select_blocks(mass: np.ndarray, kept: int, keep_diag: bool) -> np.ndarray:
    """Per query block the `kept` key blocks with the most mass (diagonal first when kept), sorted."""
    nb = mass.shape[0]
    scores = mass.astype(np.float64).copy()
    if keep_diag:
        scores[np.arange(nb), np.arange(nb)] = np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :kept]
    return np.sort(top, axis=1)


def attention_maps(q: np.ndarray, k: np.ndarray, bias: np.ndarray | None, scale: float):
    """Yield (head, [N, N] softmax) for every calibration sample and head, one map at a time."""
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            logits = (q[b, h].astype(np.float32) * np.float32(scale)) @ k[b, h].astype(np.float32).T
            if bias is not None:
                logits = logits + np.broadcast_to(bias, (q.shape[0], q.shape[1], *logits.shape))[b, h]
            p = np.exp(logits - logits.max(axis=-1, keepdims=True))
            yield h, p / p.sum(axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Tables:
    """Per head: the chosen order, the kept key blocks of each query block, and what they keep."""

    orders: tuple[str, ...]
    blocks: np.ndarray  # [h, nb, kept]
    mass_kept: tuple[float, ...]  # calibration attention mass inside the kept keys, per head
    block: int


def fit_tables(q, k, bias, *, scale: float, frame: Frame, candidates: tuple[str, ...], block: int, kept: int,
               keep_diag: bool) -> Tables:
    """Choose each head's order and block mask from calibration attention (mean over samples)."""
    heads, nblocked = q.shape[1], len(frame.blocked)
    nb = math.ceil(nblocked / block)
    blocked = np.asarray(frame.blocked)
    onehots = {name: _block_membership(frame, name, block) for name in candidates}
    mass = np.zeros((heads, len(candidates), nb, nb))
    global_mass = np.zeros(heads)
    rows = np.zeros(heads)
    for h, attn in attention_maps(q, k, bias, scale):
        sub = attn[np.ix_(blocked, blocked)]
        for i, name in enumerate(candidates):
            mass[h, i] += onehots[name].T @ sub @ onehots[name]
        global_mass[h] += attn[np.ix_(blocked, list(frame.global_idx))].sum() if frame.global_idx else 0.0
        rows[h] += nblocked
    orders, tables, kept_mass = [], [], []
    for h in range(heads):
        best, best_sel, best_mass = 0, None, -1.0
        for i in range(len(candidates)):
            sel = select_blocks(mass[h, i], kept, keep_diag)
            got = float(np.take_along_axis(mass[h, i], sel, axis=1).sum())
            if got > best_mass + 1e-5 * rows[h]:  # ties (to float32 rounding) keep the earlier, identity-first order
                best, best_sel, best_mass = i, sel, got
        orders.append(candidates[best])
        tables.append(best_sel)
        kept_mass.append((best_mass + global_mass[h]) / rows[h])
    return Tables(tuple(orders), np.stack(tables), tuple(kept_mass), block)


def _block_membership(frame: Frame, order: str, block: int) -> np.ndarray:
    """H[token, block] = 1 where a blocked token sits under `order`, so Hᵀ·A·H sums attention per block pair."""
    blocked = np.asarray(frame.blocked)
    position = np.empty(len(blocked), np.int64)
    position[np.searchsorted(blocked, frame.order(order))] = np.arange(len(blocked))
    membership = np.zeros((len(blocked), math.ceil(len(blocked) / block)), np.float32)
    membership[np.arange(len(blocked)), position // block] = 1.0
    return membership


def keep_mask(frame: Frame, tables: Tables) -> np.ndarray:
    """bool [h, N, N] in the original token order: which keys each query attends to."""
    heads, n, block = tables.blocks.shape[0], frame.tokens, tables.block
    mask = np.zeros((heads, n, n), bool)
    g = list(frame.global_idx)
    mask[:, g, :] = True
    mask[:, :, g] = True
    for h in range(heads):
        order = frame.order(tables.orders[h])
        for qb, kbs in enumerate(tables.blocks[h]):
            queries = order[qb * block:(qb + 1) * block]
            keys = np.concatenate([order[kb * block:(kb + 1) * block] for kb in kbs])
            mask[h, np.ix_(queries, keys)[0], np.ix_(queries, keys)[1]] = True
    return mask


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static Gather indices into `[B, h·N, d]` (and back) that realise the tables."""

    q_idx: np.ndarray  # [h, nb, block]
    k_idx: np.ndarray  # [h, nb, Ng + kept·block]
    out_idx: np.ndarray  # [h, N] into [B, h·(Ng + nb·block), dv]
    pad: np.ndarray | None  # [1, h, nb, 1, keys] additive mask of padding key slots, or None


def gather_layout(frame: Frame, tables: Tables) -> Layout:
    heads, nb, kept = tables.blocks.shape
    n, block, glob = frame.tokens, tables.block, np.asarray(frame.global_idx, np.int64)
    padded = nb * block
    q_idx = np.zeros((heads, nb, block), np.int64)
    k_idx = np.zeros((heads, nb, len(glob) + kept * block), np.int64)
    pad = np.zeros((1, heads, nb, 1, k_idx.shape[2]), np.float32)
    out_idx = np.zeros((heads, n), np.int64)
    for h in range(heads):
        order = frame.order(tables.orders[h])
        slots = np.full(padded, order[0], np.int64)
        slots[:len(order)] = order
        valid = np.arange(padded) < len(order)
        q_idx[h] = (h * n + slots).reshape(nb, block)
        for qb, kbs in enumerate(tables.blocks[h]):
            pos = (kbs[:, None] * block + np.arange(block)).reshape(-1)
            k_idx[h, qb] = h * n + np.concatenate([glob, slots[pos]])
            pad[0, h, qb, 0, len(glob):] = np.where(valid[pos], 0.0, MASKED)
        stride = len(glob) + padded
        out_idx[h, glob] = h * stride + np.arange(len(glob))
        out_idx[h, order] = h * stride + len(glob) + np.arange(len(order))
    return Layout(q_idx, k_idx, out_idx, pad if pad.any() else None)


# --- the pass ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParoPlan(Plan):
    frame: Frame | None = None
    block: int = 64
    kept: int = 1
    candidates: tuple[str, ...] = ("none",)
    tables: Tables | None = None
    notes: tuple[str, ...] = ()

    def summary(self) -> dict:
        bits = self.options["bits"]
        precision = "float" if bits == 16 else (
            f"int{bits}{'' if bits == 8 else ' (simulated in float on ORT CPU)'}, Q/K per token (dynamic), "
            "V per channel, P per row")
        out: dict = {"blocks": f"{self.kept} of {math.ceil(len(self.frame.blocked) / self.block)} key blocks of "
                               f"{self.block} tokens per query block; {len(self.frame.global_idx)} global tokens",
                     "bits": precision}
        if self.tables is not None:
            n = self.frame.tokens
            mask = keep_mask(self.frame, self.tables)
            out["order per head"] = list(self.tables.orders)
            out["density kept per head"] = [round(float(m.sum()) / (n * n), 4) for m in mask]
            out["calibration mass kept per head"] = [round(x, 4) for x in self.tables.mass_kept]
        for note in self.notes:
            out.setdefault("notes", []).append(note)
        return out


class ParoPass(BasePass):
    name = "paro"
    exact = False
    description = ("token-reordered block-sparse attention (PAROAttention): per-head order and static block mask "
                   "from calibration; bits=8|4 quantise the kept blocks (4 simulated on ORT CPU), 16 is float")
    params = (
        Param("density", density_param, 0.25, "fraction of key blocks each query block keeps"),
        Param("block", positive_int, 64, "tokens per block (clamped to the blocked sequence length)"),
        Param("bits", bits_param, 8, "8: ORT integer kernels; 4: simulated; 16: float (sparsity only)"),
        Param("reorder", order_param, "auto", "auto: per head the best of hw, wh, tile (2-D) or the 6 axis orders "
              "(3-D); none, hw, wh, tile:T or an order of f,h,w force one"),
        Param("keep", str, "diag", "diag: every query block keeps its own block", choices=("diag", "none")),
        Param("prefix", str, "global", "global: prefix/suffix tokens keep full rows and columns; blocked: they "
              "join the blocked sequence", choices=("global", "blocked")),
        GLOBAL_TOKENS,
        Param("smooth_k", bool_param, True, "bits 8|4: subtract K's token mean before quantising (exact)",
              show=lambda b: str(b).lower()),
    )

    def applies(self, site: AttentionSite, options: dict) -> str | ParoPlan:
        if float_type(site.q) != np.float32:
            return f"paro is built for float32 sites (this one computes in {np.dtype(float_type(site.q)).name})"
        if site.kind != "self" or site.q_len is None or site.q_len != site.kv_len:
            return "paro needs self-attention with a static token count (its block tables are per token)"
        if site.window is not None:
            return "the site already attends inside windows"
        if site.num_heads is None or site.head_dim is None:
            return "paro needs static heads and head dim"
        if site.q.shape is None or len(site.q.shape) != 4 or site.q.shape[1] != site.num_heads:
            return "paro's per-head tables need Q as [B, heads, N, d] (this export folds the heads into the batch axis)"
        if options["bits"] != 16 and (reason := opset_reason(site)):
            return reason
        if site.bias is not None and not site.bias_per_key:
            return f"{site.bias_kind} bias varies per query (relative positions, masks); paro gathers key-padding biases only"
        if site.bias is not None and site.bias.shape is None:
            return "the key-padding bias has no known rank"
        frame = _frame(site, options)
        notes = []
        block = options["block"]
        if block > len(frame.blocked):
            notes.append(f"block={block} is longer than the {len(frame.blocked)} blocked tokens: clamped to {len(frame.blocked)}")
            block = len(frame.blocked)
        nb = math.ceil(len(frame.blocked) / block)
        kept = min(nb, max(1, round(options["density"] * nb)))
        candidates, note = candidate_orders(options["reorder"], frame.grid, block)
        if note:
            notes.append(note)
        return ParoPlan(options, needs_fit=True, needs_calibration=True, frame=frame, block=block, kept=kept,
                        candidates=candidates, notes=tuple(notes))

    def fit(self, site: AttentionSite, acts: dict[str, np.ndarray], plan: ParoPlan) -> ParoPlan:
        bias = acts.get("bias")
        tables = fit_tables(acts["q"], acts["k"], bias, scale=site.scale, frame=plan.frame, candidates=plan.candidates,
                            block=plan.block, kept=plan.kept, keep_diag=plan.options["keep"] == "diag")
        return dataclasses.replace(plan, tables=tables)

    def rewrite(self, graph: ir.Graph, site: AttentionSite, plan: ParoPlan) -> ir.Value:
        t = ir_tape.Tape(graph)
        cfg = quant_config(plan.options)
        layout = gather_layout(plan.frame, plan.tables)
        h, d = site.num_heads, site.head_dim
        dv = site.v.shape[3] if site.v.shape is not None and isinstance(site.v.shape[3], int) else d
        ops = Qz.emit_operands(t, graph, site.q, site.k, site.v, cfg, (site.q_len, site.kv_len))

        def gather(x: ir.Value, width: int, index: np.ndarray) -> ir.Value:
            flat = t.op("Reshape", [x, const(t, [0, -1, width])])  # [B, h·N, width]
            return t.op("Gather", [flat, const(t, index)], attributes={"axis": 1})

        def attend(q_index: np.ndarray, k_index: np.ndarray | None, rank: int, extra: list[ir.Value]) -> ir.Value:
            """softmax over the gathered (or all, when `k_index` is None) keys of the gathered queries."""
            qg, qs = gather(ops.q, d, q_index), (gather(ops.q_scale, 1, q_index) if ops.q_scale is not None else None)
            if k_index is None:
                kg, ks, vg, vs = ops.k, ops.k_scale, ops.v, ops.v_scale
            else:
                kg, vg = gather(ops.k, d, k_index), gather(ops.v, dv, k_index)
                ks = gather(ops.k_scale, 1, k_index) if ops.k_scale is not None else None
                vs = t.op("Unsqueeze", [ops.v_scale, const(t, [2])]) if ops.v_scale is not None else None
            logits = Qz.emit_logits(t, qg, kg, qs, ks, site.scale, cfg.qk, rank)
            for term in extra:
                logits = t.op("Add", [logits, term])
            return Qz.emit_pv(t, graph, t.op("Softmax", [logits], attributes={"axis": -1}), vg, vs, cfg.pv)

        extra = []
        if site.bias is not None:
            extra.append(self._gathered_bias(t, site, layout.k_idx % plan.frame.tokens))
        if layout.pad is not None:
            extra.append(const(t, layout.pad, np.float32))
        nb, block = layout.q_idx.shape[1:]
        blocked = t.op("Reshape", [attend(layout.q_idx, layout.k_idx, 5, extra), const(t, [0, 0, nb * block, dv])])
        glob = plan.frame.global_idx
        if glob:
            g_idx = np.arange(h)[:, None] * plan.frame.tokens + np.asarray(glob)[None]
            row_bias = [_bias_4d(t, key_row(t, site.bias))] if site.bias is not None else []
            blocked = t.op("Concat", [attend(g_idx, None, 4, row_bias), blocked], attributes={"axis": 2})
        out = gather(blocked, dv, layout.out_idx)
        return t.op("Add", [out, ops.v_mean]) if ops.v_mean is not None else out

    @staticmethod
    def _gathered_bias(t: ir_tape.Tape, site: AttentionSite, tokens: np.ndarray) -> ir.Value:
        """The key-padding bias of each gathered key slot: `[B', h, nb, 1, keys]`.

        The row is broadcast to every head first (exports often leave the bias's head axis symbolic)."""
        heads, n = site.num_heads, site.kv_len
        row = t.op("Expand", [_bias_4d(t, key_row(t, site.bias)), const(t, [1, heads, 1, 1])])  # [B', h, 1, N]
        flat = t.op("Reshape", [row, const(t, [0, heads * n])])
        index = tokens + (np.arange(heads) * n)[:, None, None]
        return t.op("Unsqueeze", [t.op("Gather", [flat, const(t, index)], attributes={"axis": 1}), const(t, [3])])


def _bias_4d(t: ir_tape.Tape, bias: ir.Value) -> ir.Value:
    rank = len(bias.shape) if bias.shape is not None else 4
    return t.op("Unsqueeze", [bias, const(t, list(range(4 - rank)))]) if rank < 4 else bias


def _frame(site: AttentionSite, options: dict) -> Frame:
    """Global and blocked tokens: prefix/suffix of a traced grid, or the first `global_tokens` of text."""
    n = site.q_len
    grid = tuple(site.grid) if site.grid else None
    prefix, suffix = (site.prefix_tokens or 0, site.suffix_tokens or 0) if grid else (options["global_tokens"], 0)
    if grid is not None and prefix + int(np.prod(grid)) + suffix != n:
        grid, prefix, suffix = None, options["global_tokens"], 0
    prefix = min(prefix, n - 1)
    edge = tuple(range(prefix)) + tuple(range(n - suffix, n))
    if options["prefix"] == "blocked":
        return Frame(n, (), tuple(range(n)), grid, prefix)
    return Frame(n, edge, tuple(range(prefix, n - suffix)), grid, 0)


def quant_config(options: dict) -> Qz.QuantConfig:
    """paro's quantisation: `quant` with per-token Q/K scales at `bits` (none at 16)."""
    bits = options["bits"]
    fmt = None if bits == 16 else product_format("int", bits)
    return Qz.QuantConfig(qk=fmt, pv=fmt, smooth_k=options["smooth_k"] and fmt is not None, smooth_v=False,
                          granularity="token")


PARO = ParoPass()
