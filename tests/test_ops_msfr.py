"""defect_fast::msfr: native kernels against reference.msfr.

The fused multi-scale feature residual map is compared with the pure-PyTorch reference in float32
and float64 over seeds and shapes (1 to 4 scales and more, odd sizes, upsampling and
downsampling, non-uniform and default weights), against hand-computed maps, and checked with
opcheck, non-contiguous and empty inputs, input errors, the gradient fallback, torch.compile, and
CUDA against CPU where a GPU is visible.
"""
from __future__ import annotations

import math

import pytest
import torch

from defect_fast import ops
from defect_fast.ops import _native, reference

_MODULE, _REASON = _native.load()
pytestmark = pytest.mark.skipif(_MODULE is None, reason=f"native extension unavailable: {_REASON}")
if _MODULE is not None:
    from defect_fast.ops import _msfr as native

    OP = torch.ops.defect_fast.msfr.default


def make_feats(shapes, dtype=torch.float64, seed=0, device="cpu"):
    """feats_x, feats_r: one pair of random [B, C_i, H_i, W_i] tensors per shape."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]
    rs = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]
    return xs, rs


def assert_close(actual, expected, dtype, name=""):
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    if dtype == torch.float64:
        rtol, atol = 1e-12, 1e-13 * scale
    else:
        rtol, atol = 1e-5, 1e-6 * scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# (shapes of the S scales, out_size, weights): odd sizes, up- and downsampling on either axis,
# equal sizes (copy path), 1 to 4 scales, S > 8 (more scales than one CUDA launch takes).
CASES = [
    ([(2, 3, 5, 7)], (13, 11), None),
    ([(2, 3, 5, 7)], (5, 7), [2.0]),
    ([(1, 5, 17, 13)], (5, 4), None),
    ([(2, 3, 5, 7), (2, 4, 9, 3)], (6, 6), [1.0, 3.0]),
    ([(3, 2, 8, 8), (3, 5, 4, 4), (3, 11, 16, 16)], (16, 16), [9.0, 25.0, 49.0]),
    ([(2, 4, 16, 16), (2, 4, 16, 16), (2, 8, 8, 8), (2, 1, 3, 2)], (19, 23), [1.0, 0.0, 2.5, 0.5]),
    ([(1, 2, 1, 1), (1, 6, 2, 9)], (7, 3), None),
    ([(1, 2, 3, 4)] * 9 + [(1, 3, 2, 2)], (5, 6), [float(k + 1) for k in range(10)]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(case, dtype, seed):
    shapes, out_size, weights = CASES[case]
    xs, rs = make_feats(shapes, dtype, seed)
    expected = reference.msfr(xs, rs, out_size, weights)
    got = native.msfr(xs, rs, out_size, weights)
    assert got.shape == (shapes[0][0], 1, *out_size) and got.dtype == dtype
    assert_close(got, expected, dtype, f"case {case}")
    raw = OP(xs, rs, list(out_size), weights or [1.0] * len(shapes))
    torch.testing.assert_close(raw, got, rtol=0, atol=0)


def test_cma_ae_sizes():
    """The CMA-AE encoder's scales 1-3 of 64 x 64 patches with receptive-field-area weights."""
    shapes = [(4, 32, 32, 32), (4, 32, 32, 32), (4, 64, 16, 16)]
    weights = reference.receptive_field_areas([(3, 2), (3, 1), (3, 2)])
    xs, rs = make_feats(shapes, torch.float32, seed=3)
    assert_close(native.msfr(xs, rs, (64, 64), weights), reference.msfr(xs, rs, (64, 64), weights), torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_both_cpu_schedules(threads):
    """B = 3: one parallel region over whole items at 1 thread (B >= 2 x threads), two phases over
    units and rows at 2 threads; both against the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for case in (0, 4, 5):
            shapes, out_size, weights = CASES[case]
            shapes = [(3, *s[1:]) for s in shapes]
            xs, rs = make_feats(shapes, torch.float32, seed=11)
            assert_close(native.msfr(xs, rs, out_size, weights), reference.msfr(xs, rs, out_size, weights), torch.float32, f"case {case}")
    finally:
        torch.set_num_threads(before)


def test_constant_residual_per_scale():
    """x_i = c_i, r_i = 0 everywhere: every scale's map is c_i^2, the output sum w_i c_i^2 / sum w_i."""
    shapes = [(2, 3, 4, 5), (2, 2, 7, 3), (2, 5, 16, 16)]
    consts, weights = [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]
    xs = [torch.full(s, c, dtype=torch.float64) for s, c in zip(shapes, consts)]
    rs = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    got = native.msfr(xs, rs, (9, 10), weights)
    assert torch.allclose(got, torch.full((2, 1, 9, 10), (1 + 8 + 27) / 6.0, dtype=torch.float64), rtol=0, atol=1e-12)
    # weights=None: the plain mean (1 + 4 + 9) / 3
    got = native.msfr(xs, rs, (9, 10))
    assert torch.allclose(got, torch.full((2, 1, 9, 10), 14.0 / 3.0, dtype=torch.float64), rtol=0, atol=1e-12)


def test_channel_mean_hand_computed():
    """Two channels with differences 1 and 3: the map is (1 + 9) / 2 = 5 at every pixel."""
    x = torch.stack([torch.full((2, 2), 1.5), torch.full((2, 2), -2.0)])[None]  # [1, 2, 2, 2]
    r = torch.stack([torch.full((2, 2), 0.5), torch.full((2, 2), 1.0)])[None]
    got = native.msfr([x], [r], (3, 3))
    torch.testing.assert_close(got, torch.full((1, 1, 3, 3), 5.0), rtol=0, atol=1e-6)


def test_bilinear_hand_computed():
    """1-D maps through the align_corners=False taps, edge clamping included.

    Upsampling [0, 4] (width 2) to width 4: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25
    (right tap clamped to the last pixel) -> [0, 1, 3, 4]. Downsampling [0, 1, 2, 3] to width 2:
    sources 0.5 and 2.5 -> [0.5, 2.5]. The residual is x^2 (C = 1, r = 0), so x = sqrt(map).
    """
    up = torch.tensor([0.0, 4.0], dtype=torch.float64).sqrt().view(1, 1, 1, 2)
    got = native.msfr([up], [torch.zeros_like(up)], (1, 4))
    torch.testing.assert_close(got.flatten(), torch.tensor([0.0, 1.0, 3.0, 4.0], dtype=torch.float64), rtol=0, atol=1e-12)
    down = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64).sqrt().view(1, 1, 4, 1)
    got = native.msfr([down], [torch.zeros_like(down)], (2, 1))
    torch.testing.assert_close(got.flatten(), torch.tensor([0.5, 2.5], dtype=torch.float64), rtol=0, atol=1e-12)


