"""LPIPS v0.1 with an AlexNet trunk, without torchvision.

Learned Perceptual Image Patch Similarity (Zhang et al., 2018), the perceptual half of the
stage-two loss of the AW-SSIM two-stage autoencoder (Eq. 10):

    d(x, y) = sum_l mean_{h,w} < w_l, (n(f_l(x)) - n(f_l(y)))^2 >

``f_l`` are the five ReLU outputs of AlexNet's convolutional trunk applied to the inputs after
the LPIPS scaling layer, ``n`` unit-normalises each feature vector along the channels and ``w_l``
are the calibrated linear heads (1x1 convolutions without bias) of the ``lpips`` package.

Weights come from local files only (see :class:`LPIPS`); nothing here imports torchvision or
``lpips`` (whose import pulls in torchvision).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..safety import UserError

__all__ = ["LPIPS", "ALEXNET_WEIGHTS_ENV", "LPIPS_HEADS_ENV", "TORCHVISION_ALEXNET_FILE"]


class WeightsNotFound(UserError, FileNotFoundError):
    """Pretrained weights (the AlexNet trunk, the LPIPS heads) that are needed and not found: one
    line at the command line saying where they were looked for, a FileNotFoundError for callers."""


#: How :class:`WeightsNotFound` begins (a caller that says what needs the weights leaves it out).
WEIGHTS_NEEDED = "ImageNet AlexNet trunk weights are needed (LPIPS, the perceptual map, the image context)"


#: Environment variable naming a local AlexNet trunk file (``features.*`` state dict).
ALEXNET_WEIGHTS_ENV = "DEFECT_FAST_ALEXNET_WEIGHTS"
#: Environment variable naming a local LPIPS linear-head file (the ``lpips`` wheel's ``alex.pth``).
LPIPS_HEADS_ENV = "DEFECT_FAST_LPIPS_WEIGHTS"
#: File name of torchvision's ImageNet AlexNet in the torch hub cache.
TORCHVISION_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
_TORCHVISION_ALEXNET_URL = "https://download.pytorch.org/models/" + TORCHVISION_ALEXNET_FILE

# ScalingLayer constants of lpips v0.1: (x - shift) / scale maps [-1, 1] inputs to roughly
# ImageNet-normalised values.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# (index in torchvision's alexnet.features, in channels, out channels, kernel, stride, padding)
_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1),
          (8, 384, 256, 3, 1, 1), (10, 256, 256, 3, 1, 1))
_CHANNELS = tuple(c[2] for c in _CONVS)


def _lpips_package_dir() -> Path | None:
    """Directory of the installed ``lpips`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_heads_path(version: str = "0.1") -> Path | None:
    """``lpips/weights/v<version>/alex.pth`` of the installed ``lpips`` wheel, or None."""
    pkg = _lpips_package_dir()
    if pkg is None:
        return None
    path = pkg / "weights" / f"v{version}" / "alex.pth"
    return path if path.is_file() else None


def _load_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"{path}: cannot be read as a PyTorch weights file ({exc})") from exc
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _trunk_from_state(state: dict, origin: str) -> dict[str, torch.Tensor]:
    """Pick ``features.{i}.{weight,bias}`` out of a state dict, checking shapes."""
    out = {}
    for idx, cin, cout, k, _, _ in _CONVS:
        for name, shape in (("weight", (cout, cin, k, k)), ("bias", (cout,))):
            key = f"features.{idx}.{name}"
            tensor = state.get(key)
            if tensor is None:
                raise RuntimeError(f"{origin}: missing key {key!r} (expected torchvision AlexNet 'features.*' keys)")
            if tuple(tensor.shape) != shape:
                raise RuntimeError(f"{origin}: {key} has shape {tuple(tensor.shape)}, expected {shape}")
            out[key] = tensor.float()
    return out


def _heads_from_state(state: dict, origin: str) -> list[torch.Tensor]:
    """The five ``[1, C, 1, 1]`` head weights; accepts lpips' ``lin{k}.model.{0,1}.weight`` or ``lin{k}.weight``."""
    heads = []
    for k, c in enumerate(_CHANNELS):
        for key in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight", f"lin{k}.weight"):
            if key in state:
                break
        else:
            raise RuntimeError(f"{origin}: missing the weight of linear head lin{k}")
        w = state[key]
        if tuple(w.shape) != (1, c, 1, 1):
            raise RuntimeError(f"{origin}: {key} has shape {tuple(w.shape)}, expected (1, {c}, 1, 1)")
        heads.append(w.float())
    return heads


def _missing(p: Path) -> str:
    """Why a weights path that is not a file cannot be read, in a few words."""
    return "is a folder, not a weights file" if p.is_dir() else "no such file"


def load_alexnet_trunk(path: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """AlexNet trunk weights (``features.{0,3,6,8,10}.{weight,bias}``) and where they came from.

    Tried in order: ``path``; the file named by ``$DEFECT_FAST_ALEXNET_WEIGHTS``; torchvision's
    ``alexnet-owt-7be5be79.pth`` in the torch hub cache; torchvision's download (only when
    torchvision imports). Raises FileNotFoundError listing every place tried.
    """
    tried = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise WeightsNotFound(f"AlexNet trunk weights {p}: {_missing(p)}")
        return _trunk_from_state(_load_file(p), str(p)), str(p)
    env = os.environ.get(ALEXNET_WEIGHTS_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise WeightsNotFound(f"${ALEXNET_WEIGHTS_ENV}={env}: {_missing(p)}")
        return _trunk_from_state(_load_file(p), str(p)), str(p)
    tried.append(f"${ALEXNET_WEIGHTS_ENV} (unset)")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_ALEXNET_FILE
    if cached.is_file():
        return _trunk_from_state(_load_file(cached), str(cached)), str(cached)
    tried.append(f"{cached} (absent)")
    try:
        import torchvision  # noqa: F401  - only to learn whether its download path is usable
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        tried.append(f"torchvision download (torchvision does not import: {type(exc).__name__})")
    else:
        try:
            state = torch.hub.load_state_dict_from_url(_TORCHVISION_ALEXNET_URL, map_location="cpu",
                                                       check_hash=True, weights_only=True)
            return _trunk_from_state(state, _TORCHVISION_ALEXNET_URL), _TORCHVISION_ALEXNET_URL
        except Exception as exc:  # noqa: BLE001 - reported below
            tried.append(f"{_TORCHVISION_ALEXNET_URL} ({type(exc).__name__}: {exc})")
    raise WeightsNotFound(f"{WEIGHTS_NEEDED}; set ${ALEXNET_WEIGHTS_ENV}=PATH (or pass alexnet_weights=PATH from "
                          "Python). Tried: " + "; ".join(tried))


def load_lpips_heads(path: str | os.PathLike | None = None, version: str = "0.1") -> tuple[list[torch.Tensor], str]:
    """The five LPIPS linear-head weights ``[1, C_l, 1, 1]`` and where they came from.

    Tried in order: ``path``; ``$DEFECT_FAST_LPIPS_WEIGHTS``; the installed ``lpips`` wheel's
    ``weights/v<version>/alex.pth`` (located without importing ``lpips``).
    """
    for candidate, label in ((path, "heads path"), (os.environ.get(LPIPS_HEADS_ENV) or None, f"${LPIPS_HEADS_ENV}")):
        if candidate is not None:
            p = Path(candidate)
            if not p.is_file():
                raise WeightsNotFound(f"LPIPS linear heads {p} ({label}): {_missing(p)}")
            return _heads_from_state(_load_file(p), str(p)), str(p)
    p = default_heads_path(version)
    if p is None:
        pkg = _lpips_package_dir()
        where = "lpips package not installed" if pkg is None else f"{pkg}/weights/v{version}/alex.pth absent"
        raise WeightsNotFound(
            f"LPIPS linear heads not found: pass heads_weights=PATH, set ${LPIPS_HEADS_ENV}, or install "
            f"lpips==0.1.4 with `pip install --no-deps lpips` (tried: ${LPIPS_HEADS_ENV} unset; {where})")
    return _heads_from_state(_load_file(p), str(p)), str(p)


def unit_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(sum_c x^2 + eps^2)`` along dim 1.

    NB: lpips computes ``x / (||x|| + eps)``, whose gradient is NaN where a feature vector is all
    zero (d sqrt(s)/ds at s = 0). This form is smooth everywhere; its gradient is bounded by 1/eps.
    """
    return x * torch.rsqrt(x.pow(2).sum(dim=1, keepdim=True) + eps * eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with an AlexNet trunk; frozen, always in eval mode.

    Args:
        alexnet_weights: file with torchvision-layout AlexNet ``features.*`` weights; default:
            ``$DEFECT_FAST_ALEXNET_WEIGHTS``, then torchvision's cached ``alexnet-owt-7be5be79.pth``
            (see :func:`load_alexnet_trunk`).
        heads_weights: file with the linear heads; default: ``$DEFECT_FAST_LPIPS_WEIGHTS``, then the
            ``lpips`` wheel's ``weights/v0.1/alex.pth``.
        eps: smoothing of the channel normalisation (see :func:`unit_normalize`). AlexNet feature
            vectors have norms >= ~0.8 on natural, industrial and constant images alike (the conv
            biases keep them off zero), four orders above the default, so distances agree with the
            ``lpips`` package (eps 1e-10) to float precision; where a feature vector is exactly zero
            the gradient stays finite (bounded by ~1/eps) instead of NaN.

    ``forward(x, y)``: ``x``, ``y`` float ``[B, 3, H, W]`` in [-1, 1] (H, W >= 32 or so, AlexNet's
    stride); returns ``[B]`` distances (0 for identical inputs). Gradients flow to the inputs.
    """

    def __init__(self, alexnet_weights: str | os.PathLike | None = None,
                 heads_weights: str | os.PathLike | None = None, *, eps: float = 1e-4) -> None:
        super().__init__()
        trunk, self.trunk_source = load_alexnet_trunk(alexnet_weights)
        heads, self.heads_source = load_lpips_heads(heads_weights)
        self.eps = float(eps)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.convs = nn.ModuleList()
        for idx, cin, cout, k, stride, pad in _CONVS:
            conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
            with torch.no_grad():
                conv.weight.copy_(trunk[f"features.{idx}.weight"])
                conv.bias.copy_(trunk[f"features.{idx}.bias"])
            self.convs.append(conv)
        self.heads = nn.ModuleList()
        for w in heads:
            head = nn.Conv2d(w.shape[1], 1, 1, bias=False)
            with torch.no_grad():
                head.weight.copy_(w)
            self.heads.append(head)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """Stays in eval mode whatever ``mode`` is (the network is a fixed metric)."""
        return super().train(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs (relu1..relu5) for scaled inputs ``x`` ``[B, 3, H, W]``."""
        out = []
        h = x
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # max-pools after relu1 and relu2 (features.2, features.5)
                h = F.max_pool2d(h, kernel_size=3, stride=2)
            h = F.relu(conv(h))
            out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise ValueError(f"LPIPS expects two [B, 3, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        n = x.shape[0]
        both = torch.cat([x, y], dim=0)
        feats = self.features((both - self.shift) / self.scale)
        # the distance in float32, autocast or not: the feature difference of a close reconstruction
        # (what stage two is about) is lost in bfloat16 (57 % off at LPIPS 4e-5, in autocast)
        dtype = torch.promote_types(feats[0].dtype, torch.float32)  # float64 stays float64
        with torch.autocast(x.device.type, enabled=False):
            dist = torch.zeros(n, device=x.device, dtype=dtype)
            for f, head in zip(feats, self.heads):
                f = unit_normalize(f.to(dtype), self.eps)
                diff = (f[:n] - f[n:]).pow(2)
                dist = dist + F.conv2d(diff, head.weight.to(dtype)).mean(dim=(1, 2, 3))
        return dist

    def extra_repr(self) -> str:
        return f"trunk={self.trunk_source!r}, heads={self.heads_source!r}, eps={self.eps:g}"
