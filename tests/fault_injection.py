#!/usr/bin/env python
"""
``train_net.py`` with one process killed (SIGKILL, no cleanup) at a chosen point, for the crash
tests (``tests/test_fault_injection.py``).

    LONGTAIL_TEST_FAULT=<point>:<n>:<rank> python tests/fault_injection.py <train_net.py args>

kills process ``rank`` at the ``n``-th occurrence (counted from the start of this launch) of
``point``:

* ``mfs-init``: a forward step of LOCE's MFS initialisation pass, after the forward (memory
  pushed, mean scores updated);
* ``step``: a training step, after the forward (memory pushed, mean scores updated), before the
  backward pass and the optimizer step;
* ``ckpt-file``: a checkpoint file write (per-process state, model, ``last_checkpoint``, or the
  rename of the pending state file), after the temporary file is written and before its rename;
* ``eval``: an evaluation batch, after the model ran on it.

With several processes the launcher then stops the others, as after a crash. Without
``LONGTAIL_TEST_FAULT`` it is ``train_net.py``.
"""
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import train_net  # noqa: E402

POINTS = ("mfs-init", "step", "ckpt-file", "eval")


def parse_fault(text: str):
    """``"<point>:<n>:<rank>"`` -> (point, n, rank); ``""`` -> None."""
    if not text:
        return None
    point, n, rank = text.split(":")
    if point not in POINTS or int(n) < 1 or int(rank) < 0:
        raise ValueError(f"LONGTAIL_TEST_FAULT {text!r}: want <point>:<n>:<rank>, point in "
                         f"{POINTS}, n >= 1, rank >= 0")
    return point, int(n), int(rank)


def install(point: str, n: int, rank: int) -> None:
    """Patch this process (a spawned worker: after ``launch`` has set up its rank)."""
    from detectron2.utils import comm

    import longtail.checkpoint as ckpt
    import longtail.engine as engine
    import longtail.evaluation as evaluation

    if comm.get_rank() != rank:
        return
    seen = [0]

    def hit(name: str) -> None:
        if name == point:
            seen[0] += 1
            if seen[0] == n:
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    real_wrap = engine.wrap_ddp

    def wrap_ddp(model, device):
        heads = model.roi_heads

        def after_forward(module, inputs, output):
            if module.training:
                hit("mfs-init" if getattr(heads, "init_step", -1) >= 0 else "step")

        model.register_forward_hook(after_forward)
        return real_wrap(model, device)

    engine.wrap_ddp = wrap_ddp

    real_replace = ckpt._fsync_replace

    def fsync_replace(tmp, path):
        hit("ckpt-file")
        return real_replace(tmp, path)

    ckpt._fsync_replace = fsync_replace

    cls = evaluation.LongTailLVISEvaluator
    real_process = cls.process

    def process(self, inputs, outputs):
        real_process(self, inputs, outputs)
        hit("eval")

    cls.process = process


def main(args):
    fault = parse_fault(os.environ.get("LONGTAIL_TEST_FAULT", ""))
    if fault:
        install(*fault)
    return train_net.main(args)


if __name__ == "__main__":
    from longtail import launch
    from longtail.launch import resolve_dist_url

    args = train_net.default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=resolve_dist_url(args.dist_url, args.num_machines, sys.argv[1:]),
           args=(args,))
