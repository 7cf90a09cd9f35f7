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


def _env(**extra: str) -> dict[str, str]:
    """python3 is this test's Python, whatever PATH held: never another environment's pip."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}


def _source(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", '. bench/install_here.sh "$1"; echo continued', "-",
                           str(cwd / "install.log")], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=_env())


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
    return subprocess.run(["bash", f"bench/{name}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=_env(SMOKE="1", OUT=str(out), **env))


@pytest.mark.skipif(INSTALLED != ROOT, reason="kdtool is not installed from this checkout")
@pytest.mark.timeout(600)
def test_the_recipe_script_runs_end_to_end_at_toy_scale(tmp_path):
    """GPU time is scarce: a script that breaks on its first GPU run wastes it."""
    r = _run_script("gpu_recipe.sh", tmp_path, 580, SKIP_THROUGHPUT="1",
                    KDTOOL_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bs64_lr0.05_e1: epochs 1: best val" in r.stdout, r.stdout[-2000:]
    assert "with flip TTA failed" not in r.stdout
    assert (tmp_path / "r18_bs64_lr0.05_e1.safetensors").is_file()


def _cifar_like_zip(path: Path, per_class: int, seed: int) -> None:
    """A zip of class folders of random 32x32 RGB PNGs, shaped as the CIFAR-10 zips."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as z:
        for c in range(10):
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    buf, "PNG")
                z.writestr(f"class{c}/{i}.png", buf.getvalue())


@pytest.mark.skipif(INSTALLED != ROOT, reason="kdtool is not installed from this checkout")
@pytest.mark.timeout(600)
def test_the_distill_script_runs_end_to_end_at_toy_scale(tmp_path):
    data = tmp_path / "cifar10"
    data.mkdir()
    _cifar_like_zip(data / "train45k.zip", 30, 0)
    _cifar_like_zip(data / "val5k.zip", 10, 1)
    r = _run_script("gpu_distill.sh", tmp_path / "out", 580, DATA=str(data),
                    KDTOOL_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr[-2000:]
    for step in ("pytest_gpu", "noise_cost", "distill_speed", "cifar_distill", "curves"):
        assert f"== {step} (" in r.stdout
    assert "rc=0" in r.stdout and all(line.startswith("rc=0")
                                      for line in r.stdout.splitlines() if line.startswith("rc="))
    assert "| gaussian, running BN (baseline) |" in r.stdout
    for phase in ("noise", "forward", "backward", "optimizer"):  # the profile's labels
        assert f'"{phase}": {{"cpu_ms"' in r.stdout, phase
    assert (tmp_path / "out" / "cifar_curves.png").is_file()
