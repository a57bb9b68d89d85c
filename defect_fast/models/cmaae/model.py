"""CMA-AE: clear memory-augmented autoencoder (Luo, Niu et al., arXiv 2208.03879).

Architecture (Table I), for 64x64 patches:

    Encoder                                       out
      conv 4x4 s2 p1   3 -> 32                    32x32   (no BN, no activation)   <- MSFR scale 1
      conv 3x3 s1 p1  32 -> 32  BN LeakyReLU(.2)  32x32                            <- MSFR scale 2
      conv 4x4 s2 p1  32 -> 64  BN LeakyReLU(.2)  16x16                            <- MSFR scale 3
      conv 4x4 s2 p1  64 -> 128 BN LeakyReLU(.2)   8x8
      conv 4x4 s2 p1 128 -> 256 BN LeakyReLU(.2)   4x4
      conv 4x4 s1 p0 256 -> 512                    1x1   (z, C = 512)
    CMAM
      MAM: memory M [N, 512]; cosine attention + softmax (Eq. 2), hard shrinkage at 1/N (Eq. 3),
           renormalisation, read-out z_hat = w M (Eq. 4)                 -> defect_fast.ops.memory_address
      FRM: f = act(W_f [z, z_hat]), i = act(W_i [z, z_hat]), C = tanh(W_c [z, z_hat])   (FC 1024 -> 512;
           Eqs. 7-8 print [z_k, z] with z undefined: read as Eq. 6's [z_k, z_hat_k])
           z' = f * z_hat (Eq. 9 as printed; ``gate_target="encoder"`` gates z instead, as the text says)
           z'' = z' + i * C (Eq. 10)
    Decoder (mirror, transposed convs, ReLU, tanh output)

The paper leaves some choices open; each is a constructor switch, the default first:
    gate_activation: "softmax" (Eqs. 6-7 say sigma is the softmax) | "sigmoid" (LSTM gates).
    gate_target: "memory" (Eq. 9 gates z_hat) | "encoder" (the text: erase foreground in z).
    renorm_p: 1 (MemAE's L1 renormalisation of the shrunk weights, on which the module is built;
        the default, not the paper's reading) | 2 (the paper's ||w||, "the modulus length" at Eq. 2).
    memory_size: N is not given; 2000 by default.
    latent: width C of the code z, the memory items and the FRM (Table I: 512).
    fusion: "cmam" (the paper) | "mam" (memory only, MemAE; Table V column B) |
            "cat" (FC over [z, z_hat] instead of the gates; column C) | "none" (plain AE).
    synthesis: "paper" (GAAGA with its own defaults: each image draws its patch kinds, sides 1/16
        to 1/4 of the image) | "paper-exact" (the paper's rule: both patches in every image, squares
        of half the image side) | "perlin" (irregular anomalies, see defect_fast.synthesis).
Stage 2 trains on GAAGA images against their clean originals (the repair the paper describes;
Eq. 13 as printed compares the anomalous image with its own reconstruction, which would teach
no repair).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...ops.reference import receptive_field_areas
from ...layers import KernelSizedConv2d, PointConvTranspose2d
from .. import register
from ..base import AnomalyModel

SYNTHESIS_VARIANTS = ("paper", "paper-exact", "perlin")
from .anomaly_map import ANOMALY_MAPS

LATENT = 512
ENCODER_LAYERS = [(4, 2), (3, 1), (4, 2), (4, 2), (4, 2), (4, 1)]  # (kernel, stride), Table I


def _encoder(latent: int = LATENT) -> nn.ModuleList:
    def block(cin, cout, k, s, p, bn=True, act=True):
        conv = KernelSizedConv2d if p == 0 else nn.Conv2d
        layers: list[nn.Module] = [conv(cin, cout, k, s, p, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        if act:
            layers.append(nn.LeakyReLU(0.2, inplace=True))
        return nn.Sequential(*layers)

    return nn.ModuleList([
        block(3, 32, 4, 2, 1, bn=False, act=False),
        block(32, 32, 3, 1, 1),
        block(32, 64, 4, 2, 1),
        block(64, 128, 4, 2, 1),
        block(128, 256, 4, 2, 1),
        block(256, latent, 4, 1, 0, bn=False, act=False),
    ])


def _decoder(latent: int = LATENT) -> nn.Sequential:
    def block(cin, cout, k, s, p, bn=True, act: nn.Module | None = None):
        deconv = PointConvTranspose2d if (s, p) == (1, 0) else nn.ConvTranspose2d
        layers: list[nn.Module] = [deconv(cin, cout, k, s, p, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        if act is not None:
            layers.append(act)
        return nn.Sequential(*layers)

    return nn.Sequential(
        block(latent, 256, 4, 1, 0, bn=False),
        block(256, 128, 4, 2, 1, act=nn.ReLU(inplace=True)),
        block(128, 64, 4, 2, 1, act=nn.ReLU(inplace=True)),
        block(64, 32, 4, 2, 1, act=nn.ReLU(inplace=True)),
        block(32, 32, 3, 1, 1, act=nn.ReLU(inplace=True)),
        block(32, 3, 4, 2, 1, bn=False, act=nn.Tanh()),
    )


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Eq. 5: sum_i -w_i log w_i per patch, averaged over the batch. weights [B, N] >= 0."""
    return -(weights * torch.log(weights + 1e-12)).sum(dim=1).mean()


