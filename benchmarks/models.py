"""Random-weight timm-style ViTs exported to ONNX at deployment sizes, for benchmarks.

    python benchmarks/models.py vit_l16_224            # -> bench-out/vit_l16_224.onnx (+ .onnx.data)
    python benchmarks/models.py vit_b16_1024 --rebuild
    python benchmarks/models.py --list

Why these: ViT-L/16 at 224 (~1.2 GB of fp32 weights in an external data file) is the model on which
`inspect` must stay cheap in memory; ViT-B/16 at 1024 px (64×64 grid + CLS = 4097 tokens) is the
shape where spatial passes pay off. The architecture is timm's VisionTransformer on its exportable
attention path (Conv patch embedding with stride = kernel, CLS token, learned position embedding,
pre-norm blocks, one packed qkv Linear, `q * scale @ kᵀ → softmax → @ v`), input `pixel_values` with a
dynamic batch, output `logits`.

Files are written atomically (a temporary folder beside the target, then `os.replace`) and stamped with
their build configuration in `metadata_props`, so a cached file is reused only when it was built with
the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

BENCH_OUT = Path(__file__).resolve().parents[1] / "bench-out"
CONFIG_KEY = "attnrewrite.validate.bench.config"

PRESETS: dict[str, dict] = {
    "vit_s16_224": dict(depth=12, dim=384, heads=6, img=224),
    "vit_l16_224": dict(depth=24, dim=1024, heads=16, img=224),
    "vit_b16_1024": dict(depth=12, dim=768, heads=12, img=1024),
    # transformers' ViTModel (eager attention), exported as users export it: not a graph we wrote
    "hf_vit_b16_1024": dict(depth=12, dim=768, heads=12, img=1024, arch="hf"),
    # the same at 512 px (32×32 grid + CLS = 1025 tokens): a quarter of the tokens, for searches that
    # run the model once per site and candidate
    "hf_vit_b16_512": dict(depth=12, dim=768, heads=12, img=512, arch="hf"),
}


class Attention(nn.Module):
    """timm `Attention` with `fused_attn=False`: the path timm takes when exporting."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's `VisionTransformer` reduced to what an exported classifier contains (CLS pooling)."""

    def __init__(self, *, depth: int, dim: int, heads: int, img: int, patch: int, mlp_ratio: int,
                 in_chans: int = 3, classes: int = 1000):
        super().__init__()
        grid = img // patch
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 1e-6)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, classes)

    def forward(self, pixel_values):
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def _parse_exporter(exporter: str) -> tuple[bool, int]:
    """'torchscript17' -> (dynamo=False, opset 17); 'dynamo18' -> (True, 18)."""
    m = re.fullmatch(r"(torchscript|dynamo)(\d+)", exporter)
    if not m:
        raise ValueError(f"{exporter=} must be torchscript<opset> or dynamo<opset>, e.g. torchscript17")
    return m.group(1) == "dynamo", int(m.group(2))


