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

    _C.LONGTAIL = CN()
    # Number of torch intra-op threads per process; 0 leaves torch's default. On CPU, running N
    # processes on C cores wants C // N threads each (train_net.py sets this when 0 and no GPU).
    _C.LONGTAIL.NUM_THREADS = 0
    return _C
