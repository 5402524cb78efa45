"""The benchmark scripts' bookkeeping (what they parse and aggregate), without training."""
import json

import pytest

from tools.benchmark import (describe_dataset, eval_seconds, step_seconds, summarise,
                                 train_seconds, verdict)
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


def test_train_seconds_of_a_resumed_run(tmp_path):
    """Windows of 20 iterations x their median time; records re-logged after a resume win."""
    metrics = tmp_path / "metrics.json"
    recs = [{"iteration": 19, "time": 1.0}, {"iteration": 39, "time": 2.0},
            {"iteration": 59, "time": 9.0},  # logged, then the process was killed at 65
            {"iteration": 59, "time": 3.0}, {"iteration": 79, "time": 1.0},  # resumed from 40
            {"iteration": 79, "bbox/AP": 1.0}]
    metrics.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert train_seconds(str(metrics)) == pytest.approx(20 * 1.0 + 20 * 2.0 + 20 * 3.0 + 20 * 1.0)


def test_summary_means_stds_and_ratios_to_the_baseline():
    def run(ap, apr, step, rss, wall):
        res = {"AP": ap, "AP50": 0.0, "APr": apr, "APc": 1.0, "APf": 2.0}
        return {"results": {"bbox": res, "segm": res}, "step_seconds": step,
                "peak_rss_mib": rss, "train_seconds": wall, "eval_seconds": 10.0}

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
    # paired effects: seed 0 APr +4, seed 1 +6; APf equal in both seeds (not "up")
    assert s["rio"]["delta_bbox_APr"] == (5.0, pytest.approx(2 ** 0.5))
    assert s["rio"]["up_bbox_APr"] == 2 and s["rio"]["up_bbox_APf"] == 0
    assert s["rio"]["down_bbox_APf"] == 0
    assert "reference" not in s["rio"]  # its reference (rfs) is not in this run
    assert verdict(s["rio"], 2) == ("APr up in all 2 seeds; "
                                    "APf not consistent (0 up, 0 down of 2 seeds)")


def test_summary_compares_a_method_with_the_one_it_extends():
    def run(apr, apf):
        res = {"AP": 1.0, "AP50": 0.0, "APr": apr, "APc": 1.0, "APf": apf}
        return {"results": {"bbox": res, "segm": res}, "step_seconds": 1.0,
                "peak_rss_mib": 1.0, "train_seconds": 1.0, "eval_seconds": 1.0}

    raw = {"baseline": {0: run(0, 20), 1: run(1, 21)},
           "rio": {0: run(5, 19), 1: run(6, 20)},
           "rio_ebl": {0: run(4, 17), 1: run(6.5, 18)}}  # above the baseline, not above rio
    s = summarise(raw, [0, 1])
    assert s["rio_ebl"]["reference"] == "rio" and "reference" not in s["baseline"]
    assert s["rio_ebl"]["ref_delta_bbox_APf"] == (-2.0, 0.0)
    assert verdict(s["rio_ebl"], 2) == "APr up in all 2 seeds; APf down in all 2 seeds"
    assert verdict(s["rio_ebl"], 2, prefix="ref_") == (
        "APr not consistent (1 up, 1 down of 2 seeds); APf down in all 2 seeds")


def test_verdict_reports_mixed_seeds():
    entry = {"up_bbox_APr": 1, "down_bbox_APr": 2, "up_bbox_APf": 0, "down_bbox_APf": 3}
    assert verdict(entry, 3) == ("APr not consistent (1 up, 2 down of 3 seeds); "
                                 "APf down in all 3 seeds")


def test_describe_dataset_counts_buckets_and_images(tmp_path):
    cats = [{"id": i, "frequency": f} for i, f in enumerate("rrcfff", 1)]
    (tmp_path / "t.json").write_text(json.dumps({"categories": cats, "images": [{}] * 7}))
    (tmp_path / "v.json").write_text(json.dumps({"categories": cats, "images": [{}] * 3}))
    text = describe_dataset("synth", str(tmp_path / "t.json"), str(tmp_path / "v.json"))
    assert text == "`synth`, 6 classes (2 r / 1 c / 3 f), 7 training and 3 validation images"


def test_replace_section_keeps_the_other_sections(tmp_path):
    path = tmp_path / "bench.md"
    replace_section(str(path), "A", "first")
    replace_section(str(path), "B", "second")
    replace_section(str(path), "A", "updated")
    text = path.read_text()
    assert "updated" in text and "second" in text and "first" not in text
    assert text.index("## A") < text.index("## B")


