"""The wheel a user installs: every module of every stage folder under the kdtool namespace,
no generic top-level package, the licence and the entry point in its metadata.

The editable install the tests run under maps folders, so a subpackage missing from
pyproject's package list would import here and be absent from a real install; building the
wheel is the only way to see it.
"""

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import kdtool

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> where it installs.
STAGES = {
    "kdtool": "kdtool",
    "distill": "kdtool/distill",
    "calibrate": "kdtool/calibrate",
    "export": "kdtool/export",
    "deploy": "kdtool/deploy",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools", minversion="77")
    src = tmp_path_factory.mktemp("src")
    # A copy, so that the build's scratch folders never land in the checkout.
    for name in ["pyproject.toml", "README.md", "LICENSE"]:
        shutil.copy2(ROOT / name, src / name)
    for folder in STAGES:
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    # No build isolation: the test must not need the network.
    code = ("import sys, setuptools.build_meta as b; "
            "print(b.build_wheel(sys.argv[1]))")
    r = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    name = r.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(dist / name) as zf:
        yield zf


def test_every_module_installs_under_kdtool(wheel):
    names = set(wheel.namelist())
    expected = {
        f"{target}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, target in STAGES.items()
        for path in (ROOT / folder).rglob("*.py")
    }
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (add them to pyproject's packages): {missing}"
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kdtool"}, f"the wheel installs top-level {sorted(top - {'kdtool'})}"


def test_metadata_licence_and_entry_point(wheel):
    info = next(n.rsplit("/", 1)[0] for n in wheel.namelist()
                if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
    assert meta["Name"] == "kdtool" and meta["Version"] == kdtool.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert "Apache License" in wheel.read(f"{info}/licenses/LICENSE").decode()
    entry = wheel.read(f"{info}/entry_points.txt").decode()
    assert "kdtool = kdtool.cli:main" in entry
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("torch>=") for r in requires)
