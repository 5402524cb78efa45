"""Training samplers, selected by ``DATALOADER.SAMPLER_TRAIN`` from :data:`SAMPLER_REGISTRY`.

The repeat-factor math of the LVIS paper (Gupta et al., 2019, Sec. 4.1) lives in pure tensor
functions; the index streams come from detectron2's own samplers, which already implement the
per-epoch stochastic rounding, the shuffling and the sharding over ranks:

* the full index stream depends only on the seed, and rank ``r`` of ``W`` takes the elements
  ``r, r + W, r + 2W, ...`` of it, so for a given seed every rank sees a shard of the same stream;
* ``cfg.SEED >= 0`` seeds the stream; ``cfg.SEED < 0`` draws one seed that all ranks share
  (detectron2's ``shared_random_seed``).
"""
import logging
from typing import Dict, List, Sequence

import torch
from detectron2.data import samplers as d2_samplers
from detectron2.utils.registry import Registry

from . import vgpu

__all__ = [
    "SAMPLER_REGISTRY",
    "build_train_sampler",
    "class_balanced_lists",
    "ClassBalancedStream",
    "category_repeat_factors",
    "image_repeat_factors",
    "repeat_factors_from_dataset",
]

logger = logging.getLogger(__name__)

SAMPLER_REGISTRY = Registry("LONGTAIL_SAMPLER")
SAMPLER_REGISTRY.__doc__ = """
Registry of training samplers. A registered object is called as ``obj(cfg, dataset_dicts)`` and
returns a ``torch.utils.data.Sampler`` yielding an infinite stream of indices into
``dataset_dicts`` (this process's shard of it).
"""


def category_repeat_factors(
    image_count: torch.Tensor, num_images: int, threshold: float, sqrt: bool = True
) -> torch.Tensor:
    """
    Per-category repeat factors of repeat-factor sampling.

    Args:
        image_count: [C] number of training images that contain each category.
        num_images: number of training images N (the denominator of the frequency f(c)).
        threshold: t; categories with f(c) = image_count / N below t are repeated.
        sqrt: r(c) = max(1, sqrt(t / f(c))) when True (LVIS), max(1, t / f(c)) when False.

    Returns:
        [C] float64 tensor r(c) >= 1; categories in no image get 1.
    """
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if threshold <= 0:
        raise ValueError(f"DATALOADER.REPEAT_THRESHOLD must be positive, got {threshold}")
    freq = image_count.to(torch.float64) / num_images
    ratio = threshold / freq.clamp(min=torch.finfo(torch.float64).tiny)
    factor = ratio.sqrt() if sqrt else ratio
    factor = factor.clamp(min=1.0)
    return torch.where(image_count > 0, factor, torch.ones_like(factor))


def image_repeat_factors(
    category_factors: torch.Tensor,
    image_index: torch.Tensor,
    category_index: torch.Tensor,
    num_images: int,
) -> torch.Tensor:
    """
    Image repeat factors r(I) = max over the categories c present in I of r(c); 1 for images
    without annotations.

    Args:
        category_factors: [C] r(c).
        image_index, category_index: [K] int64, the (image, category) pairs present (duplicates
            allowed).
        num_images: N.

    Returns:
        [N] float64 tensor.
    """
    out = torch.ones(num_images, dtype=torch.float64)
    return out.scatter_reduce(
        0, image_index, category_factors.to(torch.float64)[category_index], reduce="amax"
    )


def _image_category_pairs(dataset_dicts: Sequence[Dict]):
    image_index: List[int] = []
    category_index: List[int] = []
    for i, record in enumerate(dataset_dicts):
        cats = {ann["category_id"] for ann in record.get("annotations", [])}
        image_index.extend([i] * len(cats))
        category_index.extend(cats)
    return (
        torch.tensor(image_index, dtype=torch.int64),
        torch.tensor(category_index, dtype=torch.int64),
    )


def repeat_factors_from_dataset(
    dataset_dicts: Sequence[Dict], threshold: float, sqrt: bool = True
) -> torch.Tensor:
    """
    Image repeat factors [N] for detectron2 dataset dicts (contiguous ``category_id``), with
    f(c) = fraction of these images that contain c.
    """
    image_index, category_index = _image_category_pairs(dataset_dicts)
    num_images = len(dataset_dicts)
    num_categories = int(category_index.max()) + 1 if category_index.numel() else 0
    image_count = torch.bincount(category_index, minlength=num_categories)
    cat_factors = category_repeat_factors(image_count, num_images, threshold, sqrt)
    return image_repeat_factors(cat_factors, image_index, category_index, num_images)


