"""Object memory: ring buffers, RIO replay, LOCE MFS jitter/sampling, wiring into the ROI heads,
checkpointing of per-process memories, the class-balanced initialisation pass, the cosine layer."""
import logging
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from longtail import Trainer, add_longtail_config
from longtail.checkpoint import LongTailCheckpointer, process_state_path
from longtail.datasets import IMAGE_COUNT
from longtail.equilibrium import memory_score_entries, update_mean_scores
from longtail.hooks import build_memory_init_loader, progress_line, run_memory_init_pass
from longtail.layers import CosineClassifier
from longtail.memory import (
    MemoryRows,
    ObjectMemory,
    cached_classes_from_image_counts,
    dequantize_rows,
    jitter_boxes,
    jitter_sign_matrix,
    memory_bytes,
    mfs_class_probabilities,
    quantize_rows,
    ring_push_destinations,
    ring_recent_positions,
)
from longtail.samplers import ClassBalancedStream, class_balanced_lists

MINI = ("longtail_synth_mini_train",)


# ------------------------------------------------------------------------------------------------
# ring buffers
# ------------------------------------------------------------------------------------------------
def id_memory(classes=(0,), capacity=5, banks=1, keep="last", num_classes=4, dtype="float32"):
    """A memory whose 1-d features are push ids, so contents can be read back as integers."""
    return ObjectMemory(num_classes, classes, banks, capacity, (1,), keep, dtype)


def push_ids(mem, ids, label=0, chunk=0):
    ids = torch.as_tensor(ids, dtype=torch.float32)
    n = ids.numel()
    box = torch.tensor([[0.0, 0, 10, 10]]).repeat(n, 1)
    mem.push(ids[:, None], torch.full((n,), label), torch.full((n,), chunk), box, box + ids[:, None])


def bank_contents(mem, label=0, chunk=0):
    """Entries of a ring, oldest to newest."""
    g = chunk * mem.num_slots + int(mem.class_to_slot[label])
    f, p, q = int(mem.fill[g]), int(mem.ptr[g]), mem.capacity
    pos = [(p - f + a) % q for a in range(f)]
    return [int(mem.features[g * q + x, 0]) for x in pos]


def test_push_destinations_first_and_last():
    ptr = torch.tensor([3, 0])
    fill = torch.tensor([3, 0])
    groups = torch.tensor([0, 0, 1, 0, -1, 0, 0, 0])  # group 0 gets 6 rows, group 1 one
    dest, new_ptr, new_fill = ring_push_destinations(ptr, fill, groups, 4, keep="last")
    # last: the last 4 rows of group 0 survive at ptr + rank (mod 4), the pointer moves by 6
    expect = {3: 0 * 4 + (3 + 2) % 4, 5: (3 + 3) % 4, 6: (3 + 4) % 4, 7: (3 + 5) % 4}
    for row in range(8):
        assert int(dest[row]) == (expect[row] if row in expect else (4 if row == 2 else -1))
    assert new_ptr.tolist() == [(3 + 6) % 4, 1] and new_fill.tolist() == [4, 1]
    dest, new_ptr, new_fill = ring_push_destinations(ptr, fill, groups, 4, keep="first")
    # first: rows 0, 1, 3, 5 (the first four) at 3, 0, 1, 2
    assert dest.tolist() == [3, 0, 4, 1, -1, 2, -1, -1]
    assert new_ptr.tolist() == [(3 + 4) % 4, 1] and new_fill.tolist() == [4, 1]


def test_fifo_overwrite_order_and_capacity():
    mem = id_memory(capacity=5)
    push_ids(mem, [1, 2, 3])
    assert bank_contents(mem) == [1, 2, 3]
    push_ids(mem, [4, 5, 6, 7])  # wraps around, drops the oldest
    assert bank_contents(mem) == [3, 4, 5, 6, 7]
    push_ids(mem, range(8, 20))  # more than Q in one push: the newest Q stay
    assert bank_contents(mem) == [15, 16, 17, 18, 19]
    assert int(mem.fill[0]) == 5
    # "first" (LOCE): 150 rows of one class in one push -> only the first Q are written
    mfs = id_memory(capacity=80, keep="first")
    push_ids(mfs, range(150))
    assert bank_contents(mfs) == list(range(80))
    push_ids(mfs, range(1000, 1010))  # FIFO overwrite of the oldest
    assert bank_contents(mfs) == list(range(10, 80)) + list(range(1000, 1010))
    assert int(mfs.ptr[0]) == 10 and int(mfs.fill[0]) == 80


