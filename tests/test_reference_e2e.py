"""The reference losses through ``train_net.py`` on the mini embedded dataset: trained, killed
(SIGKILL) mid-run, resumed, evaluated; the resumed run must end bit-identical to the uninterrupted
one (weights, Seesaw's per-process counts, EQLv2's global statistics, every generator, the
evaluation), with 2 processes (gloo) where the state's distributed semantics matter."""
import os

import pytest
import torch

from test_fault_injection import _assert_identical, _final_state, _run

CASES = {
    # config, processes
    "seesaw": ("configs/Synthetic/seesaw_R18_FPN.yaml", 2),
    "eqlv2": ("configs/Synthetic/eqlv2_R18_FPN.yaml", 2),
    "fed_loss": ("configs/Synthetic/fed_loss_R18_FPN.yaml", 1),
}
COUNTS = "roi_heads.box_predictor.cls_loss"


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_loss_trains_resumes_exactly_and_evaluates(python, repo_root, tmp_path, name):
    config, gpus = CASES[name]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    out = _run(python, repo_root, config, [], straight, gpus)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    # killed during iteration 7 (checkpoints after iterations 2 and 5): resumes from 5
    out = _run(python, repo_root, config, [], killed, gpus, fault="step:8:0")
    assert out.returncode != 0
    out = _run(python, repo_root, config, [], killed, gpus, resume=True)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "Resuming from" in out.stdout + out.stderr or os.path.exists(
        os.path.join(killed, "model_0000005.pth"))

    a_model, a_ranks, a_results = _final_state(straight, gpus)
    b_model, b_ranks, b_results = _final_state(killed, gpus)
    _assert_identical(a_model["model"], b_model["model"], "model")
    for r, (x, y) in enumerate(zip(a_ranks, b_ranks)):
        _assert_identical(x["states"], y["states"], f"rank{r}.states")
    _assert_identical(a_results, b_results, "eval_results")
    assert set(a_results) >= {"bbox", "segm"}

    weights = a_model["model"]
    if name == "seesaw":
        # per-process counts, in each process's state file (not the model file), never synced
        assert not any(k.startswith(COUNTS) for k in weights)
        counts = [x["states"][COUNTS]["class_counts"] for x in a_ranks]
        assert counts[0].shape == (1, 49)  # 4 images / 2 processes = 1 VGPU of 2, C + 1
        assert not torch.equal(counts[0], counts[1])
        # every sampled RoI counted once: 64 per image, 12 iterations x 2 images per process
        assert all(torch.all(c.sum(1) == 12 * 2 * 64) for c in counts)
        assert weights["roi_heads.box_predictor.cls_score.weight"].shape[0] == 50  # C + 2
    elif name == "eqlv2":
        # global statistics in the model file (identical on every process by construction)
        pos, neg = weights[f"{COUNTS}.pos_grad"], weights[f"{COUNTS}.neg_grad"]
        assert pos.shape == (48,) and torch.all(neg > 0)
        assert torch.allclose(weights[f"{COUNTS}.pos_neg"], pos / (neg + 1e-10))
    else:
        from detectron2.data import MetadataCatalog

        import longtail  # noqa: F401  (registers the datasets)
        from longtail.datasets import IMAGE_COUNT, prepare_datasets

        prepare_datasets(["longtail_synth_mini_train"])
        counts = torch.tensor(MetadataCatalog.get("longtail_synth_mini_train").get(IMAGE_COUNT),
                              dtype=torch.float32)
        assert torch.allclose(weights[f"{COUNTS}.fed_loss_cls_weights"], counts.sqrt())
