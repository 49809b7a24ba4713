"""Preemption-safe training: checkpoints that let a killed run continue as if it had never stopped.

A checkpoint is `{run_dir}/checkpoints/update_{N:07d}/` after update N:

* `accelerator/`: what `accelerator.save_state` writes: the trained model(s) and the optimizer (DeepSpeed: its
  own per-rank ZeRO format), and every process's RNG states (python, numpy, torch, CUDA);
* `trainer_rank{r}.pt`, one per process: the update, the scheduler, the stage's own state (the metrics so far,
  `first/` and `last/` included, PPO's KL controller, minibatch shuffler and prompt position; the data position of
  SFT / RM / DPO is the update itself: their schedule is a pure function of the seed), the training seconds;
* `args.json`: the arguments that made it (a resume with arguments that change the run is refused);
* `COMPLETE.json`, written last: every file with its size. A checkpoint is written into a temporary folder,
  fsynced, and renamed; one without a matching COMPLETE.json is never loaded (`problem`).

`--save_every N` writes one every N updates (the last `--keep_checkpoints` are kept); SIGTERM or SIGUSR1 (slurm's
warning before a preemption) writes one at the next update boundary and exits with `core.REQUEUE_EXIT_CODE`.
`--resume auto` continues the newest complete checkpoint of the run folder (none: a fresh start), `--resume PATH`
a given one, `--resume none` starts fresh. A finished run removes its checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from summarize_from_feedback_details.core import UserInputError, write_json

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE.json"
PREFIX = "update_"
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RUN_INDEPENDENT_ARGS = frozenset({
    "exp_name", "output_dir", "run_name", "track", "wandb_project_name", "wandb_entity", "push_to_hub", "hf_entity",
    "logging_steps", "resume", "save_every", "keep_checkpoints",
})
"""arguments that do not change what a run computes: a checkpoint made with other values resumes; any other
difference (model, data, batch plan, seed, learning rate, processes, ...) is refused"""


# ----------------------------------------------------------------------------------------------
# Finding and checking checkpoints (pure file operations, main process)
# ----------------------------------------------------------------------------------------------
def checkpoint_name(update: int) -> str:
    return f"{PREFIX}{update:07d}"


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint folders of a run (renamed into place, complete or not), oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit())


def file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE}


def problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint `path` cannot be loaded (None: it is complete): no COMPLETE.json (a torn write), or a
    file missing or of another size than recorded (truncated)."""
    path = Path(path)
    marker = path / COMPLETE
    if not marker.is_file():
        return f"it has no {COMPLETE} (a write that did not finish)"
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as error:
        return f"its {COMPLETE} is unreadable ({error})"
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes instead of {size} (truncated)"
    return None


def comparable_args(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments that change what a run computes, as json values (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in args.items() if k not in RUN_INDEPENDENT_ARGS}, default=str))


def check_compatible(path: Path, args: dict[str, Any]) -> None:
    """One UserInputError naming the first argument that differs between the checkpoint and this run."""
    saved = comparable_args(json.loads((path / "args.json").read_text()))
    current = comparable_args(args)
    for key in sorted(saved.keys() | current.keys()):
        if saved.get(key) != current.get(key):
            flag = "the number of processes" if key == "world_size" else f"--{key}"
            raise UserInputError(f"--resume: checkpoint {path} was made with {flag} {saved.get(key)!r}, this run has "
                                 f"{current.get(key)!r}; rerun with the checkpoint's value, or pass --resume none to start fresh")


def choose(run_dir: Path, resume: str, args: dict[str, Any], say: Any = print) -> Path | None:
    """The checkpoint to continue (None: start fresh). `auto`: the newest complete one of `run_dir`, skipping a
    torn or truncated one with one line each; `none`: nothing; else a path that must be a complete checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        for candidate in reversed(checkpoints(run_dir)):
            why = problem(candidate)
            if why is None:
                check_compatible(candidate, args)
                say(f"resume: continuing from {candidate}")
                return candidate
            say(f"resume: skipping checkpoint {candidate}: {why}; falling back to the previous one")
        say(f"resume: no complete checkpoint in {run_dir / CHECKPOINTS}; starting fresh")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise UserInputError(f"--resume {resume!r} is not a folder; pass auto, none or a checkpoint folder "
                             f"(e.g. runs/<run>/{CHECKPOINTS}/{checkpoint_name(100)})")
    why = problem(path)
    if why is not None:
        raise UserInputError(f"--resume {resume!r} cannot be loaded: {why}; pass an older checkpoint or --resume auto")
    check_compatible(path, args)
    say(f"resume: continuing from {path}")
    return path


def update_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (and the folder itself) to disk."""
    for p in [*sorted(folder.rglob("*")), folder]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------
# Signals: a checkpoint at the next update boundary, then a requeue exit
# ----------------------------------------------------------------------------------------------
class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; read at each update boundary (all processes agree, see `Stage.end_update`)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            print(f"resume: received {signal.Signals(signum).name}; saving a checkpoint after this update, then exiting",
                  flush=True)
        self.signal = signum


# ----------------------------------------------------------------------------------------------
# Writing and loading (every process)
# ----------------------------------------------------------------------------------------------
def save(accelerator: Any, run_dir: Path, update: int, args: dict[str, Any], trainer_state: dict[str, Any],
         keep: int, is_main: bool, rank: int) -> Path:
    """Write the checkpoint of `update` atomically (temporary folder, fsync, rename), keep the newest `keep`."""
    import torch

    folder = run_dir / CHECKPOINTS
    final = folder / checkpoint_name(update)
    tmp = folder / f".tmp-{checkpoint_name(update)}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerator"), safe_serialization=False)
    torch.save(trainer_state, tmp / f"trainer_rank{rank}.pt")
    accelerator.wait_for_everyone()
    if is_main:
        write_json(tmp / "args.json", args)
        fsync_tree(tmp)
        write_json(tmp / COMPLETE, {"update": update, "files": file_sizes(tmp)})  # last: the checkpoint is whole
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_tree(folder)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Any, path: Path, rank: int) -> dict[str, Any]:
    """Restore the models, optimizer and RNG states of `path` into the prepared accelerator; this process's
    trainer state (update, scheduler, the stage's own state) is returned."""
    import torch

    accelerator.load_state(str(path / "accelerator"))
    return torch.load(path / f"trainer_rank{rank}.pt", weights_only=False)


def remove_all(run_dir: Path) -> None:
    """A finished run's checkpoints (its model is saved): removed to free the disk."""
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
