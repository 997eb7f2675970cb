"""The torch front-end: the same passes on an `nn.Module`, trainable, exported equal to the ONNX path.

    from attnrewrite import torch as art
    sites = art.inspect(module, example_inputs)
    new, report = art.rewrite(module, example_inputs, passes=["window:size=4x4"], calib=batches)
    art.export(new, example_inputs, "out.onnx")

The module is traced with `torch.export` (aten level), so `scaled_dot_product_attention` and
hand-written `softmax(q @ kᵀ · s) @ v` are found alike; each site is described by the same `SiteInfo`
as on ONNX, planned and fitted by the same passes, and replaced by a small module (`modules.py`) built
from the same reference math. The original module is never modified.
"""

from attnrewrite.torch.api import export, inspect, rewrite, trace

__all__ = ["export", "inspect", "rewrite", "trace"]
