#!/usr/bin/env python
"""
Evaluate an LVIS-format results file with the project's evaluation (any backend, AP_fixed, AP_pool):

    python tools/evaluate_results.py output/demo/inference/longtail_synth_val/lvis_instances_results.json \
        --dataset longtail_synth_val --fixed --pooled
    python tools/evaluate_results.py results.json --gt-json datasets/lvis/lvis_v1_val.json --backend lvis

Prints AP, AP50, AP75, APs/m/l, APr/c/f (percent) per task, plus AP_fixed / AP_pool when asked.
"""
import sys

from longtail.evaluation import main

if __name__ == "__main__":
    main(sys.argv[1:])
