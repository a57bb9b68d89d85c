"""Training: end to end on synthetic defects, resume after SIGKILL, run-folder safety."""
import json
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from defect_fast.cli import evaluate_run, main
import defect_fast.train as train_module
from defect_fast.data import load_train_images
from defect_fast.detect import Detector
from defect_fast.safety import OutputRefused
from defect_fast.train import ConfigError, RunError, TrainConfig, TrainingStopped, load_checkpoint, train

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
    # Same thread count as this process: float sums (and so Adam's first steps) depend on it.
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
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
    at_kill_state = load_checkpoint(killed / "checkpoint.pt")
    at_kill = at_kill_state["position"]["global_step"]
    assert at_kill_state["compute"] == train_module.compute_setting(torch.device("cpu"))  # so the resume is silent
    assert main(["train", str(synthetic_root), "--out", str(killed), "--resume", "--quiet"]) == 0
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 18 and at_kill >= 14
    # The resumed process started right after the checkpoint, not from step 1, and the steps logged
    # after that checkpoint by the killed process were dropped: each step is in the log once.
    assert steps == list(range(1, 19))

    clean = tmp_path / "clean"
    assert main([*args, "--out", str(clean)]) == 0
    # the time of the killed process counts: the finished run's training time includes it
    assert load_checkpoint(killed / "model.pt")["train_seconds"] > at_kill_state["train_seconds"] > 0
    a = load_checkpoint(killed / "model.pt")["model_state"]
    b = load_checkpoint(clean / "model.pt")["model_state"]
    assert _state_equal(a, b), "resumed run differs from an uninterrupted one"


