"""MONAI dictionary transforms of fedfms, referenced by the bundles' configs as ``fedfms.transforms.<Name>``."""

from fedfms.transforms.checks import CheckVolumed
from fedfms.transforms.slicing import DepthToChanneld, SelectChanneld, SliceStacksd, stack_indices
from fedfms.transforms.stored import RestorePreparedSized

__all__ = ["CheckVolumed", "DepthToChanneld", "RestorePreparedSized", "SelectChanneld", "SliceStacksd", "stack_indices"]
