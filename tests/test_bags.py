"""Unit tests of the BAGS tables, loss, selection and merge (pure tensor functions)."""
import math

import pytest
import numpy as np
import torch
from torch import nn

from longtail.bags import (
    BagsTables,
    bags_classifier_init_,
    bags_loss,
    bags_merge,
    build_group_tables,
    d2_to_mmdet_v1_labels,
    map_group_labels,
    mmdet_v1_to_d2_labels,
    select_others,
)

EDGE_COUNTS = [0, 9, 10, 99, 100, 999, 1000]


def _counts_with_bins(sizes, seed=0):
    """Shuffled synthetic instance counts with ``sizes[b]`` classes in bin b of (10, 100, 1000)."""
    g = torch.Generator().manual_seed(seed)
    ranges = [(0, 10), (10, 100), (100, 1000), (1000, 50000)]
    parts = [torch.randint(lo, hi, (n,), generator=g) for (lo, hi), n in zip(ranges, sizes)]
    counts = torch.cat(parts)
    return counts[torch.randperm(counts.numel(), generator=g)]


def _naive_loss_terms(logits, labels, tables, selection):
    """Slow float64 reference: per-group selected-mean CE with Python loops."""
    C, G = tables.num_classes, tables.num_groups
    terms = []
    for g in range(G + 1):
        start, length = tables.slices[g].tolist()
        total, n = 0.0, 0
        for r in range(logits.shape[0]):
            if not selection[r, g]:
                continue
            y = int(labels[r])
            if g == 0:
                t = 0 if y == C else 1
            elif y < C and int(tables.class_group[y]) == g:
                t = int(tables.class_index[y])
            else:
                t = 0
            z = logits[r, start : start + length].double()
            total += float(torch.logsumexp(z, 0) - z[t])
            n += 1
        terms.append(total / max(n, 1))
    return terms


def _naive_merge(logits, tables):
    C = tables.num_classes
    out = torch.zeros(logits.shape[0], C + 1, dtype=torch.float64)
    for r in range(logits.shape[0]):
        probs = []
        for start, length in tables.slices.tolist():
            probs.append(torch.softmax(logits[r, start : start + length].double(), 0))
        for k in range(C):
            out[r, k] = probs[int(tables.class_group[k])][int(tables.class_index[k])] * probs[0][1]
        out[r, C] = probs[0][0]
    return out


# ----------------------------------------------------------------------------- group tables
def test_group_tables_bins_and_layout():
    t = build_group_tables(EDGE_COUNTS)
    C = len(EDGE_COUNTS)
    assert (t.num_classes, t.num_groups, t.num_logits) == (C, 4, C + 6)
    assert t.class_group.tolist() == [1, 1, 2, 2, 3, 3, 4]
    assert t.class_index.tolist() == [1, 2, 1, 2, 1, 2, 1]
    assert t.slices.tolist() == [[0, 2], [2, 3], [5, 3], [8, 3], [11, 2]]
    assert t.group_sizes.tolist() == [2, 2, 2, 1]
    # contiguous slices covering 0..L-1; the padded gather table enumerates them in order
    ends = (t.slices[:, 0] + t.slices[:, 1]).tolist()
    assert t.slices[1:, 0].tolist() == ends[:-1] and ends[-1] == t.num_logits
    # every column belongs to exactly one group, groups contiguous in order, sizes = slice lengths
    assert t.column_group.shape == (t.num_logits,)
    assert (t.column_group[1:] >= t.column_group[:-1]).all()
    assert torch.bincount(t.column_group).tolist() == t.slices[:, 1].tolist()
    assert torch.equal(t.class_column, t.slices[t.class_group, 0] + t.class_index)
    assert torch.equal(t.column_group[t.class_column], t.class_group)
    # t_0: background 0, foreground 1; background is "others" (0) in every foreground group
    assert t.label_table.shape == (5, C + 1)
    assert t.label_table[0].tolist() == [1] * C + [0]
    assert (t.label_table[1:, C] == 0).all()
    for k in range(C):
        col = t.label_table[:, k]
        assert int(col[t.class_group[k]]) == int(t.class_index[k])
        assert int((col[1:] > 0).sum()) == 1