@pytest.mark.parametrize("when", ["inside a step", "at the end of stage 1"])
def test_ctrl_c_stops_after_the_step_in_hand_and_the_resume_is_exact(synthetic_root, tmp_path, monkeypatch, when):
    """SIGINT inside a step (batch-norm statistics half updated) or while stage 1 hands over to
    stage 2 (CMA-AE freezes its memory there: another optimiser) stops after whole steps; the
    resumed run ends as an uninterrupted one, bit for bit."""
    cfg = _cfg(synthetic_root, batch_size=16, epochs=[2, 1], max_steps=[5, 3], model_kwargs={"memory_size": 20})
    train(cfg, tmp_path / "clean", progress=False, log=lambda s: None)
    trainer_cls = train_module.Trainer
    real_batch, real_optimizer = trainer_cls._batch, trainer_cls._optimizer
    calls = {"batch": 0}

    def batch(self, *args):
        calls["batch"] += 1
        if when == "inside a step" and calls["batch"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled at once; the step goes on
        return real_batch(self, *args)

    def optimizer(self, stage):
        if when == "at the end of stage 1" and stage == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_optimizer(self, stage)

    monkeypatch.setattr(trainer_cls, "_batch", batch)
    monkeypatch.setattr(trainer_cls, "_optimizer", optimizer)
    out = tmp_path / "run"
    with pytest.raises(RunError, match="interrupted at step"):
        train(cfg, out, progress=False, log=lambda s: None)
    pos = load_checkpoint(out / "checkpoint.pt")["position"]
    assert (pos["stage"], pos["global_step"]) == ((0, 3) if when == "inside a step" else (1, 5))
    monkeypatch.setattr(trainer_cls, "_batch", real_batch)
    monkeypatch.setattr(trainer_cls, "_optimizer", real_optimizer)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    train(cfg, out, resume=True, progress=False, log=lambda s: None)
    a, b = load_checkpoint(out / "model.pt"), load_checkpoint(tmp_path / "clean" / "model.pt")
    assert _state_equal(a["model_state"], b["model_state"])
    assert a["calibration"]["image_threshold"] == b["calibration"]["image_threshold"]


@pytest.mark.parametrize("during", ["save", "digest"])
def test_a_signal_while_the_model_file_is_written_ends_the_run_complete(synthetic_root, tmp_path, monkeypatch, during):
    """Ctrl-C while model.pt was written reached torch's zip writer: an internal error with a
    traceback, or an abort. And a stop while its digest was computed came before the save held
    signals: the run was said to be complete, the checkpoint was removed, and with no model file
    either the whole run folder was discarded as a start that never began. The file is written
    whole first; the run is then complete, and says so."""
    import defect_fast.safety as safety

    sent = []

    def stop_once(obj):
        if isinstance(obj, dict) and "image_keys" in obj and not sent:  # the model file's (a checkpoint has none)
            sent.append(os.kill(os.getpid(), signal.SIGINT))

    if during == "save":
        real_save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, fh, *a, **k: (stop_once(obj), real_save(obj, fh, *a, **k))[1])
    else:
        real_digest = safety.state_digest
        monkeypatch.setattr(safety, "state_digest", lambda body: (stop_once(body), real_digest(body))[1])
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"^interrupted as the run ended: .*model.pt is written whole, the run is complete$"):
        train(_cfg(synthetic_root, max_steps=[2, 1]), out, progress=False, log=lambda s: None)
    assert sent and load_checkpoint(out / "model.pt")["calibration"]["image_threshold"] is not None
    assert not (out / "checkpoint.pt").exists() and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_after_the_statistics_before_the_model_file_keeps_the_checkpoint(synthetic_root, tmp_path, monkeypatch):
    """A stop between the end of the statistics and the model file's save said only "interrupted"
    (or, inside the save's first steps, that the run was complete while nothing was written): the
    checkpoint stays, the message says --resume, and the resume finishes the run."""
    import defect_fast.data.io as io

    real = io.proportions

    def proportions(sizes):  # the training images' width:height range, taken as the model file is made
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "proportions", proportions)
    out = tmp_path / "run"
    cfg = _cfg(synthetic_root, max_steps=[2, 1])
    with pytest.raises(RunError, match=r"^interrupted before .*model.pt was written; the trained weights are kept, "
                                       r"continue with --resume \(run folder .*\)$"):
        train(cfg, out, progress=False, log=lambda s: None)
    assert (out / "checkpoint.pt").is_file() and not (out / "model.pt").exists()
    monkeypatch.setattr(io, "proportions", real)
    train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert load_checkpoint(out / "model.pt")["calibration"]["image_threshold"] is not None
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("signum, where", [(signal.SIGTERM, "step"), (signal.SIGINT, "step"), (signal.SIGINT, "finish")])
def test_a_stopped_training_ends_as_a_stop_not_as_a_user_s_mistake(synthetic_root, tmp_path, signum, where):
    """A training stopped by SIGTERM or Ctrl-C, its progress saved, ended with "error:" and status
    2, the status of a bad argument (a service manager marked the unit failed); a stop in the
    steps after training said only "interrupted", not that --resume finishes the run."""
    out = tmp_path / "run"
    code = f"""
import os, signal, sys
import defect_fast.train as t
real_batch, calls = t.Trainer._batch, []
def batch(self, *args):
    calls.append(1)
    if {where!r} == "step" and len(calls) == 3:
        os.kill(os.getpid(), {int(signum)})
    return real_batch(self, *args)
def finish(*args, **kwargs):
    os.kill(os.getpid(), {int(signum)})
t.Trainer._batch = batch
if {where!r} == "finish":
    t.finish_run = finish
from defect_fast.cli import main
sys.exit(main(["train", {str(synthetic_root)!r}, "--out", {str(out)!r}, "--image-size", "64", "--batch-size", "16",
               "--epochs", "2", "1", "--max-steps", "5", "3", "--set", "memory_size=20", "--quiet"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == (-signal.SIGTERM if signum == signal.SIGTERM else 130), proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    said = "interrupted at step 3; progress saved" if where == "step" else \
        "interrupted in the map statistics and calibration after training; the trained weights are kept"
    assert last.startswith(f"defect-fast: {said}") and "error" not in last, proc.stderr
    assert f"continue with --resume (run folder {out})" in last
    assert (out / "checkpoint.pt").is_file() and not (out / "model.pt").exists()


def test_a_non_finite_loss_saves_nothing_of_its_step(synthetic_root, tmp_path, monkeypatch):
    """The step that gave NaN already moved the batch-norm statistics and the weights in memory:
    the checkpoint keeps the step before, and the message says a resume would meet the same step."""
    trainer_cls = train_module.Trainer
    real_batch, calls = trainer_cls._batch, {"n": 0}

    def batch(self, *args):
        calls["n"] += 1
        x, y = real_batch(self, *args)
        return (x * float("nan"), y) if calls["n"] == 3 else (x, y)

    monkeypatch.setattr(trainer_cls, "_batch", batch)
    out = tmp_path / "run"
    cfg = _cfg(synthetic_root, batch_size=16, max_steps=[5, 3], checkpoint_every=1, model_kwargs={"memory_size": 20})
    with pytest.raises(RunError, match="loss became nan at stage 1, epoch 1, step 3;.*keeps the state.*lower --lr"):
        train(cfg, out, progress=False, log=lambda s: None)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["position"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model_state"].values() if v.is_floating_point())
    calls["n"] = 0  # before the first checkpoint: no checkpoint to speak of
    cfg = _cfg(synthetic_root, batch_size=16, max_steps=[5, 3], checkpoint_every=100, model_kwargs={"memory_size": 20})
    with pytest.raises(RunError, match="step 3; nothing was saved: train a new run with a lower --lr"):
        train(cfg, tmp_path / "run2", progress=False, log=lambda s: None)


def test_a_training_step_reads_one_value_set_from_the_device(tmp_path):
    """The loss and its parts reach the host in one transfer per step: on a GPU each read waits for
    the device, and a check of the loss, a float() of each part and a synchronize for the step's
    time made five waits a step."""
    import collections
    import traceback

    from torch.overrides import TorchFunctionMode

    reads = {"item", "tolist", "__float__", "__bool__", "__int__", "nonzero"}

    class HostReads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.sites = collections.Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in reads:
                here = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}defect_fast{os.sep}" in f.filename]
                if here and ("models" in Path(here[-1].filename).parts or here[-1].filename.endswith("train.py")):
                    self.sites[(Path(here[-1].filename).name, name)] += 1
            return func(*args, **(kwargs or {}))

    for model, kwargs in (("cmaae", {"memory_size": 20}), ("awae", {"loss_mode": "ssim_l1", "two_stage": True})):
        cfg = TrainConfig(data="x", model=model, model_kwargs=kwargs, image_size=128, batch_size=8, epochs=[1, 1],
                          max_steps=[2, 2], checkpoint_every=100, device="cpu", seed=0, anomaly_source=None)
        images = torch.randint(0, 256, (3, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        (tmp_path / model).mkdir()
        trainer = train_module.Trainer(cfg, tmp_path / model, images, progress=False, log=lambda s: None)
        mode = HostReads()
        with mode:
            trainer.run()
        steps = len((tmp_path / model / "log.jsonl").read_text().splitlines())
        assert steps >= 2 and mode.sites == {("train.py", "tolist"): steps}, (model, mode.sites)


def test_a_resume_drops_the_log_lines_after_its_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"stage": 1, "epoch": 1, "step": k, "loss": 1.0 / k}) + "\n" for k in range(1, 6)]
    log.write_text("".join(lines) + '{"stage": 1, "st')  # steps 4-5 after the checkpoint, then a torn line
    train_module._trim_log(log, 3)
    assert log.read_text() == "".join(lines[:3])
    train_module._trim_log(log, 3)  # nothing more to drop
    assert log.read_text() == "".join(lines[:3])
    # a crash can leave bytes that are not UTF-8 (a line cut in a character): dropped, not fatal
    log.write_bytes("".join(lines[:4]).encode() + b'{"stage": 1, "note": "\xc3')
    train_module._trim_log(log, 3)
    assert log.read_text() == "".join(lines[:3])


def stop_after_training(cfg, out: Path, monkeypatch) -> None:
    """Train ``cfg`` into ``out`` with the steps after training (statistics, calibration) failing:
    the run is left with its last checkpoint and no model file, as after a power cut there."""
    real = train_module.finish_run

    def fails(*args, **kwargs):
        raise RuntimeError("stopped after training")

    monkeypatch.setattr(train_module, "finish_run", fails)
    with pytest.raises(RuntimeError, match="stopped after training"):
        train(cfg, out, progress=False, log=lambda s: None)
    monkeypatch.setattr(train_module, "finish_run", real)
    assert (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()


@pytest.mark.parametrize("model", ["cmaae", "awae"])
def test_resume_after_a_failure_past_training_finishes_the_run(synthetic_root, tmp_path, monkeypatch, model):
    """A run stopped after its last step (in the statistics and calibration) resumes there and
    says so, instead of naming a stage the model does not have (the AW-SSIM AE's optimiser for
    "stage 3" raised: such a run never finished)."""
    out = tmp_path / "run"
    # (the AW-SSIM AE in one stage: its second needs the ImageNet weights of LPIPS)
    kw = ({"max_steps": [2, 2]} if model == "cmaae" else
          {"model": "awae", "model_kwargs": {"patch_size": 32, "two_stage": False}, "batch_size": 16, "epochs": [4],
           "max_steps": [4]})
    stop_after_training(_cfg(synthetic_root, **kw), out, monkeypatch)
    messages = []
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # a resume elsewhere: said, since the sums round otherwise
    try:
        train(_cfg(synthetic_root, **kw), out, resume=True, progress=False, log=messages.append)
    finally:
        torch.set_num_threads(threads)
    assert any(f"resuming with threads {threads + 1} where the run trained with threads {threads}: " in m
               and "bit for bit" in m for m in messages), messages
    assert any("training is complete" in m for m in messages), messages
    assert not any("at stage 3" in m for m in messages), messages
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 4 and len(steps) == 4  # no step trained again
    assert (out / "model.pt").exists()


def test_a_checkpoint_a_finished_run_failed_to_remove_goes_at_the_next_resume(synthetic_root, tmp_path, monkeypatch):
    """A stop between model.pt's rename and the checkpoint's removal kept the checkpoint for good
    beside the finished model. Only that checkpoint goes: one of other weights stays."""
    import shutil

    from defect_fast.safety import attach_digest

    out = tmp_path / "run"
    stop_after_training(_cfg(synthetic_root, max_steps=[2, 1]), out, monkeypatch)
    shutil.copy(out / "checkpoint.pt", tmp_path / "last.pt")
    train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)
    model = (out / "model.pt").read_bytes()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state.pop("tensor_digest")
    key = next(iter(state["model_state"]))
    state["model_state"][key] = state["model_state"][key] + 1
    torch.save(attach_digest(state), out / "checkpoint.pt")  # other weights: not the finished run's
    with pytest.raises(RunError, match=r"the run is finished \(model.pt is written\); nothing to resume$"):
        train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)
    assert (out / "checkpoint.pt").exists()
    shutil.copy(tmp_path / "last.pt", out / "checkpoint.pt")  # as the stop left it
    with pytest.raises(RunError, match="nothing to resume; its checkpoint.pt, left by a stop just after model.pt was "
                                       "written, is removed"):
        train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)
    assert not (out / "checkpoint.pt").exists() and (out / "model.pt").read_bytes() == model


def test_a_damaged_model_file_or_a_checkpoint_removed_by_hand_are_said_as_such(synthetic_root, tmp_path, monkeypatch):
    """A damaged model.pt beside its checkpoint was called a finished run; a checkpoint removed
    after a stage was said to be one never written."""
    import shutil

    out = tmp_path / "run"
    stop_after_training(_cfg(synthetic_root, max_steps=[2, 1]), out, monkeypatch)
    shutil.copy(out / "checkpoint.pt", tmp_path / "last.pt")
    (out / "model.pt").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(RunError, match=r"model.pt: .*; the run's checkpoint.pt is kept: move model.pt away, then "
                                       r"--resume finishes the run again$"):
        train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)
    (out / "model.pt").unlink()
    train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)  # as it says
    (out / "model.pt").unlink()
    with pytest.raises(RunError, match=r"nothing to resume: its checkpoint.pt is gone \(it trained past stage2.pt\); "
                                       r"start the run again .*--overwrite instead of --resume$"):
        train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)


def test_a_run_begun_on_a_gpu_that_is_gone_resumes_on_another_device(synthetic_root, tmp_path, monkeypatch, capsys):
    """--resume kept the run's --device and refused a new one: a run begun with --device cuda
    could not go on once that GPU was not usable (the two messages told the user to do both)."""
    from defect_fast.runs import atomic_save

    out = tmp_path / "run"
    stop_after_training(_cfg(synthetic_root, max_steps=[2, 2]), out, monkeypatch)
    state = load_checkpoint(out / "checkpoint.pt")
    state["train_config"] = {**state["train_config"], "device": "cuda:7"}  # as a run begun on a GPU wrote it
    state.pop("tensor_digest", None)
    atomic_save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", str(synthetic_root), "--out", str(out), "--resume", "--quiet"]) == 2
    assert "cuda" in capsys.readouterr().err
    assert main(["train", str(synthetic_root), "--out", str(out), "--resume", "--quiet", "--device", "cpu"]) == 0
    assert "resuming on --device cpu; the run started with --device cuda:7" in capsys.readouterr().out
    assert (out / "model.pt").is_file()


def _stopped_run(root, out, monkeypatch):
    """A run stopped after its training steps (checkpoint, no model file)."""
    real = train_module.finish_run

    def fails(*args, **kwargs):
        raise RuntimeError("stopped after training")

    monkeypatch.setattr(train_module, "finish_run", fails)
    with pytest.raises(RuntimeError, match="stopped after training"):
        train(_cfg(root, max_steps=[2, 1]), out, progress=False, log=lambda s: None)
    monkeypatch.setattr(train_module, "finish_run", real)
    assert (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()


def test_resume_continues_on_the_run_s_own_images_and_settings(synthetic_root, tmp_path, monkeypatch, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "train", data / "train")
    out = tmp_path / "run"
    _stopped_run(data, out, monkeypatch)
    # options of a new run with --resume: refused, naming them (the saved settings would win silently)
    assert main(["train", str(data), "--out", str(out), "--resume", "--model", "awae", "--image-size", "256"]) == 2
    err = capsys.readouterr().err
    assert "--model, --image-size" in err and "--resume continues" in err
    assert main(["train", str(data), "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a seed torch's generators cannot take, refused before anything is touched (it failed at the
    # first draw, after an --overwrite had cleared the earlier run)
    assert main(["train", str(data), "--out", str(tmp_path / "new"), "--seed", str(2**64)]) == 2
    assert "--seed must be a whole number from 0 to 2**64 - 1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # also an option typed with its default's value (the run started otherwise: it was taken silently)
    for typed in (["--lr", "0.0002"], ["--model", "cmaae"], ["--batch-size", "512"], ["--no-level-brightness"],
                  ["--lr=0.0002"], ["--no-level-bri"], ["--lr-sch", "cosine"]):
        assert main(["train", str(data), "--out", str(out), "--resume", *typed]) == 2
        assert f"drop {typed[0].split('=')[0]} " in capsys.readouterr().err  # as typed: a switch's --no- form too
    # another data folder, of other images (one of the same images is a move: see below)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    sorted((other / "train" / "good").iterdir())[-1].unlink()
    with pytest.raises(RunError, match="continues it on those images, and .* holds others"):
        train(_cfg(other), out, resume=True, progress=False, log=lambda s: None)
    # the same folder with other images in it
    first, second = sorted((data / "train" / "good").iterdir())[:2]
    first.rename(first.with_name("moved.txt"))
    said = []
    with pytest.raises(RunError, match=rf"training images changed since the run started \(removed: {first.name}\)"):
        train(_cfg(data), out, resume=True, progress=False, log=said.append, device="cpu")
    assert said == []  # a refused resume is not announced first (nor its other --device)
    first.with_name("moved.txt").rename(first)
    # one pixel of one image: named (it said "32 then, 32 now, other content")
    original = second.read_bytes()
    from PIL import Image

    img = Image.open(second)
    img.load()
    img.putpixel((0, 0), tuple(255 - v for v in img.getpixel((0, 0))) if img.mode == "RGB" else 255 - img.getpixel((0, 0)))
    img.save(second)
    with pytest.raises(RunError, match=rf"training images changed since the run started \(changed: {second.name}\)"):
        train(_cfg(data), out, resume=True, progress=False, log=lambda s: None)
    second.write_bytes(original)
    train(_cfg(data), out, resume=True, progress=False, log=lambda s: None)  # restored: it resumes
    assert (out / "model.pt").exists()
    with pytest.raises(RunError, match="the run is finished"):
        train(_cfg(data), out, resume=True, progress=False, log=lambda s: None)


def test_a_finished_run_keeps_its_models_not_the_optimiser(synthetic_root, tmp_path):
    """A finished run kept checkpoint.pt and its last stage file with the optimiser's moments
    (twice the weights each: 180 MB of a CMA-AE run's 250), though it resumes no more."""
    out = tmp_path / "run"
    train(_cfg(synthetic_root, max_steps=[2, 2]), out, progress=False, log=lambda s: None)
    assert not (out / "checkpoint.pt").exists()
    model = torch.load(out / "model.pt", weights_only=True)
    for stage in ("stage1.pt", "stage2.pt"):
        state = torch.load(out / stage, weights_only=True)
        assert "optimizer_state" not in state and state["model_state"].keys() == model["model_state"].keys()
    final = torch.load(out / "stage2.pt", weights_only=True)["model_state"]
    assert all(torch.equal(final[k], v) for k, v in model["model_state"].items())
    with pytest.raises(RunError, match=r"the run is finished \(model.pt is written\); nothing to resume"):
        train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)
    assert main(["evaluate", str(out), str(synthetic_root)]) == 0
    # a Ctrl-C (or SIGTERM, or a closed pipe) during the closing lines, after the model file and
    # the checkpoint's removal: the finished run stays (it was taken for a failed start and removed)
    def log(line):
        if line.startswith("trained "):
            raise KeyboardInterrupt

    late = tmp_path / "late"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synthetic_root, max_steps=[2, 2]), late, progress=False, log=log)
    assert (late / "model.pt").is_file() and not (late / "checkpoint.pt").exists()


