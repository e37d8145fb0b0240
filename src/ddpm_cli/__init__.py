"""ddpm: train and sample Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel, 2020)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ddpm-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
