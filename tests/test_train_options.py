"""Trainer options of the accuracy work: random-offset patches, flips, cosine schedule, stored
inference settings, and the perceptual map fitted at the end of training."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from defect_fast.detect import Detector
from defect_fast.train import (ConfigError, PatchEpoch, TrainConfig, Trainer, _generator, brightness_note, check_config,
                                train)


def _trainer(tmp_path, images, **kw) -> Trainer:
    base = dict(data="unused", model="cmaae", image_size=images.shape[-1], batch_size=8, epochs=[1, 1],
                model_kwargs={"memory_size": 20}, seed=0)
    base.update(kw)
    return Trainer(TrainConfig(**base), tmp_path, images, progress=False, log=lambda s: None)


def _images(n=3, s=128):
    # each pixel encodes its own position and image: a patch tells where it was cut from
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    img = torch.stack([yy % 256, xx % 256, torch.zeros_like(yy)]).to(torch.uint8)
    out = img.repeat(n, 1, 1, 1)
    out[:, 2] = torch.arange(n).view(-1, 1, 1).to(torch.uint8)
    return out


def test_random_sampling_cuts_patches_anywhere_and_reproducibly(tmp_path):
    images = _images()
    t = _trainer(tmp_path, images, patch_sampling="random")
    order = PatchEpoch(3, t.grid, _generator(0, 0, 0))
    x, y = t._batch(0, order, 0, 12, _generator(0, 0, 0, 0))
    assert torch.equal(x, y) and x.shape == (12, 3, 64, 64)
    top = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
    left = ((x[:, 1, 0, 0] + 1) * 127.5).round().long()
    assert (top >= 0).all() and (top <= 64).all() and (left <= 64).all()
    assert (top % 64 != 0).any() or (left % 64 != 0).any(), "every patch sat on the inference grid"
    # the patch content is the image window at that offset
    for k in range(12):
        i = int(((x[k, 2, 0, 0] + 1) * 127.5).round())
        win = images[i, :, top[k]:top[k] + 64, left[k]:left[k] + 64].float() / 127.5 - 1
        torch.testing.assert_close(x[k], win)
    x2, _ = t._batch(0, order, 0, 12, _generator(0, 0, 0, 0))
    assert torch.equal(x, x2)


def test_grid_sampling_is_unchanged(tmp_path):
    t = _trainer(tmp_path, _images())
    order = PatchEpoch(3, t.grid, _generator(0, 0, 0))
    x, _ = t._batch(0, order, 0, 4, _generator(0, 0, 0, 0))
    top = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
    assert (top % 64 == 0).all()


def test_flips_apply_the_same_flip_to_input_and_target(tmp_path):
    images = _images()
    t = _trainer(tmp_path, images, flips=True)
    order = PatchEpoch(3, t.grid, _generator(0, 0, 0))
    x, y = t._batch(1, order, 0, 12, _generator(0, 1, 0, 0))  # synthetic stage: x != y in general
    clean, _ = _trainer(tmp_path, images)._batch(1, order, 0, 12, _generator(0, 1, 0, 0))
    flipped = 0
    for k in range(12):
        candidates = [y[k], y[k].flip(-1), y[k].flip(-2), y[k].flip(-1).flip(-2)]
        assert any(torch.equal(c, c) for c in candidates)
        # rows of the position code decrease down the patch iff the patch was flipped vertically
        down = y[k, 0, -1, 5] < y[k, 0, 0, 5]
        right = y[k, 1, 5, -1] < y[k, 1, 5, 0]
        flipped += int(down) + int(right)
    assert 4 <= flipped <= 20, flipped  # about half of 24 flips


def test_cosine_schedule_goes_from_lr_to_one_percent(tmp_path):
    t = _trainer(tmp_path, _images(), lr_schedule="cosine")
    assert t._lr_factor(0, 100) == 1.0
    assert math.isclose(t._lr_factor(100, 100), 0.01)
    assert math.isclose(t._lr_factor(50, 100), 0.505)
    assert _trainer(tmp_path, _images())._lr_factor(50, 100) == 1.0


@pytest.mark.parametrize("bad", [dict(patch_sampling="everywhere"), dict(lr_schedule="step"), dict(blend="tukey"),
                                 dict(smooth=-1.0), dict(infer_stride=65), dict(infer_stride=0),
                                 dict(map_scales=[]), dict(map_scales=[1, 1]), dict(map_scales=[0]),
                                 dict(map_scales=[1, 8], map="perceptual"), dict(fit_on="test"),
                                 dict(precision="float16"), dict(placement="centre"),
                                 dict(placement="centres")])  # no perceptual map or context to place
def test_bad_options_are_refused_naming_the_option(bad):
    cfg = TrainConfig(data="d", image_size=128, epochs=[1, 1], **bad)
    with pytest.raises(ConfigError, match="--" + next(iter(bad)).replace("_", "-")):
        check_config(cfg, 2, 64)


def _random_trunk_map(monkeypatch):
    import defect_fast.perceptual as perceptual
    from tests.test_perceptual import _trunk

    class RandomTrunkMap(perceptual.PerceptualMap):  # no ImageNet weights needed in tests
        def __init__(self, image_size, layers=2, trunk=None, prior=0.01, scales=(1,)):
            super().__init__(image_size, layers, trunk or _trunk(), prior, scales)

    monkeypatch.setattr(perceptual, "PerceptualMap", RandomTrunkMap)


def test_run_stores_its_inference_settings_and_perceptual_map(synthetic_root, tmp_path, monkeypatch):
    _random_trunk_map(monkeypatch)
    cfg = TrainConfig(data=str(synthetic_root), model="cmaae", image_size=128, batch_size=16, epochs=[1, 1],
                      max_steps=[1, 1], model_kwargs={"memory_size": 20, "synthesis": "perlin"}, seed=0,
                      patch_sampling="random", flips=True, lr_schedule="cosine", map="perceptual",
                      infer_stride=32, blend="hann", smooth=2.0, holdback=0.3)
    path = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    det = Detector.load(path, device="cpu")
    assert (det.map_kind, det.stride, det.blend, det.smooth_sigma) == ("perceptual", 32, "hann", 2.0)
    # the model file carries the weights, not the optimiser's moments (twice their size)
    stored = torch.load(path, weights_only=True)
    assert "optimizer_state" not in stored and not (path.parent / "checkpoint.pt").exists()  # a finished run resumes no more
    # fitted on the training images (the default fit_on), both pyramid levels (the default map_scales)
    assert float(det.image_map.fitted) == 32 - len(torch.load(path, weights_only=True)["held_back"])
    assert det.image_map.scales == (1, 2)
    # explicit arguments still win over the stored settings
    det2 = Detector.load(path, device="cpu", map_kind="msfr", stride=64, blend="none", smooth_sigma=0.0)
    assert (det2.map_kind, det2.stride, det2.blend, det2.smooth_sigma) == ("msfr", 64, "none", 0.0)
    maps, scores = det(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    assert maps.shape == (1, 128, 128) and torch.isfinite(scores).all()



def test_configs_written_before_fit_on_map_scales_and_precision_keep_their_behaviour():
    old = TrainConfig(data="d", map="perceptual").to_json()
    del old["fit_on"], old["map_scales"], old["precision"]
    cfg = TrainConfig.from_json(old)
    assert (cfg.fit_on, cfg.map_scales) == ("held-back", [1])  # the one scale perceptual runs had then
    assert TrainConfig.from_json({**old, "map": ""}).map_scales == [1, 2]  # unread without --map perceptual
    assert (TrainConfig(data="d").fit_on, TrainConfig(data="d").map_scales) == ("train", [1, 2])
    assert TrainConfig.from_json(old).precision == "float32" and TrainConfig(data="d").precision == "auto"


@pytest.mark.parametrize("model", ["cmaae", "awae"])
def test_bfloat16_training_steps_follow_the_float32_ones(tmp_path, model, monkeypatch):
    """--precision bfloat16: autocast steps on a channels-last model whose weights stay float32;
    the losses of a few steps track float32 training from the same start."""
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self: None)
    kw = {}
    if model == "awae":  # its synthetic stage needs the LPIPS trunk
        alexnet = Path(__file__).resolve().parents[2] / "shared" / "weights" / "alexnet-features-imagenet.pth"
        if not alexnet.is_file():
            pytest.skip(f"AlexNet trunk weights for LPIPS not found at {alexnet}")
        kw = {"model_kwargs": {"patch_size": 32, "base_channels": 4, "latent_channels": 8, "lpips_weights": str(alexnet)}}
    images = torch.randint(0, 256, (4, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images = torch.nn.functional.avg_pool2d(images.float(), 5, 1, 2).to(torch.uint8)  # some structure
    losses = {}
    for precision in ("float32", "bfloat16"):
        (tmp_path / precision).mkdir()
        t = _trainer(tmp_path / precision, images, model=model, image_size=64, batch_size=4, precision=precision,
                     max_steps=[6, 1], **kw)
        t.run()
        assert all(p.dtype == torch.float32 for p in t.model.parameters())
        assert t.state()["train_precision"] == precision
        log = [json.loads(line) for line in (tmp_path / precision / "log.jsonl").read_text().splitlines()]
        losses[precision] = torch.tensor([r["loss"] for r in log if r["stage"] == 1])
    assert torch.isfinite(losses["bfloat16"]).all()
    torch.testing.assert_close(losses["bfloat16"], losses["float32"], rtol=0.05, atol=0.02)


def test_bfloat16_training_keeps_the_matrix_product_weights_in_the_default_layout(tmp_path, monkeypatch):
    """Channels-last training, but the two matrix-product layers' weights (and so their gradients
    and Adam's moments) in the default layout: Adam's fused CPU kernel copies any other gradient
    layout on every step."""
    from defect_fast.layers import KernelSizedConv2d, PointConvTranspose2d
    from defect_fast.precision import is_channels_last

    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self: None)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    t = _trainer(tmp_path, images, image_size=64, batch_size=4, precision="bfloat16", max_steps=[2, 1])
    t.run()
    dense = [m.weight for m in t.model.modules() if isinstance(m, (KernelSizedConv2d, PointConvTranspose2d))]
    convs = [m.weight for m in t.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
             and not isinstance(m, (KernelSizedConv2d, PointConvTranspose2d)) and m.weight.shape[1] > 1]
    assert len(dense) == 2 and all(w.is_contiguous() for w in dense)
    assert convs and all(is_channels_last(w) for w in convs)
    for w in dense + convs:
        st = t.optimizer.state[w]
        assert w.grad is None or w.grad.stride() == w.stride()
        assert st["exp_avg"].stride() == w.stride() and st["exp_avg_sq"].stride() == w.stride()


def test_resume_gives_adam_moments_the_layout_of_their_parameters(tmp_path, monkeypatch):
    """A checkpoint whose Adam moments are laid out otherwise than the parameters now are (written
    by a version with other layouts) resumes with the same values in the parameters' layout,
    which Adam's fused kernels need (they walk both as flat arrays)."""
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self: None)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    t = _trainer(tmp_path, images, image_size=64, batch_size=4, precision="bfloat16", max_steps=[1, 1])
    t.run()
    state = t.state()
    flipped = 0
    for st in state["optimizer_state"]["state"].values():
        for k in ("exp_avg", "exp_avg_sq"):
            v = st[k]
            if v.dim() == 4 and v.shape[1] > 1 and v.shape[2] * v.shape[3] > 1:
                st[k] = v.contiguous() if not v.is_contiguous() else v.contiguous(memory_format=torch.channels_last)
                flipped += 1
    assert flipped
    again = _trainer(tmp_path, images, image_size=64, batch_size=4, precision="bfloat16", max_steps=[1, 1])
    again.restore(state)
    params = dict(again.model.named_parameters())
    before = dict(t.model.named_parameters())
    for name, p in params.items():
        if p not in again.optimizer.state:
            continue
        st, old = again.optimizer.state[p], t.optimizer.state[before[name]]
        for k in ("exp_avg", "exp_avg_sq"):
            assert st[k].stride() == p.stride()
            assert torch.equal(st[k], old[k])


