"""Exports of the session's digits teacher, made once per module through the CLI."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from kdtool.cli import main


def run_cli(*args) -> tuple[int, str, str]:
    """Run ``kdtool ARGS`` in-process outside a test's capsys: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def export_json(*args) -> dict:
    code, out, err = run_cli("export", *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def fp32_export(digits_teacher, tmp_path_factory) -> tuple[Path, dict]:
    """FP32 ONNX of the digits teacher with --val and a Triton repository."""
    d = tmp_path_factory.mktemp("fp32")
    result = export_json(
        digits_teacher,
        "--onnx",
        d / "teacher.onnx",
        "--val",
        "digits:test",
        "--parity-batch",
        "37",
        "--triton-repo",
        d / "repo",
    )
    return d / "teacher.onnx", result


@pytest.fixture(scope="module")
def int8_export(digits_teacher, tmp_path_factory) -> tuple[Path, dict]:
    """INT8 QDQ ONNX of the digits teacher, calibrated on digits (train split)."""
    d = tmp_path_factory.mktemp("int8")
    result = export_json(
        digits_teacher,
        "--onnx",
        d / "teacher.int8.onnx",
        "--precision",
        "int8",
        "--calib-data",
        "digits",
        "--calib-images",
        "256",
        "--val",
        "digits:test",
    )
    return d / "teacher.int8.onnx", result
