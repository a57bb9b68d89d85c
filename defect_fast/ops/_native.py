"""Loads the native extension: the C++ kernels, and the CUDA kernels where torch has CUDA.

Where the extension comes from, in order:

1. ``defect_fast._C``, compiled ahead of time by setup.py when torch is importable at install
   time (``pip install --no-build-isolation .``). Skipped when ``DEFECT_FAST_JIT=1``.
2. A just-in-time build with :func:`torch.utils.cpp_extension.load` of the sources under
   ``csrc/`` (the checkout's ``csrc/``, or the copy installed as ``defect_fast/_csrc``): every
   ``.cpp`` outside ``cuda/`` folders, plus the ``cuda/`` folders' ``.cpp`` and ``.cu`` files when
   torch has CUDA and a CUDA toolkit is found. The build goes to
   ``$DEFECT_FAST_BUILD_DIR/<key>`` (default ``~/.cache/defect_fast/<key>``), where the key hashes
   the sources, the csrc location, the torch and Python versions and the flags, so it is built
   once per change and reused by later processes without a compiler run. A new directory
   starts from the objects of the newest finished build with the same flags, so only changed
   files are recompiled; the three newest builds of those flags are kept. A file lock keeps two
   processes from building at once. A finished build's stamp (``build.ok``) records the
   library's size and SHA-256; a library it does not vouch for (damaged, cut short, or left by
   a build killed while linking) is linked again from the objects before anything imports it.
   ``DEFECT_FAST_VERBOSE_BUILD=1`` shows the compiler output.

:func:`load` returns ``(module, "")`` or ``(None, reason)``; the result is cached in the
process. When the CUDA build fails the CPU kernels are still built and :func:`cuda_reason`
says why CUDA is missing.

What an op needs to fit in (the memory_address files are the worked example):

- ``csrc/<op>/<op>.cpp``: ``TORCH_LIBRARY_FRAGMENT(defect_fast, m)`` with
  ``m.set_python_module("defect_fast.ops._<op>")`` before the ``m.def`` schemas;
  ``cpu/<op>_cpu.cpp`` and ``cuda/<op>_cuda.cpp`` register with ``TORCH_LIBRARY_IMPL``.
  Include project headers relative to ``csrc/`` (``"common/macros.h"``, ``"<op>/<op>_math.h"``).
  Prefer light ATen headers (``#define TORCH_ASSERT_ONLY_METHOD_OPERATORS`` then
  ``ATen/core/Tensor.h`` and ``ATen/ops/<name>.h``) over ``torch/extension.h``: the JIT build
  compiles every file on first use, and the full headers cost most of that time.
- C++ files are compiled with -O3 -fno-math-errno -fno-trapping-math (as torch itself),
  -ffp-contract=off (no fused multiply-add the reference does not do), and
  OpenMP (at::parallel_for runs serially without it); the ``.cu`` files with -O3 for
  ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs, with PTX for later ones, else "8.0;9.0+PTX";
  :func:`has_cuda` checks the GPU an op runs on against it). Every ``.cu`` file
  must compile with plain ``nvcc -c`` (CUDA headers only), the torch glue lives in ``.cpp``.
  ``DEFECT_FAST_WITH_CUDA`` is defined for every file of a CUDA build.
- ``defect_fast/ops/_<op>.py``: at import, ``module, reason = _native.load()`` and raise
  ``ImportError(reason)`` when it is None; then ``torch.library.register_fake`` for each
  op, ``torch.library.register_autograd`` where the op is differentiable, and the Python
  function with the reference's signature, calling ``torch.ops.defect_fast.<op>``.
  The fake registrations must live in the module named by ``set_python_module``.
- setup.py builds the same sources with the same flags (it imports this file by path, so
  this file imports nothing outside the standard library at module level).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path

EXTENSION_NAME = "defect_fast_native"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../defect_fast
_SOURCE_SUFFIXES = (".cpp", ".cc", ".cu", ".h", ".hpp", ".cuh")
_DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # +PTX: GPUs after sm_90 JIT-compile the sm_90 code

_lock = threading.Lock()
_result: tuple[object | None, str] | None = None
_cuda_reason = ""
_aot_skipped = ""  # why an installed ahead-of-time build was not used (compiled at first use instead)
_built_with_cuda = False
_runs_on: dict[int, bool] = {}  # GPU index -> whether the CUDA kernels were built for it


# ---------------------------------------------------------------------------------------------
# Sources and flags (no torch needed: setup.py uses these too)


def csrc_dir() -> Path | None:
    """The csrc tree: the installed copy (``_csrc`` inside the package, which only a build of the
    package puts there), else the checkout's ``csrc/`` beside the package. Installed, the folder
    beside the package is site-packages, where a ``csrc/extension.cpp`` is another project's."""
    installed = _PACKAGE_DIR / "_csrc"
    if (installed / "extension.cpp").is_file():
        return installed
    checkout = _PACKAGE_DIR.parent / "csrc"
    if (checkout / "extension.cpp").is_file():
        return checkout
    return None