def test_a_resume_refuses_changed_anomaly_source_photos_and_a_model_file_as_its_checkpoint(synthetic_root, tmp_path,
                                                                                            monkeypatch):
    """Source photos changed between the stop and the resume were taken silently (the rest of the
    run cut its anomalies from others: another model than an uninterrupted run's); a finished
    model.pt put in the checkpoint's place was a KeyError (an internal error)."""
    import shutil

    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        shutil.copy(sorted((synthetic_root / "train" / "good").iterdir())[i], src / f"{i}.png")
    real = train_module.finish_run
    monkeypatch.setattr(train_module, "finish_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="stop"):
        train(_cfg(synthetic_root, max_steps=[2, 1], anomaly_source=str(src)), out, progress=False, log=lambda s: None)
    monkeypatch.setattr(train_module, "finish_run", real)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["sources_digest"].startswith("sha256:")
    kept = (src / "0.png").read_bytes()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(src / "0.png")
    with pytest.raises(RunError, match=f"{src}: the anomaly source photos changed since the run started"):
        train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)
    (src / "0.png").write_bytes(kept)
    shutil.copy(out / "checkpoint.pt", tmp_path / "checkpoint.pt")
    train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)  # restored: it resumes
    (out / "model.pt").rename(tmp_path / "model.pt")
    shutil.copy(tmp_path / "model.pt", out / "checkpoint.pt")
    with pytest.raises(RunError, match="checkpoint.pt"):
        train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)


def test_a_checkpoint_that_does_not_fit_this_version_is_refused_in_one_line(synthetic_root, tmp_path, monkeypatch):
    """A checkpoint whose digest holds but whose contents do not fit this version's model (a
    parameter renamed or resized since, the optimiser of another model, a position of other
    keys) ended in a traceback and "internal error" (KeyError, RuntimeError, ValueError)."""
    import shutil

    from defect_fast.safety import attach_digest

    monkeypatch.setattr(train_module, "finish_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="stop"):
        train(_cfg(synthetic_root, max_steps=[2, 1]), out, progress=False, log=lambda s: None)
    shutil.copy(out / "checkpoint.pt", tmp_path / "good.pt")

    def renamed(s):
        key = next(iter(s["model_state"]))
        s["model_state"][key + "_v1"] = s["model_state"].pop(key)

    def resized(s):
        key = next(k for k, v in s["model_state"].items() if v.dim() == 4)
        s["model_state"][key] = s["model_state"][key][:, :1].clone()

    def optimiser(s):
        s["optimizer_state"]["param_groups"][0]["params"] = s["optimizer_state"]["param_groups"][0]["params"][:-1]

    def position(s):
        s["position"] = {"stage": 0, "step": 2}

    for edit, words in ((renamed, "does not load into this version's cmaae"), (resized, "does not load into this version's"),
                        (optimiser, "does not load into this version's"), (position, "its position in the training")):
        state = torch.load(tmp_path / "good.pt", weights_only=True)
        state.pop("tensor_digest", None)
        edit(state)
        torch.save(attach_digest(state), out / "checkpoint.pt")
        with pytest.raises(RunError) as info:
            train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)
        message = str(info.value)
        assert message.startswith(f"{out / 'checkpoint.pt'}: {words}") and "\n" not in message, edit.__name__
        assert message.endswith("the run cannot be resumed, train a new one"), edit.__name__
    # the device's trouble while the moments move there is not the checkpoint's: told as it is
    shutil.copy(tmp_path / "good.pt", out / "checkpoint.pt")

    def no_memory(self, state):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.optim.Adam, "load_state_dict", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train(_cfg(synthetic_root), out, resume=True, progress=False, log=lambda s: None)


def test_another_run_s_checkpoint_copied_into_a_run_folder_is_refused(synthetic_root, tmp_path, monkeypatch):
    """Another run's checkpoint.pt put into a run folder was resumed without a word: the folder's
    config.json then described another training (seed, batch size) than its model.pt's."""
    import shutil

    monkeypatch.setattr(train_module, "finish_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    for name, seed in (("a", 0), ("b", 7)):
        with pytest.raises(RuntimeError, match="stop"):
            train(_cfg(synthetic_root, max_steps=[2, 1], seed=seed), tmp_path / name, progress=False, log=lambda s: None)
    shutil.copy(tmp_path / "a" / "checkpoint.pt", tmp_path / "a.pt")
    shutil.copy(tmp_path / "b" / "checkpoint.pt", tmp_path / "a" / "checkpoint.pt")
    with pytest.raises(RunError, match=r"checkpoint.pt: is not this folder's run: its settings differ from .*config.json's "
                                       r"\(seed 7 vs 0, other held_back\)"):
        train(_cfg(synthetic_root), tmp_path / "a", resume=True, progress=False, log=lambda s: None)
    shutil.copy(tmp_path / "a.pt", tmp_path / "a" / "checkpoint.pt")  # its own again: resumed
    with pytest.raises(RuntimeError, match="stop"):
        train(_cfg(synthetic_root), tmp_path / "a", resume=True, progress=False, log=lambda s: None)


def test_a_run_s_own_checkpoint_is_its_run_s_whatever_form_its_settings_took(tmp_path):
    """The check against config.json refused a run's own checkpoint when the Python API gave a list
    setting as a tuple (config.json holds a list) and, for runs of earlier versions, when a resume
    had resolved "auto" precision in the checkpoint but not in config.json."""
    cfg = TrainConfig(data="/data/tile", model="cmaae", epochs=(1, 1), max_steps=(3, 2), precision="auto")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json()))
    import dataclasses

    for mine in (cfg, dataclasses.replace(cfg, precision="bfloat16"), dataclasses.replace(cfg, device="cuda:1")):
        train_module._check_same_run(tmp_path, mine, tmp_path / "checkpoint.pt")
    with pytest.raises(RunError, match="seed 3 vs 0"):
        train_module._check_same_run(tmp_path, dataclasses.replace(cfg, seed=3), tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_damaged_config_json_is_said_and_written_again_from_the_checkpoint(tmp_path, damage, capsys):
    """A resume went on without a word when config.json was gone or damaged, and the finished run
    kept the damaged file or none: the record a run is restarted from, and the only check that a
    checkpoint copied in is this folder's."""
    cfg = TrainConfig(data="/data/tile", model="cmaae", epochs=(1, 1), max_steps=(3, 2), seed=4)
    if damage == "truncated":
        (tmp_path / "config.json").write_text(json.dumps(cfg.to_json())[:40])
    train_module._check_same_run(tmp_path, cfg, tmp_path / "checkpoint.pt")
    err = capsys.readouterr().err
    assert err.startswith(f"defect-fast: warning: {tmp_path / 'config.json'} is "
                          f"{'missing' if damage == 'missing' else 'unreadable (JSONDecodeError)'}: the checkpoint "
                          "cannot be checked to be this folder's run; config.json is written again from checkpoint.pt's "
                          "settings"), err
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(cfg.to_json()))


