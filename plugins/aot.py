"""Ahead-of-time compilation of the kernels to PTX: the payload a TensorRT plugin ships.

`triton.compile` needs no GPU: given the argument types, the compile-time constants (head dim, tile
sizes, integer formats) and a `GPUTarget`, it emits PTX (and a cubin) for that architecture. These
are exactly what TensorRT's `aot_impl` returns for a plugin (ALGORITHMS.md §8), and `kernels ptx`
writes them with a JSON manifest (kernel symbol, launch warps, shared memory, argument order).

Runs in a process where triton compiles (TRITON_INTERPRET unset): see `loader.py`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from attnrewrite.errors import InputError
from attnrewrite.plugins.launch import LOG2E, head_block

ARCHES = {"sm_80": 80, "sm_90": 90}
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
#: pointer arguments whose type does not follow the I/O dtype
_FIXED_POINTERS = {"order_ptr": "*i32", "blocks_ptr": "*i32", "global_ptr": "*i32", "k_mean_ptr": "*fp32",
                   "q_scale_ptr": "*fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled specialisation: a kernel, an I/O dtype and its compile-time constants."""

    kernel: str
    dtype: str
    constants: tuple[tuple[str, int | bool | float], ...]
    num_warps: int = 4

    @property
    def name(self) -> str:
        consts = "_".join(f"{k.lower()}{int(v)}" for k, v in self.constants if k not in ("BLOCK_D", "QK_SCALE"))
        return f"{self.kernel}_{self.dtype}_{consts}"


def variants(head_dim: int = 64, dtypes=tuple(DTYPES)) -> list[Variant]:
    """The payload set: each family's default tiles, plus the integer block-sparse formats."""
    bd = head_block(head_dim)
    out = []
    for dtype in dtypes:
        common = (("D", head_dim),)
        out.append(Variant("window_attention", dtype, common + (("BLOCK_M", 64), ("BLOCK_N", 64), ("BLOCK_D", bd))))
        for ty, tx in ((8, 8), (1, 64)):  # 2-D grids, 1-D sequences
            out.append(Variant("neighborhood_attention", dtype,
                               common + (("TY", ty), ("TX", tx), ("BLOCK_N", 64), ("BLOCK_D", bd))))
        # the TensorRT entry points compile the scale in; a plugin compiles its own at engine build
        trt = common + (("QK_SCALE", head_dim ** -0.5 * LOG2E),)
        out.append(Variant("window_attention_trt", dtype, trt + (("BLOCK_M", 64), ("BLOCK_N", 64), ("BLOCK_D", bd))))
        out.append(Variant("neighborhood_attention_trt", dtype,
                           trt + (("TY", 8), ("TX", 8), ("BLOCK_N", 64), ("BLOCK_D", bd))))
        for levels, pv_int8, smooth in ((127, True, True), (127, False, False), (7, False, True), (0, False, False)):
            formats = (("QK_LEVELS", levels), ("PV_INT8", pv_int8))
            out.append(Variant("block_sparse_prepare", dtype, common + (("BLOCK", 64), ("BLOCK_D", bd)) + formats
                               + (("HAS_K_MEAN", smooth),)))
            attention = Variant("block_sparse_attention", dtype,
                                common + (("BLOCK", 64), ("BLOCK_D", bd)) + formats + (("PADDED", False),))
            if attention not in out:  # smoothing changes only the prepare kernel
                out.append(attention)
    return out


def signature(fn, dtype: str, constants: dict) -> dict[str, str]:
    """Triton's argument types: attention tensors in `dtype`, the prepared layout int8 where quantised,
    tables int32, scales float32, sizes i32."""
    io = "*" + DTYPES[dtype]
    prepared = {"qp_ptr": "*i8" if constants.get("QK_LEVELS") else io, "kp_ptr": "*i8" if constants.get("QK_LEVELS") else io,
                "vp_ptr": "*i8" if constants.get("PV_INT8") else io}
    sig = {}
    for name in fn.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name in _FIXED_POINTERS or name in prepared:
            sig[name] = _FIXED_POINTERS.get(name) or prepared[name]
        elif name.endswith("_ptr"):
            sig[name] = io
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_variant(variant: Variant, arch: str) -> dict:
    """PTX for one variant and architecture, plus what a launcher needs to know about it."""
    if arch not in ARCHES:
        raise InputError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHES)}.")
    return compile_kernel(variant.kernel, variant.dtype, dict(variant.constants), ARCHES[arch], variant.num_warps)


def compile_kernel(kernel: str, dtype: str, constants: dict, capability: int | None = None, num_warps: int = 4) -> dict:
    """`triton.compile` of one kernel; `capability=None` targets the GPU of this machine (engine builds)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnrewrite.plugins.loader import interpreting, kernels

    if interpreting():
        raise InputError("ahead-of-time compilation needs compiled triton; unset TRITON_INTERPRET.")
    fn = getattr(kernels(), kernel)
    source = ASTSource(fn, signature(fn, dtype, constants), constexprs=constants)
    target = GPUTarget("cuda", capability, 32) if capability is not None else None
    compiled = triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": 2})
    meta = compiled.metadata
    return {"ptx": compiled.asm["ptx"], "symbol": meta.name, "num_warps": meta.num_warps,
            "shared_bytes": meta.shared, "arguments": [a for a in fn.arg_names if a not in constants]}


def write_payloads(arch: str, out_dir: Path, selected: list[Variant], progress=None) -> list[dict]:
    """Each variant's PTX as `<variant>.<arch>.ptx` plus `manifest.<arch>.json` describing them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    for variant in selected:
        payload = compile_variant(variant, arch)
        path = out_dir / f"{variant.name}.{arch}.ptx"
        path.write_text(payload.pop("ptx"))
        manifest.append({"variant": variant.name, "kernel": variant.kernel, "dtype": variant.dtype, "arch": arch,
                         "constants": dict(variant.constants), "file": path.name, **payload})
        if progress:
            progress()
    (out_dir / f"manifest.{arch}.json").write_text(json.dumps(manifest, indent=1))
    return manifest
