#!/usr/bin/env python
"""
Plots of a run's per-category results (PNG), from its output directory:

    python tools/plot_results.py output/demo
    python tools/plot_results.py output/synthetic/loce_stage2_ebl --compare output/synthetic/loce_stage1
    python tools/plot_results.py RUN --checkpoint RUN/model_0004999.pth --out RUN/plots

Writes into RUN/plots/ (or --out):
  ap_vs_instances_{bbox,segm}.png          AP per category vs training instances (log), r/c/f colours
  ap_vs_instances_{task}_compare.png       the same with --compare's run overlaid
  mean_score_vs_instances.png              LOCE's mean classification score per category vs
                                           training instances, when the checkpoint carries it
The run must have been evaluated by the project's evaluator (it writes
inference/<dataset>/per_category_{bbox,segm}.json).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a run's OUTPUT_DIR")
    parser.add_argument("--compare", help="a second run's OUTPUT_DIR to overlay")
    parser.add_argument("--checkpoint", help="checkpoint with LOCE statistics "
                        "(default OUTPUT_DIR/model_final.pth)")
    parser.add_argument("--out", help="directory for the PNGs (default OUTPUT_DIR/plots)")
    parser.add_argument("--labels", nargs=2, metavar=("RUN", "COMPARE"),
                        help="legend labels (default: the directory names)")
    args = parser.parse_args(argv)

    from longtail.analysis import plot_run

    written = plot_run(args.output_dir, args.compare, args.checkpoint, args.out,
                       tuple(args.labels) if args.labels else None)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
