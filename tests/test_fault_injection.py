"""
Fault injection: a LOCE stage-2 run (EBL + MFS: mean scores, per-process object memories, the
MFS initialisation pass, per-process generators) and a BAGS stage-2 run (group tables, seeded
"others" draws), with 1 and with 2 processes (gloo), are killed (SIGKILL) again and again at
seeded random moments (during an MFS initialisation step, a training step, a checkpoint file
write, an evaluation batch; ``tests/fault_injection.py``), resumed with ``--resume`` after each
kill, and must end bit-identical to an uninterrupted run: weights and buffers (mean scores, BAGS
tables), every process's memory and generator state, and the evaluation results.

Each chain draws its kill points from ``random.Random(seed)`` given the state the previous kill
left (a point the launch will reach: MFS initialisation steps only before the first checkpoint,
steps up to the remaining iterations, ...), so a chain is reproducible; the points are printed.
"""
import json
import os
import random
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

MAX_ITER = 12
COMMON = [
    "MODEL.WEIGHTS", "", "DATASETS.TRAIN", "('longtail_synth_mini_train',)",
    "DATASETS.TEST", "('longtail_synth_mini_val',)", "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.CHECKPOINT_PERIOD", "3", "TEST.EVAL_PERIOD", "6", "DATALOADER.NUM_WORKERS", "0",
    "LONGTAIL.NUM_THREADS", "1", "SEED", "3", "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "TEST.DETECTIONS_PER_IMAGE", "20",
]
CHAINS = {
    # config, extra options, MFS initialisation steps per process (1 image per class and VGPU)
    "loce_mfs": ("configs/Synthetic/loce_stage2_ebl_mfs.yaml",
                 ["MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS", "1"]),
    "bags": ("configs/Synthetic/bags_stage2.yaml", []),
}
# (chain, processes) -> kills: 10 per layout with the LOCE chain; BAGS adds its tables
KILLS = {("loce_mfs", 1): 10, ("loce_mfs", 2): 10, ("bags", 2): 5}
# validation images per process (the mini validation split has 80 images)
EVAL_BATCHES = 80


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _run(python, repo_root, config, extra, out, gpus, fault="", resume=False, timeout=900):
    cmd = [python, "tests/fault_injection.py", "--config-file", config, "--num-gpus", str(gpus)]
    cmd += (["--resume"] if resume else []) + COMMON + extra + ["OUTPUT_DIR", out]
    env = dict(os.environ, LONGTAIL_TEST_FAULT=fault)
    return subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _last_iteration(out: str) -> int:
    """Iteration of the checkpoint ``last_checkpoint`` names (-1: none)."""
    tag = os.path.join(out, "last_checkpoint")
    if not os.path.exists(tag):
        return -1
    with open(tag) as f:
        name = f.read().strip()
    return int(_load(os.path.join(out, name))["iteration"])


