"""``Trainer``: detectron2's ``DefaultTrainer`` with the project's data and evaluation plumbing.

Differences from ``DefaultTrainer``:

* the datasets of ``LONGTAIL.REGISTER_DATASETS`` are registered
  (:func:`longtail.custom_datasets.register_from_config`); before the model is built,
  :func:`longtail.datasets.prepare_datasets` checks the datasets,
  generates the synthetic one if needed and attaches the class statistics the methods use;
  after it is built, ``MODEL.LONGTAIL.TRAINABLE_PREFIXES`` freezes the rest (decoupled
  training, :mod:`longtail.freeze`);
* the training sampler comes from :data:`longtail.samplers.SAMPLER_REGISTRY`
  (``DATALOADER.SAMPLER_TRAIN``);
* ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` clips the norm of all gradients together
  (MMDetection's ``grad_clip``, used by BAGS), see :mod:`longtail.solver`;
* datasets with ``evaluator_type == "lvis"`` are evaluated with
  :class:`longtail.evaluation.LongTailLVISEvaluator` (``LONGTAIL.EVAL``), and
  ``LONGTAIL.TEST_TOPK_PER_CLASS`` switches the box predictor to top-k-per-class inference
  (:mod:`longtail.inference`);
* checkpoints also carry every process's object memory (:mod:`longtail.checkpoint`), and runs
  with LOCE's memory start with its initialisation pass (:class:`longtail.hooks.MemoryInitHook`);
* on CPU, DistributedDataParallel is created without ``device_ids`` (detectron2's
  ``create_ddp_model`` passes the local rank as a CUDA device id, which is wrong for CPU modules).
"""
import logging
import os
import time
import weakref

import torch
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.data.build import get_detection_dataset_dicts
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine import hooks as d2_hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import LongTailCheckpointer, rng_state, set_rng_state
from .config import check_longtail_config
from .data import (
    ResumableBatchStream,
    build_resumable_loader,
    check_image_files,
    count_replaced_images,
)
from .state import install_nonfinite_guard
from .custom_datasets import register_from_config
from .datasets import prepare_datasets, prepare_files
from .evaluation import build_lvis_evaluator
from .inference import enable_topk_per_class
from .memory import object_memories
from .predictor import LongTailFastRCNNOutputLayers
from .roi_heads import (
    LongTailROIHeads,
    check_trainable_for_memory,
    refuse_method_keys_without_longtail_heads,
)
from .freeze import freeze_except
from .samplers import build_train_sampler, check_batch_layout
from .solver import build_optimizer

__all__ = [
    "Trainer",
    "wrap_ddp",
    "AutocastTrainer",
    "build_step_trainer",
    "resolve_seed",
    "load_train_dicts",
    "set_model_seed",
]


def resolve_seed(cfg):
    """
    ``cfg`` with a non-negative ``SEED``: ``SEED < 0`` (detectron2's "random") draws one seed
    shared by all processes, so the data stream, the BAGS draws and the memory draws of this run
    are random yet consistent, and logged and saved in checkpoints (a resumed run continues with
    it, :meth:`Trainer.load_state_dict`). A non-negative ``SEED`` is returned unchanged.
    """
    if cfg.SEED >= 0:
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SEED = int(comm.shared_random_seed())
    cfg.freeze()
    logging.getLogger(__name__).info(
        "SEED -1: this run draws with seed %d (saved in its checkpoints).", cfg.SEED
    )
    return cfg


def load_train_dicts(cfg):
    """The training records of ``cfg.DATASETS.TRAIN`` (files prepared first), as detectron2 loads
    them for its training loader; with ``LONGTAIL.CHECK_IMAGES``, every image file is checked to
    exist (:func:`longtail.data.check_image_files`)."""
    register_from_config(cfg)
    prepare_files(list(cfg.DATASETS.TRAIN))
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    if cfg.LONGTAIL.CHECK_IMAGES:
        check_image_files(dicts, " + ".join(cfg.DATASETS.TRAIN), cfg.LONGTAIL.SKIP_BAD_IMAGES,
                          cfg.LONGTAIL.CHECK_IMAGES_MAX_IMAGES)
    return dicts


def set_model_seed(model, seed: int) -> None:
    """Give the model's seeded components (ROI heads, box predictor) the base seed ``seed``."""
    for m in model.modules():
        if isinstance(m, (LongTailROIHeads, LongTailFastRCNNOutputLayers)):
            m.seed = int(seed)


