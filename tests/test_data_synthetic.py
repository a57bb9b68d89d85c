"""The synthetic MVTec-style data set the tests and the demo make: deterministic, refusing to
overwrite, with defects a trivial detector finds. Reading real files: tests/test_data.py."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from defect_fast.data import load_test_set, make_synthetic_dataset
from defect_fast.metrics import pixel_auroc


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_deterministic_and_seed_dependent(tmp_path):
    kw = dict(n_train=3, n_test_good=2, n_test_defect=2, size=48)
    a = _digest(make_synthetic_dataset(tmp_path / "a", seed=5, **kw))
    b = _digest(make_synthetic_dataset(tmp_path / "b", seed=5, **kw))
    c = _digest(make_synthetic_dataset(tmp_path / "c", seed=6, **kw))
    assert a == b
    assert len(a) == 3 + 2 + 2 * 2 * 2
    assert "ground_truth/spot/001_mask.png" in a and "test/scratch/000.png" in a
    assert all(a[k] != c[k] for k in a)


def test_synthetic_refuses_non_empty_folder(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic_dataset(root, n_train=1, n_test_good=1, n_test_defect=1, size=32)
    make_synthetic_dataset(root, n_train=2, n_test_good=1, n_test_defect=1, size=32, overwrite=True)
    make_synthetic_dataset(root, n_train=1, n_test_good=1, n_test_defect=1, size=32, overwrite=True)
    assert (root / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == ["000.png"]
    with pytest.raises(ValueError, match="classes"):
        make_synthetic_dataset(tmp_path / "x", classes=("crack",))


def test_synthetic_defects_exact_and_visible(tmp_path):
    root = make_synthetic_dataset(tmp_path / "ds", n_train=1, n_test_good=3, n_test_defect=4, size=64, classes=("scratch", "spot", "blob"))
    ts = load_test_set(root, 64)
    gray = ts.images.float().mean(1)
    defect = ts.labels == 1
    assert all(bool(ts.masks[i].any()) for i in range(len(ts)) if defect[i])
    sharp = torch.tensor([c in ("scratch", "spot") for c in ts.classes])
    inside = gray[sharp[:, None, None] & ts.masks]
    assert bool(((inside < 20) | (inside > 225)).all())  # painted far outside the texture range
    outside = gray[~ts.masks]
    assert 20 < float(outside.min()) and float(outside.max()) < 225
    # a trivial residual detector (distance from the image median) finds the defects
    score = (gray - gray.flatten(1).median(1).values[:, None, None]).abs()
    assert pixel_auroc(score, ts.masks) > 0.99
