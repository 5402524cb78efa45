"""A training data stream that a resumed run continues exactly where the interrupted one was.

detectron2's training loader restarts its sampler on every start, and the random augmentations
(resize, flip) of its worker processes depend on when the loader was created, so ``--resume``
replays the first batches again with other augmentations. :class:`ResumableBatchStream` makes the
stream a pure function of (seed, rank, batch index):

* the project sampler (``DATALOADER.SAMPLER_TRAIN``; seeded, sharded over ranks) gives the
  index stream; batches are formed from it at the *index* level, with detectron2's aspect-ratio
  grouping rule (landscape / portrait buckets, a batch is yielded when a bucket is full), from
  the ``width``/``height`` of the dataset dicts;
* image ``j`` of batch ``k`` is mapped with numpy's and Python's random generators seeded by
  ``(seed, rank, k, j)`` (detectron2's augmentations draw from them), the generators' previous
  state being restored afterwards;
* :meth:`ResumableBatchStream.skip_to` starts the stream at batch ``k`` by replaying only the
  index stream (no image is read), so a run resumed at iteration ``k`` receives the batch ``k`` of
  the uninterrupted run;
* data-loader workers take every ``W``-th batch and PyTorch's loader returns them in order, so the
  number of workers does not change the stream.

Bad images: a missing or unreadable image file raises an error naming the file
(``LONGTAIL.SKIP_BAD_IMAGES False``, the default) or, with ``True``, is replaced by the next
readable record of the dataset with the same orientation (index order, wrapping around), mapped
with the augmentation seed of the slot it fills (:func:`replacement_candidates`): deterministic,
identical in a resumed run, and a batch always has its full size. The replacement is logged (once
per file and process) and marked in its record (``REPLACED_KEY``), which
:func:`count_replaced_images` turns into the metric ``data/replaced_images``.
:func:`check_image_files` finds missing files at load time instead (``LONGTAIL.CHECK_IMAGES``).
"""
import logging
import os
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import IterableDataset, get_worker_info

__all__ = [
    "ResumableBatchStream",
    "aspect_ratio_batches",
    "item_seed",
    "build_resumable_loader",
    "replacement_candidates",
    "map_or_replace",
    "ReplacingMapDataset",
    "check_image_files",
    "count_replaced_images",
    "REPLACED_KEY",
]

# key of a mapped record that replaces an unreadable image (value: the unreadable file's path)
REPLACED_KEY = "longtail_replaces"

logger = logging.getLogger(__name__)


def item_seed(seed: int, rank: int, batch: int, position: int) -> int:
    """Seed of the augmentations of image ``position`` of batch ``batch`` on ``rank``."""
    key = (((seed * 1_000_003 + rank) * 1_000_033 + batch) * 1_009 + position)
    return key % (2**32 - 1)


# what PIL (through detectron2's read_image) raises for a missing or corrupt image file
UNREADABLE = (OSError, ValueError, SyntaxError)


def replacement_candidates(index: int, landscape: Sequence[bool]) -> Iterator[int]:
    """
    Dataset indices that may replace the unreadable record ``index``, lazily, in order: the
    following records with the same orientation (``landscape[i] == landscape[index]``), wrapping
    around, then the remaining ones (so that a dataset with a single readable image of the other
    orientation still gives a full batch). ``index`` itself is not included.
    """
    n = len(landscape)
    for same in (True, False):
        for step in range(1, n):
            i = (index + step) % n
            if (landscape[i] == landscape[index]) == same:
                yield i


def map_or_replace(index: int, try_map: Callable[[int], Optional[Dict]],
                   landscape: Sequence[bool]) -> Tuple[Dict, bool]:
    """
    ``(try_map(index), False)``; when that is None (unreadable image), ``(try_map(c), True)`` for
    the first candidate ``c`` of :func:`replacement_candidates` that is readable. RuntimeError
    when no image can be read.
    """
    mapped = try_map(index)
    if mapped is not None:
        return mapped, False
    for candidate in replacement_candidates(index, landscape):
        mapped = try_map(candidate)
        if mapped is not None:
            return mapped, True
    raise RuntimeError("No training image can be read; LONGTAIL.SKIP_BAD_IMAGES cannot replace "
                       "them. Check the dataset's image files.")


def _report_unreadable(reported: set, path: str, error: Exception, where: str) -> None:
    if path not in reported:  # once per file and process
        reported.add(path)
        logger.warning("%s: unreadable image %s (%s) replaced by the next readable one "
                       "(LONGTAIL.SKIP_BAD_IMAGES).", where, path, error)