def wrap_ddp(model, device: str):
    """DistributedDataParallel when there are several processes; CPU models get no device_ids."""
    if comm.get_world_size() == 1:
        return model
    if str(device).startswith("cuda"):
        return create_ddp_model(model, broadcast_buffers=False)
    return create_ddp_model(model, broadcast_buffers=False, device_ids=None)


class AutocastTrainer(SimpleTrainer):
    """
    detectron2's ``SimpleTrainer`` step with the forward pass under ``torch.autocast`` for a
    device without a gradient scaler: bfloat16 on CPU (``SOLVER.AMP.ENABLED`` on CPU; detectron2
    v0.6's ``AMPTrainer`` requires CUDA). bfloat16 has float32's range, so no loss scaling.
    """

    def __init__(self, model, data_loader, optimizer, device_type="cpu", dtype=torch.bfloat16):
        super().__init__(model, data_loader, optimizer)
        self.device_type = device_type
        self.dtype = dtype

    def run_step(self):
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        after_backward = getattr(self, "after_backward", None)  # detectron2 main's hook
        if after_backward is not None:
            after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_step_trainer(cfg, model, data_loader, optimizer):
    """SimpleTrainer; with ``SOLVER.AMP.ENABLED``, AMPTrainer (fp16 + GradScaler) on CUDA or
    :class:`AutocastTrainer` (bfloat16) on CPU."""
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer(model, data_loader, optimizer)
    if str(cfg.MODEL.DEVICE).startswith("cuda"):
        return AMPTrainer(model, data_loader, optimizer)
    return AutocastTrainer(model, data_loader, optimizer, "cpu", torch.bfloat16)


