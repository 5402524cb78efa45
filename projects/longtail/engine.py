"""``Trainer``: detectron2's ``DefaultTrainer`` with the project's data and evaluation plumbing.

Differences from ``DefaultTrainer``:

* before the model is built, :func:`longtail.datasets.prepare_datasets` checks the datasets,
  generates the synthetic one if needed and attaches the class statistics the methods use;
  after it is built, ``MODEL.LONGTAIL.TRAINABLE_PREFIXES`` freezes the rest (decoupled
  training, :mod:`longtail.freeze`);
* the training sampler comes from :data:`longtail.samplers.SAMPLER_REGISTRY`
  (``DATALOADER.SAMPLER_TRAIN``);
* ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` clips the norm of all gradients together
  (MMDetection's ``grad_clip``, used by BAGS), see :mod:`longtail.solver`;
* datasets with ``evaluator_type == "lvis"`` are evaluated with the LVIS evaluator;
* on CPU, DistributedDataParallel is created without ``device_ids`` (detectron2's
  ``create_ddp_model`` passes the local rank as a CUDA device id, which is wrong for CPU modules).
"""
import logging
import os
import weakref

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.data.build import get_detection_dataset_dicts
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import DatasetEvaluators, LVISEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .datasets import prepare_datasets
from .freeze import freeze_except
from .samplers import build_train_sampler
from .solver import build_optimizer

__all__ = ["Trainer", "wrap_ddp"]


def wrap_ddp(model, device: str):
    """DistributedDataParallel when there are several processes; CPU models get no device_ids."""
    if comm.get_world_size() == 1:
        return model
    if str(device).startswith("cuda"):
        return create_ddp_model(model, broadcast_buffers=False)
    return create_ddp_model(model, broadcast_buffers=False, device_ids=None)


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
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = wrap_ddp(model, cfg.MODEL.DEVICE)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """Prepare the datasets (class metadata), build the model, apply decoupled training."""
        prepare_datasets(
            list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), cfg.MODEL.ROI_HEADS.NUM_CLASSES
        )
        model = super().build_model(cfg)
        freeze_except(model, cfg.MODEL.LONGTAIL.TRAINABLE_PREFIXES)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's optimizer; ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` also works."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        sampler = build_train_sampler(cfg, dataset)
        return build_detection_train_loader(
            cfg, mapper=DatasetMapper(cfg, True), dataset=dataset, sampler=sampler
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "lvis":
            return DatasetEvaluators([LVISEvaluator(dataset_name, output_dir=output_folder)])
        raise ValueError(
            f"Dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; the long-tail "
            "project evaluates LVIS-type datasets only (evaluator_type 'lvis')."
        )

