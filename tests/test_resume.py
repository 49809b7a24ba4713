"""Preemption-safe training (checkpoint.py): a run stopped by SIGKILL or SIGTERM and resumed with `--resume auto`
ends with the uninterrupted run's weights and per-update metrics; torn, truncated and foreign checkpoints are
never loaded. The end-to-end tests use very short runs (4-5 updates) from the session's SFT / RM runs."""

from __future__ import annotations

import json
import random
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, TINY, read_metrics, subprocess_env
from summarize_from_feedback_details import checkpoint
from summarize_from_feedback_details.core import REQUEUE_EXIT_CODE, UserInputError


@pytest.fixture(autouse=True)
def subprocess_cpu_seconds():
    """Print the CPU seconds of the stage processes a test ran (its cost to CI on a contended machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    yield
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"stage processes: {after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime:.1f} CPU seconds")


TIMING = ("eps", "seconds", "seconds_per_update", "episodes_per_second")
"""per-update metrics that measure wall-clock time (they differ between any two runs)"""


# ----------------------------------------------------------------------------------------------
# Choosing a checkpoint: hand-made folders, no training
# ----------------------------------------------------------------------------------------------
def fake_checkpoint(run_dir: Path, update: int, args: dict, complete: bool = True) -> Path:
    path = run_dir / checkpoint.CHECKPOINTS / checkpoint.checkpoint_name(update)
    (path / "accelerator").mkdir(parents=True)
    (path / "accelerator" / "model.bin").write_bytes(b"x" * 100)
    (path / "args.json").write_text(json.dumps(args))
    if complete:
        (path / checkpoint.COMPLETE).write_text(json.dumps({"update": update, "files": checkpoint.file_sizes(path)}))
    return path


ARGS = {"seed": 1, "lr": 1e-4, "batch_size": 32, "world_size": 1, "run_name": "a", "output_dir": "runs", "save_every": 2}


def test_choose_skips_torn_and_truncated_checkpoints(tmp_path: Path) -> None:
    said: list[str] = []
    fake_checkpoint(tmp_path, 2, ARGS)
    fake_checkpoint(tmp_path, 4, ARGS)
    truncated = fake_checkpoint(tmp_path, 6, ARGS)
    fake_checkpoint(tmp_path, 8, ARGS, complete=False)  # a write that never reached its COMPLETE.json
    (tmp_path / checkpoint.CHECKPOINTS / ".tmp-update_0000010").mkdir()  # a temporary folder is never a candidate
    (truncated / "accelerator" / "model.bin").write_bytes(b"x" * 60)
    # run-independent arguments may differ: another output folder, run name, --save_every
    chosen = checkpoint.choose(tmp_path, "auto", {**ARGS, "run_name": "b", "output_dir": "elsewhere", "save_every": 5}, say=said.append)
    assert chosen == tmp_path / checkpoint.CHECKPOINTS / "update_0000004"
    assert len(said) == 3 and "update_0000008" in said[0] and "COMPLETE.json" in said[0]
    assert "update_0000006" in said[1] and "60 bytes instead of 100 (truncated)" in said[1] and "falling back" in said[1]
    assert checkpoint.choose(tmp_path, "none", ARGS) is None
    assert checkpoint.choose(tmp_path / "empty", "auto", ARGS, say=said.append) is None and "starting fresh" in said[-1]
    with pytest.raises(UserInputError, match="truncated"):
        checkpoint.choose(tmp_path, str(truncated), ARGS)
    with pytest.raises(UserInputError, match="is not a folder"):
        checkpoint.choose(tmp_path, str(tmp_path / "missing"), ARGS)


@pytest.mark.parametrize(("field", "value", "named"), [("lr", 2e-4, "--lr"), ("seed", 2, "--seed"),
                                                      ("world_size", 2, "the number of processes")])
def test_choose_refuses_a_checkpoint_of_other_arguments(tmp_path: Path, field: str, value: object, named: str) -> None:
    path = fake_checkpoint(tmp_path, 2, ARGS)
    with pytest.raises(UserInputError) as error:
        checkpoint.choose(tmp_path, "auto", {**ARGS, field: value}, say=lambda _: None)
    message = str(error.value)
    assert "\n" not in message and f"{named} {ARGS[field]!r}" in message and repr(value) in message and str(path) in message


# ----------------------------------------------------------------------------------------------
# End to end: killed, resumed, compared with an uninterrupted run
# ----------------------------------------------------------------------------------------------
def command(module: str, args: list[str], nproc: int = 0) -> list[str]:
    if nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                "-m", f"summarize_from_feedback_details.{module}", *args]
    return [sys.executable, "-m", f"summarize_from_feedback_details.{module}", *args]


def run(module: str, args: list[str], nproc: int = 0) -> str:
    env = subprocess_env(OMP_NUM_THREADS="1") if nproc else subprocess_env()
    result = subprocess.run(command(module, args, nproc), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def run_and_stop(module: str, args: list[str], run_dir: Path, update: int, sig: int, nproc: int = 0) -> int:
    """Start the stage, wait until the checkpoint of `update` is complete, then send `sig`: SIGKILL to every process
    of the run at once (as slurm or the OOM killer would), SIGTERM to the stage process; returns the exit status."""
    env = subprocess_env(OMP_NUM_THREADS="1") if nproc else subprocess_env()
    log = run_dir.parent / f"{run_dir.name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command(module, args, nproc), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        marker = run_dir / checkpoint.CHECKPOINTS / checkpoint.checkpoint_name(update) / checkpoint.COMPLETE
        deadline = time.time() + 600
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before update {update}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline
            time.sleep(0.02)
        processes = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        for pid in processes if sig == signal.SIGKILL else [proc.pid]:
            try:
                psutil.Process(pid).send_signal(sig)
            except psutil.NoSuchProcess:  # a short-lived helper process that ended meanwhile
                pass
        return proc.wait(timeout=300)


def resumed_after(output: str) -> int:
    found = re.search(r"resume: continuing after update (\d+)", output)
    assert found, output[-3000:]
    return int(found.group(1))


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every TensorBoard scalar by tag and step, as a reader sees it (a resumed run's purge applied); a step
    logged twice is an error."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    table: dict[str, dict[int, float]] = {}
    for tag in events.Tags()["scalars"]:
        steps = [(e.step, e.value) for e in events.Scalars(tag)]
        assert len({s for s, _ in steps}) == len(steps), f"{tag} has duplicate steps: {steps}"
        table[tag] = dict(steps)
    return table


def assert_same_run(reference: Path, resumed: Path, after: int) -> None:
    """Every saved weight within 1e-6, and every per-update metric (wall-clock ones aside) of the updates after the
    resume point equal; the final metrics.json too."""
    import torch
    from safetensors.torch import load_file

    ours, theirs = load_file(resumed / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0, msg=name)
    expected, got = scalars(reference), scalars(resumed)
    assert got.keys() == expected.keys()
    compared = 0
    for tag, steps in expected.items():
        if tag.split("/")[-1] in TIMING:
            continue
        assert got[tag].keys() == steps.keys(), tag
        for step, value in steps.items():
            if step > after:
                assert got[tag][step] == pytest.approx(value, abs=1e-6), (tag, step)
                compared += 1
    assert compared > 0
    skip = ("run_dir", "run_name")
    metrics, reference_metrics = read_metrics(resumed), read_metrics(reference)
    for key, value in reference_metrics.items():
        if not key.startswith(skip) and key.split("/")[-1] not in TIMING:
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert not (resumed / checkpoint.CHECKPOINTS).exists()  # a finished run removes its checkpoints


def stop_at(name: str, num_updates: int) -> int:
    """The update after whose checkpoint the test stops the run, drawn from a seed (printed)."""
    update = random.Random(f"resume-{name}").randint(1, num_updates - 2)
    print(f"{name}: stopping the run after the checkpoint of update {update} of {num_updates}")
    return update


def quick_stage_args(module: str, sft_run: Path, reward_run: Path, embedded_dir: Path, dataset: Path, out: Path) -> list[str]:
    """A few updates (SFT: 5 of 32; RM, DPO: 5 of 16 pairs; PPO: 4 of 32 rollouts), each of two micro-batches, no
    evaluation beyond 4 validation queries, every update logged."""
    small_batches = ["--batch_size", "16", "--local_micro_batch_size", "8"]
    common = ["embedded", "--dataset", str(dataset), "--output_dir", str(out), "--logging_steps", "1", "--max_eval_samples", "4",
              "--eval_splits", "validation", "--no-gold_eval"]
    if module == "sft":
        return [*common, "--base_model", f"{embedded_dir}/models/{TINY}", "--total_episodes", "160", "--no-eval_before_training"]
    if module == "reward":
        return [*common[:-3], "--sft_model_path", str(sft_run / "model"), "--total_episodes", "80", *small_batches,
                "--normalization_samples", "32", "--padding_check_samples", "8"]
    if module == "dpo":
        return [*common, "--sft_model_path", str(sft_run / "model"), "--total_episodes", "80", *small_batches, "--no-eval_before_training",
                "--eval_response_length", "16", "--comparison_splits", "validation"]
    return [*common, "--sft_model_path", str(sft_run / "model"), "--reward_model_path", str(reward_run / "model"),
            "--total_episodes", "128", "--batch_size", "32", "--local_rollout_forward_batch_size", "16",
            "--local_micro_batch_size", "16", "--no-eval_before_training", "--eval_every", "2", "--save_samples_every", "0",
            "--local_eval_batch_size", "8", "--adaptive_kl"]


@pytest.mark.slow
def test_sft_sigterm_checkpoints_exits_and_falls_back_over_a_truncated_checkpoint(
    embedded_dir: Path, embedded_dataset: Path, tmp_path: Path
) -> None:
    """SIGTERM (the graceful path): a checkpoint at the next update boundary, exit REQUEUE_EXIT_CODE, no FAILED.json.
    The newest checkpoint is then truncated: `--resume auto` says so in one line, continues the previous one, and
    the run ends equal to the uninterrupted one, TensorBoard without a duplicate step."""
    args = quick_stage_args("sft", tmp_path, tmp_path, embedded_dir, embedded_dataset, tmp_path)
    run("sft", [*args, "--run_name", "reference"])
    update = stop_at("sft", 5)
    run_dir = tmp_path / "stopped"
    status = run_and_stop("sft", [*args, "--run_name", "stopped", "--save_every", "1", "--keep_checkpoints", "3"], run_dir,
                          update, signal.SIGTERM)
    assert status == REQUEUE_EXIT_CODE, (tmp_path / "stopped.log").read_text()[-3000:]
    assert not (run_dir / "FAILED.json").exists() and not (run_dir / "metrics.json").exists()
    saved = checkpoint.checkpoints(run_dir)
    assert len(saved) >= 2 and checkpoint.update_of(saved[-1]) > update  # written after the signal, at the boundary
    newest_state = saved[-1] / "trainer_rank0.pt"
    newest_state.write_bytes(newest_state.read_bytes()[:100])  # truncated
    output = run("sft", [*args, "--run_name", "stopped", "--save_every", "1", "--resume", "auto"])
    assert f"resume: skipping checkpoint {saved[-1]}: trainer_rank0.pt has 100 bytes" in output
    after = resumed_after(output)
    assert after == checkpoint.update_of(saved[-2])
    assert_same_run(tmp_path / "reference", run_dir, after)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["reward", "dpo", "ppo"])
def test_resume_after_sigkill(module: str, sft_run: Path, reward_run: Path, embedded_dir: Path, embedded_dataset: Path,
                              tmp_path: Path) -> None:
    """SIGKILL at an update drawn from a seed, `--resume auto`: the uninterrupted run's weights and metrics."""
    args = quick_stage_args(module, sft_run, reward_run, embedded_dir, embedded_dataset, tmp_path)
    num_updates = 4 if module == "ppo" else 5
    run(module, [*args, "--run_name", "reference"])
    update = stop_at(module, num_updates)
    killed = [*args, "--run_name", "killed", "--save_every", "1"]
    assert run_and_stop(module, killed, tmp_path / "killed", update, signal.SIGKILL) == -signal.SIGKILL
    after = resumed_after(run(module, [*killed, "--resume", "auto"]))
    assert update <= after < num_updates
    assert_same_run(tmp_path / "reference", tmp_path / "killed", after)


