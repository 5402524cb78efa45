"""Equilibrium loss (EBL) and the running per-class mean classification score of LOCE.

LOCE: Feng et al., "Exploring Classification Equilibrium in Long-Tailed Object Detection",
ICCV 2021, and its official code. Label convention (whole ``longtail`` package): foreground
classes are ``0 .. C-1`` and background is ``C`` (= ``num_classes``), so classification logits,
probabilities and the mean-score vector all have ``C + 1`` entries.

The per-step functions below are written for the training hot path: they contain no Python
loops over RoIs, instances or classes, never read a tensor value on the host (no ``.item()``,
no data-dependent shapes), and the only collective (:meth:`MeanScoreTracker.update`) is a single
fixed-size ``all_reduce``.

Typical use inside a LOCE box branch (one iteration)::

    probs = F.softmax(logits.detach().float(), dim=1)                  # plain softmax, [R, C+1]
    s1, n1 = instance_score_entries(probs, labels, instance_ids, num_instances)
    s2, n2 = memory_score_entries(probs_mem, labels_mem, mem_chunk, num_chunks)
    tracker.update(s1 + s2, n1 + n2)                                   # gathers over processes
    loss = equilibrium_loss(logits, labels, tracker.mean_scores, chunk_index, num_chunks)
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

__all__ = [
    "equilibrium_loss",
    "chunk_mean",
    "score_entry_stats",
    "instance_score_entries",
    "memory_score_entries",
    "global_instance_ids",
    "update_mean_scores",
    "MeanScoreTracker",
]

_LOG_CLAMP = 1e-12


def equilibrium_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mean_scores: torch.Tensor,
    chunk_index: Optional[torch.Tensor] = None,
    num_chunks: int = 1,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """
    Equilibrium loss: softmax cross-entropy on the logits shifted by ``log m``.

    With :math:`\\tilde P_{rj} = m_j e^{z_{rj}} / \\sum_k m_k e^{z_{rk}}` the loss of a chunk is
    :math:`\\frac{1}{A}\\sum_r -\\log \\tilde P_{r, y_r}` with :math:`A = \\max(\\#rows, 1)`, which
    equals ``cross_entropy(z + log(clamp(m, 1e-12)), y, reduction="sum") / A``. The gradient
    w.r.t. the logits is ``(P~ - onehot(y)) / A``; ``mean_scores`` is treated as constant
    (detached).

    The log-softmax is evaluated in float32 whatever the logits' dtype (bf16/fp16 logits give a
    float32 loss; the gradient flows back in the logits' dtype).

    Args:
        logits (Tensor): [R, C+1] classification logits (foreground 0..C-1, background C), real
            RoIs and memory rows alike.
        labels (Tensor): [R] int64 targets in ``0..C`` (background = C).
        mean_scores (Tensor): [C+1] running mean scores ``m`` (state; never receives gradient).
        chunk_index (Tensor or None): [R] int64 VGPU chunk id of every row, in
            ``0..num_chunks-1``. ``None``: all rows form one chunk and ``num_chunks`` is ignored.
        num_chunks (int): number of chunks (static). Every chunk's loss is normalised by its own
            row count (``max(count, 1)``); the result is the mean over the ``num_chunks`` chunks,
            an empty chunk contributing 0 (as an official GPU with no rows would).
        weights (Tensor or None): [R] 0/1 row weights; rows of weight 0 (e.g. MFS draws of an
            empty memory) are left out of the loss and of the normalisers. ``None``: all 1.

    Returns:
        Tensor: float32 scalar.
    """
    log_m = mean_scores.detach().to(device=logits.device, dtype=torch.float32)
    log_m = log_m.clamp(min=_LOG_CLAMP).log()
    shifted = logits.float() + log_m  # [R, C+1]
    # F.cross_entropy is log_softmax + nll_loss: the stable form of -log(P~).
    per_row = F.cross_entropy(shifted, labels, reduction="none")  # [R]
    return chunk_mean(per_row, chunk_index, num_chunks, weights)


def chunk_mean(
    per_row: torch.Tensor,
    chunk_index: Optional[torch.Tensor] = None,
    num_chunks: int = 1,
    weights: Optional[torch.Tensor] = None,
    normalizer_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """
    Per-chunk normalised sum, averaged over chunks:
    ``mean_k( sum_{r in k} w_r l_r / max(sum_{r in k} n_r, 1) )``.

    Args:
        per_row (Tensor): [R] per-row losses.
        chunk_index (Tensor or None): [R] chunk of every row; ``None``: one chunk.
        num_chunks (int): number of chunks (static; ignored when ``chunk_index`` is None).
        weights (Tensor or None): [R] row weights ``w`` (``None``: 1). Rows of weight 0 contribute
            exactly 0 (also when their loss is not finite).
        normalizer_weights (Tensor or None): [R] ``n``, the rows counted in the normaliser
            (``None``: the same as ``weights``). Box regression sums over foreground rows but
            normalises by all rows.
    """
    weights = torch.ones_like(per_row) if weights is None else weights.to(per_row)
    norm = weights if normalizer_weights is None else normalizer_weights.to(per_row)
    contrib = torch.where(weights > 0, per_row * weights, torch.zeros_like(per_row))
    if chunk_index is None:
        return contrib.sum() / norm.sum().clamp(min=1.0)
    sums = per_row.new_zeros(num_chunks).index_add(0, chunk_index, contrib)
    rows = per_row.new_zeros(num_chunks).index_add(0, chunk_index, norm)
    return (sums / rows.clamp(min=1.0)).mean()


def score_entry_stats(
    probs: torch.Tensor,
    labels: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Per-class sufficient statistics of mean-score entries, one entry per non-empty row group.

    Rows with ``group_ids[r] >= 0`` are grouped by that id; every group holding at least one row
    produces ONE entry ``(class, value)`` with ``class`` = the (shared) label of its rows and
    ``value`` = mean over its rows of ``probs[r, labels[r]]``. Rows with ``group_ids[r] < 0`` are
    ignored. Returned are, per class, the sum of the entry values and the number of entries:
    exactly what :func:`update_mean_scores` needs, and a fixed-size tensor to all-reduce.

    Args:
        probs (Tensor): [R, C+1] detached plain softmax probabilities.
        labels (Tensor): [R] int64 class of each row in ``0..C``. All rows of one group must
            share a label (rows of one gt instance, or memory rows keyed by class).
        group_ids (Tensor): [R] int64 group id in ``0..num_groups-1``, or -1 to skip the row.
        num_groups (int): static upper bound on the number of groups.

    Returns:
        (Tensor, Tensor): ``sums`` [C+1] float32 and ``counts`` [C+1] float32.
    """
    probs = probs.detach().float()
    num_cls = probs.shape[1]  # C + 1
    labels = labels.to(device=probs.device, dtype=torch.long)
    group_ids = group_ids.to(device=probs.device, dtype=torch.long)

    used = group_ids >= 0  # [R]
    # Skipped rows go to a spare slot ``num_groups`` that is discarded below.
    slot = torch.where(used, group_ids, torch.full_like(group_ids, num_groups))
    value = probs.gather(1, labels[:, None]).squeeze(1)  # [R] p[r, y_r]

    n_slots = num_groups + 1
    group_sum = probs.new_zeros(n_slots).index_add(0, slot, value)
    group_rows = probs.new_zeros(n_slots).index_add(0, slot, torch.ones_like(value))
    # Label of each group; all its rows agree, so any order-independent reduction will do.
    group_label = torch.full((n_slots,), num_cls - 1, dtype=torch.long, device=probs.device)
    group_label = group_label.scatter_reduce(0, slot, labels, reduce="amax", include_self=False)

    group_sum, group_rows, group_label = group_sum[:-1], group_rows[:-1], group_label[:-1]
    has_entry = (group_rows > 0).float()  # [num_groups]
    entry_value = group_sum / group_rows.clamp(min=1.0) * has_entry

    sums = probs.new_zeros(num_cls).index_add(0, group_label, entry_value)
    counts = probs.new_zeros(num_cls).index_add(0, group_label, has_entry)
    return sums, counts


