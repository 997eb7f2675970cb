"""The Triton kernels against their passes' references, under Triton's CPU interpreter.

Every case of `plugins/check.py` (the same list `attnrewrite kernels check` runs on a GPU) in fp32 and
fp16; bf16 runs only compiled (the interpreter's bf16 dot is broken), see `check.INTERPRETER_DTYPES`.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

from attnrewrite.plugins import check  # noqa: E402
from attnrewrite.plugins.loader import interpreting  # noqa: E402

CASES = check.cases()


def test_the_suite_runs_the_interpreter():
    assert interpreting(), "tests/conftest.py must set TRITON_INTERPRET=1 before triton is imported"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.kernel}-{c.name}" for c in CASES])
def test_kernel_matches_its_reference(case, dtype):
    result = check.run_case(case, dtype)
    assert result.ok, f"{case.kernel} / {case.name} / {dtype}: max error {result.max_error:.3g} > {result.tolerance:.3g}"


def test_every_kernel_family_has_an_exactness_anchor():
    anchors = {c.kernel for c in CASES if "anchor" in c.name}
    assert {"window_attention", "neighborhood_attention", "block_sparse_attention"} <= anchors


def test_float32_tolerance_is_tight():
    assert check.TOLERANCE["float32"] <= 1e-5
