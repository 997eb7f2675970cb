"""Module factories for `attnrewrite torch PKG.MODULE:FACTORY` in the tests."""

from __future__ import annotations


def tiny_vit():
    import torch

    from tests.fixtures.vision import ViT, ViTConfig

    torch.manual_seed(0)
    return ViT(ViTConfig(depth=2), (64, 64)).eval()


def not_a_module():
    return 42
