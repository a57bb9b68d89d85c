"""AW-SSIM two-stage autoencoder: architecture, config, stages, losses and the sigma schedule."""
from __future__ import annotations

import importlib
import json
import math

from pathlib import Path

import pytest
import torch
from torch import nn

from defect_fast.models import MODELS
from defect_fast.models.awae.loss import LOSS_MODES
from defect_fast.models.awae.model import AWAE, SkipJoin
from defect_fast.ops import reference


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids spin-waiting on a loaded shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHARED = Path(__file__).resolve().parents[2] / "shared"
ALEXNET = SHARED / "weights" / "alexnet-features-imagenet.pth"


def lpips_available() -> bool:
    try:
        importlib.import_module("defect_fast.losses.lpips")
    except ImportError:
        return False
    return True


needs_lpips = pytest.mark.skipif(not lpips_available(), reason="defect_fast.losses.lpips (LPIPS) is not available in this build")


def patches(b: int, size: int, seed: int = 0) -> torch.Tensor:
    """[b, 3, size, size] in [-1, 1]: smooth stripes of per-sample frequency plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    imgs = []
    for i in range(b):
        f = 0.3 + 0.2 * i
        base = torch.stack([torch.sin(f * xx + c) * torch.cos(0.5 * f * yy) for c in range(3)])
        imgs.append(0.8 * base + 0.05 * torch.randn(3, size, size, generator=g))
    return torch.stack(imgs).clamp(-1, 1)


def tiny(**kw) -> AWAE:
    args = dict(patch_size=32, base_channels=4, latent_channels=8)
    args.update(kw)
    return AWAE(**args)


class StubPerceptual(nn.Module):
    """Stands in for LPIPS: [B] mean squared difference, with one parameter of its own."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, y):
        return self.scale * (x - y).pow(2).mean(dim=(1, 2, 3))


# -- architecture --------------------------------------------------------------------------------

def test_registered():
    assert MODELS["awae"] is AWAE
    m = AWAE()
    assert m.name == "awae" and m.default_map == "residual" and m.patch_size == 128
    assert set(m.anomaly_maps) == {"residual", "msfr", "ssim"}


def test_layer_shapes_128():
    m = AWAE().eval()
    seen: dict[str, tuple] = {}
    named = {f"enc{i}": b for i, b in enumerate(m.encoder)}
    named.update({f"dec{i}": b for i, b in enumerate(m.decoder)})
    named.update({"bottleneck": m.bottleneck, "head": m.head})
    named.update({f"join{k}": j for k, j in m.joins.items()})
    for name, mod in named.items():
        mod.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, tuple(out.shape)))
    with torch.no_grad():
        out = m(torch.zeros(2, 3, 128, 128))["recon"]
    assert seen == {
        "enc0": (2, 32, 64, 64), "enc1": (2, 64, 32, 32), "enc2": (2, 128, 16, 16),
        "enc3": (2, 256, 8, 8), "enc4": (2, 512, 4, 4), "bottleneck": (2, 512, 4, 4),
        "dec4": (2, 256, 8, 8), "join3": (2, 512, 8, 8), "dec3": (2, 128, 16, 16),
        "join2": (2, 256, 16, 16), "dec2": (2, 64, 32, 32), "dec1": (2, 32, 64, 64),
        "dec0": (2, 32, 128, 128), "head": (2, 3, 128, 128),
    }
    assert out.shape == (2, 3, 128, 128)
    assert m.bottleneck[0].out_channels == 128  # latent_channels
    assert sum(p.numel() for p in m.parameters()) == 7428643


