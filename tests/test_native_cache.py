"""The first-use build's cache (defect_fast/ops/_native.py): a damaged library in it is linked again."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from defect_fast.ops import _native, backend

PROBE = "from defect_fast.ops import backend; print(backend())"


def _jit_build_dir() -> Path:
    info = _native.build_info()
    if backend() == "reference" or info is None:
        pytest.skip("the native kernels did not build here")
    if info.get("build_kind") != "jit" or not info.get("path"):
        pytest.skip("the kernels come from an ahead-of-time build, not the first-use cache")
    return Path(info["path"]).parent


def _run(cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEFECT_FAST_BUILD_DIR": str(cache)}
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("damage", ["empty", "cut short"])
def test_a_damaged_library_in_the_build_cache_is_linked_again(tmp_path, damage):
    """An emptied library (a full disk) failed to import and its stamp went, but the library
    stayed: ninja took it for up to date, and every later process ran the reference ops. One cut
    short under a stamp still there imported and faulted the process (SIGBUS) at first use."""
    built = _jit_build_dir()
    build = tmp_path / "cache" / built.name  # the same key: this version's sources, flags and torch
    shutil.copytree(built, build, ignore=shutil.ignore_patterns("defect_fast.lock", "lock"))
    lib = _native._library(build)
    stamp = (build / "build.ok").read_text().splitlines()[:2]
    (build / "build.ok").write_text("\n".join(stamp + [_native._library_record(lib)]) + "\n")  # as this version stamps
    data = lib.read_bytes()
    lib.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    first = _run(tmp_path / "cache")
    assert first.returncode == 0 and first.stdout.split() == ["cpu"], (first.returncode, first.stdout, first.stderr[-2000:])
    assert _native._stamp_vouches(build / "build.ok", build)
    again = _run(tmp_path / "cache")  # the repaired build is used as it is
    assert again.stdout.split() == ["cpu"] and "compiling" not in again.stderr


def test_an_installed_build_that_does_not_load_is_said(monkeypatch):
    """An ahead-of-time defect_fast._C that fails to import (built against another torch) was passed
    over in silence for a first-use build of minutes; now a warning and `info` say why."""
    _jit_build_dir()
    import importlib
    import importlib.util

    real_find, real_import = importlib.util.find_spec, importlib.import_module

    def find_spec(name, *args):
        return object() if name == "defect_fast._C" else real_find(name, *args)

    def import_module(name, *args):
        if name == "defect_fast._C":
            raise ImportError("undefined symbol: _ZN3c10")
        return real_import(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.delenv("DEFECT_FAST_JIT", raising=False)
    monkeypatch.setattr(_native, "_aot_skipped", "")
    with pytest.warns(RuntimeWarning, match="defect_fast._C does not load .*undefined symbol"):
        result = _native._load_uncached()
    assert result[0] is not None
    monkeypatch.setattr(_native, "_result", result)
    assert "undefined symbol" in _native.build_info()["aot_skipped"]
    # no first-use kernels either (no compiler): no word of them, the reason names both
    monkeypatch.setattr(_native, "_load_jit", lambda root: (None, "building the native extension failed: no c++"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module, reason = _native._load_uncached()
    assert module is None and "undefined symbol" in reason and "no c++" in reason


def test_a_finished_build_in_a_cache_that_cannot_be_written_is_used(tmp_path):
    """The build's lock was taken before its stamp was read: in a cache that cannot be written (a
    container's read-only layer; here the lock's name taken by a folder) every process ran the
    reference ops beside a good build. One with nothing built there says what to do."""
    built = _jit_build_dir()
    build = tmp_path / "cache" / built.name
    shutil.copytree(built, build, ignore=shutil.ignore_patterns("defect_fast.lock", "lock"))
    (build / "defect_fast.lock").mkdir()  # opening it to lock fails, as on a read-only file system
    res = _run(tmp_path / "cache")
    assert res.returncode == 0 and res.stdout.split() == ["cpu"], res.stderr[-2000:]
    (build / "build.ok").unlink()  # nothing vouched for: it would have to be built, and cannot be
    res = _run(tmp_path / "cache")
    assert res.stdout.split() == ["reference"]
    assert f"the build cache {build} cannot be written" in res.stderr and "DEFECT_FAST_BUILD_DIR" in res.stderr


def test_an_installed_package_compiles_its_own_sources_not_a_csrc_beside_it(tmp_path, monkeypatch):
    """Installed, the folder beside the package is site-packages: a csrc/extension.cpp another
    project left there was compiled (and imported, had it built) before the package's own _csrc."""
    site = tmp_path / "site-packages"
    for tree in (site / "csrc", site / "defect_fast" / "_csrc"):
        tree.mkdir(parents=True)
        (tree / "extension.cpp").write_text("// sources\n")
    monkeypatch.setattr(_native, "_PACKAGE_DIR", site / "defect_fast")
    assert _native.csrc_dir() == site / "defect_fast" / "_csrc"
    shutil.rmtree(site / "defect_fast" / "_csrc")  # a checkout: its csrc/ beside the package
    assert _native.csrc_dir() == site / "csrc"