def test_rio_worked_example_of_the_spec():
    # rio.md section 3: m = 3, Q = 5, one cached class, entries numbered by push order
    mem = id_memory(capacity=5)
    steps = [([1, 2, 3, 4], True, []), ([5, 6], True, [2, 3, 4]), ([], False, []),
             ([7, 8, 9, 10, 11, 12, 13], True, [4, 5, 6])]
    banks = [[1, 2, 3, 4], [2, 3, 4, 5, 6], [2, 3, 4, 5, 6], [9, 10, 11, 12, 13]]
    for (pushed, present, replayed), bank in zip(steps, banks):
        labels = torch.tensor([0] * len(pushed) if present else [3, 4])  # 3, 4: not cached
        rows = mem.replay_recent(labels, torch.zeros_like(labels), 3)
        assert rows.features[:, 0].long().tolist() == replayed  # sampled before the push
        assert rows.labels.tolist() == [0] * len(replayed)
        if pushed:
            push_ids(mem, pushed)
        assert bank_contents(mem) == bank


def test_presence_and_push_rules():
    mem = id_memory(classes=(1, 2), capacity=4, num_classes=5)
    box = torch.tensor([[0.0, 0, 5, 5]]).repeat(6, 1)
    labels = torch.tensor([1, 5, 3, 1, 2, 5])  # 5 = background, 3 = not cached
    mem.push(torch.arange(6.0)[:, None], labels, torch.zeros(6), box, box)
    assert int(mem.fill.sum()) == 3  # only the cached foreground rows
    assert bank_contents(mem, 1) == [0, 3] and bank_contents(mem, 2) == [4]
    # class 2 absent from the batch: not replayed although stored
    rows = mem.replay_recent(torch.tensor([1, 5, 3]), torch.zeros(3), 20)
    assert rows.labels.tolist() == [1, 1]
    # a class seen for the first time has nothing to replay
    fresh = id_memory(classes=(1,), num_classes=5)
    assert len(fresh.replay_recent(torch.tensor([1, 1]), torch.zeros(2), 20)) == 0


def test_banks_are_independent_and_rows_follow_their_images():
    # two banks (VGPU chunks); images with 8 and 6 sampled rows, then 6 and 8
    mem = id_memory(classes=(0,), capacity=20, banks=2)
    for sizes in ((8, 6), (6, 8)):
        chunk = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
        ids = torch.arange(float(sum(sizes)))
        box = torch.tensor([[0.0, 0, 5, 5]]).repeat(len(ids), 1)
        mem.push(ids[:, None], torch.zeros(len(ids), dtype=torch.long), chunk, box, box)
    assert bank_contents(mem, 0, 0) == list(range(8)) + list(range(6))
    assert bank_contents(mem, 0, 1) == list(range(8, 14)) + list(range(6, 14))
    # present in chunk 0 only: replayed only there
    rows = mem.replay_recent(torch.tensor([0, 4]), torch.tensor([0, 1]), 3)
    assert rows.chunk.tolist() == [0, 0, 0] and rows.features[:, 0].tolist() == [3, 4, 5]


def test_random_select_draws_distinct_stored_entries():
    ptr, fill = torch.tensor([2, 3]), torch.tensor([5, 3])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        groups, slots = ring_recent_positions(ptr, fill, torch.tensor([3, 3]), 5, g, True)
        first = slots[groups == 0].tolist()
        assert len(set(first)) == 3 and all(0 <= s < 5 for s in first)
        seen.update(first)
        # a ring holding exactly k entries returns them all, oldest first
        assert slots[groups == 1].tolist() == [5 + 0, 5 + 1, 5 + 2]
    assert seen == set(range(5))