def test_auto_precision_is_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    import defect_fast.precision as precision
    from defect_fast.train import train_dtype

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    assert train_dtype("auto", torch.device("cpu")) is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    assert train_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert train_dtype("float32", torch.device("cpu")) is None and train_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_auto_precision_is_resolved_and_recorded_in_the_run(synthetic_root, tmp_path, monkeypatch):
    """config.json and model.pt say which precision a run trained in, so a resume on another CPU
    keeps it."""
    import defect_fast.precision as precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    cfg = TrainConfig(data=str(synthetic_root), model="cmaae", image_size=128, batch_size=64, epochs=[1, 1],
                      max_steps=[1, 1], model_kwargs={"memory_size": 20})
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == "float32"
    state = torch.load(tmp_path / "run" / "model.pt", map_location="cpu", weights_only=True)
    assert state["train_precision"] == "float32" and state["train_config"]["precision"] == "float32"


def test_context_needs_images_of_64_pixels():
    with pytest.raises(ConfigError, match="--context"):
        check_config(TrainConfig(data="d", image_size=48, epochs=[1, 1], context=True), 2, 32)


def test_a_context_profile_needs_the_context_and_a_known_name():
    with pytest.raises(ConfigError, match="add --context"):
        check_config(TrainConfig(data="d", image_size=128, epochs=[1, 1], context_profile="rows"), 2, 32)
    with pytest.raises(ConfigError, match="--context-profile must be one of none, rows, columns"):
        check_config(TrainConfig(data="d", image_size=128, epochs=[1, 1], context=True, context_profile="row"), 2, 32)


