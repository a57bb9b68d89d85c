"""Build script of defect_fast (metadata lives in pyproject.toml).

- ``pip install .``: torch is not a build requirement (an isolated build would download a
  fresh torch), so the wheel is pure Python. It carries the C++/CUDA sources as
  ``defect_fast/_csrc``, compiled at first use against the installed torch
  (see defect_fast/ops/_native.py).
- ``pip install --no-build-isolation .`` with torch installed: the kernels are also compiled
  now, as ``defect_fast._C``, with the same sources and flags as the JIT build (and ``-g0``
  against the debug info Python's compile flags ask for). A failed build stops the install and
  names ``DEFECT_FAST_NO_AOT=1``.
  Environment: ``DEFECT_FAST_NO_AOT=1`` skips that; ``DEFECT_FAST_CUDA=0``/``1`` turns the CUDA
  kernels off/on (default: on when torch has CUDA and a toolkit is found);
  ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default: the visible GPUs with PTX for later
  ones, else "8.0;9.0+PTX"; a GPU the build has no code for runs the PyTorch reference ops, said once);
  ``MAX_JOBS`` bounds the parallel compilations.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import setuptools

# pyproject.toml's licence fields need it; an older one (a fresh venv's, built with
# --no-build-isolation) failed with "invalid pyproject.toml config: `project.license`"
if int(setuptools.__version__.split(".")[0]) < 77:
    raise SystemExit(f"defect_fast needs setuptools>=77 to build, this is {setuptools.__version__}: "
                     "pip install 'setuptools>=77' (or build without --no-build-isolation)")

from setuptools import setup  # noqa: E402
from setuptools.command.build_py import build_py  # noqa: E402

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _native_helpers():
    """defect_fast/ops/_native.py loaded by path (the package itself may import torch)."""
    spec = importlib.util.spec_from_file_location("_defect_fast_native_build", ROOT / "defect_fast" / "ops" / "_native.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


native = _native_helpers()


def _csrc_files() -> list[Path]:
    return [p for p in sorted(CSRC.rglob("*")) if p.is_file() and p.suffix in native._SOURCE_SUFFIXES]


class BuildPyWithCsrc(build_py):
    """build_py that also copies csrc/ into the package as defect_fast/_csrc."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install finds the checkout's csrc/ itself
        if not (CSRC / "extension.cpp").is_file():
            self.warn(f"{CSRC} is missing: the package will have no native sources to compile")
            return
        target = Path(self.build_lib) / "defect_fast" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        for path in _csrc_files():
            dest = target / path.relative_to(CSRC)
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(path), str(dest))


def _flag(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _extensions():
    """(ext_modules, cmdclass) for the ahead-of-time build, empty when torch is not importable."""
    if _flag("DEFECT_FAST_NO_AOT") not in (None, "0"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    cuda_env = _flag("DEFECT_FAST_CUDA")
    if cuda_env is None:
        with_cuda = native._cuda_toolkit()[0]
    else:
        with_cuda = cuda_env != "0"
        if with_cuda and (torch.version.cuda is None or CUDA_HOME is None):
            raise RuntimeError("DEFECT_FAST_CUDA=1 but torch has no CUDA or no CUDA toolkit was found")
    arch_list = None
    if with_cuda:
        arch_list = native._cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    flags = native.compile_flags(with_cuda, native.sources_digest(CSRC), "aot", arch_list, native._openmp_available())
    sources = [p.relative_to(ROOT).as_posix() for p in native.source_files(CSRC, with_cuda)]
    # -g0: Python's own compile flags ask for debug info, which made the library 18x the JIT build's size
    compile_args = {"cxx": flags["cxx"] + ([] if os.name == "nt" else ["-g0"])}
    if with_cuda:
        compile_args["nvcc"] = flags["nvcc"]
    kind = CUDAExtension if with_cuda else CppExtension
    ext = kind(
        name="defect_fast._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args=compile_args,
        extra_link_args=flags["ld"],
    )
    class BuildExtensionSaysTheWayOut(BuildExtension):
        """A failed ahead-of-time build ends the install with the way to install without it."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - the compiler's failure, whatever it raised
                raise SystemExit(f"defect_fast: the ahead-of-time build of the native kernels failed ({type(exc).__name__}: "
                                 f"{exc}); set DEFECT_FAST_NO_AOT=1 to install without it (the kernels are then "
                                 "compiled at first use, or the PyTorch reference ops run)") from exc

    return [ext], {"build_ext": BuildExtensionSaysTheWayOut}


ext_modules, cmdclass = _extensions()
cmdclass.update({"build_py": BuildPyWithCsrc})  # csrc/ reaches the sdist through MANIFEST.in

setup(ext_modules=ext_modules, cmdclass=cmdclass)