def test_zero_weight_scale_is_ignored():
    xs, rs = make_feats([(2, 3, 5, 5), (2, 3, 4, 4)], torch.float64, seed=4)
    only_first = native.msfr(xs[:1], rs[:1], (8, 8))
    both = native.msfr(xs, rs, (8, 8), [3.0, 0.0])
    assert_close(both, only_first, torch.float64)
    rs[1] = rs[1] + 100.0  # would dominate if it leaked in
    assert_close(native.msfr(xs, rs, (8, 8), [3.0, 0.0]), only_first, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous(dtype):
    shapes = [(3, 4, 6, 5), (3, 2, 3, 9)]
    xs, rs = make_feats(shapes, dtype, seed=5)
    expected = reference.msfr(xs, rs, (7, 8), [1.0, 2.0])
    # channels_last, a transposed-and-back view, and a strided slice of a larger tensor
    nx = [xs[0].to(memory_format=torch.channels_last), xs[1].transpose(2, 3).contiguous().transpose(2, 3)]
    big = torch.zeros(3, 4, 12, 10, dtype=dtype)
    big[:, :, ::2, ::2] = rs[0]
    nr = [big[:, :, ::2, ::2], rs[1].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)]
    assert not any(t.is_contiguous() for t in nx + nr)
    assert_close(native.msfr(nx, nr, (7, 8), [1.0, 2.0]), expected, dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_features_read_in_place(dtype, threads):
    """Both tensors of a scale channels-last (what a channels-last model gives): the kernel reads
    them as NHWC; C below, at and above the 8 partial sums, mixed with an NCHW scale."""
    shapes = [(3, 3, 6, 5), (3, 8, 4, 4), (3, 19, 9, 7), (3, 32, 5, 5)]
    xs, rs = make_feats(shapes, dtype, seed=7)
    expected = reference.msfr(xs, rs, (11, 9), [1.0, 2.0, 3.0, 4.0])
    cl = [True, True, True, False]
    nx = [x.to(memory_format=torch.channels_last) if c else x for x, c in zip(xs, cl)]
    nr = [r.to(memory_format=torch.channels_last) if c else r for r, c in zip(rs, cl)]
    assert not nx[2].is_contiguous() and nx[2].is_contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_close(native.msfr(nx, nr, (11, 9), [1.0, 2.0, 3.0, 4.0]), expected, dtype)
    finally:
        torch.set_num_threads(before)


def test_empty_batch():
    xs, rs = make_feats([(0, 3, 5, 5), (0, 2, 4, 4)], torch.float32)
    got = native.msfr(xs, rs, (6, 7))
    assert got.shape == (0, 1, 6, 7) and got.dtype == torch.float32
    assert OP(xs, rs, [6, 7], [1.0, 1.0]).shape == (0, 1, 6, 7)


def test_opcheck():
    xs, rs = make_feats([(2, 3, 5, 7), (2, 4, 3, 3)], torch.float64)
    torch.library.opcheck(OP, (xs, rs, [6, 9], [1.0, 2.0]), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda xs, rs: ([], [], (4, 4), None), "non-zero number of scales"),
        (lambda xs, rs: (xs, rs[:1], (4, 4), None), "same non-zero number"),
        (lambda xs, rs: (xs, rs, (4, 4), [1.0]), "1 weights for 2 scales"),
        (lambda xs, rs: (xs, rs, (4, 4), [1.0, -1.0]), "non-negative"),
        (lambda xs, rs: (xs, rs, (4, 4), [0.0, 0.0]), "not all zero"),
        (lambda xs, rs: (xs, rs, (4, 4), [1.0, math.nan]), "finite"),
        (lambda xs, rs: (xs, [rs[0], rs[1][:, :1]], (4, 4), None), "shapes differ"),
        (lambda xs, rs: (xs, rs, (4, 0), None), "out_size"),
        (lambda xs, rs: (xs, rs, (4, 4, 4), None), "out_size"),
        (lambda xs, rs: (xs, rs, (7.9, 4), None), "out_size"),  # was cut to 7
        (lambda xs, rs: ([xs[0][0]], [rs[0][0]], (4, 4), None), r"\[B, C, H, W\]"),
        # the reference broadcast these into a map of batch 2, or made one of NaN (a mean over no channel)
        (lambda xs, rs: ([xs[0], xs[1][:1]], [rs[0], rs[1][:1]], (4, 4), None), "scale 1 has batch 1 but scale 0 has 2"),
        (lambda xs, rs: ([xs[0], xs[1][:, :0]], [rs[0], rs[1][:, :0]], (4, 4), None), "needs C, H, W >= 1"),
    ],
)
def test_bad_inputs_front(make, match):
    """Refused alike by the native front, the reference and the public op when a gradient is asked
    for (the reference computes it: it checked only the number of scales and each pair's shapes)."""
    xs, rs = make_feats([(2, 3, 5, 5), (2, 2, 4, 4)], torch.float32)
    with pytest.raises(ValueError, match=match):
        native.msfr(*make(xs, rs))
    with pytest.raises(ValueError, match=match):
        reference.msfr(*make(xs, rs))
    with pytest.raises(ValueError, match=match):
        ops.msfr(*make([x.requires_grad_() for x in xs], rs))