def test_storage_dtypes_and_bytes():
    x = torch.randn(64, 49) * 3
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8
    assert (dequantize_rows(q, s) - x).abs().max() <= s.max() / 2 + 1e-6
    for dtype in ("float16", "bfloat16", "int8"):
        mem = ObjectMemory(3, [0, 1, 2], 2, 4, (2, 7, 7), "first", dtype)
        feats = torch.randn(5, 2, 7, 7)
        box = torch.tensor([[0.0, 0, 5, 5]]).repeat(5, 1)
        mem.push(feats, torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 0, 0]), box, box)
        rows = mem.sample_classes(torch.tensor([1.0, 0.0, 0.0]), 2, 3)  # class 0: both banks
        assert rows.valid.all() and rows.features.shape == (12, 2, 7, 7)
        picked = rows.features.float()  # class 0 holds feats[0] (bank 0) and feats[1] (bank 1)
        tol = {"float16": 2e-3, "bfloat16": 2e-2, "int8": 2e-2}[dtype] * feats.abs().max()
        for bank, src in ((0, feats[0]), (1, feats[1])):
            assert ((picked[rows.chunk == bank] - src).abs() <= tol).all(), dtype
        assert mem.nbytes() == memory_bytes(2, 3, 4, 98, getattr(torch, dtype if dtype != "int8" else "int8"))


# ------------------------------------------------------------------------------------------------
# MFS: jitter and sampling
# ------------------------------------------------------------------------------------------------
def test_jitter_signs_formula_clamp_and_validity():
    signs = jitter_sign_matrix()
    assert signs.shape == (4, 16)
    assert len({tuple(c.tolist()) for c in signs.t()}) == 16  # all sign patterns
    assert signs[:, 5].tolist() == [-1, 1, -1, 1]  # k = 0101 (MSB first)
    gt = torch.tensor([[20.0, 30, 50, 90], [0, 0, 8, 4]])
    u = torch.rand(1, 4, 16).expand(2, 4, 16)  # one draw for the image, shared by its gts
    sizes = torch.tensor([[100.0, 60], [100, 60]])  # H, W
    boxes, valid = jitter_boxes(gt, u, sizes, 1 / 6)
    assert boxes.shape == (2, 16, 4)
    w, h = 30.0, 60.0
    expect = gt[0][None] + (1 / 6) * signs.t() * u[0].t() * torch.tensor([w, h, w, h])
    expect[:, 0::2] = expect[:, 0::2].clamp(0, 59)
    expect[:, 1::2] = expect[:, 1::2].clamp(0, 99)
    assert torch.allclose(boxes[0], expect, atol=1e-5)
    assert (boxes[..., 0::2] >= 0).all() and (boxes[..., 0::2] <= 59).all()
    assert (boxes[..., 1::2] >= 0).all() and (boxes[..., 1::2] <= 99).all()
    # unclamped jitter keeps IoU >= 4/9 with its gt
    big = torch.tensor([[10.0, 10, 40, 40]])
    b, v = jitter_boxes(big, torch.rand(1, 4, 16), torch.tensor([[1000.0, 1000]]))
    assert v.all()
    assert pairwise_iou(Boxes(b[0]), Boxes(big)).min() >= 4 / 9 - 1e-6
    # a tiny gt at the bottom-right border collapses after clamping: flagged invalid
    tiny = torch.tensor([[59.5, 99.5, 60.0, 100.0]])
    b, v = jitter_boxes(tiny, torch.ones(1, 4, 16) * 0.9, torch.tensor([[100.0, 60]]))
    assert not v.all()
    assert ((b[0, :, 2] > b[0, :, 0]) & (b[0, :, 3] > b[0, :, 1]) == v[0]).all()


def test_mfs_class_frequencies_follow_inverse_mean_score():
    # chi-square goodness of fit of 1e5 class draws against p_c ~ 1 / (m_c + 1e-7)
    C = 6
    m = torch.tensor([0.5, 0.2, 0.05, 0.01, 0.3, 0.001, 0.01])  # last = background
    p = mfs_class_probabilities(m)
    assert p.shape == (C,) and torch.allclose(p.sum(), torch.tensor(1.0))
    assert torch.allclose(p, (1 / (m[:C] + 1e-7)) / (1 / (m[:C] + 1e-7)).sum())
    mem = ObjectMemory(C, range(C), 1, 4, (1,), "first")
    box = torch.tensor([[0.0, 0, 5, 5]]).repeat(C, 1)
    mem.push(torch.zeros(C, 1), torch.arange(C), torch.zeros(C), box, box)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(C)
    draws = 0
    while draws < 100_000:
        rows = mem.sample_classes(p, 8, 1, g)
        counts += torch.bincount(rows.labels, minlength=C).float()
        draws += 8
    expected = p * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001
    assert chi2 < 20.5, (chi2, counts, expected)


