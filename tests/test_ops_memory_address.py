"""defect_fast::memory_address: native kernels against reference.memory_address.

Forward values and the gradients of both outputs (z_hat and the weights, which feed the entropy
loss) are compared with the pure-PyTorch reference in float32 and float64 over seeds and shapes
chosen to hit the 8-wide tails of the CPU loops; plus gradcheck, opcheck, non-contiguous and
empty inputs, input errors, torch.compile, and CUDA against CPU where a GPU is visible.
"""
from __future__ import annotations

import pytest
import torch

from defect_fast import ops
from defect_fast.ops import _native, reference

_MODULE, _REASON = _native.load()
pytestmark = pytest.mark.skipif(_MODULE is None, reason=f"native extension unavailable: {_REASON}")
if _MODULE is not None:
    from defect_fast.ops import _memory_address as native


def make_inputs(B, N, C, dtype=torch.float64, seed=0, device="cpu", requires_grad=True):
    """z [B, C], memory [N, C] and upstream gradients for z_hat [B, C] and weights [B, N]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, generator=g, dtype=torch.float64)
    memory = torch.randn(N, C, generator=g, dtype=torch.float64)
    grad_z_hat = torch.randn(B, C, generator=g, dtype=torch.float64)
    grad_weights = torch.randn(B, N, generator=g, dtype=torch.float64)
    out = [t.to(device=device, dtype=dtype) for t in (z, memory, grad_z_hat, grad_weights)]
    if requires_grad:
        out[0].requires_grad_(True)
        out[1].requires_grad_(True)
    return out


def shrink_margin(z, memory, t, temperature):
    """min |w - t| over the softmax weights: the distance of any weight from the shrinkage kink."""
    zn = torch.nn.functional.normalize(z.detach().double(), dim=1)
    mn = torch.nn.functional.normalize(memory.detach().double(), dim=1)
    w = torch.softmax(zn @ mn.t() / temperature, dim=1)
    return (w - t).abs().min().item() if w.numel() else float("inf")


def shrink_conditioning(z, memory, t, temperature, eps=1e-12):
    """max over the weights kept by the shrinkage of w * eps / (w - t)^2: how far the gradient's
    factor 1 + w * eps / (w - t)^2 is from 1. Near the kink it grows without bound, and so does the
    gradient's rounding error in a low precision (float32: about this value x 1e-7 x w / (w - t)):
    cases compared across precisions or devices keep it small."""
    zn = torch.nn.functional.normalize(z.detach().double(), dim=1)
    mn = torch.nn.functional.normalize(memory.detach().double(), dim=1)
    w = torch.softmax(zn @ mn.t() / temperature, dim=1)
    kept = w > t
    return (w * eps / (w - t) ** 2)[kept].max().item() if kept.any() else 0.0


def run_both(fn, z, memory, grad_z_hat, grad_weights):
    """Outputs and input gradients of fn(z, memory) -> (z_hat, weights) for both upstream grads."""
    z_hat, weights = fn(z, memory)
    gz, gm = torch.autograd.grad([z_hat, weights], [z, memory], [grad_z_hat, grad_weights])
    return z_hat.detach(), weights.detach(), gz, gm


def assert_close(actual, expected, dtype, name):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    if dtype == torch.float64:
        rtol, atol = 1e-9, 1e-11 * max(scale, 1.0)
    else:
        rtol, atol = 2e-4, 2e-5 * max(scale, 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# (B, N, C, shrink_threshold as a multiple of 1/N (0: off), temperature, p)
CASES = [
    (4, 10, 7, 1.0, 1.0, 1),
    (5, 33, 17, 0.0, 1.0, 1),
    (8, 50, 9, 1.0, 0.1, 1),
    (6, 41, 24, 1.5, 0.5, 2),
    (3, 1, 4, 0.5, 1.0, 2),
    (16, 100, 32, 0.9, 2.0, 2),
    (2, 257, 65, 1.0, 0.05, 1),
    (7, 19, 3, 0.0, 0.3, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(case, dtype, seed):
    B, N, C, t_mult, temperature, p = case
    t = t_mult / N
    z, memory, gzh, gw = make_inputs(B, N, C, dtype, seed)
    if t > 0:
        assert shrink_margin(z, memory, t, temperature) > 1e-6 * t, "test data too close to the shrinkage kink"
        assert shrink_conditioning(z, memory, t, temperature) < 0.1, "a kept weight too close to the shrinkage kink"

    got = run_both(lambda a, b: native.memory_address(a, b, t, temperature, p), z, memory, gzh, gw)
    want = run_both(lambda a, b: reference.memory_address(a, b, t, temperature, p), z, memory, gzh, gw)
    for name, a, b in zip(("z_hat", "weights", "grad_z", "grad_memory"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close(a, b, dtype, name)
    if t > 0 and N > 1:
        # The case must exercise the shrinkage: some weights removed, some kept.
        assert 0 < (got[1] == 0).sum().item() < B * N


def test_front_uses_native_and_entropy_loss_gradients():
    assert ops.backend("cpu") == "cpu"
    z, memory, _, _ = make_inputs(12, 60, 16, torch.float64, seed=3)

    def loss(fn):
        z_hat, w = fn(z, memory, 1.0 / 60, 1.0, 1)
        entropy = -(w * torch.log(w + 1e-12)).sum(dim=1).mean()
        return z_hat.pow(2).mean() + 0.1 * entropy

    got = torch.autograd.grad(loss(ops.memory_address), [z, memory])
    want = torch.autograd.grad(loss(reference.memory_address), [z, memory])
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64, "entropy-loss grad")


@pytest.mark.parametrize("t, temperature, p", [(0.0, 1.0, 1), (0.12, 0.5, 1), (0.15, 1.0, 2), (0.0, 0.7, 2)])
def test_gradcheck(t, temperature, p):
    z, memory, _, _ = make_inputs(3, 5, 7, torch.float64, seed=11)
    if t > 0:
        # Finite differences must not cross the shrinkage kink.
        assert shrink_margin(z, memory, t, temperature) > 1e-3
    assert torch.autograd.gradcheck(lambda a, b: native.memory_address(a, b, t, temperature, p), (z, memory), eps=1e-6, atol=1e-7)


def test_opcheck_forward_and_backward():
    z, memory, gzh, gw = make_inputs(3, 5, 7, torch.float64, seed=4)
    forward = torch.ops.defect_fast.memory_address.default
    torch.library.opcheck(forward, (z, memory, 0.15, 0.5, 1, True))
    torch.library.opcheck(forward, (z.detach(), memory.detach(), 0.0, 1.0, 2, False))
    outs = forward(z.detach(), memory.detach(), 0.15, 0.5, 1, True)
    args = (gzh, gw, z.detach(), memory.detach(), outs[1], outs[2], outs[3], outs[4], outs[5], outs[6], outs[7], 0.15, 0.5, 1, [True, True])
    torch.library.opcheck(torch.ops.defect_fast.memory_address_backward.default, args)


def test_non_contiguous_inputs():
    B, N, C = 6, 23, 10
    g = torch.Generator().manual_seed(5)
    z = torch.randn(C, B, generator=g, dtype=torch.float64).t().requires_grad_(True)  # transposed
    memory = torch.randn(2 * N, C, generator=g, dtype=torch.float64)[::2].requires_grad_(True)  # strided rows
    gzh = torch.randn(C, B, generator=g, dtype=torch.float64).t()
    gw = torch.randn(B, 2 * N, generator=g, dtype=torch.float64)[:, ::2]
    assert not (z.is_contiguous() or memory.is_contiguous() or gzh.is_contiguous() or gw.is_contiguous())
    got = run_both(lambda a, b: native.memory_address(a, b, 1.0 / N, 0.5, 2), z, memory, gzh, gw)
    want = run_both(lambda a, b: reference.memory_address(a, b, 1.0 / N, 0.5, 2), z, memory, gzh, gw)
    for name, a, b in zip(("z_hat", "weights", "grad_z", "grad_memory"), got, want):
        assert_close(a, b, torch.float64, name)


def test_empty_batch_and_empty_memory():
    z, memory, _, _ = make_inputs(0, 9, 5, torch.float32, seed=0)
    z_hat, w = native.memory_address(z, memory, 0.1, 1.0, 1)
    assert z_hat.shape == (0, 5) and w.shape == (0, 9)
    (z_hat.sum() + w.sum()).backward()
    assert z.grad.shape == (0, 5) and memory.grad.shape == (9, 5)
    assert torch.count_nonzero(memory.grad) == 0

    z, memory, _, _ = make_inputs(4, 0, 5, torch.float32, seed=0)
    z_hat, w = native.memory_address(z, memory, 0.1, 1.0, 1)
    assert w.shape == (4, 0)
    torch.testing.assert_close(z_hat, torch.zeros(4, 5))


def test_everything_shrunk():
    # t above every weight: the read-out is 0; p=1 gradients match the reference (all 0); for
    # p=2 the reference's are NaN (sqrt'(0)) while the kernel gives the clamped limit, 0.
    z, memory, gzh, gw = make_inputs(3, 6, 5, torch.float64, seed=2)
    got = run_both(lambda a, b: native.memory_address(a, b, 0.99, 1.0, 1), z, memory, gzh, gw)
    want = run_both(lambda a, b: reference.memory_address(a, b, 0.99, 1.0, 1), z, memory, gzh, gw)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64, "all shrunk")
    assert torch.count_nonzero(got[0]) == 0
    got2 = run_both(lambda a, b: native.memory_address(a, b, 0.99, 1.0, 2), z, memory, gzh, gw)
    assert all(torch.isfinite(x).all() for x in got2) and torch.count_nonzero(got2[2]) == 0


@pytest.mark.parametrize("where", ["z", "memory"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_input_gives_nan_rows_as_the_reference_does(where, bad):
    """With shrinkage, a NaN weight failed the kernel's d > 0 test and became a zero weight: a
    zero read-out and weights of finite sum, hiding a diverged code from the loss's finite check."""
    z, memory, _gzh, _gw = make_inputs(3, 10, 8, torch.float32, seed=4)
    z, memory = z.detach().clone(), memory.detach().clone()
    (z if where == "z" else memory)[1, 0] = bad
    for t in (0.0, 0.1):
        got, want = ops.memory_address(z, memory, t), reference.memory_address(z, memory, t)
        for a, b in zip(got, want):
            assert torch.equal(a.isnan(), b.isnan()), (where, bad, t)
        assert got[0].isnan().any() and got[1].isnan().any()


