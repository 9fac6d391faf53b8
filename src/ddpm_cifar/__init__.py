"""Reproducible DDPM training, sampling and FID on CIFAR-10."""

__version__ = "0.1.0"
