"""Long-tail state is updated only from batches whose losses are finite.

LOCE's mean scores and the object memories change *during* the forward pass (the mean scores
before the loss, as LOCE defines it; the memories when a batch is pushed). detectron2 stops
training when a loss is not finite, but only after the forward, so without care the state would
already hold that batch's contribution (and a NaN mean score poisons every later margin).

:func:`install_nonfinite_guard` registers two hooks on the model:

* before each training forward, every module with ``begin_step()`` / ``rollback()``
  (:class:`~longtail.equilibrium.MeanScoreTracker`, :class:`~longtail.memory.ObjectMemory`)
  starts recording what the step changes;
* after it, the losses are checked (one flag, all-reduced so that every process decides alike);
  if any is not finite, every process rolls its state back and a ``FloatingPointError`` names the
  non-finite loss terms and the iteration, before any backward pass or optimizer step.
"""
import logging
import math
from typing import Dict, List

import torch
import torch.distributed as dist
from detectron2.utils.events import get_event_storage
from torch import nn

__all__ = ["install_nonfinite_guard", "transactional_modules"]

logger = logging.getLogger(__name__)


def transactional_modules(model: nn.Module) -> List[nn.Module]:
    """Submodules with ``begin_step`` and ``rollback`` methods."""
    return [
        m for m in model.modules()
        if callable(getattr(m, "begin_step", None)) and callable(getattr(m, "rollback", None))
    ]


def _iteration() -> str:
    try:
        return str(get_event_storage().iter)
    except AssertionError:
        return "?"


def install_nonfinite_guard(model: nn.Module) -> None:
    """Register the hooks described in the module docstring on ``model`` (unwrapped, not DDP)."""
    modules = transactional_modules(model)

    def before(module, inputs):
        if module.training:
            for m in modules:
                m.begin_step()

    def after(module, inputs, output):
        if not module.training or not isinstance(output, dict) or not output:
            return output
        losses: Dict[str, torch.Tensor] = output
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        finite = torch.isfinite(values)
        flag = finite.all().to(torch.float32).reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 1.0:
            return output
        for m in modules:
            m.rollback()
        bad = {k: float(v) for (k, v), ok in zip(losses.items(), finite.tolist()) if not ok}
        where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "(on another process)"
        raise FloatingPointError(
            f"Loss became non-finite at iteration {_iteration()}: {where}. Training stops; the "
            "long-tail state (mean scores, object memories) was not updated from this batch and "
            "no optimizer step was taken. All losses: "
            + ", ".join(f"{k}={float(v):.4g}" if math.isfinite(float(v)) else f"{k}={float(v)}"
                        for k, v in losses.items())
        )

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)
    logger.info(
        "Non-finite loss guard on %d stateful module(s): %s",
        len(modules), ", ".join(type(m).__name__ for m in modules) or "none",
    )