def test_exactly_two_skip_connections():
    m = AWAE()
    joins = [mod for mod in m.modules() if isinstance(mod, SkipJoin)]
    assert len(joins) == 2 and sorted(j.level for j in joins) == [2, 3]
    calls = []
    for j in joins:
        j.register_forward_hook(lambda mod, inp, out: calls.append((mod.level, inp[1].shape[1], out.shape[1])))
    with torch.no_grad():
        m.eval()(torch.zeros(1, 3, 128, 128))
    assert sorted(calls) == [(2, 128, 256), (3, 256, 512)]
    # only the decoder blocks at skip levels read doubled channels
    doubled = [i for i, blk in enumerate(m.decoder) if blk[0].in_channels == 2 * m.encoder[i][0].out_channels]
    assert doubled == [2, 3]


def test_skips_carry_information():
    """Perturbing an encoder map at a skip level changes the output even with the bottleneck zeroed."""
    torch.manual_seed(0)
    m = tiny().eval()
    x = patches(1, 32)
    m.bottleneck.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    with torch.no_grad():
        base = m(x)["recon"]
        handle = m.encoder[3].register_forward_hook(lambda _m, _i, out: out + 1.0)
        moved = m(x)["recon"]
        handle.remove()
    assert (moved - base).abs().max() > 1e-3


def test_skip_levels_configurable_and_validated():
    m = tiny(skip_levels=(0, 4))
    assert sorted(j.level for j in m.joins.values()) == [0, 4]
    assert m(patches(2, 32))["recon"].shape == (2, 3, 32, 32)
    assert len(tiny(skip_levels=()).joins) == 0
    with pytest.raises(ValueError):
        tiny(skip_levels=(2, 2))
    with pytest.raises(ValueError):
        tiny(skip_levels=(5,))
    with pytest.raises(ValueError):
        AWAE(patch_size=100)
    for bad in ({"base_channels": 0}, {"latent_channels": 0}, {"base_channels": 2.5}):  # a conv error at the first step
        with pytest.raises(ValueError, match=next(iter(bad))):
            AWAE(**bad)


def test_features_and_msfr_weights():
    m = AWAE().eval()
    with torch.no_grad():
        feats = m.features(torch.zeros(1, 3, 128, 128))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 64, 64), (1, 64, 32, 32), (1, 128, 16, 16)]
    assert m.msfr_weights() == [16.0, 100.0, 484.0]
    assert m.msfr_weights() == reference.receptive_field_areas([(4, 2)] * 3)


# -- config and stages ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"ssim_weights": (0.5, 0.25, 0.25), "skip_levels": [1, 3], "loss_mode": "ssim_l1", "sigma_k": 0.01}])
def test_config_round_trip(kw):
    torch.manual_seed(0)
    m = tiny(**kw)
    cfg = json.loads(json.dumps(m.config()))
    assert cfg == m.config()
    torch.manual_seed(0)
    m2 = AWAE(**cfg)
    assert m2.config() == m.config() and m2.stages == m.stages
    m2.load_state_dict(m.state_dict(), strict=True)
    x = patches(2, 32)
    with torch.no_grad():
        assert torch.equal(m.eval()(x)["recon"], m2.eval()(x)["recon"])
    assert set(m.state_dict()) == set(m2.state_dict())


@pytest.mark.parametrize("mode,two_stage,stages", [
    ("awssim", None, ("normal", "synthetic")),
    ("awssim", False, ("normal",)),
    ("awssim_only", None, ("normal",)),
    ("ssim_l1", None, ("normal",)),
    ("lpips_ssim", None, ("normal",)),
    ("ssim_l1", True, ("normal", "synthetic")),
])
def test_loss_modes_stages(mode, two_stage, stages):
    m = tiny(loss_mode=mode, two_stage=two_stage)
    assert m.stages == stages
    assert m.config()["two_stage"] == (len(stages) == 2)
    assert AWAE.stages == ("normal", "synthetic")  # the class attribute (paper default) is untouched
    with pytest.raises(ValueError):
        m.loss({"recon": patches(1, 32)}, patches(1, 32), len(stages))


