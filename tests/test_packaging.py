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


def _committed_tree(tmp_path: Path) -> Path:
    """A copy of the committed files (not this checkout's build products)."""
    src = tmp_path / "src"
    for rel in _tracked_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    return src


def test_sdist_carries_the_kernel_sources_and_what_the_tests_read(tmp_path):
    """A wheel built from the sdist compiles (or ships as defect_fast/_csrc) the sources in csrc/:
    without them every install from the sdist ran the PyTorch reference ops only."""
    src = _committed_tree(tmp_path)
    # what a working copy holds besides its sources, which the sdist took along (a build folder, caches, runs)
    junk = ["tests/.pytest_cache/v/cache/lastfailed", "benchmarks/.benchmarks/Linux/0001_run.json",
            "examples/cpp/build/defect_fast_run", "experiments/results/scratch-run/model.pt"]
    for rel in junk:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("not a source\n")
    env = {**os.environ, "DEFECT_FAST_NO_AOT": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, env=env,
                   check=True, capture_output=True, timeout=300)
    (archive,) = (tmp_path / "dist").glob("defect_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        info = tar.extractfile(next(n for n in tar.getnames() if n.endswith("/PKG-INFO"))).read().decode()
    csrc = {p for p in _tracked_files() if p.startswith("csrc/")}
    assert csrc and csrc <= names, sorted(csrc - names)
    assert {"CMakeLists.txt", "tests/conftest.py", "benchmarks/common.py", "setup.py", "pyproject.toml", "LICENSE",
            "examples/cpp/NOTICE-Pillow.txt"} <= names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]
    assert not set(junk) & names, sorted(set(junk) & names)
    import defect_fast  # one version, the package's: pyproject.toml reads it

    assert f"\nVersion: {defect_fast.__version__}\n" in info and "\nLicense-File: LICENSE\n" in info, info[:600]


def test_an_older_setuptools_is_named_before_the_build(tmp_path):
    """setuptools before 77 (a fresh venv's, built with --no-build-isolation) failed on
    pyproject.toml's licence fields with "invalid pyproject.toml config: `project.license`"."""
    src = _committed_tree(tmp_path)
    old = tmp_path / "old" / "setuptools"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text("__version__ = '65.5.0'\n")
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist"], cwd=src, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path / "old")})
    assert res.returncode != 0
    assert "defect_fast needs setuptools>=77 to build, this is 65.5.0: pip install 'setuptools>=77'" in res.stderr


@pytest.mark.skipif(os.name == "nt", reason="the compiler is named by CXX on POSIX")
def test_a_failed_ahead_of_time_build_names_the_way_out(tmp_path):
    """`pip install --no-build-isolation .` with a compiler that fails ended in a traceback that
    did not say DEFECT_FAST_NO_AOT=1 installs without the ahead-of-time build."""
    pytest.importorskip("torch.utils.cpp_extension")
    src = _committed_tree(tmp_path)
    env = {**os.environ, "CXX": "/bin/false", "DEFECT_FAST_CUDA": "0"}
    env.pop("DEFECT_FAST_NO_AOT", None)
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path / "b"), "-t", str(tmp_path / "t")],
                         cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "the ahead-of-time build of the native kernels failed" in res.stderr and "DEFECT_FAST_NO_AOT=1" in res.stderr
