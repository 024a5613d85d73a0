"""The msrun entry scripts explain an interpreter that lacks the package or a dependency (msrun runs `python`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, pythonpath: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    # -S: no site-packages, like a system python on PATH that has never seen this project's venv
    model = ["qwen3vl"] if script == "caption.py" else []  # caption.py takes the model's name first
    return subprocess.run([sys.executable, "-S", str(REPO / "captioning_core" / script), *model, "meta.csv"],
                          capture_output=True, text=True, env=env, cwd=REPO.parent, timeout=120)


@pytest.mark.parametrize("script", ["caption_qwen2vl.py", "caption.py", "caption_pllava.py"])
def test_missing_package_names_the_python_and_the_fix(script):
    result = _run(script, None)
    assert result.returncode == 1
    assert f"{script}: cannot import 'captioning_core' under {sys.executable}" in result.stderr
    assert "msrun starts each worker with the 'python' found on PATH" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("script", ["caption_qwen2vl.py", "caption.py", "caption_pllava.py"])
def test_missing_dependency_is_named(script):
    result = _run(script, str(REPO))  # the package itself imports; its dependencies are not there
    assert result.returncode == 1
    assert "cannot import 'numpy'" in result.stderr or "cannot import 'pandas'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