def test_bad_mode_and_weight():
    with pytest.raises(ValueError):
        tiny(loss_mode="mse")
    with pytest.raises(ValueError):
        tiny(stage2_ssim_weight=1.5)
    with pytest.raises(ValueError):
        tiny(ssim_weights="shiny")
    assert set(LOSS_MODES) == {"awssim", "awssim_only", "ssim_l1", "lpips_ssim"}


def test_trainable_parameters_per_stage():
    m = tiny()
    m.criterion.lpips_factory = lambda _w: StubPerceptual()
    n_model = sum(p.numel() for p in m.parameters())
    keys = set(m.state_dict())
    m.loss({"recon": patches(2, 32)}, patches(2, 32, seed=1), 1)  # builds the perceptual net
    for stage in (0, 1):
        params = m.trainable_parameters(stage)
        assert sum(p.numel() for p in params) == n_model
        assert {id(p) for p in params} == {id(p) for p in m.parameters()}
    assert sum(p.numel() for p in m.parameters()) == n_model  # the perceptual net is not part of the model
    assert set(m.state_dict()) == keys and len(m.criterion._lpips) == 1
    with pytest.raises(ValueError):
        m.trainable_parameters(2)


# -- losses --------------------------------------------------------------------------------------

def test_stage2_is_eq10_with_stub_perceptual():
    m = tiny(stage2_ssim_weight=0.8, sigma0=1.0, sigma_k=0.5)
    m.criterion.lpips_factory = lambda _w: StubPerceptual()
    recon, target = patches(2, 32, seed=1), patches(2, 32, seed=2)
    total, parts = m.loss({"recon": recon}, target, 1)
    sig = torch.tensor([1.0, 1.5])
    aw = 1.0 - reference.aw_ssim(recon + 1, target + 1, sig, 1 / 3, 1 / 3, 1 / 3, window=11, combine="sum", data_range=2.0).mean()
    lp = (recon - target).pow(2).mean()
    assert parts["awssim"] == pytest.approx(float(aw), abs=1e-6)
    assert parts["lpips"] == pytest.approx(float(lp), abs=1e-6)
    assert float(total.detach()) == pytest.approx(0.8 * float(aw) + 0.2 * float(lp), abs=1e-6)
    # stage 0 is AW-SSIM alone
    m.begin_epoch(0, 0)
    s0, parts0 = m.loss({"recon": recon}, target, 0)
    assert set(parts0) == {"awssim"} and float(s0) == pytest.approx(float(aw), abs=1e-6)


def test_ssim_l1_combination():
    m = tiny(loss_mode="ssim_l1", stage2_ssim_weight=0.7)
    recon, target = patches(2, 32, seed=1), patches(2, 32, seed=2)
    total, parts = m.loss({"recon": recon}, target, 0)
    assert parts["l1"] == pytest.approx(float((recon - target).abs().mean()), abs=1e-6)
    assert float(total) == pytest.approx(0.7 * parts["ssim"] + 0.3 * parts["l1"], abs=1e-6)


