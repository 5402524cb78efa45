"""Robustness: resumable data stream, per-process RNG state, non-finite losses, bad data,
memory footprint, mixed precision (bfloat16 autocast on CPU)."""
import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.data.build import get_detection_dataset_dicts
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from longtail import Trainer, add_longtail_config
from longtail.bags import bags_loss, bags_merge, build_group_tables
from longtail.checkpoint import rng_state, set_rng_state
from longtail.data import (
    REPLACED_KEY,
    ResumableBatchStream,
    aspect_ratio_batches,
    build_resumable_loader,
    check_image_files,
    count_replaced_images,
    replacement_candidates,
)
from longtail.datasets import clean_records, validate_lvis_json
from longtail.engine import AutocastTrainer
from longtail.equilibrium import equilibrium_loss, update_mean_scores
from longtail.layers import CosineClassifier
from longtail.memory import ObjectMemory
from longtail.samplers import build_train_sampler
from longtail.state import install_nonfinite_guard

MINI = ("longtail_synth_mini_train",)


def make_cfg(config="configs/Synthetic/rio_ebl_R18_FPN.yaml", **extra):
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


# ------------------------------------------------------------------------------------------------
# resumable training stream and generator states
# ------------------------------------------------------------------------------------------------
def _stream(cfg, workers=0):
    Trainer.build_model  # noqa: B018  (datasets are registered on import)
    from longtail.datasets import prepare_datasets

    prepare_datasets(cfg.DATASETS.TRAIN)
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)
    return build_resumable_loader(
        dicts, DatasetMapper(cfg, True), build_train_sampler(cfg, dicts), 4, cfg.SEED,
        num_workers=workers,
    )


def _signature(batch):
    return [(d["image_id"], tuple(d["image"].shape), float(d["image"].float().mean()),
             d["instances"].gt_boxes.tensor.sum().item()) for d in batch]


def test_stream_resumes_at_any_batch_with_the_same_augmentations():
    cfg = make_cfg(**{"SEED": 3, "INPUT.MIN_SIZE_TRAIN": (96, 112, 128, 144)})
    full = _stream(cfg)
    it = iter(full)
    reference = [_signature(next(it)) for _ in range(6)]
    resumed = _stream(cfg)
    resumed.dataset.skip_to(4)
    it = iter(resumed)
    assert [_signature(next(it)) for _ in range(2)] == reference[4:6]
    # the number of loader workers does not change the stream
    two = _stream(cfg, workers=2)
    it = iter(two)
    assert [_signature(next(it)) for _ in range(6)] == reference
    # augmentations vary along the stream (resize choice, flip): not one fixed transform
    assert len({s[0][1] for s in reference}) > 1 or len({s[0][2] for s in reference}) > 1
    # the process's own numpy state is untouched by the mapping
    np.random.seed(7)
    expect = np.random.rand()
    np.random.seed(7)
    next(iter(_stream(cfg)))
    assert np.random.rand() == expect


def test_aspect_ratio_grouping_at_index_level():
    landscape = [True, False, True, True, False, False, True]
    batches = list(aspect_ratio_batches(iter(range(7)), landscape, 2))
    assert batches == [[0, 2], [1, 4], [3, 6]]  # as detectron2's AspectRatioGroupedDataset
    assert list(aspect_ratio_batches(iter(range(5)), landscape, 2, grouping=False)) == [[0, 1], [2, 3]]


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(), __import__("random").random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ------------------------------------------------------------------------------------------------
# faults
# ------------------------------------------------------------------------------------------------
def test_nonfinite_loss_stops_before_the_optimizer_step():
    """A NaN in the box head makes the step raise, naming the term and iteration, before the
    optimizer moves any weight."""
    from detectron2.engine import SimpleTrainer

    cfg = make_cfg()
    model = Trainer.build_model(cfg)
    opt = Trainer.build_optimizer(cfg, model)
    install_nonfinite_guard(model, opt)
    trainer = SimpleTrainer(model, Trainer.build_train_loader(cfg), opt)
    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer.run_step()  # a normal step
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        handle = model.roi_heads.box_head.register_forward_hook(
            lambda m, i, out: out * float("nan"))
        storage.iter = trainer.iter = 7
        with pytest.raises(FloatingPointError) as err:
            trainer.run_step()
        handle.remove()
    # (with one process detectron2's own metrics check raises first; both name the step)
    msg = str(err.value)
    assert re.search(r"iteration[ =]7\b", msg) and re.search(r"loss_cls'?[=:] ?nan", msg)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), f"{n} took the step of a non-finite loss"


