"""What broke on LVIS-shaped runs with detectron2 main (and on both versions at LVIS scale).

Each test here reproduces one defect found by running the project as an LVIS user would, and
fails on the code before its fix: statistics hidden by detectron2 main's pre-filled
``class_image_count``, main's loss keys silently ignored, main's ``after_backward`` hook skipped,
``--eval-only`` allocating the MFS memory, a batch layout that silently changes the method, the
training json parsed several times per process, ``SEED -1`` repeating the draws of every run,
and MFS accepting a trainable backbone. The suite runs against both detectron2 versions
(``.ci/run``), so the tests that need main's keys emulate them on v0.6.
"""
import inspect
import json
import logging
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from longtail import Trainer, add_longtail_config
from longtail.datasets import (
    FREQUENCY,
    IMAGE_COUNT,
    INSTANCE_COUNT,
    class_stats_from_json,
    json_parse_count,
    load_checked,
    prepare_datasets,
)
from longtail.engine import AutocastTrainer, resolve_seed
from longtail.hooks import MemoryInitHook
from longtail.samplers import check_batch_layout

MINI = "longtail_synth_mini_train"


def make_cfg(config="configs/Synthetic/rio_R18_FPN.yaml", train=(MINI,), **extra):
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.merge_from_list([x for kv in extra.items() for x in kv])
    return cfg


def _mini_json():
    prepare_datasets([MINI])
    return MetadataCatalog.get(MINI).json_file, MetadataCatalog.get(MINI).image_root


def _register_copy(name, tmp_path, **meta):
    """A fresh dataset ``name`` over a copy of the mini train json (so this process has not
    parsed it yet), with extra metadata ``meta``."""
    src, image_root = _mini_json()
    path = tmp_path / f"{name}.json"
    path.write_bytes(open(src, "rb").read())
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_checked(str(path), image_root, name))
    MetadataCatalog.get(name).set(
        json_file=str(path), image_root=image_root, evaluator_type="lvis",
        class_stats_source=name, **meta,
    )
    return str(path)


# ------------------------------------------------------------------------------------------------
# metadata: detectron2 main pre-fills class_image_count for lvis_v1_* (as a list of dicts)
# ------------------------------------------------------------------------------------------------
def test_prefilled_upstream_class_image_count_does_not_hide_the_statistics(tmp_path):
    # what main's builtin metadata holds for lvis_v1_train: the real LVIS counts, which differ
    # from the json being trained on
    with open(_mini_json()[0]) as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    upstream = [{"id": c["id"], "image_count": 1000 + c["id"]} for c in cats]
    name = "longtail_test_prefilled_train"
    _register_copy(name, tmp_path, class_image_count=upstream)
    prepare_datasets([name])
    meta = MetadataCatalog.get(name)
    assert meta.class_image_count == upstream  # upstream's key untouched
    assert meta.get(IMAGE_COUNT) == [c["image_count"] for c in cats]
    assert meta.get(INSTANCE_COUNT) == [c["instance_count"] for c in cats]
    assert meta.get(FREQUENCY) == [c["frequency"] for c in cats]
    # every method that reads the statistics builds on it (EBL, BAGS, RIO)
    for config in ("configs/Synthetic/loce_stage2_ebl.yaml", "configs/Synthetic/bags_stage2.yaml",
                   "configs/Synthetic/rio_R18_FPN.yaml"):
        model = build_model(make_cfg(config, train=(name,)))
        assert model.roi_heads.box_predictor is not None
    expected_cached = [i for i, c in enumerate(cats) if c["image_count"] <= 30]
    assert model.roi_heads.memory.classes == expected_cached


def test_project_datasets_publish_class_image_count_in_upstream_format():
    src, _ = _mini_json()
    with open(src) as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    meta = MetadataCatalog.get(MINI)
    assert meta.class_image_count == [{"id": c["id"], "image_count": c["image_count"]} for c in cats]
    # the form detectron2 main's federated loss reads it in
    counts = [c["image_count"] for c in sorted(meta.class_image_count, key=lambda x: x["id"])]
    assert counts == meta.get(IMAGE_COUNT)


