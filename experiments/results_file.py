"""Where an experiment's results go (:func:`defect_fast.safety.write_results_text`, as the benchmarks'):
never over a file that was there before this process first wrote to that path (a committed
result, another run's); those results go to the first free ``<stem>-<n><suffix>`` beside it,
said once on stderr. A process's own later writes to the path (a restartable script rewriting its
file row by row) replace its own file. Both write a temporary in the same folder first, which
then takes the name: a stop mid-write leaves no truncated file that a restart would take for
results.

:func:`replace_text` is for a file a script owns and makes again whole on every run (a summary
of the rows): it replaces the file there, atomically. :func:`provenance` is what every record
says of the code that wrote it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without an install

from defect_fast.safety import atomic_write_text as replace_text  # noqa: E402
from defect_fast.safety import write_results_text as write_text  # noqa: E402

__all__ = ["provenance", "replace_text", "write_text"]


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
