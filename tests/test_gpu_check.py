"""tools/gpu_check.py: its pass / fail bookkeeping, and its CPU smoke run (``--device cpu --tiny``:
every LVIS v1 R50 config trained in fp32 and bfloat16 and timed at inference, on the LVIS
rehearsal data at 1,203 classes)."""
import json
import math
import subprocess

import pytest

from tools import gpu_check


def fake_run(losses, s_per_iter=1.0, stopped=None, error=None):
    finite = bool(losses) and all(math.isfinite(x) for x in losses) and not error
    return {"precision": "", "losses": list(losses), "s_per_iter": s_per_iter, "finite": finite,
            "stopped": stopped, "error": error, "peak_memory_bytes": 2**30}


def fake_report(runs_by_method, stopped=None):
    return {
        "amp_precision": "fp16", "tolerance": 0.05, "device": "cuda", "stopped": stopped,
        "methods": [
            {"method": key, "config": f"configs/LVISv1/{key}.yaml", "runs": runs,
             "eval": {"images_per_s": 5.0}, "notes": [], "error": None}
            for key, runs in runs_by_method.items()
        ],
    }


def test_checks_pass_and_ratios_against_the_baseline():
    report = gpu_check.evaluate_checks(fake_report({
        "rfs": {"fp32": fake_run([5.0, 4.0], 0.4), "fp16": fake_run([5.01, 4.1], 0.2)},
        "bags_stage2": {"fp32": fake_run([6.0, 5.0], 0.2), "fp16": fake_run([6.1, 5.0], 0.3)},
    }))
    assert report["status"] == "passed" and report["failures"] == []
    rfs, bags = report["methods"]
    assert rfs["runs"]["fp32"]["ratio_vs_baseline"] == pytest.approx(1.0)
    assert bags["runs"]["fp32"]["ratio_vs_baseline"] == pytest.approx(0.5)
    assert bags["runs"]["fp16"]["ratio_vs_baseline"] == pytest.approx(1.5)  # same precision
    assert rfs["agreement"]["relative_difference"] == pytest.approx(0.002)
    table = gpu_check.format_table(report)
    row = "| rfs.yaml | fp16 | 0.200 | 1.000 | 1.00 GiB | 5.01 -> 4.1 | yes | 2.00e-03 (ok) | - |"
    assert row in table


def test_non_finite_loss_disagreement_and_budget_stop_are_reported():
    nan = gpu_check.evaluate_checks(fake_report({
        "rfs": {"fp32": fake_run([5.0, float("nan")]), "fp16": fake_run([5.0, 4.0])}}))
    assert nan["status"] == "failed" and "non-finite" in nan["failures"][0]
    far = gpu_check.evaluate_checks(fake_report({
        "rfs": {"fp32": fake_run([5.0, 4.0]), "fp16": fake_run([5.5, 4.0])}}))
    assert far["status"] == "failed" and "relative difference 0.1 > 0.05" in far["failures"][0]
    assert "FAIL" in gpu_check.format_table(far)
    stop = gpu_check.evaluate_checks(fake_report(
        {"rfs": {"fp32": fake_run([5.0, 4.0]), "fp16": fake_run([5.0, 4.0])}},
        stopped="time budget"))
    assert stop["status"] == "incomplete"


def test_relative_difference():
    assert gpu_check.relative_difference(1.05, 1.0) == pytest.approx(0.05)
    assert gpu_check.relative_difference(0.0, 0.0) == 0.0
    assert gpu_check.relative_difference(1.0, 0.0) == math.inf
    assert gpu_check.relative_difference(None, 1.0) is None


def test_write_docs_needs_a_gpu_and_pending_section(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu", "--tiny", "--write-docs"])
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    assert gpu_check.main(["--write-docs-pending", "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert "## GPU check" in text and "Not run on a GPU yet" in text
    assert gpu_check.GPU_COMMAND in text


@pytest.mark.slow
def test_cpu_tiny_run(python, repo_root, tmp_path):
    """Every config trains 2 iterations in fp32 and bf16 from the same weights, losses finite
    and in agreement, positive step times and ratios, and is timed at inference."""
    out = tmp_path / "gpu_check.json"
    # a generous budget: the suite may share the cores with other jobs
    proc = subprocess.run(
        [python, "tools/gpu_check.py", "--device", "cpu", "--tiny", "--budget-s", "3000",
         "--output", str(out)],
        cwd=repo_root, capture_output=True, text=True, timeout=3600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"gpu_check.py failed ({proc.returncode}):\n{log[-6000:]}"
    report = json.loads(out.read_text())
    assert report["status"] == "passed" and report["failures"] == [] and not report["not_run"]
    assert report["amp_precision"] == "bf16" and report["num_classes"] == 1203
    assert report["train_dataset"] == "rehearsal_lvis_v1_train"
    methods = {e["method"]: e for e in report["methods"]}
    assert list(methods) == [key for key, _, _ in gpu_check.METHODS]
    for key, entry in methods.items():
        assert entry["error"] is None and not entry.get("skipped"), key
        assert set(entry["runs"]) == {"fp32", "bf16"}, key
        for precision, run in entry["runs"].items():
            assert run["finite"] and len(run["losses"]) == 2, (key, precision)
            assert all(math.isfinite(x) and x > 0 for x in run["losses"]), (key, precision)
            assert run["s_per_iter"] > 0 and run["ratio_vs_baseline"] > 0, (key, precision)
            assert run["peak_memory_bytes"] > 0 and run["peak_memory_kind"], (key, precision)
            assert run["timed_iterations"] == 1, (key, precision)
        agreement = entry["agreement"]
        assert agreement["passed"] and agreement["relative_difference"] <= 0.1, key
        assert entry["eval"]["images"] == 1 and entry["eval"]["images_per_s"] > 0, key
        assert entry["bn_calibration"]["layers"] > 0, key
        assert max(max(s) for s in entry["train_image_sizes"] if s != "...") <= 96, key
    assert methods["rfs"]["runs"]["fp32"]["ratio_vs_baseline"] == pytest.approx(1.0)
    # the stage-2 configs keep their decoupled training: fewer trainable parameters
    assert methods["bags_stage2"]["trainable_parameters"] < methods["rfs"]["trainable_parameters"]
    assert "| mask_rcnn_R_50_FPN_1x_rfs.yaml | bf16 |" in log and "all checks passed" in log
    # the docs section a GPU run writes renders from such a report
    section = gpu_check.docs_section(report)
    assert "all checks passed" in section
    assert "| loce_mask_rcnn_R_50_FPN_stage2.yaml | bf16 |" in section