def test_statistics_count_only_the_annotations_loading_keeps(tmp_path):
    data = {
        "images": [{"id": 1, "width": 10, "height": 10}, {"id": 2, "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 0, 5]},  # dropped at load
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [1, 1, 3, 0]},  # dropped at load
        ],
    }
    path = tmp_path / "degenerate.json"
    path.write_text(json.dumps(data))
    stats = class_stats_from_json(str(path))
    assert stats[INSTANCE_COUNT] == [1, 0]
    assert stats[IMAGE_COUNT] == [1, 0]


# ------------------------------------------------------------------------------------------------
# detectron2 main's loss keys and trainer hook
# ------------------------------------------------------------------------------------------------
def _with_upstream_loss_keys(cfg):
    """cfg with main's MODEL.ROI_BOX_HEAD loss keys (declared here when v0.6 lacks them)."""
    cfg.defrost()
    head = cfg.MODEL.ROI_BOX_HEAD
    for key, default in (("USE_SIGMOID_CE", False), ("USE_FED_LOSS", False),
                         ("FED_LOSS_NUM_CLASSES", 50), ("FED_LOSS_FREQ_WEIGHT_POWER", 0.5)):
        if key not in head:
            head[key] = default
    return cfg


@pytest.mark.parametrize("key", ["USE_SIGMOID_CE", "USE_FED_LOSS"])
def test_upstream_loss_keys_contradicting_the_loss_are_refused_not_ignored(key):
    cfg = _with_upstream_loss_keys(make_cfg("configs/Synthetic/loce_stage2_ebl.yaml"))
    cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = True
    cfg.MODEL.ROI_BOX_HEAD[key] = True
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    msg = str(err.value)
    assert f"MODEL.ROI_BOX_HEAD.{key}" in msg and "MODEL.LONGTAIL.CLS_LOSS is 'ebl'" in msg


def test_upstream_fed_loss_without_sigmoid_ce_is_refused():
    cfg = _with_upstream_loss_keys(make_cfg("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml"))
    cfg.MODEL.ROI_HEADS.NAME = "LongTailROIHeads"
    cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = True
    with pytest.raises(ValueError, match="USE_FED_LOSS True needs USE_SIGMOID_CE True"):
        build_model(cfg)


@pytest.mark.parametrize("fed", [False, True])
def test_upstream_loss_keys_select_the_project_loss(fed):
    """detectron2 main's switches with the long-tail heads train the project's own loss of the
    same name (on v0.6 too, where the keys are declared by add_longtail_config)."""
    from longtail.fed_loss import FederatedLoss, SigmoidCE

    cfg = _with_upstream_loss_keys(make_cfg("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml"))
    cfg.MODEL.ROI_HEADS.NAME = "LongTailROIHeads"
    cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = True
    cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = fed
    if fed:  # read by the federated loss only (refused with sigmoid CE alone)
        cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES = 20
    prepare_datasets(cfg.DATASETS.TRAIN)
    loss = build_model(cfg).roi_heads.box_predictor.cls_loss
    assert type(loss) is (FederatedLoss if fed else SigmoidCE)
    if fed:
        counts = torch.tensor(MetadataCatalog.get(MINI).get(IMAGE_COUNT), dtype=torch.float32)
        assert torch.allclose(loss.fed_loss_cls_weights, counts.sqrt())
        assert loss.num_fed_classes == 20


def test_upstream_federated_loss_builds_on_project_datasets():
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    if "use_fed_loss" not in inspect.signature(FastRCNNOutputLayers.__init__).parameters:
        pytest.skip("detectron2 v0.6 has no federated loss (main only)")
    cfg = make_cfg("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml")
    cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = True
    cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = True
    prepare_datasets(cfg.DATASETS.TRAIN)
    model = build_model(cfg)
    predictor = model.roi_heads.box_predictor
    counts = torch.tensor(MetadataCatalog.get(MINI).get(IMAGE_COUNT), dtype=torch.float32)
    expected = counts ** cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER
    assert torch.allclose(predictor.fed_loss_cls_weights, expected)


