"""Where an experiment's results go (:func:`defect_fast.safety.write_results_text`, as the benchmarks'):
never over a file that was there before this process first wrote to that path (a committed
result, another run's); those results go to the first free ``<stem>-<n><suffix>`` beside it,
said once on stderr. A process's own later writes to the path (a restartable script rewriting its
file row by row) replace its own file. Both write a temporary in the same folder first, which
then takes the name: a stop mid-write leaves no truncated file that a restart would take for
results.

:func:`replace_text` is for a file a script owns and makes again whole on every run (a summary
of the rows): it replaces the file there, atomically. :func:`provenance` is what every record
says of the code that wrote it. :func:`run_script` runs a script's ``main`` as the commands run
theirs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without an install

from defect_fast.safety import atomic_write_text as replace_text  # noqa: E402
from defect_fast.safety import write_results_text as write_text  # noqa: E402

__all__ = ["provenance", "replace_text", "run_script", "write_text"]

#: The ImageNet AlexNet weights beside the checkout, as lib.sh gives them to the shell scripts.
SHARED_ALEXNET = ROOT.parent / "shared" / "weights" / "alexnet-features-imagenet.pth"


def run_script(main: Callable[[Sequence[str]], int | None]) -> NoReturn:
    """Exit with ``main(sys.argv[1:])``'s status, as :func:`defect_fast.safety.run_main` gives the
    commands theirs: a missing data folder, a damaged run, weights not found are one line
    ``<script>: error: ...`` (status 2), not a traceback; Ctrl-C is ``interrupted`` (130).
    ``$DEFECT_FAST_ALEXNET_WEIGHTS`` defaults to :data:`SHARED_ALEXNET` where that file is."""
    from defect_fast.safety import run_main

    if not os.environ.get("DEFECT_FAST_ALEXNET_WEIGHTS") and SHARED_ALEXNET.is_file():
        os.environ["DEFECT_FAST_ALEXNET_WEIGHTS"] = str(SHARED_ALEXNET)
    sys.exit(run_main(main, prog=Path(sys.argv[0]).name))


def provenance() -> dict:
    """{"package_version": defect_fast.__version__ or None, "git_commit": HEAD of this checkout, or
    None outside a git checkout (or without git)}. The commit says nothing of uncommitted changes."""
    import defect_fast

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package_version": getattr(defect_fast, "__version__", None), "git_commit": commit}
