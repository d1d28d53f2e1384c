"""Networks of fedfms: SAM segmenters with PEFT strategies, U-Net baselines, the SM-lite student.

Bundles and jobs reference :func:`fedfms.models.build_model` by dotted path.
"""

from fedfms.models.checkpoints import LoadReport, load_checkpoint, read_state_dict
from fedfms.models.counting import ParameterCount, component_counts, count_parameters
from fedfms.models.factory import MODELS, build_model
from fedfms.models.sam import SAM_SIZES, SamSegmenter
from fedfms.models.strategies import STRATEGIES, apply_strategy, trainable_names
from fedfms.models.unet import UNET_NAMES, build_unet

__all__ = [
    "MODELS",
    "SAM_SIZES",
    "STRATEGIES",
    "UNET_NAMES",
    "LoadReport",
    "ParameterCount",
    "SamSegmenter",
    "apply_strategy",
    "build_model",
    "build_unet",
    "component_counts",
    "count_parameters",
    "load_checkpoint",
    "read_state_dict",
    "trainable_names",
]
