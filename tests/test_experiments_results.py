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


def test_scripts_say_a_missing_folder_in_one_line_and_find_the_shared_weights(tmp_path):
    """The Python scripts printed a traceback for a data folder or run that is not there (the
    message was its last line), and without $DEFECT_FAST_ALEXNET_WEIGHTS they fell through to a
    download, where lib.sh gives the shell scripts the shared weights."""
    import os

    out = ["--out", str(tmp_path / "out.json")]
    for script, args, said in (("model_free.py", [str(tmp_path / "no-data"), *out], "folder does not exist"),
                               ("refit_run.py", [str(tmp_path / "no-run")], "no such file"),
                               ("pixel_auroc_breakdown.py", [str(tmp_path / "no-run"), *out], "no such file")):
        res = subprocess.run([sys.executable, str(EXPERIMENTS / script), *args], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert res.returncode == 2 and res.stderr.startswith(f"{script}: error: ") and said in res.stderr, res.stderr
        assert len(res.stderr.splitlines()) == 1 and not (tmp_path / "out.json").exists()
    from results_file import SHARED_ALEXNET

    probe = tmp_path / "probe.py"
    probe.write_text(f"import os, sys\nsys.path.insert(0, {str(EXPERIMENTS)!r})\nfrom results_file import run_script\n"
                     "run_script(lambda argv: print(os.environ.get('DEFECT_FAST_ALEXNET_WEIGHTS')))\n")
    env = {k: v for k, v in os.environ.items() if k != "DEFECT_FAST_ALEXNET_WEIGHTS"}
    res = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (str(SHARED_ALEXNET) if SHARED_ALEXNET.is_file() else "None")
    res = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120,
                         env={**env, "DEFECT_FAST_ALEXNET_WEIGHTS": "/given/alexnet.pth"})
    assert res.stdout.strip() == "/given/alexnet.pth"  # a path given is kept
