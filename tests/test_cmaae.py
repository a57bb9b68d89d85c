"""CMA-AE: Table I shapes, memory addressing and entropy on hand-computed inputs, MSFR on known features."""
import itertools
import math

import pytest
import torch
from torch import nn

from defect_fast import ops
from defect_fast.models import build_model
from defect_fast.models.cmaae.model import attention_entropy
from defect_fast.ops import reference


def test_table1_encoder_decoder_shapes():
    m = build_model("cmaae", memory_size=16)
    x = torch.randn(2, 3, 64, 64)
    shapes, bn, kernels = [], [], []
    h = x
    for layer in m.encoder:
        h = layer(h)
        shapes.append(tuple(h.shape[1:]))
        bn.append(any(isinstance(s, nn.BatchNorm2d) for s in layer))
        kernels.append((layer[0].kernel_size[0], layer[0].stride[0], layer[0].padding[0]))
    assert shapes == [(32, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 1, 1)]
    assert bn == [False, True, True, True, True, False]
    assert kernels == [(4, 2, 1), (3, 1, 1), (4, 2, 1), (4, 2, 1), (4, 2, 1), (4, 1, 0)]
    dshapes, dbn = [], []
    for layer in m.decoder:
        h = layer(h)
        dshapes.append(tuple(h.shape[1:]))
        dbn.append(any(isinstance(s, nn.BatchNorm2d) for s in layer))
    assert dshapes == [(256, 4, 4), (128, 8, 8), (64, 16, 16), (32, 32, 32), (32, 32, 32), (3, 64, 64)]
    assert dbn == [False, True, True, True, True, False]
    assert isinstance(m.decoder[-1][-1], nn.Tanh)
    for fc in (m.frm.forget, m.frm.input, m.frm.candidate):
        assert (fc.in_features, fc.out_features) == (1024, 512)
    assert m.mam.memory.shape == (16, 512)
    assert m.mam.shrink_threshold == pytest.approx(1 / 16)


def test_msfr_weights_are_receptive_field_areas():
    # RF after conv4s2 = 4, after conv3s1 = 4 + 2*2 = 8, after conv4s2 = 8 + 3*2 = 14.
    assert build_model("cmaae", memory_size=8).msfr_weights() == [16.0, 64.0, 196.0]


def _hand_case():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[3.0, 0.0]], dtype=torch.float64)  # cosines 1, 0, -1
    return z, memory


@pytest.mark.parametrize("impl", ["reference", "front"])
def test_memory_address_hand_computed(impl):
    z, memory = _hand_case()
    fn = reference.memory_address if impl == "reference" else ops.memory_address
    # softmax(1, 0, -1) = (e, 1, 1/e) / (e + 1 + 1/e) = (0.665, 0.245, 0.090); t = 0.2 drops the third,
    # the rest renormalise to (e/(e+1), 1/(e+1)).
    z_hat, w = fn(z, memory, 0.2, 1.0, 1)
    e = math.e
    assert w[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1), 0.0], abs=1e-9)
    assert z_hat[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)], abs=1e-9)
    # No shrinkage: the softmax itself; L2 renormalisation: unit Euclidean norm.
    _, w0 = fn(z, memory, 0.0, 1.0, 1)
    s = e + 1 + 1 / e
    assert w0[0].tolist() == pytest.approx([e / s, 1 / s, 1 / e / s], abs=1e-9)
    _, w2 = fn(z, memory, 0.2, 1.0, 2)
    assert w2[0].tolist() == pytest.approx([e / math.hypot(e, 1), 1 / math.hypot(e, 1), 0.0], abs=1e-9)
    # Temperature 0.5 doubles the logits.
    _, wt = fn(z, memory, 0.0, 0.5, 1)
    s2 = e**2 + 1 + e**-2
    assert wt[0, 0].item() == pytest.approx(e**2 / s2, abs=1e-9)


def test_entropy_hand_computed():
    w = torch.tensor([[0.75, 0.25, 0.0], [1.0, 0.0, 0.0]])
    expected = (-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) + 0.0) / 2
    assert attention_entropy(w).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("activation,target", itertools.product(("softmax", "sigmoid"), ("memory", "encoder")))
def test_feature_repair_gates_hand_computed(activation, target):
    """Eqs. 6-10: forget and input gates sigma(W [z, z_hat] + b), candidate tanh(W_c [z, z_hat] + b_c),
    out = f * (z_hat, or z with gate_target="encoder") + i * c, with sigma the softmax (the paper)
    or the logistic function."""
    from defect_fast.models.cmaae.model import FeatureRepair

    torch.manual_seed(0)
    frm = FeatureRepair(6, activation, target)
    z, z_hat = torch.randn(3, 6), torch.randn(3, 6)
    both = torch.cat([z, z_hat], dim=1)
    gate = (lambda t: torch.softmax(t, dim=1)) if activation == "softmax" else torch.sigmoid
    f = gate(both @ frm.forget.weight.T + frm.forget.bias)
    i = gate(both @ frm.input.weight.T + frm.input.bias)
    c = torch.tanh(both @ frm.candidate.weight.T + frm.candidate.bias)
    want = f * (z_hat if target == "memory" else z) + i * c
    torch.testing.assert_close(frm(z, z_hat), want, rtol=1e-6, atol=1e-6)