def instance_score_entries(
    probs: torch.Tensor,
    labels: torch.Tensor,
    instance_ids: torch.Tensor,
    num_instances: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Mean-score entries of the real RoIs: one entry per gt instance with >= 1 positive RoI.

    Entry value = mean over the instance's positive RoIs of ``p[r, y_instance]``. Background and
    unmatched RoIs carry ``instance_ids = -1`` and are ignored.

    Args:
        probs (Tensor): [R, C+1] detached plain softmax of the real RoIs' logits.
        labels (Tensor): [R] int64 RoI labels in ``0..C`` (positives carry their gt's class).
        instance_ids (Tensor): [R] int64 batch-global gt instance id of each positive RoI
            (see :func:`global_instance_ids`), -1 for background/unmatched RoIs.
        num_instances (int): total number of gt instances in the batch (static).

    Returns:
        (Tensor, Tensor): per-class entry-value sums [C+1] and entry counts [C+1] (float32).
    """
    return score_entry_stats(probs, labels, instance_ids, num_instances)


def memory_score_entries(
    probs: torch.Tensor,
    labels: torch.Tensor,
    chunk_index: Optional[torch.Tensor] = None,
    num_chunks: int = 1,
    valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Mean-score entries of MFS memory rows: one entry per distinct (chunk, class).

    Entry value = mean of ``p[., c]`` over the chunk's memory rows of class ``c``; duplicate
    draws of a class within a chunk are merged into one entry.

    Args:
        probs (Tensor): [M, C+1] detached plain softmax of the memory rows' logits.
        labels (Tensor): [M] int64 foreground class of every memory row (``0..C-1``).
        chunk_index (Tensor or None): [M] int64 VGPU chunk of every row; ``None`` = one chunk.
        num_chunks (int): number of chunks (static).
        valid (Tensor or None): [M] bool, rows to use (``None``: all).

    Returns:
        (Tensor, Tensor): per-class entry-value sums [C+1] and entry counts [C+1] (float32).
    """
    num_cls = probs.shape[1]
    labels = labels.to(device=probs.device, dtype=torch.long)
    if chunk_index is None:
        keys, num_keys = labels, num_cls
    else:
        keys = chunk_index.to(device=probs.device, dtype=torch.long) * num_cls + labels
        num_keys = num_chunks * num_cls
    if valid is not None:
        keys = torch.where(valid.to(probs.device), keys, torch.full_like(keys, -1))
    return score_entry_stats(probs, labels, keys, num_keys)


def global_instance_ids(
    matched_gt_per_image: Sequence[torch.Tensor],
    labels_per_image: Sequence[torch.Tensor],
    num_gt_per_image: Sequence[int],
    num_classes: int,
) -> Tuple[torch.Tensor, int]:
    """
    Batch-global gt instance id of every sampled RoI, from per-image matches.

    Image ``i``'s ids are offset by the number of gt instances in images ``0..i-1`` (the true
    cumulative offset, not a fixed RoIs-per-image stride). RoIs whose label is background
    (``== num_classes``) get -1. The loop is over images only.

    Args:
        matched_gt_per_image (list[Tensor]): per image, [R_i] int64 index of the matched gt
            within that image (any value for background RoIs).
        labels_per_image (list[Tensor]): per image, [R_i] int64 labels in ``0..C``.
        num_gt_per_image (list[int]): number of gt instances of every image (host ints, e.g.
            ``len(instances.gt_boxes)``).
        num_classes (int): C.

    Returns:
        (Tensor, int): instance ids [sum R_i] (rows in image-major order, matching the
        concatenation of the images' RoIs) and the total number of instances.
    """
    ids: List[torch.Tensor] = []
    offset = 0
    for matched, labels, n_gt in zip(matched_gt_per_image, labels_per_image, num_gt_per_image):
        fg = labels < num_classes
        ids.append(torch.where(fg, matched.long() + offset, torch.full_like(matched.long(), -1)))
        offset += int(n_gt)
    if not ids:
        return torch.zeros(0, dtype=torch.long), 0
    return torch.cat(ids), offset


def update_mean_scores(
    mean_scores: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    alpha: float = 0.9,
    bg_score: float = 0.01,
) -> torch.Tensor:
    """
    One mean-score update (pure: returns a new tensor).

    For every class with ``n_c = counts[c] >= 1``:
    ``m_c <- alpha**n_c * m_c + (1 - alpha**n_c) * sums[c] / n_c``; other classes keep their
    value bit for bit. Afterwards the background entry is reset: ``m_C = bg_score``.
    Example: ``m_c = 0.01`` and entries 0.5, 0.3 give ``0.81 * 0.01 + 0.19 * 0.4 = 0.0841``.

    Args:
        mean_scores (Tensor): [C+1] current scores.
        sums (Tensor): [C+1] per-class sum of entry values.
        counts (Tensor): [C+1] per-class number of entries (float or int).
        alpha (float): per-entry decay.
        bg_score (float): constant background score.

    Returns:
        Tensor: [C+1] updated scores, dtype and device of ``mean_scores``.
    """
    m = mean_scores.detach()
    n = counts.to(device=m.device, dtype=torch.float32)
    s = sums.to(device=m.device, dtype=torch.float32)
    decay = torch.pow(alpha, n)  # [C+1]
    batch_mean = s / n.clamp(min=1.0)
    blended = decay * m.float() + (1.0 - decay) * batch_mean
    new = torch.where(n > 0, blended.to(m.dtype), m)
    background = torch.full((1,), bg_score, dtype=m.dtype, device=m.device)
    return torch.cat([new[:-1], background])


class MeanScoreTracker(nn.Module):
    """
    Holds LOCE's running mean classification score ``m`` [C+1] as a persistent float32 buffer
    (``mean_scores``), so detectron2 checkpoints save it and a resumed run restores it.

    ``m`` is global: :meth:`update` all-reduces the per-class statistics over processes (one
    fixed-size ``SUM`` all-reduce of ``[sums; counts]``, gloo or NCCL), so every rank applies the
    identical update and the buffers stay equal without broadcasting them.
    """

    def __init__(
        self,
        num_classes: int,
        alpha: float = 0.9,
        bg_score: float = 0.01,
        init_score: float = 0.01,
        frequency: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            num_classes (int): C, the number of foreground classes.
            alpha (float): per-entry EMA decay.
            bg_score (float): constant background score ``m_C``, enforced after every update.
            init_score (float): initial value of every entry (background included).
            frequency (list[str] or None): optional "r"/"c"/"f" per foreground class for
                :meth:`group_means`; may also be given on the first call.
        """
        super().__init__()
        self.num_classes = num_classes
        self.alpha = alpha
        self.bg_score = bg_score
        self.register_buffer(
            "mean_scores", torch.full((num_classes + 1,), float(init_score), dtype=torch.float32)
        )
        self._group_key: Optional[Tuple[str, ...]] = None
        self._group_names: Tuple[str, ...] = ()
        if frequency is not None:
            self._build_groups(frequency)

    @torch.no_grad()
    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """
        Gather the statistics of all processes and update ``mean_scores`` in place.

        Args:
            sums (Tensor): [C+1] this process's per-class entry-value sums.
            counts (Tensor): [C+1] this process's per-class entry counts.

        Returns:
            Tensor: the updated buffer ([C+1], same object as ``self.mean_scores``).
        """
        buf = self.mean_scores
        stats = torch.cat([sums.detach().float().reshape(-1), counts.detach().float().reshape(-1)])
        stats = stats.to(buf.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        total_sums, total_counts = stats.split(self.num_classes + 1)
        # a class whose statistics are not finite (a broken batch on some process) is left as it
        # was; the step's loss is then not finite either and training stops (longtail.state)
        finite = torch.isfinite(total_sums) & torch.isfinite(total_counts)
        total_counts = torch.where(finite, total_counts, torch.zeros_like(total_counts))
        total_sums = torch.where(finite, total_sums, torch.zeros_like(total_sums))
        buf.copy_(update_mean_scores(buf, total_sums, total_counts, self.alpha, self.bg_score))
        return buf

    def _build_groups(self, frequency: Sequence[str]) -> None:
        key = tuple(frequency)
        assert len(key) == self.num_classes, (
            f"frequency has {len(key)} entries, expected one per class ({self.num_classes})"
        )
        names = tuple(g for g in ("r", "c", "f") if g in key)
        # [G, C] row-normalised membership: group means are one matrix-vector product.
        member = torch.tensor([[float(f == g) for f in key] for g in names], dtype=torch.float32)
        if len(names) == 0:
            member = torch.zeros(0, self.num_classes)
        member = member / member.sum(dim=1, keepdim=True).clamp(min=1.0)
        self.register_buffer(
            "_group_matrix", member.to(self.mean_scores.device), persistent=False
        )
        self._group_key, self._group_names = key, names

    @torch.no_grad()
    def group_means(self, frequency: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """
        Mean of ``m`` over the rare / common / frequent foreground classes (for logging).

        Args:
            frequency (list[str] or None): "r"/"c"/"f" per foreground class (length C). The
                membership matrix is built once and cached; ``None`` reuses the cached one.

        Returns:
            dict[str, Tensor]: 0-dim tensors keyed by the groups that have classes
            (subset of "r", "c", "f"). No host sync; call ``.item()`` when logging.
        """
        if frequency is not None and tuple(frequency) != self._group_key:
            self._build_groups(frequency)
        assert self._group_key is not None, "group_means needs the class frequency groups once"
        means = self._group_matrix.to(self.mean_scores.device) @ self.mean_scores[:-1]
        return {name: means[i] for i, name in enumerate(self._group_names)}

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, bg_score={self.bg_score}"
