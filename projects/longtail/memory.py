"""Episodic per-class object memory: RIO's replay and LOCE's memory-augmented feature sampling.

RIO (Chang et al., ICML 2021) and LOCE (Feng et al., ICCV 2021), as their official code does it.
One memory module, two policies (:mod:`longtail.memory_policies` wires them into training):

* ``"rio"`` (RIO, Chang et al. 2021): box-head output features (after the last FC + ReLU) of the
  sampled foreground proposals of *cached* classes (few training images) are pushed every
  iteration; before the push, the newest ``min(k, stored)`` entries of every cached class present
  in the VGPU's batch are replayed (:meth:`ObjectMemory.replay_recent`). When one push brings more
  than ``capacity`` rows of a class, the last ``capacity`` ones stay (FIFO).
* ``"mfs"`` (LOCE, Feng et al. 2021): RoIAlign features (before the box head) of 16 jittered copies
  of every ground-truth box (:func:`jitter_boxes`) are pushed, at most the *first* ``capacity``
  rows per class per push; every iteration 8 classes are drawn with probability proportional to
  ``1 / (m_c + 1e-7)`` and 4 stored entries of each (:meth:`ObjectMemory.sample_classes`).

Layout. A memory holds ``V`` independent banks (one per VGPU chunk of the process batch, spec
README section VGPU), each with one ring buffer of ``Q = capacity`` slots for each of its ``S``
stored classes. A *group* is one (bank, class) ring: ``group = bank * S + slot(class)``. All rings
live in preallocated flat tensors with one spare "trash" row at the end, the destination of rows
that are not stored; that keeps every push and sample free of data-dependent shapes:

* ``features``  [V*S*Q + 1, D] in the configured dtype (D = prod(feature_shape));
* ``scales``    [V*S*Q + 1] float32 per-row scales when the dtype is "int8" (else empty);
* ``boxes``     [V*S*Q + 1, 8] float32: proposal box and matched gt box (x0, y0, x1, y1) each,
  from which the box-regression target is recomputed exactly as for real RoIs;
* ``ptr`` [V*S] next write position, ``fill`` [V*S] number of valid entries (``min(pushed, Q)``).

Entries of a ring are written at ``ptr, ptr + 1, ...`` modulo ``Q``; the oldest entry sits at
``(ptr - fill) mod Q``. Before the ring is first full, the valid entries are positions
``0 .. fill-1``.

Every step-time function below is vectorised over rows, classes and banks (no Python loop over
objects or classes). :meth:`ObjectMemory.sample_classes` (MFS) is free of host synchronisation
(fixed shapes plus a validity mask); :meth:`ObjectMemory.replay_recent` (RIO) returns a
data-dependent number of rows and therefore reads one size from the device
(``repeat_interleave``), the only host synchronisation of the memory path.

State. Memories are per process (as in both official implementations): they are not broadcast
or all-reduced, and they are not part of the model's ``state_dict`` (detectron2 saves the main
process's model only). :meth:`ObjectMemory.process_state` / :meth:`load_process_state` give the
per-process state that :class:`longtail.checkpoint.LongTailCheckpointer` writes beside each
checkpoint, one file per rank, and restores on resume.
"""
import dataclasses
import logging
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "MemoryRows",
    "ObjectMemory",
    "ring_push_destinations",
    "ring_recent_positions",
    "jitter_sign_matrix",
    "jitter_boxes",
    "mfs_class_probabilities",
    "cached_classes_from_image_counts",
    "memory_bytes",
    "available_bytes",
    "object_memories",
    "quantize_rows",
    "dequantize_rows",
]

logger = logging.getLogger(__name__)

# storage dtypes; "int8" stores each feature row as int8 with its own float32 scale
# (symmetric, scale = max |x| / 127), a quarter of float32's memory
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[N, D] float -> (int8 [N, D], scale [N] float32), ``x ~ q * scale`` (symmetric, per row)."""
    x = x.float()
    scale = x.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` (float32)."""
    return q.float() * scale[:, None]