@pytest.mark.slow
def test_resume_ppo_two_processes_deepspeed_after_sigkill(sft_run: Path, reward_run: Path, embedded_dir: Path,
                                                         embedded_dataset: Path, tmp_path: Path) -> None:
    """PPO under `torchrun --nproc_per_node 2` with DeepSpeed ZeRO-2 (its own per-rank checkpoint format), every
    process killed at once, then resumed: per-rank RNG, shuffler and prompt position continue exactly."""
    args = [*quick_stage_args("ppo", sft_run, reward_run, embedded_dir, embedded_dataset, tmp_path), "--deepspeed"]
    run("ppo", [*args, "--run_name", "reference"], nproc=2)
    update = stop_at("ppo-deepspeed", 4)
    killed = [*args, "--run_name", "killed", "--save_every", "1"]
    assert run_and_stop("ppo", killed, tmp_path / "killed", update, signal.SIGKILL, nproc=2) == -signal.SIGKILL
    saved = checkpoint.checkpoints(tmp_path / "killed")
    assert sorted(p.name for p in saved[-1].glob("trainer_rank*.pt")) == ["trainer_rank0.pt", "trainer_rank1.pt"]
    after = resumed_after(run("ppo", [*killed, "--resume", "auto"], nproc=2))
    assert_same_run(tmp_path / "reference", tmp_path / "killed", after)


