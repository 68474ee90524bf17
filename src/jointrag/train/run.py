"""`train(config)`: one run of the shared loop, or a multi-stage method's pipeline of such runs."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import yaml

from .. import distributed
from ..config import RunConfig, to_dict
from ..errors import UserError
from ..io import check_out_dir, check_tensor_file, exclusive, read_tensors
from ..methods._base import CHECKPOINT
from ..runtime import default_device, resolve_precision
from .build import check_held_out, entry
from .loop import Trainer
from .pipeline import Stages


def check_out(out: Path, resume: bool) -> None:
    """Refuse, before any model loads, an `--out` that cannot be written, or whose `config.yaml` is not
    a jointrag run's (the run would overwrite the user's file)."""
    check_out_dir(out)
    if not resume and (out / "config.yaml").is_file() and not written_by_a_run(out / "config.yaml"):
        raise UserError(f"{out / 'config.yaml'} is not one a jointrag run wrote (those hold every section of the settings), "
                        "and training would overwrite it: choose another --out or move the file")


def written_by_a_run(path: Path) -> bool:
    """Whether the YAML at `path` is a whole saved config (`save_config` writes every section), not a user's recipe."""
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(saved, dict) and set(saved) == set(to_dict(RunConfig()))


def check_precision(config: RunConfig, checkpoints: list[Path]) -> None:
    """Refuse to resume a run trained at another precision than `train.precision=auto` means here (a bf16
    run on a machine without fast bf16): it would change precision part-way without a word. An explicit
    `train.precision` continues at it, and says so. Checkpoints older than the record pass."""
    here = resolve_precision(config.train.precision, default_device())
    for checkpoint in checkpoints:
        saved = read_tensors(checkpoint / "trainer.pt", mmap=True).get("precision")
        if saved is None or saved == here:
            continue
        if config.train.precision == "auto":
            slow = " (bf16 is emulated here: many times slower)" if saved == "bf16" else ""
            raise UserError(f"--resume: {checkpoint} was trained at {saved}, and train.precision=auto means {here} on this "
                            f"machine, so the run would change precision part-way: pass --set train.precision={saved} to "
                            f"keep it{slow}, or --set train.precision={here} to change it")
        print(f"jointrag: {checkpoint} was trained at {saved}; it continues at {here} (train.precision)", file=sys.stderr)


def train(config: RunConfig, resume: bool = False) -> dict:
    """Train `config.method` and return its final metrics (a pipeline: its table {row: metrics}).
    Under torchrun, every rank runs this and returns rank 0's metrics."""
    pipeline = entry(config).pipeline
    check_out(Path(config.out), resume)  # all before any model loads
    if resume:  # a damaged checkpoint is found now, not after the models load
        checkpoints = sorted(Path(config.out).glob(f"**/{CHECKPOINT}"))
        for checkpoint in checkpoints:
            for name in ("weights.pt", "trainer.pt"):
                check_tensor_file(checkpoint / name)
        check_precision(config, checkpoints)
    check_held_out(config, "dev")
    if pipeline is not None:
        check_held_out(config, "test")
    held = exclusive(config.out) if distributed.is_main() else contextlib.nullcontext()  # one run writes to --out
    with held, distributed.process_group(config.train.dist_timeout):
        if pipeline is not None:
            return pipeline(config, Stages(config, resume))
        return Trainer(config).run(resume=resume)
