"""experiments/results_file.py: an experiment never writes over results that were there before it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
from results_file import write_text  # noqa: E402


def test_earlier_results_are_kept_and_the_run_writes_beside_them(tmp_path, capsys):
    committed = tmp_path / "model-free-context.json"
    committed.write_text('{"pixel_auroc": 0.8692}\n')
    first = write_text(committed, '{"pixel_auroc": 0.8744}\n')
    assert first == tmp_path / "model-free-context-2.json" and committed.read_text() == '{"pixel_auroc": 0.8692}\n'
    assert "holds earlier results, kept" in capsys.readouterr().err
    assert write_text(committed, '{"pixel_auroc": 0.9}\n') == first  # the run's own file, rewritten
    assert json.loads(first.read_text()) == {"pixel_auroc": 0.9}
    fresh = tmp_path / "new" / "rows.json"
    assert write_text(fresh, "{}\n") == fresh and fresh.read_text() == "{}\n"


def test_scripts_say_their_usage():
    """Scripts that read sys.argv by hand took --help for a data folder (self_context_probe) or
    failed with an IndexError (record_eval); summarize rewrote summary.json when asked for help."""
    summary = EXPERIMENTS / "results" / "magnetic-tile" / "summary.json"
    before = summary.stat().st_mtime_ns if summary.exists() else None
    for script in ("self_context_probe.py", "record_eval.py", "summarize.py"):
        res = subprocess.run([sys.executable, str(EXPERIMENTS / script), "--help"], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0 and res.stdout.startswith("usage:"), (script, res.stderr[-500:])
    assert (summary.stat().st_mtime_ns if summary.exists() else None) == before
