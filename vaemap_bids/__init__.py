"""vaemap: diffusion-MRI parameter maps with physics-informed variational autoencoders."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vaemap")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0+unknown"

__all__ = ["__version__"]
