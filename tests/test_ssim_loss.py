"""SSIM-family losses: the AW-SSIM sigma schedule (Eq. 9), weight presets, AWSSIMLoss and SSIMLoss."""
from __future__ import annotations

import math

import pytest
import torch

from defect_fast.losses.ssim import (
    CATEGORY_PRESETS,
    PRESETS,
    AWSSIMLoss,
    SigmaSchedule,
    SSIMLoss,
    preset_for,
    resolve_weights,
)
from defect_fast.ops import reference


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids spin-waiting on a loaded shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def textured(b: int, size: int = 32, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """[b, 3, size, size] in [-1, 1]: stripes of per-sample frequency plus noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=dtype), torch.arange(size, dtype=dtype), indexing="ij")
    imgs = []
    for i in range(b):
        f = 0.25 + 0.15 * i
        base = torch.stack([torch.sin(f * xx + c) * torch.cos(0.4 * f * yy) for c in range(3)])
        imgs.append(0.7 * base + 0.2 * torch.randn(3, size, size, generator=g, dtype=dtype))
    return torch.stack(imgs).clamp(-1, 1)


# -- SigmaSchedule -------------------------------------------------------------------------------

def test_schedule_hand_worked():
    s = SigmaSchedule(sigma0=1.0, k=0.5)
    assert s.next(3).tolist() == [1.0, 1.5, 2.0]
    assert s.next(2).tolist() == [2.5, 3.0]
    assert s.current == pytest.approx(3.5)
    s.reset()
    assert s.next(4).tolist() == [1.0, 1.5, 2.0, 2.5]


def test_schedule_shared_steps():
    s = SigmaSchedule(sigma0=1.0, k=0.25)
    assert s.next(3, shared=True).tolist() == [1.0, 1.0, 1.0]
    assert s.next(2, shared=True).tolist() == [1.25, 1.25]
    assert s.steps == 2


@pytest.mark.parametrize("n_images,batch_images,H,W,PH,PW,k", [(5, 2, 512, 512, 128, 128, 0.01), (7, 3, 256, 384, 128, 128, 0.003), (4, 4, 128, 128, 64, 32, 0.02)])
def test_schedule_matches_eq9(n_images, batch_images, H, W, PH, PW, k):
    """The paper's loop: per batch of images, one step per patch position shared by the batch."""
    sigma0 = 0.5
    expected = sigma0 + math.ceil(n_images / batch_images) * (H // PH) * (W // PW) * k
    s = SigmaSchedule(sigma0=sigma0, k=k)
    for start in range(0, n_images, batch_images):
        b = min(batch_images, n_images - start)
        for _ in range((H // PH) * (W // PW)):
            s.next(b, shared=True)
    assert s.current == pytest.approx(expected, rel=1e-12)
    # per-patch steps agree with Eq. 9 when a batch holds one image's patch (batch_images = 1)
    s.reset()
    for _ in range(n_images):
        s.next((H // PH) * (W // PW))
    assert s.current == pytest.approx(sigma0 + n_images * (H // PH) * (W // PW) * k, rel=1e-12)
    s.reset()
    assert s.current == sigma0


def test_schedule_derived_k():
    s = SigmaSchedule(sigma0=0.5, k=None, sigma_end=3.0)
    # length unknown: every patch gets the midpoint
    assert s.next(3).tolist() == pytest.approx([1.75] * 3)
    s.reset()
    s.set_epoch_length(10)
    assert s.k == pytest.approx(0.25)
    got = torch.cat([s.next(4), s.next(6)])
    assert got.tolist() == pytest.approx([0.5 + 0.25 * i for i in range(10)])
    assert s.current == pytest.approx(3.0)
    # a longer epoch than announced holds sigma_end
    assert s.next(3).tolist() == pytest.approx([3.0, 3.0, 3.0])
    s.reset()
    assert s.next(1).tolist() == pytest.approx([0.5])


def test_schedule_rejects_bad_args():
    with pytest.raises(ValueError):
        SigmaSchedule(sigma0=0.0)
    with pytest.raises(ValueError):
        SigmaSchedule(k=-0.1)
    with pytest.raises(ValueError):
        SigmaSchedule(sigma0=2.0, sigma_end=1.0)
    with pytest.raises(ValueError):
        SigmaSchedule().set_epoch_length(0)
    # values float32 cannot hold, and NaN (which every comparison let through to the first step)
    for kwargs in ({"sigma_end": float("nan")}, {"k": float("nan")}, {"sigma0": float("nan")}, {"k": 1e308},
                   {"sigma_end": 1e308}, {"sigma0": 1e-300}, {"sigma0": float("inf")}):
        with pytest.raises(ValueError, match="SigmaSchedule: (sigma0|sigma_end|k) must be"):
            SigmaSchedule(**kwargs)


# -- presets -------------------------------------------------------------------------------------

def test_presets_sum_to_one_and_rank():
    for name, w in PRESETS.items():
        assert sum(w) == pytest.approx(1.0, abs=1e-12), name
        assert all(v > 0 for v in w)
    a, b, g = PRESETS["structure"]
    assert g > a and g > b
    a, b, g = PRESETS["luminance"]
    assert a > b and a > g
    assert preset_for("Carpet") == "structure" and preset_for("magnetic-tile") == "luminance"
    assert preset_for("bottle") == "balanced"
    # the name as a person writes it: case, spaces, "-" and "_" alike ("magnetic tile" got "balanced")
    assert preset_for("magnetic tile") == preset_for("Magnetic_Tile") == preset_for(" magnetic  tile ") == "luminance"
    assert set(CATEGORY_PRESETS.values()) <= set(PRESETS)
    assert resolve_weights((0.5, 0.25, 0.25)) == (0.5, 0.25, 0.25)
    with pytest.raises(ValueError):
        resolve_weights("nope")
    with pytest.raises(ValueError):
        resolve_weights((1.0, -0.5, 0.5))


# -- AWSSIMLoss ----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_awssim_loss_zero_on_identical(preset):
    x = textured(3)
    loss = AWSSIMLoss(preset, sigma0=0.5, k=0.4)
    assert abs(float(loss(x, x.clone()))) < 1e-5
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    y = (x + 0.3 * noise).clamp(-1, 1)
    assert float(loss(x, y)) > 0.05


def test_awssim_per_sample_sigmas_are_used():
    x, y = textured(3, seed=1), textured(3, seed=2).flip(-1)
    loss = AWSSIMLoss((0.2, 0.3, 0.5), sigma0=1.0, k=0.5)
    batched = loss(x, y)
    assert loss.schedule.steps == 3
    separate = [1.0 - reference.aw_ssim(x[i:i + 1] + 1, y[i:i + 1] + 1, torch.tensor([s]), 0.2, 0.3, 0.5, 11, "sum", 2.0)
                for i, s in enumerate([1.0, 1.5, 2.0])]
    assert float(batched) == pytest.approx(float(torch.stack(separate).mean()), abs=1e-6)
    # the sigma really changes the score (so the comparison above is not vacuous)
    fixed = [float(1.0 - reference.aw_ssim(x[:1] + 1, y[:1] + 1, torch.tensor([s]), 0.2, 0.3, 0.5, 11, "sum", 2.0)) for s in (1.0, 2.0)]
    assert abs(fixed[0] - fixed[1]) > 1e-3


def test_awssim_eval_mode_holds_sigma():
    x, y = textured(2, seed=3), textured(2, seed=4)
    loss = AWSSIMLoss(sigma0=0.5, k=0.5, eval_sigma=1.5)
    loss.eval()
    a = loss(x, y)
    assert loss.schedule.steps == 0
    ref = 1.0 - reference.aw_ssim(x + 1, y + 1, torch.full((2,), 1.5), *PRESETS["balanced"], 11, "sum", 2.0).mean()
    assert float(a) == pytest.approx(float(ref), abs=1e-6)
    loss.train()
    loss(x, y)
    assert loss.schedule.steps == 2


def test_awssim_batch_step_and_fixed_sigma():
    x = textured(4)
    loss = AWSSIMLoss(sigma0=1.0, k=0.5, sigma_step="batch")
    assert loss.sigmas(4).tolist() == [1.0] * 4
    assert loss.sigmas(4).tolist() == [1.5] * 4
    fixed = AWSSIMLoss(fixed_sigma=2.0)
    assert fixed.sigmas(3).tolist() == [2.0] * 3 and fixed.schedule.steps == 0
    fixed(x, x)
    assert fixed.schedule.steps == 0


def test_awssim_gradient_finite():
    x = textured(2, seed=5).requires_grad_(True)
    y = textured(2, seed=6)
    loss = AWSSIMLoss("structure", sigma0=0.5, k=1.0)
    loss(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# -- SSIMLoss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_loss_matches_pytorch_msssim(dtype, seed):
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    x = textured(3, size=37, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 10)
    y = (0.8 * x + 0.3 * torch.randn(x.shape, generator=g, dtype=dtype)).clamp(-1, 1)
    ours = SSIMLoss()(x, y)
    theirs = 1.0 - pytorch_msssim.ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0, size_average=True, win_size=11, win_sigma=1.5)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)
    assert 0.05 < float(ours) < 1.5  # a real difference, not a trivial 0


def test_ssim_loss_zero_on_identical():
    x = textured(2)
    assert abs(float(SSIMLoss()(x, x.clone()))) < 1e-5


# -- the input range: luminance needs intensities from 0 -------------------------------------------

def test_a_slightly_brighter_texture_is_nearly_equal_in_luminance():
    """A texture 5 % brighter than its reconstruction ([0, 1] terms: +0.05) is close in every term.
    On zero-centred values the luminance term fell to about 0 (means of opposite sign or near 0)."""
    x = (0.5 * textured(2, seed=4)).clamp(-1, 1)  # mid-grey on average: the zero-centred worst case
    y = x + 0.1  # +0.05 of the [0, 1] range
    for loss in (AWSSIMLoss("luminance", fixed_sigma=1.5), AWSSIMLoss((1.0, 0.0, 0.0), fixed_sigma=1.5), SSIMLoss()):
        assert float(loss(x, y)) < 0.02, loss
    # what the loss computes: the index of the images in [0, 2] (equivalently [0, 1] with L = 1)
    want = 1.0 - reference.aw_ssim((x + 1) / 2, (y + 1) / 2, torch.full((2,), 1.5), 0.6, 0.2, 0.2, 11, "sum", 1.0).mean()
    assert float(AWSSIMLoss("luminance", fixed_sigma=1.5)(x, y)) == pytest.approx(float(want), abs=1e-6)


def test_a_given_range_is_shifted_to_start_at_zero():
    x, y = textured(2, seed=5), textured(2, seed=6)
    shifted = AWSSIMLoss("balanced", fixed_sigma=1.5, data_range=1.0, low=0.0)((x + 1) / 2, (y + 1) / 2)
    assert float(AWSSIMLoss("balanced", fixed_sigma=1.5)(x, y)) == pytest.approx(float(shifted), abs=1e-6)


def test_the_sigma_schedule_is_not_rounded_to_a_bfloat16_batch(monkeypatch):
    """Under autocast the reconstruction is bfloat16; the sigmas still follow the schedule in float32."""
    import defect_fast.ops as ops

    seen = []
    real = ops.aw_ssim
    monkeypatch.setattr(ops, "aw_ssim", lambda x, y, sigma, *a: seen.append(sigma) or real(x, y, sigma, *a))
    loss = AWSSIMLoss("balanced", sigma0=0.5, k=0.001)
    x, y = textured(3, seed=7).bfloat16(), textured(3, seed=8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss(x, y)
    assert seen[0].dtype == torch.float32
    assert seen[0].tolist() == pytest.approx([0.5, 0.501, 0.502], abs=1e-7)


def test_a_range_of_one_means_zero_to_one_inputs():
    """data_range=1 alone: inputs in [0, 1], no shift (it shifted them by +1 to [1, 2])."""
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    x, y = (textured(2, seed=9) + 1) / 2, (textured(2, seed=10) + 1) / 2
    theirs = 1.0 - pytorch_msssim.ssim(x, y, data_range=1.0, size_average=True, win_size=11, win_sigma=1.5)
    assert float(SSIMLoss(data_range=1.0)(x, y)) == pytest.approx(float(theirs), abs=1e-5)


def test_the_shift_is_done_in_float32_under_autocast(monkeypatch):
    import defect_fast.ops as ops

    seen = []
    real = ops.aw_ssim
    monkeypatch.setattr(ops, "aw_ssim", lambda x, y, sigma, *a: seen.append(x.dtype) or real(x, y, sigma, *a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        AWSSIMLoss("balanced", fixed_sigma=1.5)(textured(2).bfloat16(), textured(2, seed=3).bfloat16())
    assert seen[0] == torch.float32  # what the loss hands the op (the op then calls itself once more)


def test_the_papers_fig4_categories_get_the_favoured_term_it_names():
    """Fig. 4 of the AW-SSIM paper: structure weighted highest for carpet, leather and wood;
    luminance for tile, pill and hazelnut (category names as MVTec AD spells them, any case)."""
    for category in ("carpet", "leather", "wood"):
        assert preset_for(category) == "structure", category
    for category in ("tile", "pill", "hazelnut", "Tile"):
        assert preset_for(category) == "luminance", category


def test_an_empty_shared_batch_leaves_the_schedule_where_it_was():
    """A batch of no patches uses no sigma: the next batch still gets the sigma it would have got."""
    s = SigmaSchedule(sigma0=1.0, k=0.25)
    assert s.next(2, shared=True).tolist() == [1.0, 1.0]
    assert s.next(0, shared=True).numel() == 0
    assert s.steps == 1
    assert s.next(3, shared=True).tolist() == [1.25, 1.25, 1.25]


@pytest.mark.parametrize("weights", [(float("inf"), 0.0, 0.0), (float("nan"), 0.5, 0.5), (0.2, 0.2, float("inf"))])
def test_weights_that_are_not_finite_are_refused(weights):
    """An infinite or NaN weight would make every loss value inf or NaN from the first step: refused."""
    with pytest.raises(ValueError, match="finite"):
        resolve_weights(weights)
    with pytest.raises(ValueError, match="finite"):
        AWSSIMLoss(weights=weights)