def test_the_context_image_score_needs_the_context_and_a_known_name():
    with pytest.raises(ConfigError, match="--image-score context is part of the image context: add --context"):
        check_config(TrainConfig(data="d", image_size=128, epochs=[1, 1], image_score="context"), 2, 32)
    with pytest.raises(ConfigError, match="--image-score must be one of combined, context"):
        check_config(TrainConfig(data="d", image_size=128, epochs=[1, 1], context=True, image_score="max"), 2, 32)
    check_config(TrainConfig(data="d", image_size=128, epochs=[1, 1], context=True, image_score="context"), 2, 32)
    assert TrainConfig.from_json({"data": "d"}).image_score == "combined"  # runs from before the option


def test_levelling_the_brightness_needs_a_trunk_to_level_for():
    with pytest.raises(ConfigError, match="--level-brightness .* needs --map perceptual or --context"):
        check_config(TrainConfig(data="d", image_size=128, epochs=[1, 1], level_brightness=True), 2, 32)
    for ok in ({"map": "perceptual"}, {"context": True}):
        check_config(TrainConfig(data="d", image_size=128, epochs=[1, 1], level_brightness=True, **ok), 2, 32)
    assert not TrainConfig.from_json({"data": "d"}).level_brightness  # runs from before the option


def test_auto_profile_on_images_without_a_streak_direction_is_refused_before_training(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import defect_fast.context as context
    from tests.test_context import RandomTrunkContext

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    data = tmp_path / "plain"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):  # noise: no direction
        Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8)).save(data / f"{i:03d}.png")
    logged = []
    cfg = TrainConfig(data=str(data), model="cmaae", image_size=128, batch_size=16, epochs=[1, 1], max_steps=[1, 1],
                      model_kwargs={"memory_size": 20}, holdback=0.25, context=True, context_profile="auto")
    with pytest.raises(ConfigError, match=r"--context-profile auto: .*plain: the images share no streak direction: in "
                                          r"\d+ of 12 defect-free images"):
        train(cfg, tmp_path / "run", progress=False, log=logged.append)
    assert not (tmp_path / "run").exists() and not any("stage" in line for line in logged)
    check_config(cfg, 2, 32)  # the name itself is valid