class _TwoLosses(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.poison = False

    def forward(self, x):
        a = (self.w * x).sum()
        b = (self.w ** 2).sum() * (float("nan") if self.poison else 1.0)
        return {"loss_a": a, "loss_b": b}


def _guarded_steps(out_dir):
    from detectron2.utils import comm

    rank = comm.get_rank()
    model = _TwoLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    install_nonfinite_guard(model, opt)
    model.train()
    result = {"rank": rank, "error": None}
    with EventStorage(0) as storage:
        for it in range(3):
            storage.iter = it
            model.poison = rank == 1 and it == 2  # only process 1's loss breaks, at step 2
            losses = model(torch.ones(3))
            opt.zero_grad()
            sum(losses.values()).backward()
            try:
                opt.step()
            except FloatingPointError as e:
                result["error"] = str(e)
                break
    result["iteration"] = it
    result["w"] = model.w.detach().tolist()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pth"))


@pytest.mark.dist
def test_nonfinite_loss_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    from longtail.launch import launch

    launch(_guarded_steps, 2, dist_url="auto", args=(str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in (0, 1))
    assert r0["iteration"] == r1["iteration"] == 2
    assert "iteration 2" in r1["error"] and "loss_b=nan" in r1["error"]
    assert "iteration 2" in r0["error"] and "(on another process)" in r0["error"]
    # two SGD steps of lr 0.1 on loss_a + loss_b (gradient 1 + 2w), none for the third
    w = 1.0
    for _ in range(2):
        w -= 0.1 * (1 + 2 * w)
    assert r0["w"] == r1["w"] == pytest.approx([w] * 3)


def test_nonfinite_guard_reads_nothing_back_in_the_forward(monkeypatch):
    """The hot path: the guard's forward hook starts the check on the device and returns; the
    host reads the flag only in the optimizer's step pre-hook. Memory pushes copy nothing."""
    model = _TwoLosses()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    install_nonfinite_guard(model, opt)
    model.train()
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real_item(t))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(1) or real_item(t))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or bool(real_item(t)))
    losses = model(torch.ones(3))
    assert reads == []
    sum(losses.values()).backward()
    opt.step()
    assert len(reads) == 1
    assert not hasattr(ObjectMemory, "begin_step") and not hasattr(ObjectMemory, "rollback")


def test_nonfinite_loss_without_an_optimizer_step_is_caught_at_the_next_forward():
    """A trainer that skips the optimizer step (a gradient scaler seeing inf gradients) still
    stops: the pending flag is read before the next forward."""
    model = _TwoLosses()
    install_nonfinite_guard(model)
    model.train()
    with EventStorage(4):
        model.poison = True
        model(torch.ones(3))
        model.poison = False
        with pytest.raises(FloatingPointError) as err:
            model(torch.ones(3))
    assert "iteration 4" in str(err.value) and "loss_b=nan" in str(err.value)