def draw_fault(rng: random.Random, start_iter: int, gpus: int, mfs_steps: int,
               used: Optional[Dict[str, int]] = None) -> str:
    """
    A kill point the next launch reaches, given the iteration it starts at; each launch gets at
    most one checkpoint further (checkpoints after iterations 2, 5, 8, 11, evaluations after 5
    and 11), so the kills spread over the whole run. The kind is the least used so far (``used``
    counts them; ties drawn at random), so every kind is exercised.
    """
    remaining = MAX_ITER - start_iter
    kinds = ["step", "ckpt-file"]
    kinds += ["mfs-init"] if mfs_steps and start_iter == 0 else []
    kinds += ["eval"] if start_iter <= 5 or start_iter >= 9 else []
    if remaining <= 0:  # after model_final only the final evaluation is left to run
        kinds = ["eval"]
    used = {} if used is None else used
    fewest = min(used.get(k, 0) for k in kinds)
    kind = rng.choice([k for k in kinds if used.get(k, 0) == fewest])
    if "mfs-init" in kinds and not used.get("mfs-init"):
        kind = "mfs-init"  # reachable only before the first checkpoint: now
    used[kind] = used.get(kind, 0) + 1
    rank = rng.randrange(gpus)
    if kind == "mfs-init":
        n = rng.randint(1, mfs_steps)
    elif kind == "step":
        n = rng.randint(1, min(remaining, 3))
    elif kind == "ckpt-file":
        # per checkpoint: process state, [model, last_checkpoint on process 0], state rename
        n = rng.randint(1, 4 if rank == 0 else 2)
    else:
        n = rng.randint(1, EVAL_BATCHES // gpus)
    return f"{kind}:{n}:{rank}"


def _final_state(out: str, gpus: int) -> Tuple[Dict, List[Dict], Dict]:
    model = _load(os.path.join(out, "model_final.pth"))
    ranks = [_load(os.path.join(out, f"model_final.rank{r}.pth")) for r in range(gpus)]
    with open(os.path.join(out, "eval_results.json")) as f:
        results = json.load(f)
    return model, ranks, results


def _assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_chain(python, repo_root, tmp_path, name: str, gpus: int, seed: int,
              log: Optional[list] = None) -> List[str]:
    config, extra = CHAINS[name]
    straight = str(tmp_path / "straight")
    done = _run(python, repo_root, config, extra, straight, gpus)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    text = done.stdout + done.stderr
    mfs_steps = 0
    if name == "loce_mfs":
        line = next(ln for ln in text.splitlines() if "MFS initialisation pass: 1/" in ln)
        mfs_steps = int(line.split("MFS initialisation pass: 1/")[1].split()[0])

    rng = random.Random(seed)
    killed = str(tmp_path / "killed")
    faults: List[str] = []
    used: Dict[str, int] = {}
    for _ in range(KILLS[name, gpus]):
        start = _last_iteration(killed) + 1
        fault = draw_fault(rng, start, gpus, mfs_steps, used)
        out = _run(python, repo_root, config, extra, killed, gpus, fault=fault, resume=True)
        faults.append(fault)
        if log is not None:
            log.append((fault, start, out.returncode))
        # the kill, and nothing else, ended the launch (an error on resume would fail here)
        if gpus == 1:
            assert out.returncode == -9, f"{fault}: exit code {out.returncode}\n" + (
                out.stdout + out.stderr)[-3000:]
        else:
            assert out.returncode != 0 and "terminated with signal SIGKILL" in out.stderr, (
                f"{fault}: exit code {out.returncode}\n" + (out.stdout + out.stderr)[-3000:])
    out = _run(python, repo_root, config, extra, killed, gpus, resume=True)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

    a_model, a_ranks, a_results = _final_state(straight, gpus)
    b_model, b_ranks, b_results = _final_state(killed, gpus)
    assert a_model["iteration"] == b_model["iteration"] == MAX_ITER - 1
    _assert_identical(a_model["model"], b_model["model"], "model")
    for r, (x, y) in enumerate(zip(a_ranks, b_ranks)):
        _assert_identical(x["states"], y["states"], f"rank{r}.states")
        _assert_identical(x["rng"], y["rng"], f"rank{r}.rng")
    _assert_identical(a_results, b_results, "eval_results")
    return faults


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name,gpus", sorted(KILLS))
def test_killed_anywhere_resumes_bit_identical(python, repo_root, tmp_path, name, gpus):
    seed = {"loce_mfs": 11, "bags": 23}[name] * 10 + gpus
    log: list = []
    try:
        faults = run_chain(python, repo_root, tmp_path, name, gpus, seed, log)
    finally:
        print(f"{name}, {gpus} process(es), seed {seed}: (fault, start iteration, exit code) "
              f"{log}")
    assert len(faults) == KILLS[name, gpus]
    kinds = {f.split(":")[0] for f in faults}
    assert kinds >= {"step", "ckpt-file", "eval"} | ({"mfs-init"} if name == "loce_mfs" else set())
    if gpus > 1:
        assert {f.split(":")[2] for f in faults} == {"0", "1"}, "both processes killed"
