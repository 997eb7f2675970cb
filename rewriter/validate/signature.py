"""A model's contract with its callers: input and output names, dtypes and shapes.

Rewriting runs shape inference and re-declares values, which can turn a symbolic `batch` into a
number or drop a name; the written model must declare exactly what the input declared.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from attnrewrite.errors import PassError


@dataclasses.dataclass(frozen=True)
class IOSignature:
    inputs: tuple[tuple[str, ir.Shape | None, ir.TypeProtocol | None], ...]
    outputs: tuple[tuple[str, ir.Shape | None, ir.TypeProtocol | None], ...]

    @classmethod
    def of(cls, model: ir.Model) -> IOSignature:
        def values(vs):
            return tuple((v.name, v.shape, v.type) for v in vs)

        return cls(values(model.graph.inputs), values(model.graph.outputs))

    def restore(self, model: ir.Model) -> None:
        """Declare exactly the saved names, dtypes, shapes and symbolic dim names; a changed name or
        dtype is a broken rewrite, not something to paper over."""
        for values, saved in ((model.graph.inputs, self.inputs), (model.graph.outputs, self.outputs)):
            if [v.name for v in values] != [name for name, _, _ in saved]:
                raise PassError("the rewritten model's input/output names differ from the original's")
            for value, (_, shape, type_) in zip(values, saved):
                if value.type is not None and type_ is not None and value.type != type_:
                    raise PassError(f"the rewritten model changed the dtype of {value.name}")
                value.shape, value.type = shape, type_