def test_a_resume_never_switches_the_run_s_loss_definition(synthetic_root, tmp_path, monkeypatch):
    """A checkpoint records the revision of the losses whose definition changed between versions
    (the SSIM-family input range); a resume under another one is refused, one that records
    nothing (written before the record) goes on with a warning, and a model without such a loss
    is not concerned."""
    from defect_fast.losses.ssim import INPUT_RANGE_REVISION
    from defect_fast.runs import atomic_save

    real = train_module.finish_run
    monkeypatch.setattr(train_module, "finish_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    out = tmp_path / "run"
    cfg = _cfg(synthetic_root, max_steps=[2, 1], model_kwargs={"memory_size": 20, "rec_loss": "ssim"})
    with pytest.raises(RuntimeError, match="stop"):
        train(cfg, out, progress=False, log=lambda s: None)
    monkeypatch.setattr(train_module, "finish_run", real)
    ckpt = out / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    assert state["objective"] == {"ssim_input_range": INPUT_RANGE_REVISION}
    atomic_save({**state, "objective": {"ssim_input_range": INPUT_RANGE_REVISION - 1}}, ckpt)
    with pytest.raises(RunError, match=rf"ssim_input_range {INPUT_RANGE_REVISION - 1} then, {INPUT_RANGE_REVISION} now"):
        train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert load_checkpoint(ckpt)["position"] == state["position"] and not (out / "model.pt").exists()
    atomic_save({k: v for k, v in state.items() if k != "objective"}, ckpt)
    messages = []
    train(cfg, out, resume=True, progress=False, log=messages.append)
    assert any("does not record which SSIM loss" in m for m in messages), messages
    assert (out / "model.pt").exists()
    assert train_module.build_model("cmaae", memory_size=20).objective() == {}  # L1: nothing to record
    assert train_module.build_model("awae").objective() == {"ssim_input_range": INPUT_RANGE_REVISION}


def test_a_holdback_that_leaves_nothing_to_train_on_is_refused(synthetic_root, tmp_path):
    """It was taken as "too few images to hold back 4" and trained with none held back."""
    with pytest.raises(ConfigError, match=r"--holdback 0.99 holds back \d+ of the \d+ images and leaves none"):
        train(_cfg(synthetic_root, holdback=0.99), tmp_path / "run", progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_training_says_how_many_images_and_warns_of_held_back_copies(synthetic_root, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "train" / "good", data)
    for p in sorted(data.glob("*.png")):
        shutil.copy(p, p.with_name(p.stem + " (copy).png"))
    messages = []
    train(_cfg(data, max_steps=[1, 1], holdback=0.3), tmp_path / "run", progress=False, log=messages.append)
    n = len(list(data.glob("*.png")))
    assert any(m.startswith(f"{n} images in {data}: ") and "held back for the thresholds" in m for m in messages), messages
    assert "identical copies among the training images" in capsys.readouterr().err


def test_run_folder_is_never_overwritten_silently(synthetic_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for overwrite in (False, True):  # a folder defect-fast did not write is refused even with overwrite
        with pytest.raises(OutputRefused, match="not empty"):
            train(_cfg(synthetic_root, max_steps=[1, 1]), out, progress=False, overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(RunError, match="nothing to resume"):
        train(_cfg(synthetic_root), tmp_path / "fresh", resume=True)


def test_a_run_killed_before_its_first_checkpoint_starts_again_on_resume(synthetic_root, tmp_path, monkeypatch):
    """kill -9 before the first checkpoint leaves the run's folder with its config and log only:
    --resume starts it again from the beginning with the settings in its config.json (its options
    not typed again) and ends as an uninterrupted run does; a folder without them is refused."""
    from defect_fast.safety import RunInUse, RunLock

    cfg = _cfg(synthetic_root, max_steps=[1, 1], model_kwargs={"memory_size": 20}, batch_size=16)
    out = tmp_path / "run"

    class Killed(BaseException):  # no handler runs: what kill -9 leaves, before any checkpoint
        pass

    def killed(self):
        raise Killed

    def kill_before_the_first_checkpoint(out):
        monkeypatch.setattr(train_module.Trainer, "run", killed)
        monkeypatch.setattr(train_module.OutputFolder, "discard", lambda self: None)  # no clean-up after kill -9
        with pytest.raises(Killed):
            train(cfg, out, progress=False, log=lambda s: None)
        monkeypatch.undo()

    kill_before_the_first_checkpoint(out)
    assert (out / "config.json").is_file() and not (out / "checkpoint.pt").exists()
    # a run still training before its first checkpoint (its lock held) is in use, not stopped
    lock = RunLock(out).acquire()
    try:
        with pytest.raises(RunInUse):
            train(TrainConfig(data=str(synthetic_root)), out, resume=True, progress=False)
    finally:
        lock.release()
    # started again, and stopped by a full disk before its first checkpoint: its settings stay, and
    # the same command (the advice given) starts it again once more (they went with the failed start)
    real = train_module.atomic_save

    def full(obj, path, *a, **k):  # the first checkpoint, at the end of the first stage (stage1.pt written)
        if Path(path).name == "checkpoint.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path, *a, **k)

    monkeypatch.setattr(train_module, "atomic_save", full)
    with pytest.raises(OSError, match="no checkpoint was saved yet: make room, then run the same command again"):
        train(TrainConfig(data=str(synthetic_root)), out, resume=True, progress=False, log=lambda s: None)
    monkeypatch.undo()
    assert (out / "config.json").is_file() and not (out / "checkpoint.pt").exists() and not (out / "stage1.pt").exists()
    # Ctrl-C in it before its first checkpoint: what was said ("nothing was saved to resume from") hid
    # that --resume starts it again, its settings kept
    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.Trainer, "_batch", interrupted)
    with pytest.raises(TrainingStopped, match="interrupted before the first checkpoint; --resume starts the run again"):
        train(TrainConfig(data=str(synthetic_root)), out, resume=True, progress=False, log=lambda s: None)
    monkeypatch.undo()
    messages = []
    # only the images are given, as `defect-fast train DATA --out RUN --resume` gives them
    assert train(TrainConfig(data=str(synthetic_root)), out, resume=True, progress=False,
                 log=messages.append) == out / "model.pt"
    assert any("stopped before its first checkpoint.pt" in m and "starts again from the beginning" in m
               for m in messages), messages
    clean = tmp_path / "clean"
    train(cfg, clean, progress=False, log=lambda s: None)
    assert _state_equal(load_checkpoint(out / "model.pt")["model_state"],
                        load_checkpoint(clean / "model.pt")["model_state"])
    assert json.loads((out / "config.json").read_text()) == json.loads((clean / "config.json").read_text())

    # refused before anything is said of starting again (images not found)
    again = tmp_path / "again"
    kill_before_the_first_checkpoint(again)
    said = []
    with pytest.raises(Exception, match="nowhere"):
        train(TrainConfig(data=str(tmp_path / "nowhere")), again, resume=True, progress=False, log=said.append)
    assert said == [] and (again / "config.json").is_file()
    # a run another process finished while this one read the images is left as it is, not cleared
    import defect_fast.data as data_module

    real_load = data_module.load_train_images

    def finished_meanwhile(*args, **kwargs):
        got = real_load(*args, **kwargs)
        (again / "model.pt").write_bytes((out / "model.pt").read_bytes())
        return got

    monkeypatch.setattr(data_module, "load_train_images", finished_meanwhile)
    said = []
    with pytest.raises(RunError, match=r"another process finished or resumed the run while this one read its images "
                                       r"\(model.pt is there now\); nothing is started again$"):
        train(TrainConfig(data=str(synthetic_root)), again, resume=True, progress=False, log=said.append)
    monkeypatch.undo()
    assert not any("starts again" in m for m in said), said  # not announced, then refused
    assert (again / "model.pt").read_bytes() == (out / "model.pt").read_bytes() and (again / "config.json").is_file()

    # without a readable config.json there is nothing to start again from: refused, saying so
    bare = tmp_path / "bare"
    kill_before_the_first_checkpoint(bare)
    (bare / "config.json").write_text("{")
    with pytest.raises(RunError, match=r"nothing to resume: the run stopped before its first checkpoint.pt and its "
                                       r"config.json is unreadable \(JSONDecodeError\); start it again with the "
                                       r"options it was started with and --overwrite instead of --resume$"):
        train(TrainConfig(data=str(synthetic_root)), bare, resume=True, progress=False)


def test_overwrite_refuses_a_users_file_at_a_name_the_new_run_writes(synthetic_root, tmp_path):
    """A one-stage run's folder with the user's own stage2.pt in it: a two-stage run trained over
    it with --overwrite would write stage2.pt, so it is refused before anything is removed."""
    out = tmp_path / "run"
    train(_cfg(synthetic_root, model="ae-l2", model_kwargs={}, epochs=[1], max_steps=[1]), out, progress=False,
          log=lambda s: None)
    (out / "stage2.pt").write_text("the user's own file")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputRefused, match="stage2.pt: exists and was not written by defect-fast"):
        train(_cfg(synthetic_root, max_steps=[1, 1]), out, progress=False, overwrite=True, log=lambda s: None)
    assert (out / "stage2.pt").read_text() == "the user's own file"
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier run is still there


def test_a_run_folder_a_live_training_holds_is_said_to_be_in_use(synthetic_root, tmp_path):
    """Training again into a folder another training is writing: the answer is that it is in use
    (by which process), not the advice for an unfinished run (--resume, which then says in use)."""
    from defect_fast.safety import RunInUse, RunLock

    out = tmp_path / "run"
    cfg = _cfg(synthetic_root, max_steps=[1, 1])
    train(cfg, out, progress=False, log=lambda s: None)
    (out / "model.pt").unlink()  # as the folder looks while its training runs: a checkpoint, no model
    train_module.atomic_save({}, out / "checkpoint.pt")
    with RunLock(out):
        for overwrite in (False, True):
            with pytest.raises(RunInUse, match=f"in use by PID {os.getpid()}"):
                train(cfg, out, progress=False, overwrite=overwrite, log=lambda s: None)
    # the probe is of a run folder's lock only: another command's folder is refused as it was, untouched
    from defect_fast.safety import OutputFolder

    other = tmp_path / "pred"
    OutputFolder.create(other, command="predict").write_text("scores.csv", "x\n")
    before = sorted(p.name for p in other.iterdir())
    with pytest.raises(OutputRefused, match="holds the output of 'defect-fast predict'"):
        train(cfg, other, progress=False, overwrite=True, log=lambda s: None)
    assert sorted(p.name for p in other.iterdir()) == before  # no lock file left behind


def test_a_training_whose_lock_file_was_removed_stops_before_writing_over_a_second_one(synthetic_root, tmp_path,
                                                                                       monkeypatch):
    """A lock file removed by hand while a run trained let a second training lock a new one and
    work in the same folder, both writing its checkpoint. The first now stops at its next file,
    writes nothing, and removes nothing there (the second's lock file and files stay)."""
    from defect_fast.safety import LOCK_NAME, RunLock

    out = tmp_path / "run"
    second = RunLock(out)
    real_stop = train_module.Trainer._stop_if_asked

    def a_second_training_comes(self):
        if not second.held:  # after the first step, before the first checkpoint
            (out / LOCK_NAME).unlink()
            second.acquire()
            (out / "config.json").write_text("{}")  # the second training's files
        return real_stop(self)

    monkeypatch.setattr(train_module.Trainer, "_stop_if_asked", a_second_training_comes)
    try:
        with pytest.raises(RunError, match=re.escape(f"{out / LOCK_NAME}: the lock file was removed or replaced") +
                           r".*\(nothing written at step 2\); when no other training uses the folder, start the run again"):
            train(_cfg(synthetic_root, max_steps=[2, 1], checkpoint_every=2), out, progress=False, log=lambda s: None)
        assert second.still_held() and (out / "config.json").read_text() == "{}"
        assert not (out / "checkpoint.pt").exists()
    finally:
        second.release()


def test_empty_training_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and str(tmp_path / "empty") in err


def test_images_smaller_than_a_patch_are_refused(synthetic_root, tmp_path, capsys):
    assert main(["train", str(synthetic_root), "--out", str(tmp_path / "r"), "--image-size", "32", "--quiet"]) == 2
    assert "smaller than" in capsys.readouterr().err


@pytest.mark.parametrize("fit_on", ["held-back", "train"])
def test_held_back_images_are_never_trained_on_and_set_the_thresholds(synthetic_root, tmp_path, monkeypatch, fit_on):
    seen = []

    class Spy(train_module.Trainer):
        def __init__(self, cfg, out, images, **kw):
            seen.append(images.clone())
            super().__init__(cfg, out, images, **kw)

    monkeypatch.setattr(train_module, "Trainer", Spy)
    run = tmp_path / "run"
    said = []
    train(_cfg(synthetic_root, max_steps=[1, 1], batch_size=8, normalize="position", far=0.2, fit_on=fit_on), run,
          progress=False, log=said.append)
    state = load_checkpoint(run / "model.pt")
    # the time of the statistics and calibration after training is stored and said apart
    assert state["finish_seconds"] > 0 and state["train_seconds"] > 0
    i = max(k for k, line in enumerate(said) if line.startswith(f"trained {state['model_name']} in "))
    assert f"then {state['finish_seconds']:.1f} s for the map statistics and calibration" in said[i]
    assert said[i + 1].startswith(f"the image threshold is the score of {state['calibration']['threshold_image']}; ")
    assert said[i + 1].endswith("--far RATE on predict, watch, report, evaluate and export (evaluate lists what each "
                                "gives on a labelled test set)")
    rest = said[i + 2:]
    if not state["calibration"]["sufficient"]:  # too few calibrating images for far 0.2: where more would go
        assert "defect-fast calibrate" in rest[0] and "far 0.2 without training again" in rest[0]
        rest = rest[1:]
    assert all(line.startswith("held-back scores against their images' mean brightness") for line in rest)
    config = json.loads((run / "config.json").read_text())
    images, paths = load_train_images(synthetic_root, 128)
    held = [i for i, p in enumerate(paths) if str(p) in set(state["held_back"])]
    # 10 % of 32 images is 3, at least 4 are held back; the same list in config.json and model.pt
    assert len(held) == 4 and config["held_back"] == state["held_back"]
    assert all(Path(p).is_absolute() for p in state["held_back"]) and Path(config["data"]).is_absolute()
    trained_on = seen[0]
    assert trained_on.shape[0] == 28
    assert not any(torch.equal(trained_on[j], images[i]) for i in held for j in range(trained_on.shape[0]))
    # The normalisation is fitted on the training images (or on every other held-back image) and
    # the stored thresholds are those of the (normalised) maps of held-back images the statistics
    # never saw (all of them, or the other half).
    det = Detector.load(run, device="cpu")
    assert det.normalization()["kind"] == "per-position"
    if fit_on == "train":
        fit_on_images, calib = trained_on, held
    else:
        fit_on_images, calib = images[held[0::2]], held[1::2]
    raw = det.raw_maps(fit_on_images.float() / 127.5 - 1)
    torch.testing.assert_close(det.norm_mean, raw.mean(0))
    res = det.predict_batched(images[calib])
    cal = state["calibration"]
    assert cal["n_images"] == len(calib)
    assert cal["map_fitted_on"] == ("28 training images" if fit_on == "train" else "2 held-back images")
    assert cal["source"].startswith("held-back images (the " + ("map was fitted on the training" if fit_on == "train" else "half"))
    # far=0.2: n=4 gives k = floor(0.2 * 5) = 1, the largest score; n=2 gives k = 0, too few
    # images: the largest score as well, said so
    assert cal["sufficient"] == (fit_on == "train") and cal["rank"] == 1
    assert cal["image_threshold"] == pytest.approx(float(res["scores"].max()), rel=1e-4)
    assert cal["pixel_threshold"] <= float(res["maps"].max()) + 1e-6
    # the calibration names the held-back image whose score the threshold is, and the highest ones
    named = [str(paths[i]) for i in calib]
    assert cal["threshold_image"] == named[int(res["scores"].argmax())]
    assert sorted(n for n, _s in cal["highest_scores"]) == sorted(named)
    assert [sc for _n, sc in cal["highest_scores"]] == pytest.approx(sorted(res["scores"].tolist(), reverse=True),
                                                                     rel=1e-4)


def test_weights_that_diverged_are_said_to_need_a_lower_lr(synthetic_root, tmp_path, monkeypatch):
    """Training that ends with weights whose maps are NaN: the closing steps said only that the maps
    are not usable, and --resume ran into the same line each time. It says the training diverged."""
    trainer_cls, real_run = train_module.Trainer, train_module.Trainer.run

    def diverged(self):
        model = real_run(self)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model

    monkeypatch.setattr(trainer_cls, "run", diverged)
    for i, extra in enumerate(({}, {"normalize": "position"})):  # the second met the NaN maps in its own fit first
        with pytest.raises(RunError, match=r"NaN or infinite maps or scores .*: the training diverged; train a new run "
                                           r"with a lower --lr \(this run's checkpoint holds the diverged weights\)"):
            train(_cfg(synthetic_root, max_steps=[1, 1], **extra), tmp_path / f"run{i}", progress=False,
                  log=lambda s: None)


def test_stored_settings_of_earlier_versions_are_read_as_they_trained(synthetic_root):
    """A run's config without map_scales (runs before it existed) read as [1], which a run without
    --map perceptual now refuses: its resume, audit and refit were refused for a setting it never used."""
    from defect_fast.train import checked_model

    now = _cfg(synthetic_root).to_json()
    for stored in ({"map": ""}, {"map": "", "map_scales": [1]}, {"map": "msfr", "map_scales": [1, 4]}):
        then = {k: v for k, v in {**now, **stored}.items() if k != "map_scales" or "map_scales" in stored}
        cfg = TrainConfig.from_json(then)
        checked_model(cfg, weights=False)  # not refused
        assert cfg.map_scales == [1, 2]  # the default, which nothing reads without --map perceptual
    perceptual_then = {k: v for k, v in {**now, "map": "perceptual"}.items() if k != "map_scales"}
    assert TrainConfig.from_json(perceptual_then).map_scales == [1]  # a perceptual run of then: one scale


def test_settings_that_train_nothing_are_refused_before_the_folder_is_made(synthetic_root, tmp_path):
    for bad, word in (({"epochs": [0, 1]}, "--epochs"), ({"max_steps": [1, -3]}, "--max-steps"),
                      ({"batch_size": 0}, "--batch-size"), ({"checkpoint_every": 0}, "--checkpoint-every"),
                      ({"image_size": 32}, "--image-size"), ({"holdback": 1.0}, "--holdback"),
                      ({"far": 0.0}, "--far"), ({"far": 1e-320}, "--far must be at least"), ({"normalize": "pixel"}, "--normalize"),
                      ({"holdback": 0.0, "normalize": "position"}, "--normalize"), ({"fit_on": "both"}, "--fit-on"),
                      ({"map_scales": [1, 4]}, r"--map-scales 1 4 sets the pyramid of --map perceptual: add it"),
                      # (the command line offers every model's maps only: found after the training, with a checkpoint)
                      ({"map": "bogus"}, "--map: model 'cmaae' has no map 'bogus'")):
        with pytest.raises(ConfigError, match=word):
            train(_cfg(synthetic_root, **bad), tmp_path / "r", progress=False)
        assert not (tmp_path / "r").exists()


def test_a_second_ctrl_c_waits_for_the_checkpoint_the_first_is_writing(synthetic_root, tmp_path, monkeypatch):
    """The first Ctrl-C says "again to stop at once"; pressed while the checkpoint it asked for was
    being written, the write was cut off and, before any earlier checkpoint, the whole run folder
    removed under a message that the checkpoint was kept. Now the write finishes first. A second
    Ctrl-C outside a write says truthfully when nothing was saved. Running the same command again
    on the unfinished run points to --resume, not to the --overwrite that would discard it."""
    cfg = _cfg(synthetic_root, batch_size=16, epochs=[2, 1], max_steps=[5, 3], model_kwargs={"memory_size": 20})
    trainer_cls = train_module.Trainer
    real_batch, real_save, calls = trainer_cls._batch, train_module.atomic_save, {"batch": 0}

    def batch(self, *args):
        calls["batch"] += 1
        if calls["batch"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, *args)

    def save(obj, path):
        if Path(path).name == "checkpoint.pt":
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, in the middle of the write
        return real_save(obj, path)

    monkeypatch.setattr(trainer_cls, "_batch", batch)
    monkeypatch.setattr(train_module, "atomic_save", save)
    lines = []
    out = tmp_path / "run"
    with pytest.raises(RunError, match="interrupted at step 3; progress saved"):
        train(cfg, out, progress=False, log=lines.append)
    assert load_checkpoint(out / "checkpoint.pt")["position"]["global_step"] == 3
    assert any("writing the checkpoint first" in line for line in lines)
    # the half-trained weights are never taken for a model (calibrate made a "finished" run of them)
    with pytest.raises(RunError, match=r"checkpoint\.pt: a training checkpoint \(stage 1, step 3\), not a finished "
                                       r"model; finish its run with 'defect-fast train DATA --out RUN --resume'"):
        Detector.load(out / "checkpoint.pt")
    # model and stage files of earlier versions carried the optimiser's moments too: they are models
    state = load_checkpoint(out / "checkpoint.pt")
    for name, extra in (("old_stage.pt", {"position": {**state["position"], "epoch": 0, "step": 0}}),
                        ("old_model.pt", {"calibration": {"score_max": 1.0}})):
        train_module.atomic_save({**state, **extra}, tmp_path / name)
        assert isinstance(Detector.load(tmp_path / name, device="cpu"), Detector)
    monkeypatch.setattr(train_module, "atomic_save", real_save)
    with pytest.raises(RunError, match=r"holds an unfinished run .*continue it with --resume"):
        train(cfg, out, progress=False, log=lambda s: None)
    assert (out / "checkpoint.pt").is_file()

    calls["batch"] = 0  # two signals inside one step, before any checkpoint
    def twice(self, *args):
        calls["batch"] += 1
        if calls["batch"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, *args)

    monkeypatch.setattr(trainer_cls, "_batch", twice)
    with pytest.raises(RunError, match="interrupted before the first checkpoint: nothing was saved"):
        train(cfg, tmp_path / "run2", progress=False, log=lambda s: None)
    assert not (tmp_path / "run2").exists()
    monkeypatch.undo()
    train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert (out / "model.pt").is_file()


def test_a_last_batch_of_one_patch_is_refused_where_the_model_cannot_train_on_it(synthetic_root, tmp_path):
    """The AW-SSIM AE at patch 32 has a 1x1 bottleneck under batch normalisation: an epoch whose
    last batch held one patch failed there ("Expected more than 1 value per channel"), as an
    internal error, and every resume failed at the same step."""
    from defect_fast.models import build_model

    cfg = _cfg(synthetic_root, model="awae", image_size=64, model_kwargs={"patch_size": 32}, epochs=[1, 1])
    paths = load_train_images(synthetic_root, 64)[1]
    per_epoch = len(train_module._split(cfg, paths)[0]) * 4
    with pytest.raises(ConfigError, match=rf"--batch-size {per_epoch - 1}: the {per_epoch} patches of an epoch leave "
                                          r"a last batch of one patch.*use --batch-size \d+"):
        train(_cfg(synthetic_root, model="awae", image_size=64, model_kwargs={"patch_size": 32}, epochs=[1, 1],
                   batch_size=per_epoch - 1), tmp_path / "run", progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="use --batch-size 4$"):
        train_module._check_last_batch(TrainConfig(data="d", model="awae", image_size=64, batch_size=5),
                                       build_model("awae", patch_size=32), 4)  # 16 patches: 4 is the nearest that works
    train_module._check_last_batch(TrainConfig(data="d", model="cmaae", image_size=128, batch_size=5),
                                   build_model("cmaae", memory_size=8), 4)  # CMA-AE trains on one patch
    # only where the run will train that batch: not past --max-steps, not in the steps a resume has done
    awae, check = build_model("awae", patch_size=32), train_module._check_last_batch
    cfg = lambda **kw: TrainConfig(data="d", model="awae", image_size=64, batch_size=5, epochs=[1, 1], **kw)  # noqa: E731
    check(cfg(max_steps=[3, 3]), awae, 4)  # 16 patches, batches 5 5 5 1: the 4th step never comes
    with pytest.raises(ConfigError, match="use --batch-size 4$"):
        check(cfg(max_steps=[4, 3]), awae, 4)
    check(cfg(max_steps=[4, 3]), awae, 4, {"stage": 1, "epoch": 0, "step": 0})  # stage 1's is done
    check(cfg(), awae, 4, {"stage": 2, "epoch": 0, "step": 0})  # trained: the statistics and calibration are left
    with pytest.raises(ConfigError, match="^this run cannot finish: .*train a new run with --batch-size 4$"):
        check(cfg(), awae, 4, {"stage": 0, "epoch": 0, "step": 3})  # resumed before the batch of one


def test_patch_epoch_visits_each_image_in_raster_order():
    from defect_fast.train import PatchEpoch

    _ids, rows, cols = PatchEpoch(1, (2, 3), torch.Generator().manual_seed(0)).batch(0, 6)
    assert rows.tolist() == [0, 0, 0, 1, 1, 1] and cols.tolist() == [0, 1, 2, 0, 1, 2]


def test_an_awae_run_resumed_mid_epoch_ends_as_an_uninterrupted_one(synthetic_root, tmp_path, monkeypatch):
    """The AW-SSIM AE's sigma schedule resumes where it stopped (the trainer skips the patches the
    epoch had done); the exact-resume tests ran CMA-AE, whose skip does nothing."""
    cfg = TrainConfig(data=str(synthetic_root), model="awae", image_size=64, batch_size=16, epochs=[2],
                      max_steps=[6], model_kwargs={"patch_size": 32, "two_stage": False}, checkpoint_every=1000, seed=0)
    train(cfg, tmp_path / "clean", progress=False, log=lambda s: None)
    trainer_cls = train_module.Trainer
    real_batch = trainer_cls._batch
    calls = {"batch": 0}

    def batch(self, *args):
        calls["batch"] += 1
        if calls["batch"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, *args)

    monkeypatch.setattr(trainer_cls, "_batch", batch)
    out = tmp_path / "run"
    with pytest.raises(RunError, match="interrupted at step"):
        train(cfg, out, progress=False, log=lambda s: None)
    assert load_checkpoint(out / "checkpoint.pt")["position"]["step"] == 3  # mid-epoch
    monkeypatch.setattr(trainer_cls, "_batch", real_batch)
    train(cfg, out, resume=True, progress=False, log=lambda s: None)
    a, b = load_checkpoint(out / "model.pt"), load_checkpoint(tmp_path / "clean" / "model.pt")
    assert _state_equal(a["model_state"], b["model_state"])


def test_a_handful_of_images_that_leaves_fewer_to_train_on_than_held_back_is_warned_of(synthetic_root, tmp_path,
                                                                                        capsys):
    """Five images: four are held back for the thresholds (the minimum), one is left to train on,
    which the count line alone did not make plain. Eight leave more to train on: no warning."""
    import shutil

    for n, warned in ((5, True), (8, False)):
        data = tmp_path / f"data{n}"
        data.mkdir()
        for p in sorted((synthetic_root / "train" / "good").glob("*.png"))[:n]:
            shutil.copy(p, data / p.name)
        train(_cfg(data, max_steps=[1, 1]), tmp_path / f"run{n}", progress=False, log=lambda s: None)
        err = capsys.readouterr().err
        assert ("only 1 of the 5 images are left to train on, with 4 held back for the thresholds; add defect-free images" in err) \
            == warned, err
        assert ("left to train on" in err) == warned, err
    # more held back than trained on by a --holdback share above the minimum: that share is the cause
    train(_cfg(tmp_path / "data8", max_steps=[1, 1], holdback=0.7), tmp_path / "run8b", progress=False,
          log=lambda s: None)
    assert "only 2 of the 8 images are left to train on, with 6 held back for the thresholds; lower --holdback" in capsys.readouterr().err


def test_images_enlarged_many_times_by_the_image_size_are_warned_of(synthetic_root, tmp_path, capsys):
    """A line's 160x120 photos trained at the default 512 px: 13 times the pixels, and no detail, in silence."""
    from PIL import Image

    data = tmp_path / "small"
    data.mkdir()
    for p in sorted((synthetic_root / "train" / "good").glob("*.png"))[:8]:
        Image.open(p).resize((64, 48)).save(data / p.name)
    train(_cfg(data, max_steps=[1, 1], image_size=128), tmp_path / "run", progress=False, log=lambda s: None)
    assert (f"defect-fast: warning: {data}: its images are 64 px or less on their longer side, enlarged 2.0 times or "
            "more to --image-size 128: that adds no detail, and every image costs 4 times the pixels to train on and "
            "inspect; a --image-size near 64 keeps their own") in capsys.readouterr().err
    train(_cfg(synthetic_root, max_steps=[1, 1], image_size=128), tmp_path / "run2", progress=False,
          log=lambda s: None)
    assert "enlarged" not in capsys.readouterr().err  # 128 px images at 128


def test_blank_frames_among_the_images_thresholds_are_set_on_are_passed_over_or_refused_before_training(
        synthetic_root, tmp_path):
    """With --holdback 0 the thresholds' images were the first training images, blank ones dropped
    after the pick: sixteen black frames first left none, after the training, every --resume failing
    again. With --context a blank frame could leave one calibration image: an internal error after
    the training. The first non-blank images are taken; too few is refused before the training."""
    import shutil

    import numpy as np
    from PIL import Image

    from defect_fast.data import DataError

    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "train", data / "train")
    for i in range(16):  # sorted before the photographs
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "train" / "good" / f"+black_{i:02d}.png")
    cfg = _cfg(data, image_size=64, max_steps=[1, 1], holdback=0.0, calibration_images=16)
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    cal = load_checkpoint(tmp_path / "run" / "model.pt")["calibration"]
    assert cal["n_images"] == 16 and cal["source"] == "training images"

    few = tmp_path / "few" / "train" / "good"  # black frames only: refused before any training
    few.mkdir(parents=True)
    for p in sorted((data / "train" / "good").glob("+black_*.png")):
        shutil.copy(p, few / p.name)
    with pytest.raises(DataError, match=r"16 of the 16 training images the thresholds would be set on are blank frames.*"
                                        r"leaves 0, fewer than the 1 needed"):
        train(_cfg(few.parent.parent, image_size=64, max_steps=[1, 1], holdback=0.0), tmp_path / "run2",
              progress=False, log=lambda s: None)
    assert not (tmp_path / "run2").exists()


