"""Robustness: resumable data stream, per-process RNG state, non-finite losses, bad data,
memory footprint, mixed precision (bfloat16 autocast on CPU)."""
import json
import logging
import os

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
from longtail.data import ResumableBatchStream, aspect_ratio_batches, build_resumable_loader
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
def _snapshot(model):
    heads = model.roi_heads
    mem = heads.memory
    return (heads.box_predictor.mean_score.mean_scores.clone(), mem.features.clone(),
            mem.boxes.clone(), mem.ptr.clone(), mem.fill.clone())


def test_nonfinite_loss_stops_before_updating_the_long_tail_state():
    cfg = make_cfg()
    model = Trainer.build_model(cfg)
    install_nonfinite_guard(model)
    data = next(iter(Trainer.build_train_loader(cfg)))
    model.train()
    with EventStorage(0) as storage:
        model(data)  # a normal step: statistics and memory move
        before = _snapshot(model)
        assert int(before[4].sum()) > 0 and not torch.all(before[0] == 0.01)
        # a broken batch: the box head's output becomes NaN
        handle = model.roi_heads.box_head.register_forward_hook(
            lambda m, i, out: out * float("nan"))
        storage.iter = 7
        with pytest.raises(FloatingPointError) as err:
            model(data)
        handle.remove()
    msg = str(err.value)
    assert "iteration 7" in msg and "loss_cls=nan" in msg and "loss_mask" not in msg.split(".")[0]
    after = _snapshot(model)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_nonfinite_guard_rolls_back_every_push_of_the_step():
    mem = ObjectMemory(3, [0, 1], 1, 3, (2,), "last")
    box = torch.tensor([[0.0, 0, 4, 4]]).repeat(5, 1)
    mem.push(torch.ones(5, 2), torch.tensor([0, 0, 1, 0, 1]), torch.zeros(5), box, box)
    saved = mem.features.clone(), mem.ptr.clone(), mem.fill.clone()
    mem.begin_step()
    mem.push(torch.full((4, 2), 5.0), torch.tensor([0, 1, 0, 0]), torch.zeros(4), box[:4], box[:4])
    mem.push(torch.full((2, 2), 9.0), torch.tensor([1, 1]), torch.zeros(2), box[:2], box[:2])
    mem.rollback()
    assert torch.equal(mem.features, saved[0])
    assert torch.equal(mem.ptr, saved[1]) and torch.equal(mem.fill, saved[2])


def test_unreadable_image_fails_with_its_path_or_is_skipped(tmp_path, caplog):
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
        assert [d["image_id"] for d in batch] == [0]
        assert str(bad) in caplog.text


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
    install_nonfinite_guard(model)
    opt = Trainer.build_optimizer(cfg, model)
    loader = Trainer.build_train_loader(cfg)
    trainer = AutocastTrainer(model, loader, opt)
    pred = model.roi_heads.box_predictor
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(3):
            storage.iter = it
            trainer.iter = it
            trainer.run_step()
    m = pred.mean_score.mean_scores
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
    m = "roi_heads.box_predictor.mean_score.mean_scores"
    assert not torch.all(a["model"][m] == 0.01)  # the statistics moved, and identically
    ma = _load(os.path.join(straight, "model_final.rank0.pth"))["states"]["roi_heads.memory"]
    mb = _load(os.path.join(killed, "model_final.rank0.pth"))["states"]["roi_heads.memory"]
    for key in ("features", "boxes", "ptr", "fill"):
        assert torch.equal(ma[key], mb[key]), key
