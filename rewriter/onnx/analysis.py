"""Load → canonicalise → detect, as one call shared by `inspect`, the pass pipeline and `audit`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx_ir as ir

from attnrewrite.onnx.canonicalize import canonicalize
from attnrewrite.onnx.detect import Detection, detect
from attnrewrite.onnx.modelio import load_model
from attnrewrite.site import AttentionSite


@dataclasses.dataclass
class Analysis:
    path: Path
    model: ir.Model
    detection: Detection

    @property
    def sites(self) -> list[AttentionSite]:
        return self.detection.sites

    @property
    def opset(self) -> int:
        return int(self.model.opset_imports.get("", 0))

    def to_json(self) -> dict:
        return {
            "model": str(self.path),
            "opset": self.opset,
            "sites": [site.to_json() for site in self.detection.sites],
            "rejected": [r.to_json() for r in self.detection.rejected],
        }


def analyze(path: str | os.PathLike, *, verify: bool = True) -> Analysis:
    """The attention sites of the model at `path` (the file itself is never modified)."""
    model = load_model(path)
    canonicalize(model)
    return Analysis(path=Path(path), model=model, detection=detect(model, verify_sites=verify))


def analyze_model(model: ir.Model, path: str | os.PathLike = "<memory>", *, verify: bool = True) -> Analysis:
    """Like `analyze` for a model already in memory (passes re-detect after each rewrite)."""
    canonicalize(model)
    return Analysis(path=Path(path), model=model, detection=detect(model, verify_sites=verify))
