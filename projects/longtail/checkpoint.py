"""Checkpoints that also carry per-process state.

detectron2 writes checkpoints from the main process only, so state that differs between processes
is lost on resume: the object memories (:mod:`longtail.memory`) and the random generators
(torch CPU and CUDA, numpy, Python), whose states decide detectron2's proposal sampling. Each
process saves them beside each checkpoint with :class:`LongTailCheckpointer` (memories: any
submodule with ``process_state()`` / ``load_process_state(state)``, when ``save_memories``):

    OUTPUT_DIR/model_0004999.pth            the usual checkpoint (main process)
    OUTPUT_DIR/model_0004999.rank0.pth      process 0's state, ...
    OUTPUT_DIR/model_0004999.rank<R>.pth    process R's state

Each process keeps only its newest file (the previous one is removed after the new one is
written). ``resume_or_load(resume=True)`` (``--resume``) restores every process's state from
the file next to the checkpoint it resumes from; loading weights only (``MODEL.WEIGHTS`` without
``--resume``) leaves the state as built (empty memories, seeded generators). Global state (LOCE's
mean scores, BAGS tables) is in ordinary buffers and travels in the main checkpoint.
"""
import logging
import os
import random
from typing import Dict

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "LongTailCheckpointer",
    "process_state_modules",
    "process_state_path",
    "rng_state",
    "set_rng_state",
]

logger = logging.getLogger(__name__)


def process_state_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Submodules of ``model`` (unwrapped from DDP) that hold per-process state, by name."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return {
        name: m
        for name, m in model.named_modules()
        if callable(getattr(m, "process_state", None))
        and callable(getattr(m, "load_process_state", None))
    }


def process_state_path(checkpoint_path: str, rank: int) -> str:
    """``.../model_0000099.pth`` -> ``.../model_0000099.rank<rank>.pth``."""
    root, ext = os.path.splitext(checkpoint_path)
    return f"{root}.rank{rank}{ext or '.pth'}"


def rng_state() -> Dict:
    """This process's random generator states (torch CPU and CUDA, numpy, Python)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: Dict) -> None:
    """Restore :func:`rng_state` output."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class LongTailCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` + per-process state files (module docstring)."""

    def __init__(self, model, save_dir="", *, save_memories: bool = True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.save_memories = save_memories
        self._last_process_file = None

    def save(self, name: str, **kwargs) -> None:
        super().save(name, **kwargs)
        if not self.save_dir:
            return
        modules = process_state_modules(self.model) if self.save_memories else {}
        rank = comm.get_rank()
        path = process_state_path(os.path.join(self.save_dir, f"{name}.pth"), rank)
        state = {
            "world_size": comm.get_world_size(),
            "rank": rank,
            "rng": rng_state(),
            "states": {n: m.process_state() for n, m in modules.items()},
        }
        os.makedirs(self.save_dir, exist_ok=True)
        tmp = path + ".tmp"
        with self.path_manager.open(tmp, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
        previous, self._last_process_file = self._last_process_file, path
        if previous and previous != path and os.path.exists(previous):
            os.remove(previous)

    def load(self, path, *args, **kwargs):
        ret = super().load(path, *args, **kwargs)
        checkpointables = args[0] if args else kwargs.get("checkpointables", None)
        if path and checkpointables is None:  # a resume (not weights only)
            self._load_process_state(path)
        return ret

    def _load_process_state(self, checkpoint_path: str) -> None:
        modules = process_state_modules(self.model)
        rank = comm.get_rank()
        path = process_state_path(checkpoint_path, rank)
        if not os.path.exists(path):
            logger.warning(
                "Resuming from %s without its per-process state file %s: random generators "
                "keep their seeded state%s, so the resumed run is not an exact continuation.",
                checkpoint_path, path,
                f" and {', '.join(modules)} start empty" if modules else "",
            )
            return
        with self.path_manager.open(path, "rb") as f:
            saved = torch.load(f, map_location="cpu", weights_only=False)
        if saved["world_size"] != comm.get_world_size():
            raise ValueError(
                f"{path} was saved by a run with {saved['world_size']} processes; this run has "
                f"{comm.get_world_size()}. Per-process memories cannot be redistributed: resume "
                "with the same number of processes, or start a new run without --resume."
            )
        set_rng_state(saved["rng"])
        restored = []
        for name, module in modules.items():
            if name in saved["states"]:
                module.load_process_state(saved["states"][name])
                restored.append(name)
            else:
                logger.warning(
                    "%s holds no state for %s (MODEL.MEMORY.CHECKPOINT was off): it starts empty.",
                    path, name,
                )
        self._last_process_file = path  # replaced by this process's next save
        logger.info(
            "Restored per-process state (random generators%s) from %s",
            "".join(", " + n for n in restored), path,
        )
