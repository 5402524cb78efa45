#!/usr/bin/env python
"""
Choose NorCal's gamma for a trained softmax model on training images, then evaluate with and
without calibration:

    python tools/calibrate.py --config-file CONFIG [--gammas 0,0.1,...] [--images 300]
                              [--metric segm] [--no-eval] MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

1. **Sweep** on a part of the *training* set (``DATASETS.TRAIN[0]``; never the validation set):
   ``--images`` images evenly spaced in image-id order, written as an LVIS json of their own
   (``OUTPUT_DIR/calibration/<train>_calibration.json``) and evaluated with the project's LVIS
   evaluator, once per gamma (``gamma 0`` = no calibration). The chosen gamma maximises
   ``--metric`` AP (``segm`` when the model has masks, else ``bbox``; ties: the smaller gamma).
   Note what these images are: a model trained on the whole training set has seen them, so the
   sweep measures calibration on training images, not on unseen ones; hold them out of training
   (e.g. your own split via ``LONGTAIL.REGISTER_DATASETS``) for a truly held-out choice.
2. **Evaluation** (unless ``--no-eval``): every ``DATASETS.TEST`` with gamma 0 and with the chosen
   gamma, in one command; both tables printed side by side and written to
   ``OUTPUT_DIR/calibration/calibration.json`` (sweep, choice, both evaluations) and
   ``OUTPUT_DIR/calibration/eval_results.json`` (the calibrated results, in train_net.py's format).

Other ``TEST.CALIBRATION.*`` keys (``METHOD``, ``WITH``, ``RENORM``, ``ALLOW_NON_SOFTMAX``) apply
to every gamma of the sweep; ``TEST.CALIBRATION.GAMMA`` on the command line is ignored (the sweep
sets it). The model must have a softmax classifier (``softmax_ce``, ``ebl``, RIO's cosine
classifier); other losses are refused unless ``TEST.CALIBRATION.ALLOW_NON_SOFTMAX True``.
"""
import argparse
import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

logger = logging.getLogger("longtail.calibrate")

DEFAULT_GAMMAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
# the sweep of METHOD "cb" (class-balanced weights), whose GAMMA is beta in (0, 1)
DEFAULT_BETAS = (0.9, 0.99, 0.999, 0.9999)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--gammas", default=",".join(f"{g:g}" for g in DEFAULT_GAMMAS),
                   help="comma-separated gammas of the sweep (0 = no calibration is always "
                        "included); default %(default)s (METHOD 'cb': betas "
                        + ",".join(f"{b:g}" for b in DEFAULT_BETAS) + ")")
    p.add_argument("--images", type=int, default=300,
                   help="training images of the sweep, evenly spaced in image-id order")
    p.add_argument("--metric", choices=("bbox", "segm"), default=None,
                   help="AP that chooses gamma (default: segm with MASK_ON, else bbox)")
    p.add_argument("--no-eval", action="store_true", help="sweep only")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def select_images(records, count):
    """``count`` records evenly spaced in image-id order (all when ``count >= len``)."""
    ordered = sorted(records, key=lambda r: r["image_id"])
    if count >= len(ordered):
        return ordered
    step = len(ordered) / count
    return [ordered[int(i * step)] for i in range(count)]


def subset_json(train_json, image_ids, path):
    """Write the LVIS json of ``image_ids`` (images, their annotations, every category)."""
    from longtail.checkpoint import atomic_write_text

    with open(train_json) as f:
        data = json.load(f)
    keep = set(image_ids)
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(data))
    return path


def register_calibration_split(cfg, count):
    """Register ``<train>_calibration`` (``count`` training images, their own json) and return
    its name."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    train = cfg.DATASETS.TRAIN[0]
    chosen = select_images(DatasetCatalog.get(train), count)
    name = f"{train}_calibration"
    meta = MetadataCatalog.get(train).as_dict()
    path = subset_json(meta["json_file"], [r["image_id"] for r in chosen],
                       os.path.join(cfg.OUTPUT_DIR, "calibration", f"{name}.json"))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: chosen)
    meta.pop("name", None)
    meta["json_file"] = path
    MetadataCatalog.get(name).set(**meta)
    return name, len(chosen)


def evaluate(cfg, model, dataset, folder):
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset

    from longtail import Trainer

    evaluator = Trainer.build_evaluator(cfg, dataset, folder)
    return inference_on_dataset(model, build_detection_test_loader(cfg, dataset), evaluator)


def set_gamma(cfg, model, gamma):
    """Install NorCal with ``gamma`` (None for 0) on the model's box predictor."""
    from longtail.predictor import LongTailFastRCNNOutputLayers, build_calibration

    predictor = model.roi_heads.box_predictor
    if not isinstance(predictor, LongTailFastRCNNOutputLayers):
        raise SystemExit(
            "NorCal is an option of the long-tail box predictor: evaluate with "
            "MODEL.ROI_HEADS.NAME 'LongTailROIHeads' (the weights of a StandardROIHeads softmax "
            "model load into it unchanged).")
    c = cfg.clone()
    c.defrost()
    c.TEST.CALIBRATION.GAMMA = float(gamma)
    if gamma == 0:  # the other options only mean something with a gamma
        for key, default in (("METHOD", "gamma"), ("WITH", "exps"), ("RENORM", True),
                             ("ALLOW_NON_SOFTMAX", False)):
            c.TEST.CALIBRATION[key] = default
    predictor.calibration = build_calibration(c, predictor.cls_loss)
    if predictor.calibration is not None:
        predictor.calibration.to(next(model.parameters()).device)


