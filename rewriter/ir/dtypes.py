"""The one map from ONNX element types (and onnxruntime's type strings) to numpy dtypes.

Calibration feeds, benchmark feeds and the shape-chain evaluator all need it; the types attnrewrite
cannot feed or fold (strings, 8-bit floats, complex) are simply absent, so callers say so in words.
"""

from __future__ import annotations

import numpy as np
import onnx

_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}
#: onnxruntime spells element types as `tensor(float)`; the names are ONNX's lower-cased.
_ORT_NAMES = {f"tensor({onnx.TensorProto.DataType.Name(k).lower()})": k for k in _NUMPY}
_ORT_NAMES["tensor(float)"] = onnx.TensorProto.FLOAT
_ORT_NAMES["tensor(double)"] = onnx.TensorProto.DOUBLE


def numpy_dtype(elem_type: int | None) -> np.dtype | None:
    """numpy dtype of an ONNX element type, or None when attnrewrite does not handle it."""
    found = _NUMPY.get(elem_type) if elem_type is not None else None
    return np.dtype(found) if found is not None else None


def numpy_dtype_of_ort(type_name: str) -> np.dtype | None:
    """numpy dtype of an onnxruntime `NodeArg.type` such as `tensor(float16)`, or None."""
    return numpy_dtype(_ORT_NAMES.get(type_name))