def test_group_tables_ascending_ids_within_group():
    counts = [5000, 3, 50, 7, 2000, 0, 60, 500]
    t = build_group_tables(counts)
    for g in range(1, t.num_groups + 1):
        ids = torch.nonzero(t.class_group == g).flatten()
        assert t.class_index[ids].tolist() == list(range(1, ids.numel() + 1))
    assert t.class_group.tolist() == [4, 1, 2, 1, 4, 1, 2, 3]


def test_group_sizes_and_slices_on_lvis_like_counts():
    # 1230 classes with long-tailed instance counts (log-uniform over 1..50,000, seeded), binned
    # here by hand with the default edges (10, 100, 1000), independently of build_group_tables
    rng = np.random.default_rng(5)
    counts = np.floor(np.exp(rng.uniform(0, np.log(50000), size=1230))).astype(int).tolist()
    sizes = [sum(1 for n in counts if lo <= n < hi)
             for lo, hi in ((0, 10), (10, 100), (100, 1000), (1000, 10**9))]
    assert all(size > 0 for size in sizes)
    t = build_group_tables(counts)
    assert t.num_classes == 1230 and t.num_groups == 4 and t.num_logits == 1230 + 2 + 4
    assert t.group_sizes.tolist() == sizes
    starts = [0, 2]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size + 1)
    assert [tuple(x) for x in t.slices.tolist()] == list(
        zip(starts, [2] + [size + 1 for size in sizes]))
    # every class sits in the group of its own bin, at its rank among that group's class ids
    for k in (0, 1, 617, 1229):
        g = next(i for i, (lo, hi) in enumerate(((0, 10), (10, 100), (100, 1000), (1000, 10**9)))
                 if lo <= counts[k] < hi) + 1
        rank = sum(1 for j in range(k) if t.class_group[j] == g) + 1
        assert int(t.class_group[k]) == g and int(t.class_index[k]) == rank


def test_empty_bins_dropped_and_methods_still_work():
    t3 = build_group_tables([0, 5, 50, 500, 999])
    assert t3.num_groups == 3 and t3.num_logits == 5 + 2 + 3
    assert t3.group_bins.tolist() == [0, 1, 2]
    t1 = build_group_tables([0, 1, 9])
    assert t1.num_groups == 1 and t1.num_logits == 3 + 3
    assert t1.label_table.tolist() == [[1, 1, 1, 0], [1, 2, 3, 0]]
    # a gap in the middle: bins 0 and 3 -> groups 1 and 2
    t2 = build_group_tables([5000, 5, 1000])
    assert t2.num_groups == 2 and t2.group_bins.tolist() == [0, 3]
    assert t2.class_group.tolist() == [2, 1, 2] and t2.class_index.tolist() == [1, 1, 2]
    # single bin when there are no edges
    t0 = build_group_tables([3, 3000], bin_edges=())
    assert t0.num_groups == 1 and t0.class_index.tolist() == [1, 2]

    g = torch.Generator().manual_seed(0)
    for t in (t3, t1, t2):
        C = t.num_classes
        logits = torch.randn(12, t.num_logits, generator=g, requires_grad=True)
        labels = torch.randint(0, C + 1, (12,), generator=g)
        sel = torch.ones(12, t.num_groups + 1, dtype=torch.bool)
        loss, terms = bags_loss(logits, labels, t, selection=sel, return_terms=True)
        assert len(terms) == t.num_groups + 1 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        probs = bags_merge(logits.detach(), t)
        assert probs.shape == (12, C + 1)
        torch.testing.assert_close(probs.double(), _naive_merge(logits.detach(), t))


@pytest.mark.parametrize(
    "counts, edges",
    [
        ([1, -1, 3], (10, 100, 1000)),
        ([1.5, 2.0], (10, 100, 1000)),
        ([], (10, 100, 1000)),
        ([[1, 2]], (10, 100, 1000)),
        ([1, 2], (100, 10)),
        ([1, 2], (10, 10)),
        ([1, 2], (-5, 10)),
        ([1, 2], (0, 10)),
        ([1, 2], ("a", 10)),
        ([1, 2], (10, float("inf"))),
    ],
)
def test_group_tables_validation(counts, edges):
    with pytest.raises(ValueError):
        build_group_tables(counts, edges)


def test_tables_to_and_tensors():
    t = build_group_tables(EDGE_COUNTS)
    names = set(t.tensors())
    assert {"slices", "column_group", "label_table", "class_group"} <= names
    t2 = t.to("cpu")
    assert isinstance(t2, BagsTables) and t2.num_groups == t.num_groups
    assert all(torch.equal(a, t2.tensors()[k]) for k, a in t.tensors().items())