def test_blank_frames_are_left_out_of_the_map_statistics_too(synthetic_root):
    """A black frame in the held-back half the per-position normalisation was fitted on made its
    spread 30 times wider: every defect-free score moved from about 0 to about 19."""
    from defect_fast.train import finish_run
    from defect_fast.data.io import read_images
    from defect_fast.models import build_model

    torch.manual_seed(0)
    model = build_model("cmaae", memory_size=10).eval()
    cfg = _cfg(synthetic_root, image_size=64, normalize="position", fit_on="held-back")
    h = read_images(sorted((synthetic_root / "train" / "good").glob("*.png"))[:6], 64)
    black = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    # every other image fits the statistics ([0::2]), the others calibrate: the same images either way
    with_black = finish_run(model, cfg, torch.cat([black, h[0:1], h[1:2], h[2:3], h[3:4], h[4:5], h[5:6]]))
    without = finish_run(model, cfg, torch.cat([h[1:2], h[0:1], h[3:4], h[2:3], h[5:6], h[4:5]]))
    for key in ("mean", "std"):
        assert torch.equal(with_black["normalization"][key], without["normalization"][key])
    assert with_black["calibration"]["image_threshold"] == without["calibration"]["image_threshold"]


def test_blank_frames_stay_in_a_fit_that_would_be_left_with_too_few_images(synthetic_root):
    """Leaving blank frames out of the fitted half could leave the per-position normalisation one
    image: an internal error after the training, at every --resume too. A fit keeps them then, as
    before they were left out."""
    from defect_fast.train import finish_run
    from defect_fast.data.io import read_images
    from defect_fast.models import build_model

    torch.manual_seed(0)
    model = build_model("cmaae", memory_size=10).eval()
    cfg = _cfg(synthetic_root, image_size=64, normalize="position", fit_on="held-back")
    h = read_images(sorted((synthetic_root / "train" / "good").glob("*.png"))[:3], 64)
    black = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    finished = finish_run(model, cfg, torch.cat([black, h[0:1], h[1:2], h[2:3]]))  # fits [black, h1], calibrates [h0, h2]
    assert finished["normalization"]["std"].shape == (64, 64) and finished["calibration"]["n_images"] == 2


