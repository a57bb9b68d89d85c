"""The baselines both papers compare against, on CMA-AE's Table I encoder/decoder.

All three train in one stage on defect-free patches and map defects as in their papers: ae-l2 and
memae by the pixel residual, ae-ssim by 1 - the per-pixel SSIM (Bergmann et al.; model files
written before that map existed keep the residual they record); they share CMA-AE's network so
that only the idea under test differs.

    ae-l2    plain autoencoder, L2 loss
    ae-ssim  plain autoencoder, SSIM loss and map (Bergmann et al. 2018; 11x11 window, sigma 1.5)
    memae    memory module only (Gong et al. 2019): decoder reads z_hat; L2 + 0.0002 entropy
"""
from __future__ import annotations

from dataclasses import fields, make_dataclass

from .. import register
from ..cmaae.model import CMAAE, CMAAEConfig


def _baseline(name_: str, doc: str, **fixed):
    class Baseline(CMAAE):
        name = name_
        # CMA-AE's options with this baseline's values as defaults.
        Config = make_dataclass(f"{name_.replace('-', '_').upper()}Config",
                                [(f.name, f.type, fixed.get(f.name, f.default)) for f in fields(CMAAEConfig)])
        demo_options = {}

        def __init__(self, **kwargs):
            super().__init__(**{**fixed, **kwargs})

    Baseline.__name__ = Baseline.__qualname__ = name_.replace("-", "_").upper()
    Baseline.__doc__ = doc
    return register(Baseline)


AEL2 = _baseline("ae-l2", "Plain AE, L2 loss.", fusion="none", two_stage=False, rec_loss="l2", rec_weight=1.0, map="residual")
AESSIM = _baseline("ae-ssim", "Plain AE, SSIM loss, 1 - SSIM map.", fusion="none", two_stage=False, rec_loss="ssim",
                   rec_weight=1.0, map="ssim")
MEMAE = _baseline("memae", "Memory-only AE (MemAE).", fusion="mam", two_stage=False, rec_loss="l2", rec_weight=1.0,
                  entropy_weight=0.0002, map="residual")