# ----------------------------------------------------------------------------- loss
def _random_batch(t, R, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, t.num_logits, generator=g) * 2
    labels = torch.randint(0, t.num_classes + 1, (R,), generator=g)
    return logits, labels


def test_loss_all_selected_equals_sum_of_group_mean_ce():
    t = build_group_tables(EDGE_COUNTS)
    logits, labels = _random_batch(t, 40, seed=1)
    labels[:7] = torch.arange(7)  # every group has positives
    sel = select_others(map_group_labels(labels, t), ratio=1000.0)
    assert sel.all()
    loss, terms = bags_loss(logits, labels, t, ratio=1000.0, return_terms=True)
    ref = _naive_loss_terms(logits, labels, t, torch.ones(40, 5, dtype=torch.bool))
    for g in range(5):
        assert terms[f"loss_cls_g{g}"].item() == pytest.approx(ref[g], rel=1e-5)
    assert loss.item() == pytest.approx(sum(ref), rel=1e-5)
    assert loss.dtype == torch.float32


def test_loss_explicit_selection_closed_form():
    t = build_group_tables(EDGE_COUNTS)
    logits, labels = _random_batch(t, 30, seed=2)
    g = torch.Generator().manual_seed(3)
    sel = torch.rand(30, 5, generator=g) < 0.4
    sel[:, 3] = False  # a group with no selected row contributes 0
    loss, terms = bags_loss(logits, labels, t, selection=sel, return_terms=True)
    ref = _naive_loss_terms(logits, labels, t, sel)
    assert terms["loss_cls_g3"].item() == 0.0
    for k in range(5):
        assert terms[f"loss_cls_g{k}"].item() == pytest.approx(ref[k], rel=1e-5, abs=1e-7)
    # zero logits: every selected CE is log(slice length)
    zero = torch.zeros_like(logits)
    lengths = t.slices[:, 1].tolist()
    expected = sum(math.log(lengths[k]) for k in range(5) if sel[:, k].any())
    assert bags_loss(zero, labels, t, selection=sel).item() == pytest.approx(expected, rel=1e-6)
    # same selection -> same value, independent of any RNG
    assert torch.equal(loss, bags_loss(logits, labels, t, selection=sel))


def test_select_others_counts_subset_and_positives():
    t = build_group_tables(EDGE_COUNTS)
    C = t.num_classes
    # G1: 2 positives (16 others wanted), G2: 60 positives (all), G3: none, G4: 1 positive
    labels = torch.tensor([0] * 2 + [2] * 30 + [3] * 30 + [6] + [C] * 200)
    gl = map_group_labels(labels, t)
    R = labels.numel()
    gen = torch.Generator().manual_seed(0)
    w = select_others(gl, 8.0, generator=gen)
    assert w.shape == (R, 5) and w.dtype == torch.bool
    assert w[:, 0].all()
    for g in range(1, 5):
        pos, oth = gl[:, g] > 0, gl[:, g] == 0
        k = math.floor(8.0 * int(pos.sum()))
        n_sel_other = int((w[:, g] & oth).sum())
        if pos.sum() == 0:
            assert not w[:, g].any()
        else:
            assert w[pos, g].all()
            assert n_sel_other == min(k, int(oth.sum()))
    assert int(w[:, 1].sum()) == 2 + 16
    assert w[:, 2].all() and not w[:, 3].any() and int(w[:, 4].sum()) == 1 + 8
    # reproducible for a seed, different for another seed
    w_again = select_others(gl, 8.0, generator=torch.Generator().manual_seed(0))
    w_other = select_others(gl, 8.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(w, w_again) and not torch.equal(w, w_other)
    # fractional ratio uses floor
    w_half = select_others(gl, 2.5, generator=gen)
    assert int((w_half[:, 4] & (gl[:, 4] == 0)).sum()) == 2


def test_select_others_is_uniform():
    t = build_group_tables([0, 500])
    # C = 2, label 2 = background; G1: 1 positive and 19 others, ratio 3 -> 3 others picked
    labels = torch.tensor([0] + [2] * 19)
    gl = map_group_labels(labels, t)
    gen = torch.Generator().manual_seed(5)
    freq = torch.stack([select_others(gl, 3.0, generator=gen)[1:, 1] for _ in range(600)]).double()
    p = freq.mean(0)  # expected 3 / 19 ~= 0.158 for every "other" row
    assert (freq.sum(1) == 3).all()
    assert (p - 3 / 19).abs().max() < 0.06


def test_no_positive_group_zero_loss_and_zero_gradient():
    t = build_group_tables(EDGE_COUNTS)
    C = t.num_classes
    logits, _ = _random_batch(t, 50, seed=4)
    logits.requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 6] * 5 + [C] * 30)  # no class of G3 (classes 4, 5)
    loss, terms = bags_loss(
        logits, labels, t, generator=torch.Generator().manual_seed(0), return_terms=True
    )
    assert terms["loss_cls_g3"].item() == 0.0
    loss.backward()
    s, n = t.slices[3].tolist()
    assert torch.count_nonzero(logits.grad[:, s : s + n]) == 0
    assert torch.count_nonzero(logits.grad[:, :s]) > 0


