import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
MAGNETIC_TILE = SHARED / "data" / "magnetic-tile"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic MVTec-style dataset (128x128), made once per session."""
    from defect_fast.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic_dataset(root, size=128, seed=0)
    return root
