"""Initial and evaluated weights that cannot be what the user meant are refused, with the fix.

* :func:`check_initial_weights`: ``MODEL.WEIGHTS`` that is a local path and does not exist (a
  stage 2 whose stage 1 has not run, a typo) fails before data and model are built, naming the
  project config whose ``OUTPUT_DIR`` would produce it. detectron2 fails later with
  ``AssertionError: Checkpoint ... not found!``.
* :class:`EvalCheckpointer` / :func:`load_weights_for_evaluation` (``train_net.py --eval-only``):
  no ``MODEL.WEIGHTS`` at all, or weights without the ROI heads' parameters (an ImageNet backbone,
  a checkpoint of another class count), would evaluate a randomly initialised head. Refused unless
  ``LONGTAIL.EVAL.ALLOW_UNTRAINED_HEADS True``.
"""
import glob
import logging
import os
from typing import List, Optional

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["EvalCheckpointer", "check_initial_weights", "configs_writing",
           "load_weights_for_evaluation"]

logger = logging.getLogger(__name__)

# the repository's configs/ (projects/longtail/weights.py -> the repository root)
CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
# parameters an evaluated model must have loaded
HEAD_PREFIXES = ("roi_heads.box_predictor.",)


def _is_local(path: str) -> bool:
    return bool(path) and "://" not in path


def configs_writing(directory: str, config_root: str = CONFIG_ROOT) -> List[str]:
    """Project configs (paths relative to the repository) whose ``OUTPUT_DIR`` is
    ``directory``."""
    from detectron2.config import get_cfg

    from .config import add_longtail_config

    found = []
    target = os.path.normpath(directory)
    for path in sorted(glob.glob(os.path.join(config_root, "**", "*.yaml"), recursive=True)):
        cfg = add_longtail_config(get_cfg())
        try:
            cfg.merge_from_file(path)
        except Exception:  # noqa: BLE001 - a base file or a broken config: not a candidate
            continue
        if os.path.normpath(cfg.OUTPUT_DIR) == target:
            found.append(os.path.relpath(path, os.path.dirname(config_root)))
    return found


def check_initial_weights(cfg, resume: bool = False) -> None:
    """Refuse a local ``MODEL.WEIGHTS`` that does not exist, naming the config producing it
    (nothing to check when ``resume`` and ``OUTPUT_DIR`` has a checkpoint: it is loaded
    instead)."""
    if resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    path = cfg.MODEL.WEIGHTS
    if not _is_local(path) or os.path.isfile(path):
        return
    producers = configs_writing(os.path.dirname(path))
    hint = (f" It is the final model of {' / '.join(producers)}: train that first "
            f"(python train_net.py --config-file {producers[0]} ...), or"
            if producers else " Train the model it names first, or")
    raise FileNotFoundError(
        f"MODEL.WEIGHTS {path!r} does not exist.{hint} set MODEL.WEIGHTS to the checkpoint to "
        "start from ('' for random initialisation)."
    )


class EvalCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that remembers which model parameters the loaded file lacked
    (``missing``), as detectron2 logs them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.missing: Optional[List[str]] = None

    def _log_incompatible_keys(self, incompatible) -> None:
        self.missing = list(incompatible.missing_keys)
        super()._log_incompatible_keys(incompatible)


def load_weights_for_evaluation(cfg, model, resume: bool = False) -> None:
    """Load ``MODEL.WEIGHTS`` (or the last checkpoint with ``resume``) into ``model`` for
    ``--eval-only``; refuse no weights, or weights without the box predictor, unless
    ``LONGTAIL.EVAL.ALLOW_UNTRAINED_HEADS``."""
    allow = cfg.LONGTAIL.EVAL.ALLOW_UNTRAINED_HEADS
    checkpointer = EvalCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    if not allow and not (resume and checkpointer.has_checkpoint()):
        if not cfg.MODEL.WEIGHTS:
            raise ValueError(
                "--eval-only without MODEL.WEIGHTS would evaluate a randomly initialised model. "
                "Pass MODEL.WEIGHTS <OUTPUT_DIR>/model_final.pth of a trained run (or set "
                "LONGTAIL.EVAL.ALLOW_UNTRAINED_HEADS True to evaluate it anyway)."
            )
        check_initial_weights(cfg)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    untrained = [k for k in checkpointer.missing or [] if k.startswith(HEAD_PREFIXES)]
    if untrained and not allow:
        raise ValueError(
            f"--eval-only: the weights {cfg.MODEL.WEIGHTS!r} hold no {untrained[0]} (nor "
            f"{len(untrained) - 1} more box-predictor tensors of this config): the classifier "
            "would be random. Evaluate a checkpoint trained with this config and "
            f"MODEL.ROI_HEADS.NUM_CLASSES {cfg.MODEL.ROI_HEADS.NUM_CLASSES} (or set "
            "LONGTAIL.EVAL.ALLOW_UNTRAINED_HEADS True)."
        )
    if untrained:
        logger.warning("--eval-only with an untrained box predictor (%d tensors not in the "
                       "weights; LONGTAIL.EVAL.ALLOW_UNTRAINED_HEADS True).", len(untrained))