def _is_cuda_path(path: Path, root: Path) -> bool:
    return "cuda" in path.relative_to(root).parts[:-1]


def source_files(root: Path, with_cuda: bool) -> list[Path]:
    """Translation units of the extension, in a stable order."""
    files = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".cpp", ".cc", ".cu") or not path.is_file():
            continue
        if _is_cuda_path(path, root) or path.suffix == ".cu":
            if with_cuda:
                files.append(path)
        else:
            files.append(path)
    return files


def sources_digest(root: Path) -> str:
    """Hash of every source and header under ``root`` (paths and contents)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in _SOURCE_SUFFIXES:
            h.update(path.relative_to(root).as_posix().encode())
            h.update(b"\0")
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def sanitized_arch_list(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as one preprocessor token ("8.0;9.0+PTX" -> "8.0_9.0+PTX")."""
    parts = [p for p in arch_list.replace(";", " ").split() if p]
    return "_".join(parts)


def compile_flags(with_cuda: bool, digest: str | None, kind: str, arch_list: str | None, openmp: bool) -> dict[str, list[str]]:
    """Flags for the host compiler (cxx), nvcc and the linker.

    ``digest`` (ahead-of-time builds only) is compiled into build_info(); JIT builds leave it
    out so that their command lines do not change with the sources (incremental rebuilds).
    """
    defines = [f"-DDEFECT_FAST_BUILD_KIND={kind}"]
    if digest:
        defines.append(f"-DDEFECT_FAST_SOURCE_DIGEST={digest}")
    if with_cuda:
        defines.append("-DDEFECT_FAST_WITH_CUDA")
        if arch_list:
            defines.append(f"-DDEFECT_FAST_CUDA_ARCHS={sanitized_arch_list(arch_list)}")
    if os.name == "nt":
        cxx = ["/O2", "/openmp"] if openmp else ["/O2"]
        ld: list[str] = []
    else:
        # NB: -fno-trapping-math (as torch's own build) lets the row loops with selects vectorise;
        # -ffp-contract=off keeps a * b - c two roundings, as in the eager reference (GCC fused them
        # in the AVX2+FMA kernels: aw_ssim's variance over a flat window, csrc/aw_ssim/aw_ssim_math.h).
        cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"] + (["-fopenmp"] if openmp else [])
        ld = ["-fopenmp"] if openmp else []
    nvcc = ["-O3"] + defines
    return {"cxx": cxx + defines, "nvcc": nvcc, "ld": ld}


# ---------------------------------------------------------------------------------------------
# Loading


def _openmp_available() -> bool:
    import torch

    return sys.platform.startswith("linux") and torch.backends.openmp.is_available()


def _cuda_toolkit() -> tuple[bool, str]:
    """Whether CUDA kernels can be compiled here, and why not."""
    import torch

    if os.environ.get("DEFECT_FAST_CUDA") == "0":  # e.g. after a failed CUDA build: not tried again per process
        return False, "CUDA kernels switched off (DEFECT_FAST_CUDA=0)"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if getattr(torch.version, "hip", None):
        return False, "ROCm torch is not supported by the CUDA kernels"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, ""


