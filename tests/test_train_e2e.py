"""End to end through train_net.py on the small synthetic dataset (CPU)."""
import json
import os
import socket
import subprocess

import pytest
import torch

pytestmark = pytest.mark.slow

CONFIG = "configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml"
SMALL = [
    "DATASETS.TRAIN", "('longtail_synth_mini_train',)",
    "DATASETS.TEST", "('longtail_synth_mini_val',)",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.CHECKPOINT_PERIOD", "3",
    "DATALOADER.NUM_WORKERS", "0",
]


def run(python, repo_root, *args, check=True):
    # flags (--eval-only, --resume, --num-gpus) must precede the config overrides, which
    # detectron2's argument parser collects as the remainder of the command line
    proc = subprocess.run(
        [python, "train_net.py", "--config-file", CONFIG, *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"train_net.py failed ({proc.returncode}):\n{out[-6000:]}")
    return proc.returncode, out


def read_results(out_dir):
    with open(os.path.join(out_dir, "eval_results.json")) as f:
        return json.load(f)


def test_train_evaluate_eval_only_and_resume(python, repo_root, tmp_path):
    out = str(tmp_path / "run")
    _, log = run(python, repo_root, *SMALL, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", out)
    results = read_results(out)
    for task in ("bbox", "segm"):
        assert set(results[task]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}
    assert "LVIS evaluation" in log and "model_final.pth" in log
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert final["iteration"] == 5

    # --eval-only on the saved weights reproduces the end-of-training evaluation exactly
    eval_out = str(tmp_path / "eval")
    run(python, repo_root, "--eval-only", *SMALL, "MODEL.WEIGHTS",
        os.path.join(out, "model_final.pth"), "OUTPUT_DIR", eval_out)
    assert read_results(eval_out) == results

    # --resume continues from the last checkpoint instead of restarting
    _, log = run(python, repo_root, "--resume", *SMALL, "SOLVER.MAX_ITER", "9", "OUTPUT_DIR", out)
    assert "Starting training from iteration 6" in log
    resumed = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert resumed["iteration"] == 8
    changed = [k for k in final["model"] if not torch.equal(final["model"][k], resumed["model"][k])]
    assert changed, "resumed training did not update the weights"


@pytest.mark.dist
def test_two_cpu_processes_with_gloo(python, repo_root, tmp_path):
    """Also while detectron2's default rendezvous port is taken (another job of this user):
    without --dist-url the launcher picks a free port."""
    from urllib.parse import urlparse

    from detectron2.engine import default_argument_parser

    port = urlparse(default_argument_parser().get_default("dist_url")).port
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
    except OSError:
        pass  # already taken, by another job: the same situation
    out = str(tmp_path / "dist")
    try:
        _, log = run(python, repo_root, "--num-gpus", "2", *SMALL, "SOLVER.IMS_PER_BATCH", "4",
                     "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", out)
    finally:
        holder.close()
    assert "gloo" in log
    assert "World size: 2" in log
    results = read_results(out)
    assert "bbox" in results and "segm" in results


def test_two_stage_methods_through_train_net(python, repo_root, tmp_path):
    """Stage 1 (normed mask head), then EBL and BAGS stage 2 from its weights, evaluated."""
    stage1 = str(tmp_path / "stage1")
    mini = [o if o != "('longtail_synth_mini_val',)" else "()" for o in SMALL]
    proc_cfg = ["--config-file", "configs/Synthetic/loce_stage1_normed_mask.yaml"]
    subprocess.run([python, "train_net.py", *proc_cfg, *mini, "SOLVER.MAX_ITER", "3",
                    "OUTPUT_DIR", stage1], cwd=repo_root, check=True, capture_output=True)
    weights = os.path.join(stage1, "model_final.pth")
    for config, key in (("configs/Synthetic/loce_stage2_ebl.yaml", "cls_loss.mean_score.mean_scores"),
                        ("configs/Synthetic/loce_stage2_ebl_mfs.yaml", "cls_loss.mean_score.mean_scores"),
                        ("configs/Synthetic/bags_stage2.yaml", "cls_score.weight")):
        out = str(tmp_path / os.path.basename(config)[:-5])
        proc = subprocess.run(
            [python, "train_net.py", "--config-file", config, *SMALL, "SOLVER.MAX_ITER", "3",
             "MODEL.WEIGHTS", weights, "MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS", "1",
             "OUTPUT_DIR", out],
            cwd=repo_root, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        if "mfs" in config:  # the initialisation pass ran before the first iteration
            assert "MFS initialisation pass" in proc.stdout + proc.stderr
            assert os.path.exists(os.path.join(out, "model_final.rank0.pth"))
        assert set(read_results(out)) == {"bbox", "segm"}
        state = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu",
                           weights_only=False)["model"]
        first = torch.load(weights, map_location="cpu", weights_only=False)["model"]
        value = state["roi_heads.box_predictor." + key]
        if key.startswith("cls_loss.mean_score"):
            assert not torch.allclose(value, torch.full_like(value, 0.01))  # statistics moved
            frozen = "backbone.bottom_up.stem.conv1.weight"
        else:
            assert value.shape[0] > 49  # C + 2 + G group logits
            frozen = "roi_heads.box_head.fc1.weight"
        assert torch.equal(state[frozen], first[frozen])  # decoupled: frozen part unchanged


def _memory(path):
    return torch.load(path, map_location="cpu", weights_only=False)["states"]["roi_heads.memory"]


@pytest.mark.dist
def test_rio_memory_resume_and_per_rank_memories(python, repo_root, tmp_path):
    """RIO through train_net.py: memories saved per rank, restored on --resume, never shared."""
    rio = ["--config-file", "configs/Synthetic/rio_R18_FPN.yaml"]
    out = str(tmp_path / "rio")
    proc = subprocess.run(
        [python, "train_net.py", *rio, *SMALL, "SOLVER.MAX_ITER", "3",
         "DATASETS.TEST", "()", "OUTPUT_DIR", out],
        cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    saved = _memory(os.path.join(out, "model_final.rank0.pth"))
    assert int(saved["fill"].sum()) > 0
    assert not os.path.exists(os.path.join(out, "model_0000002.rank0.pth"))  # only the newest
    proc = subprocess.run(
        [python, "train_net.py", *rio, "--resume", *SMALL, "SOLVER.MAX_ITER", "5",
         "DATASETS.TEST", "()", "OUTPUT_DIR", out],
        cwd=repo_root, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "Restored per-process state (random generators, roi_heads.memory)" in log
    resumed = _memory(os.path.join(out, "model_final.rank0.pth"))
    assert int(resumed["fill"].sum()) > int(saved["fill"].sum())  # continued, not restarted

    out2 = str(tmp_path / "rio_dist")
    proc = subprocess.run(
        [python, "train_net.py", *rio, "--num-gpus", "2", *SMALL, "SOLVER.IMS_PER_BATCH", "8",
         "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()", "OUTPUT_DIR", out2],
        cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    r0 = _memory(os.path.join(out2, "model_final.rank0.pth"))
    r1 = _memory(os.path.join(out2, "model_final.rank1.pth"))
    assert int(r0["fill"].sum()) > 0 and int(r1["fill"].sum()) > 0
    assert not torch.equal(r0["features"], r1["features"])  # each rank keeps its own memory
