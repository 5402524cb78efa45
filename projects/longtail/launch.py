"""Multi-process launch that also works without GPUs.

``launch`` keeps detectron2's interface. With CUDA devices it defers to
:func:`detectron2.engine.launch` (NCCL, one process per GPU). On a machine without CUDA,
``num_gpus_per_machine = N > 1`` starts N CPU processes joined by the gloo backend, so every
distributed code path (DDP, all-gathers, per-rank state, sharded samplers) runs on CPU.
detectron2 v0.6's launcher cannot do this (it hard-codes NCCL and asserts CUDA).
"""
import logging
import os
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

__all__ = ["launch", "resolve_dist_url", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def _find_free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_dist_url(dist_url: str, num_machines: int, argv: Sequence[str]) -> str:
    """
    The rendezvous address of a launch: ``dist_url`` when ``--dist-url`` is on the command line
    ``argv`` or there are several machines, else ``"auto"`` (a free port, picked by the
    launcher). detectron2's parser defaults to a port derived from the user id, the same for
    every job of that user: a second multi-process job on one machine then fails with
    ``EADDRINUSE``.
    """
    given = any(a == "--dist-url" or a.startswith("--dist-url=") for a in argv)
    return dist_url if given or num_machines > 1 else "auto"


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """
    Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines``
    machines (arguments as :func:`detectron2.engine.launch`). Without CUDA, the processes run on
    CPU with gloo; with CUDA, the machine must have ``num_gpus_per_machine`` devices.
    """
    world_size = num_machines * num_gpus_per_machine
    if torch.cuda.is_available():
        if num_gpus_per_machine > torch.cuda.device_count():
            raise ValueError(
                f"--num-gpus {num_gpus_per_machine} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)."
            )
        return d2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout
        )
    if world_size == 1:
        return main_func(*args)
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("--dist-url auto works for one machine only; pass tcp://HOST:PORT.")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    logger.warning(
        "No CUDA device: running %d CPU processes per machine with the gloo backend.",
        num_gpus_per_machine,
    )
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def _cpu_worker(
    local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout
):
    global_rank = machine_rank * num_per_machine + local_rank
    # Share the machine's cores among its processes instead of oversubscribing them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
    dist.init_process_group(
        backend="gloo",
        init_method=dist_url,
        world_size=world_size,
        rank=global_rank,
        timeout=timeout,
    )
    _create_local_process_group(num_per_machine, machine_rank, world_size)
    comm.synchronize()
    try:
        main_func(*args)
        # every rank leaves together: a rank that tears its gloo group down while another is
        # still in a collective makes that one abort ("terminate called without an active
        # exception")
        comm.synchronize()
    finally:
        dist.destroy_process_group()


def _create_local_process_group(num_per_machine: int, machine_rank: int, world_size: int):
    # detectron2 main has comm.create_local_process_group; v0.6 expects the module global.
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_per_machine)
        return
    for i in range(world_size // num_per_machine):
        ranks = list(range(i * num_per_machine, (i + 1) * num_per_machine))
        group = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