def test_training_loss_is_eq_12():
    """Eq. 12 with the weights of the paper's setting: 50 * L1 reconstruction + 0.01 * the mean
    attention entropy (Eq. 5), in both stages."""
    torch.manual_seed(0)
    model = build_model("cmaae", memory_size=20).train()
    x, target = torch.rand(4, 3, 64, 64) * 2 - 1, torch.rand(4, 3, 64, 64) * 2 - 1
    out = model(x)
    hand = 50 * (out["recon"] - target).abs().mean() - 0.01 * (out["weights"] * torch.log(out["weights"] + 1e-12)).sum(1).mean()
    for stage in (0, 1):
        total, parts = model.loss(out, target, stage)
        torch.testing.assert_close(total, hand, rtol=1e-6, atol=1e-6)
        assert parts["entropy"] == pytest.approx(float(attention_entropy(out["weights"].detach())), rel=1e-6)


def test_msfr_known_features():
    # Scale 1: residual (2-0)^2 = 4 everywhere; scale 2: 1 everywhere; weights 1 and 3 -> 1.75.
    fx = [torch.full((1, 4, 2, 2), 2.0), torch.ones(1, 5, 4, 4)]
    fr = [torch.zeros(1, 4, 2, 2), torch.zeros(1, 5, 4, 4)]
    with torch.no_grad():
        out = ops.msfr(fx, fr, (8, 8), [1.0, 3.0])
    assert out.shape == (1, 1, 8, 8)
    assert torch.allclose(out, torch.full_like(out, 1.75))
    # Bilinear, align_corners=False: a 1x2 residual (0, 4) on width 4 samples at x = -.25, .25, .75, 1.25.
    fx = [torch.tensor([[[[0.0, 2.0]]]])]
    fr = [torch.zeros(1, 1, 1, 2)]
    with torch.no_grad():
        out = ops.msfr(fx, fr, (1, 4))
    assert out[0, 0, 0].tolist() == pytest.approx([0.0, 1.0, 3.0, 4.0])


@pytest.mark.parametrize("fusion", ["cmam", "mam", "cat", "none"])
def test_fusion_variants_train_step(fusion):
    torch.manual_seed(0)
    m = build_model("cmaae", fusion=fusion, memory_size=32)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    opt = torch.optim.Adam(m.trainable_parameters(0), lr=1e-3)
    first = None
    for _ in range(8):
        loss, parts = m.loss(m(x), x, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    assert ("entropy" in parts) == (fusion != "none")


def test_stage_two_freezes_memory_only():
    m = build_model("cmaae", memory_size=8)
    p0 = {id(p) for p in m.trainable_parameters(0)}
    p1 = {id(p) for p in m.trainable_parameters(1)}
    assert p0 - p1 == {id(m.mam.memory)}
    assert {id(p) for p in m.frm.parameters()} <= p1


def test_switches_and_config_roundtrip():
    m = build_model("cmaae", gate_activation="sigmoid", gate_target="encoder", renorm_p=2, memory_size=8, two_stage=False)
    assert m.stages == ("normal",)
    clone = build_model("cmaae", **m.config())
    clone.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 64, 64)
    m.eval(), clone.eval()
    assert torch.equal(m(x)["recon"], clone(x)["recon"])
    with pytest.raises(ValueError, match="gate_activation"):
        build_model("cmaae", gate_activation="relu")
    with pytest.raises(ValueError, match="fusion"):
        build_model("cmaae", fusion="lstm")


@pytest.mark.parametrize("fusion", ["cmam", "cat"])
def test_latent_width_sets_code_memory_and_gates(fusion):
    m = build_model("cmaae", latent=96, memory_size=8, fusion=fusion)
    out = m(torch.randn(2, 3, 64, 64))
    assert out["recon"].shape == (2, 3, 64, 64)
    assert m.encoder[-1][0].out_channels == 96 and m.decoder[0][0].in_channels == 96
    assert m.mam.memory.shape == (8, 96)
    if fusion == "cmam":
        assert (m.frm.forget.in_features, m.frm.forget.out_features) == (192, 96)
    else:
        assert (m.cat.in_features, m.cat.out_features) == (192, 96)
    clone = build_model("cmaae", **m.config())
    clone.load_state_dict(m.state_dict())
    assert m.config()["latent"] == 96
    with pytest.raises(ValueError, match="latent"):
        build_model("cmaae", latent=0)