# ----------------------------------------------------------------------------------------------
# slurm: resources as submit.sh options, the preemption signal and requeue of the training steps
# ----------------------------------------------------------------------------------------------
def test_submit_resources_and_preemption_directives(tmp_path: Path) -> None:
    """The training .sbatch files requeue and ask for SIGUSR1 before their end; submit.sh keeps the paper's node by
    default and writes copies for other resources: 4 GPUs (and --num_processes 4 for the sweep), CPU only."""
    slurm = REPO / "scripts" / "slurm"
    for step in ("sft", "reward", "ppo", "dpo"):
        directives = [line for line in (slurm / f"{step}.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
        assert "#SBATCH --requeue" in directives and "#SBATCH --signal=B:USR1@600" in directives

    def submitted(*args: str) -> dict[str, tuple[str, list[str]]]:
        result = subprocess.run(["bash", str(slurm / "submit.sh"), "--dry_run", "--sizes", "1b", "--seeds", "1",
                                 "--log_dir", str(tmp_path), *args], capture_output=True, text=True, check=True)
        lines = [shlex.split(line.split("  # -> job ")[0]) for line in result.stdout.splitlines() if not line.startswith("#")]
        return {Path(line[-1]).stem: (line[0], Path(line[-1]).read_text().splitlines()
                                      if Path(line[-1]).is_absolute() else []) for line in lines}

    default = submitted()
    assert all(not lines for _, lines in default.values())  # the files themselves
    four = submitted("--gpus", "4", "--no_exclusive")
    assert four["ppo"][0].endswith("--num_processes 4") and "num_processes" not in default["ppo"][0]
    assert "#SBATCH --gpus-per-task=4" in four["ppo"][1] and "#SBATCH --exclusive" not in four["ppo"][1]
    assert four["judge"][1] == []
    cpu = submitted("--cpu_only", "--cpus", "2")
    for step in ("sft", "reward", "ppo", "dpo"):
        lines = cpu[step][1]
        assert "#SBATCH --cpus-per-task=2" in lines and not any("gpu" in line or "exclusive" in line for line in lines)
        assert "#SBATCH --signal=B:USR1@600" in lines and "num_processes" not in cpu[step][0]
