"""Checkpoints that also carry per-process state.

detectron2 writes checkpoints from the main process only, so state that differs between processes
is lost on resume: the object memories (:mod:`longtail.memory`) and the random generators
(torch CPU and CUDA, numpy, Python), whose states decide detectron2's proposal sampling. Each
process saves them beside each checkpoint with :class:`LongTailCheckpointer` (memories: any
submodule with ``process_state()`` / ``load_process_state(state)``, when ``save_memories``):

    OUTPUT_DIR/model_0004999.pth            the usual checkpoint (main process)
    OUTPUT_DIR/model_0004999.rank0.pth      process 0's state, ...
    OUTPUT_DIR/model_0004999.rank<R>.pth    process R's state

A checkpoint is always whole (:meth:`LongTailCheckpointer.save`, called by every process):

1. every file is written under a temporary name, flushed to disk and renamed over its final
   name (a kill leaves the previous file intact, never a truncated one);
2. every process writes its state as ``<name>.rank<R>.pth.next`` (pending), then a barrier;
3. the main process writes the model checkpoint, then points ``last_checkpoint`` at it (the
   commit), then a barrier;
4. each process renames its pending file to ``<name>.rank<R>.pth`` and removes its older state
   files: each process keeps only its newest file.

A kill before the commit leaves the previous checkpoint and its state files as they were
(including when ``model_final.pth`` is rewritten by a resumed, longer run); a kill after it
leaves the new checkpoint with every process's state, committed or pending.
``resume_or_load(resume=True)`` (``--resume``) restores every process's state from the file next
to the checkpoint it resumes from, after checking on every process that the file exists and was
written for that checkpoint, at its iteration, by a run with the same number of processes; if
any process fails the check, every process stops with a message naming the missing or mismatched
files (never an inexact resume). Loading weights only (``MODEL.WEIGHTS`` without ``--resume``)
leaves the state as built (empty memories, seeded generators). Global state (LOCE's mean scores,
BAGS tables) is in ordinary buffers and travels in the main checkpoint.
"""
import glob
import logging
import os
import random
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "LongTailCheckpointer",
    "atomic_torch_save",
    "atomic_write_text",
    "process_state_modules",
    "process_state_path",
    "rng_state",
    "set_rng_state",
]

# suffix of a process's state file written for a checkpoint not yet committed
PENDING = ".next"

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