@dataclasses.dataclass
class MemoryRows:
    """
    Rows read from a memory, to be appended after a batch's real RoIs.

    Attributes:
        features: [M, *feature_shape] features (compute dtype of the caller after ``.to``).
        labels: [M] int64 foreground class of each row (``0..C-1``); rows with ``valid`` False
            carry an arbitrary label and must be ignored.
        chunk: [M] int64 VGPU chunk (bank) each row belongs to.
        proposal_boxes: [M, 4] float32 stored proposal (or jittered) box.
        gt_boxes: [M, 4] float32 stored matched gt box.
        valid: [M] bool; ``None`` means all rows are valid.
    """

    features: torch.Tensor
    labels: torch.Tensor
    chunk: torch.Tensor
    proposal_boxes: torch.Tensor
    gt_boxes: torch.Tensor
    valid: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def weights(self) -> torch.Tensor:
        """[M] float32 weight of every row (1 valid, 0 ignored)."""
        if self.valid is None:
            return torch.ones(len(self), dtype=torch.float32, device=self.labels.device)
        return self.valid.float()

    def to(self, device, dtype=None) -> "MemoryRows":
        """Rows on ``device``; features cast to ``dtype`` when given."""
        return MemoryRows(
            features=self.features.to(device=device, dtype=dtype or self.features.dtype),
            labels=self.labels.to(device),
            chunk=self.chunk.to(device),
            proposal_boxes=self.proposal_boxes.to(device),
            gt_boxes=self.gt_boxes.to(device),
            valid=None if self.valid is None else self.valid.to(device),
        )


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------
def ring_push_destinations(
    ptr: torch.Tensor,
    fill: torch.Tensor,
    groups: torch.Tensor,
    capacity: int,
    keep: str = "first",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Where each pushed row goes in a set of ring buffers, and the rings' new pointers.

    Rows are taken in their given (batch) order. Within a group that receives ``n`` rows:

    * ``keep="first"`` (LOCE): the first ``min(n, Q)`` rows are written at ``ptr, ptr+1, ...``
      (mod Q), the pointer advances by ``min(n, Q)``;
    * ``keep="last"`` (RIO, a FIFO that receives all ``n`` rows): row ``r`` would go to
      ``ptr + r``; only the last ``min(n, Q)`` rows survive (earlier ones would be overwritten in
      the same push), and the pointer advances by ``n``.

    Args:
        ptr (Tensor): [G] int64 next write position of every ring, in ``0..Q-1``.
        fill (Tensor): [G] int64 valid entries of every ring, in ``0..Q``.
        groups (Tensor): [N] int64 ring of each row, or -1 for rows that are not stored.
        capacity (int): Q.
        keep (str): "first" or "last".

    Returns:
        (Tensor, Tensor, Tensor): ``dest`` [N] int64 flat slot ``group * Q + position`` of every
        row, -1 for rows not written; new ``ptr`` [G]; new ``fill`` [G].
    """
    if keep not in ("first", "last"):
        raise ValueError(f"keep must be 'first' or 'last', got {keep!r}")
    num_groups, q = ptr.shape[0], capacity
    device = ptr.device
    groups = groups.to(device=device, dtype=torch.long)
    n = groups.shape[0]
    valid = groups >= 0
    # rows not stored go to a spare group ``num_groups`` whose results are discarded
    g = torch.where(valid, groups, torch.full_like(groups, num_groups))
    counts = torch.zeros(num_groups + 1, dtype=torch.long, device=device)
    counts.index_add_(0, g, torch.ones_like(g))
    # rank of every row within its group, in batch order (stable sort keeps the order)
    sorted_g, order = torch.sort(g, stable=True)
    starts = counts.cumsum(0) - counts
    rank_sorted = torch.arange(n, device=device) - starts[sorted_g]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    n_in_group = counts[g]
    if keep == "first":
        kept = valid & (rank < q)
    else:
        kept = valid & (rank >= n_in_group - q)
    ptr_ext = torch.cat([ptr.to(torch.long), ptr.new_zeros(1, dtype=torch.long)])
    position = (ptr_ext[g] + rank) % q
    dest = torch.where(kept, g * q + position, torch.full_like(g, -1))

    counts = counts[:num_groups]
    written = counts.clamp(max=q)
    advance = written if keep == "first" else counts
    new_ptr = (ptr.to(torch.long) + advance) % q
    new_fill = (fill.to(torch.long) + written).clamp(max=q)
    return dest, new_ptr, new_fill


def ring_recent_positions(
    ptr: torch.Tensor,
    fill: torch.Tensor,
    take: torch.Tensor,
    capacity: int,
    generator: Optional[torch.Generator] = None,
    random_select: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Entries to read from rings: the newest ``take[g]`` of ring ``g`` (oldest to newest), or with
    ``random_select`` a uniform ``take[g]``-subset of its ``fill[g]`` entries without replacement
    (in drawn order) when ``fill[g] > take[g]``.

    Args:
        ptr, fill (Tensor): [G] ring pointers and fill counts.
        take (Tensor): [G] int64 entries wanted per ring; must be ``<= fill``.
        capacity (int): Q.
        generator: random source for ``random_select``.
        random_select (bool): RIO's ``RANDOM_SELECT``.

    Returns:
        (Tensor, Tensor): ``groups`` [M] and flat slots ``group * Q + position`` [M], groups in
        ascending order, ``M = take.sum()`` (the one data-dependent size; reading it syncs).
    """
    q = capacity
    device = ptr.device
    take = take.to(device=device, dtype=torch.long)
    group_ids = torch.arange(take.shape[0], device=device)
    groups = torch.repeat_interleave(group_ids, take)  # [M]
    starts = take.cumsum(0) - take
    j = torch.arange(groups.shape[0], device=device) - starts[groups]  # 0..take-1
    p, f, k = ptr[groups].long(), fill[groups].long(), take[groups]
    if random_select:
        # per ring, rank of its entries (by age 0..f-1, 0 = oldest) under random keys; entries
        # beyond the fill get +inf so they sort last
        keys = torch.rand(take.shape[0], q, generator=generator, device=device)
        ages = torch.arange(q, device=device)
        keys = torch.where(ages[None, :] < fill[:, None], keys, torch.full_like(keys, 2.0))
        drawn_age = keys.argsort(dim=1)  # [G, Q]
        age = torch.where(f > k, drawn_age[groups, j], f - k + j)
    else:
        age = f - k + j  # the newest k, oldest first
    position = (p - f + age) % q
    return groups, groups * q + position


def jitter_sign_matrix(device=None) -> torch.Tensor:
    """
    [4, 16] signs of LOCE's jittered boxes: column ``k`` holds the 4 binary digits of ``k``
    (most significant first) mapped 0 -> -1, 1 -> +1, so the 16 columns are all sign patterns.
    """
    k = torch.arange(16, device=device)
    bits = torch.stack([(k >> (3 - r)) & 1 for r in range(4)])  # [4, 16]
    return bits.float() * 2 - 1


def jitter_boxes(
    gt_boxes: torch.Tensor,
    uniforms: torch.Tensor,
    image_sizes: torch.Tensor,
    ratio: float = 1.0 / 6.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    LOCE's 16 jittered copies of every ground-truth box.

    ``b_k = (x1 + r S1k U1k w, y1 + r S2k U2k h, x2 + r S3k U3k w, y2 + r S4k U4k h)`` with the
    signs of :func:`jitter_sign_matrix`, ``U`` drawn once per image (shared by its gts), then
    clamped to ``x in [0, W-1]``, ``y in [0, H-1]``. Boxes that become empty (width or height
    <= 0, possible only for tiny gts at the right/bottom border) are flagged invalid (a fix: in the official
    code they give infinite box deltas).

    Args:
        gt_boxes (Tensor): [G, 4] gt boxes (x1, y1, x2, y2).
        uniforms (Tensor): [G, 4, 16] the U of each gt's image (``U[image_of_gt]``).
        image_sizes (Tensor): [G, 2] (H, W) of each gt's image (resized, before padding).
        ratio (float): maximum jitter as a fraction of the box size (1/6).

    Returns:
        (Tensor, Tensor): boxes [G, 16, 4] and validity [G, 16] bool.
    """
    g = gt_boxes.float()
    w = g[:, 2] - g[:, 0]
    h = g[:, 3] - g[:, 1]
    scale = torch.stack([w, h, w, h], dim=1)  # [G, 4]
    signs = jitter_sign_matrix(g.device)  # [4, 16]
    offset = ratio * signs[None] * uniforms.to(g) * scale[:, :, None]  # [G, 4, 16]
    boxes = (g[:, :, None] + offset).transpose(1, 2)  # [G, 16, 4]
    hw = image_sizes.to(g)
    upper = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=1) - 1  # W-1, H-1, ...
    boxes = torch.minimum(boxes.clamp(min=0), upper[:, None, :])
    valid = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return boxes, valid


def mfs_class_probabilities(mean_scores: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """
    [C] MFS class-sampling distribution ``p_c ∝ 1 / (m_c + eps)`` over the foreground classes
    (``mean_scores`` is [C+1]; background, the last entry, is excluded).
    """
    inv = 1.0 / (mean_scores[:-1].detach().float() + eps)
    return inv / inv.sum()


def cached_classes_from_image_counts(image_counts: Sequence[int], max_images: int) -> list:
    """
    RIO's cached classes: those with at most ``max_images`` training images (RIO: 30, giving 706
    classes on LVIS v0.5 and 553 on v1). Returns sorted class indices.
    """
    return [c for c, n in enumerate(image_counts) if n <= max_images]


def memory_bytes(num_banks: int, num_classes: int, capacity: int, feature_numel: int,
                 dtype: torch.dtype) -> int:
    """Bytes of the preallocated state of an :class:`ObjectMemory` with these sizes."""
    rows = num_banks * num_classes * capacity + 1
    elem = torch.empty(0, dtype=dtype).element_size()
    scale = 4 if dtype == torch.int8 else 0
    return rows * (feature_numel * elem + scale + 8 * 4) + 2 * num_banks * num_classes * 8


def available_bytes(device) -> Optional[int]:
    """Free memory of ``device``: CUDA's free device memory, or the host's available RAM
    (Linux ``MemAvailable``); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def object_memories(model: nn.Module) -> list:
    """Every :class:`ObjectMemory` in ``model`` (DistributedDataParallel or not)."""
    return [m for m in model.modules() if isinstance(m, ObjectMemory)]


# ------------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------------
class ObjectMemory(nn.Module):
    """
    ``V`` banks of per-class FIFO rings (module docstring). Stores the features of the classes in
    ``classes`` only; every other label (including background ``C``) is never stored.
    """

    # MODEL.MEMORY.CHECKPOINT False leaves it out of the per-process state files
    process_state_optional = True

    def __init__(
        self,
        num_classes: int,
        classes: Sequence[int],
        num_banks: int,
        capacity: int,
        feature_shape: Sequence[int],
        keep: str,
        dtype: str = "float32",
        device: str = "cpu",
    ):
        """
        Args:
            num_classes (int): C (labels ``0..C-1`` foreground, ``C`` background).
            classes (list[int]): the classes that get a ring (RIO: cached classes; MFS: all).
            num_banks (int): V, independent banks (VGPU chunks of a process batch).
            capacity (int): Q, entries per class and bank.
            feature_shape (tuple[int]): shape of one stored feature (RIO (1024,), MFS (256, 7, 7)).
            keep (str): "last" (RIO: FIFO of every pushed row) or "first" (MFS: the first Q rows
                of a class per push).
            dtype (str): storage dtype, "float32", "float16", "bfloat16" or "int8" (per-row
                symmetric quantisation with a float32 scale per row).
            device (str): storage device (e.g. "cpu" for host memory while the model is on a GPU).
        """
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"MODEL.MEMORY.DTYPE={dtype!r}; choose one of {sorted(_DTYPES)}.")
        if capacity < 1 or num_banks < 1:
            raise ValueError(f"memory capacity ({capacity}) and banks ({num_banks}) must be >= 1")
        classes = sorted(set(int(c) for c in classes))
        if any(not 0 <= c < num_classes for c in classes):
            raise ValueError(f"memory classes must be foreground classes 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.num_banks = num_banks
        self.capacity = capacity
        self.feature_shape = tuple(int(s) for s in feature_shape)
        self.keep = keep
        self.storage_dtype = _DTYPES[dtype]
        self.storage_device = torch.device(device)
        self.classes = classes
        slot = torch.full((num_classes + 1,), -1, dtype=torch.long)
        slot[classes] = torch.arange(len(classes))
        # label -> slot (-1: not stored), and slot -> label; small, follow the model's device
        self.register_buffer("class_to_slot", slot, persistent=False)
        self.register_buffer("slot_to_class", torch.tensor(classes, dtype=torch.long), persistent=False)
        self.feature_numel = int(math.prod(self.feature_shape))
        # The rings are training state: they are allocated by :meth:`allocate` (the Trainer calls
        # it before the first iteration; any step-time operation does it on first use), never
        # for inference. Until then every tensor is empty and :meth:`nbytes` is 0.
        self.allocated = False
        self._set_storage(rows=0, groups=0)

    # -- state ---------------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        """S, number of stored classes per bank."""
        return len(self.classes)

    @property
    def num_groups(self) -> int:
        return self.num_banks * self.num_slots

    def planned_bytes(self) -> int:
        """Bytes the rings take once allocated (:func:`memory_bytes`)."""
        return memory_bytes(
            self.num_banks, self.num_slots, self.capacity, self.feature_numel, self.storage_dtype
        )

    def allocate(self) -> None:
        """
        Preallocate the rings (zeroed) on the storage device, once. Raises MemoryError, naming
        the config keys that shrink it, when they do not fit in the device's free memory.
        """
        if self.allocated:
            return
        need, free = self.planned_bytes(), available_bytes(self.storage_device)
        if free is not None and need > free:
            raise MemoryError(
                f"The object memory ({self.extra_repr()}) needs {need / 2**20:.1f} MiB per "
                f"process on {self.storage_device}, but {free / 2**20:.1f} MiB are available "
                "there. Reduce MODEL.MEMORY.CAPACITY, store a smaller MODEL.MEMORY.DTYPE "
                "('float16', 'int8'), move it with MODEL.MEMORY.DEVICE, or use fewer banks per "
                "process (fewer images per process, or a larger MODEL.LONGTAIL.IMS_PER_VGPU)."
            )
        self._set_storage(rows=self.num_groups * self.capacity + 1, groups=self.num_groups)
        self.allocated = True
        logger.info(
            "Long-tail state: object memory allocated, %.1f MiB on %s (%s available)",
            self.nbytes() / 2**20, self.storage_device,
            "unknown" if free is None else f"{free / 2**20:.0f} MiB",
        )

    def _set_storage(self, rows: int, groups: int) -> None:
        # rows: groups * capacity + 1 (a trash row) when allocated, 0 before
        dev = self.storage_device
        # Plain attributes, not buffers: they stay on the storage device when the model moves,
        # and they are per-process state outside the model's state_dict (module docstring).
        self.features = torch.zeros(rows, self.feature_numel, dtype=self.storage_dtype, device=dev)
        # per-row scales of int8 storage (empty otherwise)
        n_scale = rows if self.storage_dtype == torch.int8 else 0
        self.scales = torch.zeros(n_scale, dtype=torch.float32, device=dev)
        self.boxes = torch.zeros(rows, 8, dtype=torch.float32, device=dev)
        self.ptr = torch.zeros(groups, dtype=torch.long, device=dev)
        self.fill = torch.zeros(groups, dtype=torch.long, device=dev)

    def nbytes(self) -> int:
        """Bytes held by the preallocated state (0 before :meth:`allocate`)."""
        tensors = (self.features, self.scales, self.boxes, self.ptr, self.fill)
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> None:
        """Empty every ring."""
        self.allocate()
        self.ptr.zero_()
        self.fill.zero_()

    def process_state(self) -> Dict[str, torch.Tensor]:
        """This process's memory contents (for per-rank checkpoint files)."""
        self.allocate()
        return {
            "features": self.features,
            "scales": self.scales,
            "boxes": self.boxes,
            "ptr": self.ptr,
            "fill": self.fill,
            "classes": torch.tensor(self.classes, dtype=torch.long),
            "shape": torch.tensor([self.num_banks, self.capacity, *self.feature_shape]),
        }

    def load_process_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore :meth:`process_state` output exactly (same sizes required)."""
        self.allocate()
        expected = torch.tensor([self.num_banks, self.capacity, *self.feature_shape])
        if not torch.equal(state["shape"].cpu(), expected) or state["classes"].tolist() != self.classes:
            raise ValueError(
                "Saved object memory does not match this model's memory (banks, capacity, "
                f"feature shape or stored classes differ: saved {state['shape'].tolist()}, "
                f"now {expected.tolist()}); resume with the configuration it was saved with."
            )
        self.features.copy_(state["features"])
        self.scales.copy_(state["scales"])
        self.boxes.copy_(state["boxes"])
        self.ptr.copy_(state["ptr"])
        self.fill.copy_(state["fill"])

    def fill_counts(self) -> torch.Tensor:
        """[V, S] number of valid entries of every ring."""
        self.allocate()
        return self.fill.view(self.num_banks, self.num_slots)

    # -- step-time operations ------------------------------------------------------------------
    def _groups(self, labels: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        slot = self.class_to_slot.to(labels.device)[labels.clamp(0, self.num_classes)]
        chunk = chunk.to(labels.device).long()
        ok = (slot >= 0) & (chunk >= 0) & (chunk < self.num_banks)
        return torch.where(ok, chunk * self.num_slots + slot, torch.full_like(slot, -1))

    @torch.no_grad()
    def push(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        chunk: torch.Tensor,
        proposal_boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
    ) -> None:
        """
        Store rows (detached) in batch order; labels of classes without a ring are skipped.

        Args:
            features (Tensor): [N, *feature_shape].
            labels (Tensor): [N] int64 labels in ``0..C``.
            chunk (Tensor): [N] int64 bank of each row.
            proposal_boxes, gt_boxes (Tensor): [N, 4] the boxes the row's regression target
                is computed from.
            valid (Tensor or None): [N] bool; False rows are skipped.
        """
        self.allocate()
        groups = self._groups(labels.long(), chunk)
        if valid is not None:
            groups = torch.where(valid.to(groups.device), groups, torch.full_like(groups, -1))
        dev = self.storage_device
        dest, new_ptr, new_fill = ring_push_destinations(
            self.ptr, self.fill, groups.to(dev), self.capacity, self.keep
        )
        trash = self.features.shape[0] - 1
        dest = torch.where(dest >= 0, dest, torch.full_like(dest, trash))
        rows = features.detach().reshape(features.shape[0], -1)
        if self.storage_dtype == torch.int8:
            rows, scale = quantize_rows(rows)
            self.scales.index_copy_(0, dest, scale.to(dev))
        rows = rows.to(dev, self.storage_dtype)
        boxes = torch.cat([proposal_boxes, gt_boxes], dim=1).detach().to(dev, torch.float32)
        self.features.index_copy_(0, dest, rows)
        self.boxes.index_copy_(0, dest, boxes)
        self.ptr.copy_(new_ptr)
        self.fill.copy_(new_fill)

    def _read(self, slots: torch.Tensor, groups: torch.Tensor, device) -> MemoryRows:
        slots_s = slots.to(self.storage_device)
        feats = self.features.index_select(0, slots_s)
        if self.storage_dtype == torch.int8:
            feats = dequantize_rows(feats, self.scales.index_select(0, slots_s))
        feats = feats.view(-1, *self.feature_shape)
        boxes = self.boxes.index_select(0, slots_s).to(device)
        groups = groups.to(device)
        slot_to_class = self.slot_to_class.to(device)
        return MemoryRows(
            features=feats.to(device),
            labels=slot_to_class[groups % self.num_slots],
            chunk=groups // self.num_slots,
            proposal_boxes=boxes[:, :4],
            gt_boxes=boxes[:, 4:],
        )

    @torch.no_grad()
    def replay_recent(
        self,
        labels: torch.Tensor,
        chunk: torch.Tensor,
        max_per_class: int,
        generator: Optional[torch.Generator] = None,
        random_select: bool = False,
    ) -> MemoryRows:
        """
        RIO replay: for every (bank, stored class) present among ``labels`` of that bank, the
        newest ``min(max_per_class, stored)`` entries (oldest first); groups in ascending
        (bank, class) order. Call it *before* pushing the same batch.

        Args:
            labels (Tensor): [R] labels of the batch's sampled rows (``0..C``).
            chunk (Tensor): [R] bank of each row.
            max_per_class (int): RIO's ``MIN_CACHE`` (20); 0 disables replay.
            generator, random_select: RIO's ``RANDOM_SELECT`` (uniform subset instead of newest).

        Returns:
            MemoryRows: all valid (``valid = None``), on ``labels.device``.
        """
        self.allocate()
        device = labels.device
        groups = self._groups(labels.long(), chunk).to(self.storage_device)
        present = torch.zeros(self.num_groups + 1, dtype=torch.long, device=self.storage_device)
        present.index_fill_(0, torch.where(groups >= 0, groups, torch.full_like(groups, self.num_groups)), 1)
        take = torch.minimum(self.fill, torch.full_like(self.fill, max_per_class)) * present[:-1]
        g, slots = ring_recent_positions(
            self.ptr, self.fill, take, self.capacity, generator, random_select
        )
        return self._read(slots, g, device)

    @torch.no_grad()
    def sample_classes(
        self,
        class_probs: torch.Tensor,
        num_classes: int,
        per_class: int,
        generator: Optional[torch.Generator] = None,
    ) -> MemoryRows:
        """
        MFS sampling, per bank: ``num_classes`` classes i.i.d. from ``class_probs`` (with
        replacement), then ``per_class`` entries of each uniformly with replacement from its
        ``fill`` valid entries; draws of empty rings are returned with ``valid = False``.
        Fixed output size ``V * num_classes * per_class`` (no host synchronisation).

        Args:
            class_probs (Tensor): [C] sampling probability of each foreground class.
            num_classes (int): K (8).
            per_class (int): F (4).
            generator: random source (on ``class_probs.device``).

        Returns:
            MemoryRows on ``class_probs.device``; rows ordered bank-major, then draw, then entry.
        """
        self.allocate()
        device = class_probs.device
        v, k, f, q = self.num_banks, num_classes, per_class, self.capacity
        # probabilities of classes without a ring are zeroed (MFS stores every class)
        has_ring = (self.class_to_slot.to(device)[: self.num_classes] >= 0).to(class_probs.dtype)
        probs = (class_probs * has_ring).expand(v, -1)
        drawn = torch.multinomial(probs, k, replacement=True, generator=generator)  # [V, K]
        slot = self.class_to_slot.to(device)[drawn]  # [V, K]
        group = torch.arange(v, device=device)[:, None] * self.num_slots + slot  # [V, K]
        fill = self.fill.to(device)[group]  # [V, K]
        u = torch.rand(v, k, f, generator=generator, device=device)
        pos = (u * fill[..., None]).long().clamp(min=0)
        pos = torch.minimum(pos, (fill[..., None] - 1).clamp(min=0))
        valid = (fill > 0)[..., None].expand(v, k, f).reshape(-1)
        groups = group[..., None].expand(v, k, f).reshape(-1)
        rows = self._read(groups * q + pos.reshape(-1), groups, device)
        rows.valid = valid
        return rows

    def extra_repr(self) -> str:
        return (
            f"banks={self.num_banks}, classes={self.num_slots}, capacity={self.capacity}, "
            f"feature_shape={self.feature_shape}, keep={self.keep!r}, "
            f"dtype={self.storage_dtype}, device={self.storage_device}, "
            f"MiB={self.planned_bytes() / 2**20:.1f}, allocated={self.allocated}"
        )