def test_mfs_sampling_skips_empty_queues_and_stays_in_the_fill():
    mem = ObjectMemory(4, range(4), 2, 10, (1,), "first")
    box = torch.tensor([[0.0, 0, 5, 5]]).repeat(3, 1)
    mem.push(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1, 1, 1]), torch.zeros(3), box, box)
    g = torch.Generator().manual_seed(1)
    rows = mem.sample_classes(torch.full((4,), 0.25), 8, 4, g)
    assert len(rows) == 2 * 8 * 4 and rows.valid is not None
    fill = mem.fill_counts()[rows.chunk, rows.labels]
    assert torch.equal(rows.valid, fill > 0)  # empty queues give no (valid) rows
    assert set(rows.features[rows.valid, 0].tolist()) <= {1.0, 2.0, 3.0}  # only stored entries
    assert (rows.chunk[rows.valid] == 0).all()  # bank 1 holds nothing


# ------------------------------------------------------------------------------------------------
# wiring into the predictor and the ROI heads
# ------------------------------------------------------------------------------------------------
def make_cfg(config="configs/Synthetic/rio_R18_FPN.yaml", **extra):
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.DATASETS.TRAIN = MINI
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.merge_from_list([x for kv in extra.items() for x in kv])
    return cfg


def batch_of(cfg, n=4):
    return next(iter(Trainer.build_train_loader(cfg)))[:n]


def _rows(labels, chunk, feat_dim, valid=None):
    n = len(labels)
    xy = torch.rand(n, 2) * 20
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2) * 10], 1)
    return MemoryRows(
        features=torch.randn(n, feat_dim).relu(), labels=torch.tensor(labels),
        chunk=torch.tensor(chunk), proposal_boxes=boxes, gt_boxes=boxes + torch.rand(n, 4),
        valid=None if valid is None else torch.tensor(valid),
    )


def _proposals(C, sizes, seed=0):
    torch.manual_seed(seed)
    out = []
    for n in sizes:
        p = Instances((64, 64))
        xy = torch.rand(n, 2) * 30
        p.proposal_boxes = Boxes(torch.cat([xy, xy + 5 + torch.rand(n, 2) * 20], 1))
        p.gt_boxes = Boxes(p.proposal_boxes.tensor + torch.rand(n, 4))
        p.gt_classes = torch.where(torch.rand(n) < 0.3, torch.randint(0, C, (n,)), torch.tensor(C))
        p.gt_inds = torch.arange(n) % 3
        out.append(p)
    return out


def test_memory_rows_are_ordinary_rows_of_both_losses():
    """Augmented losses equal detectron2's standard losses on the concatenated rows (n = N + M)."""
    cfg = make_cfg(**{"MODEL.LONGTAIL.CLS_LAYER": "linear", "MODEL.LONGTAIL.IMS_PER_VGPU": 0})
    model = Trainer.build_model(cfg)
    pred = model.roi_heads.box_predictor
    C = pred.num_classes
    props = _proposals(C, (40, 25))
    mem = _rows([2, 2, 7, 30], [0, 0, 0, 0], pred.cls_score.in_features)
    x = torch.cat([torch.randn(65, mem.features.shape[1]).relu(), mem.features])
    predictions = pred(x)
    with EventStorage(0):
        ours = pred.losses(predictions, props, mem)
        as_instances = Instances((64, 64))
        as_instances.proposal_boxes = Boxes(mem.proposal_boxes)
        as_instances.gt_boxes = Boxes(mem.gt_boxes)
        as_instances.gt_classes = mem.labels
        reference = FastRCNNOutputLayers.losses(pred, predictions, props + [as_instances])
        without = pred.losses(tuple(t[:65] for t in predictions), props)
        reference0 = FastRCNNOutputLayers.losses(pred, tuple(t[:65] for t in predictions), props)
    for k in ("loss_cls", "loss_box_reg"):
        assert torch.allclose(ours[k], reference[k], rtol=1e-6), k
        assert torch.allclose(without[k], reference0[k], rtol=1e-6), k  # M = 0: the baseline
        assert not torch.allclose(ours[k], without[k])


