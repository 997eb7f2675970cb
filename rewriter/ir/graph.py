"""Small graph queries and node builders shared by detection and passes."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir


#: Constants of at most this many elements are read and folded (shape vectors, scales, small masks).
MAX_FOLDED_ELEMENTS = 4096

_counter = itertools.count()


def fresh(prefix: str) -> str:
    """A value/node name that cannot collide with exporter names."""
    return f"attnrewrite/{prefix}_{next(_counter)}"


def producer_op(value: ir.Value | None) -> str | None:
    if value is None:
        return None
    node = value.producer()
    if node is None:
        return None
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def is_constant(value: ir.Value | None, memo: dict | None = None, *, shapes_are_constant: bool = False) -> bool:
    """True when `value` depends on no graph input (initializers and Constant-only chains).

    With `shapes_are_constant`, outputs of Shape/Size count as constants too: such values are
    metadata (reshape targets, scales from `q.shape[-1]`), never token data.
    """
    if value is None:
        return True
    memo = {} if memo is None else memo
    stack: list[tuple[ir.Value, bool]] = [(value, False)]
    while stack:
        v, expanded = stack.pop()
        if v in memo and not expanded:
            continue
        if v.is_initializer() or const_array(v) is not None:
            memo[v] = True
            continue
        node = v.producer()
        if shapes_are_constant and node is not None and node.op_type in ("Shape", "Size"):
            memo[v] = True
            continue
        if v.is_graph_input() or node is None:
            memo[v] = False
            continue
        if expanded:
            memo[v] = all(i is None or memo.get(i, False) for i in node.inputs)
        else:
            stack.append((v, True))
            stack.extend((i, False) for i in node.inputs if i is not None and i not in memo)
    return memo[value]


def scalar_constant(value: ir.Value | None) -> float | None:
    """The number held by a constant with exactly one element, else None."""
    arr = const_array(value)
    if arr is None or arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr.reshape(-1)[0])


def dims(value: ir.Value) -> list[int | None] | None:
    return static_dims(value)


def add_node(graph: ir.Graph, op: str, inputs, attributes=None, *, domain: str = "", name: str) -> ir.Value:
    """Append a node to `graph` (sorted topologically later) and return its single output."""
    node = ir.node(op, list(inputs), attributes=attributes or {}, domain=domain, name=fresh(name))
    node.outputs[0].name = fresh(name + "_out")
    graph.append(node)
    return node.outputs[0]


def add_constant(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(np.asarray(array))}, name=fresh(name))
    out = node.outputs[0]
    out.name = fresh(name)
    out.const_value = ir.tensor(np.asarray(array))
    out.shape = ir.Shape(np.shape(array))
    out.type = ir.TensorType(ir.DataType.from_numpy(np.asarray(array).dtype))
    graph.append(node)
    return out


def set_shape(value: ir.Value, shape, dtype: ir.DataType | None) -> None:
    value.shape = ir.Shape(shape) if shape is not None else None
    if dtype is not None:
        value.type = ir.TensorType(dtype)


def compose_perm(outer: list[int], inner: list[int]) -> list[int]:
    """Permutation of Transpose(Transpose(x, inner), outer) as a single Transpose of x."""
    return [inner[p] for p in outer]


def single_consumer(value: ir.Value) -> ir.Node | None:
    users = value.consumers()
    return users[0] if len(users) == 1 else None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content if it has one (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = value.producer()
        if node is not None and node.op_type == "Constant" and node.domain == "":
            attr = node.attributes.get("value")
            if attr is not None:
                tensor = attr.as_tensor()
            else:
                for key, kind in (("value_float", np.float32), ("value_int", np.int64)):
                    if key in node.attributes:
                        return np.array(node.attributes[key].value, dtype=kind)
                for key, kind in (("value_floats", np.float32), ("value_ints", np.int64)):
                    if key in node.attributes:
                        return np.array(node.attributes[key].value, dtype=kind)
    if tensor is None:
        return None
    if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes > MAX_FOLDED_ELEMENTS * 8:
        return None  # never pull big weights into memory just to look at them
    try:
        return tensor.numpy()
    except Exception:  # noqa: BLE001 - unreadable tensors are simply "not constant"
        return None


def static_dims(value: ir.Value) -> list[int | None] | None:
    """Shape as a list with None for symbolic dims; None when even the rank is unknown."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]