@pytest.mark.parametrize(
    "make, match",
    [
        # no tensors at all: the dispatcher itself refuses (it cannot pick a device)
        (lambda xs, rs: ([], [], [4, 4], []), "no tensor arguments|at least one scale"),
        (lambda xs, rs: (xs, rs[:1], [4, 4], [1.0, 1.0]), "feats_r has 1"),
        (lambda xs, rs: (xs, rs, [4, 4], [1.0]), "1 weights for 2 scales"),
        (lambda xs, rs: (xs, rs, [4, 4], [1.0, -1.0]), "non-negative"),
        (lambda xs, rs: (xs, rs, [4, 4], [0.0, 0.0]), "not all zero"),
        (lambda xs, rs: (xs, [rs[0], rs[1][:, :1]], [4, 4], [1.0, 1.0]), "shapes differ"),
        (lambda xs, rs: (xs, rs, [4, 0], [1.0, 1.0]), "out_size"),
        (lambda xs, rs: (xs, rs, [4], [1.0, 1.0]), "out_size"),
        (lambda xs, rs: ([xs[0][0]], [rs[0][0]], [4, 4], [1.0]), r"\[B, C, H, W\]"),
        (lambda xs, rs: ([xs[0], xs[1][:1]], [rs[0], rs[1][:1]], [4, 4], [1.0, 1.0]), "batch"),
        (lambda xs, rs: ([xs[0], xs[1].double()], [rs[0], rs[1].double()], [4, 4], [1.0, 1.0]), "one dtype"),
        (lambda xs, rs: ([xs[0].half()], [rs[0].half()], [4, 4], [1.0]), "float32 or float64"),
    ],
)
def test_bad_inputs_op(make, match):
    xs, rs = make_feats([(2, 3, 5, 5), (2, 2, 4, 4)], torch.float32)
    with pytest.raises(RuntimeError, match=match):
        OP(*make(xs, rs))


