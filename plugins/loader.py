"""Import the Triton kernels, compiled (CUDA) or interpreted (CPU), with one sentence when they can't be.

Triton decides once per process whether kernels are compiled or interpreted: `@triton.jit` reads
`TRITON_INTERPRET` when it decorates, and `triton.language` decorates its own helpers (`tl.max`,
`tl.sum`, `tl.zeros`) when it is first imported. So the mode must be chosen before triton is imported:
`attnrewrite kernels check --interpret` and the test suite set `TRITON_INTERPRET=1` first, and the
ahead-of-time compilation (`kernels ptx`) runs in a process where it is not set.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from attnrewrite.errors import InputError


def require_triton() -> None:
    """One sentence instead of an ImportError when the `[gpu]` extra is missing."""
    try:
        import torch  # noqa: F401
        import triton  # noqa: F401
    except ImportError as exc:
        raise InputError(f"the fused kernels need triton and torch ({exc.name} is not installed); "
                         "pip install 'attnrewrite[gpu]'.") from None


def interpreting() -> bool:
    """Whether this process runs Triton kernels in the interpreter (decided at triton's import)."""
    if "triton" in sys.modules:
        try:
            from triton import knobs
        except ImportError:  # triton < 3.4 reads the variable directly
            pass
        else:
            return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def use_interpreter() -> None:
    """Choose the interpreter for this process; an error if triton was already imported compiled."""
    if "triton" in sys.modules and not interpreting():
        raise InputError("triton was imported before the interpreter was chosen; "
                         "run with TRITON_INTERPRET=1 set in the environment.")
    os.environ["TRITON_INTERPRET"] = "1"


def kernels() -> ModuleType:
    require_triton()
    return importlib.import_module("attnrewrite.plugins.kernels")