def test_a_run_with_the_auto_profile_resumes_to_the_same_choice(synthetic_root, tmp_path, monkeypatch):
    """Cut off after training (in the steps that fit the context): the resume reads the
    direction again from the same images and finishes the run with it."""
    import defect_fast.context as context
    from tests.test_context import RandomTrunkContext
    from tests.test_train import stop_after_training

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    cfg = TrainConfig(data=str(synthetic_root), model="cmaae", image_size=128, batch_size=16, epochs=[1, 1],
                      max_steps=[1, 1], model_kwargs={"memory_size": 20}, holdback=0.3, context=True,
                      context_profile="auto")
    run = tmp_path / "run"
    stop_after_training(cfg, run, monkeypatch)
    said = []
    path = train(TrainConfig(data=str(synthetic_root)), run, resume=True, progress=False, log=said.append)
    ctx = Detector.load(path, device="cpu").context
    assert ctx.profile == "rows" and ctx.profile_basis.startswith("rows, across streaks that run top to bottom")
    assert torch.load(path, weights_only=True)["train_config"]["context_profile"] == "auto"
    assert not any(line.startswith("context profile:") for line in said)  # said when the run started


@pytest.mark.parametrize("profile", ["none", "rows", "auto"])
def test_run_with_context_stores_it_fitted_on_the_training_images(synthetic_root, tmp_path, monkeypatch, profile):
    """(With the "rows" profile, the receptive-field placement: stored and loaded back.)"""
    import defect_fast.context as context
    from tests.test_context import RandomTrunkContext

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)  # no ImageNet weights needed
    cfg = TrainConfig(data=str(synthetic_root), model="cmaae", image_size=128, batch_size=16, epochs=[1, 1],
                      max_steps=[1, 1], model_kwargs={"memory_size": 20}, seed=0, holdback=0.3, context=True,
                      context_profile=profile, placement="centres" if profile == "rows" else "cells")
    path = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    state = torch.load(path, weights_only=True)
    det = Detector.load(path, device="cpu")
    assert det.context.placement == cfg.placement
    # the synthetic gratings vary more across the width than down the height: auto takes rows
    assert det.context is not None and det.context.profile == ("rows" if profile == "auto" else profile)
    assert (det.context.profile_basis or "").startswith("rows, across") == (profile == "auto")
    assert float(det.context.fitted) == 32 - len(state["held_back"])  # the training images
    maps, scores = det(torch.zeros(2, 3, 128, 128, dtype=torch.uint8))
    assert maps.shape == (2, 128, 128) and torch.isfinite(scores).all()
    # the stored threshold is on the combined score: the held-back images' largest one at far 0.01
    assert state["calibration"]["n_images"] == len(state["held_back"])