def test_invalid_memory_rows_count_nowhere():
    cfg = make_cfg("configs/Synthetic/loce_stage2_ebl_mfs.yaml", **{"MODEL.LONGTAIL.IMS_PER_VGPU": 2})
    model = Trainer.build_model(cfg)
    pred = model.roi_heads.box_predictor
    C = pred.num_classes
    props = _proposals(C, (30, 20, 25, 10))
    dim = pred.cls_score.in_features
    valid_rows = _rows([3, 3, 9, 3], [0, 0, 1, 1], dim)
    with_invalid = MemoryRows(
        features=torch.cat([valid_rows.features, torch.randn(3, dim)]),
        labels=torch.cat([valid_rows.labels, torch.tensor([5, 6, 7])]),
        chunk=torch.cat([valid_rows.chunk, torch.tensor([0, 1, 1])]),
        proposal_boxes=torch.cat([valid_rows.proposal_boxes, torch.zeros(3, 4)]),
        gt_boxes=torch.cat([valid_rows.gt_boxes, torch.zeros(3, 4)]),
        valid=torch.tensor([True] * 4 + [False] * 3),
    )
    x = torch.randn(85, dim).relu()
    m0 = torch.rand(C + 1) * 0.5
    out = []
    for rows in (valid_rows, with_invalid):
        pred.cls_loss.mean_scores.copy_(m0)
        with EventStorage(0):
            losses = pred.losses(pred(torch.cat([x, rows.features])), props, rows)
        out.append((losses, pred.cls_loss.mean_scores.clone()))
    (a, ma), (b, mb) = out
    assert torch.allclose(a["loss_cls"], b["loss_cls"], rtol=1e-6)
    assert torch.allclose(a["loss_box_reg"], b["loss_box_reg"], rtol=1e-6)
    assert torch.equal(ma, mb)
    assert torch.isfinite(b["loss_box_reg"])


def test_memory_rows_enter_the_mean_scores_once_per_bank_and_class():
    probs = torch.softmax(torch.randn(6, 5), 1)
    labels = torch.tensor([1, 1, 2, 1, 3, 3])
    chunk = torch.tensor([0, 0, 0, 1, 1, 1])
    valid = torch.tensor([True, True, True, True, True, False])
    sums, counts = memory_score_entries(probs, labels, chunk, 2, valid)
    assert counts.tolist() == [0, 2, 1, 1, 0]
    expect1 = (probs[0, 1] + probs[1, 1]) / 2 + probs[3, 1]
    assert torch.allclose(sums[1], expect1) and torch.allclose(sums[3], probs[4, 3])


def test_replayed_rows_reach_only_the_predictor():
    cfg = make_cfg()
    model = Trainer.build_model(cfg)
    heads = model.roi_heads
    pred = heads.box_predictor
    data = batch_of(cfg)
    model.train()
    with EventStorage(0):
        model(data)  # fills the memory
        assert heads.memory.fill.sum() > 0
        stored = heads.memory.fill_counts().sum(0) > 0
        labels = heads.memory.slot_to_class[stored].repeat(2)
        rows = heads.memory.replay_recent(labels, torch.zeros_like(labels), 20)
        assert len(rows) > 0 and not rows.features.requires_grad
        model.zero_grad()
        losses = pred.losses(pred(rows.features), [], rows)  # the replayed rows alone
        sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads.items():
        if name.startswith("roi_heads.box_predictor."):
            assert g is not None and g.abs().sum() > 0, name
        else:
            assert g is None or g.abs().sum() == 0, name


def test_rio_training_step_replays_and_pushes():
    cfg = make_cfg()
    model = Trainer.build_model(cfg)
    heads = model.roi_heads
    counts = MetadataCatalog.get(MINI[0]).get(IMAGE_COUNT)
    assert heads.memory.classes == [c for c, n in enumerate(counts) if n <= 30]
    assert isinstance(heads.box_predictor.cls_score, CosineClassifier)
    data = batch_of(cfg)
    model.train()
    seen = []
    original = heads.box_predictor.losses

    def spy(predictions, proposals, memory_rows=None):
        seen.append((predictions[0].shape[0], sum(len(p) for p in proposals), memory_rows))
        return original(predictions, proposals, memory_rows)

    heads.box_predictor.losses = spy
    with EventStorage(0) as storage:
        for it in range(3):
            storage.iter = it
            losses = model(data)
            assert all(torch.isfinite(v) for v in losses.values())
    (n0, r0, m0), _, (n2, r2, m2) = seen
    assert len(m0) == 0 and n0 == r0  # nothing stored before the first push
    assert len(m2) > 0 and n2 == r2 + len(m2)  # same batch again: its cached classes replay
    assert set(m2.labels.tolist()) <= set(heads.memory.classes)
    # eval mode never touches the memory
    before = heads.memory.features.clone(), heads.memory.fill.clone()
    model.eval()
    with torch.no_grad():
        model([{k: v for k, v in d.items() if k != "instances"} for d in data[:1]])
    assert torch.equal(before[0], heads.memory.features) and torch.equal(before[1], heads.memory.fill)


