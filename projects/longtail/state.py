"""Every process stops at a non-finite loss, together, before the optimizer step.

detectron2 checks the loss only on the main process, after gathering the metrics; the other
processes then wait in their next collective until the launcher (one machine) or the collective
timeout (several machines) ends them. :func:`install_nonfinite_guard` makes every process stop
at the same step with the same clear error, at no cost on the hot path:

* a forward hook on the model (training mode) reduces the loss terms to one finiteness flag on
  their device and starts its all-reduce (minimum over the processes) asynchronously: no host
  read, and the collective overlaps the backward pass;
* an optimizer step pre-hook (and, for trainers that skip the optimizer step, e.g. a gradient
  scaler seeing non-finite gradients, the next forward) waits for that flag and reads it. The
  step trainers of detectron2 have already read the loss values back to the host at that point
  (``_write_metrics``), so the read waits for nothing;
* a flag that is not 1 raises ``FloatingPointError`` on every process, naming the non-finite
  loss terms (or "on another process") and the iteration, before the optimizer step: the weights
  do not take that step.

The long-tail state (mean scores, memories) has already seen the batch by then (they update in
the forward pass); it is not rolled back, because the run ends here and nothing is saved after
the error (the periodic checkpointer runs after a *completed* step). An earlier version copied
every overwritten memory row each step to undo it; that state was never used.
"""
import logging
import math
from typing import Dict, Optional

import torch
import torch.distributed as dist
from detectron2.utils.events import get_event_storage
from torch import nn

__all__ = ["install_nonfinite_guard", "finite_flag", "nonfinite_message"]

logger = logging.getLogger(__name__)


def _iteration() -> str:
    try:
        return str(get_event_storage().iter)
    except AssertionError:
        return "?"


def finite_flag(losses: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[1] float32 on the losses' device: 1.0 when every loss term is finite, else 0.0."""
    values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    return torch.isfinite(values).all().to(torch.float32).reshape(1)


def nonfinite_message(losses: Dict[str, torch.Tensor], iteration: str) -> str:
    """The error of a step whose flag was not 1 (reads the loss values: failure path only)."""
    values = {k: float(v.detach().float()) for k, v in losses.items()}
    bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
    return (
        f"Loss became non-finite at iteration {iteration}: {bad or '(on another process)'}. "
        "Every process stops here, before the optimizer step. All losses of this process: "
        + ", ".join(f"{k}={v:.4g}" if math.isfinite(v) else f"{k}={v}" for k, v in values.items())
    )


def install_nonfinite_guard(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
    """
    Register the hooks described in the module docstring on ``model`` (unwrapped, not DDP) and
    ``optimizer`` (without one, the flag is checked at the start of the next training forward).
    """
    pending: Dict[str, object] = {}

    def check():
        if not pending:
            return
        flag, work, losses, iteration = (pending.pop(k) for k in ("flag", "work", "losses", "iter"))
        if work is not None:
            work.wait()
        if flag.item() != 1.0:  # the device is idle here (module docstring)
            raise FloatingPointError(nonfinite_message(losses, iteration))

    def before_forward(module, inputs):
        if module.training:
            check()  # a step whose optimizer step did not run (or no optimizer hook)

    def after_forward(module, inputs, output):
        if not module.training or not isinstance(output, dict) or not output:
            return output
        flag = finite_flag(output)
        work = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(flag, op=dist.ReduceOp.MIN, async_op=True)
        pending.update(flag=flag, work=work, losses={k: v.detach() for k, v in output.items()},
                       iter=_iteration())
        return output

    model.register_forward_pre_hook(before_forward)
    model.register_forward_hook(after_forward)
    if optimizer is not None:
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: check())
    logger.info("Non-finite loss guard: every process stops before the optimizer step of a "
                "non-finite loss.")