def test_benchmark_all_schedules_stages_in_order_with_jobs(monkeypatch, tmp_path, capsys):
    """--jobs 2: every stage runs once, BAGS after its seed's baseline, trailing options passed."""
    import threading
    import time as _time

    import tools.benchmark as ba

    calls, lock = [], threading.Lock()

    def fake_train(config, out, opts, log):
        _time.sleep(0.01)
        with lock:
            calls.append((config, out, list(opts)))
        res = {k: 1.0 for k in ("AP", "AP50", "APr", "APc", "APf")}
        return {"results": {"bbox": res, "segm": res}, "wall_seconds": 2.0,
                "step_seconds": 0.5, "train_seconds": 3.0, "peak_rss_mib": 100.0,
                "eval_seconds": 1.0}

    trained_by = {}

    def fake_calibrate(config, out, trained, opts, size, log):
        # NorCal: no training; tools/calibrate.py on the trained (rfs) run of its seed
        with lock:
            calls.append((config, out, list(opts)))
            trained_by[out] = trained
        res = {k: 1.0 for k in ("AP", "AP50", "APr", "APc", "APf")}
        return {"results": {"bbox": res, "segm": res}, "uncalibrated": {"bbox": res, "segm": res},
                "gamma": 0.5, "per_category_dir": out, "wall_seconds": 2.0, "step_seconds": 0.5,
                "train_seconds": 3.0, "peak_rss_mib": 100.0, "eval_seconds": None}

    monkeypatch.setattr(ba, "train", fake_train)
    monkeypatch.setattr(ba, "calibrate", fake_calibrate)
    monkeypatch.setattr(ba, "dataset_description", lambda size: f"the {size} dataset")
    monkeypatch.setattr(ba, "ROOT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["benchmark.py", "table", "--size", "smoke", "--seeds", "0", "1",
                                     "--jobs", "2", "--no-write", "MODEL.X", "1"])
    ba.main()
    n_stages = sum(1 for _, st in ba.METHODS.values() for c, _ in st if not c.startswith("@"))
    assert len(calls) == 2 * n_stages
    outs = [out for _, out, _ in calls]
    assert len(set(outs)) == len(outs)
    for seed in (0, 1):
        base = outs.index(f"output/benchmark/smoke/baseline/seed{seed}/s1")
        bags = outs.index(f"output/benchmark/smoke/bags/seed{seed}/bags")
        assert base < bags
        weights = calls[bags][2][calls[bags][2].index("MODEL.WEIGHTS") + 1]
        assert weights == f"output/benchmark/smoke/baseline/seed{seed}/s1/model_final.pth"
        rfs = outs.index(f"output/benchmark/smoke/rfs/seed{seed}/s1")
        norcal = outs.index(f"output/benchmark/smoke/norcal/seed{seed}/norcal")
        assert rfs < norcal
        assert trained_by[outs[norcal]] == f"output/benchmark/smoke/rfs/seed{seed}/s1"
    for _, _, opts in calls:
        assert opts[opts.index("MODEL.X") + 1] == "1"
        assert "LONGTAIL.NUM_THREADS" in opts  # --jobs limits each run's threads
    out = capsys.readouterr().out
    assert "--jobs 2 MODEL.X 1" in out
    assert "NorCal: the rfs runs" in out and "seed 0: 0.5, seed 1: 0.5" in out


def test_benchmark_all_rejects_odd_options(monkeypatch):
    import tools.benchmark as ba

    monkeypatch.setattr("sys.argv", ["benchmark.py", "table", "--no-write", "MODEL.X"])
    with pytest.raises(SystemExit):
        ba.main()


def test_benchmark_suite_writes_its_section(monkeypatch, tmp_path, capsys):
    """`suite bags`: its rows in order, the command and each row's config in the section, the
    section written into docs/benchmarks.md beside the others."""
    import tools.benchmark as ba

    seen = []

    def fake_row(config, out, num_gpus, opts, row_opts=()):
        seen.append((config, out, list(opts)))
        value = 10.0 * len(seen)
        res = {"AP": value, "AP50": value, "APr": 1.0, "APc": 2.0, "APf": value}
        return {"bbox": res, "segm": res}

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("# Benchmarks\n\n## Other\n\nkept\n")
    monkeypatch.setattr(ba, "run_suite_row", fake_row)
    monkeypatch.setattr(ba, "ROOT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["benchmark.py", "suite", "bags", "LONGTAIL.NUM_THREADS", "1"])
    ba.main()
    assert [c for c, _, _ in seen] == [r[1] for r in ba.SUITES["bags"][1]]
    assert all(o == ["LONGTAIL.NUM_THREADS", "1"] for _, _, o in seen)
    text = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "kept" in text and "`python tools/benchmark.py suite bags LONGTAIL.NUM_THREADS 1`" in text
    assert "| stage 2: BAGS classifier (`bags_stage2.yaml`) | bbox | 20.0 | 20.0 | 1.0 | 2.0 | 20.0 | 19.0 |" in text
