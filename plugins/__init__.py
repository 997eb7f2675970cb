"""Fused GPU kernels (Triton) and TensorRT plugin registration."""