def test_mfs_step_uses_the_mean_scores_of_before_the_update(monkeypatch):
    cfg = make_cfg("configs/Synthetic/loce_stage2_ebl_mfs.yaml")
    model = Trainer.build_model(cfg)
    heads = model.roi_heads
    pred = heads.box_predictor
    m0 = torch.rand(pred.num_classes + 1) * 0.3 + 0.01
    pred.cls_loss.mean_scores.copy_(m0)
    import longtail.memory_policies as rh

    seen = []
    real = rh.mfs_class_probabilities

    def spy(m, eps):
        seen.append(m.clone())
        return real(m, eps)

    monkeypatch.setattr(rh, "mfs_class_probabilities", spy)
    data = batch_of(cfg)
    model.train()
    with EventStorage(0):
        losses = model(data)
    assert torch.equal(seen[0], m0)  # sampling with the old m
    assert not torch.equal(pred.cls_loss.mean_scores, m0)  # updated within the step
    # every gt box of the batch was jittered and pushed (first 80 per class and bank)
    n_gt = sum(len(d["instances"]) for d in data)
    assert 0 < int(heads.memory.fill.sum()) <= 16 * n_gt
    assert "loss_mask" in losses and torch.isfinite(losses["loss_cls"])


def test_mfs_stored_targets_are_the_jitter_deltas():
    cfg = make_cfg("configs/Synthetic/loce_stage2_ebl_mfs.yaml", **{"MODEL.MEMORY.CAPACITY": 200})
    model = Trainer.build_model(cfg)
    heads = model.roi_heads
    data = batch_of(cfg, 2)
    model.train()
    with EventStorage(0):
        model(data)
    mem = heads.memory
    g = 0 * mem.num_slots + int(mem.class_to_slot[int(data[0]["instances"].gt_classes[0])])
    rows = mem.boxes[g * mem.capacity: g * mem.capacity + int(mem.fill[g])]
    jittered, gt = rows[:, :4], rows[:, 4:]
    gt0 = data[0]["instances"].gt_boxes.tensor[0]
    assert torch.allclose(gt[0], gt0)
    # jittered boxes lie within 1/6 of the gt's size of it
    size = (gt0[2:] - gt0[:2]).repeat(2)
    first16 = jittered[:16]
    assert ((first16 - gt0).abs() <= size / 6 + 1e-4).all()
    deltas = heads.box_predictor.box2box_transform.get_deltas(jittered, gt)
    assert torch.isfinite(deltas).all()


def test_memory_survives_checkpoint_and_resume(tmp_path):
    cfg = make_cfg()
    model = Trainer.build_model(cfg)
    mem = model.roi_heads.memory
    data = batch_of(cfg)
    model.train()
    with EventStorage(0):
        model(data)
    assert mem.fill.sum() > 0
    ck = LongTailCheckpointer(model, save_dir=str(tmp_path))
    ck.save("model_0000009", iteration=9)
    ck.save("model_0000019", iteration=19)
    assert not (tmp_path / "model_0000009.rank0.pth").exists()  # only the newest is kept
    assert (tmp_path / "model_0000019.rank0.pth").exists()
    other = Trainer.build_model(cfg)
    path = str(tmp_path / "model_0000019.pth")
    LongTailCheckpointer(other).load(path, checkpointables=[])  # weights only: memory empty
    assert other.roi_heads.memory.fill.sum() == 0
    LongTailCheckpointer(other).load(path)  # resume
    om = other.roi_heads.memory
    for name in ("features", "boxes", "ptr", "fill", "scales"):
        assert torch.equal(getattr(om, name), getattr(mem, name)), name
    assert process_state_path(path, 3).endswith("model_0000019.rank3.pth")