def test_images_without_blank_frames_are_not_copied_to_leave_none_out():
    """Leaving blank frames out copied every training image even when none was blank (and for an
    image context the run did not fit): with the split's parts and the whole set, a run on 400
    images at 512 px added 1643 MiB at its peak, now 929 MiB (`python benchmarks/memory.py train`)."""
    from defect_fast.train import _unblank

    images = torch.randint(1, 255, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert _unblank(images) is images and _unblank(images, 6) is images
    images[2] = 0
    kept = _unblank(images)
    assert kept.shape[0] == 4 and not bool((kept.flatten(1).amax(1) == 0).any())
    assert _unblank(images, 5) is images  # fewer than asked would be left: all of them


def test_missing_lpips_heads_are_not_called_missing_alexnet_weights(tmp_path, monkeypatch):
    """With the AlexNet trunk at hand and LPIPS's linear heads missing, the refusal said the run
    needed ImageNet AlexNet weights, then named the heads."""
    import defect_fast.models.awae.loss as awae_loss
    from defect_fast.models import build_model
    from defect_fast.train import check_pretrained_weights

    monkeypatch.setattr(awae_loss, "default_lpips_factory", lambda *a, **k: None)  # the trunk loads
    monkeypatch.setenv("DEFECT_FAST_LPIPS_WEIGHTS", str(tmp_path / "heads.pth"))
    model = build_model("awae")
    assert model.uses_lpips()
    with pytest.raises(ConfigError) as err:
        check_pretrained_weights(TrainConfig(data=str(tmp_path), model="awae"), model)
    assert str(err.value).startswith("awae's LPIPS loss needs pretrained weights: LPIPS linear heads "), err.value
    assert "AlexNet" not in str(err.value)


def test_a_resume_on_another_cpu_or_torch_says_it_will_not_match_bit_for_bit():
    """Only the device and the thread count were compared: a resume on another CPU generation
    (AVX2 against AVX512/AMX kernels) or another torch ended on other weights and thresholds with
    no word."""
    from defect_fast.train import changed_setting, compute_setting

    now = compute_setting(torch.device("cpu"))
    assert {"device", "threads", "torch", "cpu", "cpu_capability"} <= set(now)
    assert changed_setting(now, dict(now)) == []
    assert changed_setting({**now, "cpu_capability": "AVX2"}, now) == ["cpu_capability"]
    assert changed_setting({**now, "cpu": "another CPU", "torch": "2.0"}, now) == ["torch", "cpu"]
    assert changed_setting(now, {**now, "onednn_max_cpu_isa": "AVX2"}) == ["onednn_max_cpu_isa"]
    old = {"device": "cpu", "threads": now["threads"]}  # a checkpoint of an earlier version: what it records
    assert changed_setting(old, now) == [] and changed_setting(old, {**now, "threads": 99}) == ["threads"]
    # the fused ops' implementation: the native kernels (their sources) or the PyTorch reference
    assert now["ops"] in ("cpu", "reference")
    assert changed_setting({**now, "ops": "cpu", "ops_source": "abc"}, {**now, "ops": "reference"})[:1] == ["ops"]
    assert changed_setting({**now, "ops_source": "abc"}, {**now, "ops_source": "def"}) == ["ops_source"]
    earlier = {k: v for k, v in now.items() if k not in ("ops", "ops_source")}  # recorded before these were
    assert changed_setting(earlier, now) == []


def test_a_checkpoint_with_settings_this_version_does_not_know_is_not_resumed_without_them(
        synthetic_root, tmp_path, monkeypatch):
    """Settings of a later version in the checkpoint (and config.json) were dropped: the run went
    on without them, and its model file no longer named them."""
    from defect_fast.safety import attach_digest

    out = tmp_path / "run"
    cfg = _cfg(synthetic_root, max_steps=[2, 2])
    stop_after_training(cfg, out, monkeypatch)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state.pop("tensor_digest", None)
    state["train_config"]["ema_decay"] = 0.999
    torch.save(attach_digest(state), out / "checkpoint.pt")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "ema_decay": 0.999}))
    with pytest.raises(RunError, match=r"checkpoint\.pt: its settings ema_decay are unknown to this version of "
                                       r"defect_fast \(written by a later one\?\)"):
        train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()


