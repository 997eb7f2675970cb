"""Cut a self-contained ONNX model out of a graph: the nodes that compute some values from others.

Used to run one attention site (or one constant bias) in onnxruntime on its own, so detection can
check its reading of a site numerically without running, or even loading, the whole model.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir


def build_submodel(
    graph: ir.Graph, outputs: list[ir.Value], inside: Callable[[ir.Node], bool] | None = None
) -> tuple[onnx.ModelProto, list[ir.Value]]:
    """Model computing `outputs`; returns (proto, inputs).

    Walking up from `outputs`, a value produced by a node that is not `inside` becomes an input, as
    do graph inputs; initializers are copied (they are small in attention subgraphs: scales, bias
    tables, masks). `inside=None` takes every node.
    """
    def is_stop(value: ir.Value) -> bool:
        producer = value.producer()
        return producer is not None and inside is not None and not inside(producer)

    nodes: list[ir.Node] = []
    inputs: list[ir.Value] = []
    initializers: list[ir.Value] = []
    visited: set[int] = set()
    seen_values: set[int] = set()

    def visit_value(value: ir.Value) -> None:
        if id(value) in seen_values:
            return
        seen_values.add(id(value))
        if is_stop(value) or (value.is_graph_input() and not value.is_initializer()):
            inputs.append(value)
            return
        if value.is_initializer() or (value.producer() is None and value.const_value is not None):
            initializers.append(value)
            return
        node = value.producer()
        if node is None:
            inputs.append(value)
            return
        visit_node(node)

    def visit_node(node: ir.Node) -> None:
        stack = [(node, False)]
        while stack:
            n, done = stack.pop()
            if done:
                nodes.append(n)
                continue
            if id(n) in visited:
                continue
            visited.add(id(n))
            stack.append((n, True))
            for value in reversed([i for i in n.inputs if i is not None]):
                if id(value) in seen_values:
                    continue
                producer = value.producer()
                if is_stop(value) or value.is_graph_input() or value.is_initializer() or producer is None:
                    visit_value(value)
                else:
                    seen_values.add(id(value))
                    stack.append((producer, False))

    for out in outputs:
        visit_value(out)
    proto_graph = onnx.helper.make_graph(
        nodes=[ir.serde.serialize_node(n) for n in nodes],
        name="attnrewrite_submodel",
        inputs=[_value_info(v) for v in inputs],
        outputs=[onnx.helper.make_tensor_value_info(v.name, _elem_type(v), None) for v in outputs],
        initializer=[_tensor_proto(v) for v in initializers],
    )
    model = onnx.helper.make_model(
        proto_graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in _opsets(graph).items()],
    )
    model.ir_version = min(model.ir_version, 10)
    return model, inputs


def _opsets(graph: ir.Graph) -> dict[str, int]:
    opsets = dict(graph.opset_imports)
    opsets.setdefault("", 17)
    opsets.setdefault("com.microsoft", 1)
    return opsets


def _elem_type(value: ir.Value) -> int:
    return int(value.dtype) if value.dtype is not None else onnx.TensorProto.FLOAT


def _value_info(value: ir.Value) -> onnx.ValueInfoProto:
    shape = None
    if value.shape is not None:
        shape = [d if isinstance(d, int) else None for d in value.shape]
    return onnx.helper.make_tensor_value_info(value.name, _elem_type(value), shape)


def _tensor_proto(value: ir.Value) -> onnx.TensorProto:
    array = np.asarray(value.const_value.numpy())
    return onnx.numpy_helper.from_array(array, name=value.name)