@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_matrix_product_layers_are_the_convolutions_they_replace(layer):
    """Table I's 4x4 -> 1x1 encoder layer and 1x1 -> 4x4 decoder layer run as matrix products:
    the same outputs and gradients as the convolution modules, the same state dict keys, and
    the convolution itself for any other input size."""
    from defect_fast.layers import KernelSizedConv2d, PointConvTranspose2d
    from defect_fast.precision import is_channels_last

    torch.manual_seed(0)
    if layer == "encoder":
        fast, plain = KernelSizedConv2d(16, 24, 4, 1, 0), nn.Conv2d(16, 24, 4, 1, 0)
        shapes = [(5, 16, 4, 4), (2, 16, 6, 5)]
    else:
        fast, plain = PointConvTranspose2d(24, 16, 4, 1, 0), nn.ConvTranspose2d(24, 16, 4, 1, 0)
        shapes = [(5, 24, 1, 1), (2, 24, 3, 2)]
    plain.load_state_dict(fast.state_dict())
    # inputs and weights in either layout: channels-last weights take the (kh, kw, C) order
    for shape, channels_last, weights_channels_last in itertools.product(shapes, (False, True), (False, True)):
        memory_format = torch.channels_last if weights_channels_last else torch.contiguous_format
        fast, plain = fast.to(memory_format=memory_format), plain.to(memory_format=memory_format)
        assert is_channels_last(fast.weight) == weights_channels_last
        x = torch.randn(*shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fast(xa), plain(xb)
        torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(yb)
        ga = torch.autograd.grad(ya, [xa, fast.weight, fast.bias], g)
        gb = torch.autograd.grad(yb, [xb, plain.weight, plain.bias], g)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cmaae_uses_the_matrix_product_layers_and_loads_plain_state_dicts():
    from defect_fast.layers import KernelSizedConv2d, PointConvTranspose2d

    model = build_model("cmaae")
    assert isinstance(model.encoder[-1][0], KernelSizedConv2d)
    assert isinstance(model.decoder[0][0], PointConvTranspose2d)
    assert sum(isinstance(m, (KernelSizedConv2d, PointConvTranspose2d)) for m in model.modules()) == 2
    other = build_model("cmaae")
    other.load_state_dict(model.state_dict())  # keys and shapes are those of the plain layers


def test_the_ssim_map_is_one_minus_the_ssim_index_centred_on_each_pixel():
    """AE-SSIM's map (Bergmann et al.): 1 - SSIM of x and its reconstruction, 11x11 Gaussian window
    of std 1.5, channel mean. Inside the patch each pixel's value is the index of the window
    centred on it; at the border the window's outer part repeats the edge pixels."""
    from defect_fast.models.cmaae.anomaly_map import ssim

    g = torch.Generator().manual_seed(0)
    x, r = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    model = build_model("ae-ssim")
    m = ssim(model, x, r)
    assert m.shape == (2, 1, 32, 32)
    _, index = reference.aw_ssim(x + 1, r + 1, torch.full((2,), 1.5), 1.0, 1.0, 1.0, 11, "product", 2.0, return_map=True)
    torch.testing.assert_close(m[:, :, 5:-5, 5:-5], (1 - index).mean(dim=1, keepdim=True), rtol=0, atol=1e-4)
    import pytorch_msssim  # the standard index: its mean over the valid windows
    want = 1 - pytorch_msssim.ssim((x + 1) / 2, (r + 1) / 2, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5)
    torch.testing.assert_close(m[:, 0, 5:-5, 5:-5].mean(dim=(1, 2)), want, rtol=0, atol=1e-5)
    assert float(ssim(model, x, x).abs().max()) < 1e-5
    # the baseline maps by it; a model file that records the residual keeps it
    assert model.default_map == "ssim" and build_model("ae-ssim", map="residual").default_map == "residual"
    assert build_model("ae-l2").default_map == "residual" and "ssim" in build_model("awae").anomaly_maps


def test_the_ssim_map_makes_its_window_once_per_device(monkeypatch):
    """A call after the first makes no tensor from host numbers: on a GPU that is a blocking copy,
    which a CUDA graph's capture (``Detector(cuda_graphs=True)`` replays the map) refuses. The
    window made under inference mode serves a later call that records gradients."""
    from defect_fast.models.cmaae.anomaly_map import ssim

    model = build_model("ae-ssim")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.inference_mode():
        first = ssim(model, x, x.flip(-1))
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    r = (x.flip(-1)).requires_grad_()
    again = ssim(model, x, r)
    assert made == []
    torch.testing.assert_close(again.detach(), first, rtol=0, atol=0)
    again.sum().backward()
    assert r.grad is not None and bool(r.grad.abs().sum() > 0)
