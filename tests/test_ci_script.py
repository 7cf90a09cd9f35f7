"""`.ci/run`'s free-space check: a low reading warns and the run goes on, since the estimate
must never fail a run that fits (a stop was once refused at 7 GB free for a 6.7 GB peak)."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shim(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_low_disk_warns_and_goes_on_to_the_install(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", repo / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # 3 GB free, in df -P's 1 KiB blocks.
    _shim(bin_dir, "df", 'echo "Filesystem 1024-blocks Used Available Capacity Mounted on"\n'
                         'echo "/dev/x 100000000 96854528 3145728 97% /data"\n')
    # The venv step is where the run would go next: stop there with a code of our own.
    _shim(bin_dir, "python3", 'echo "venv step reached" >&2\nexit 42\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 42, r.stderr
    assert "warning: 3 GB free on /data" in r.stderr
    assert "venv step reached" in r.stderr