def test_a_run_goes_on_with_its_images_in_another_folder(synthetic_root, tmp_path, monkeypatch):
    """The data folder at another path (the run moved to another machine) could not be resumed,
    even with the same images; other images there are still refused."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    out = tmp_path / "run"
    cfg = _cfg(data, max_steps=[2, 2])
    stop_after_training(cfg, out, monkeypatch)
    moved = tmp_path / "elsewhere"
    data.rename(moved)
    messages = []
    # refused by a later check (here the pretrained weights'): nothing said of the move, nothing rewritten
    before = (out / "config.json").read_bytes(), (out / "checkpoint.pt").read_bytes()

    def no_weights(*args):
        raise ConfigError("no weights here")

    monkeypatch.setattr(train_module, "check_pretrained_weights", no_weights)
    with pytest.raises(ConfigError, match="no weights here"):
        train(_cfg(moved), out, resume=True, progress=False, log=messages.append)
    assert messages == [] and ((out / "config.json").read_bytes(), (out / "checkpoint.pt").read_bytes()) == before
    monkeypatch.setattr(train_module, "check_pretrained_weights", lambda *args: None)
    monkeypatch.setattr(train_module, "finish_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop again")))
    with pytest.raises(RuntimeError, match="stop again"):
        train(_cfg(moved), out, resume=True, progress=False, log=messages.append)
    assert any(f"trained on the images in {data}; it goes on with the same images (names and pixels) in {moved}" in m
               for m in messages), messages
    assert json.loads((out / "config.json").read_text())["data"] == str(moved)
    # the checkpoint too, at once: a resume stopped before its next checkpoint is not another run's
    assert torch.load(out / "checkpoint.pt", weights_only=True)["train_config"]["data"] == str(moved)
    monkeypatch.undo()
    good = moved / "train" / "good"  # the same images, given by their own folder: held-back ones found by name
    train(_cfg(good), out, resume=True, progress=False, log=lambda s: None)  # resumed again, and finished
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["train_config"]["data"] == str(good)
    assert state["held_back"] and all(Path(f).parent == good for f in state["held_back"])
    # other images at the new path: refused, naming both folders
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    next(iter(sorted((other / "train" / "good").iterdir()))).unlink()
    out2 = tmp_path / "run2"
    stop_after_training(_cfg(moved, max_steps=[2, 2]), out2, monkeypatch)
    with pytest.raises(RunError, match=rf"trains on {re.escape(str(moved))}; --resume continues it on those images, "
                                       rf"and {re.escape(str(other))} holds others \(removed: "):
        train(_cfg(other), out2, resume=True, progress=False, log=lambda s: None)


def test_a_full_disk_at_a_checkpoint_or_the_model_file_says_what_is_kept(synthetic_root, tmp_path, monkeypatch):
    """A full disk while the checkpoint or the model file was written said only "No space left on
    device": not that the checkpoint before it, or the finished training, was kept for --resume."""
    import errno

    real = train_module.atomic_save
    calls = {"checkpoint.pt": 0}

    def full_at(name, nth):
        def save(obj, path, *a, **k):
            if Path(path).name == name:
                calls[name] = calls.get(name, 0) + 1
                if calls[name] >= nth:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(obj, path, *a, **k)
        return save

    out = tmp_path / "run"
    cfg = _cfg(synthetic_root, max_steps=[2, 2], checkpoint_every=1)
    monkeypatch.setattr(train_module, "atomic_save", full_at("checkpoint.pt", 2))
    with pytest.raises(OSError, match=r"No space left on device \(the last checkpoint is kept: make room, then "
                                      r"--resume\)") as err:
        train(cfg, out, progress=False, log=lambda s: None)
    assert err.value.filename == str(out / "checkpoint.pt")
    calls.clear()
    monkeypatch.setattr(train_module, "atomic_save", full_at("model.pt", 1))
    with pytest.raises(OSError, match=r"the training is done and its checkpoint.pt kept: make room, then --resume"):
        train(cfg, out, resume=True, progress=False, log=lambda s: None)
    monkeypatch.setattr(train_module, "atomic_save", real)
    train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert (out / "model.pt").is_file() and not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("fills", [3, 1000])
