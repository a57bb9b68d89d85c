"""Data: image/mask reading, MVTec-style data sets, patch grids, synthetic demo data.

- :mod:`.io`: :func:`read_image`, :func:`read_mask`, :func:`read_images`, :func:`list_images`,
  :class:`DataError` (every input problem names its file).
- :mod:`.dataset`: :func:`load_train_images`, :func:`load_test_set` -> :class:`TestSet`.
- :mod:`.patches`: :func:`extract_patches`, :func:`stitch_patches`, :func:`grid_shape`.
- :mod:`.synthetic`: :func:`make_synthetic_dataset`.
"""
from .dataset import GOOD, TestSet, find_mask, from_model_range, load_test_set, load_train_images, to_model_range
from .io import IMAGE_EXTENSIONS, BlankFramesWarning, DataError, DataWarning, list_images, read_image, read_images, read_mask
from .patches import extract_patches, grid_shape, stitch_patches
from .synthetic import DEFECT_KINDS, make_synthetic_dataset

__all__ = [
    "DEFECT_KINDS",
    "GOOD",
    "IMAGE_EXTENSIONS",
    "DataError",
    "BlankFramesWarning",
    "DataWarning",
    "TestSet",
    "extract_patches",
    "find_mask",
    "from_model_range",
    "grid_shape",
    "list_images",
    "load_test_set",
    "load_train_images",
    "make_synthetic_dataset",
    "read_image",
    "read_images",
    "read_mask",
    "stitch_patches",
    "to_model_range",
]
