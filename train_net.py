#!/usr/bin/env python
"""
Train and evaluate long-tailed detectors (detectron2 + the ``longtail`` project).

Examples:
    # the embedded synthetic dataset, CPU, 2 processes (gloo)
    python train_net.py --config-file configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml --num-gpus 2
    # LVIS v1 on 8 GPUs
    python train_net.py --config-file configs/LVISv1/mask_rcnn_R_50_FPN_1x_rfs.yaml --num-gpus 8
    # evaluate saved weights
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    # continue from the last checkpoint in OUTPUT_DIR
    python train_net.py --config-file ... --resume
"""
import glob
import json
import logging
import os
import sys

import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import longtail
from longtail import Trainer, add_longtail_config, launch
from longtail.cls_losses import resolve_cls_loss
from longtail.custom_datasets import register_from_config
from longtail.datasets import resolve_num_classes
from longtail.launch import resolve_dist_url
from longtail.memory import object_memories
from longtail.weights import check_initial_weights, load_weights_for_evaluation

logger = logging.getLogger("longtail")

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
# AP_fixed / AP_pool (LONGTAIL.EVAL.FIXED_AP / POOLED_AP), printed in a second table when present
PROTOCOL_KEYS = ("AP_fixed", "APr_fixed", "APc_fixed", "APf_fixed",
                 "AP_pool", "APr_pool", "APc_pool", "APf_pool")


def setup(args):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # LONGTAIL.REGISTER_DATASETS, then NUM_CLASSES from the training json when left at default
    # (before the loggers exist: what was done is logged below)
    declared = register_from_config(cfg)
    default_num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    num_classes = resolve_num_classes(cfg)
    # detectron2 main's USE_SIGMOID_CE / USE_FED_LOSS select the project's loss of that name
    requested_loss = cfg.MODEL.LONGTAIL.CLS_LOSS
    cfg.MODEL.LONGTAIL.CLS_LOSS = resolve_cls_loss(cfg)
    cpu_fallback = cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()
    if cpu_fallback:
        cfg.MODEL.DEVICE = "cpu"
    if cfg.LONGTAIL.NUM_THREADS > 0:
        torch.set_num_threads(cfg.LONGTAIL.NUM_THREADS)
    cfg.freeze()
    default_setup(cfg, args)
    # the project's own messages (class statistics, BAGS groups, frozen parameters) go to the same log
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="longtail")
    if cpu_fallback:
        logging.getLogger("detectron2").warning("CUDA is not available: MODEL.DEVICE set to cpu.")
    for name in declared:
        meta = MetadataCatalog.get(name)
        logger.info("Dataset %s (LONGTAIL.REGISTER_DATASETS): %s, images in %s; read through %s",
                    name, meta.longtail_source_json, meta.image_root, meta.json_file)
    if cfg.MODEL.LONGTAIL.CLS_LOSS != requested_loss:
        logger.info("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE / USE_FED_LOSS: MODEL.LONGTAIL.CLS_LOSS "
                    "set to %r (was %r).", cfg.MODEL.LONGTAIL.CLS_LOSS, requested_loss)
    if num_classes is not None and num_classes != default_num_classes:
        logger.info("MODEL.ROI_HEADS.NUM_CLASSES was left at detectron2's default (%d): set to %d, "
                    "the categories of %s.", default_num_classes, num_classes,
                    (cfg.DATASETS.TRAIN or cfg.DATASETS.TEST)[0])
    return cfg


def _table(per_dataset, keys) -> list:
    lines = ["| task | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for dataset, tasks in per_dataset.items():
        for task, metrics in tasks.items():
            row = " | ".join(f"{metrics.get(k, float('nan')):.2f}" for k in keys)
            lines.append(f"| {(dataset + ' ' + task).strip()} | {row} |")
    return lines


def format_summary(results) -> str:
    """A plain-text LVIS table: one row per dataset and task (bbox, segm), SUMMARY_KEYS columns;
    a second table with the AP_fixed / AP_pool keys when the evaluation computed them."""
    per_dataset = {"": results} if "bbox" in results or "segm" in results else results
    lines = _table(per_dataset, SUMMARY_KEYS)
    present = {k for tasks in per_dataset.values() for m in tasks.values() for k in m}
    extra = [k for k in PROTOCOL_KEYS if k in present]
    if extra:
        lines += ["", "Fixed AP (top-k per class, no per-image cap) / pooled AP (Dave et al. 2021)"]
        lines += _table(per_dataset, extra)
    return "\n".join(lines)


def per_category_summaries(cfg) -> list:
    """(directory, frequency table) of every evaluator output with per-category files."""
    from longtail.evaluation import format_frequency_table

    out = []
    for path in sorted(glob.glob(os.path.join(cfg.OUTPUT_DIR, "inference", "*",
                                              "summary_by_frequency.json"))):
        with open(path) as f:
            out.append((os.path.dirname(path), format_frequency_table(json.load(f))))
    return out


def report(cfg, results):
    """Write eval_results.json and print the table plus where everything was written."""
    if not comm.is_main_process() or not results:
        return
    path = os.path.join(cfg.OUTPUT_DIR, "eval_results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    model_path = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    print("\nLVIS evaluation\n" + format_summary(results), flush=True)
    per_category = per_category_summaries(cfg)
    for folder, table in per_category:
        print(f"\nAP by frequency bucket, mean over categories ({os.path.basename(folder)})\n"
              + table, flush=True)
    print(
        "\nOutputs:\n"
        + (f"  model:   {model_path}\n" if os.path.exists(model_path) else "")
        + f"  metrics: {path} (training curves: {os.path.join(cfg.OUTPUT_DIR, 'metrics.json')})\n"
        + "".join(f"  per-category AP: {folder}/per_category_{{bbox,segm}}.{{json,csv}}, "
                  f"summary_by_frequency.{{json,csv}}\n" for folder, _ in per_category)
        + (f"  plots:   python tools/plot_results.py {cfg.OUTPUT_DIR}\n" if per_category else "")
        + f"  logs:    {os.path.join(cfg.OUTPUT_DIR, 'log.txt')}\n",
        flush=True,
    )


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # object memories are training state: inference builds their layout, never their rings
        memories = object_memories(model)
        logger.info(
            "Long-tail state: %d bytes of object memory allocated for inference (%d memory "
            "module(s), allocated only when training)",
            sum(m.nbytes() for m in memories), len(memories),
        )
        load_weights_for_evaluation(cfg, model, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        report(cfg, results)
        return results

    check_initial_weights(cfg, resume=args.resume)  # before data and model are built
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer.train() returns the results only when TEST.EXPECTED_RESULTS is set; the
    # evaluation hook keeps the last ones here.
    results = getattr(trainer, "_last_eval_results", None)
    report(cfg, results)
    return results


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=resolve_dist_url(args.dist_url, args.num_machines, sys.argv[1:]),
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
