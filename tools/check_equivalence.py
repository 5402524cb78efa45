#!/usr/bin/env python
"""
Check that a refactoring does not move behaviour: short, seeded runs of every config in
``configs/Synthetic/`` recorded at two commits and compared loss by loss and tensor by tensor.

    # at the commit before the change (a clean checkout), then after it
    python tools/check_equivalence.py record /tmp/eq/before
    python tools/check_equivalence.py record /tmp/eq/after
    python tools/check_equivalence.py compare /tmp/eq/before /tmp/eq/after \\
        [--rename OLD_PREFIX=NEW_PREFIX ...] [--report docs/equivalence.md]

``record`` trains each config for ``--iters`` iterations (default 50, ``SEED 0``, the small
``longtail_synth_mini_train`` split, no evaluation, one process, ``DATALOADER.NUM_WORKERS 0``) in
its own ``train_net.py`` process; a stage-2 config (its ``MODEL.WEIGHTS`` lies in another config's
``OUTPUT_DIR``) starts from that config's recorded model. Every run keeps ``metrics.json`` (the
losses detectron2 logs, every 20 iterations and at the last) and ``model_final.pth``.

``compare`` requires, for every config: the same logged iterations with bit-identical loss values,
and the same final weights and buffers, tensor by tensor (``torch.equal``), after renaming
parameters of the "before" side (``--rename``). Config keys renamed by the change can be passed
to ``record`` with ``--opts-file`` (a json ``{config: [KEY, VALUE, ...]}``) so that both sides run
the same method. Exit status 1 on any difference. Runs on one machine only: floating-point results
depend on the CPU and the torch build.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs", "Synthetic")


def synthetic_configs():
    return sorted(f for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".yaml") and not f.startswith("Base-"))


def _load(config):
    from detectron2.config import get_cfg

    from longtail import add_longtail_config

    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIG_DIR, config))
    return cfg


def plan(configs):
    """[(config, stage-1 config or None)] in an order where stage 1 comes first."""
    cfgs = {c: _load(c) for c in configs}
    out_dirs = {os.path.normpath(cfg.OUTPUT_DIR): c for c, cfg in cfgs.items()}
    parent = {}
    for c, cfg in cfgs.items():
        w = cfg.MODEL.WEIGHTS
        parent[c] = out_dirs.get(os.path.normpath(os.path.dirname(w))) if w else None
        if w and parent[c] is None:
            raise SystemExit(f"{c}: MODEL.WEIGHTS {w!r} is not another Synthetic config's output")
    ordered, seen = [], set()

    def visit(c):
        if c in seen:
            return
        if parent[c]:
            visit(parent[c])
        seen.add(c)
        ordered.append((c, parent[c]))

    for c in configs:
        visit(c)
    return ordered


def record(args):
    extra = {}
    if args.opts_file:
        with open(args.opts_file) as f:
            extra = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    configs = args.configs or synthetic_configs()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        commit += "+uncommitted"
    summary = {"commit": commit, "iters": args.iters, "runs": {}}
    for config, stage1 in plan(configs):
        out = os.path.join(os.path.abspath(args.out), config[:-5])
        weights = (os.path.join(os.path.abspath(args.out), stage1[:-5], "model_final.pth")
                   if stage1 else "")
        opts = ["SOLVER.MAX_ITER", str(args.iters), "SEED", "0",
                "DATASETS.TRAIN", "('longtail_synth_mini_train',)", "DATASETS.TEST", "()",
                "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100000",
                "OUTPUT_DIR", out, "MODEL.WEIGHTS", weights] + list(extra.get(config, []))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "train_net.py", "--config-file",
                               os.path.join("configs", "Synthetic", config), *opts],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"{config}: train_net.py failed ({proc.returncode})")
        seconds = time.perf_counter() - start
        summary["runs"][config] = {"stage1": stage1, "seconds": round(seconds, 1)}
        print(f"{config}: {args.iters} iterations in {seconds:.0f} s", flush=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def _losses(run_dir):
    rows = {}
    with open(os.path.join(run_dir, "metrics.json")) as f:
        for line in f:
            d = json.loads(line)
            if "iteration" in d and any(k.startswith("loss") or k == "total_loss" for k in d):
                rows[d["iteration"]] = {k: v for k, v in d.items()
                                        if k.startswith("loss") or k == "total_loss"}
    return rows


def _weights(run_dir):
    import torch

    state = torch.load(os.path.join(run_dir, "model_final.pth"), map_location="cpu",
                       weights_only=False)
    return state["model"]


def compare(args):
    import torch

    renames = [r.split("=", 1) for r in args.rename]
    with open(os.path.join(args.before, "summary.json")) as f:
        before_summary = json.load(f)
    with open(os.path.join(args.after, "summary.json")) as f:
        after_summary = json.load(f)
    def short(commit):
        return commit[:10] + ("+uncommitted" if commit.endswith("+uncommitted") else "")

    lines = [f"before: commit {short(before_summary['commit'])}, after: commit "
             f"{short(after_summary['commit'])}, {before_summary['iters']} iterations each", "",
             "| config | logged iterations | loss values | weight tensors | result |",
             "|---|---|---|---|---|"]
    failed = False
    for config in sorted(before_summary["runs"]):
        name = config[:-5]
        b_dir, a_dir = os.path.join(args.before, name), os.path.join(args.after, name)
        problems = []
        lb, la = _losses(b_dir), _losses(a_dir)
        if sorted(lb) != sorted(la):
            problems.append(f"logged iterations differ: {sorted(lb)} vs {sorted(la)}")
        n_values = 0
        for it in sorted(set(lb) & set(la)):
            if lb[it] != la[it]:
                diff = {k: (lb[it].get(k), la[it].get(k)) for k in set(lb[it]) | set(la[it])
                        if lb[it].get(k) != la[it].get(k)}
                problems.append(f"iteration {it}: {diff}")
            n_values += len(lb[it])
        wb, wa = _weights(b_dir), _weights(a_dir)
        mapped = {}
        for k, v in wb.items():
            for old, new in renames:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            mapped[k] = v
        if set(mapped) != set(wa):
            problems.append(f"tensor names differ: only before {sorted(set(mapped) - set(wa))[:5]}"
                            f", only after {sorted(set(wa) - set(mapped))[:5]}")
        unequal = [k for k in sorted(set(mapped) & set(wa))
                   if not (mapped[k].shape == wa[k].shape and mapped[k].dtype == wa[k].dtype
                           and torch.equal(mapped[k], wa[k]))]
        if unequal:
            problems.append(f"{len(unequal)} tensors differ, e.g. {unequal[:5]}")
        failed |= bool(problems)
        lines.append(f"| {config} | {len(lb)} | {n_values} | {len(wa)} | "
                     f"{'identical' if not problems else 'DIFFERENT'} |")
        for p in problems:
            print(f"{config}: {p}")
    text = "\n".join(lines)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="train every Synthetic config briefly, keep losses+weights")
    r.add_argument("out")
    r.add_argument("--iters", type=int, default=50)
    r.add_argument("--configs", nargs="*", help="config file names (default: all Synthetic)")
    r.add_argument("--opts-file", help="json {config: [KEY, VALUE, ...]} of extra overrides")
    c = sub.add_parser("compare", help="compare two recordings")
    c.add_argument("before")
    c.add_argument("after")
    c.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW",
                   help="parameter-name prefixes renamed by the change (before -> after)")
    c.add_argument("--report", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