def test_gradient_closed_form():
    t = build_group_tables(EDGE_COUNTS)
    C = t.num_classes
    logits, _ = _random_batch(t, 80, seed=5)
    labels = torch.tensor([0, 2, 3, 4, 6] + [C] * 75)
    logits.requires_grad_(True)
    w = select_others(map_group_labels(labels, t), 8.0, generator=torch.Generator().manual_seed(2))
    assert not w.all()  # some rows are unselected in foreground groups
    bags_loss(logits, labels, t, selection=w).backward()
    gl = map_group_labels(labels, t)
    for g, (s, n) in enumerate(t.slices.tolist()):
        grad = logits.grad[:, s : s + n]
        p = torch.softmax(logits.detach()[:, s : s + n], dim=1)
        expected = (p - nn.functional.one_hot(gl[:, g], n).float()) / w[:, g].sum()
        expected[~w[:, g]] = 0
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
        assert torch.count_nonzero(grad[~w[:, g]]) == 0
        assert grad[w[:, g]].sum(1).abs().max() < 1e-6


def test_loss_low_precision_computed_in_float32():
    t = build_group_tables(EDGE_COUNTS)
    logits, labels = _random_batch(t, 20, seed=6)
    sel = torch.ones(20, 5, dtype=torch.bool)
    half = logits.to(torch.bfloat16)
    loss = bags_loss(half, labels, t, selection=sel)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, bags_loss(half.float(), labels, t, selection=sel))


def test_vgpu_chunks():
    t = build_group_tables(EDGE_COUNTS)
    C = t.num_classes
    logits, _ = _random_batch(t, 60, seed=7)
    # chunk 0 has a G1 positive (class 0), chunk 1 does not
    labels = torch.tensor([0, 2, 4, 6] + [C] * 26 + [3, 5, 6] + [C] * 27)
    chunk = torch.tensor([0] * 30 + [1] * 30)
    gen = torch.Generator().manual_seed(0)
    w = select_others(map_group_labels(labels, t), 8.0, gen, chunk_index=chunk, num_chunks=2)
    # selection counted per chunk: chunk 0 G1 has 1 positive -> 8 others; chunk 1 none
    assert int(w[:30, 1].sum()) == 9 and not w[30:, 1].any()
    assert int(w[30:, 2].sum()) == 9 and int(w[:30, 2].sum()) == 9

    loss, terms = bags_loss(
        logits, labels, t, chunk_index=chunk, num_chunks=2, selection=w, return_terms=True
    )
    l0, t0 = bags_loss(logits[:30], labels[:30], t, selection=w[:30], return_terms=True)
    l1, t1 = bags_loss(logits[30:], labels[30:], t, selection=w[30:], return_terms=True)
    assert t1["loss_cls_g1"].item() == 0.0 and t0["loss_cls_g1"].item() > 0
    torch.testing.assert_close(loss, (l0 + l1) / 2)
    torch.testing.assert_close(terms["loss_cls_g1"], t0["loss_cls_g1"] / 2)
    # with everything selected (no RNG involved) the same identity holds
    lc = bags_loss(logits, labels, t, ratio=1000.0, chunk_index=chunk, num_chunks=2)
    la = bags_loss(logits[:30], labels[:30], t, ratio=1000.0)
    lb = bags_loss(logits[30:], labels[30:], t, ratio=1000.0)
    torch.testing.assert_close(lc, (la + lb) / 2)
    with pytest.raises(ValueError):
        bags_loss(logits, labels, t, num_chunks=2)


