"""fedfms: federated foundation-model segmentation with MONAI and NVIDIA FLARE."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedfms")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
