"""Shared fixtures: the real data of ../shared/data (one fixture), the embedded assets and dataset, and the
embedded runs every end-to-end test reads.

Two tiers (README): `pytest -m "not slow"` runs the units and math in a few minutes; a test is `slow` when it
asks for an end-to-end fixture below (marked automatically, see `pytest_collection_modifyitems`) or is marked
by hand because it runs a stage script. The full suite runs with `pytest-xdist` over the cores (`-n 2` in CI):
the expensive session fixtures are built ONCE for all workers (`build_once`: a file lock in the run's shared
temporary folder), and every worker and stage subprocess gets cores / workers threads, so the workers do not
oversubscribe the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "SFFD_SHARED_DATA"
EMBEDDED_ENV = "SFFD_TEST_EMBEDDED_DIR"
TINY = "tiny-pythia-s"
"""the embedded model size the stage tests train"""


# ----------------------------------------------------------------------------------------------
# Running over several workers (pytest-xdist)
# ----------------------------------------------------------------------------------------------
def xdist_workers() -> int:
    """How many pytest-xdist workers share this machine (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def threads_per_process() -> int:
    """Cores per worker: each worker (and each stage subprocess it starts) uses its share of the machine."""
    return max(1, (os.cpu_count() or 1) // xdist_workers())


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    if xdist_workers() > 1:  # a user's own OMP_NUM_THREADS wins
        env.setdefault("OMP_NUM_THREADS", str(threads_per_process()))
    return env


def pytest_configure(config) -> None:
    if xdist_workers() > 1 and os.environ.get("PYTEST_XDIST_WORKER"):
        # Every process a test starts (stage scripts, ablate's and the sweep's runs, the figures script) inherits the
        # worker's share of the cores: torch's default of a thread per core in each of them oversubscribed the
        # machine (two quick PPO runs at once: 78 s with the default, 14 s with one thread each).
        os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process()))
        import torch

        torch.set_num_threads(threads_per_process())