@pytest.mark.parametrize("fit_on", ["train", "held-back"])
def test_a_levelled_run_levels_map_and_context_to_its_training_images(synthetic_root, tmp_path, monkeypatch, fit_on):
    """--level-brightness: the perceptual map and the context store one level, the training
    images' mean brightness (also when the map is fitted on held-back images), so they still
    share the trunk's first layers."""
    import defect_fast.context as context
    import defect_fast.perceptual as perceptual
    from defect_fast.data import load_train_images
    from defect_fast.perceptual import PerceptualMap, reference_brightness
    from tests.test_context import RandomTrunkContext
    from tests.test_perceptual import random_trunk_map

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    monkeypatch.setattr(perceptual, "PerceptualMap", random_trunk_map)
    cfg = TrainConfig(data=str(synthetic_root), model="cmaae", image_size=128, batch_size=16, epochs=[1, 1],
                      max_steps=[1, 1], model_kwargs={"memory_size": 20}, seed=0, holdback=0.3, map="perceptual",
                      context=True, level_brightness=True, fit_on=fit_on)
    path = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    state = torch.load(path, weights_only=True)
    images, paths = load_train_images(synthetic_root, 128)
    trained = [i for i, q in enumerate(paths) if str(q) not in set(state["held_back"])]
    level = reference_brightness(images[trained])
    assert state["perceptual"]["brightness"] == state["context"]["brightness"] == level
    monkeypatch.setattr(perceptual, "PerceptualMap", PerceptualMap)  # the file holds its trunk
    det = Detector.load(path, device="cpu")
    assert det.image_map.brightness == det.context.brightness == level and det._shared_stem(det.context) == 2