def _cuda_arch_list() -> str:
    import torch

    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if torch.cuda.is_available():  # the visible GPUs, and PTX of the newest for later ones (a build moved)
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"
    return _DEFAULT_CUDA_ARCHS


def arch_runs_on(arch_list: str, capability: tuple[int, int]) -> bool | None:
    """Whether kernels built for ``arch_list`` (TORCH_CUDA_ARCH_LIST: "8.0;9.0+PTX") run on a GPU of
    compute ``capability`` (major, minor): machine code built for x.y runs on x.z with z >= y,
    PTX (``+PTX``) built for x.y is compiled by the driver for any GPU from x.y on; an
    architecture-specific entry ("9.0a") runs on its own capability only. None when an entry is
    no version number (a named architecture such as "Ampere"): not judged."""
    runs = False
    for entry in arch_list.replace(";", " ").split():
        version, ptx = (entry[:-4], True) if entry.upper().endswith("+PTX") else (entry, False)
        major, _, minor = version.partition(".")
        specific = minor[-1:].isalpha()
        minor = minor[:-1] if specific else minor
        if not (major.isdigit() and minor.isdigit()):
            return None
        built = (int(major), int(minor))
        if specific:
            runs |= built == tuple(capability)
        else:
            runs |= (built[0] == capability[0] and built[1] <= capability[1]) or (ptx and built <= tuple(capability))
    return runs


