"""GPU check of the TensorRT entry points: `*_trt` kernels launched as the AOT plugin launches them
(contiguous tensors, int32 scalars, compiled-in scale) against the torch launchers, fp16, 4096 tokens.

    python benchmarks/gpu_trt_entries.py [--json out.json]     # needs CUDA
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from attnrewrite.plugins.launch import run_plugin, run_trt_entry

    cases = [("WindowAttention", {"grid": (64, 64), "prefix": 1, "window": (8, 8), "shift": (4, 4), "scale": 0.125}),
             ("WindowAttention", {"grid": (1, 4096), "prefix": 1, "window": (1, 128), "shift": (0, 0), "scale": 0.125}),
             ("NeighborhoodAttention", {"grid": (64, 64), "prefix": 1, "kernel": (7, 7), "dilation": (2, 2), "scale": 0.125}),
             ("NeighborhoodAttention", {"grid": (1, 4096), "prefix": 1, "kernel": (1, 65), "dilation": (1, 1), "scale": 0.125})]
    rows = []
    for plugin, fields in cases:
        n = fields["prefix"] + fields["grid"][0] * fields["grid"][1]
        q, k, v = (torch.randn(2, 16, n, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        a = run_plugin(plugin, fields, q, k, v)
        b = run_trt_entry(plugin, fields, q, k, v)
        torch.cuda.synchronize()
        rows.append({"plugin": plugin, "fields": {k_: list(v_) if isinstance(v_, tuple) else v_ for k_, v_ in fields.items()},
                     "max_diff_trt_vs_torch_launch": float((a.float() - b.float()).abs().max())})
        print(rows[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
