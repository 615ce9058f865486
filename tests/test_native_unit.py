"""The native client's C++ unit tests (ctest), in the normal build and under AddressSanitizer + UBSan."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from native import native_build

from fleet.native import DEFAULT_BUILD, NativeBuildError, build_native

UNIT_TESTS = ("test_wire", "test_tokenizer", "test_data", "test_model", "test_net", "test_fuzz")


def _ctest(build_dir) -> None:  # noqa: ANN001
    proc = subprocess.run(["ctest", "--test-dir", str(build_dir), "--output-on-failure", "-R",
                           "^(" + "|".join(UNIT_TESTS) + ")$"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert f"100% tests passed, 0 tests failed out of {len(UNIT_TESTS)}" in proc.stdout, proc.stdout[-3000:]


def test_unit_tests_pass() -> None:
    _ctest(native_build())


def test_unit_tests_pass_under_address_and_undefined_behaviour_sanitizers() -> None:
    if shutil.which("cmake") is None and not os.environ.get("CI"):
        pytest.skip("cmake is not installed")
    try:
        build = build_native(DEFAULT_BUILD.parent / "native-asan", sanitize=True, build_type="Debug",
                             targets=UNIT_TESTS)
    except NativeBuildError as exc:
        pytest.fail(str(exc))
    _ctest(build)
