"""experiments/brightness_probe.py: an image score's two terms and their rank correlation with brightness."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from brightness_probe import correlations, score_terms  # noqa: E402

from defect_fast.detect import Detector  # noqa: E402
from defect_fast.models import build_model  # noqa: E402
from tests.test_context import RandomTrunkContext, _surfaces  # noqa: E402


def _u8(t: torch.Tensor) -> torch.Tensor:
    return ((t + 1) * 127.5).round().to(torch.uint8)


@pytest.mark.parametrize("with_context", [False, True])
def test_the_terms_add_up_to_the_score(monkeypatch, with_context):
    import defect_fast.context as context

    monkeypatch.setattr(context, "ImageContext", RandomTrunkContext)
    torch.manual_seed(0)
    det = Detector(build_model("cmaae", memory_size=20), image_size=128, stride=64, precision="float32")
    if with_context:
        det.fit_context(_u8(_surfaces(12, seed=1)), _u8(_surfaces(4, seed=2)))
    x = _surfaces(6, seed=3)
    images = _u8((x + 1) * torch.linspace(0.5, 1.0, 6).view(-1, 1, 1, 1) - 1)  # one surface kind, lit from dim to bright
    terms = score_terms(det, images, batch=4)
    with torch.no_grad():
        want = det(images)[1].numpy()
    np.testing.assert_allclose(terms["score"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(terms["local"] + terms["context"], terms["score"], rtol=1e-5, atol=1e-5)
    if not with_context:
        assert not terms["context"].any()
    res = correlations(det, images)
    assert res["images"] == 6 and set(res["rank_correlation"]) == {"score", "local", "context"}
    assert all(-1 <= v <= 1 or np.isnan(v) for v in res["rank_correlation"].values())


def test_correlations_rank_each_term_against_the_mean_brightness(monkeypatch):
    import brightness_probe

    images = torch.stack([torch.full((3, 4, 4), v, dtype=torch.uint8) for v in (40, 200, 90, 120)])
    bright = np.array([40.0, 200.0, 90.0, 120.0])
    monkeypatch.setattr(brightness_probe, "score_terms", lambda det, imgs: {
        "score": np.log(bright), "local": -bright, "context": np.array([1.0, 0.0, 3.0, 2.0])})
    res = correlations(None, images)
    assert res["rank_correlation"] == {"score": 1.0, "local": -1.0, "context": pytest.approx(-0.4)}
    assert res["mean_brightness"] == 112.5
