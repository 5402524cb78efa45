"""
Checkpoints are always whole: atomic files, ``last_checkpoint`` moved only when every process's
files are on disk, older per-process files removed only after that, and a resume that refuses
state files that do not belong to its checkpoint (instead of continuing inexactly).
"""
import os
import time

import pytest
import torch
from torch import nn

from longtail import checkpoint as ckpt_module
from longtail.checkpoint import LongTailCheckpointer, process_state_path


class _Stateful(nn.Module):
    """A model with one weight and one per-process state (like an object memory)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.rows = torch.zeros(4)

    def process_state(self):
        return {"rows": self.rows.clone()}

    def load_process_state(self, state):
        self.rows.copy_(state["rows"])


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _saved_weight(path):
    return _load(path)["model"]["linear.weight"]


def test_a_kill_while_rewriting_a_checkpoint_leaves_the_previous_one_whole(tmp_path,
                                                                           monkeypatch):
    """The failure a kill during ``model_final.pth``'s rewrite caused: half a file, named by
    last_checkpoint. Now the previous file and last_checkpoint are untouched."""
    model = _Stateful()
    ck = LongTailCheckpointer(model, save_dir=str(tmp_path))
    ck.save("model_final", iteration=9)
    before = _saved_weight(tmp_path / "model_final.pth").clone()
    with torch.no_grad():
        model.linear.weight.add_(1.0)

    real_save = torch.save

    def killed_half_way(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "model" in obj:
            f.write(b"PK\x03\x04 half a zip archive")  # what a kill leaves
            raise KeyboardInterrupt("killed while writing the model checkpoint")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_final", iteration=19)
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert torch.equal(_saved_weight(tmp_path / "model_final.pth"), before)
    # and --resume from it works, exactly, with the state that belongs to it
    other = _Stateful()
    LongTailCheckpointer(other, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert torch.equal(other.linear.weight, before)


def test_resume_refuses_a_state_file_of_another_checkpoint_or_none(tmp_path):
    model = _Stateful()
    ck = LongTailCheckpointer(model, save_dir=str(tmp_path))
    model.rows.fill_(1.0)
    ck.save("model_0000009", iteration=9)
    older = _load(tmp_path / "model_0000009.rank0.pth")
    model.rows.fill_(2.0)
    ck.save("model_0000019", iteration=19)
    assert not (tmp_path / "model_0000009.rank0.pth").exists()  # only the newest is kept
    state_file = tmp_path / "model_0000019.rank0.pth"

    torch.save(older, state_file)  # the state of iteration 9 beside the checkpoint of 19
    with pytest.raises(RuntimeError, match="model_0000009.pth at iteration 9, not "
                                           "model_0000019.pth at iteration 19"):
        LongTailCheckpointer(_Stateful(), save_dir=str(tmp_path)).resume_or_load("", resume=True)
    os.remove(state_file)
    with pytest.raises(RuntimeError, match=r"model_0000019.rank0.pth is missing.*--num-gpus"):
        LongTailCheckpointer(_Stateful(), save_dir=str(tmp_path)).resume_or_load("", resume=True)
    # loading the weights only (no --resume) is still allowed, and says nothing is restored
    other = _Stateful()
    LongTailCheckpointer(other, save_dir=str(tmp_path)).resume_or_load(
        str(tmp_path / "model_0000019.pth"), resume=False)
    assert torch.equal(other.linear.weight, model.linear.weight)
    assert float(other.rows.sum()) == 0.0


def test_resume_restores_the_state_of_its_checkpoint(tmp_path):
    model = _Stateful()
    model.rows.copy_(torch.arange(4.0))
    LongTailCheckpointer(model, save_dir=str(tmp_path)).save("model_0000004", iteration=4)
    other = _Stateful()
    LongTailCheckpointer(other, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert torch.equal(other.rows, torch.arange(4.0))
    assert torch.equal(other.linear.weight, model.linear.weight)


def _two_process_save(out_dir, kill_rank0):
    from detectron2.utils import comm

    rank = comm.get_rank()
    model = _Stateful()
    model.rows.fill_(float(rank + 1))
    ck = LongTailCheckpointer(model, save_dir=out_dir)
    ck.save("model_0000009", iteration=9)
    if kill_rank0 and rank == 0:
        real_save = torch.save

        def slow_death(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and "model" in obj:
                time.sleep(3)  # the other process runs ahead meanwhile
                os._exit(3)  # SIGKILL-like: no cleanup, no exception handling
            return real_save(obj, f, *args, **kwargs)

        ckpt_module.torch.save = slow_death
    ck.save("model_0000019", iteration=19)


@pytest.mark.dist
def test_two_processes_a_kill_during_a_checkpoint_keeps_the_previous_one_complete(tmp_path):
    """Before: process 1 removed its previous state file as soon as it had written the new one,
    while process 0 was still writing the model; a kill then left a checkpoint without process
    1's state. Now every file of the previous checkpoint survives, and it resumes exactly."""
    from longtail.launch import launch

    out = str(tmp_path / "killed")
    with pytest.raises(Exception):  # process 0 exits with code 3; the other is stopped
        launch(_two_process_save, 2, dist_url="auto", args=(out, True))
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000009.pth"
    for rank in (0, 1):
        path = process_state_path(os.path.join(out, "model_0000009.pth"), rank)
        assert os.path.exists(path), f"process {rank}'s state of the last checkpoint is gone"
        assert float(_load(path)["states"][""]["rows"][0]) == rank + 1
    assert not os.path.exists(os.path.join(out, "model_0000019.pth"))

    done = str(tmp_path / "done")
    launch(_two_process_save, 2, dist_url="auto", args=(done, False))
    assert open(os.path.join(done, "last_checkpoint")).read() == "model_0000019.pth"
    left = sorted(f for f in os.listdir(done) if f.endswith(".pth"))
    assert left == ["model_0000009.pth", "model_0000019.pth", "model_0000019.rank0.pth",
                    "model_0000019.rank1.pth"]


def test_dist_url_is_auto_unless_given():
    from longtail.launch import resolve_dist_url

    default = "tcp://127.0.0.1:49152"
    assert resolve_dist_url(default, 1, ["--num-gpus", "2", "SEED", "1"]) == "auto"
    assert resolve_dist_url(default, 1, ["--dist-url", default]) == default
    assert resolve_dist_url("tcp://h:1", 1, ["--dist-url=tcp://h:1"]) == "tcp://h:1"
    assert resolve_dist_url(default, 2, []) == default  # several machines: the address is needed
