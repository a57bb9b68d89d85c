"""Training: end to end on synthetic defects, resume after SIGKILL, run-folder safety."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from defect_fast.cli import evaluate_run, main
from defect_fast.train import RunError, TrainConfig, load_checkpoint, train

REPO = Path(__file__).resolve().parents[1]


def _cfg(root, **kw):
    base = dict(data=str(root), model="cmaae", image_size=128, batch_size=64, epochs=[3, 2],
                model_kwargs={"memory_size": 50}, checkpoint_every=1000, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_end_to_end_beats_chance(synthetic_root, tmp_path):
    train(_cfg(synthetic_root), tmp_path / "run", progress=False, log=lambda s: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    stage1 = [r["rec"] for r in log if r["stage"] == 1]
    assert sum(stage1[-3:]) < 0.9 * sum(stage1[:3]), "reconstruction did not improve"
    metrics = evaluate_run(tmp_path / "run", synthetic_root, device="cpu")
    # Chance is 0.5; synthetic scratches and spots on a regular texture must stand out.
    assert metrics["pixel_auroc"] > 0.8, metrics
    assert set(metrics["per_class"]) == {"scratch", "spot"}
    res = evaluate_run(tmp_path / "run", synthetic_root, map_kind="residual", device="cpu")
    assert res["map"] == "residual" and res["pixel_auroc"] > 0.6


def _state_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_sigkill_continues_exactly(synthetic_root, tmp_path):
    args = ["train", str(synthetic_root), "--model", "cmaae", "--image-size", "128", "--batch-size", "16",
            "--epochs", "2", "1", "--max-steps", "12", "6", "--checkpoint-every", "1", "--set", "memory_size=20", "--quiet"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "defect_fast.cli", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    step = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            ckpt = killed / "checkpoint.pt"
            if ckpt.exists():
                try:
                    step = load_checkpoint(ckpt)["position"]["global_step"]
                except RunError:
                    step = 0  # caught mid-rename; try again
                if step >= 14:  # inside stage 2
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (killed / "model.pt").exists()
    # An unfinished run is refused by evaluate with a hint, and restarting over it is refused.
    assert main(["evaluate", str(killed), str(synthetic_root)]) == 2
    assert main([*args, "--out", str(killed)]) == 2
    at_kill = load_checkpoint(killed / "checkpoint.pt")["position"]["global_step"]
    assert main(["train", str(synthetic_root), "--out", str(killed), "--resume", "--quiet"]) == 0
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 18 and at_kill >= 14
    # The resumed process started right after the checkpoint, not from step 1.
    assert steps.count(at_kill + 1) >= 1 and steps.count(1) == 1

    clean = tmp_path / "clean"
    assert main([*args, "--out", str(clean)]) == 0
    a = load_checkpoint(killed / "model.pt")["model_state"]
    b = load_checkpoint(clean / "model.pt")["model_state"]
    assert _state_equal(a, b), "resumed run differs from an uninterrupted one"


def test_run_folder_is_never_overwritten_silently(synthetic_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(RunError, match="not empty"):
        train(_cfg(synthetic_root, max_steps=[1, 1]), out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(RunError, match="nothing to resume"):
        train(_cfg(synthetic_root), tmp_path / "fresh", resume=True)


def test_empty_training_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and str(tmp_path / "empty") in err


def test_images_smaller_than_a_patch_are_refused(synthetic_root, tmp_path, capsys):
    assert main(["train", str(synthetic_root), "--out", str(tmp_path / "r"), "--image-size", "32", "--quiet"]) == 2
    assert "smaller than" in capsys.readouterr().err