class Trainer(DefaultTrainer):
    """DefaultTrainer for the long-tail project (see module docstring)."""

    def __init__(self, cfg):
        # Same steps as DefaultTrainer.__init__ (detectron2 v0.6 and main), with dataset
        # preparation first and a device-aware DDP wrapper.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        cfg = resolve_seed(cfg)
        check_batch_layout(cfg, comm.get_world_size())
        # the training records, loaded once (one parse of the json, which also gives the class
        # statistics build_model attaches) and shared by the loader and the MFS pass
        self.train_dicts = load_train_dicts(cfg)
        model = self.build_model(cfg)
        check_trainable_for_memory(cfg, model)
        for memory in object_memories(model):
            memory.allocate()  # before the first iteration, so a memory that does not fit fails now
        if cfg.LONGTAIL.SKIP_BAD_IMAGES:
            count_replaced_images(model)  # metric data/replaced_images
        optimizer = self.build_optimizer(cfg, model)
        install_nonfinite_guard(model, optimizer)
        data_loader = self.build_train_loader(cfg, self.train_dicts)
        model = wrap_ddp(model, cfg.MODEL.DEVICE)
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = LongTailCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
            save_memories=cfg.MODEL.MEMORY.CHECKPOINT,
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """
        detectron2's hooks, with the memory policy's hooks first (LOCE's MFS initialisation
        pass, when configured), and a
        checkpointer on every process, not only the main one, when the model holds per-process
        state (the other processes then write only their ``.rank<R>.pth`` files).
        """
        ret = super().build_hooks()
        cfg = self.cfg
        model = self._trainer.model
        inner = model.module if hasattr(model, "module") else model
        for m in inner.modules():
            if isinstance(m, LongTailROIHeads) and m.memory_policy is not None:
                ret[:0] = m.memory_policy.training_hooks(cfg, self.train_dicts)
        if not comm.is_main_process():
            # at the main process's position (before the evaluation hook): a checkpoint
            # synchronises the processes, and so does an evaluation
            period = cfg.SOLVER.CHECKPOINT_PERIOD
            at = next((i for i, h in enumerate(ret) if isinstance(h, d2_hooks.EvalHook)), len(ret))
            ret.insert(at, d2_hooks.PeriodicCheckpointer(self.checkpointer, period))
        return ret

    def resume_or_load(self, resume=True):
        """
        detectron2's, then the training stream continues at the resumed iteration: batch
        ``start_iter`` of the (seeded) stream, not batch 0 (:mod:`longtail.data`).
        """
        super().resume_or_load(resume=resume)
        stream = getattr(self._trainer.data_loader, "dataset", None)
        if isinstance(stream, ResumableBatchStream) and stream.start_batch != self.start_iter:
            stream.skip_to(self.start_iter)
            if hasattr(self._trainer, "_data_loader_iter_obj"):  # detectron2 main: lazy
                self._trainer._data_loader_iter_obj = None
            else:  # v0.6 created the iterator in SimpleTrainer.__init__
                self._trainer._data_loader_iter = iter(self._trainer.data_loader)
            logging.getLogger(__name__).info(
                "Training stream resumed at batch %d (seed %d)", self.start_iter, stream.seed
            )

    def state_dict(self):
        ret = super().state_dict()
        # detectron2 v0.6's DefaultTrainer leaves the optimizer (momentum) out of checkpoints;
        # upstream saves it as "_trainer"
        if "_trainer" not in ret:
            ret["_trainer"] = self._trainer.state_dict()
        ret["longtail_seed"] = int(self.cfg.SEED)
        return ret

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        seed = state_dict.pop("longtail_seed", state_dict.pop("longtail_data_seed", None))
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict and "state_dict" not in DefaultTrainer.__dict__:  # v0.6
            self._trainer.load_state_dict(state_dict["_trainer"])
        # The scheduler's state is restored, but the optimizer still holds the learning rate of
        # iteration 0 until the scheduler's next step: set the resumed iteration's rate now.
        if hasattr(self.scheduler, "get_lr"):
            for group, lr in zip(self._trainer.optimizer.param_groups, self.scheduler.get_lr()):
                group["lr"] = lr
        if seed is not None and int(seed) != self.cfg.SEED:
            # SEED < 0 drew a new seed for this run: continue the interrupted run's (data stream,
            # BAGS draws, memory draws)
            cfg = self.cfg.clone()
            cfg.defrost()
            cfg.SEED = int(seed)
            cfg.freeze()
            self.cfg = cfg
            self._trainer.data_loader = self.build_train_loader(cfg, self.train_dicts)
            set_model_seed(self._trainer.model, cfg.SEED)
            logging.getLogger(__name__).info("Resumed run: SEED %d of the interrupted run", cfg.SEED)

    @classmethod
    def build_model(cls, cfg):
        """Prepare the datasets (class metadata), build the model, apply decoupled training.
        Method keys that detectron2's ROI heads would ignore are refused first."""
        check_longtail_config(cfg)
        refuse_method_keys_without_longtail_heads(cfg)
        register_from_config(cfg)  # LONGTAIL.REGISTER_DATASETS (idempotent)
        prepare_datasets(
            list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), cfg.MODEL.ROI_HEADS.NUM_CLASSES
        )
        model = super().build_model(cfg)
        freeze_except(model, cfg.MODEL.LONGTAIL.TRAINABLE_PREFIXES)
        enable_topk_per_class(model, cfg.LONGTAIL.TEST_TOPK_PER_CLASS)  # 0: off
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's optimizer; ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` also works."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg, dataset=None):
        """
        The project sampler (``DATALOADER.SAMPLER_TRAIN``) feeding a resumable, deterministic
        batch stream (:mod:`longtail.data`) over ``dataset`` (default: :func:`load_train_dicts`).
        ``SEED < 0`` draws one seed shared by all processes (:func:`resolve_seed`).
        """
        if dataset is None:
            dataset = load_train_dicts(cfg)
        cfg = resolve_seed(cfg)
        sampler = build_train_sampler(cfg, dataset)
        return build_resumable_loader(
            dataset, DatasetMapper(cfg, True), sampler, cfg.SOLVER.IMS_PER_BATCH, cfg.SEED,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            skip_bad_images=cfg.LONGTAIL.SKIP_BAD_IMAGES,
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """
        detectron2's evaluation, leaving this process's random generators (torch, CUDA, numpy,
        Python) as it found them: creating the test loader alone draws from torch's generator,
        so an evaluation during training would change every later random draw (RPN and ROI
        sampling, augmentations), and a run resumed from the checkpoint just before it (which
        does not repeat it) would train differently from the uninterrupted run.
        """
        state = rng_state()
        try:
            return super().test(cfg, model, evaluators)
        finally:
            set_rng_state(state)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "lvis":
            return DatasetEvaluators([build_lvis_evaluator(cfg, dataset_name, output_folder)])
        raise ValueError(
            f"Dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; the long-tail "
            "project evaluates LVIS-type datasets only (evaluator_type 'lvis')."
        )

