"""The source distribution: what `pip install defect_fast-*.tar.gz` (and PyPI) builds from."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the files an sdist is made from)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def test_sdist_carries_the_kernel_sources_and_what_the_tests_read(tmp_path):
    """A wheel built from the sdist compiles (or ships as defect_fast/_csrc) the sources in csrc/:
    without them every install from the sdist ran the PyTorch reference ops only."""
    src = tmp_path / "src"
    for rel in _tracked_files():  # the committed tree, not this checkout's build products
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    env = {**os.environ, "DEFECT_FAST_NO_AOT": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, env=env,
                   check=True, capture_output=True, timeout=300)
    (archive,) = (tmp_path / "dist").glob("defect_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    csrc = {p for p in _tracked_files() if p.startswith("csrc/")}
    assert csrc and csrc <= names, sorted(csrc - names)
    assert {"CMakeLists.txt", "tests/conftest.py", "benchmarks/common.py", "setup.py", "pyproject.toml"} <= names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]
