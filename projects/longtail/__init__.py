"""Long-tailed object detection and instance segmentation on LVIS, as a detectron2 project.

Importing the package registers its datasets, samplers and (in later modules) model components.
"""
from . import datasets, mask_head, roi_heads, samplers  # noqa: F401  (registration on import)
from . import cls_losses, layers, memory_policies  # noqa: F401  (losses, classifiers, memories)
from . import eqlv2, fed_loss, norcal, seesaw  # noqa: F401  (the reference losses, calibration)
from . import rehearsal  # noqa: F401  (registers the LVIS rehearsal datasets)
from .config import add_longtail_config
from .engine import Trainer
from .launch import launch

__all__ = ["add_longtail_config", "Trainer", "launch"]