def _seed(cfg):
    return cfg.SEED if cfg.SEED >= 0 else None


@SAMPLER_REGISTRY.register()
def TrainingSampler(cfg, dataset_dicts):
    """Uniform sampling: every image once per epoch, shuffled (detectron2's TrainingSampler)."""
    return d2_samplers.TrainingSampler(len(dataset_dicts), seed=_seed(cfg))


@SAMPLER_REGISTRY.register()
def RepeatFactorTrainingSampler(cfg, dataset_dicts):
    """
    Repeat-factor sampling (LVIS): image I appears floor(r(I)) + Bernoulli(frac(r(I))) times per
    epoch, with threshold ``DATALOADER.REPEAT_THRESHOLD`` and ``DATALOADER.REPEAT_SQRT``.
    """
    factors = repeat_factors_from_dataset(
        dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, cfg.DATALOADER.REPEAT_SQRT
    )
    logger.info(
        "Repeat-factor sampling: t=%g sqrt=%s, %d of %d images repeated, %.1f draws per epoch",
        cfg.DATALOADER.REPEAT_THRESHOLD,
        cfg.DATALOADER.REPEAT_SQRT,
        int((factors > 1).sum()),
        len(factors),
        float(factors.sum()),
    )
    return d2_samplers.RepeatFactorTrainingSampler(factors.float(), seed=_seed(cfg))


def class_balanced_lists(
    dataset_dicts: Sequence[Dict], images_per_class: int, num_vgpus: int
) -> List[List[int]]:
    """
    LOCE's class-balanced image lists (the official code's
    ``DistributedBalancedSampler``).

    For every category (ascending contiguous id) the images containing it are listed in dataset
    order, the list is tiled by repetition to length ``images_per_class * num_vgpus``, and VGPU
    ``r`` takes its elements ``r, r + W, r + 2W, ...``: ``images_per_class`` images of that
    category. A VGPU's list is the concatenation over categories (no shuffle). Images without
    annotations are never listed (a fix: the official code files them under
    the key ``len(CLASSES)``, which collides with the last category id); categories without
    images are skipped.

    Returns:
        list of ``num_vgpus`` equally long lists of indices into ``dataset_dicts``.
    """
    if images_per_class < 1 or num_vgpus < 1:
        raise ValueError(
            f"images per class ({images_per_class}) and VGPUs ({num_vgpus}) must be >= 1"
        )
    image_index, category_index = _image_category_pairs(dataset_dicts)
    if category_index.numel() == 0:
        raise ValueError("class-balanced sampling needs annotated training images")
    # (category, image) pairs in category order, then dataset order
    order = torch.argsort(category_index * (len(dataset_dicts) + 1) + image_index)
    cats, imgs = category_index[order], image_index[order]
    num_cats = int(cats.max()) + 1
    counts = torch.zeros(num_cats, dtype=torch.long).index_add_(0, cats, torch.ones_like(cats))
    starts = counts.cumsum(0) - counts
    present = torch.nonzero(counts > 0).flatten()
    length = images_per_class * num_vgpus
    # position j of the tiled list of category c is image imgs[starts[c] + j % counts[c]]
    j = torch.arange(length)
    tiled = imgs[starts[present][:, None] + j[None, :] % counts[present][:, None]]  # [C', W*k]
    per_vgpu = tiled.view(len(present), images_per_class, num_vgpus)  # element (c, i, r)
    return [per_vgpu[:, :, r].reshape(-1).tolist() for r in range(num_vgpus)]