# ------------------------------------------------------------------------------------------------
# bad configurations
# ------------------------------------------------------------------------------------------------
def test_bad_memory_configuration_fails_at_build_time():
    from detectron2.modeling import build_model

    cfg = make_cfg("configs/Synthetic/loce_stage2_ebl_mfs.yaml", **{"MODEL.LONGTAIL.CLS_LOSS": "softmax_ce"})
    with pytest.raises(ValueError, match="MODEL.LONGTAIL.CLS_LOSS"):
        build_model(cfg)
    MetadataCatalog.get("longtail_test_memory_no_meta").set(evaluator_type="lvis")
    cfg = make_cfg()
    cfg.DATASETS.TRAIN = ("longtail_test_memory_no_meta",)
    with pytest.raises(ValueError, match=IMAGE_COUNT):
        build_model(cfg)
    cfg = make_cfg(**{"MODEL.RIO.CACHE_MAX_IMAGE_COUNT": 0})
    with pytest.raises(ValueError, match="CACHE_MAX_IMAGE_COUNT"):
        build_model(cfg)
    cfg = make_cfg(**{"MODEL.ROI_BOX_HEAD.NUM_FC": 0, "MODEL.ROI_BOX_HEAD.NUM_CONV": 1})
    with pytest.raises(ValueError, match="NUM_FC"):
        build_model(cfg)
    cfg = make_cfg(**{"MODEL.MEMORY.POLICY": "replay_everything"})
    with pytest.raises(ValueError, match="MODEL.MEMORY.POLICY"):
        build_model(cfg)
    cfg = make_cfg(**{"MODEL.MEMORY.DTYPE": "float8"})
    with pytest.raises(ValueError, match="MODEL.MEMORY.DTYPE"):
        build_model(cfg)


def test_cached_classes_threshold():
    assert cached_classes_from_image_counts([1, 30, 31, 5, 100], 30) == [0, 1, 3]


# ------------------------------------------------------------------------------------------------
# class-balanced initialisation pass
# ------------------------------------------------------------------------------------------------
def test_class_balanced_lists_tile_and_split():
    dicts = [
        {"annotations": [{"category_id": 0}, {"category_id": 2}]},
        {"annotations": [{"category_id": 0}]},
        {"annotations": []},  # empty image: never listed
        {"annotations": [{"category_id": 0}, {"category_id": 0}]},
    ]
    lists = class_balanced_lists(dicts, images_per_class=2, num_vgpus=2)
    # category 0 images [0, 1, 3] tiled to [0, 1, 3, 0]; VGPU 0 takes 0, 3 and VGPU 1 takes 1, 0
    # category 2 images [0] tiled to [0, 0, 0, 0]; category 1 has no image
    assert lists == [[0, 3, 0, 0], [1, 0, 0, 0]]
    stream = ClassBalancedStream(lists, ims_per_vgpu=2, repeat=False)
    # each process batch holds the next 2 images of VGPU 0, then of VGPU 1
    assert list(stream) == [0, 3, 1, 0, 0, 0, 0, 0]


def test_init_pass_progress_line_extrapolates_the_eta():
    # 25 of 100 steps in 50 s: 2 s per step, 75 steps left -> 150 s
    assert progress_line(25, 100, 50.0) == "25/100 steps (25%), 0:00:50 elapsed, ETA 0:02:30"
    assert progress_line(0, 7, 0.0).endswith("ETA ?")
    assert progress_line(3, 3, 7322.0) == "3/3 steps (100%), 2:02:02 elapsed, ETA 0:00:00"


def test_init_pass_replaces_unreadable_images_with_skip_bad_images(tmp_path, caplog):
    """Before: SKIP_BAD_IMAGES covered the training stream only, and a missing file stopped the
    MFS initialisation pass. Now the pass maps another record in its place (and without the
    option it still fails naming the file)."""
    from detectron2.data.build import get_detection_dataset_dicts

    cfg = make_cfg(
        "configs/Synthetic/loce_stage2_ebl_mfs.yaml",
        **{"MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS": 1, "MODEL.LONGTAIL.IMS_PER_VGPU": 2},
    )
    Trainer.build_model(cfg)  # registers the metadata
    dicts = [dict(d) for d in get_detection_dataset_dicts(cfg.DATASETS.TRAIN)]
    lost = str(tmp_path / "lost.jpg")
    for d in dicts[::7]:
        d["file_name"] = lost
    with pytest.raises(Exception, match="lost.jpg"):
        list(build_memory_init_loader(cfg, dicts))
    cfg.defrost()
    cfg.LONGTAIL.SKIP_BAD_IMAGES = True
    loader = build_memory_init_loader(cfg, dicts)
    with caplog.at_level(logging.WARNING, logger="longtail.data"):
        batches = list(loader)
    images = [d for b in batches for d in b]
    assert len(images) == len(loader.sampler)  # every slot filled
    assert "lost.jpg" in caplog.text and caplog.text.count("unreadable image") == 1