class MemoryModule(nn.Module):
    """MAM: a content-addressable memory M [N, C] read by :func:`defect_fast.ops.memory_address`."""

    def __init__(self, size: int, dim: int, renorm_p: int = 1, shrink: bool = True):
        super().__init__()
        self.memory = nn.Parameter(torch.empty(size, dim))
        nn.init.uniform_(self.memory, -1.0 / dim**0.5, 1.0 / dim**0.5)
        self.renorm_p = renorm_p
        self.shrink_threshold = 1.0 / size if shrink else 0.0

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.memory_address(z, self.memory, self.shrink_threshold, 1.0, self.renorm_p)


class FeatureRepair(nn.Module):
    """FRM: forget and input gates over [z, z_hat] (Eqs. 6-10)."""

    def __init__(self, dim: int, gate_activation: str = "softmax", gate_target: str = "memory"):
        super().__init__()
        if gate_activation not in ("softmax", "sigmoid"):
            raise ValueError(f"gate_activation must be 'softmax' or 'sigmoid', got {gate_activation!r}")
        if gate_target not in ("memory", "encoder"):
            raise ValueError(f"gate_target must be 'memory' or 'encoder', got {gate_target!r}")
        self.forget = nn.Linear(2 * dim, dim)
        self.input = nn.Linear(2 * dim, dim)
        self.candidate = nn.Linear(2 * dim, dim)
        self.gate_activation = gate_activation
        self.gate_target = gate_target

    def _gate(self, t: torch.Tensor) -> torch.Tensor:
        return torch.softmax(t, dim=1) if self.gate_activation == "softmax" else torch.sigmoid(t)

    def forward(self, z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        both = torch.cat([z, z_hat], dim=1)
        f = self._gate(self.forget(both))
        i = self._gate(self.input(both))
        c = torch.tanh(self.candidate(both))
        kept = f * (z_hat if self.gate_target == "memory" else z)
        return kept + i * c


@dataclass
class CMAAEConfig:
    """CMA-AE's options (``--set key=value``); see the module docstring for each switch."""

    fusion: str = "cmam"
    two_stage: bool = True
    memory_size: int = 2000
    gate_activation: str = "softmax"
    gate_target: str = "memory"
    renorm_p: int = 1
    rec_loss: str = "l1"
    rec_weight: float = 50.0
    entropy_weight: float = 0.01
    map: str = "msfr"
    synthesis: str = "paper"
    latent: int = LATENT


@register
class CMAAE(AnomalyModel):
    """CMA-AE on 64x64 patches; see the module docstring for the architecture and switches."""

    name = "cmaae"
    Config = CMAAEConfig
    anomaly_maps = ANOMALY_MAPS
    demo_options = {"memory_size": 200}

    def __init__(
        self,
        fusion: str = "cmam",
        two_stage: bool = True,
        memory_size: int = 2000,
        gate_activation: str = "softmax",
        gate_target: str = "memory",
        renorm_p: int = 1,
        rec_loss: str = "l1",
        rec_weight: float = 50.0,
        entropy_weight: float = 0.01,
        map: str = "msfr",
        synthesis: str = "paper",
        latent: int = LATENT,
    ):
        super().__init__()
        if isinstance(latent, bool) or not isinstance(latent, int) or latent < 1:
            raise ValueError(f"latent must be a whole number >= 1; got {latent!r}")
        if synthesis not in SYNTHESIS_VARIANTS:
            raise ValueError(f"synthesis must be one of {SYNTHESIS_VARIANTS}; got {synthesis!r}")
        if fusion not in ("cmam", "mam", "cat", "none"):
            raise ValueError(f"fusion must be one of cmam, mam, cat, none; got {fusion!r}")
        if rec_loss not in ("l1", "l2", "ssim"):
            raise ValueError(f"rec_loss must be l1, l2 or ssim; got {rec_loss!r}")
        if map not in self.anomaly_maps:
            raise ValueError(f"map must be one of {sorted(self.anomaly_maps)}; got {map!r}")
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
            raise ValueError(f"memory_size must be a whole number >= 1; got {memory_size!r}")
        if renorm_p not in (1, 2) or isinstance(renorm_p, bool):
            raise ValueError(f"renorm_p must be 1 or 2; got {renorm_p!r}")
        for key, value in (("rec_weight", rec_weight), ("entropy_weight", entropy_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and value < float("inf")):
                raise ValueError(f"{key} must be a finite number >= 0; got {value!r}")
        self._config = dict(
            fusion=fusion, two_stage=two_stage, memory_size=memory_size, gate_activation=gate_activation,
            gate_target=gate_target, renorm_p=renorm_p, rec_loss=rec_loss, rec_weight=rec_weight,
            entropy_weight=entropy_weight, map=map, synthesis=synthesis, latent=latent,
        )
        self.synthesis = synthesis
        self.patch_size = 64
        self.default_map = map
        self.fusion = fusion
        self.stages = ("normal", "synthetic") if two_stage else ("normal",)
        self.encoder = _encoder(latent)
        self.decoder = _decoder(latent)
        self.mam = MemoryModule(memory_size, latent, renorm_p) if fusion != "none" else None
        self.frm = FeatureRepair(latent, gate_activation, gate_target) if fusion == "cmam" else None
        self.cat = nn.Linear(2 * latent, latent) if fusion == "cat" else None
        self.rec_loss, self.rec_weight, self.entropy_weight = rec_loss, rec_weight, entropy_weight
        self._ssim = None

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def unused_options(self, keys) -> list[str]:
        unused = set()
        if self.mam is None:  # no memory: nothing addressed, no attention weights to take the entropy of
            unused |= {"memory_size", "renorm_p", "entropy_weight"}
        if self.frm is None:
            unused |= {"gate_activation", "gate_target"}
        if "synthetic" not in self.stages:
            unused.add("synthesis")
        return [k for k in keys if k in unused]

    def objective(self) -> dict[str, int]:
        if self.rec_loss != "ssim":
            return {}
        from ...losses.ssim import objective as ssim_objective

        return ssim_objective()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.encoder[:3]:
            x = layer(x)
            feats.append(x)
        return feats

    def msfr_weights(self) -> list[float]:
        return receptive_field_areas(ENCODER_LAYERS[:3])

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        feats = self.features(x)  # encoder layers 1-3, handed to the MSFR map
        h = feats[-1]
        for layer in self.encoder[3:]:
            h = layer(h)
        z = h.flatten(1)
        out: dict[str, Any] = {"features": feats}
        if self.mam is None:
            code = z
        else:
            z_hat, weights = self.mam(z)
            out["weights"] = weights
            if self.frm is not None:
                code = self.frm(z, z_hat)
            elif self.cat is not None:
                code = self.cat(torch.cat([z, z_hat], dim=1))
            else:
                code = z_hat
        out["recon"] = self.decoder(code[:, :, None, None])
        return out

    def loss(self, out, target, stage):
        recon = out["recon"]
        if self.rec_loss == "l1":
            rec = F.l1_loss(recon, target)
        elif self.rec_loss == "l2":
            rec = F.mse_loss(recon, target)
        else:
            if self._ssim is None:
                from ...losses.ssim import SSIMLoss

                self._ssim = SSIMLoss()
            rec = self._ssim(recon, target)
        total = self.rec_weight * rec
        parts = {"rec": rec.detach()}
        if "weights" in out and self.entropy_weight > 0:
            ent = attention_entropy(out["weights"])
            total = total + self.entropy_weight * ent
            parts["entropy"] = ent.detach()
        return total, parts

    def synthesize(self, clean: torch.Tensor, sources: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """GAAGA anomalies on clean [B,3,H,W] -> (images, mask).

        ``synthesis="paper"``: natural-photo and blurred-normal rectangles with GAAGA's defaults
        (each image draws its patch kinds; the paper pastes both: see :mod:`defect_fast.synthesis.synthesize`);
        "paper-exact": the paper's rule, both rectangles in every image, squares of half the image side
        (:data:`defect_fast.synthesis.gaaga.PAPER_RULE`); "perlin": irregular Perlin-shaped regions
        with generated textures, cut-paste from other images, brightness changes and random opacity
        (:mod:`defect_fast.synthesis.synthesize`).
        """
        from ...synthesis import SynthesisConfig, synthesize
        from ...synthesis.gaaga import PAPER_RULE

        exact = self.synthesis == "paper-exact"
        config = SynthesisConfig(variant="paper" if exact else self.synthesis,
                                 paper_options=dict(PAPER_RULE) if exact else {})
        return synthesize(clean, sources, generator, "gaaga", config)

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        """Stage 0 trains everything; stage 1 freezes the memory (Algorithm 1, line 13)."""
        frozen = {id(self.mam.memory)} if (stage > 0 and self.mam is not None) else set()
        return [p for p in self.parameters() if id(p) not in frozen]