class ClassBalancedStream(torch.utils.data.Sampler):
    """
    Index stream of one process built from per-VGPU lists: for each step, the next
    ``ims_per_vgpu`` indices of each of the process's VGPUs, in VGPU order (so image ``i`` of a
    process batch belongs to VGPU ``i // ims_per_vgpu``, the chunking the predictor uses). A list
    whose length is not a multiple of ``ims_per_vgpu`` is padded with its own first elements.
    ``repeat=True`` cycles for ever (a training sampler), else one pass.
    """

    def __init__(self, vgpu_lists: Sequence[Sequence[int]], ims_per_vgpu: int, repeat: bool):
        self.lists = [list(x) for x in vgpu_lists]
        self.ims_per_vgpu = ims_per_vgpu
        self.repeat = repeat
        n = len(self.lists[0])
        self.steps = (n + ims_per_vgpu - 1) // ims_per_vgpu
        padded = self.steps * ims_per_vgpu
        self.lists = [(x * (padded // max(len(x), 1) + 1))[:padded] for x in self.lists]

    def __len__(self) -> int:
        return self.steps * self.ims_per_vgpu * len(self.lists)

    def _one_pass(self):
        k = self.ims_per_vgpu
        for s in range(self.steps):
            for lst in self.lists:
                yield from lst[s * k: (s + 1) * k]

    def __iter__(self):
        while True:
            yield from self._one_pass()
            if not self.repeat:
                return


def process_vgpus(cfg):
    """(VGPUs of this process, images per VGPU, all VGPUs) from the batch layout."""
    from detectron2.utils import comm

    world, rank = comm.get_world_size(), comm.get_rank()
    ims = cfg.SOLVER.IMS_PER_BATCH // world
    per = vgpu.images_per_chunk(ims, cfg.MODEL.LONGTAIL.IMS_PER_VGPU)
    banks = vgpu.num_chunks(ims, cfg.MODEL.LONGTAIL.IMS_PER_VGPU)
    return list(range(rank * banks, (rank + 1) * banks)), per, world * banks


def check_batch_layout(cfg, world_size: int) -> None:
    """
    Warn, loudly and with the numbers, when a process holds fewer images than
    ``MODEL.LONGTAIL.IMS_PER_VGPU`` (or not a multiple of it): its VGPU chunks are then smaller
    than the official per-GPU batch, which changes the method (RIO's 4-image memory banks and
    replay, the per-GPU loss normalisers, LOCE's per-GPU queues), and say which ``--num-gpus``
    reproduces the paper's layout.
    """
    per = cfg.MODEL.LONGTAIL.IMS_PER_VGPU
    ims = cfg.SOLVER.IMS_PER_BATCH // max(world_size, 1)
    if per <= 0 or ims % per == 0:
        return
    total = cfg.SOLVER.IMS_PER_BATCH
    fix = (
        f"run with --num-gpus {total // per} (or a SOLVER.IMS_PER_BATCH that is a multiple of "
        f"{per * world_size} on {world_size} process(es))"
        if total % per == 0 else f"use a SOLVER.IMS_PER_BATCH that is a multiple of {per * world_size}"
    )
    logger.warning(
        "Batch layout differs from the method's: SOLVER.IMS_PER_BATCH %d over %d process(es) is "
        "%d image(s) per process, not a multiple of MODEL.LONGTAIL.IMS_PER_VGPU %d, so a process "
        "forms chunks of %d image(s) instead of the official %d-image GPU batches (memory banks, "
        "replay and loss normalisers then see fewer images). To reproduce the paper's layout, %s.",
        total, world_size, ims, per, min(ims, per) if ims < per else ims % per, per, fix,
    )


def class_balanced_stream(cfg, dataset_dicts, images_per_class: int, repeat: bool):
    """This process's :class:`ClassBalancedStream` for the config's batch layout."""
    mine, per, total = process_vgpus(cfg)
    lists = class_balanced_lists(dataset_dicts, images_per_class, total)
    return ClassBalancedStream([lists[r] for r in mine], per, repeat)


@SAMPLER_REGISTRY.register()
def ClassBalancedSampler(cfg, dataset_dicts):
    """
    Class-balanced sampling (LOCE's initialisation pass, repeated): every category contributes
    ``MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS`` images per VGPU and cycle, categories in order.
    """
    return class_balanced_stream(
        cfg, dataset_dicts, cfg.MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS, repeat=True
    )


def registered_samplers() -> List[str]:
    return sorted(name for name, _ in SAMPLER_REGISTRY)


def build_train_sampler(cfg, dataset_dicts):
    """Build the sampler named by ``cfg.DATALOADER.SAMPLER_TRAIN`` for ``dataset_dicts``."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name not in SAMPLER_REGISTRY:
        raise KeyError(
            f"DATALOADER.SAMPLER_TRAIN={name!r} is not a registered training sampler. "
            f"Registered: {', '.join(registered_samplers())}. "
            "Add one with @longtail.samplers.SAMPLER_REGISTRY.register()."
        )
    logger.info("Using training sampler %s", name)
    return SAMPLER_REGISTRY.get(name)(cfg, dataset_dicts)