@pytest.mark.parametrize("mode", ["awssim", "ssim_l1"])
def test_training_decreases_loss(mode):
    torch.manual_seed(0)
    m = tiny(loss_mode=mode, sigma0=1.5, sigma_k=0.0)  # constant sigma: the losses compare step to step
    x = patches(4, 32)
    opt = torch.optim.Adam(m.trainable_parameters(0), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss, parts = m.loss(m(x), x, 0)
        assert torch.isfinite(loss) and all(math.isfinite(v) for v in parts.values())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 17, losses


def test_stage2_training_with_stub_decreases():
    torch.manual_seed(0)
    m = tiny(sigma0=1.5, sigma_k=0.0)
    m.criterion.lpips_factory = lambda _w: StubPerceptual()
    clean = patches(4, 32)
    damaged = clean.clone()
    damaged[:, :, 10:18, 10:18] = 1.0  # a square "defect"
    opt = torch.optim.Adam(m.trainable_parameters(1), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss, _ = m.loss(m(damaged), clean, 1)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 17, losses


@needs_lpips
@pytest.mark.shared
def test_stage2_with_real_lpips():
    if not ALEXNET.is_file():
        pytest.skip(f"AlexNet trunk weights for LPIPS not found at {ALEXNET}")
    m = tiny(lpips_weights=str(ALEXNET))
    keys = set(m.state_dict())
    recon, target = patches(2, 32, seed=1), patches(2, 32, seed=2)
    try:
        total, parts = m.loss({"recon": recon}, target, 1)
    except FileNotFoundError as err:  # the linear heads come from the lpips wheel
        pytest.skip(f"LPIPS weights not found: {err}")
    assert torch.isfinite(total) and parts["lpips"] > 0
    assert float(total) == pytest.approx(0.8 * parts["awssim"] + 0.2 * parts["lpips"], abs=1e-5)
    total2, parts2 = m.loss({"recon": target}, target, 1)
    assert parts2["lpips"] < 1e-4
    assert set(m.state_dict()) == keys


# -- sigma schedule through the model ------------------------------------------------------------

def test_begin_epoch_resets_and_measures_epoch_length():
    m = tiny(sigma0=0.5, sigma_end=3.0)
    sched = m.criterion.schedule
    x = patches(3, 32)
    m.begin_epoch(0, 0)
    m.loss({"recon": x}, x, 0)
    m.loss({"recon": x}, x, 0)
    assert sched.steps == 6
    assert sched.k is None  # epoch length not known yet: midpoint sigma
    m.begin_epoch(0, 1)
    assert sched.steps == 0 and sched.epoch_length == 6
    assert sched.next(6).tolist() == pytest.approx([0.5 + i * 2.5 / 6 for i in range(6)])
    assert sched.current == pytest.approx(3.0)
    # an announced length wins over the measured one
    m.set_epoch_length(10)
    m.begin_epoch(0, 2)
    assert sched.k == pytest.approx(0.25)
    # the SSIM-based modes have no schedule and begin_epoch is a no-op
    tiny(loss_mode="ssim_l1").begin_epoch(0, 0)


def test_eval_mode_does_not_advance_schedule():
    m = tiny(sigma0=0.5, sigma_k=0.1)
    x = patches(2, 32)
    m.eval()
    with torch.no_grad():
        m.loss(m(x), x, 0)
    assert m.criterion.schedule.steps == 0
    m.train()
    m.loss(m(x), x, 0)
    assert m.criterion.schedule.steps == 2


def test_batch_sigma_steps_count_batches_for_the_epoch_length_and_a_resume():
    """sigma_step="batch": the trainer announces patches and batch size; an epoch of 100 patches in
    batches of 10 is 10 schedule steps (sigma reaches sigma_end), and a resume 30 patches in is 3."""
    m = tiny(sigma_step="batch", sigma0=0.5, sigma_end=3.0)
    m.set_epoch_length(100, batch_size=10)
    m.begin_epoch(0, 0)
    sched = m.criterion.schedule
    assert sched.epoch_length == 10 and sched.k == pytest.approx(0.25)
    m.skip_patches(30, 10)
    assert sched.steps == 3
    per_patch = tiny(sigma0=0.5, sigma_end=3.0)  # the default counts patches
    per_patch.set_epoch_length(100, batch_size=10)
    per_patch.begin_epoch(0, 0)
    per_patch.skip_patches(30, 10)
    assert per_patch.criterion.schedule.epoch_length == 100 and per_patch.criterion.schedule.steps == 30


def test_the_perceptual_network_keeps_float32_weights_under_autocast():
    m = tiny()
    m.criterion.lpips_factory = lambda _w: StubPerceptual()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.criterion.lpips(patches(2, 32).bfloat16(), patches(2, 32, seed=1).bfloat16())
    assert m.criterion._lpips[0].scale.dtype == torch.float32
