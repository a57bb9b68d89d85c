"""The three fused ops under torch.autocast, on the native kernels and on the reference.

Documented behaviour (defect_fast.ops): under autocast the ops are on autocast's float32 list:
float16/bfloat16 inputs are upcast, the op runs in float32 with autocast off, and every output is
float32, whatever mix of input dtypes came in; gradients come back in each input's own dtype.
Checked here: outputs and gradients agree with float32 to bfloat16 tolerance, float32 inputs give
the float32 results exactly (nothing inside is lowered to bfloat16), mixed dtypes work, the
output dtype is float32, a CMA-AE and an AW-AE training step run under autocast, and (CUDA, where
a GPU is visible) the same for float16 and bfloat16.
"""
from __future__ import annotations

import pytest
import torch

from defect_fast import ops
from defect_fast.ops import _native

_MODULE, _REASON = _native.load()
BACKENDS = [
    "reference",
    pytest.param("native", marks=pytest.mark.skipif(_MODULE is None, reason=f"native extension unavailable: {_REASON}")),
]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once on the reference ops and once on the native kernels."""
    if request.param == "reference":
        monkeypatch.setenv("DEFECT_FAST_BACKEND", "reference")
    else:
        monkeypatch.delenv("DEFECT_FAST_BACKEND", raising=False)
    return request.param


def close_bf16(actual, expected, name, rel=3e-2):
    """Agreement to bfloat16 tolerance (8-bit mantissa: 2^-8 = 0.4 % per rounding), scaled to the tensor."""
    assert actual.shape == expected.shape, name
    scale = max(expected.abs().max().item(), 1e-6)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} x {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# Inputs (float32 originals, then the same values as the autocast caller would hold them)


def ma_inputs(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z, memory = torch.randn(7, 24, generator=g), torch.randn(12, 24, generator=g)
    gz, gw = torch.randn(7, 24, generator=g), torch.randn(7, 12, generator=g)
    return [t.to(device) for t in (z, memory, gz, gw)]


def ssim_inputs(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 19, 23, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, 19, 23, generator=g)).clamp(0, 1)
    sigma = torch.tensor([1.5, 3.0])
    return [t.to(device) for t in (x, y, sigma)]


def msfr_inputs(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)]
    fx = [torch.randn(s, generator=g).to(device) for s in shapes]
    fr = [(f.cpu() + 0.5 * torch.randn(f.shape, generator=g)).to(device) for f in fx]
    return fx, fr


def leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_(True)


def run_ma(z, memory, gz, gw):
    z_hat, w = ops.memory_address(z, memory, 1.0 / memory.shape[0], 1.0, 1)
    gzz, gm = torch.autograd.grad([z_hat, w], [z, memory], [gz, gw])
    return z_hat, w, gzz, gm


def run_ssim(x, y, sigma):
    score = ops.aw_ssim(x, y, sigma, window=7)
    gx, gy = torch.autograd.grad(score.sum(), [x, y])
    return score, gx, gy


def run_msfr(fx, fr):
    out = ops.msfr(fx, fr, (20, 20), [1.0, 4.0, 16.0])
    grads = torch.autograd.grad(out.sum(), [*fx, *fr])
    return out, grads


# ---------------------------------------------------------------------------------------------
# CPU, bfloat16 autocast


def test_memory_address_bf16_autocast_matches_float32(backend):
    z, memory, gz, gw = ma_inputs()
    ref = run_ma(leaf(z, torch.float32), leaf(memory, torch.float32), gz, gw)
    zb, mem = leaf(z, torch.bfloat16), leaf(memory, torch.float32)  # mixed: encoder output and a float32 parameter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_ma(zb, mem, gz, gw)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert out[2].dtype == torch.bfloat16 and out[3].dtype == torch.float32
    for name, a, e in zip(("z_hat", "weights", "grad_z", "grad_memory"), out, ref):
        close_bf16(a, e, name)


def test_aw_ssim_bf16_autocast_matches_float32(backend):
    x, y, sigma = ssim_inputs()
    ref = run_ssim(leaf(x, torch.float32), leaf(y, torch.float32), sigma)
    xb, yf = leaf(x, torch.bfloat16), leaf(y, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_ssim(xb, yf, sigma)
    assert out[0].dtype == torch.float32
    assert out[1].dtype == torch.bfloat16 and out[2].dtype == torch.float32
    for name, a, e in zip(("score", "grad_x", "grad_y"), out, ref):
        close_bf16(a, e, name)


def test_msfr_bf16_autocast_matches_float32(backend):
    fx, fr = msfr_inputs()
    ref_out, ref_grads = run_msfr([leaf(t, torch.float32) for t in fx], [leaf(t, torch.float32) for t in fr])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run_msfr([leaf(t, torch.bfloat16) for t in fx], [leaf(t, torch.float32) for t in fr])
    assert out.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [torch.float32] * 3
    close_bf16(out, ref_out, "map")
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        close_bf16(a, e, f"grad {i}")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the inference path (native kernel)
        fast = ops.msfr([t.bfloat16() for t in fx], fr, (20, 20), [1.0, 4.0, 16.0])
    assert fast.dtype == torch.float32
    close_bf16(fast, ref_out, "map (no grad)")


def test_float32_inputs_under_autocast_stay_float32_inside(backend):
    """Nothing inside the ops is lowered to bfloat16: float32 inputs give the float32 results."""
    z, memory, gz, gw = ma_inputs(seed=1)
    x, y, sigma = ssim_inputs(seed=1)
    fx, fr = msfr_inputs(seed=1)
    plain = (ops.memory_address(z, memory, 0.05)[0], ops.aw_ssim(x, y, sigma, window=7), ops.msfr(fx, fr, (20, 20)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = (ops.memory_address(z, memory, 0.05)[0], ops.aw_ssim(x, y, sigma, window=7), ops.msfr(fx, fr, (20, 20)))
    for name, a, e in zip(("memory_address", "aw_ssim", "msfr"), cast, plain):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_a_float64_sigma_does_not_make_aw_ssim_float64(backend):
    """The window widths do not decide the precision: bfloat16 images with a float64 sigma give
    the float32 result (they ran the float64 kernels); sigma itself is read as given."""
    x, y, sigma = ssim_inputs(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.aw_ssim(x.bfloat16(), y.bfloat16(), sigma.double(), window=7)
        same = ops.aw_ssim(x.bfloat16(), y.bfloat16(), sigma.float(), window=7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, same, rtol=1e-6, atol=1e-6)


def test_float64_input_under_autocast_computes_in_float64(backend):
    z, memory, _, _ = ma_inputs(seed=2)
    expected = ops.memory_address(z.double(), memory.double(), 0.05)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_hat, w = ops.memory_address(z.double(), memory.bfloat16(), 0.05)
    assert z_hat.dtype == torch.float64 and w.dtype == torch.float64
    close_bf16(z_hat, expected, "z_hat")


@pytest.mark.skipif(_MODULE is None, reason=f"native extension unavailable: {_REASON}")
def test_native_ops_called_directly_under_autocast():
    """torch.ops.defect_fast.* (without the Python front) upcast too: register_autocast."""
    from defect_fast.ops import _aw_ssim, _memory_address, _msfr  # noqa: F401 - registers the ops

    z, memory, _, _ = ma_inputs(seed=3)
    expected = ops.memory_address(z, memory, 0.05)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = torch.ops.defect_fast.memory_address(z.bfloat16(), memory, 0.05, 1.0, 1, False)
    assert outs[0].dtype == torch.float32
    close_bf16(outs[0], expected, "z_hat")


def test_a_torch_without_register_autocast_runs_the_ops_under_autocast():
    """torch.library.register_autocast is newer than some torch the package installs beside: every
    op's first call raised AttributeError when its module registered itself, so every predict."""
    import subprocess
    import sys

    code = ("import torch\n"
            "del torch.library.register_autocast\n"
            "from defect_fast import ops\n"
            "torch.manual_seed(0)\n"
            "z, memory = torch.randn(4, 8), torch.randn(16, 8)\n"
            "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
            "    z_hat, w = ops.memory_address(z.bfloat16(), memory, 0.05)\n"
            "    m = ops.msfr([torch.rand(1, 2, 8, 8).bfloat16()], [torch.rand(1, 2, 8, 8)], (16, 16))\n"
            "    x = torch.rand(2, 1, 16, 16)\n"
            "    s = ops.aw_ssim(x.bfloat16(), x, torch.ones(2), window=5)\n"
            "print(z_hat.dtype, w.dtype, m.dtype, s.dtype)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["torch.float32"] * 4


def test_mixed_dtypes_outside_autocast_still_rejected():
    z, memory, _, _ = ma_inputs()
    with pytest.raises((TypeError, RuntimeError)):
        ops.memory_address(z.bfloat16(), memory, 0.05)


@pytest.mark.parametrize("name", ["cmaae", "awae"])
def test_training_step_under_cpu_autocast(name):
    """A forward, loss and backward of each model under bfloat16 autocast (default backend); loss close to float32."""
    from defect_fast.models import build_model

    torch.manual_seed(0)
    model = build_model(name)
    if name == "cmaae":
        model.mam.memory.data = model.mam.memory.data[:64].clone()  # a small memory keeps the test fast
    p = model.patch_size
    x = torch.rand(2, 3, p, p) * 2 - 1
    out = model(x)
    loss32, _ = model.loss(out, x, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss, _ = model.loss(out, x, 0)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert abs(loss.item() - loss32.item()) <= 5e-2 * abs(loss32.item())
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# CUDA, float16 and bfloat16 autocast


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ops_cuda_autocast_match_float32(backend, dtype):
    z, memory, gz, gw = ma_inputs(device="cuda")
    ref = run_ma(leaf(z, torch.float32), leaf(memory, torch.float32), gz, gw)
    with torch.autocast("cuda", dtype=dtype):
        out = run_ma(leaf(z, dtype), leaf(memory, torch.float32), gz, gw)
    assert out[0].dtype == torch.float32 and out[2].dtype == dtype
    for n, a, e in zip(("z_hat", "weights", "grad_z", "grad_memory"), out, ref):
        close_bf16(a, e, n)

    x, y, sigma = ssim_inputs(device="cuda")
    ref = run_ssim(leaf(x, torch.float32), leaf(y, torch.float32), sigma)
    with torch.autocast("cuda", dtype=dtype):
        out = run_ssim(leaf(x, dtype), leaf(y, torch.float32), sigma)
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype
    for n, a, e in zip(("score", "grad_x", "grad_y"), out, ref):
        close_bf16(a, e, n)

    fx, fr = msfr_inputs(device="cuda")
    with torch.no_grad():
        ref_map = ops.msfr(fx, fr, (20, 20))
        with torch.autocast("cuda", dtype=dtype):
            fast = ops.msfr([t.to(dtype) for t in fx], fr, (20, 20))
    assert fast.dtype == torch.float32
    close_bf16(fast, ref_map, "map")