def _row(label, results, keys=("AP", "APr", "APc", "APf")):
    cells = []
    for task in ("bbox", "segm"):
        if task in results:
            cells += [f"{results[task].get(k, float('nan')):.2f}" for k in keys]
    return f"| {label} | " + " | ".join(cells) + " |"


def _header(tasks, keys=("AP", "APr", "APc", "APf")):
    cols = [f"{t} {k}" for t in tasks for k in keys]
    return ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]


def main(argv=None):
    args = build_parser().parse_args(argv)
    if len(args.opts) % 2:
        raise SystemExit(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    import train_net
    from detectron2.checkpoint import DetectionCheckpointer

    from longtail import Trainer

    ns = argparse.Namespace(config_file=args.config_file, opts=list(args.opts), eval_only=True,
                            resume=False, num_gpus=1)
    cfg = train_net.setup(ns)
    if not cfg.MODEL.WEIGHTS:
        raise SystemExit("tools/calibrate.py needs the trained model: MODEL.WEIGHTS <path>.")
    metric = args.metric or ("segm" if cfg.MODEL.MASK_ON else "bbox")
    cb = cfg.TEST.CALIBRATION.METHOD == "cb"
    text = args.gammas
    if cb and text == build_parser().get_default("gammas"):
        text = ",".join(f"{b:g}" for b in DEFAULT_BETAS)
    try:
        gammas = sorted(set([0.0] + [float(g) for g in text.split(",") if g.strip()]))
    except ValueError:
        raise SystemExit(f"--gammas must be comma-separated numbers, got {text!r}")
    if min(gammas) < 0 or (cb and max(gammas) >= 1):
        raise SystemExit(f"--gammas {text!r}: must be >= 0" + (" and < 1 (beta of METHOD 'cb')"
                                                                if cb else ""))
    # the model is built with NorCal off; the sweep installs it gamma by gamma
    plain = cfg.clone()
    plain.defrost()
    for key, default in (("GAMMA", 0.0), ("METHOD", "gamma"), ("WITH", "exps"), ("RENORM", True),
                         ("ALLOW_NON_SOFTMAX", False)):
        plain.TEST.CALIBRATION[key] = default
    plain.freeze()
    model = Trainer.build_model(plain)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    out = os.path.join(cfg.OUTPUT_DIR, "calibration")
    os.makedirs(out, exist_ok=True)

    split, num_images = register_calibration_split(cfg, args.images)
    sweep = {}
    for gamma in gammas:
        set_gamma(cfg, model, gamma)
        sweep[gamma] = evaluate(cfg, model, split, os.path.join(out, f"sweep_gamma{gamma:g}"))
    chosen = max(gammas, key=lambda g: (sweep[g][metric]["AP"], -g))
    tasks = [t for t in ("bbox", "segm") if t in sweep[0.0]]
    lines = [f"NorCal sweep on {num_images} training images of {cfg.DATASETS.TRAIN[0]} "
             f"(seen in training unless held out), choosing by {metric} AP:", ""]
    lines += _header(tasks) + [_row(f"gamma {g:g}" + (" (chosen)" if g == chosen else ""),
                                    sweep[g]) for g in gammas]
    lines += ["", f"Chosen gamma: {chosen:g} ({metric} AP {sweep[chosen][metric]['AP']:.2f}; "
                  f"uncalibrated {sweep[0.0][metric]['AP']:.2f})"]
    report = {"config_file": args.config_file, "weights": cfg.MODEL.WEIGHTS,
              "calibration_images": num_images, "calibration_dataset": cfg.DATASETS.TRAIN[0],
              "metric": metric, "sweep": {f"{g:g}": sweep[g] for g in gammas},
              "chosen_gamma": chosen, "options": dict(cfg.TEST.CALIBRATION)}
    if not args.no_eval:
        report["test"] = {}
        calibrated = {}
        for dataset in cfg.DATASETS.TEST:
            both = {}
            for label, gamma in (("uncalibrated", 0.0), ("calibrated", chosen)):
                set_gamma(cfg, model, gamma)
                both[label] = evaluate(cfg, model, dataset,
                                       os.path.join(out, dataset, f"gamma{gamma:g}"))
            report["test"][dataset] = both
            calibrated[dataset] = both["calibrated"]
            lines += ["", f"{dataset}: without and with NorCal (gamma {chosen:g})", ""]
            lines += _header(tasks) + [_row("uncalibrated", both["uncalibrated"]),
                                       _row(f"NorCal gamma {chosen:g}", both["calibrated"])]
        results = calibrated if len(calibrated) > 1 else next(iter(calibrated.values()))
        with open(os.path.join(out, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
    with open(os.path.join(out, "calibration.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("\n" + "\n".join(lines) + f"\n\nWritten: {os.path.join(out, 'calibration.json')}",
          flush=True)
    return report


if __name__ == "__main__":
    main()