def build_vit(out_path: str | os.PathLike, *, depth: int, dim: int, heads: int, img: int, patch: int = 16,
              mlp_ratio: int = 4, exporter: str = "torchscript17", external_data: bool = True, seed: int = 0,
              arch: str = "timm") -> Path:
    """Export a random-weight ViT to `out_path`; weights go to `<file name>.data` beside it when `external_data`.

    Memory peaks inside the TorchScript exporter (torch weights + its folded copy + the serialised proto):
    about 4.3× the weights, 5.2 GB for ViT-L/16. The re-save with external data happens after the torch
    model is freed and costs 2× the weights.
    """
    if dim % heads:
        raise ValueError(f"{dim=} is not divisible by {heads=}")
    if img % patch:
        raise ValueError(f"{img=} is not divisible by {patch=}")
    dynamo, opset = _parse_exporter(exporter)
    config = dict(depth=depth, dim=dim, heads=heads, img=img, patch=patch, mlp_ratio=mlp_ratio, exporter=exporter,
                  external_data=external_data, seed=seed, arch=arch)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        raw = tmp / "export.onnx"
        _export(config, raw, dynamo, opset)
        proto = onnx.load(str(raw))  # loads the exporter's external data too, if it wrote any
        proto.metadata_props.add(key=CONFIG_KEY, value=json.dumps(config, sort_keys=True))
        data_name = out_path.name + ".data"
        staged = tmp / out_path.name
        onnx.save_model(proto, str(staged), save_as_external_data=external_data, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        del proto
        if external_data:
            os.replace(tmp / data_name, out_path.parent / data_name)
        else:
            (out_path.parent / data_name).unlink(missing_ok=True)
        os.replace(staged, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path


def _export(config: dict, path: Path, dynamo: bool, opset: int) -> None:
    torch.manual_seed(config["seed"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, still common
        model = _hf_vit(config) if config.get("arch") == "hf" else VisionTransformer(
            depth=config["depth"], dim=config["dim"], heads=config["heads"], img=config["img"], patch=config["patch"],
            mlp_ratio=config["mlp_ratio"]).eval()
        example = (torch.randn(1, 3, config["img"], config["img"]),)
        output = "last_hidden_state" if config.get("arch") == "hf" else "logits"
        if dynamo:
            program = torch.onnx.export(model, example, dynamo=True, opset_version=opset, input_names=["pixel_values"],
                                        output_names=[output], dynamic_shapes=({0: torch.export.Dim("batch")},))
            program.save(str(path), external_data=True)
        else:
            torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset,
                              input_names=["pixel_values"], output_names=[output],
                              dynamic_axes={"pixel_values": {0: "batch"}, output: {0: "batch"}})


class _LastHiddenState(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state


def _hf_vit(config: dict) -> nn.Module:
    """transformers' `ViTModel` with eager attention (random weights); output: the last hidden state."""
    import transformers

    cfg = transformers.ViTConfig(image_size=config["img"], patch_size=config["patch"], hidden_size=config["dim"],
                                 num_hidden_layers=config["depth"], num_attention_heads=config["heads"],
                                 intermediate_size=config["mlp_ratio"] * config["dim"])
    cfg._attn_implementation = "eager"
    return _LastHiddenState(transformers.ViTModel(cfg, add_pooling_layer=False)).eval()


class DiTBlock(nn.Module):
    """diffusers-style DiT block: adaLN from the conditioning, q/k LayerNorm per head, no CLS token."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, elementwise_affine=False), nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.LayerNorm(self.d), nn.LayerNorm(self.d)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim))
        self.ada = nn.Linear(dim, 4 * dim)

    def forward(self, x, c):
        shift1, scale1, shift2, scale2 = self.ada(c).unsqueeze(1).chunk(4, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        b, n, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        o = nn.functional.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, -1))
        return x + self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(nn.Module):
    """Latent patches (Conv, stride = kernel) + learned positions, timestep MLP, DiT blocks, linear
    unpatchify head: inputs `latent` [B, C, S, S] and `timestep` [B], output `noise` [B, tokens, p²·C]."""

    def __init__(self, *, depth: int = 2, dim: int = 32, heads: int = 2, latent: int = 16, patch: int = 2, channels: int = 4):
        super().__init__()
        tokens = (latent // patch) ** 2
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.t_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, patch * patch * channels)

    def forward(self, latent, timestep):
        x = self.patch(latent).flatten(2).transpose(1, 2) + self.pos
        c = self.t_embed(timestep[:, None])
        for block in self.blocks:
            x = block(x, c)
        return self.out(x)


def export_dit(path: str | os.PathLike, *, seed: int = 0, **config) -> Path:
    """A random-weight `DiT` exported with TorchScript opset 17 (dynamic batch)."""
    torch.manual_seed(seed)
    model = DiT(**config).eval()
    latent = model.patch.in_channels, config.get("latent", 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, latent[0], latent[1], latent[1]), torch.tensor([0.5])), str(path),
                          dynamo=False, opset_version=17, input_names=["latent", "timestep"], output_names=["noise"],
                          dynamic_axes={"latent": {0: "batch"}, "timestep": {0: "batch"}, "noise": {0: "batch"}})
    return Path(path)


def stored_config(path: str | os.PathLike) -> dict | None:
    """The build configuration stamped into a model by `build_vit`, or None (reads no weights)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable cache entry is simply rebuilt
        return None
    for prop in proto.metadata_props:
        if prop.key == CONFIG_KEY:
            return json.loads(prop.value)
    return None


def model_bytes(path: str | os.PathLike) -> int:
    """Size on disk of the model file plus its external data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def preset(name: str, out_dir: str | os.PathLike = BENCH_OUT, *, rebuild: bool = False, **overrides) -> Path:
    """`out_dir/<name>.onnx` for a preset, reused when it exists with the same build settings."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    kwargs = {"patch": 16, "mlp_ratio": 4, "exporter": "torchscript17", "external_data": True, "seed": 0, "arch": "timm",
              **PRESETS[name], **overrides}
    path = Path(out_dir) / f"{name}.onnx"
    data_ok = not kwargs["external_data"] or path.with_name(path.name + ".data").exists()
    if not rebuild and path.exists() and data_ok and stored_config(path) == kwargs:
        return path
    return build_vit(path, **kwargs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("presets", nargs="*", default=["vit_s16_224"], help=f"any of {', '.join(PRESETS)}")
    ap.add_argument("--out", default=str(BENCH_OUT), help="output folder (default: %(default)s)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild even if a matching file exists")
    ap.add_argument("--exporter", default="torchscript17", help="torchscript<opset> or dynamo<opset>")
    ap.add_argument("--list", action="store_true", help="list the presets and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, cfg in PRESETS.items():
            print(f"{name}: {cfg}")
        return
    for name in args.presets:
        start = time.perf_counter()
        path = preset(name, args.out, rebuild=args.rebuild, exporter=args.exporter)
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{path}: {model_bytes(path) / 1e6:.1f} MB on disk, {seconds:.1f} s, process peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
