"""TensorRT: register the kernels as Quickly Deployable Plugins, build an engine, run it.

NOT EXECUTED on this project's machines. TensorRT cannot be installed on them (its libraries package
fetches from a host outside the package registry, GPU machines included), so everything below the
`require_*` checks was written against TensorRT's documented `tensorrt.plugin` API (≥ 10.9 for
`aot_impl`; ALGORITHMS.md §8 and NVIDIA's quickly_deployable_plugins sample) and has never run. What
does run here: the graph TensorRT would parse (`onnx_nodes.strip_bodies`, checked structurally), the
launch geometry and argument order of the AOT entry points (`launch.run_trt_entry` under Triton's
interpreter, against each node's ONNX body), and the PTX compilation (`aot.compile_kernel`).

Window and neighbourhood nodes use `aot_impl` (one kernel, PTX compiled at engine build for this
GPU with the node's scale compiled in; the engine runs without Python). Block-sparse nodes are two
kernels (prepare, attend), which one `aot_impl` cannot express, so they use the JIT `impl` through
torch: an engine holding them needs Python, torch and this package at run time.
"""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np

from attnrewrite.errors import AttnRewriteError, InputError
from attnrewrite.plugins.catalog import PLUGIN_NAMESPACE
from attnrewrite.plugins.onnx_nodes import FIELDS

NOT_INSTALLED = ("TensorRT is not installed (pip install 'attnrewrite[trt]'); "
                 "the ONNX written by --target tensorrt is ready for trtexec")


def require_tensorrt():
    try:
        import tensorrt
        import tensorrt.plugin  # noqa: F401  (QDP: TensorRT >= 10.6; aot_impl >= 10.9)
    except ImportError:
        raise InputError(NOT_INSTALLED) from None
    return tensorrt


def require_gpu() -> None:
    try:
        import torch
    except ImportError:
        raise InputError("building a TensorRT engine here needs torch with CUDA to run the kernels and compare "
                         "(pip install 'attnrewrite[gpu]').") from None
    if not torch.cuda.is_available():
        raise InputError("no CUDA GPU is visible on this machine; TensorRT builds an engine on the GPU it will run on.")


# --- plugin registration (QDP) -------------------------------------------------------------------

_REGISTERED = False


def register_plugins() -> None:
    """Declare the three plugins to TensorRT once per process (`attnrewrite::<plugin>`)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import tensorrt.plugin as trtp

    for plugin, fields in FIELDS.items():
        ident = f"{PLUGIN_NAMESPACE}::{plugin}"
        trtp.register(ident)(_described(plugin, fields, _shape_fn(), "desc"))
        trtp.autotune(ident)(_described(plugin, fields, _autotune_fn(), "autotune", outputs=True))
        trtp.impl(ident)(_described(plugin, fields, _jit_fn(plugin), "impl", outputs=True, stream=True))
        if plugin != "BlockSparseAttention":
            trtp.aot_impl(ident)(_described(plugin, fields, _aot_fn(plugin), "aot_impl", outputs=True, tactic=True))
    _REGISTERED = True


def _field_types(plugin: str) -> dict[str, type]:
    """QDP reads a plugin's attributes from the annotations: lists are int32 arrays, `scale` a float."""
    import numpy.typing as npt

    arrays = {"grid", "window", "shift", "kernel", "dilation", "order", "blocks"}
    return {f: (npt.NDArray[np.int32] if f in arrays else float if f == "scale" else int) for f in FIELDS[plugin]}


def _described(plugin, fields, body, role, *, outputs=False, stream=False, tactic=False):
    """A function with the exact signature QDP introspects: q, k, v, the fields, then the role's extras."""
    import inspect

    import tensorrt.plugin as trtp

    tensor = trtp.Tensor if role == "impl" else trtp.TensorDesc
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=tensor) for n in "qkv"]
    params += [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=t)
               for f, t in _field_types(plugin).items()]
    if outputs:
        params.append(inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        annotation=typing.Tuple[tensor]))
    if stream:
        params.append(inspect.Parameter("stream", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int))
    if tactic:
        params.append(inspect.Parameter("tactic", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int))

    returns = {"desc": tensor, "autotune": typing.List[trtp.AutoTuneCombination], "impl": None,
               "aot_impl": typing.Tuple[typing.Union[str, bytes], typing.Union[str, bytes], trtp.KernelLaunchParams,
                                        trtp.SymExprs]}[role]
    signature = inspect.Signature(params, return_annotation=returns)

    def bound(*args, **kwargs):
        return body(signature.bind(*args, **kwargs).arguments)

    bound.__signature__ = signature
    bound.__annotations__ = {**{p.name: p.annotation for p in params}, "return": returns}
    bound.__name__ = bound.__qualname__ = f"{plugin}_{role}"
    return bound


