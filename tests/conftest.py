"""Shared fixtures: the real data of ../shared/data (one fixture), the embedded assets and dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "SFFD_SHARED_DATA"
EMBEDDED_ENV = "SFFD_TEST_EMBEDDED_DIR"
TINY = "tiny-pythia-s"
"""the embedded model size the stage tests train"""


def run_module(module: str, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python -m summarize_from_feedback_details.<module> args` as a real subprocess."""
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", f"summarize_from_feedback_details.{module}", *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def torchrun(module: str, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", f"summarize_from_feedback_details.{module}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def assert_tensorboard(run: Path, tag: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert tag in events.Tags()["scalars"] and len(events.Scalars(tag)) >= 2


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (env SFFD_SHARED_DATA, default ../shared/data); tests skip when it is absent."""
    path = Path(os.environ.get(SHARED_DATA_ENV, REPO.parent / "shared" / "data"))
    if not (path / "tokenizer" / "pythia" / "tokenizer.json").exists():
        pytest.skip(f"real data not found at {path} (set {SHARED_DATA_ENV}); .ci/run requires it")
    return path


@pytest.fixture(scope="session")
def pythia_tokenizer(shared_data: Path):
    from summarize_from_feedback_details.core import load_tokenizer

    return load_tokenizer(str(shared_data / "tokenizer" / "pythia"))


@pytest.fixture(scope="session")
def gpt2_tokenizer(shared_data: Path):
    from transformers import PreTrainedTokenizerFast

    from summarize_from_feedback_details.core import set_pad_token

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(shared_data / "tokenizer" / "gpt2" / "tokenizer.json"), eos_token="<|endoftext|>"
    )
    return set_pad_token(tokenizer)


@pytest.fixture(scope="session")
def real_posts(shared_data: Path) -> list[dict]:
    lines = (shared_data / "tldr" / "tldr_posts_with_references.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory) -> Path:
    """The embedded assets, built once per session with the real CLI (or reused from SFFD_TEST_EMBEDDED_DIR)."""
    path = Path(os.environ[EMBEDDED_ENV]) if os.environ.get(EMBEDDED_ENV) else tmp_path_factory.mktemp("embedded")
    run_module("embedded", "--out_dir", str(path), timeout=2400)  # three models pre-train (~6 min on 2 idle cores)
    return path


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_dir: Path):
    from summarize_from_feedback_details.core import load_tokenizer

    return load_tokenizer(str(embedded_dir / "models" / "tiny-pythia-s"))


@pytest.fixture(scope="session")
def embedded_dataset(embedded_dir: Path, tmp_path_factory) -> Path:
    """The data stage run once on the embedded task, as a subprocess with the `embedded` preset; the preset's
    model and data paths follow --embedded_dir."""
    out = tmp_path_factory.mktemp("datasets") / "embedded"
    run_module("tldr_dataset", "embedded", "--embedded_dir", str(embedded_dir), "--output_dir", str(out))
    return out


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def sft_run(embedded_dir, embedded_dataset, runs_dir) -> Path:
    run_module("sft", "embedded", "--base_model", f"{embedded_dir}/models/{TINY}", "--dataset", str(embedded_dataset),
               "--output_dir", str(runs_dir), "--run_name", "sft", "--max_eval_samples", "100")
    return runs_dir / "sft"


@pytest.fixture(scope="session")
def reward_run(sft_run, embedded_dataset, runs_dir) -> Path:
    run_module("reward", "embedded", "--sft_model_path", str(sft_run / "model"), "--dataset", str(embedded_dataset),
               "--output_dir", str(runs_dir), "--run_name", "reward", "--normalization_samples", "1000",
               "--total_episodes", "3200")
    return runs_dir / "reward"


# A short PPO run: 24 updates of 32 rollouts (the hello world runs the full embedded preset); sample tables
# before the first update and after updates 8, 16, 24 (tests/test_fidelity_outputs.py).
PPO_TEST_ARGS = ["--total_episodes", "768", "--batch_size", "32", "--local_rollout_forward_batch_size", "32",
                 "--local_micro_batch_size", "32", "--max_eval_samples", "100", "--eval_every", "4", "--logging_steps", "4",
                 "--save_samples_every", "8"]


def _stage_common(sft_run: Path, reward_run: Path, dataset: Path, runs_dir: Path) -> list[str]:
    return ["embedded", "--sft_model_path", str(sft_run / "model"), "--reward_model_path", str(reward_run / "model"),
            "--dataset", str(dataset), "--output_dir", str(runs_dir)]


@pytest.fixture(scope="session")
def ppo_run(sft_run, reward_run, embedded_dataset, runs_dir) -> Path:
    run_module("ppo", *_stage_common(sft_run, reward_run, embedded_dataset, runs_dir), "--run_name", "ppo", *PPO_TEST_ARGS)
    return runs_dir / "ppo"


@pytest.fixture(scope="session")
def dpo_run(sft_run, reward_run, embedded_dataset, runs_dir) -> Path:
    run_module("dpo", *_stage_common(sft_run, reward_run, embedded_dataset, runs_dir), "--run_name", "dpo",
               "--total_episodes", "3200", "--max_eval_samples", "100", "--eval_response_length", "53")
    return runs_dir / "dpo"