def test_only_z_requires_grad_and_no_grad_mode():
    z, memory, gzh, gw = make_inputs(5, 12, 6, torch.float64, seed=6)
    memory = memory.detach()
    z_hat, w = native.memory_address(z, memory, 1.0 / 12, 1.0, 1)
    (gz,) = torch.autograd.grad([z_hat, w], [z], [gzh, gw])
    zr, wr = reference.memory_address(z, memory, 1.0 / 12, 1.0, 1)
    (gz_ref,) = torch.autograd.grad([zr, wr], [z], [gzh, gw])
    assert_close(gz, gz_ref, torch.float64, "grad_z")
    with torch.no_grad():
        z_hat2, w2 = native.memory_address(z, memory, 1.0 / 12, 1.0, 1)
    assert not z_hat2.requires_grad
    torch.testing.assert_close(z_hat2, z_hat.detach(), rtol=0, atol=0)
    torch.testing.assert_close(w2, w.detach(), rtol=0, atol=0)


def test_only_the_memory_requires_grad():
    """A frozen encoder (z without gradient) still trains the memory: the forward keeps what the
    backward needs when the memory alone asks for a gradient."""
    z, memory, gzh, gw = make_inputs(5, 12, 6, torch.float64, seed=7)
    z = z.detach()
    z_hat, w = native.memory_address(z, memory, 1.0 / 12, 1.0, 1)
    (gm,) = torch.autograd.grad([z_hat, w], [memory], [gzh, gw])
    zr, wr = reference.memory_address(z, memory, 1.0 / 12, 1.0, 1)
    (gm_ref,) = torch.autograd.grad([zr, wr], [memory], [gzh, gw])
    assert gm_ref.abs().max() > 0
    assert_close(gm, gm_ref, torch.float64, "grad_memory")