def test_gradient_falls_back_to_reference():
    """With grad enabled and features requiring grad, the front is the differentiable reference."""
    xs, rs = make_feats([(2, 3, 5, 7), (2, 2, 3, 3)], torch.float64)
    xs = [x.requires_grad_(True) for x in xs]
    out = native.msfr(xs, rs, (6, 6), [1.0, 2.0])
    grads = torch.autograd.grad(out.sum(), xs)
    ref_grads = torch.autograd.grad(reference.msfr(xs, rs, (6, 6), [1.0, 2.0]).sum(), xs)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, torch.float64)
    # the raw op refuses to differentiate instead of returning wrong gradients
    raw = OP(xs, rs, [6, 6], [1.0, 2.0])
    with pytest.raises(RuntimeError, match="inference only"):
        raw.sum().backward()
    with torch.no_grad():
        assert_close(native.msfr(xs, rs, (6, 6), [1.0, 2.0]), out.detach(), torch.float64)


def test_front_uses_native_under_no_grad(monkeypatch):
    """defect_fast.ops.msfr under no_grad runs the kernel, not the reference."""
    xs, rs = make_feats([(2, 3, 5, 7), (2, 2, 3, 3)], torch.float32)
    expected = reference.msfr(xs, rs, (6, 6), [1.0, 2.0])

    def refuse(*args, **kwargs):
        raise AssertionError("reference.msfr called on the native path")

    if ops.backend("cpu") != "cpu":
        pytest.skip(f"front backend is {ops.backend('cpu')}")
    monkeypatch.setattr(reference, "msfr", refuse)
    with torch.no_grad():
        got = ops.msfr(xs, rs, (6, 6), [1.0, 2.0])
    assert_close(got, expected, torch.float32)


def test_cpu_half_goes_to_reference():
    xs, rs = make_feats([(2, 3, 5, 7)], torch.float16)
    torch.testing.assert_close(native.msfr(xs, rs, (6, 6)), reference.msfr(xs, rs, (6, 6)), rtol=0, atol=0)


