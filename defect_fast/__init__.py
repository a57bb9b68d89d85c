"""defect_fast: unsupervised surface-defect detection with fused C++/CUDA kernels."""
__version__ = "0.1.0"