def _shape_fn():
    def desc(values):
        return values["q"].like()  # [B, h, N, d] in, the same out
    return desc


def _autotune_fn():
    import tensorrt.plugin as trtp

    def autotune(values):
        # q, k, v and the output share one float type (index-aligned alternatives)
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16")]
    return autotune


def _jit_fn(plugin: str):
    def impl(values):
        import torch

        from attnrewrite.plugins.launch import run_plugin

        fields = {f: values[f] for f in FIELDS[plugin]}
        with torch.cuda.stream(torch.cuda.ExternalStream(values["stream"])):
            q, k, v = (torch.as_tensor(values[n], device="cuda") for n in "qkv")
            torch.as_tensor(values["outputs"][0], device="cuda").copy_(run_plugin(plugin, fields, q, k, v))
    return impl


def _aot_fn(plugin: str):
    def aot_impl(values):
        import tensorrt as trt
        import tensorrt.plugin as trtp

        from attnrewrite.plugins.aot import compile_kernel
        from attnrewrite.plugins.launch import LOG2E, head_block, plugin_geometry

        q = values["q"]
        fields = {f: values[f] for f in FIELDS[plugin]}
        dims = q.shape_expr
        heads, tokens, head_dim = (dims[i].constant_value for i in (1, 2, 3))  # static by construction
        geometry = plugin_geometry(plugin, fields)
        dtype = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}[q.dtype]
        constants = {"QK_SCALE": float(fields["scale"]) * LOG2E, "D": head_dim, "BLOCK_D": head_block(head_dim),
                     **dict(geometry.constants)}
        compiled = compile_kernel(geometry.kernel + "_trt", dtype, constants)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = geometry.programs
        launch.grid_y = dims[0] * heads
        launch.block_x = compiled["num_warps"] * 32
        launch.shared_mem = compiled["shared_bytes"]
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(x) for x in (heads, tokens, *geometry.scalars)])
        return compiled["symbol"].encode(), compiled["ptx"].encode(), launch, extra
    return aot_impl


# --- engine build and run --------------------------------------------------------------------------


def build_engine(onnx_path: Path, *, fp16: bool, int8_batches: list[dict[str, np.ndarray]] | None,
                 shapes: dict[str, tuple[int, ...]]) -> bytes:
    """Parse the stripped graph (plugins resolved through the registry) and build a serialized engine."""
    trt = require_tensorrt()
    register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise AttnRewriteError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors[:400]}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8_batches is not None:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _calibrator(trt, int8_batches)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):
            if tensor.name not in shapes:
                raise InputError(f"input {tensor.name} has a dynamic shape {tuple(tensor.shape)}; give --shape "
                                 f"{tensor.name}=...")
            profile.set_shape(tensor.name, shapes[tensor.name], shapes[tensor.name], shapes[tensor.name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AttnRewriteError("TensorRT could not build the engine (see its log above).")
    return bytes(serialized)


def _calibrator(trt, batches):
    """INT8 entropy calibration on the calibration inputs (for the layers TensorRT quantises itself)."""
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches, self.index, self.held = batches, 0, []

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            self.held = [torch.as_tensor(self.batches[self.index][n]).cuda() for n in names]
            self.index += 1
            return [int(t.data_ptr()) for t in self.held]

        def read_calibration_cache(self):
            return None

        def write_calibration_cache(self, cache):
            return None

    return Calibrator()


def run_engine(serialized: bytes, batches: list[dict[str, np.ndarray]], output_names: list[str]) -> dict[str, np.ndarray]:
    """Every calibration batch through the engine; outputs concatenated along the batch axis like ORT's."""
    import torch

    trt = require_tensorrt()
    register_plugins()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    results: dict[str, list[np.ndarray]] = {n: [] for n in output_names}
    for feeds in batches:
        held = {}
        for name, array in feeds.items():
            held[name] = torch.as_tensor(np.ascontiguousarray(array)).cuda()
            context.set_input_shape(name, tuple(array.shape))
            context.set_tensor_address(name, held[name].data_ptr())
        for name in output_names:
            shape = tuple(context.get_tensor_shape(name))
            dtype = getattr(torch, str(np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name))
            held[name] = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, held[name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise AttnRewriteError("the TensorRT engine failed to run a calibration batch.")
        stream.synchronize()
        for name in output_names:
            results[name].append(held[name].float().cpu().numpy())
    return {n: np.concatenate(v) for n, v in results.items()}