def test_unreadable_image_fails_with_its_path_or_is_replaced(tmp_path, caplog):
    good = tmp_path / "good.png"
    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), 128, dtype=np.uint8)).save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    missing = tmp_path / "missing.png"

    def record(path, i):
        return {"file_name": str(path), "image_id": i, "height": 40, "width": 50,
                "annotations": [{"bbox": [5, 5, 20, 20], "bbox_mode": 1, "category_id": 0}]}

    cfg = make_cfg()
    cfg.INPUT.MASK_ON = False
    cfg.MODEL.MASK_ON = False
    mapper = DatasetMapper(cfg, True)
    for bad in (corrupt, missing):
        dicts = [record(good, 0), record(bad, 1)]
        sampler = iter_sampler([0, 1])
        stream = ResumableBatchStream(dicts, mapper, sampler, 2, seed=0, aspect_ratio_grouping=False)
        with pytest.raises(Exception) as err:
            next(iter(stream))
        assert str(bad) in str(err.value) and "LONGTAIL.SKIP_BAD_IMAGES" in str(err.value)
        stream = ResumableBatchStream(dicts, mapper, iter_sampler([0, 1]), 2, seed=0,
                                      aspect_ratio_grouping=False, skip_bad_images=True)
        with caplog.at_level(logging.WARNING, logger="longtail.data"):
            batch = next(iter(stream))
        # the full batch: the unreadable record 1 replaced by the next readable one (record 0)
        assert [d["image_id"] for d in batch] == [0, 0]
        assert REPLACED_KEY not in batch[0] and batch[1][REPLACED_KEY] == str(bad)
        assert str(bad) in caplog.text and "replaced" in caplog.text


def _png(path, h, w, value):
    from PIL import Image

    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(path)
    return str(path)


def test_replacement_candidates_follow_the_dataset_order_same_orientation_first():
    landscape = [True, False, True, True, False, True]
    # after index 3: the next landscape records (5, 0, 2), then the portrait ones (4, 1)
    assert list(replacement_candidates(3, landscape)) == [5, 0, 2, 4, 1]
    assert list(replacement_candidates(1, landscape)) == [4, 2, 3, 5, 0]
    assert list(replacement_candidates(0, [True])) == []


