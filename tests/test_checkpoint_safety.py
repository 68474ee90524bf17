"""Nothing loaded from a checkpoint runs code (issue 18, item 1).

Checkpoint files are read with `io.read_tensors` (`torch.load(weights_only=True)`): tensors and plain
values only. A `trainer.pt` or `weights.pt` that carries a pickled object whose loading would run code
is refused with one line naming the file, and the code does not run; a damaged one gets one line too.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

from cli_helpers import assert_user_error, train_argv
from jointrag.cli import main
from jointrag.io import read_tensors


class Payload:
    """Unpickling it creates the file `marker`: what an attacker's code would do instead."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def trained(files, index_dir, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    assert main(train_argv(files, index_dir, tiny_dir, out, "rag-sequence", 1, "eval.limit=1")) == 0
    return out


def copy_run(trained, tmp_path) -> pathlib.Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def test_a_checkpoint_loads_as_tensors_and_plain_values(trained):
    state = read_tensors(trained / "checkpoint" / "trainer.pt")  # numpy's RNG state included
    assert state["step"] == 1 and isinstance(state["rng"][0]["numpy"][1], torch.Tensor)


@pytest.mark.parametrize("name", ["trainer.pt", "weights.pt"])
def test_a_pickled_payload_is_refused_and_never_runs(trained, tmp_path, capsys, files, index_dir, tiny_dir, name):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "payload-ran"
    path = run / "checkpoint" / name
    state = torch.load(path, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, path)
    torch.load(path, weights_only=False)  # a plain unpickler runs the planted payload: it is live
    assert marker.exists()
    marker.unlink()

    line = assert_user_error(capsys, "eval", "--checkpoint", run / "checkpoint", "--data", files["qa"], "--limit", "1",
                             "--max-new-tokens", "2", names=(str(path), "refused"))
    assert "could run code" in line
    assert not marker.exists()
    assert_user_error(capsys, *train_argv(files, index_dir, tiny_dir, run, "rag-sequence", 2, "eval.limit=1"), "--resume",
                      names=(str(path),))
    assert not marker.exists()


def test_a_truncated_checkpoint_file_is_one_clear_line(trained, tmp_path, capsys, files):
    run = copy_run(trained, tmp_path)
    path = run / "checkpoint" / "weights.pt"
    path.write_bytes(path.read_bytes()[:1000])
    line = assert_user_error(capsys, "eval", "--checkpoint", run / "checkpoint", "--data", files["qa"], "--limit", "1",
                             names=(str(path),))
    assert "unreadable, truncated or not a tensor file" in line


@pytest.mark.parametrize("name", ["trainer.pt", "weights.pt"])
def test_resume_finds_a_truncated_checkpoint_before_the_models_load(trained, tmp_path, capsys, files, index_dir, tiny_dir,
                                                                    monkeypatch, name):
    from jointrag.methods import systems

    run = copy_run(trained, tmp_path)
    path = run / "checkpoint" / name
    path.write_bytes(path.read_bytes()[:-100])

    def no_models(*args, **kwargs):
        raise AssertionError("the models loaded before the checkpoint was checked")

    monkeypatch.setattr(systems, "generator_from", no_models)
    line = assert_user_error(capsys, *train_argv(files, index_dir, tiny_dir, run, "rag-sequence", 2, "eval.limit=1"), "--resume",
                             names=(str(path),))
    assert "truncated" in line
