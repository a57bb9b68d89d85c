"""Where an experiment's results go (:func:`defect_fast.safety.write_results_text`, as the benchmarks'):
never over a file that was there before this process first wrote to that path (a committed
result, another run's); those results go to the first free ``<stem>-<n><suffix>`` beside it,
said once on stderr. A process's own later writes to the path (a restartable script rewriting its
file row by row) replace its own file."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without an install

from defect_fast.safety import write_results_text as write_text  # noqa: E402

__all__ = ["write_text"]