def test_levelling_black_training_images_is_refused_in_one_line(tmp_path, monkeypatch):
    """Frames of a camera whose shutter failed have a mean brightness of 0: nothing to level to.
    The run refused them with an internal error (the level 0.0 passed on as if it were given)."""
    import numpy as np
    from PIL import Image

    import defect_fast.perceptual as perceptual
    from defect_fast.data.io import DataError
    from tests.test_perceptual import random_trunk_map

    monkeypatch.setattr(perceptual, "PerceptualMap", random_trunk_map)
    data = tmp_path / "black"
    data.mkdir()
    for i in range(12):
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / f"frame_{i:02d}.png")
    cfg = TrainConfig(data=str(data), model="cmaae", image_size=64, batch_size=4, epochs=[1, 1], max_steps=[1, 1],
                      model_kwargs={"memory_size": 10}, seed=0, holdback=0.34, map="perceptual", level_brightness=True)
    with pytest.raises(DataError, match="--level-brightness: .*mean brightness is 0 .all black.*nothing to level to"):
        train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert not any((tmp_path / "run").glob("*.pt"))  # refused before the training, not after it


@pytest.mark.parametrize("options", [{"normalize": "position"}, {"normalize": "position", "fit_on": "held-back"}])
def test_map_statistics_on_copies_of_one_image_are_refused_before_the_training(tmp_path, options):
    """Copies of one photograph have identical maps: the statistics fitted on them were refused
    only once both training stages had run."""
    import shutil

    from defect_fast.data.io import DataError
    from defect_fast.data.synthetic import make_synthetic_dataset

    one = sorted((make_synthetic_dataset(tmp_path / "syn", size=64, seed=0, n_train=1, n_test_good=1, n_test_defect=1)
                  / "train" / "good").glob("*.png"))[0]
    data = tmp_path / "copies"
    data.mkdir()
    for i in range(12):
        shutil.copy(one, data / f"copy_{i:02d}.png")
    cfg = TrainConfig(data=str(data), model="cmaae", image_size=64, batch_size=4, epochs=[1, 1], max_steps=[1, 1],
                      model_kwargs={"memory_size": 10}, seed=0, holdback=0.34, **options)
    with pytest.raises(DataError, match=r"copies: the map statistics would be fitted on \d+ images that are all one image"):
        train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert not any((tmp_path / "run").glob("*.pt"))


def test_the_brightness_note_hints_at_levelling_only_when_the_lighting_is_significant():
    said = brightness_note(0.67, 60, levelled=False, trunk=True)
    assert said.startswith("held-back scores against their images' mean brightness: rank correlation +0.67 (60 images)")
    assert "--level-brightness" in said
    # p <= 0.01 by Student's t over n - 2 degrees of freedom: 0.34 over 60 images is (p = 0.008), over 20 it is not
    assert "--level-brightness" in brightness_note(-0.34, 60, False, True)
    assert "--level-brightness" not in brightness_note(0.34, 20, False, True)
    assert "--level-brightness" not in brightness_note(0.67, 60, levelled=True, trunk=True)  # already levelled
    assert "--level-brightness" not in brightness_note(0.67, 60, levelled=False, trunk=False)  # no trunk to level
    assert brightness_note(None, 60, False, True) is None and brightness_note(float("nan"), 60, False, True) is None


def test_a_run_logs_how_its_held_back_scores_follow_the_lighting(synthetic_root, tmp_path):
    cfg = TrainConfig(data=str(synthetic_root), model="cmaae", image_size=128, batch_size=16, epochs=[1, 1],
                      max_steps=[1, 1], model_kwargs={"memory_size": 20}, seed=0, holdback=0.3)
    said = []
    path = train(cfg, tmp_path / "run", progress=False, log=said.append)
    rho = torch.load(path, weights_only=True)["calibration"]["score_brightness_rank_correlation"]
    assert -1 <= rho <= 1
    assert any(line.startswith(f"held-back scores against their images' mean brightness: rank correlation {rho:+.2f}")
               for line in said)