def _cache_root() -> Path:
    env = os.environ.get("DEFECT_FAST_BUILD_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "defect_fast"


def _family_key(root: Path, with_cuda: bool, arch_list: str | None, flags: dict[str, list[str]]) -> str:
    """Everything a build depends on except the source contents."""
    import platform

    import torch

    parts = [
        str(root),
        torch.__version__,
        str(torch.version.cuda),
        sys.version.split()[0],
        platform.machine(),
        str(with_cuda),
        str(arch_list),
        os.environ.get("CXX", ""),
        repr(flags),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _seed_from_previous(build_dir: Path, family: str) -> None:
    """Copies the objects and ninja state of the newest finished build of the same family.

    The command lines are the same, so ninja then recompiles only the sources (or headers)
    that changed since that build, instead of everything.
    """
    if (build_dir / "build.ninja").exists():
        return
    candidates = []
    for other in build_dir.parent.iterdir():
        stamp = other / "build.ok"
        try:
            if other != build_dir and (other / "family").read_text().strip() == family and stamp.is_file():
                candidates.append((stamp.stat().st_mtime, other))
        except OSError:
            continue
    if not candidates:
        return
    previous = max(candidates)[1]
    import shutil

    for path in previous.iterdir():
        if path.is_file() and (path.suffix == ".o" or path.name in (".ninja_log", ".ninja_deps", "build.ninja")):
            with contextlib.suppress(OSError):
                shutil.copy2(path, build_dir / path.name)


def _prune_family(build_dir: Path, family: str, keep: int = 3) -> None:
    """Removes all but the ``keep`` newest finished builds of a family (never one in use).

    A directory is removed only when its lock can be taken at once, i.e. no process is building
    or importing from it; processes that already loaded a library from it keep their mapping.
    """
    import shutil

    finished = []
    for other in build_dir.parent.iterdir():
        try:
            if other != build_dir and (other / "family").read_text().strip() == family and (other / "build.ok").is_file():
                finished.append(((other / "build.ok").stat().st_mtime, other))
        except OSError:
            continue
    for _, other in sorted(finished, reverse=True)[max(keep - 1, 0):]:
        with _file_lock(other / "defect_fast.lock", blocking=False) as locked:
            if locked:
                shutil.rmtree(other, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path, blocking: bool = True):
    """An exclusive lock held by this process (released by the OS if the process dies).

    Yields True when held; with ``blocking=False`` yields False when another process holds it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: rely on torch's own lock file
            yield True
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _library(build_dir: Path) -> Path | None:
    """The library a build linked in ``build_dir``, or None."""
    import importlib.machinery

    for suffix in importlib.machinery.EXTENSION_SUFFIXES + [".so", ".pyd"]:
        path = build_dir / f"{EXTENSION_NAME}{suffix}"
        if path.is_file():
            return path
    return None


def _library_record(path: Path) -> str:
    """``name size sha256`` of a linked library: what the build stamp vouches for."""
    from defect_fast.safety import file_sha256  # at run time only (setup.py loads this file by path)

    return f"{path.name} {path.stat().st_size} {file_sha256(path)}"


def _stamp_vouches(stamp: Path, build_dir: Path) -> bool:
    """Whether the library in ``build_dir`` is the one its stamp recorded (its third line; a
    stamp from before that record vouches for none: the library is linked again, once). A library
    cut short (a full disk, a crash while it was written) can import and then fault the process
    (SIGBUS) at first use."""
    lines = stamp.read_text().splitlines()
    path = _library(build_dir)
    return path is not None and len(lines) >= 3 and lines[2] == _library_record(path)


def _drop_library(build_dir: Path) -> None:
    """Removes the linked library (not the objects): ninja links it again, in seconds."""
    path = _library(build_dir)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _import_built(build_dir: Path):
    """Imports the library a previous build left in ``build_dir`` (no compiler involved)."""
    path = _library(build_dir)
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[EXTENSION_NAME] = module
    return module


def _error_tail(message: str, limit: int = 900) -> str:
    """The informative end of a build error: compiler error lines first, then the last lines."""
    lines = [line.rstrip() for line in message.splitlines() if line.strip()]
    markers = ("error:", "error :", "fatal", "undefined reference", "undefined symbol")
    errors = list(dict.fromkeys(line for line in lines[1:] if any(m in line.lower() for m in markers)))
    picked = errors[:4] if errors else lines[-6:]
    text = " | ".join(picked)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jit_build(root: Path, with_cuda: bool):
    """Builds (or reuses) the extension from ``root``; returns the module or raises."""
    import torch
    from torch.utils import cpp_extension

    digest = sources_digest(root)
    arch_list = _cuda_arch_list() if with_cuda else None
    flags = compile_flags(with_cuda, None, "jit", arch_list, _openmp_available())
    family = _family_key(root, with_cuda, arch_list, flags)
    key = hashlib.sha256(f"{family}\n{digest}".encode()).hexdigest()[:16]
    build_dir = _cache_root() / key
    stamp = build_dir / "build.ok"
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(_file_lock(build_dir / "defect_fast.lock"))
        except OSError as exc:  # a cache that cannot be written (a container's read-only layer): a finished
            # build there is imported without the lock (taking it failed, and the reference ops ran beside it)
            try:
                module = _import_built(build_dir) if stamp.is_file() and _stamp_vouches(stamp, build_dir) else None
            except (ImportError, OSError):
                module = None
            if module is not None:
                return module
            raise RuntimeError(f"the build cache {build_dir} cannot be written ({exc.strerror or exc}); set "
                               "DEFECT_FAST_BUILD_DIR to a writable folder") from exc
        if stamp.is_file():
            try:
                module = _import_built(build_dir) if _stamp_vouches(stamp, build_dir) else None
            except ImportError:  # a damaged build: make it again
                module = None
            if module is not None:
                return module
            stamp.unlink()
        # No stamp vouches for a library here (a build killed while linking, a damaged file): ninja
        # would take it for up to date and the import fail again, on every run; linked again.
        _drop_library(build_dir)
        # A build killed mid-way leaves torch's own lock file; ours says nobody is building now.
        with contextlib.suppress(FileNotFoundError):
            (build_dir / "lock").unlink()
        (build_dir / "family").write_text(family + "\n")
        _seed_from_previous(build_dir, family)
        sources = [str(p) for p in source_files(root, with_cuda)]
        verbose = os.environ.get("DEFECT_FAST_VERBOSE_BUILD", "") not in ("", "0")
        kind = "C++ and CUDA" if with_cuda else "C++"
        print(
            f"defect_fast: compiling the {kind} kernels from {root} into {build_dir} "
            "(once per source change; a full build takes a few minutes)",
            file=sys.stderr,
            flush=True,
        )
        old_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if with_cuda:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        try:
            module = cpp_extension.load(
                name=EXTENSION_NAME,
                sources=sources,
                extra_cflags=flags["cxx"],
                extra_cuda_cflags=flags["nvcc"] if with_cuda else None,
                extra_ldflags=flags["ld"],
                extra_include_paths=[str(root)],
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                verbose=verbose,
            )
        except Exception as exc:  # noqa: BLE001 - any failure becomes the reported reason
            log = build_dir / "build_error.log"
            with contextlib.suppress(OSError):
                log.write_text(str(exc))
            raise RuntimeError(f"{_error_tail(str(exc))} (full log: {log})") from exc
        finally:
            if with_cuda:
                if old_archs is None:
                    os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
                else:
                    os.environ["TORCH_CUDA_ARCH_LIST"] = old_archs
        with contextlib.suppress(FileNotFoundError):
            (build_dir / "build_error.log").unlink()
        lib = _library(build_dir)
        stamp.write_text(f"{digest}\n{torch.__version__}\n" + (f"{_library_record(lib)}\n" if lib else ""))
    with contextlib.suppress(OSError):
        _prune_family(build_dir, family)
    return module


def _load_aot():
    """``defect_fast._C`` or None, and why it was not used."""
    if os.environ.get("DEFECT_FAST_JIT", "") not in ("", "0"):
        return None, "DEFECT_FAST_JIT is set"
    if importlib.util.find_spec("defect_fast._C") is None:
        return None, "no ahead-of-time build"
    try:
        module = importlib.import_module("defect_fast._C")
    except ImportError as exc:
        return None, f"defect_fast._C does not load ({exc})"
    return module, ""


def _check_aot(module) -> None:
    """Warns when the ahead-of-time build is older than the sources or than torch."""
    import torch

    info = module.build_info()
    built = info.get("torch_version", "")
    if built.split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        warnings.warn(f"defect_fast._C was built against torch {built}, running torch {torch.__version__}", RuntimeWarning, stacklevel=3)
    root = csrc_dir()
    if root is not None and info.get("source_digest") not in (None, sources_digest(root)):
        warnings.warn(
            f"defect_fast._C was built from other sources than {root}; rebuild it or set DEFECT_FAST_JIT=1",
            RuntimeWarning,
            stacklevel=3,
        )


def _load_uncached():
    global _cuda_reason, _aot_skipped
    import torch  # noqa: F401 - libtorch must be loaded before the extension

    module, aot_reason = _load_aot()
    if module is not None:
        _check_aot(module)
        if not module.build_info().get("cuda"):
            _cuda_reason = "the ahead-of-time build has no CUDA kernels"
        return module, ""
    root = csrc_dir()
    if root is None:
        return None, f"{aot_reason}, and no csrc sources to compile (looked in {_PACKAGE_DIR / '_csrc'} and {_PACKAGE_DIR.parent / 'csrc'})"
    module, reason = _load_jit(root)
    if aot_reason.startswith("defect_fast._C does not load"):  # installed, but (e.g. after a torch upgrade) unusable
        _aot_skipped = aot_reason
        if module is not None:
            warnings.warn(f"defect_fast: {aot_reason}; the kernels compiled at first use run instead (reinstall with "
                          "pip install --no-build-isolation . to build it again)", RuntimeWarning, stacklevel=4)
        else:
            reason = f"{aot_reason}, and {reason}"
    return module, reason


def _load_jit(root: Path):
    """The kernels built (or reused) from ``root`` at first use: (module, "") or (None, why not)."""
    global _cuda_reason
    with_cuda, why_not = _cuda_toolkit()
    if with_cuda:
        try:
            return _jit_build(root, True), ""
        except Exception as exc:  # noqa: BLE001
            _cuda_reason = f"the CUDA build failed: {exc}"
            warnings.warn(f"defect_fast: {_cuda_reason}; building the CPU kernels only", RuntimeWarning, stacklevel=5)
    else:
        _cuda_reason = why_not
    try:
        return _jit_build(root, False), ""
    except Exception as exc:  # noqa: BLE001
        return None, f"building the native extension failed: {exc}"


def no_double_backward(name: str, *tensors) -> None:
    """Called by the native ops' backward: their backward kernels have no backward of their own,
    so a gradient of the gradient (``create_graph=True``) would come out None or zero; refused."""
    import torch

    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{name}: the native op has no double backward (create_graph=True); use "
                           f"defect_fast.ops.reference.{name} for gradients of its gradients")


def load():
    """The native module and ``""``, or ``None`` and a short reason (cached per process)."""
    global _result, _built_with_cuda
    if _result is not None:
        return _result
    with _lock:
        if _result is None:
            result = _load_uncached()
            _built_with_cuda = result[0] is not None and bool(result[0].build_info().get("cuda"))
            _result = result
    return _result


def register_autocast_float32(*qualnames: str) -> None:
    """Registers each ``defect_fast::<op>`` for autocast (CPU and CUDA): float16/bfloat16 inputs are
    upcast to float32 and the kernel runs with autocast off, as for autocast's own float32 ops.
    An older torch, without ``torch.library.register_autocast``, has none: the ops' Python
    functions upcast as ever, and ``torch.ops.defect_fast.*`` called under autocast takes the
    inputs as given."""
    import torch

    if not hasattr(torch.library, "register_autocast"):
        return
    for device_type in ("cpu", "cuda"):
        if not torch.amp.is_autocast_available(device_type):
            continue
        for name in qualnames:
            torch.library.register_autocast(name, device_type, torch.float32)


def has_cuda(device=None) -> bool:
    """Whether the extension has CUDA kernels, a GPU is visible, and they were built for that GPU
    (``device``, or the current GPU): a build for other GPUs (an ahead-of-time build made where
    another GPU, or none, was visible) would fail its first launch with "no kernel image is
    available"; it is warned about once per GPU, and :func:`cuda_reason` says why."""
    global _cuda_reason
    module, _ = load()
    if module is None or not _built_with_cuda:
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    index = torch.device(device).index if device is not None else None
    index = torch.cuda.current_device() if index is None else index
    if index not in _runs_on:
        archs = module.build_info().get("cuda_arch_list")
        capability = torch.cuda.get_device_capability(index)
        runs = True if not archs else arch_runs_on(archs, capability) is not False
        if not runs:
            major, minor = capability
            _cuda_reason = (f"the CUDA kernels were built for {archs}, not for cuda:{index} ({torch.cuda.get_device_name(index)}, "
                            f"compute capability {major}.{minor}); rebuild them with TORCH_CUDA_ARCH_LIST={major}.{minor} "
                            "(or DEFECT_FAST_JIT=1, which builds for the visible GPUs)")
            warnings.warn(f"defect_fast: {_cuda_reason}; using the PyTorch reference on it", RuntimeWarning, stacklevel=3)
        _runs_on[index] = runs
    return _runs_on[index]


def cuda_reason() -> str:
    """Why the extension has no CUDA kernels ("" when it has them or was not loaded)."""
    load()
    return _cuda_reason


def build_info() -> dict | None:
    """The extension's ``build_info()`` (see csrc/extension.cpp) plus its file, or None."""
    module, _ = load()
    if module is None:
        return None
    info = dict(module.build_info())
    path = getattr(module, "__file__", None)
    info["path"] = path
    if _aot_skipped:
        info["aot_skipped"] = _aot_skipped
    if info.get("source_digest") is None and path is not None:  # JIT: the stamp beside the library
        with contextlib.suppress(OSError, IndexError):
            info["source_digest"] = (Path(path).parent / "build.ok").read_text().split()[0]
    return info


__all__ = ["load", "has_cuda", "arch_runs_on", "cuda_reason", "build_info", "csrc_dir", "source_files", "sources_digest", "compile_flags"]
