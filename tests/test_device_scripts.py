"""The device scripts (bench/gpu_*.sh) run this checkout's code: their install step puts it
into the Python they run, and never repoints an environment that imports another copy."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kdtool.distill

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = Path(kdtool.distill.__file__).resolve().parents[1]


def _source(cwd: Path) -> subprocess.CompletedProcess:
    # python3 is this test's Python, whatever PATH held: never another environment's pip
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", "-c", '. bench/install_here.sh "$1"; echo continued', "-",
                           str(cwd / "install.log")], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PATH": path})


@pytest.mark.skipif(INSTALLED != ROOT, reason="kdtool is not installed from this checkout")
def test_the_install_step_leaves_another_checkouts_environment_alone(tmp_path):
    (tmp_path / "bench").mkdir()
    shutil.copy2(ROOT / "bench" / "install_here.sh", tmp_path / "bench")
    other = _source(tmp_path)  # a second checkout, run with this checkout's environment
    assert other.returncode == 2 and "continued" not in other.stdout
    assert f"imports kdtool from {ROOT}, not from this checkout" in other.stderr
    assert not (tmp_path / "install.log").exists()  # pip never ran
    here = _source(ROOT)
    assert here.returncode == 0 and here.stdout.strip() == "continued", here.stderr


def test_every_device_script_installs_through_the_guarded_step():
    for script in sorted((ROOT / "bench").glob("gpu_*.sh")):
        text = script.read_text()
        assert ". bench/install_here.sh" in text and "pip install" not in text, script.name


def _run_script(name: str, out: Path, timeout: int, **env) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", f"bench/{name}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PATH": path, "SMOKE": "1",
                                                "OUT": str(out), **env})


@pytest.mark.skipif(INSTALLED != ROOT, reason="kdtool is not installed from this checkout")
@pytest.mark.timeout(400)
def test_the_recipe_script_runs_end_to_end_at_toy_scale(tmp_path):
    """GPU time is scarce: a script that breaks on its first GPU run wastes it."""
    r = _run_script("gpu_recipe.sh", tmp_path, 380, SKIP_THROUGHPUT="1",
                    KDTOOL_CACHE=str(tmp_path / "cache"), GPU_TESTS="tests/test_packaging.py")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bs64_lr0.05_e1: epochs 1: best val" in r.stdout, r.stdout[-2000:]
    assert "with flip TTA failed" not in r.stdout
    assert (tmp_path / "r18_bs64_lr0.05_e1.safetensors").is_file()
