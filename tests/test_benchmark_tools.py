"""The benchmark scripts' bookkeeping (what they parse and aggregate), without training."""
import json

import pytest

from tools.benchmark_all import eval_seconds, step_seconds, summarise
from tools.benchmarks_md import replace_section


def test_step_and_eval_times_from_a_run(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"iteration": 19, "time": 0.5}, {"iteration": 39, "time": 0.7},
        {"iteration": 59, "time": 0.6}, {"bbox/AP": 3.0}]) + "\n")
    assert step_seconds(str(metrics)) == pytest.approx(0.6)
    log = tmp_path / "log.txt"
    log.write_text(
        "[11/24 10:00:00 d2.evaluation.evaluator]: Start inference on 10 batches\n"
        "[11/24 10:00:20 d2.evaluation.lvis_evaluation]: Evaluation results for bbox: \n"
        "[11/24 10:00:31 d2.evaluation.lvis_evaluation]: Evaluation results for segm: \n"
        "[11/24 10:05:00 d2.evaluation.evaluator]: Start inference on 10 batches\n"
        "[11/24 10:05:12 d2.evaluation.lvis_evaluation]: Evaluation results for bbox: \n")
    assert eval_seconds(str(log)) == 12.0  # the last evaluation of the run


def test_summary_means_stds_and_ratios_to_the_baseline():
    def run(ap, apr, step, rss, wall):
        res = {"AP": ap, "AP50": 0.0, "APr": apr, "APc": 1.0, "APf": 2.0}
        return {"results": {"bbox": res, "segm": res}, "step_seconds": step,
                "peak_rss_mib": rss, "train_wall_seconds": wall, "eval_seconds": 10.0}

    raw = {
        "baseline": {0: run(20, 2, 1.0, 1000, 100), 1: run(22, 4, 2.0, 1000, 200)},
        "rio": {0: run(21, 6, 1.1, 1100, 110), 1: run(23, 10, 2.4, 1200, 220)},
    }
    s = summarise(raw, [0, 1])
    assert s["baseline"]["bbox_AP"] == (21.0, pytest.approx(2 ** 0.5))
    assert s["rio"]["bbox_APr"][0] == 8.0
    assert s["rio"]["step_ratio"][0] == pytest.approx((1.1 + 1.2) / 2)  # per-seed ratios
    assert s["rio"]["memory_ratio"][0] == pytest.approx((1.1 + 1.2) / 2)
    assert s["baseline"]["step_ratio"] == (1.0, 0.0)


def test_replace_section_keeps_the_other_sections(tmp_path):
    path = tmp_path / "bench.md"
    replace_section(str(path), "A", "first")
    replace_section(str(path), "B", "second")
    replace_section(str(path), "A", "updated")
    text = path.read_text()
    assert "updated" in text and "second" in text and "first" not in text
    assert text.index("## A") < text.index("## B")