def shared_root(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (the workers' temporary folders share their parent)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


def build_once(tmp_path_factory, name: str, build: Callable[[], Path]) -> Path:
    """Run `build` once for the whole test run, whichever worker asks first; the others wait on its lock and
    get its result. A failed build is recorded so that the other workers fail at once with its error."""
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    done, failed = root / f"{name}.done", root / f"{name}.failed"
    asked = time.time()
    with FileLock(str(root / f"{name}.lock")):
        waited = time.time() - asked
        if waited > 1:  # idle: another worker was building it
            with (root / "waits.tsv").open("a") as log:
                log.write(f"{name}\t{os.environ.get('PYTEST_XDIST_WORKER', 'main')}\t{waited}\n")
        if failed.exists():
            pytest.fail(f"the shared fixture {name!r} failed in another worker:\n{failed.read_text()[-3000:]}")
        if not done.exists():
            start = time.time()
            try:
                result = build()
            except BaseException as error:
                failed.write_text(f"{type(error).__name__}: {error}")
                raise
            done.write_text(str(result))
            with (root / "builds.tsv").open("a") as log:
                log.write(f"{name}\t{os.environ.get('PYTEST_XDIST_WORKER', 'main')}\t{start}\t{time.time()}\n")
        return Path(done.read_text())


# Fixtures that run stage scripts or train models: a test that asks for one is `slow`.
END_TO_END_FIXTURES = {"embedded_dir", "embedded_sizes_dir", "embedded_dataset", "embedded_tokenizer", "runs_dir", "sft_run", "reward_run",
                       "ppo_run", "dpo_run", "embedded_sweep", "sweep_dir", "sweep", "view_inputs"}


# What a test waits for, by the fixtures it asks for: the run order hands each worker the tests whose inputs are
# ready (or that it builds itself) before the tests that would block on another worker's build.
WAITS_FOR = (
    ({"ppo_run", "dpo_run", "sweep_dir", "sweep"}, 4),
    ({"sft_run", "reward_run", "runs_dir"}, 3),
    ({"embedded_dir", "embedded_sizes_dir", "embedded_dataset", "embedded_tokenizer", "embedded_sweep",
      "view_inputs"}, 2),
)
# Fixtures (or the first link of a chain of fixtures) that take one worker minutes to build and serve several tests:
# the test that needs the most of it keeps its place (its worker builds all of it at once); the others run last, when
# it is built, instead of idling on its lock. pythia_data starts the chain of the `pythia`-shape runs.
BUILT_FOR_SEVERAL = {"embedded_sweep", "pythia_data"}
LAST = 5


def pytest_xdist_make_scheduler(config, log):
    """One test at a time, in the run order of `pytest_collection_modifyitems`: a worker is handed the next test
    when it has at most two queued (xdist's LoadScopeScheduling with every test its own scope). Not `--dist
    loadgroup`: with pytest 9.2 and pytest-xdist 3.8 its `xdist_group` marks are silently ignored (xdist renames
    `item._nodeid`, which pytest 9.2 no longer reads), so tests cannot rely on sharing a worker."""
    from xdist.scheduler import LoadScopeScheduling

    class InRunOrder(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid

    config.option.loadscopereorder = False
    return InRunOrder(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """Mark the end-to-end tests `slow`, and order the run for several workers: first one test that needs the PPO
    and DPO runs (its worker builds the embedded chain at once) and one that needs every size (the other worker
    pre-trains them meanwhile), then every fast test, the slow tests that build
    their own inputs, those that need the embedded assets only, then those that need the SFT / RM runs, then the
    PPO / DPO runs, then the later users of a BUILT_FOR_SEVERAL fixture (stable within each group: files and
    tests keep their order)."""
    def names(item) -> set[str]:
        return set(getattr(item, "fixturenames", ()))  # the whole closure: a test's fixtures and theirs

    def waits_for(item) -> int:
        if item.get_closest_marker("slow") is None:
            return 0
        if any(builders[fixture] is not item for fixture in BUILT_FOR_SEVERAL & names(item)):
            return LAST
        return next((rank for fixtures, rank in WAITS_FOR if fixtures & names(item)), 1)

    for item in items:
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    first = []  # the two long builds start at once, one per worker: the embedded chain and every size's pre-training
    for needs, avoids in (({"ppo_run", "dpo_run"}, set()), ({"embedded_sizes_dir"}, {"sft_run", "ppo_run", "dpo_run", "sweep_dir"})):
        starter = next((i for i, item in enumerate(items) if needs <= set(getattr(item, "fixturenames", ()))
                        and not avoids & set(getattr(item, "fixturenames", ()))), None)
        if starter is not None:
            first.append(items.pop(starter))
    builders = {fixture: max((item for item in items if fixture in names(item)), key=lambda item: len(names(item)), default=None)
                for fixture in BUILT_FOR_SEVERAL}  # the first of the users that need the most
    items[:] = first + sorted(items, key=waits_for)


def pytest_terminal_summary(terminalreporter, config) -> None:
    """The shared fixtures' build times (which worker built what, and when) and each worker's time idle waiting
    for another's build, to see the run's critical path."""
    base = getattr(config, "_tmp_path_factory", None)
    if base is None or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    try:
        log = base.getbasetemp() / "shared" / "builds.tsv"
    except OSError:
        return
    if log.exists():
        terminalreporter.write_sep("=", "shared fixture builds (seconds since the first build started)")
        rows = [line.split("\t") for line in log.read_text().splitlines()]
        origin = min(float(row[2]) for row in rows)
        for name, worker, start, end in sorted(rows, key=lambda row: float(row[2])):
            terminalreporter.write_line(f"{name:24s} {worker:8s} {float(start) - origin:7.0f} -> {float(end) - origin:7.0f}"
                                        f"  ({float(end) - float(start):.0f} s)")
        waits = log.parent / "waits.tsv"
        rows = [line.split("\t") for line in waits.read_text().splitlines()] if waits.exists() else []
        idle = {worker: sum(float(r[2]) for r in rows if r[1] == worker) for worker in sorted({r[1] for r in rows})}
        terminalreporter.write_line("idle, waiting for another worker's build: "
                                    + (", ".join(f"{worker} {seconds:.0f} s" for worker, seconds in idle.items()) or "none"))


def run_module(module: str, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python -m summarize_from_feedback_details.<module> args` as a real subprocess."""
    env = subprocess_env()
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
    env = subprocess_env(OMP_NUM_THREADS="1")
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
    """The embedded assets, built once per test run with the real CLI (or reused from SFFD_TEST_EMBEDDED_DIR):
    the task, the tokenizer and tiny-pythia-s, the size every stage test trains. Tests that need every size
    use `embedded_sizes_dir`."""
    def build() -> Path:
        path = Path(os.environ[EMBEDDED_ENV]) if os.environ.get(EMBEDDED_ENV) else shared_root(tmp_path_factory) / "embedded"
        run_module("embedded", "--out_dir", str(path), "--sizes", TINY, timeout=2400)
        return path

    return build_once(tmp_path_factory, "embedded_dir", build)


# The size comparison and the sweeps over sizes pre-train every size for this many steps instead of 1,000: the
# direction holds by a wide margin this early (held-out LM loss 1.173 / 0.951 / 0.925 for s / m / l at 150 steps;
# 0.513 / 0.509 / 0.499 at the shipped 1,000), in 70 s of one core instead of 650.
SIZES_PRETRAIN_STEPS = 150


@pytest.fixture(scope="session")
def embedded_sizes_dir(tmp_path_factory) -> Path:
    """Embedded assets with EVERY size pre-trained for SIZES_PRETRAIN_STEPS steps (same task data and tokenizer
    as `embedded_dir`, whose tiny-pythia-s has the full 1,000): for tests that compare or sweep sizes."""
    def build() -> Path:
        path = shared_root(tmp_path_factory) / "embedded_sizes"
        run_module("embedded", "--out_dir", str(path), "--pretrain_steps", str(SIZES_PRETRAIN_STEPS), timeout=2400)
        return path

    return build_once(tmp_path_factory, "embedded_sizes_dir", build)


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_dir: Path):
    from summarize_from_feedback_details.core import load_tokenizer

    return load_tokenizer(str(embedded_dir / "models" / "tiny-pythia-s"))


@pytest.fixture(scope="session")
def embedded_dataset(embedded_dir: Path, tmp_path_factory) -> Path:
    """The data stage run once on the embedded task, as a subprocess with the `embedded` preset; the preset's
    model and data paths follow --embedded_dir."""
    def build() -> Path:
        out = shared_root(tmp_path_factory) / "datasets" / "embedded"
        run_module("tldr_dataset", "embedded", "--embedded_dir", str(embedded_dir), "--output_dir", str(out))
        return out

    return build_once(tmp_path_factory, "embedded_dataset", build)


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    """One runs folder for every worker: each test writes its own run names into it."""
    path = shared_root(tmp_path_factory) / "runs"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def sft_run(embedded_dir, embedded_dataset, runs_dir, tmp_path_factory) -> Path:
    def build() -> Path:
        run_module("sft", "embedded", "--base_model", f"{embedded_dir}/models/{TINY}", "--dataset", str(embedded_dataset),
                   "--output_dir", str(runs_dir), "--run_name", "sft", "--max_eval_samples", "100")
        return runs_dir / "sft"

    return build_once(tmp_path_factory, "sft_run", build)


@pytest.fixture(scope="session")
def reward_run(sft_run, embedded_dataset, runs_dir, tmp_path_factory) -> Path:
    def build() -> Path:
        run_module("reward", "embedded", "--sft_model_path", str(sft_run / "model"), "--dataset", str(embedded_dataset),
                   "--output_dir", str(runs_dir), "--run_name", "reward", "--normalization_samples", "1000",
                   "--total_episodes", "3200")
        return runs_dir / "reward"

    return build_once(tmp_path_factory, "reward_run", build)


# A short PPO run: 24 updates of 32 rollouts (the hello world runs the full embedded preset); sample tables
# before the first update and after updates 8, 16, 24 (tests/test_fidelity_outputs.py).
PPO_TEST_ARGS = ["--total_episodes", "768", "--batch_size", "32", "--local_rollout_forward_batch_size", "32",
                 "--local_micro_batch_size", "32", "--max_eval_samples", "100", "--eval_every", "4", "--logging_steps", "4",
                 "--save_samples_every", "8"]


def _stage_common(sft_run: Path, reward_run: Path, dataset: Path, runs_dir: Path) -> list[str]:
    return ["embedded", "--sft_model_path", str(sft_run / "model"), "--reward_model_path", str(reward_run / "model"),
            "--dataset", str(dataset), "--output_dir", str(runs_dir)]


@pytest.fixture(scope="session")
def ppo_run(sft_run, reward_run, embedded_dataset, runs_dir, tmp_path_factory) -> Path:
    def build() -> Path:
        run_module("ppo", *_stage_common(sft_run, reward_run, embedded_dataset, runs_dir), "--run_name", "ppo", *PPO_TEST_ARGS)
        return runs_dir / "ppo"

    return build_once(tmp_path_factory, "ppo_run", build)


@pytest.fixture(scope="session")
def dpo_run(sft_run, reward_run, embedded_dataset, runs_dir, tmp_path_factory) -> Path:
    def build() -> Path:
        # 50 updates of 32 pairs: validation accuracy 0.72 and gold utility 1.55 (0.73 and 1.57 after 100), in 40 s
        run_module("dpo", *_stage_common(sft_run, reward_run, embedded_dataset, runs_dir), "--run_name", "dpo",
                   "--total_episodes", "1600", "--max_eval_samples", "100", "--eval_response_length", "53")
        return runs_dir / "dpo"

    return build_once(tmp_path_factory, "dpo_run", build)
