"""Config keys of the ``longtail`` project.

Call :func:`add_longtail_config` on a detectron2 ``CfgNode`` before merging a project config file.
Every key is declared here with its default and the reason it exists; keys that upstream detectron2
already has on its main branch but v0.6 lacks are declared only when missing, with the same default
as upstream, so configs behave identically on both versions.
"""
from typing import Callable, Dict, Tuple

from detectron2.config import CfgNode as CN

__all__ = ["add_longtail_config", "check_longtail_config", "VALID", "RENAMED_KEYS"]


def add_longtail_config(cfg: CN) -> CN:
    """Declare the project's config keys (in place) and return ``cfg``."""
    _C = cfg

    # --- Data loading -------------------------------------------------------------------------
    # DATALOADER.SAMPLER_TRAIN selects a sampler from ``longtail.samplers.SAMPLER_REGISTRY``
    # (detectron2's own key). Registered: "TrainingSampler" (uniform over images) and
    # "RepeatFactorTrainingSampler" (LVIS repeat-factor sampling, threshold
    # DATALOADER.REPEAT_THRESHOLD, also a detectron2 key).
    if not hasattr(_C.DATALOADER, "REPEAT_SQRT"):
        # Repeat factor r(c) = max(1, sqrt(t / f(c))) when True (the LVIS paper's rule);
        # max(1, t / f(c)) when False. Upstream detectron2 has this key since 2022; v0.6 does not.
        _C.DATALOADER.REPEAT_SQRT = True

    # --- Model ---------------------------------------------------------------------------------
    # Scale s of the normed (scaled-cosine) mask predictor of NormedMaskRCNNConvUpsampleHead
    # (LOCE): logit_k(p) = s * cos(x(p), W_k) + b_k. The official LOCE FCNNormMaskHead uses 20.
    _C.MODEL.ROI_MASK_HEAD.COSINE_SCALE = 20.0

    # Long-tail box predictor (LongTailROIHeads / LongTailFastRCNNOutputLayers).
    _C.MODEL.LONGTAIL = CN()
    # Classification loss of the box predictor, a name in longtail.cls_losses.CLS_LOSS_REGISTRY:
    # "softmax_ce" (detectron2's), "ebl" (LOCE's Equilibrium Loss) or "bags" (balanced group
    # softmax; C + 2 + G logits).
    _C.MODEL.LONGTAIL.CLS_LOSS = "softmax_ce"
    # Images per emulated official GPU ("VGPU"): each chunk of this many images of a process
    # batch gets its own loss normalisers and random draws, and the process loss is the mean
    # over chunks (LOCE 2, BAGS 2, RIO 4 = the official images per GPU). 0: one chunk.
    _C.MODEL.LONGTAIL.IMS_PER_VGPU = 0
    # Decoupled training: parameter-name prefixes that stay trainable; every other parameter
    # gets requires_grad=False, is left out of the optimizer, and BatchNorm layers whose
    # parameters are all frozen become FrozenBatchNorm2d. Empty: everything trains.
    _C.MODEL.LONGTAIL.TRAINABLE_PREFIXES = []
    # Period (iterations) of logging the r/c/f group means of LOCE's mean scores (costs a sync).
    _C.MODEL.LONGTAIL.LOG_PERIOD = 20
    # Classifier layer of the box predictor, a name in longtail.layers.CLS_LAYER_REGISTRY:
    # "linear" (detectron2's) or "cosine" (RIO's scaled cosine classifier with a learnable
    # per-class norm, longtail.layers.CosineClassifier).
    _C.MODEL.LONGTAIL.CLS_LAYER = "linear"
    # Scale (temperature) of the "normed_linear" classifier layer (Seesaw's NormedLinear: 20).
    _C.MODEL.LONGTAIL.NORMED_LINEAR_SCALE = 20.0
    # Prior probability pi of the classifier bias -log((1 - pi) / pi) of the "sigmoid_ce" and
    # "fed_loss" losses (CenterNet2: 0.01); 0 keeps detectron2's bias 0 (its fed loss).
    _C.MODEL.LONGTAIL.SIGMOID_PRIOR_PROB = 0.0

    # Object memory (longtail.memory; wired in by LongTailROIHeads). One memory per VGPU chunk
    # of a process batch (MODEL.LONGTAIL.IMS_PER_VGPU), per process, never synchronised.
    _C.MODEL.MEMORY = CN()
    # "" (off) or a name in longtail.memory_policies.MEMORY_POLICY_REGISTRY: "rio" (RIO's
    # episodic replay of box-head features of cached classes) or "mfs" (LOCE's memory-augmented
    # feature sampling of jittered-gt RoIAlign features; needs EBL).
    _C.MODEL.MEMORY.POLICY = ""
    # Entries per class and bank (RIO MAX_CACHE 60, LOCE queue size 80).
    _C.MODEL.MEMORY.CAPACITY = 60
    # Storage dtype of the features: "float32", "float16", "bfloat16" or "int8" (per-row
    # symmetric quantisation with a float32 scale; a quarter of float32's memory).
    _C.MODEL.MEMORY.DTYPE = "float32"
    # Storage device: "" = the model's device; "cpu" keeps the memory in host RAM (official LOCE;
    # costs a device-to-host copy per push and a host-to-device copy per sample on GPUs).
    _C.MODEL.MEMORY.DEVICE = ""
    # Save each process's memory in its per-process state file beside every checkpoint
    # (OUTPUT_DIR/<checkpoint>.rank<R>.pth, which always holds the random generator states; the
    # previous one is removed) so a resumed run continues with the same memory. Costs the
    # memory's size on disk per process (logged at build time). False: a resumed run restarts
    # with an empty memory (the official behaviour).
    _C.MODEL.MEMORY.CHECKPOINT = True

    # RIO (Chang et al., ICML 2021): its cosine classifier (MODEL.LONGTAIL.CLS_LAYER "cosine")
    # and its replay (MODEL.MEMORY.POLICY "rio").
    _C.MODEL.RIO = CN()
    # Scale s of the cosine classifier (MODEL.LONGTAIL.CLS_LAYER "cosine"; RIO's TEMP_S).
    _C.MODEL.RIO.COSINE_SCALE = 48.0
    # Added to the feature norm of the cosine classifier (RIO: 1e-5).
    _C.MODEL.RIO.COSINE_EPS = 1e-5
    # Newest entries replayed per present cached class and step (RIO MIN_CACHE); 0: no replay.
    _C.MODEL.RIO.REPLAY_PER_CLASS = 20
    # Replay a uniform subset of the stored entries instead of the newest (RIO RANDOM_SELECT).
    _C.MODEL.RIO.RANDOM_SELECT = False
    # Cached classes: those with at most this many training images (RIO: 30; metadata
    # class_image_count of DATASETS.TRAIN).
    _C.MODEL.RIO.CACHE_MAX_IMAGE_COUNT = 30
    # Explicit cached class indices (0-based); non-empty overrides CACHE_MAX_IMAGE_COUNT.
    _C.MODEL.RIO.CACHED_CLASSES = []

    # LOCE (Feng et al., ICCV 2021): the Equilibrium Loss (MODEL.LONGTAIL.CLS_LOSS "ebl") and the
    # memory-augmented feature sampling (MODEL.MEMORY.POLICY "mfs").
    _C.MODEL.LOCE = CN()
    # EMA decay per entry: m_c <- alpha^n m_c + (1 - alpha^n) * mean of the n entries.
    _C.MODEL.LOCE.ALPHA = 0.9
    # Constant mean score of the background class (index C).
    _C.MODEL.LOCE.BG_SCORE = 0.01
    # Initial mean score of every class.
    _C.MODEL.LOCE.INIT_SCORE = 0.01
    # Memory-augmented feature sampling (MODEL.MEMORY.POLICY "mfs").
    _C.MODEL.LOCE.MFS = CN()
    # Jitter magnitude of the 16 boxes made from each gt box, as a fraction of its width/height.
    _C.MODEL.LOCE.MFS.JITTER_RATIO = 1.0 / 6.0
    # Classes drawn per bank and step, with replacement, with probability ~ 1 / (m_c + eps).
    _C.MODEL.LOCE.MFS.SAMPLED_NUM_CLASSES = 8
    # Entries drawn per drawn class, uniformly with replacement.
    _C.MODEL.LOCE.MFS.SAMPLED_NUM_FEATURES = 4
    # eps of the class-sampling weights 1 / (m_c + eps).
    _C.MODEL.LOCE.MFS.SCORE_EPS = 1e-7
    # Initialisation pass at the start of a run (iteration 0, not on resume): forward only over
    # this many class-balanced training images per class and bank (LOCE: 5), filling the memory
    # and warming the mean scores. 0: no pass.
    _C.MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS = 5

    # BAGS balanced group softmax (used when MODEL.LONGTAIL.CLS_LOSS == "bags").
    _C.MODEL.BAGS = CN()
    # Groups by training instance count: [0, e0), [e0, e1), ..., [e_last, inf); empty bins are
    # dropped. Group 0 (background vs foreground) is always added.
    _C.MODEL.BAGS.BIN_EDGES = [10, 100, 1000]
    # "Others" drawn per group: floor(ratio * number of the group's positive RoIs).
    _C.MODEL.BAGS.OTHERS_SAMPLE_RATIO = 8.0
    # Std of the normal init of the (fresh) C + 2 + G classifier; bias 0.
    _C.MODEL.BAGS.CLS_INIT_STD = 0.01

    # Seesaw Loss (MODEL.LONGTAIL.CLS_LOSS "seesaw"; Wang et al., CVPR 2021; C + 2 logits).
    _C.MODEL.SEESAW = CN()
    # Mitigation exponent p: factor (N_j / N_y)^p for classes with fewer cumulative samples
    # (0: off).
    _C.MODEL.SEESAW.P = 0.8
    # Compensation exponent q: factor (sigma_j / sigma_y)^q where a wrong class scores higher
    # (0: off).
    _C.MODEL.SEESAW.Q = 2.0
    # Lower clamp of the true-class score sigma_y in the compensation ratio.
    _C.MODEL.SEESAW.EPS = 0.01

    # EQLv2 (MODEL.LONGTAIL.CLS_LOSS "eqlv2"; Tan et al., CVPR 2021; C + 1 sigmoid logits).
    _C.MODEL.EQLV2 = CN()
    # Negative weight q_j = sigmoid(GAMMA * (g_j - MU)) of the gradient ratio g_j; positive
    # weight 1 + ALPHA * (1 - q_j).
    _C.MODEL.EQLV2.GAMMA = 12.0
    _C.MODEL.EQLV2.MU = 0.8
    _C.MODEL.EQLV2.ALPHA = 4.0
    # Inference: foreground sigmoid times (1 - background sigmoid), as the official code; False:
    # plain sigmoid.
    _C.MODEL.EQLV2.TEST_WITH_OBJ = True
    # Classifier bias at init: -log((1 - pi) / pi) on every column.
    _C.MODEL.EQLV2.PRIOR_PROB = 0.001

    # detectron2 main's sigmoid CE / federated loss switches of FastRCNNOutputLayers, declared
    # with upstream's defaults where missing (v0.6). With LongTailROIHeads they select
    # MODEL.LONGTAIL.CLS_LOSS "sigmoid_ce" / "fed_loss" (longtail.cls_losses.resolve_cls_loss;
    # refused if CLS_LOSS names another loss). FED_LOSS_NUM_CLASSES is K, the size of the class
    # set; FED_LOSS_FREQ_WEIGHT_POWER the exponent of the training image counts.
    for key, default in (("USE_SIGMOID_CE", False), ("USE_FED_LOSS", False),
                         ("FED_LOSS_NUM_CLASSES", 50), ("FED_LOSS_FREQ_WEIGHT_POWER", 0.5)):
        if not hasattr(_C.MODEL.ROI_BOX_HEAD, key):
            _C.MODEL.ROI_BOX_HEAD[key] = default

    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE (detectron2's key) also accepts "full_model" here: clip the
    # L2 norm of all gradients together at CLIP_VALUE (MMDetection's grad_clip; BAGS uses 35).

    _C.LONGTAIL = CN()
    # Datasets declared in the config (longtail.custom_datasets): a list of
    # [name, json_file, image_root] or [name, json_file, image_root, format] (format "auto",
    # "lvis" or "coco"), each registered under ``name`` for DATASETS.TRAIN / DATASETS.TEST before
    # the model is built; LVIS- and COCO-format instance jsons, evaluated under the LVIS protocol,
    # class statistics from the training json. Command line:
    # LONGTAIL.REGISTER_DATASETS "[('mine_train','train.json','images/')]".
    _C.LONGTAIL.REGISTER_DATASETS = []
    # A training image that cannot be read (missing, corrupt): False fails with its path; True
    # replaces it by the next readable training record of the same orientation (dataset order,
    # deterministic, the same in a resumed run), logs a warning naming both files and counts it
    # in the metric data/replaced_images (per process, cumulative). A batch is never short. The
    # same replacement serves LOCE's MFS initialisation pass.
    _C.LONGTAIL.SKIP_BAD_IMAGES = False
    # At load, check that every training image file exists (one stat per image), failing with one
    # message that lists the missing files (a warning instead with SKIP_BAD_IMAGES True) rather
    # than hours into the run when one is drawn. Skipped, with a log line, for datasets of more
    # than CHECK_IMAGES_MAX_IMAGES images (0: no limit); LVIS v1 train (100,170 images) is
    # checked by default.
    _C.LONGTAIL.CHECK_IMAGES = True
    _C.LONGTAIL.CHECK_IMAGES_MAX_IMAGES = 200000
    # Number of torch intra-op threads per process; 0 leaves torch's default. On CPU, running N
    # processes on C cores wants C // N threads each (train_net.py sets this when 0 and no GPU).
    _C.LONGTAIL.NUM_THREADS = 0

    # --- Evaluation -----------------------------------------------------------------------
    # LVIS evaluation (longtail.evaluation.LongTailLVISEvaluator), see README "Evaluation and
    # analysis".
    _C.LONGTAIL.EVAL = CN()
    # Library that computes LVIS AP: "auto" (the fastest installed one that reproduces the
    # official numbers: hotcoco, then faster_coco_eval, then lvis), "lvis" (the official
    # package), "faster_coco_eval" or "hotcoco".
    _C.LONGTAIL.EVAL.BACKEND = "auto"
    # Per-image cap of the standard LVIS AP (the official value is 300).
    _C.LONGTAIL.EVAL.MAX_DETS_PER_IMAGE = 300
    # Also report AP_fixed (Dave et al. 2021): top MAX_DETS_PER_CLASS detections per class over the
    # whole dataset, no per-image cap; keys AP_fixed, APr_fixed, APc_fixed, APf_fixed. Meaningful
    # with LONGTAIL.TEST_TOPK_PER_CLASS > 0 (otherwise the model's per-image cap limits it).
    _C.LONGTAIL.EVAL.FIXED_AP = False
    # Also report AP_pool (Dave et al. 2021; same detections as AP_fixed, precision/recall pooled
    # over the classes of all / r / c / f): keys AP_pool, APr_pool, APc_pool, APf_pool.
    _C.LONGTAIL.EVAL.POOLED_AP = False
    # Detections per class kept by AP_fixed and AP_pool (10,000 for LVIS).
    _C.LONGTAIL.EVAL.MAX_DETS_PER_CLASS = 10000
    # Write per_category_{bbox,segm}.{json,csv} and summary_by_frequency.{json,csv} to the
    # evaluator's output directory (OUTPUT_DIR/inference/<dataset>/).
    _C.LONGTAIL.EVAL.PER_CATEGORY = True
    # --eval-only refuses no MODEL.WEIGHTS, or weights that lack the box predictor (it would
    # evaluate a random classifier); True evaluates anyway, with a warning.
    _C.LONGTAIL.EVAL.ALLOW_UNTRAINED_HEADS = False
    # Top-k-per-class inference (longtail.inference): > 0 replaces the box predictor's inference
    # by class-wise NMS keeping, per image and class, the k best detections above
    # MODEL.ROI_HEADS.SCORE_THRESH_TEST, with no per-image cap (TEST.DETECTIONS_PER_IMAGE is
    # ignored). For AP_fixed / AP_pool; 0: detectron2's inference.
    _C.LONGTAIL.TEST_TOPK_PER_CLASS = 0

    # NorCal post-hoc calibration (longtail.norcal; Pan et al., NeurIPS 2021), the official
    # project's keys: foreground scores divided by N_c^GAMMA (N_c training images of class c) and
    # renormalised with the background, at inference only. GAMMA 0 = off (the default); METHOD
    # "gamma" or "cb" (class-balanced, beta = GAMMA); WITH "exps" (the paper's), "probs" or
    # "logits"; RENORM divides by the row sum. tools/calibrate.py sweeps GAMMA on training
    # images.
    _C.TEST.CALIBRATION = CN()
    _C.TEST.CALIBRATION.METHOD = "gamma"
    _C.TEST.CALIBRATION.WITH = "exps"
    _C.TEST.CALIBRATION.GAMMA = 0.0
    _C.TEST.CALIBRATION.RENORM = True
    # NorCal is defined for softmax classifiers; True also applies the "probs" form to the
    # [N, C + 1] scores of BAGS, Seesaw, EQLv2 and sigmoid/federated losses (an extension).
    _C.TEST.CALIBRATION.ALLOW_NON_SOFTMAX = False

    # Keys that moved into their method's node: a config that still uses one fails at merge
    # time with a message naming the new key (yacs's renamed keys).
    for old, new in RENAMED_KEYS.items():
        _C.register_renamed_key(old, new, message=f"the long-tail keys now follow the methods: "
                                                  f"use {new}")
    return _C


# key (or node) of earlier versions -> where it lives now
RENAMED_KEYS = {
    "MODEL.LONGTAIL.COSINE_SCALE": "MODEL.RIO.COSINE_SCALE",
    "MODEL.LONGTAIL.COSINE_EPS": "MODEL.RIO.COSINE_EPS",
    "MODEL.MEMORY.RIO": "MODEL.RIO (REPLAY_PER_CLASS, RANDOM_SELECT, CACHE_MAX_IMAGE_COUNT, "
                        "CACHED_CLASSES)",
    "MODEL.MEMORY.MFS": "MODEL.LOCE.MFS",
    **{f"MODEL.MEMORY.RIO.{k}": f"MODEL.RIO.{k}" for k in (
        "REPLAY_PER_CLASS", "RANDOM_SELECT", "CACHE_MAX_IMAGE_COUNT", "CACHED_CLASSES")},
    **{f"MODEL.MEMORY.MFS.{k}": f"MODEL.LOCE.MFS.{k}" for k in (
        "JITTER_RATIO", "SAMPLED_NUM_CLASSES", "SAMPLED_NUM_FEATURES", "SCORE_EPS",
        "INIT_IMAGES_PER_CLASS")},
}


def _choice(*options):
    return (lambda v: v in options), "one of " + ", ".join(repr(o) for o in options)


def _number(low=None, high=None, low_open=False, high_open=False, integer=False):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if integer and not isinstance(v, int):
            return False
        if low is not None and (v <= low if low_open else v < low):
            return False
        return not (high is not None and (v >= high if high_open else v > high))

    kind = "an integer" if integer else "a number"
    lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
    hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
    return ok, f"{kind} " + " and ".join(x for x in (lo, hi) if x)


def _registered(module: str, registry: str, allow_empty: bool = False):
    """A name of one of the project's registries (imported when checked: the registries live
    in modules that import detectron2's model code)."""

    def names():
        import importlib

        reg = getattr(importlib.import_module(f"longtail.{module}"), registry)
        return sorted(k for k, _ in reg)

    def ok(v):
        return (allow_empty and v == "") or v in names()

    def want():
        return "one of " + ", ".join(repr(n) for n in ([""] if allow_empty else []) + names())

    return ok, want


def _increasing_positive_ints(v):
    v = list(v)
    return (all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
            and all(a < b for a, b in zip(v, v[1:])))


def _device(v):
    return v in ("", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())


# key -> (check, what it must be). check_longtail_config refuses any other value at build time.
# Loss, classifier layer and memory policy: the names their registries hold.
VALID: Dict[str, Tuple[Callable[[object], bool], str]] = {
    "MODEL.ROI_MASK_HEAD.COSINE_SCALE": _number(0, low_open=True),
    "MODEL.LONGTAIL.CLS_LOSS": _registered("cls_losses", "CLS_LOSS_REGISTRY"),
    "MODEL.LONGTAIL.IMS_PER_VGPU": _number(0, integer=True),
    "MODEL.LONGTAIL.LOG_PERIOD": _number(1, integer=True),
    "MODEL.LONGTAIL.CLS_LAYER": _registered("layers", "CLS_LAYER_REGISTRY"),
    "MODEL.RIO.COSINE_SCALE": _number(0, low_open=True),
    "MODEL.LONGTAIL.NORMED_LINEAR_SCALE": _number(0, low_open=True),
    "MODEL.LONGTAIL.SIGMOID_PRIOR_PROB": _number(0, 1, high_open=True),
    "MODEL.SEESAW.P": _number(0),
    "MODEL.SEESAW.Q": _number(0),
    "MODEL.SEESAW.EPS": _number(0, 1, low_open=True),
    "MODEL.EQLV2.GAMMA": _number(0),
    "MODEL.EQLV2.MU": _number(),
    "MODEL.EQLV2.ALPHA": _number(0),
    "MODEL.EQLV2.PRIOR_PROB": _number(0, 1, low_open=True, high_open=True),
    "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": _number(1, integer=True),
    "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER": _number(0),
    "TEST.CALIBRATION.METHOD": _choice("gamma", "cb"),
    "TEST.CALIBRATION.WITH": _choice("exps", "probs", "logits"),
    "TEST.CALIBRATION.GAMMA": _number(0),
    "MODEL.RIO.COSINE_EPS": _number(0),
    "MODEL.MEMORY.POLICY": _registered("memory_policies", "MEMORY_POLICY_REGISTRY",
                                       allow_empty=True),
    "MODEL.MEMORY.CAPACITY": _number(1, integer=True),
    "MODEL.MEMORY.DTYPE": _choice("float32", "float16", "bfloat16", "int8"),
    "MODEL.MEMORY.DEVICE": (_device, "'', 'cpu', 'cuda' or 'cuda:N'"),
    "MODEL.RIO.REPLAY_PER_CLASS": _number(0, integer=True),
    "MODEL.RIO.CACHE_MAX_IMAGE_COUNT": _number(1, integer=True),
    "MODEL.RIO.CACHED_CLASSES": (
        lambda v: all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v),
        "a list of class indices >= 0"),
    "MODEL.LOCE.MFS.JITTER_RATIO": _number(0, 1, high_open=True),
    "MODEL.LOCE.MFS.SAMPLED_NUM_CLASSES": _number(1, integer=True),
    "MODEL.LOCE.MFS.SAMPLED_NUM_FEATURES": _number(1, integer=True),
    "MODEL.LOCE.MFS.SCORE_EPS": _number(0, low_open=True),
    "MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS": _number(0, integer=True),
    "MODEL.LOCE.ALPHA": _number(0, 1, high_open=True),
    "MODEL.LOCE.BG_SCORE": _number(0, 1, low_open=True),
    "MODEL.LOCE.INIT_SCORE": _number(0, 1, low_open=True),
    "MODEL.BAGS.BIN_EDGES": (_increasing_positive_ints,
                             "a strictly increasing list of positive instance counts"),
    "MODEL.BAGS.OTHERS_SAMPLE_RATIO": _number(0),
    "MODEL.BAGS.CLS_INIT_STD": _number(0, low_open=True),
    "LONGTAIL.NUM_THREADS": _number(0, integer=True),
    "LONGTAIL.CHECK_IMAGES_MAX_IMAGES": _number(0, integer=True),
    "LONGTAIL.EVAL.BACKEND": _choice("auto", "lvis", "faster_coco_eval", "hotcoco"),
    "LONGTAIL.EVAL.MAX_DETS_PER_IMAGE": _number(1, integer=True),
    "LONGTAIL.EVAL.MAX_DETS_PER_CLASS": _number(1, integer=True),
    "LONGTAIL.TEST_TOPK_PER_CLASS": _number(0, integer=True),
}


def check_longtail_config(cfg: CN) -> None:
    """
    Refuse values of the project's keys that no method can honour (:data:`VALID`: choices and
    numeric ranges), all at once, with each key, its value and what it must be. Called when the
    model is built (``longtail.Trainer.build_model``). Combinations of keys are checked where
    they are used (ROI heads, memories, predictor).
    """
    bad = []
    for key, (ok, want) in VALID.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        if not ok(node):
            bad.append(f"{key} {node!r} (must be {want() if callable(want) else want})")
    if bad:
        raise ValueError("Invalid long-tail configuration: " + "; ".join(bad) + ".")