class ReplacingMapDataset(torch.utils.data.Dataset):
    """
    ``dataset_dicts`` mapped by ``mapper`` (map-style), an unreadable image replaced as in the
    training stream (:func:`map_or_replace`, logged once per file): LOCE's MFS initialisation
    pass with ``LONGTAIL.SKIP_BAD_IMAGES True``, which detectron2's ``MapDataset`` fallback
    cannot serve (v0.6's draws from a set, an error on Python >= 3.11).
    """

    def __init__(self, dataset_dicts: List[Dict], mapper: Callable, where: str):
        self.dataset = DatasetFromList(dataset_dicts, copy=False)
        self.landscape = [d.get("width", 1) > d.get("height", 1) for d in dataset_dicts]
        self.mapper = mapper
        self.where = where
        self.reported: set = set()

    def __len__(self):
        return len(self.dataset)

    def _try(self, index: int) -> Optional[Dict]:
        record = self.dataset[index]
        try:
            return self.mapper(record)
        except UNREADABLE as e:
            _report_unreadable(self.reported, record.get("file_name", f"index {index}"), e,
                               self.where)
            return None

    def __getitem__(self, index: int) -> Dict:
        return map_or_replace(index, self._try, self.landscape)[0]


def check_image_files(records: Sequence[Dict], dataset: str, skip_bad_images: bool,
                      max_images: int, role: str = "training") -> List[str]:
    """
    Check that the ``file_name`` of every record exists. Missing files raise one
    FileNotFoundError listing them (the first 20 and the count), or, with ``skip_bad_images``,
    are logged as a warning (the stream replaces them when drawn). Datasets with more than
    ``max_images`` records (``> 0``) are not checked (logged). Returns the missing paths.
    ``role`` ("training", "evaluation") names the images in the messages.
    """
    if max_images > 0 and len(records) > max_images:
        logger.info(
            "Not checking the %d image files of %s (LONGTAIL.CHECK_IMAGES_MAX_IMAGES %d).",
            len(records), dataset, max_images,
        )
        return []
    files = {r["file_name"] for r in records}
    missing = sorted(f for f in files if not os.path.isfile(f))
    if not missing:
        return missing
    listed = ", ".join(missing[:20]) + (f" (and {len(missing) - 20} more)" if len(missing) > 20
                                        else "")
    if len(missing) == len(files):
        raise FileNotFoundError(
            f"None of the {len(records)} {role} images of {dataset} exists (first: "
            f"{missing[0]}); check the dataset's image root (DETECTRON2_DATASETS, or the image_root of its "
            "LONGTAIL.REGISTER_DATASETS entry)."
        )
    if skip_bad_images:
        logger.warning(
            "%d training image file(s) of %s are missing; LONGTAIL.SKIP_BAD_IMAGES replaces them "
            "when they are drawn: %s", len(missing), dataset, listed,
        )
        return missing
    raise FileNotFoundError(
        f"{len(missing)} {role} image file(s) of {dataset} are missing: {listed}. Restore them, "
        "remove their records from the dataset"
        + (", or set LONGTAIL.SKIP_BAD_IMAGES True to replace them by other images when drawn "
           "(LONGTAIL.CHECK_IMAGES False skips this check)." if role == "training" else ".")
    )


def count_replaced_images(model) -> None:
    """
    A forward pre-hook on ``model`` (training mode) that adds the batch's replaced images
    (records carrying :data:`REPLACED_KEY`) to a per-process total and writes it as the scalar
    ``data/replaced_images`` of the current event storage. A loop over the batch's (few) records
    on the host: no tensor is touched.
    """
    from detectron2.utils.events import get_event_storage

    total = [0]

    def hook(module, inputs):
        if not module.training or not inputs or not isinstance(inputs[0], (list, tuple)):
            return
        total[0] += sum(1 for d in inputs[0] if isinstance(d, dict) and REPLACED_KEY in d)
        try:
            get_event_storage().put_scalar("data/replaced_images", total[0], smoothing_hint=False)
        except AssertionError:  # no storage (outside a trainer)
            pass

    model.register_forward_pre_hook(hook)


