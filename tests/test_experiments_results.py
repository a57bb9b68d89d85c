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


def test_a_row_whose_runs_are_missing_fails_and_data_alone_is_taken(tmp_path):
    """magnetic_tile_v2.sh's v8 row (the README's headline figures, refits of the v7 runs) with no
    v7 runs in OUT printed "skip" lines and exited 0; DATA given alone was taken for a row name."""
    import os

    script = EXPERIMENTS / "magnetic_tile_v2.sh"
    env = {**os.environ, "RESULTS_DIR": str(tmp_path / "res")}
    res = subprocess.run(["bash", str(script), str(tmp_path / "data"), str(tmp_path / "out"), "v8"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "cmaae-v8: not done: cmaae-v7 is not trained in" in res.stderr
    assert not list((tmp_path / "res").glob("*.json"))
    # DATA alone: the default rows, whose names are checked; the copy stops there, before any training
    text = script.read_text()
    assert "\nDRY=\n" in text and 'cd "$(dirname "$0")/.."\n' in text and "OUT=${2:-runs/magnetic-tile}" in text
    checked = tmp_path / "checked.sh"  # (its default OUT in tmp_path: the script makes the folder)
    checked.write_text(text.replace("\nDRY=\n", "\nexit 0\n").replace('cd "$(dirname "$0")/.."\n',
                                                                   f"cd {EXPERIMENTS.parent}\n")
                       .replace("OUT=${2:-runs/magnetic-tile}", f"OUT=${{2:-{tmp_path / 'default-out'}}}"))
    res = subprocess.run(["bash", str(checked), str(tmp_path / "data")], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and "unknown row" not in res.stderr, res.stderr