def test_torch_compile_fullgraph():
    xs, rs = make_feats([(2, 3, 5, 7), (2, 4, 3, 3)], torch.float32)

    def f(xs, rs):
        return native.msfr(xs, rs, (6, 9), [1.0, 2.0]) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(xs, rs)
    assert_close(got, 2.0 * reference.msfr(xs, rs, (6, 9), [1.0, 2.0]), torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_matches_cpu(case, dtype):
    if not _native.has_cuda():
        pytest.skip(f"the extension has no CUDA kernels: {_native.cuda_reason()}")
    shapes, out_size, weights = CASES[case]
    xs, rs = make_feats(shapes, torch.float64, seed=7)
    # the CPU result on the dtype-rounded inputs, in float64
    expected = native.msfr([x.to(dtype).double() for x in xs], [r.to(dtype).double() for r in rs], out_size, weights)
    got = native.msfr([x.to("cuda", dtype) for x in xs], [r.to("cuda", dtype) for r in rs], out_size, weights)
    assert got.device.type == "cuda" and got.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.cpu().double(), expected, rtol=tol, atol=tol * max(expected.abs().max().item(), 1.0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_non_contiguous_empty_and_opcheck():
    if not _native.has_cuda():
        pytest.skip(f"the extension has no CUDA kernels: {_native.cuda_reason()}")
    xs, rs = make_feats([(3, 4, 6, 5), (3, 2, 3, 9)], torch.float32, device="cuda")
    expected = reference.msfr(xs, rs, (7, 8), [1.0, 2.0])
    nx = [x.to(memory_format=torch.channels_last) for x in xs]
    assert_close(native.msfr(nx, rs, (7, 8), [1.0, 2.0]), expected, torch.float32)
    empty = [torch.zeros(0, 2, 3, 3, device="cuda")]
    assert native.msfr(empty, empty, (4, 4)).shape == (0, 1, 4, 4)
    torch.library.opcheck(OP, (xs, rs, [7, 8], [1.0, 2.0]), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", [0, 3, 4, 5])
def test_float_variant_reads_reduced_precision_features_in_place(case, channels_last, dtype):
    """msfr_float on bf16/fp16 features equals msfr on their float32 copies bit for bit (each value
    widens exactly; same arithmetic), and returns float32."""
    shapes, out_size, weights = CASES[case]
    xs, rs = make_feats(shapes, dtype, seed=case)
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
        rs = [r.contiguous(memory_format=torch.channels_last) for r in rs]
    got = native.msfr_float(xs, rs, out_size, weights)
    want = native.msfr([x.float() for x in xs], [r.float() for r in rs], out_size, weights)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_float_variant_under_autocast_and_its_limits():
    """ops.msfr under CPU autocast takes the copy-free path for bf16 features (same map as the
    upcast); mixed dtypes, float32 and grad-requiring features are not its business (None)."""
    xs, rs = make_feats([(3, 8, 9, 7), (3, 4, 5, 5)], torch.bfloat16, seed=3)
    want = native.msfr([x.float() for x in xs], [r.float() for r in rs], (12, 10), [1.0, 2.0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.msfr(xs, rs, (12, 10), [1.0, 2.0])
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert native.msfr_float(xs, [rs[0].float(), rs[1]], (12, 10)) is None
    assert native.msfr_float([x.float() for x in xs], [r.float() for r in rs], (12, 10)) is None
    assert native.msfr_float([xs[0].requires_grad_(), xs[1]], rs, (12, 10)) is None
    torch.library.opcheck(torch.ops.defect_fast.msfr_float.default, ([x.detach() for x in xs], rs, [12, 10], [1.0, 2.0]),
                          test_utils=("test_schema", "test_faketensor"))


def test_reference_only_holds_in_its_own_thread_and_nests():
    """The export's switch to the reference ops: the calling thread only (an inspection thread
    running beside an export keeps the kernels), restored after nested and overlapping blocks."""
    import threading

    from defect_fast import ops

    before = ops.backend("cpu")
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def exporting():
        with ops.reference_only():
            seen["exporting"] = ops.backend("cpu")
            inside.set()
            release.wait(10)
            with ops.reference_only():
                pass
            seen["after nested"] = ops.backend("cpu")

    t = threading.Thread(target=exporting)
    t.start()
    assert inside.wait(10)
    seen["other thread"] = ops.backend("cpu")
    release.set()
    t.join(10)
    assert seen == {"exporting": "reference", "other thread": before, "after nested": "reference"}
    assert ops.backend("cpu") == before


def test_no_scales_is_the_reference_s_error():
    """ops.msfr([], [], ...) indexed the first scale before any check (IndexError)."""
    with pytest.raises(ValueError, match="same non-zero number of scales"):
        ops.msfr([], [], (8, 8))


def test_no_grad_runs_the_kernel_even_for_features_that_require_grad(monkeypatch):
    """Under no_grad nothing will be differentiated: the kernel runs, not the slower reference."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 5, 7, generator=g).requires_grad_(True)]
    rs = [torch.randn(2, 3, 5, 7, generator=g)]

    def boom(*a, **k):
        raise AssertionError("reference.msfr called under no_grad")

    monkeypatch.setattr(reference, "msfr", boom)
    with torch.no_grad():
        assert ops.msfr(xs, rs, (6, 6)).shape == (2, 1, 6, 6)
