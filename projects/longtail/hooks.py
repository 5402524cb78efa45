"""Training hooks of the ``longtail`` project.

:class:`MemoryInitHook` is LOCE's initialisation pass (the official LOCE code's
``InitializerHook``): before the first iteration of a run that starts at iteration 0, the model
runs forward only, in training mode and without gradients, over class-balanced training images
(``MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS`` per class and VGPU, :func:`class_balanced_stream`),
so the MFS memory holds features of every class that has training images and the mean scores are
warmed from the loaded model. No optimizer or scheduler step, no parameter change. A resumed run
skips it: its memory and mean scores come from the checkpoint (:mod:`longtail.checkpoint`).
"""
import logging
import time

import torch
from detectron2.data import DatasetFromList, DatasetMapper, MapDataset
from detectron2.data.build import get_detection_dataset_dicts, trivial_batch_collator
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage
from torch.nn.parallel import DistributedDataParallel

from .data import ReplacingMapDataset
from .samplers import class_balanced_stream

__all__ = ["MemoryInitHook", "build_memory_init_loader", "run_memory_init_pass", "progress_line"]

logger = logging.getLogger(__name__)


def build_memory_init_loader(cfg, dataset=None):
    """One pass over this process's class-balanced images, in process batches (VGPU-ordered).
    ``dataset``: the training records (default: loaded from ``cfg.DATASETS.TRAIN``)."""
    if dataset is None:
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
    sampler = class_balanced_stream(
        cfg, dataset, cfg.MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS, repeat=False
    )
    if cfg.LONGTAIL.SKIP_BAD_IMAGES:
        mapped = ReplacingMapDataset(dataset, DatasetMapper(cfg, True), "MFS initialisation pass")
    else:
        mapped = MapDataset(DatasetFromList(dataset, copy=False), DatasetMapper(cfg, True))
    return torch.utils.data.DataLoader(
        mapped,
        batch_size=sampler.ims_per_vgpu * len(sampler.lists),
        sampler=sampler,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=trivial_batch_collator,
    )


def progress_line(done: int, total: int, elapsed: float) -> str:
    """``"<done>/<total> steps (<pct>%), <elapsed> elapsed, ETA <eta>"``, the ETA extrapolated
    from the mean time per step so far (``?`` before the first step)."""
    def hms(seconds: float) -> str:
        seconds = int(round(seconds))
        return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    eta = hms(elapsed / done * (total - done)) if done > 0 else "?"
    pct = 100.0 * done / total if total > 0 else 100.0
    return f"{done}/{total} steps ({pct:.0f}%), {hms(elapsed)} elapsed, ETA {eta}"


@torch.no_grad()
def run_memory_init_pass(model, loader, log_every_s: float = 60.0) -> int:
    """Forward ``model`` (training mode, no gradients) over ``loader``; returns the steps run.
    Logs its progress with an ETA after the first step and then every ``log_every_s`` seconds
    (the pass takes minutes to hours at LVIS scale)."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    heads = inner.roi_heads
    was_training = model.training
    model.train()
    steps = 0
    total = len(loader)
    start = last = time.perf_counter()
    try:
        with EventStorage(0):  # keep the pass's scalars out of the training metrics
            for steps, batch in enumerate(loader, start=1):
                heads.init_step = steps - 1
                model(batch)
                now = time.perf_counter()
                if steps == 1 or now - last >= log_every_s or steps == total:
                    last = now
                    logger.info("MFS initialisation pass: %s",
                                progress_line(steps, total, now - start))
    finally:
        heads.init_step = -1
        model.train(was_training)
    return steps


class MemoryInitHook(HookBase):
    """Runs :func:`run_memory_init_pass` before training when the run starts at iteration 0."""

    def __init__(self, cfg, dataset=None):
        """``dataset``: the trainer's training records (loaded again from the config if None)."""
        self.cfg = cfg.clone()
        self.dataset = dataset

    def before_train(self):
        if self.trainer.iter > 0 or self.trainer.start_iter > 0:
            logger.info("MFS initialisation pass skipped: resumed run (memory from checkpoint).")
            return
        start = time.perf_counter()
        loader = build_memory_init_loader(self.cfg, self.dataset)
        steps = run_memory_init_pass(self.trainer.model, loader)
        model = self.trainer.model
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        memory = inner.roi_heads.memory
        filled = int((memory.fill_counts() > 0).sum())
        msg = (
            f"MFS initialisation pass: {steps} forward steps over {len(loader.sampler)} "
            f"class-balanced images in {time.perf_counter() - start:.1f} s; "
            f"{filled} of {memory.fill_counts().numel()} (bank, class) queues hold features"
        )
        loss = inner.roi_heads.box_predictor.cls_loss
        tracker = getattr(loss, "mean_score", None)
        if tracker is not None and loss.class_frequency is not None:
            means = tracker.group_means(loss.class_frequency)
            msg += "; mean scores " + ", ".join(f"{k} {float(v):.4f}" for k, v in means.items())
        logger.info(msg)