def test_init_pass_fills_every_class_and_changes_no_parameter(caplog):
    cfg = make_cfg(
        "configs/Synthetic/loce_stage2_ebl_mfs.yaml",
        **{"MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS": 1, "MODEL.LONGTAIL.IMS_PER_VGPU": 2},
    )
    model = Trainer.build_model(cfg)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = build_memory_init_loader(cfg)
    counts = MetadataCatalog.get(MINI[0]).get(IMAGE_COUNT)
    with_images = [c for c, n in enumerate(counts) if n > 0]
    assert len(loader.sampler) == 2 * len(with_images)  # 1 image per class and VGPU, 2 VGPUs
    with caplog.at_level(logging.INFO, logger="longtail.hooks"):
        steps = run_memory_init_pass(model, loader, log_every_s=0.0)
    assert steps == math.ceil(len(loader.sampler) / 4)
    progress = [r.getMessage() for r in caplog.records if "MFS initialisation pass: " in
                r.getMessage()]
    assert len(progress) == steps and progress[-1].endswith("ETA 0:00:00")
    assert progress[0].startswith(f"MFS initialisation pass: 1/{steps} steps")
    fill = model.roi_heads.memory.fill_counts()
    assert (fill[:, with_images] > 0).all()
    m = model.roi_heads.box_predictor.cls_loss.mean_scores
    assert (m[with_images] != 0.01).all() and m[-1] == 0.01
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n


# ------------------------------------------------------------------------------------------------
# RIO's cosine classifier
# ------------------------------------------------------------------------------------------------
def test_cosine_classifier():
    torch.manual_seed(0)
    layer = CosineClassifier(16, 5, scale=48.0, eps=1e-5)
    assert torch.allclose(layer.weight_g, layer.weight_v.norm(dim=1))
    x = torch.randn(7, 16).relu()
    v, g = layer.weight_v.detach(), layer.weight_g.detach()
    expect = 48 * g * ((x / (x.norm(dim=1, keepdim=True) + 1e-5)) @ (v / v.norm(dim=1, keepdim=True)).t())
    assert torch.allclose(layer(x), expect, atol=1e-5)
    assert torch.allclose(layer(3 * x), layer(x), atol=1e-4)  # invariant to feature scale
    z = layer(torch.zeros(2, 16))
    assert torch.isfinite(z).all() and (z == 0).all()
    cfg = make_cfg()
    model = Trainer.build_model(cfg)
    opt = Trainer.build_optimizer(cfg, model)
    cls = model.roi_heads.box_predictor.cls_score
    decay = {id(p): grp["weight_decay"] for grp in opt.param_groups for p in grp["params"]}
    assert decay[id(cls.weight_v)] == decay[id(cls.weight_g)] == cfg.SOLVER.WEIGHT_DECAY == 1e-4


def test_memory_random_streams_reproducible_and_distinct_per_rank(monkeypatch):
    import longtail.memory_policies as mp

    def draws(rank, it, purpose=2, init_step=-1):
        monkeypatch.setattr(mp.comm, "get_rank", lambda: rank)
        with EventStorage(it):
            return torch.rand(8, generator=mp.step_generator("cpu", 0, init_step, purpose))

    assert torch.equal(draws(0, 5), draws(0, 5))  # reproducible for a seed
    assert not torch.equal(draws(0, 5), draws(1, 5))  # ranks differ
    assert not torch.equal(draws(0, 5), draws(0, 6))  # iterations differ
    assert not torch.equal(draws(0, 5, 1), draws(0, 5, 2))  # jitter vs sampling streams
    assert not torch.equal(draws(0, 0), draws(0, 0, init_step=0))  # init pass vs training