def test_loss_empty_batch():
    t = build_group_tables(EDGE_COUNTS)
    logits = torch.zeros(0, t.num_logits, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    loss = bags_loss(logits, labels, t, generator=torch.Generator().manual_seed(0))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == (0, t.num_logits)


# ----------------------------------------------------------------------------- merge
def test_merge_closed_form_and_bounds():
    t = build_group_tables(EDGE_COUNTS)
    C = t.num_classes
    # hand-built row: G0 = (bg, fg) logits (0, log 3) -> p0 = (1/4, 3/4);
    # G1 = (others, c0, c1) = (0, 0, log 2) -> (1/4, 1/4, 1/2); other groups uniform
    row = torch.zeros(t.num_logits)
    row[1] = math.log(3.0)
    row[4] = math.log(2.0)
    s = bags_merge(row[None], t)
    assert s.shape == (1, C + 1) and s.dtype == torch.float32
    fg = 3 / 4
    expected = torch.tensor([fg / 4, fg / 2] + [fg / 3] * 4 + [fg / 2] + [1 / 4])
    torch.testing.assert_close(s[0], expected)

    logits, _ = _random_batch(t, 25, seed=8)
    probs = bags_merge(logits, t)
    # float32 computation: compared at float32 precision against the float64 reference
    torch.testing.assert_close(probs, _naive_merge(logits, t).float())
    p0 = torch.softmax(logits[:, :2], 1)
    sums = probs.sum(1)
    assert torch.equal(probs[:, C], p0[:, 0])  # background last
    assert (sums >= p0[:, 0] - 1e-6).all() and (sums <= p0[:, 0] + 4 * p0[:, 1] + 1e-6).all()
    assert bags_merge(torch.zeros(0, t.num_logits), t).shape == (0, C + 1)
    assert bags_merge(logits.half(), t).dtype == torch.float32


def test_merge_permutation_within_group():
    counts = _counts_with_bins([6, 5, 4, 3], seed=3)
    t = build_group_tables(counts)
    logits, _ = _random_batch(t, 10, seed=9)
    g = 2
    classes = torch.nonzero(t.class_group == g).flatten()  # ascending ids = in-group order
    perm = torch.randperm(classes.numel(), generator=torch.Generator().manual_seed(0))
    permuted = logits.clone()
    permuted[:, t.class_column[classes]] = logits[:, t.class_column[classes[perm]]]
    a, b = bags_merge(logits, t), bags_merge(permuted, t)
    torch.testing.assert_close(b[:, classes], a[:, classes[perm]])
    others = torch.ones(t.num_classes + 1, dtype=torch.bool)
    others[classes] = False
    torch.testing.assert_close(b[:, others], a[:, others])


# ----------------------------------------------------------------------------- helpers
def test_label_mapping_round_trip():
    C = 1230
    v1 = torch.tensor([0, 1, 2, C - 1, C])
    d2 = mmdet_v1_to_d2_labels(v1, C)
    assert d2.tolist() == [C, 0, 1, C - 2, C - 1]
    assert torch.equal(d2_to_mmdet_v1_labels(d2, C), v1)
    every = torch.arange(C + 1)
    assert torch.equal(mmdet_v1_to_d2_labels(d2_to_mmdet_v1_labels(every, C), C), every)
    with pytest.raises(ValueError):
        mmdet_v1_to_d2_labels(torch.tensor([C + 1]), C)


def test_classifier_init():
    torch.manual_seed(0)
    layer = nn.Linear(1024, 1209)
    assert bags_classifier_init_(layer) is layer
    assert layer.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(layer.weight.mean().item()) < 1e-4
    assert torch.count_nonzero(layer.bias) == 0


def test_lvis_v1_scale_runs():
    counts = _counts_with_bins([337, 461, 250, 155], seed=11)  # C = 1203
    t = build_group_tables(counts)
    assert t.num_logits == 1209
    R = 1024
    logits, _ = _random_batch(t, R, seed=12)
    logits.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    labels = torch.full((R,), t.num_classes)
    labels[:256] = torch.randint(0, t.num_classes, (256,), generator=g)
    chunk = torch.arange(R) // 512
    loss, terms = bags_loss(
        logits, labels, t, generator=g, chunk_index=chunk, num_chunks=2, return_terms=True
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(sum(terms.values()), loss)
    probs = bags_merge(logits.detach(), t)
    assert probs.shape == (R, 1204)
