"""The fused inference copy: same function as the model, the model itself untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from defect_fast.detect import Detector
from defect_fast.fuse import fuse_for_inference
from defect_fast.layers import KernelSizedConv2d, PointConvTranspose2d, rebuilt_as
from defect_fast.models import build_model


def _model(name):
    torch.manual_seed(0)
    kw = {"memory_size": 20} if name == "cmaae" else {"patch_size": 32, "base_channels": 4, "latent_channels": 8}
    m = build_model(name, **kw)
    with torch.no_grad():
        for mod in m.modules():  # batch norm far from the identity, so a wrong fold shows
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.3, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m.eval()


@pytest.mark.parametrize("name", ["cmaae", "awae"])
def test_fused_copy_computes_the_same_outputs(name):
    m = _model(name)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fused = fuse_for_inference(m)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in fused.modules())
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())  # the original keeps its layers
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.rand(5, 3, m.patch_size, m.patch_size) * 2 - 1
    with torch.no_grad():
        a, b = m(x), fused(x)
    torch.testing.assert_close(b["recon"], a["recon"], atol=1e-5, rtol=1e-4)
    for fa, fb in zip(a["features"], b["features"]):
        torch.testing.assert_close(fb, fa, atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in fused.parameters())


def test_the_matrix_product_layers_take_unbatched_inputs_as_the_plain_layers_do():
    """[C, H, W] without a batch: the plain layers' results (the products failed on the missing dimension)."""
    torch.manual_seed(0)
    conv, tconv = nn.Conv2d(8, 5, 4), nn.ConvTranspose2d(5, 8, 4)
    mconv, mtconv = rebuilt_as(KernelSizedConv2d, conv), rebuilt_as(PointConvTranspose2d, tconv)
    x, z = torch.randn(8, 4, 4), torch.randn(5, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(mconv(x), conv(x))
        torch.testing.assert_close(mtconv(z), tconv(z))
        torch.testing.assert_close(mconv(x[None])[0], conv(x))  # and batched, the product


def test_cmaae_single_position_layers_stay_matrix_products():
    fused = fuse_for_inference(_model("cmaae"))
    kinds = [type(x) for x in fused.modules()]
    assert KernelSizedConv2d in kinds and PointConvTranspose2d in kinds


@pytest.mark.parametrize("size", [4, 7])
@pytest.mark.parametrize("channels_last", [False, True])
def test_plain_single_position_layers_become_the_matrix_product_layers(size, channels_last):
    """Unpadded convolutions and stride-1 transposed convolutions of other models become the
    matrix-product layers: the same outputs, the product on the kernel-sized (1x1) input and the
    convolution on any other."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(6, 5, 4), nn.ConvTranspose2d(5, 6, 4))
    fused = fuse_for_inference(seq)
    assert [type(m) for m in fused] == [KernelSizedConv2d, PointConvTranspose2d]
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    x = torch.randn(3, 6, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), seq(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,channels_last", [("cmaae", True), ("cmaae", False), ("awae", True)])
def test_detector_fuse_option_keeps_the_maps(name, channels_last):
    m = _model(name)
    size = 128 if name == "cmaae" else 64
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    kw = dict(image_size=size, precision="float32", channels_last=channels_last)
    plain = Detector(m, fuse=False, **kw)
    fused = Detector(m, **kw)
    assert fused.options()["fuse"] and fused.model is not m and plain.model is m
    torch.testing.assert_close(fused(x)[0], plain(x)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel,padding", [(3, 1), (5, 1), (4, 2)])
def test_stride_one_transposed_convolution_becomes_the_equal_convolution(kernel, padding):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.ConvTranspose2d(6, 5, kernel, 1, padding))
    fused = fuse_for_inference(seq)
    assert isinstance(fused[0], nn.Conv2d)
    x = torch.randn(2, 6, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), seq(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["cmaae", "awae"])
def test_weights_stored_in_the_autocast_dtype_give_the_autocast_outputs(name):
    """Stored bf16 weights are the rounding autocast applies on every call: outputs agree with the
    float32 copy run under autocast, and the memory items and biases stay float32."""
    m = _model(name)
    fp32, bf16 = fuse_for_inference(m), fuse_for_inference(m, torch.bfloat16)
    convs = [x for x in bf16.modules() if isinstance(x, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    assert convs and all(c.weight.dtype == torch.bfloat16 for c in convs)
    assert all(c.bias is None or c.bias.dtype == torch.float32 for c in convs)
    if name == "cmaae":
        assert bf16.mam.memory.dtype == torch.float32
        assert any(isinstance(c, KernelSizedConv2d) for c in convs) and any(isinstance(c, PointConvTranspose2d) for c in convs)
    x = torch.rand(5, 3, m.patch_size, m.patch_size) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fp32(x), bf16(x)
    torch.testing.assert_close(b["recon"].float(), a["recon"].float(), atol=1e-2, rtol=0)
    for fa, fb in zip(a["features"], b["features"]):
        torch.testing.assert_close(fb.float(), fa.float(), atol=1e-2, rtol=0)


def test_fuse_refuses_other_weight_dtypes():
    with pytest.raises(ValueError, match="weight_dtype"):
        fuse_for_inference(_model("cmaae"), torch.float64)


def test_detector_in_bfloat16_stores_bf16_weights_and_export_refuses_them(tmp_path):
    from defect_fast.export import export_detector

    det = Detector(_model("cmaae"), image_size=128, precision="bfloat16")
    assert det.model.encoder[0][0].weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision='float32'"):
        export_detector(det, tmp_path / "m.onnx", "onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("cin,cout,size", [(32, 3, 8), (6, 1, 5), (8, 16, 4)])
def test_stride_two_transposed_convolution_in_sub_pixel_form(cin, cout, size):
    """The sub-pixel form computes the transposed convolution; the inference copy uses it only for
    few output channels (where it measured faster)."""
    from defect_fast.fuse import SubPixelConvTranspose2d

    torch.manual_seed(0)
    seq = nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.Tanh())
    x = torch.randn(3, cin, size, size + 2)
    with torch.no_grad():
        torch.testing.assert_close(SubPixelConvTranspose2d(seq[0])(x), seq[0](x), atol=1e-5, rtol=1e-5)
        fused = fuse_for_inference(seq)
        assert isinstance(fused[0], SubPixelConvTranspose2d) == (cout <= 4)
        torch.testing.assert_close(fused(x), seq(x), atol=1e-5, rtol=1e-5)


def test_a_grouped_transposed_convolution_keeps_its_batch_norm():
    """torch's folding scales a transposed weight [in, out / groups, k, k] along its second dim,
    which holds every output channel only with one group: a grouped one followed by BN failed to
    fuse ("size of tensor a (3) must match ... (6)"), so a Detector of such a model could not be
    built with the default fuse. A plain one is still folded."""
    torch.manual_seed(0)
    for groups in (2, 1):
        m = nn.Sequential(nn.ConvTranspose2d(4, 6, 4, 2, 1, groups=groups, bias=False), nn.BatchNorm2d(6)).eval()
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        x = torch.randn(2, 4, 5, 5)
        fused = fuse_for_inference(m)
        torch.testing.assert_close(fused(x), m(x), rtol=1e-5, atol=1e-5)
        assert isinstance(fused[1], nn.BatchNorm2d) == (groups != 1), groups


def test_a_transposed_convolution_of_unequal_padding_becomes_the_equal_convolution():
    """Height and width padding of a stride-1 transposed convolution are each the convolution's own."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.ConvTranspose2d(3, 4, (3, 5), 1, (0, 2)), nn.Tanh())
    x = torch.randn(2, 3, 6, 7)
    with torch.no_grad():
        fused = fuse_for_inference(seq)
        assert isinstance(fused[0], nn.Conv2d)
        torch.testing.assert_close(fused(x), seq(x), atol=1e-5, rtol=1e-5)


def test_a_batch_norm_without_running_statistics_is_kept_not_folded():
    """A BatchNorm2d(track_running_stats=False) normalises by each batch's own statistics, which
    no weight can hold: it stays after the convolution."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(2, 3, 5, 5)
    fused = fuse_for_inference(m)
    assert isinstance(fused[1], nn.BatchNorm2d)
    torch.testing.assert_close(fused(x), m(x), atol=1e-5, rtol=1e-5)


def test_the_fused_copy_keeps_no_gradients():
    """The inference copy's parameters take no gradient: calling it with autograd on builds no graph."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(5, 2))
    fused = fuse_for_inference(m)
    assert not any(p.requires_grad for p in fused.parameters())
    assert all(p.requires_grad for p in m.parameters())  # the model given is left as it was
    assert not fused(torch.randn(1, 3, 5, 5)).requires_grad


@pytest.mark.parametrize("options", [{"padding": 1}, {"groups": 2}])
def test_a_kernel_sized_convolution_that_is_padded_or_grouped_computes_the_plain_convolution(options):
    """KernelSizedConv2d has the function of nn.Conv2d for every layer it can be built as: a padded
    layer (more than one output position on a kernel-sized input) or a grouped one (a block-diagonal
    weight) is computed as the convolution, not as the one-position matrix product."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 4, **options)
    mconv = KernelSizedConv2d(8, 6, 4, **options)
    mconv.load_state_dict(conv.state_dict())
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(mconv(x), conv(x))