def test_backward_without_saved_softmax_raises():
    z, memory, gzh, gw = make_inputs(2, 4, 3, torch.float64, seed=0, requires_grad=False)
    outs = torch.ops.defect_fast.memory_address.default(z, memory, 0.0, 1.0, 1, False)
    assert outs[2].numel() == 0
    with pytest.raises(RuntimeError, match="need_backward"):
        torch.ops.defect_fast.memory_address_backward.default(gzh, gw, z, memory, outs[1], outs[2], outs[3], outs[4], outs[5], outs[6], outs[7], 0.0, 1.0, 1, [True, True])


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(4), torch.randn(3, 4), 0.1, 1.0, 1), ValueError, r"expected z \[B,C\]"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 5), 0.1, 1.0, 1), ValueError, r"expected z \[B,C\]"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), 0.1, 1.0, 3), ValueError, "p must be 1 or 2"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), 0.1, 0.0, 1), ValueError, "temperature must be finite and > 0"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), 0.1, float("inf"), 1), ValueError, "temperature must be finite"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), -0.1, 1.0, 1), ValueError, "shrink_threshold must be finite and >= 0"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), float("inf"), 1.0, 1), ValueError, "shrink_threshold must be finite"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4).double(), 0.1, 1.0, 1), TypeError, "same dtype"),
        (lambda: (torch.ones(2, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), 0.1, 1.0, 1), TypeError, "floating point"),
        (lambda: (torch.randn(2, 4).to(torch.float8_e4m3fn), torch.randn(3, 4).to(torch.float8_e4m3fn), 0.1, 1.0, 1),
         TypeError, "CPU kernel supports float32 and float64"),
    ],
)
def test_bad_inputs_raise(make, error, match):
    with pytest.raises(error, match=match):
        native.memory_address(*make())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_computes_in_float32(dtype):
    """As aw_ssim: computed in float32, handed back in the inputs' dtype, gradients too (it was
    refused, where the reference and the other two ops take these dtypes)."""
    z, memory, gzh, gw = make_inputs(5, 30, 16, dtype, seed=9)
    z_hat, w = ops.memory_address(z, memory, 0.0)
    assert z_hat.dtype == w.dtype == dtype
    gz, gm = torch.autograd.grad([z_hat, w], [z, memory], [gzh, gw])
    assert gz.dtype == gm.dtype == dtype
    z64, m64 = (t.detach().double().requires_grad_(True) for t in (z, memory))
    want = reference.memory_address(z64, m64, 0.0)
    want_grads = torch.autograd.grad(want, [z64, m64], [gzh.double(), gw.double()])
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for a, b in zip((z_hat, w, gz, gm), (*want, *want_grads)):
        torch.testing.assert_close(a.double(), b.detach(), rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


def test_op_checks_its_arguments():
    with pytest.raises(RuntimeError, match="p must be 1 or 2"):
        torch.ops.defect_fast.memory_address.default(torch.randn(2, 4), torch.randn(3, 4), 0.1, 1.0, 3, False)
    with pytest.raises(RuntimeError, match="same C"):
        torch.ops.defect_fast.memory_address.default(torch.randn(2, 4), torch.randn(3, 5), 0.1, 1.0, 1, False)


def test_torch_compile_fullgraph():
    # aot_eager exercises dynamo, the fake kernels and the autograd registration without
    # spending a C++ compilation on inductor's own kernels.
    z, memory, gzh, gw = make_inputs(4, 9, 6, torch.float32, seed=8)

    def f(a, b):
        z_hat, w = native.memory_address(a, b, 1.0 / 9, 0.5, 1)
        return z_hat * 2, w

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = run_both(compiled, z, memory, gzh, gw)
    want = run_both(lambda a, b: (reference.memory_address(a, b, 1.0 / 9, 0.5, 1)[0] * 2, reference.memory_address(a, b, 1.0 / 9, 0.5, 1)[1]), z, memory, gzh, gw)
    for name, a, b in zip(("z_hat", "weights", "grad_z", "grad_memory"), got, want):
        assert_close(a, b, torch.float32, name)


def test_build_info_and_source_selection(tmp_path):
    info = _native.build_info()
    assert info["torch_version"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert "CPU" in info["ops"]["memory_address"] and "CPU" in info["ops"]["memory_address_backward"]
    assert info["cuda"] == (info["cuda_version"] is not None)
    root = _native.csrc_dir()
    assert info["source_digest"] == _native.sources_digest(root)
    cpu_only = {p.relative_to(root).as_posix() for p in _native.source_files(root, with_cuda=False)}
    with_cuda = {p.relative_to(root).as_posix() for p in _native.source_files(root, with_cuda=True)}
    assert "memory_address/cpu/memory_address_cpu.cpp" in cpu_only and "extension.cpp" in cpu_only
    assert not any("/cuda/" in f or f.endswith(".cu") for f in cpu_only)
    assert {"memory_address/cuda/memory_address_kernel.cu", "memory_address/cuda/memory_address_cuda.cpp"} <= with_cuda - cpu_only
    # The digest follows the contents of sources and headers.
    (tmp_path / "op").mkdir()
    (tmp_path / "op" / "a.h").write_text("int a;")
    before = _native.sources_digest(tmp_path)
    (tmp_path / "op" / "a.h").write_text("int b;")
    assert _native.sources_digest(tmp_path) != before
    assert _native.sanitized_arch_list("8.0; 9.0+PTX") == "8.0_9.0+PTX"


# (33, 2000, 128, 1.0, 1.0, 1) was here: with seed 1 one kept weight lies 1.9e-9 above t, where
# the shrinkage gradient's factor is ~140 and float32 rounding alone moves grad_z by ~2.5e-2
# (the CPU kernel in float32 as much): the test data's fault, not the kernel's (the guard below).
CUDA_CASES = [(6, 41, 24, 1.0, 0.5, 1), (5, 300, 70, 0.0, 1.0, 2), (4, 2000, 128, 1.0, 0.1, 1), (17, 500, 64, 0.0, 0.5, 1)]
CUDA_PARAMS = [(case, dtype, tol) for case in CUDA_CASES for dtype, tol in [(torch.float64, 1e-9), (torch.float32, 1e-4)]] + [
    # NB: half-precision cosines move weights across the shrinkage threshold (a jump of ~t), so
    # the low-precision dtypes are compared without shrinkage.
    (case, dtype, tol)
    for case in CUDA_CASES
    if case[3] == 0
    for dtype, tol in [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)]
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case, dtype, tol", CUDA_PARAMS)
def test_cuda_matches_cpu(case, dtype, tol):
    if not _native.has_cuda():
        pytest.skip(f"the extension has no CUDA kernels: {_native.cuda_reason()}")
    B, N, C, t_mult, temperature, p = case
    t = t_mult / N
    z, memory, gzh, gw = make_inputs(B, N, C, torch.float64, seed=1)
    if t > 0:
        assert shrink_conditioning(z, memory, t, temperature) < 0.1, "a kept weight too close to the shrinkage kink"
    want = run_both(lambda a, b: native.memory_address(a, b, t, temperature, p), z, memory, gzh, gw)
    zc, mc = (x.detach().to("cuda", dtype).requires_grad_(True) for x in (z, memory))
    got = run_both(lambda a, b: native.memory_address(a, b, t, temperature, p), zc, mc, gzh.to("cuda", dtype), gw.to("cuda", dtype))
    for name, a, b in zip(("z_hat", "weights", "grad_z", "grad_memory"), got, want):
        assert a.dtype == dtype and a.device.type == "cuda", name
        err = (a.double().cpu() - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
        assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_empty_and_non_contiguous():
    if not _native.has_cuda():
        pytest.skip(f"the extension has no CUDA kernels: {_native.cuda_reason()}")
    z, memory, _, _ = make_inputs(0, 9, 5, torch.float32, seed=0, device="cuda")
    z_hat, w = native.memory_address(z, memory, 0.1, 1.0, 1)
    assert z_hat.shape == (0, 5) and w.shape == (0, 9)
    g = torch.Generator().manual_seed(5)
    zt = torch.randn(12, 6, generator=g, dtype=torch.float64).t()
    mt = torch.randn(40, 12, generator=g, dtype=torch.float64)[::2]
    want = native.memory_address(zt, mt, 0.05, 0.5, 2)
    got = native.memory_address(zt.cuda(), mt.cuda(), 0.05, 0.5, 2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_saves_normalised_rows_for_backward(dtype):
    """The CUDA forward returns z/|z| and m/|m| when a backward will run; the backward gives the
    same gradients with them as when it recomputes them (empty z_unit, m_unit)."""
    if not _native.has_cuda():
        pytest.skip(f"the extension has no CUDA kernels: {_native.cuda_reason()}")
    z, memory, gzh, gw = make_inputs(9, 33, 20, dtype, seed=8, device="cuda", requires_grad=False)
    forward = torch.ops.defect_fast.memory_address.default
    outs = forward(z, memory, 0.02, 1.0, 1, True)
    assert outs[6].shape == z.shape and outs[7].shape == memory.shape
    torch.testing.assert_close(outs[6].float(), torch.nn.functional.normalize(z.float(), dim=1), rtol=1e-2, atol=1e-2)
    assert forward(z, memory, 0.02, 1.0, 1, False)[6].numel() == 0
    backward = torch.ops.defect_fast.memory_address_backward.default
    saved = backward(gzh, gw, z, memory, *outs[1:8], 0.02, 1.0, 1, [True, True])
    empty = z.new_empty((0,))
    recomputed = backward(gzh, gw, z, memory, *outs[1:6], empty, empty, 0.02, 1.0, 1, [True, True])
    for a, b in zip(saved, recomputed):
        torch.testing.assert_close(a, b)


def test_a_gradient_of_the_gradient_is_refused_not_silently_zero():
    """The backward kernels have no backward: create_graph=True gave a zero z.grad or a cryptic error."""
    z, memory, _gzh, _gw = make_inputs(3, 10, 8, torch.float64, seed=5)
    z_hat, _w = ops.memory_address(z, memory, 0.1)
    with pytest.raises(RuntimeError, match="memory_address: the native op has no double backward"):
        torch.autograd.grad(z_hat.sum(), z, create_graph=True)
    z_hat, _w = ops.memory_address(z, memory, 0.1)  # a plain backward still works
    (g,) = torch.autograd.grad(z_hat.sum(), z)
    assert torch.isfinite(g).all() and not g.requires_grad


@pytest.mark.parametrize("archs,capability,runs", [
    ("8.0;9.0+PTX", (8, 0), True), ("8.0;9.0+PTX", (8, 6), True), ("8.0;9.0+PTX", (8, 9), True),
    ("8.0;9.0+PTX", (9, 0), True), ("8.0;9.0+PTX", (10, 0), True), ("8.0;9.0+PTX", (7, 5), False),
    ("8.0", (9, 0), False), ("8.6", (8, 0), False), ("9.0a", (9, 0), True), ("9.0a", (10, 0), False),
    ("7.5 8.0+PTX", (7, 5), True), ("Ampere", (8, 0), None),
])
def test_which_gpus_a_cuda_build_runs_on(archs, capability, runs):
    """Machine code for x.y runs on x.z, z >= y; PTX for x.y on anything from x.y on."""
    assert _native.arch_runs_on(archs, capability) is runs


def test_a_cuda_build_for_other_gpus_falls_back_to_the_reference(monkeypatch):
    """An ahead-of-time build made where another GPU (or none) was visible has no kernels for this
    GPU: its first launch would fail ("no kernel image is available"). The ops run the reference
    there, said once, and cuda_reason() says why; a GPU the build covers keeps the kernels."""
    import warnings

    from defect_fast import ops

    class Built:
        @staticmethod
        def build_info():
            return {"cuda": True, "cuda_arch_list": "8.0;9.0+PTX"}

    capability = {0: (7, 5), 1: (9, 0)}
    monkeypatch.setattr(_native, "load", lambda: (Built, ""))
    monkeypatch.setattr(_native, "_built_with_cuda", True)
    monkeypatch.setattr(_native, "_runs_on", {})
    monkeypatch.setattr(_native, "_cuda_reason", "")
    monkeypatch.setattr(ops, "_native_module", lambda: Built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capability[i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "a GPU")
    with pytest.warns(RuntimeWarning, match=r"built for 8\.0;9\.0\+PTX, not for cuda:0 .*compute capability 7\.5"):
        assert ops.backend("cuda") == "reference"
    assert "TORCH_CUDA_ARCH_LIST=7.5" in _native.cuda_reason()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert ops.backend("cuda:0") == "reference"
        assert ops.backend("cuda:1") == "cuda"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_more_rows_than_one_grid_dimension_holds(device):
    """70,000 rows of z (inference at stride 8 addresses 207,936): the CUDA row passes loop past
    the 65,535 blocks of one grid dimension, which no other test reaches; forward and backward
    against the float64 reference (no shrinkage: no weight near its kink)."""
    if device == "cuda" and not _native.has_cuda():
        pytest.skip(f"the extension has no CUDA kernels: {_native.cuda_reason()}")
    z, memory, gzh, gw = make_inputs(70_000, 50, 8, torch.float64, seed=9, requires_grad=False)
    want = run_both(lambda a, b: reference.memory_address(a, b, 0.0, 1.0, 1),
                    z.clone().requires_grad_(True), memory.clone().requires_grad_(True), gzh, gw)
    zd, md = (t.to(device, torch.float32).requires_grad_(True) for t in (z, memory))
    got = run_both(lambda a, b: native.memory_address(a, b, 0.0, 1.0, 1), zd, md,
                   gzh.to(device, torch.float32), gw.to(device, torch.float32))
    for name, a, b in zip(("z_hat", "weights", "grad_z", "grad_memory"), got, want):
        assert a.device.type == device, name
        err = (a.double().cpu() - b).abs().max().item() / b.abs().max().item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
