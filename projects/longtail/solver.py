"""Optimizer construction: detectron2's, plus whole-model gradient-norm clipping.

detectron2 clips gradients per parameter tensor (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` "value" or
"norm"). MMDetection's ``grad_clip=dict(max_norm=35, norm_type=2)``, used by BAGS, clips the norm
of *all* gradients together. ``CLIP_TYPE: "full_model"`` selects that behaviour here:
``torch.nn.utils.clip_grad_norm_`` over every parameter of the optimizer before each step
(computed on the device, no host synchronisation).
"""
import torch
from detectron2.solver import build_optimizer as d2_build_optimizer

__all__ = ["build_optimizer", "add_full_model_gradient_clipping"]


def add_full_model_gradient_clipping(optimizer, max_norm: float, norm_type: float = 2.0):
    """Make ``optimizer.step()`` first clip the total gradient norm of all its parameters."""
    base = type(optimizer)

    class FullModelGradientClipping(base):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelGradientClipping.__name__ = base.__name__ + "WithFullModelGradientClip"
    optimizer.__class__ = FullModelGradientClipping
    return optimizer


def build_optimizer(cfg, model):
    """detectron2's ``build_optimizer``, accepting ``CLIP_TYPE: "full_model"`` as well."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
        return d2_build_optimizer(cfg, model)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = d2_build_optimizer(cfg, model)
    return add_full_model_gradient_clipping(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)
