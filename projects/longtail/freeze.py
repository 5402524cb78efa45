"""Decoupled training: train only the parameters under given name prefixes.

LOCE stage 2 trains the RPN, the box predictor and the mask head; BAGS stage 2 trains only the
classifier. ``MODEL.LONGTAIL.TRAINABLE_PREFIXES`` lists the prefixes; everything else is frozen:
``requires_grad=False`` (so detectron2's optimizer builder leaves it out) and BatchNorm layers
whose parameters are all frozen become ``FrozenBatchNorm2d`` (their running statistics stop
moving too).
"""
import logging
from typing import List, Sequence

from detectron2.layers import FrozenBatchNorm2d
from torch import nn

__all__ = ["freeze_except"]

logger = logging.getLogger(__name__)


def freeze_except(model: nn.Module, prefixes: Sequence[str]) -> List[str]:
    """
    Freeze every parameter of ``model`` whose name starts with none of ``prefixes``.

    Returns the names of the trainable parameters. Raises ValueError naming
    MODEL.LONGTAIL.TRAINABLE_PREFIXES when a prefix matches no parameter.
    """
    if not prefixes:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unmatched:
        tops = sorted({n.split(".")[0] + "." for n in names})
        raise ValueError(
            f"MODEL.LONGTAIL.TRAINABLE_PREFIXES: {unmatched} match no parameter of the model. "
            f"Top-level prefixes are {tops}; e.g. 'roi_heads.box_predictor.cls_score.'."
        )
    trainable = []
    for name, param in model.named_parameters():
        keep = any(name.startswith(p) for p in prefixes)
        param.requires_grad_(keep and param.requires_grad)
        if param.requires_grad:
            trainable.append(name)
    _freeze_batchnorm(model)
    logger.info(
        "Decoupled training: %d of %d parameter tensors trainable (%s)",
        len(trainable), len(names), ", ".join(prefixes),
    )
    return trainable


def _freeze_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        params = list(child.parameters(recurse=False))
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in params
        ):
            setattr(module, name, FrozenBatchNorm2d.convert_frozen_batchnorm(child))
        else:
            _freeze_batchnorm(child)