def test_context_with_too_few_training_images_is_refused_before_training(synthetic_root, tmp_path):
    cfg = TrainConfig(data=str(synthetic_root), model="cmaae", image_size=128, batch_size=16, epochs=[1, 1],
                      max_steps=[1, 1], model_kwargs={"memory_size": 20}, holdback=0.75, context=True)
    # (what to do, and where the images went: a --preset photos run on a dozen photos was puzzled)
    with pytest.raises(ConfigError, match=r"--context needs at least 10 training images to fit on, got \d \((\d+) "
                                          r"images, \d+ of them held back for the thresholds\); add defect-free "
                                          r"images, or train without it \(--no-context\)$"):
        train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_training_images_stay_on_a_gpu_when_they_take_a_quarter_of_its_free_memory():
    from defect_fast.train import images_fit_on_device

    assert images_fit_on_device(100, 400) and not images_fit_on_device(101, 400)
    assert images_fit_on_device(0, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("resident", [True, False])
def test_cuda_batches_are_made_on_the_gpu_and_draw_what_a_cpu_run_draws(tmp_path, monkeypatch, resident):
    """The images stay on the GPU (or, when they do not fit, each step copies its own there); the
    patches, anomalies and flips are those of a CPU run (the draws are made on the CPU), up to the
    GPU's rounding of the synthesis."""
    import defect_fast.train as train_module

    monkeypatch.setattr(train_module, "images_fit_on_device", lambda nbytes, free: resident)
    images = _images(4)
    opts = dict(patch_sampling="random", flips=True)
    cpu = _trainer(tmp_path / "cpu", images, device="cpu", **opts)  # ("auto" would be the GPU there)
    gpu = _trainer(tmp_path / "gpu", images, device="cuda", **opts)
    assert gpu.stored.is_cuda == resident and not cpu.stored.is_cuda
    for stage in (0, 1):
        order = PatchEpoch(4, gpu.grid, _generator(0, stage, 0))
        xc, yc = cpu._batch(stage, order, 0, 12, _generator(0, stage, 0, 0))
        xg, yg = gpu._batch(stage, order, 0, 12, _generator(0, stage, 0, 0))
        assert xg.is_cuda and yg.is_cuda
        torch.testing.assert_close(yg.cpu(), yc, atol=0, rtol=0)  # clean patches: cut and flipped alike
        # the same anomalies on the same patches; a pixel on a mask's edge may round to either side
        assert torch.equal((xg.cpu() - yc).abs().amax((1, 2, 3)) > 1e-2, (xc - yc).abs().amax((1, 2, 3)) > 1e-2)
        assert float(((xg.cpu() - xc).abs() > 1e-3).float().mean()) < 1e-3
    assert cpu.sources is not None and gpu.sources.is_cuda  # moved once, not on every step


def test_nothing_held_back_fits_the_perceptual_map_on_every_training_image(synthetic_root, tmp_path, monkeypatch):
    """--holdback 0 fitted the map statistics on every other one of the first 16 training images
    (recorded as held-back images); too few images to fit on failed only after the training."""
    _random_trunk_map(monkeypatch)
    cfg = TrainConfig(data=str(synthetic_root), model="cmaae", image_size=128, batch_size=16, epochs=[1, 1],
                      max_steps=[1, 1], model_kwargs={"memory_size": 20}, seed=0, map="perceptual", holdback=0.0)
    lines = []
    path = train(cfg, tmp_path / "run", progress=False, log=lines.append)
    state = torch.load(path, weights_only=True)
    assert state["calibration"]["map_fitted_on"] == "32 training images" and state["held_back"] == []
    assert not [line for line in lines if line.startswith("--fit-on ")]  # --fit-on train: as asked
    lines.clear()  # --fit-on held-back with nothing held back: not what was asked, and the log says so
    path = train(TrainConfig(**{**cfg.__dict__, "fit_on": "held-back"}), tmp_path / "held", progress=False,
                 log=lines.append)
    assert torch.load(path, weights_only=True)["calibration"]["map_fitted_on"] == "32 training images"
    assert [line for line in lines if line.startswith("--fit-on ")] == [
        "--fit-on held-back: no image is held back, so the perceptual map's statistics are fitted on the training images"]
    assert float(Detector.load(path, device="cpu").image_map.fitted) == 32
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((synthetic_root / "train" / "good" / sorted(
        p.name for p in (synthetic_root / "train" / "good").iterdir())[0]).read_bytes())
    with pytest.raises(ConfigError, match="--map perceptual fits its statistics on training images: 1 are too few"):
        train(TrainConfig(**{**cfg.__dict__, "data": str(one)}), tmp_path / "run1", progress=False, log=lambda s: None)
    assert not (tmp_path / "run1").exists()  # refused before the training


def test_a_normalised_run_whose_maps_are_nan_is_named_in_one_line(synthetic_root, tmp_path):
    """With --normalize position the statistics are fitted before the calibration's check: NaN maps
    there were a ValueError, an internal error of train and audit."""
    from defect_fast.models import build_model
    from defect_fast.runs import RunError
    from defect_fast.train import finish_run

    model = build_model("cmaae", memory_size=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    images = torch.randint(0, 256, (6, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for normalize in ("none", "position"):
        cfg = TrainConfig(data=str(synthetic_root), model="cmaae", image_size=128, normalize=normalize, fit_on="held-back",
                          map="msfr", map_scales=[1], holdback=0.3)
        with pytest.raises(RunError, match=f"^{re.escape(str(tmp_path))}: the model gives NaN or infinite maps"):
            finish_run(model, cfg, images, "cpu", where=tmp_path)


def test_model_options_are_checked_against_the_types_of_the_model_config():
    """``--set`` values are checked against the model's Config: a bool is not an int, an int is
    a float, a list's items have the item type, and dashes in a key read as underscores."""
    from defect_fast.models import check_options, parse_options

    with pytest.raises(ValueError, match="memory_size"):
        check_options("cmaae", {"memory_size": True})
    with pytest.raises(ValueError, match="memory_size"):
        parse_options("cmaae", ["memory_size=true"])
    assert parse_options("cmaae", ["rec_weight=50"]) == {"rec_weight": 50}
    assert check_options("cmaae", {"rec_weight": 50, "entropy_weight": 0.5}) == {"rec_weight": 50, "entropy_weight": 0.5}
    assert check_options("awae", {"skip_levels": [1, 2]}) == {"skip_levels": [1, 2]}
    for bad in ([2, "3"], [2.5], [True]):
        with pytest.raises(ValueError, match="skip_levels"):
            check_options("awae", {"skip_levels": bad})
    with pytest.raises(ValueError, match="ssim_weights"):
        check_options("awae", {"ssim_weights": [0.2, "x", 0.6]})
    assert parse_options("cmaae", ["memory-size=10", "rec-weight=2.5"]) == {"memory_size": 10, "rec_weight": 2.5}


def test_check_config_takes_the_boundary_values_it_documents():
    """The edges of the documented ranges: a stride equal to the patch (tiles) is taken, one above
    it refused; a holdback of 1 (nothing left to train on) refused; the perceptual map's smallest
    pyramid level of exactly 32 px taken, 31 refused."""
    base = {"data": "d", "epochs": [1, 1]}
    check_config(TrainConfig(**base, image_size=128, stride=64), 2, 64)
    with pytest.raises(ConfigError, match="--stride"):
        check_config(TrainConfig(**base, image_size=128, stride=65), 2, 64)
    check_config(TrainConfig(**base, image_size=128, holdback=0.5), 2, 64)
    with pytest.raises(ConfigError, match="--holdback"):
        check_config(TrainConfig(**base, image_size=128, holdback=1.0), 2, 64)
    check_config(TrainConfig(**base, image_size=64, map="perceptual", map_scales=[1, 2]), 2, 32)
    with pytest.raises(ConfigError, match="--map-scales 2 leaves 31 pixels"):
        check_config(TrainConfig(**base, image_size=62, map="perceptual", map_scales=[1, 2]), 2, 31)