def test_one_image_per_process_with_an_unreadable_image_still_trains(tmp_path):
    """The batch of a process with 1 image whose file is unreadable used to be empty, which
    detectron2's ImageList.from_tensors rejects (bare AssertionError). Now the image is replaced
    (by the following record of the same orientation), the step runs and the metric counts it."""
    cfg = make_cfg("configs/Synthetic/mask_rcnn_R18_FPN.yaml", **{
        "SOLVER.IMS_PER_BATCH": 1, "LONGTAIL.SKIP_BAD_IMAGES": True,
        "DATALOADER.ASPECT_RATIO_GROUPING": False, "INPUT.MIN_SIZE_TRAIN": (64,)})
    records = [
        {"file_name": str(tmp_path / "gone.png"), "image_id": 10, "height": 48, "width": 64,
         "annotations": [{"bbox": [4, 4, 20, 20], "bbox_mode": 1, "category_id": 1,
                          "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]}]},
        {"file_name": _png(tmp_path / "portrait.png", 64, 48, 90), "image_id": 11, "height": 64,
         "width": 48, "annotations": [{"bbox": [4, 4, 20, 20], "bbox_mode": 1,
                                       "category_id": 2,
                                       "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]}]},
        {"file_name": _png(tmp_path / "landscape.png", 48, 64, 160), "image_id": 12,
         "height": 48, "width": 64, "annotations": [{"bbox": [8, 8, 30, 20], "bbox_mode": 1,
                                                      "category_id": 3,
                                                      "segmentation": [[8, 8, 38, 8, 38, 28,
                                                                        8, 28]]}]},
    ]
    model = Trainer.build_model(cfg)
    count_replaced_images(model)
    model.train()

    class first(torch.utils.data.Sampler):
        def __iter__(self):
            return iter([0, 1, 0])

    loader = build_resumable_loader(records, DatasetMapper(cfg, True), first(), 1, seed=3,
                                    skip_bad_images=True)
    batches = list(loader)
    assert [[d["image_id"] for d in b] for b in batches] == [[12], [11], [12]]
    assert batches[0][0][REPLACED_KEY].endswith("gone.png")
    with EventStorage(0) as storage:
        losses = model(batches[0])
        assert all(torch.isfinite(v) for v in losses.values())
        storage.iter = 1
        model(batches[1])
        storage.iter = 2
        model(batches[2])
    counts = storage.history("data/replaced_images").values()
    assert [v for v, _ in counts] == [1, 1, 2]
    # deterministic: a stream started at batch 2 (a resumed run) gives the same replacement
    stream = ResumableBatchStream(records, DatasetMapper(cfg, True), first(), 1, seed=3,
                                  aspect_ratio_grouping=False, skip_bad_images=True)
    stream.skip_to(2)
    again = next(iter(stream))
    assert again[0]["image_id"] == 12 and torch.equal(again[0]["image"], batches[2][0]["image"])


def test_missing_image_files_are_listed_at_load(tmp_path, caplog):
    present = _png(tmp_path / "here.png", 8, 8, 0)
    records = [{"file_name": present}] + [{"file_name": str(tmp_path / f"gone{i}.png")}
                                          for i in range(23)]
    with pytest.raises(FileNotFoundError) as err:
        check_image_files(records, "my_train", skip_bad_images=False, max_images=1000)
    msg = str(err.value)
    assert "23 training image file(s) of my_train are missing" in msg
    assert "gone0.png" in msg and "(and 3 more)" in msg and "LONGTAIL.SKIP_BAD_IMAGES" in msg
    with caplog.at_level(logging.WARNING, logger="longtail.data"):
        missing = check_image_files(records, "my_train", skip_bad_images=True, max_images=1000)
    assert len(missing) == 23 and "replaces them" in caplog.text
    # above the size limit nothing is checked
    assert check_image_files(records, "my_train", skip_bad_images=False, max_images=10) == []
    with pytest.raises(FileNotFoundError) as err:  # none exists: the image root is wrong
        check_image_files(records[1:], "my_train", skip_bad_images=True, max_images=0)
    assert "None of the 23 training images" in str(err.value)


def test_trainer_checks_image_files_when_the_data_is_loaded(tmp_path, monkeypatch):
    """A training set with a missing file fails when the trainer loads it (before the model is
    built), naming the file; LONGTAIL.CHECK_IMAGES False defers it to when it is drawn."""
    from longtail import engine

    cfg = make_cfg()
    real = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)
    broken = [dict(r) for r in real]
    broken[3]["file_name"] = str(tmp_path / "lost.jpg")
    monkeypatch.setattr(engine, "get_detection_dataset_dicts", lambda *a, **k: broken)
    with pytest.raises(FileNotFoundError) as err:
        engine.load_train_dicts(cfg)
    assert "lost.jpg" in str(err.value)
    cfg.LONGTAIL.CHECK_IMAGES = False
    assert engine.load_train_dicts(cfg) is broken


class iter_sampler(torch.utils.data.Sampler):
    def __init__(self, order):
        self.order = order

    def __iter__(self):
        return iter(self.order)


def test_degenerate_boxes_are_dropped_and_counted(caplog):
    records = [
        {"annotations": [{"bbox": [0, 0, 5, 5]}, {"bbox": [3, 3, 0, 4]}, {"bbox": [1, 1, 2, -1]}]},
        {"annotations": [{"bbox": [1, 1, 1, 1]}]},
    ]
    with caplog.at_level(logging.WARNING, logger="longtail.datasets"):
        out = clean_records(records, "my_dataset")
    assert [len(r["annotations"]) for r in out] == [1, 1]
    assert "dropped 2 annotation(s)" in caplog.text and "my_dataset" in caplog.text


def test_category_ids_missing_from_categories_fail_naming_them(tmp_path):
    path = tmp_path / "bad.json"
    data = {
        "images": [{"id": 1, "height": 10, "width": 10}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 2, 2]},
                        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 2, 2]},
                        {"id": 3, "image_id": 1, "category_id": 9, "bbox": [0, 0, 2, 2]}],
    }
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        validate_lvis_json(str(path))
    assert "[7, 9]" in str(err.value) and str(path) in str(err.value)


def test_memory_that_cannot_fit_is_refused_with_the_numbers(tmp_path):
    from detectron2.modeling import build_model

    cfg = make_cfg(**{"MODEL.MEMORY.CAPACITY": 10**9})
    cfg.OUTPUT_DIR = str(tmp_path)
    # building it (e.g. for --eval-only) allocates nothing, so it does not fail there ...
    model = build_model(cfg)
    assert model.roi_heads.memory.nbytes() == 0
    assert model.roi_heads.memory.planned_bytes() > 10**9 * 1024
    # ... but training refuses it before the first iteration
    with pytest.raises(MemoryError) as err:
        Trainer(cfg)
    msg = str(err.value)
    assert "MiB" in msg and "available" in msg and "MODEL.MEMORY.CAPACITY" in msg


def test_long_tail_state_footprint_is_logged(caplog):
    from detectron2.modeling import build_model

    with caplog.at_level(logging.INFO):
        build_model(make_cfg())
    assert "Long-tail state: object memory (rio)" in caplog.text
    assert "allocated when training starts" in caplog.text
    assert "Long-tail state: LOCE mean scores" in caplog.text


# ------------------------------------------------------------------------------------------------
# mixed precision: bfloat16 autocast on CPU
# ------------------------------------------------------------------------------------------------
def test_ebl_and_mean_scores_in_float32_under_autocast():
    torch.manual_seed(0)
    C = 1203
    z = torch.randn(256, C + 1) * 4
    y = torch.randint(0, C + 1, (256,))
    m = torch.exp(torch.empty(C + 1).uniform_(np.log(1e-4), np.log(0.8)))
    m[-1] = 0.01
    reference = equilibrium_loss(z, y, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16 = torch.nn.functional.linear(z, torch.eye(C + 1))  # a bf16 producer of the logits
        assert z16.dtype == torch.bfloat16
        loss = equilibrium_loss(z16, y, m)
    assert loss.dtype == torch.float32
    # only the logits' own bf16 rounding differs (log m is applied in float32)
    assert torch.allclose(loss, equilibrium_loss(z16.float(), y, m), rtol=1e-6)
    assert torch.allclose(loss, reference, rtol=2e-2)
    # the statistics update stays float32 with rare classes' tiny scores intact
    counts = torch.zeros(C + 1)
    counts[:3] = 1
    sums = torch.zeros(C + 1)
    sums[:3] = torch.tensor([1e-6, 3e-5, 0.5])
    new = update_mean_scores(torch.full((C + 1,), 1e-5), sums, counts)
    assert new.dtype == torch.float32 and new[0] < new[1] < new[2] and new[0] > 0


def test_bags_and_cosine_classifier_keep_float32_under_autocast():
    counts = [3] * 5 + [50] * 5 + [500] * 5
    tables = build_group_tables(counts)
    torch.manual_seed(0)
    logits = torch.randn(64, tables.num_logits) * 3
    labels = torch.randint(0, 16, (64,))
    g = torch.Generator().manual_seed(0)
    ref = bags_loss(logits, labels, tables, 8.0, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        low = bags_loss(logits.bfloat16(), labels, tables, 8.0, g)
        merged = bags_merge(logits.bfloat16(), tables)
    assert low.dtype == torch.float32 and torch.allclose(low, ref, rtol=2e-2)
    assert merged.dtype == torch.float32
    assert torch.allclose(merged, bags_merge(logits.bfloat16().float(), tables), atol=1e-6)
    layer = CosineClassifier(64, 11, scale=48.0)
    x = torch.randn(32, 64).relu()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x.bfloat16())
    assert z.dtype == torch.float32
    assert torch.allclose(z, layer(x.bfloat16().float()), atol=1e-5)


@pytest.mark.parametrize("config", ["configs/Synthetic/rio_ebl_R18_FPN.yaml",
                                    "configs/Synthetic/loce_stage2_ebl_mfs.yaml"])
def test_training_steps_under_bfloat16_autocast(config):
    cfg = make_cfg(config, **{"SOLVER.AMP.ENABLED": True, "MODEL.MEMORY.DTYPE": "float16"})
    model = Trainer.build_model(cfg)
    opt = Trainer.build_optimizer(cfg, model)
    install_nonfinite_guard(model, opt)
    loader = Trainer.build_train_loader(cfg)
    trainer = AutocastTrainer(model, loader, opt)
    pred = model.roi_heads.box_predictor
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(3):
            storage.iter = it
            trainer.iter = it
            trainer.run_step()
    m = pred.cls_loss.mean_scores
    assert m.dtype == torch.float32 and torch.isfinite(m).all() and not torch.all(m == 0.01)
    mem = model.roi_heads.memory
    assert mem.features.dtype == torch.float16 and int(mem.fill.sum()) > 0
    assert torch.isfinite(mem.features.float()).all()
    latest = storage.latest()
    assert all(np.isfinite(latest[k][0]) for k in latest if k.startswith("loss"))


# ------------------------------------------------------------------------------------------------
# exact resume of a killed run (end to end, slow)
# ------------------------------------------------------------------------------------------------
RESUME = [
    "DATASETS.TRAIN", "('longtail_synth_mini_train',)", "DATASETS.TEST", "()",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "5", "SOLVER.MAX_ITER", "40",
    "SOLVER.CHECKPOINT_PERIOD", "8", "DATALOADER.NUM_WORKERS", "0", "LONGTAIL.NUM_THREADS", "1",
    "SEED", "5", "INPUT.MIN_SIZE_TRAIN", "(96, 112, 128)",
]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_killed_run_resumes_exactly(python, repo_root, tmp_path):
    """Kill -9 between checkpoints, --resume: same weights, statistics and memory at the end."""
    import signal
    import subprocess
    import time

    cmd = [python, "train_net.py", "--config-file", "configs/Synthetic/rio_ebl_R18_FPN.yaml"]
    straight = str(tmp_path / "straight")
    subprocess.run(cmd + RESUME + ["OUTPUT_DIR", straight], cwd=repo_root, check=True,
                   capture_output=True, timeout=900)

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(cmd + RESUME + ["OUTPUT_DIR", killed], cwd=repo_root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(killed, "model_0000015.rank0.pth")
    deadline = time.time() + 600
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)  # a few iterations past the checkpoint, then a hard kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "model_final.pth")), "finished before the kill"
    with open(os.path.join(killed, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000015.pth"

    out = subprocess.run(cmd + ["--resume"] + RESUME + ["OUTPUT_DIR", killed], cwd=repo_root,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    log = out.stdout + out.stderr
    assert "Starting training from iteration 16" in log
    assert "Training stream resumed at batch 16" in log

    a, b = _load(os.path.join(straight, "model_final.pth")), _load(os.path.join(killed, "model_final.pth"))
    assert a["iteration"] == b["iteration"] == 39
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"weights differ after resume: {differ[:5]}"
    m = "roi_heads.box_predictor.cls_loss.mean_score.mean_scores"
    assert not torch.all(a["model"][m] == 0.01)  # the statistics moved, and identically
    ma = _load(os.path.join(straight, "model_final.rank0.pth"))["states"]["roi_heads.memory"]
    mb = _load(os.path.join(killed, "model_final.rank0.pth"))["states"]["roi_heads.memory"]
    for key in ("features", "boxes", "ptr", "fill"):
        assert torch.equal(ma[key], mb[key]), key


def test_evaluation_leaves_the_random_generators_as_it_found_them(monkeypatch):
    """An evaluation during training (the test loader alone draws from torch's generator) used
    to shift every later random draw, so a run resumed from the checkpoint before an evaluation
    (which it does not repeat) trained differently from the uninterrupted run."""
    import random as pyrandom

    from detectron2.engine import DefaultTrainer

    def drawing_test(cls, cfg, model, evaluators=None):
        torch.rand(5), np.random.rand(5), pyrandom.random()
        return {"bbox": {"AP": 1.0}}

    monkeypatch.setattr(DefaultTrainer, "test", classmethod(drawing_test))
    torch.manual_seed(4), np.random.seed(4), pyrandom.seed(4)
    expect = (torch.rand(3), np.random.rand(3), pyrandom.random())
    torch.manual_seed(4), np.random.seed(4), pyrandom.seed(4)
    assert Trainer.test(make_cfg(), None) == {"bbox": {"AP": 1.0}}
    got = (torch.rand(3), np.random.rand(3), pyrandom.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1])
    assert got[2] == expect[2]