def aspect_ratio_batches(
    indices: Iterator[int], landscape: Sequence[bool], batch_size: int, grouping: bool = True
) -> Iterator[List[int]]:
    """
    Batches of dataset indices: with ``grouping``, detectron2's ``AspectRatioGroupedDataset``
    rule (two buckets, width > height or not; a batch is the first full bucket); else consecutive
    chunks of the stream.
    """
    if not grouping:
        batch: List[int] = []
        for idx in indices:
            batch.append(idx)
            if len(batch) == batch_size:
                yield batch
                batch = []
        return
    buckets: List[List[int]] = [[], []]
    for idx in indices:
        bucket = buckets[0 if landscape[idx] else 1]
        bucket.append(idx)
        if len(bucket) == batch_size:
            yield list(bucket)
            del bucket[:]


class ResumableBatchStream(IterableDataset):
    """Iterable of mapped batches, deterministic per (seed, rank, batch); see module docstring."""

    def __init__(
        self,
        dataset_dicts: List[Dict],
        mapper: Callable,
        sampler: torch.utils.data.Sampler,
        batch_size: int,
        seed: int,
        aspect_ratio_grouping: bool = True,
        skip_bad_images: bool = False,
    ):
        self.landscape = np.array(
            [d.get("width", 1) > d.get("height", 1) for d in dataset_dicts], dtype=bool
        )
        self.dataset = DatasetFromList(dataset_dicts, copy=False, serialize=True)
        self.mapper = mapper
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = seed
        self.rank = comm.get_rank()
        self.grouping = aspect_ratio_grouping
        self.skip_bad_images = skip_bad_images
        self.start_batch = 0
        self._reported = set()  # unreadable files already logged by this process

    def skip_to(self, batch: int) -> None:
        """Start at batch ``batch`` of the stream (the iteration a resumed run starts from)."""
        self.start_batch = int(batch)

    def index_batches(self) -> Iterator[List[int]]:
        """The stream's batches of dataset indices, from batch 0."""
        return aspect_ratio_batches(iter(self.sampler), self.landscape, self.batch_size, self.grouping)

    def _map(self, index: int, batch: int, position: int) -> Optional[Dict]:
        """Record ``index`` mapped with the seed of (batch, position); None if unreadable and
        ``skip_bad_images`` (else an error naming the file)."""
        np_state, py_state = np.random.get_state(), random.getstate()
        s = item_seed(self.seed, self.rank, batch, position)
        np.random.seed(s)
        random.seed(s)
        record = self.dataset[index]
        try:
            return self.mapper(record)
        except UNREADABLE as e:
            path = record.get("file_name", f"index {index}")
            if not self.skip_bad_images:
                msg = (
                    f"Cannot read training image {path}: {e}. Fix or remove the file, or set "
                    "LONGTAIL.SKIP_BAD_IMAGES True to replace unreadable images by other ones."
                )
                try:
                    err = type(e)(msg)
                except Exception:  # an exception type with another constructor
                    err = RuntimeError(msg)
                raise err from e
            _report_unreadable(self._reported, path, e, "Training stream")
            return None
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)

    def _map_or_replace(self, index: int, batch: int, position: int) -> Dict:
        mapped, replaced = map_or_replace(
            index, lambda i: self._map(i, batch, position), self.landscape)
        if replaced:
            mapped[REPLACED_KEY] = self.dataset[index].get("file_name", f"index {index}")
        return mapped

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, indices in enumerate(self.index_batches()):
            if k < self.start_batch or (k - self.start_batch) % workers != worker:
                continue
            yield [self._map_or_replace(i, k, j) for j, i in enumerate(indices)]


def build_resumable_loader(
    dataset_dicts: List[Dict],
    mapper: Callable,
    sampler: torch.utils.data.Sampler,
    total_batch_size: int,
    seed: int,
    num_workers: int = 0,
    aspect_ratio_grouping: bool = True,
    skip_bad_images: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a :class:`ResumableBatchStream` (``loader.dataset`` is the stream)."""
    world = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={total_batch_size} must be a positive multiple of the number "
            f"of processes ({world})."
        )
    stream = ResumableBatchStream(
        dataset_dicts, mapper, sampler, total_batch_size // world, seed,
        aspect_ratio_grouping, skip_bad_images,
    )
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, collate_fn=_identity,
        # creating an iterator draws a base seed; from its own generator, not the global one the
        # model samples proposals with (a resumed run recreates the iterator after restoring it)
        generator=torch.Generator().manual_seed(seed),
    )


def _identity(batch):
    return batch