def test_a_full_disk_while_the_log_grows_is_said_with_its_file_and_what_is_kept(synthetic_root, tmp_path, monkeypatch,
                                                                                fills):
    """The step log is line-buffered: a line the full disk refused was flushed again as the file
    closed, and that second error, naming no file, replaced the first (which said the checkpoint
    was kept for --resume). A log whose last write fails only as it closes (a quota, a network
    file system) is said so too, not passed over."""
    import builtins
    import errno

    class Full:  # the log file on a disk that refuses its line ``fills`` (or, after the last line, its close)
        def __init__(self, f):
            self.f, self.lines, self.full = f, 0, False

        def write(self, text):
            self.lines += 1
            if self.lines >= fills:
                self.full = True
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def flush(self):
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.f.flush()

        def close(self):
            self.f.close()
            self.full = True
            self.flush()

    def opened(path, *a, **k):
        f = builtins.open(path, *a, **k)
        return Full(f) if Path(path).name == "log.jsonl" else f

    out = tmp_path / "run"
    monkeypatch.setattr(train_module, "open", opened, raising=False)
    with pytest.raises(OSError, match=r"No space left on device \(the last checkpoint is kept: make room, then "
                                      r"--resume\)") as err:
        train(_cfg(synthetic_root, max_steps=[4, 2], checkpoint_every=1), out, progress=False, log=lambda s: None)
    assert err.value.filename == str(out / "log.jsonl") and (out / "checkpoint.pt").is_file()


def test_log_lines_lost_as_the_log_closes_beside_another_error_are_said(synthetic_root, tmp_path, monkeypatch):
    """A step log whose last lines fail as it closes while another error is on its way (here the
    checkpoint's, on the same full disk): that error stands, and the lost lines, which a --resume does
    not log again, are said beside it (they were passed over)."""
    import builtins
    import errno

    class ClosesFull:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            return self.f.write(text)

        def flush(self):
            self.f.flush()

        def close(self):
            self.f.close()
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

    def opened(path, *a, **k):
        f = builtins.open(path, *a, **k)
        return ClosesFull(f) if Path(path).name == "log.jsonl" else f

    def full(obj, path, *a, **k):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(path))

    monkeypatch.setattr(train_module, "open", opened, raising=False)
    monkeypatch.setattr(train_module, "atomic_save", full)
    said = []
    with pytest.raises(OSError) as err:
        train(_cfg(synthetic_root, max_steps=[2, 2]), tmp_path / "run", progress=False, log=said.append)
    assert Path(err.value.filename).name == "stage1.pt"
    assert any(m.startswith("warning: ") and "log.jsonl: its last lines could not be written (Disk quota" in m
               for m in said), said


def test_a_start_the_disk_cuts_short_after_its_folder_was_made_leaves_nothing(synthetic_root, tmp_path, monkeypatch):
    """A disk too full for the names a run reserves (the manifest rewritten) left the new run folder
    behind, holding its manifest and lock file, although a failed start leaves nothing."""
    import errno

    from defect_fast.safety import OutputFolder

    def full(self, names):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / ".defect_fast-manifest.json"))

    monkeypatch.setattr(OutputFolder, "reserve", full)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        train(_cfg(synthetic_root, max_steps=[1, 1]), out, progress=False, log=lambda s: None)
    assert not out.exists()


def test_a_training_started_with_sigint_ignored_keeps_ignoring_it(synthetic_root, tmp_path):
    """A background job of a shell without job control starts with SIGINT ignored: the training
    stopped on it all the same (its own handler replaced the ignore), while the steps after the
    training ignored it."""
    out = tmp_path / "run"
    args = ["train", str(synthetic_root), "--model", "cmaae", "--image-size", "128", "--batch-size", "16",
            "--max-steps", "12", "6", "--checkpoint-every", "1", "--set", "memory_size=20", "--quiet", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "defect_fast.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (out / "checkpoint.pt").exists():
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before the signal"
        os.kill(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert "SIGINT" not in err.decode() and (out / "model.pt").is_file()


def test_a_checkpoint_of_a_run_on_other_images_is_not_taken_for_a_move(synthetic_root, tmp_path, monkeypatch):
    """With --holdback 0 only the data folder told two runs of the same settings apart: another
    run's checkpoint copied in, resumed with that run's images, was taken for a move."""
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(synthetic_root, a)
    shutil.copytree(synthetic_root, b)
    sorted((b / "train" / "good").iterdir())[0].unlink()  # other images
    for data, run in ((a, tmp_path / "run-a"), (b, tmp_path / "run-b")):
        stop_after_training(_cfg(data, max_steps=[2, 2], holdback=0), run, monkeypatch)
    shutil.copy(tmp_path / "run-b" / "checkpoint.pt", tmp_path / "run-a" / "checkpoint.pt")
    with pytest.raises(RunError, match=r"is not this folder's run: its settings differ from .*config.json's \(data "):
        train(_cfg(b), tmp_path / "run-a", resume=True, progress=False, log=lambda s: None)


def test_what_a_failed_write_says_to_do_depends_on_why_it_failed(tmp_path):
    """Every failed write of a run said "make room", a permission or an I/O error too, and
    before the first checkpoint named no next step."""
    import errno

    from defect_fast.train import _kept_said

    full = _kept_said(OSError(errno.ENOSPC, "No space left on device", "x"), tmp_path)
    # (a failed start leaves no run behind, a failed resume its folder as it was: the same command, again)
    assert full.strerror.endswith("(no checkpoint was saved yet: make room, then run the same command again)")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    shut = _kept_said(OSError(errno.EACCES, "Permission denied", "x"), tmp_path)
    assert "(the last checkpoint is kept: fix that, then --resume)" in str(shut) and shut.filename == "x"
    done = _kept_said(OSError(errno.EDQUOT, "Disk quota exceeded", "x"), tmp_path, done=True)
    assert "the training is done and its checkpoint.pt kept: make room, then --resume writes the model file" in str(done)


def test_a_batch_larger_than_an_epoch_is_said(synthetic_root, tmp_path):
    """--batch-size above an epoch's patches was recorded and never used, without a word."""
    lines: list[str] = []
    train(_cfg(synthetic_root, batch_size=100000, max_steps=[1, 1]), tmp_path / "r", progress=False, log=lines.append)
    said = [ln for ln in lines if ln.startswith("--batch-size 100000: an epoch holds ")]
    assert len(said) == 1 and said[0].endswith("patches, so each step takes all of them"), lines
    lines.clear()
    train(_cfg(synthetic_root, max_steps=[1, 1]), tmp_path / "r2", progress=False, log=lines.append)
    assert not any(ln.startswith("--batch-size") for ln in lines)


def test_a_resume_refuses_a_log_that_is_a_symbolic_link(synthetic_root, tmp_path, monkeypatch):
    """A run folder's log.jsonl replaced by a link: the resumed training appended its log to the
    file it pointed at, outside the run (created there when missing)."""
    import defect_fast.data.io as io

    real = io.proportions
    monkeypatch.setattr(io, "proportions", lambda sizes: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "run"
    cfg = _cfg(synthetic_root, max_steps=[2, 1])
    with pytest.raises(RunError, match="continue with --resume"):
        train(cfg, out, progress=False, log=lambda s: None)
    monkeypatch.setattr(io, "proportions", real)
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(RunError, match="log.jsonl: a symbolic link where the run keeps its log"):
        train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert not (tmp_path / "elsewhere.txt").exists() and (out / "checkpoint.pt").is_file()
    # a link to a file with lines the resume's trim drops: its copy, written in the link's place, went on
    (tmp_path / "elsewhere.txt").write_text('{"step": 99, "note": "another file"}\nprecious line\n')
    with pytest.raises(RunError, match="log.jsonl: a symbolic link where the run keeps its log"):
        train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert (out / "log.jsonl").is_symlink()