def _fsync_replace(tmp: str, path: str) -> None:
    """Rename ``tmp`` (already flushed) over ``path`` and flush the directory entry."""
    os.replace(tmp, path)
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # a directory that cannot be opened: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write, binary: bool = False) -> None:
    """``write(f)`` into a temporary file beside ``path`` (one per process), fsync and rename: a
    reader (or a kill at any moment) sees the previous file or the new one, never a partial
    file, also when several processes write the same file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb" if binary else "w") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_replace(tmp, path)


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text))


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
    """``DetectionCheckpointer`` + per-process state files, written whole (module docstring).

    :meth:`save` must be called by every process at the same point (the trainer installs a
    ``PeriodicCheckpointer`` on every process), since it synchronises them.
    """

    def __init__(self, model, save_dir="", *, save_memories: bool = True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.save_memories = save_memories

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir:
            return
        rank = comm.get_rank()
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        # object memories may be left out (MODEL.MEMORY.CHECKPOINT False); other per-process
        # state (e.g. Seesaw's counts) is small and always saved
        modules = {n: m for n, m in process_state_modules(self.model).items()
                   if self.save_memories or not getattr(m, "process_state_optional", False)}
        own = process_state_path(save_file, rank)
        pending = own + PENDING  # renamed to ``own`` once the checkpoint is committed
        atomic_torch_save({
            "world_size": comm.get_world_size(),
            "rank": rank,
            "checkpoint": basename,
            "iteration": kwargs.get("iteration"),
            "rng": rng_state(),
            "states": {n: m.process_state() for n, m in modules.items()},
        }, pending)
        comm.synchronize()  # every process's state is on disk before the model file changes
        if self.save_to_disk:
            data = {"model": self.model.state_dict()}
            for key, obj in self.checkpointables.items():
                data[key] = obj.state_dict()
            data.update(kwargs)
            self.logger.info("Saving checkpoint to %s", save_file)
            atomic_torch_save(data, save_file)
            self.tag_last_checkpoint(basename)
        comm.synchronize()  # committed: last_checkpoint names the new checkpoint
        _fsync_replace(pending, own)
        mine = glob.glob(os.path.join(glob.escape(self.save_dir), f"*.rank{rank}.pth"))
        mine += glob.glob(os.path.join(glob.escape(self.save_dir), f"*.rank{rank}.pth{PENDING}"))
        for path in mine:  # older state files (and pending ones a kill left) of this process
            if os.path.abspath(path) != os.path.abspath(own):
                os.remove(path)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def load(self, path, *args, **kwargs):
        ret = super().load(path, *args, **kwargs)
        checkpointables = args[0] if args else kwargs.get("checkpointables", None)
        if path and checkpointables is None:  # a resume (not weights only)
            self._load_process_state(path, ret.get("iteration") if ret else None)
        return ret

    def _check_process_state(self, checkpoint_path: str, iteration: Optional[int]):
        """
        (state, None) from this process's file for ``checkpoint_path`` at ``iteration`` (the
        committed file, else the pending one a kill between commit and rename left), or
        (None, what is wrong).
        """
        path = process_state_path(checkpoint_path, comm.get_rank())
        base = os.path.basename(checkpoint_path)
        problems = []
        for candidate in (path, path + PENDING):
            if not os.path.exists(candidate):
                continue
            try:
                with self.path_manager.open(candidate, "rb") as f:
                    saved = torch.load(f, map_location="cpu", weights_only=False)
            except Exception as e:  # not a whole file
                problems.append(f"{candidate} cannot be read ({type(e).__name__}: {e})")
                continue
            if saved["world_size"] != comm.get_world_size():
                problems.append(f"{candidate} was written by a run with {saved['world_size']} "
                                f"processes, this run has {comm.get_world_size()}")
            elif "checkpoint" in saved and (saved["checkpoint"] != base  # (older files: no key)
                                            or saved["iteration"] != iteration):
                problems.append(f"{candidate} belongs to {saved.get('checkpoint')} at iteration "
                                f"{saved.get('iteration')}, not {base} at iteration {iteration}")
            else:
                return saved, None
        return None, "; ".join(problems) or f"{path} is missing"

    def _load_process_state(self, checkpoint_path: str, iteration: Optional[int]) -> None:
        saved, problem = self._check_process_state(checkpoint_path, iteration)
        problems: List[str] = [p for p in comm.all_gather(problem) if p]
        if problems:
            raise RuntimeError(
                f"Cannot resume exactly from {checkpoint_path}: "
                + "; ".join(problems) + ". Every process's state file (random generators, "
                "object memories) must come from the same checkpoint and the same number of "
                "processes (--num-gpus). Resume with the --num-gpus that wrote it, or start a new "
                f"run from its weights without --resume (MODEL.WEIGHTS {checkpoint_path}, "
                "another OUTPUT_DIR): memories then start empty and the generators seeded."
            )
        set_rng_state(saved["rng"])
        restored = []
        modules = process_state_modules(self.model)
        for name, module in modules.items():
            if name in saved["states"]:
                module.load_process_state(saved["states"][name])
                restored.append(name)
            else:
                logger.warning(
                    "%s holds no state for %s (MODEL.MEMORY.CHECKPOINT was off): it starts empty.",
                    process_state_path(checkpoint_path, comm.get_rank()), name,
                )
        logger.info(
            "Restored per-process state (random generators%s) from %s",
            "".join(", " + n for n in restored), process_state_path(checkpoint_path,
                                                                   comm.get_rank()),
        )
