"""Config keys of the ``longtail`` project.

Call :func:`add_longtail_config` on a detectron2 ``CfgNode`` before merging a project config file.
Every key is declared here with its default and the reason it exists; keys that upstream detectron2
already has on its main branch but v0.6 lacks are declared only when missing, with the same default
as upstream, so configs behave identically on both versions.
"""
from detectron2.config import CfgNode as CN


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
    # Classification loss of the box predictor: "softmax_ce" (detectron2's), "ebl" (LOCE's
    # Equilibrium Loss) or "bags" (balanced group softmax; C + 2 + G logits).
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

    # LOCE Equilibrium Loss (used when MODEL.LONGTAIL.CLS_LOSS == "ebl").
    _C.MODEL.LOCE = CN()
    # EMA decay per entry: m_c <- alpha^n m_c + (1 - alpha^n) * mean of the n entries.
    _C.MODEL.LOCE.ALPHA = 0.9
    # Constant mean score of the background class (index C).
    _C.MODEL.LOCE.BG_SCORE = 0.01
    # Initial mean score of every class.
    _C.MODEL.LOCE.INIT_SCORE = 0.01

    # BAGS balanced group softmax (used when MODEL.LONGTAIL.CLS_LOSS == "bags").
    _C.MODEL.BAGS = CN()
    # Groups by training instance count: [0, e0), [e0, e1), ..., [e_last, inf); empty bins are
    # dropped. Group 0 (background vs foreground) is always added.
    _C.MODEL.BAGS.BIN_EDGES = [10, 100, 1000]
    # "Others" drawn per group: floor(ratio * number of the group's positive RoIs).
    _C.MODEL.BAGS.OTHERS_SAMPLE_RATIO = 8.0
    # Std of the normal init of the (fresh) C + 2 + G classifier; bias 0.
    _C.MODEL.BAGS.CLS_INIT_STD = 0.01

    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE (detectron2's key) also accepts "full_model" here: clip the
    # L2 norm of all gradients together at CLIP_VALUE (MMDetection's grad_clip; BAGS uses 35).

    _C.LONGTAIL = CN()
    # Number of torch intra-op threads per process; 0 leaves torch's default. On CPU, running N
    # processes on C cores wants C // N threads each (train_net.py sets this when 0 and no GPU).
    _C.LONGTAIL.NUM_THREADS = 0
    return _C