def test_autocast_trainer_calls_after_backward():
    model = torch.nn.Linear(3, 1)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, batch):
            return {"loss": self.lin(batch).pow(2).mean()}

    loader = [torch.randn(4, 3) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = AutocastTrainer(Model(), loader, opt)
    seen = []

    def after_backward():  # what detectron2 main's TrainerBase.after_backward runs (hooks)
        seen.append(model.weight.grad is not None and bool(model.weight.grad.abs().sum() > 0))

    trainer.after_backward = after_backward
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer.iter = 0
        trainer.run_step()
    assert seen == [True]  # called once, after the gradients exist and before the step


# ------------------------------------------------------------------------------------------------
# the MFS memory is training state
# ------------------------------------------------------------------------------------------------
def test_eval_only_model_allocates_no_memory_and_training_does(tmp_path, caplog):
    cfg = make_cfg("configs/Synthetic/loce_stage2_ebl_mfs.yaml", OUTPUT_DIR=str(tmp_path))
    with caplog.at_level(logging.INFO):
        model = Trainer.build_model(cfg)  # what --eval-only builds
    memory = model.roi_heads.memory
    assert memory.nbytes() == 0 and not memory.allocated
    assert memory.features.numel() == 0
    assert "allocated when training starts (never for inference)" in caplog.text
    # inference runs without it
    model.eval()
    with torch.no_grad():
        model([{"image": torch.zeros(3, 64, 64), "height": 64, "width": 64}])
    assert memory.nbytes() == 0
    trainer = Trainer(cfg)
    trained = trainer.model.roi_heads.memory
    assert trained.allocated and trained.nbytes() == trained.planned_bytes() > 0


def test_train_net_eval_only_logs_zero_state_bytes(tmp_path, repo_root, python):
    import subprocess

    cfg = make_cfg("configs/Synthetic/loce_stage2_ebl_mfs.yaml")
    out = tmp_path / "out"
    # a stage-2 model's weights: any state dict of this architecture will do for the log line
    model = Trainer.build_model(cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "w.pth")
    cmd = [
        python, os.path.join(repo_root, "train_net.py"), "--eval-only",
        "--config-file", os.path.join(repo_root, "configs/Synthetic/loce_stage2_ebl_mfs.yaml"),
        "MODEL.WEIGHTS", str(tmp_path / "w.pth"), "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out),
        "DATASETS.TRAIN", f"('{MINI}',)", "DATASETS.TEST", "('longtail_synth_mini_val',)",
        "LONGTAIL.NUM_THREADS", "1",
    ]
    run = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DETECTRON2_DATASETS": os.environ["DETECTRON2_DATASETS"]})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = open(out / "log.txt").read()
    assert "Long-tail state: 0 bytes of object memory allocated for inference (1 memory" in log
    assert "object memory allocated," not in log


# ------------------------------------------------------------------------------------------------
# batch layout, parsing, seeds, MFS preconditions
# ------------------------------------------------------------------------------------------------
def test_images_per_process_below_ims_per_vgpu_warn_with_the_fix(caplog):
    cfg = make_cfg("configs/Synthetic/rio_R18_FPN.yaml")
    cfg.MODEL.LONGTAIL.IMS_PER_VGPU = 4
    cfg.SOLVER.IMS_PER_BATCH = 16
    with caplog.at_level(logging.WARNING):
        check_batch_layout(cfg, 8)  # RIO on 8 GPUs x 2 images
    msg = caplog.text
    assert "2 image(s) per process" in msg and "MODEL.LONGTAIL.IMS_PER_VGPU 4" in msg
    assert "--num-gpus 4" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_batch_layout(cfg, 4)  # the official 4 GPUs x 4 images
        check_batch_layout(cfg, 2)  # 8 per process = 2 chunks of 4
    assert caplog.text == ""


def test_training_json_is_parsed_once_per_process(tmp_path):
    name = "longtail_test_parse_once_train"
    path = _register_copy(name, tmp_path)
    cfg = make_cfg("configs/Synthetic/loce_stage2_ebl_mfs.yaml", train=(name,),
                   OUTPUT_DIR=str(tmp_path / "out"))
    assert json_parse_count(path) == 0
    trainer = Trainer(cfg)
    hook = next(h for h in trainer._hooks if isinstance(h, MemoryInitHook))
    assert hook.dataset is trainer.train_dicts  # the MFS pass reuses the loaded records
    assert json_parse_count(path) == 1


def test_seed_minus_one_draws_a_seed_per_run_and_resume_keeps_it(tmp_path):
    a = resolve_seed(make_cfg(SEED=-1))
    b = resolve_seed(make_cfg(SEED=-1))
    assert a.SEED >= 0 and b.SEED >= 0 and a.SEED != b.SEED
    assert resolve_seed(make_cfg(SEED=7)).SEED == 7
    cfg = make_cfg("configs/Synthetic/bags_stage2.yaml", SEED=-1, OUTPUT_DIR=str(tmp_path))
    cfg.MODEL.WEIGHTS = ""
    first = Trainer(cfg)
    seed = first.cfg.SEED
    assert first.model.roi_heads.seed == seed and first.model.roi_heads.box_predictor.seed == seed
    state = first.state_dict()
    assert state["longtail_seed"] == seed
    second = Trainer(cfg)  # a resumed process draws another seed, then loads the checkpoint's
    assert second.cfg.SEED != seed
    second.load_state_dict(state)
    assert second.cfg.SEED == seed
    assert second.model.roi_heads.seed == seed and second.model.roi_heads.box_predictor.seed == seed
    assert second._trainer.data_loader.dataset.seed == seed


def test_mfs_refuses_a_trainable_backbone_or_box_head(tmp_path):
    cfg = make_cfg("configs/Synthetic/loce_stage2_ebl_mfs.yaml", OUTPUT_DIR=str(tmp_path))
    cfg.MODEL.LONGTAIL.TRAINABLE_PREFIXES = ["roi_heads.box_predictor.", "roi_heads.box_head."]
    with pytest.raises(ValueError) as err:
        Trainer(cfg)
    assert "MODEL.LONGTAIL.TRAINABLE_PREFIXES" in str(err.value)
    assert "roi_heads.box_head." in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rio_random_select_with_host_memory_on_cuda(tmp_path):
    from detectron2.utils.events import EventStorage

    cfg = make_cfg("configs/Synthetic/rio_R18_FPN.yaml", OUTPUT_DIR=str(tmp_path))
    cfg.MODEL.DEVICE = "cuda"
    cfg.MODEL.MEMORY.DEVICE = "cpu"
    cfg.MODEL.RIO.RANDOM_SELECT = True
    trainer = Trainer(cfg)
    data = next(iter(trainer._trainer.data_loader))
    with EventStorage(0):
        for _ in range(3):  # the second step replays what the first pushed
            trainer.model(data)
    assert trainer.model.roi_heads.memory.fill.sum() > 0


def test_upstream_loss_switches_with_detectron2_heads_on_v06_are_refused():
    """On v0.6 detectron2's own heads have no sigmoid / federated loss: the switches that
    add_longtail_config declares there would be ignored, so they are refused (main honours them)."""
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    cfg = make_cfg("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml")
    cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = True
    if "use_fed_loss" in inspect.signature(FastRCNNOutputLayers.__init__).parameters:
        pytest.skip("detectron2 main: StandardROIHeads trains its own sigmoid CE")
    with pytest.raises(ValueError, match="MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE True: read only"):
        Trainer.build_model(cfg)
