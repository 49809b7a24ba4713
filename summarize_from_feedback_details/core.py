"""The small shared core: what every stage must do the same way.

Kept deliberately boring: command-line presets, user-facing errors, the pad-token rule (Detail 3.2),
atomic writes, seeding. Anything two stages need identically lives here exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

PAD_TOKEN = "[PAD]"
# Detail 1: comparisons of these labelling batches are CNN/DM articles, not Reddit posts.
CNNDM_BATCHES = ("batch0_cnndm", "cnndm0", "cnndm2")
PadChoice = Literal["[PAD]", "eos"]


REQUEUE_EXIT_CODE = 124
"""exit status of a run stopped by SIGTERM / SIGUSR1 after writing a checkpoint (checkpoint.py): requeue it and
rerun with `--resume auto` (scripts/slurm requeue on it; `timeout` also exits 124)"""


class UserInputError(ValueError):
    """An error the user caused (bad path, malformed row, sizes that do not divide, ...).

    Raised before expensive work starts; the message names the input and the fix. Stage entry points
    print it as one line and exit with status 2 instead of a traceback.
    """


def cli(presets: Mapping[str, tuple[str, T]], main: Callable[[T], Any], description: str) -> None:
    """Parse `args` with tyro from named presets (`pythia` = the paper, `embedded` = offline CPU task).

    Usage: `python -m summarize_from_feedback_details.<stage> {pythia,embedded} [--field value ...]`.
    """
    import tyro

    args = tyro.extras.overridable_config_cli(presets, description=description, use_underscores=True)
    run_main(main, args)


def run_main(main: Callable[[T], Any], args: T) -> None:
    """Run a stage; a `UserInputError` becomes one clear line on stderr and exit status 2. A failure after the
    stage created its run folder is recorded there first (`failures_recorded`)."""
    try:
        with failures_recorded():
            main(args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------------------------
# Failed runs: a run folder of a run that did not finish says so
# ----------------------------------------------------------------------------------------------
FAILED_FILE = "FAILED.json"
"""written into a run folder when its run fails after the folder exists: error type, message, traceback tail"""
_open_runs: list[Path] = []
"""the run folders this process created or joined since `failures_recorded` began (`run_opened`)"""


def run_opened(run_dir: str | os.PathLike, is_main: bool = True) -> None:
    """Record that the run folder `run_dir` now exists: a failure from here on writes FAILED.json into it. The
    main process also removes a FAILED.json or metrics.json of an earlier run in the same folder (a rerun with the
    same --run_name): until this run finishes, nothing may read the folder as finished."""
    run_dir = Path(run_dir)
    if is_main:
        for stale in (FAILED_FILE, "metrics.json"):
            (run_dir / stale).unlink(missing_ok=True)
    _open_runs.append(run_dir)


@contextlib.contextmanager
def failures_recorded() -> Iterator[None]:
    """Around a stage's `main`: an exception (a bad input found late, a crash, Ctrl-C) after `run_opened` writes
    `{run_dir}/FAILED.json` atomically and propagates. A run that fails its checks before any work has no folder."""
    import traceback

    _open_runs.clear()
    try:
        yield
    except BaseException as error:
        if not (isinstance(error, SystemExit) and error.code in (0, None, REQUEUE_EXIT_CODE)):  # preempted: not failed
            record = {"error": type(error).__name__, "message": str(error), "argv": sys.argv,
                      "rank": int(os.environ.get("RANK", 0)), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "traceback": "".join(traceback.format_exception(error)).splitlines()[-40:]}
            for run_dir in _open_runs:
                if run_dir.is_dir():
                    write_json(run_dir / FAILED_FILE, record)
        raise
    finally:
        _open_runs.clear()


def run_finished(run_dir: str | os.PathLike) -> bool:
    """A finished run folder: metrics.json written at its end, and no FAILED.json."""
    return (Path(run_dir) / "metrics.json").is_file() and not (Path(run_dir) / FAILED_FILE).exists()


# ----------------------------------------------------------------------------------------------
# Numeric arguments: one table of accepted ranges, checked before any work
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Range:
    """The accepted values of a numeric argument: finite, between `low` and `high` (None: unbounded), each bound
    included unless `open_low` / `open_high`; `what` the argument is, for the message."""

    what: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def accepts(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.open_high else value > self.high))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return "a finite number" if self.high is None else f"{'<' if self.open_high else '<='} {self.high:g}"


def _positive(what: str) -> Range:
    return Range(what, low=0, open_low=True)


def _at_least(low: int, what: str) -> Range:
    return Range(what, low=low)


NUMBER_RANGES: dict[str, Range] = {
    # every stage (RunArgs, TrainArgs)
    "seed": _at_least(0, "the seed"),
    "logging_steps": _at_least(1, "updates between logged lines"),
    "lr": _positive("the learning rate"),
    "eps": _positive("AdamW's epsilon"),
    "warm_up_steps": _at_least(0, "the warm-up updates"),
    "num_train_epochs": _at_least(1, "the epochs"),
    "total_episodes": _at_least(1, "the examples to train on"),
    "batch_size": _at_least(1, "the global batch"),
    "local_micro_batch_size": _at_least(1, "the micro-batch per process"),
    "local_eval_batch_size": _at_least(1, "the evaluation batch per process"),
    "max_eval_samples": _at_least(1, "the evaluation rows per split"),
    "temperature": _positive("the sampling temperature (logits are divided by it)"),
    "eval_temperature": _positive("the evaluation temperature (logits are divided by it)"),
    # reward
    "normalization_samples": _at_least(1, "the SFT references scored for the normalisation"),
    "padding_check_samples": _at_least(0, "the pairs of the padding check (0: none)"),
    # dpo
    "beta": _positive("DPO's beta"),
    "label_smoothing": Range("the share of flipped labels", low=0, high=0.5, open_high=True),
    "eval_response_length": _at_least(1, "the tokens sampled per query"),
    # ppo
    "num_mini_batches": _at_least(1, "the minibatches per PPO epoch"),
    "local_rollout_forward_batch_size": _at_least(1, "the rollout batch per process"),
    "num_ppo_epochs": _at_least(1, "the PPO epochs per batch"),
    "response_length": _at_least(1, "the tokens sampled per query"),
    "kl_coef": _at_least(0, "the KL coefficient beta"),
    "kl_target": _positive("the adaptive controller's KL target"),
    "kl_horizon": _at_least(1, "the adaptive controller's horizon"),
    "gamma": Range("the discount", low=0, high=1),
    "lam": Range("GAE's lambda", low=0, high=1),
    "cliprange": _positive("the policy ratio clip"),
    "cliprange_value": _positive("the value clip"),
    "vf_coef": _at_least(0, "the value-loss coefficient"),
    "penalty_reward_value": Range("the score of a response without EOS"),
    "save_every": _at_least(0, "updates between checkpoints (0: only on SIGTERM / SIGUSR1)"),
    "keep_checkpoints": _at_least(1, "the newest checkpoints kept"),
    "eval_every": _at_least(0, "updates between validation scores (0: never)"),
    "save_samples_every": _at_least(0, "updates between sample tables (0: never)"),
    # lora.py (every training stage)
    "lora_r": _at_least(0, "the LoRA rank (0: full fine-tuning)"),
    "lora_alpha": _positive("the LoRA scaling alpha"),
    "lora_dropout": Range("the LoRA dropout", low=0, high=1, open_high=True),
    # rloo
    "rloo_k": _at_least(2, "the samples per prompt"),
    "grpo_eps": _positive("GRPO's epsilon added to the group's standard deviation"),
    # tldr_dataset
    "num_proc": _at_least(1, "the tokenization processes"),
    "lengths": _at_least(1, "a token length"),
}
"""accepted range of every numeric argument of every stage, by field name (a nested field, `lengths.query`, falls
back to its parent's entry); tests/test_bad_inputs.py checks that every numeric field has one"""


def validate_numbers(args: Any, ranges: Mapping[str, Range] | None = None) -> None:
    """Check every numeric field of the dataclass `args` (nested ones as `--parent.field`) against NUMBER_RANGES,
    with `ranges` taking precedence (a stage where a value has a meaning of its own); a field set to None (the
    default behaviour) is not checked. One UserInputError naming the flag, the value, the accepted range and the fix."""
    table = {**NUMBER_RANGES, **(ranges or {})}
    for name, value, default in _numeric_fields(args):
        accepted = table.get(name) or table.get(name.split(".")[0])
        if accepted is None or accepted.accepts(value):
            continue
        fix = "leave it out for the default" if default is None else f"e.g. --{name} {default!r} (the default)"
        raise UserInputError(f"--{name} {value!r} is out of range: {accepted.what} must be {accepted.describe()}; "
                             f"pass a value {accepted.describe()}, {fix}")


def _numeric_fields(args: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted name, value, class default) of every int / float field of `args`, nested dataclasses included."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if dataclasses.is_dataclass(value):
            yield from _numeric_fields(value, f"{prefix}{field.name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            default = field.default if field.default is not dataclasses.MISSING else None
            yield f"{prefix}{field.name}", value, default


# ----------------------------------------------------------------------------------------------
# Tokenizer: Detail 3.2, a dedicated pad token
# ----------------------------------------------------------------------------------------------
def set_pad_token(tokenizer: Any, pad_token: PadChoice = PAD_TOKEN) -> Any:
    """Give `tokenizer` the pad token of the paper (a dedicated `[PAD]`) or, as an ablation, EOS.

    Detail 3.2: never pad with EOS. If pad == EOS, masking the padding also masks the EOS, the model
    never learns to stop and the EOS trick (Detail 23) breaks. With the Pythia tokenizer `[PAD]`
    becomes id 50277, inside Pythia's 50,304 embedding rows, so no embedding is resized.
    Note: transformers 5 reports `<|padding|>` (id 1) as Pythia's pad by default; we always set it.
    """
    if tokenizer.eos_token_id is None:
        raise UserInputError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS token; "
            "set `eos_token` in its tokenizer_config.json (Pythia: <|endoftext|>)"
        )
    if pad_token == "eos":
        tokenizer.pad_token = tokenizer.eos_token
    elif pad_token == PAD_TOKEN:
        if tokenizer.pad_token != PAD_TOKEN:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    else:
        raise UserInputError(f"pad_token must be '[PAD]' or 'eos', got {pad_token!r}")
    check_pad_token(tokenizer, allow_pad_equals_eos=pad_token == "eos")
    return tokenizer


def check_pad_token(tokenizer: Any, allow_pad_equals_eos: bool = False, flag: str = "--pad_token eos") -> None:
    """Refuse a tokenizer without a pad token or whose pad token is its EOS (Detail 3.2)."""
    name = getattr(tokenizer, "name_or_path", "?")
    if tokenizer.pad_token_id is None:
        raise UserInputError(f"tokenizer {name!r} has no pad token; add a dedicated '[PAD]' token")
    if tokenizer.pad_token_id == tokenizer.eos_token_id and not allow_pad_equals_eos:
        raise UserInputError(
            f"tokenizer {name!r} pads with its EOS token (id {tokenizer.eos_token_id}): masking the padding "
            "would also mask EOS and the model would never learn to stop (Detail 3.2). Use a tokenizer with a "
            f"dedicated '[PAD]' token, or pass `{flag}` to run this ablation on purpose"
        )


def load_tokenizer(name_or_path: str, pad_token: PadChoice = PAD_TOKEN) -> Any:
    """Load a tokenizer by hub id or local path and set its pad token (Detail 3.2)."""
    from transformers import AutoTokenizer

    local = Path(name_or_path)
    if looks_like_local_path(name_or_path) and not local.exists():
        raise UserInputError(f"tokenizer/model path {name_or_path!r} does not exist; check the path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"cannot load a tokenizer from {name_or_path!r} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "pass a hub id such as EleutherAI/pythia-1b-deduped or a directory written by save_pretrained"
        ) from error
    return set_pad_token(tokenizer, pad_token)


def looks_like_local_path(name: str) -> bool:
    """A hub id is `owner/name`; anything that exists, starts with . or /, or has more parts is local."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


HUB_TIMEOUT_S = 3.0
"""how long the one hub lookup of `resolve_input` may take"""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def resolve_input(path: str, flag: str, expected: str, repo_type: Literal["model", "dataset"]) -> bool:
    """Where the input directory `flag` = `path` is, checked before any work: True for a local directory, False for
    a hub id that is in the local cache or found on the hub. Anything else is one UserInputError: an existing file
    where a directory is expected ("is a file"), a local path that does not exist, or, for a name that reads either
    way (`models/sft_model`, `org/name`), both readings: no local directory, and not reachable as a hub id.
    `expected` says what to pass instead."""
    local = Path(path).expanduser()
    if local.is_dir():
        return True
    if local.exists():
        raise UserInputError(f"{flag} {path!r} is a file, not a directory; pass {expected}")
    if looks_like_local_path(path) or not HUB_ID.match(path):
        if repo_type == "model":
            raise UserInputError(f"{flag} {path!r} is not a saved model (no such directory); pass {expected}")
        raise UserInputError(f"{path!r} does not exist: {flag} must be {expected}")
    problem = hub_problem(path, repo_type)
    if problem is not None:
        raise UserInputError(f"{flag} {path!r}: no local directory {path!r} (in {os.getcwd()}), and as a hub {repo_type} "
                             f"id {problem}; pass {expected}")
    return False


def hub_problem(repo_id: str, repo_type: Literal["model", "dataset"], timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the hub id `repo_id` cannot be loaded, or None when it can: in the local cache, or found by one hub
    lookup of at most `timeout` seconds (none when HF_HUB_OFFLINE is set)."""
    import threading

    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    cached = [Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"]
    if repo_type == "dataset":  # the datasets library's own cache
        cached.append(Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets") / repo_id.replace("/", "___"))
    if any(path.is_dir() for path in cached):
        return None
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "it is not in the local cache and the hub is offline (HF_HUB_OFFLINE is set)"
    outcome: dict[str, Any] = {}

    def lookup() -> None:
        try:
            outcome["info"] = HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout)
        except Exception as error:  # noqa: BLE001 - reported below as one line
            outcome["error"] = error

    thread = threading.Thread(target=lookup, daemon=True)  # a name lookup can hang longer than any HTTP timeout
    thread.start()
    thread.join(timeout)
    error = outcome.get("error")
    if "info" in outcome:
        return None
    if error is None:
        return f"the hub did not answer within {timeout:g} s (offline?)"
    if isinstance(error, RepositoryNotFoundError):
        return f"the hub has no such {repo_type} (or it is private or gated: log in with `hf auth login`)"
    return f"the hub is not reachable ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})"


def column(dataset: Any, name: str) -> list[Any]:
    """One column of a `datasets.Dataset` as a Python list, in one Arrow conversion (row iteration is slow)."""
    return dataset.with_format("arrow")[name].to_pylist()


def rows(dataset: Any, names: list[str]) -> list[dict[str, Any]]:
    """The rows of `dataset` restricted to `names`, as dicts, in one Arrow conversion."""
    return dataset.select_columns(names).with_format("arrow")[:].to_pylist()


def saved_split_names(path: str | os.PathLike) -> list[str]:
    """The splits of a `DatasetDict` that `save_to_disk` wrote at `path` (none when there is none)."""
    listing = Path(path) / "dataset_dict.json"
    return list(json.loads(listing.read_text())["splits"]) if listing.is_file() else []


def load_saved_split(path: str | os.PathLike, split: str) -> Any | None:
    """Split `split` of the `DatasetDict` saved at `path`, read on its own; None when it is absent or has no rows.

    One split at a time because a split saved with no rows has no data file, and `datasets.load_from_disk` of it,
    or of the whole dict around it, fails in `concat_tables` (IndexError): bring-your-own comparisons without
    CNN/DM rows made such an empty `validation_cnndm` before the data stage left empty splits out.
    """
    import datasets

    if split not in saved_split_names(path):
        return None
    state = json.loads((Path(path) / split / "state.json").read_text())
    if not state.get("_data_files"):
        return None
    dataset = datasets.load_from_disk(str(Path(path) / split))
    return dataset if len(dataset) else None


# ----------------------------------------------------------------------------------------------
# Files: nothing a run produced is lost or half-written
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path` in one rename.

    A crash leaves the previous `path` (if any) untouched and no half-written directory that a later
    stage could load.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically (temporary file + rename): never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write json atomically (temporary file + rename)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def seed_everything(seed: int, rank: int = 0) -> int:
    """G-2: the per-process seed is `seed + rank * 100003`; returns it."""
    import numpy as np
    import torch

    local_seed = seed + rank * 100003
    random.seed(local_seed)
    np.random.seed(local_seed % 2**32)
    torch.manual_seed(local_seed)
    return local_seed


# ----------------------------------------------------------------------------------------------
# Runs: common arguments, batch sizes, data sharding, logging
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunArgs:
    """Fields every training stage shares (the stage's own `Args` extends this)."""

    exp_name: str = "run"
    """experiment name; the run is `{exp_name}__{seed}__{unix time}`"""
    seed: int = 1
    """seed (G-2: each process uses seed + rank * 100003)"""
    output_dir: str = "runs"
    """the run directory `{output_dir}/{run_name}` holds the model, tables, metrics and TensorBoard logs"""
    run_name: str | None = None
    """fixed run name instead of `{exp_name}__{seed}__{unix time}`"""
    track: bool = False
    """also log to Weights & Biases (needs the `tracking` extra)"""
    wandb_project_name: str = "tldr_summarize"
    """Weights & Biases project (with --track)"""
    wandb_entity: str | None = None
    """Weights & Biases entity (with --track)"""
    deepspeed: bool = False
    """Detail 8: train with DeepSpeed ZeRO-2 through accelerate (on CPU over gloo)"""
    push_to_hub: bool = False
    """push the trained model to the hub, one revision (branch) per run"""
    hf_entity: str | None = None
    """hub user/organisation for --push_to_hub"""
    logging_steps: int = 10
    """print one metrics line (and write TensorBoard) every this many updates"""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """mixed precision on GPU (the paper trains in bf16); CPU runs stay fp32"""
    resume: str = "none"
    """continue a stopped run: `auto` (the newest complete checkpoint of `{output_dir}/{run_name}`; none there: start
    fresh), a checkpoint folder, or `none`"""
    save_every: int = 0
    """write a checkpoint every this many updates (0: only when SIGTERM / SIGUSR1 asks for one)"""
    keep_checkpoints: int = 2
    """the newest checkpoints kept in `{run_dir}/checkpoints` (removed when the run finishes)"""


@dataclasses.dataclass
class TrainArgs(RunArgs):
    """Optimisation fields every training stage shares (G-1)."""

    lr: float = 3e-6
    """G-1: one learning rate for every stage and size (AdamW)"""
    eps: float = 1e-5
    """AdamW epsilon"""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Details 9-10: cosine decay (PPO: linear to 0)"""
    warm_up_steps: int = 0
    """learning-rate warm-up updates (the paper: none)"""
    num_train_epochs: int = 1
    """Details 9-10: one epoch over the train split"""
    total_episodes: int | None = None
    """examples (comparisons) to consume; default: epochs x train split size. For quick runs"""
    allow_pad_equals_eos: bool = False
    """accept a dataset whose pad token is EOS (the Detail 3.2 ablation); refused otherwise"""


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Derived batch sizes: `batch_size = local_micro_batch_size x gradient_accumulation_steps x world_size`."""

    world_size: int
    local_micro_batch_size: int
    gradient_accumulation_steps: int
    batch_size: int
    num_updates: int

    @property
    def micro_batch_size(self) -> int:
        return self.local_micro_batch_size * self.world_size


def plan_batches(batch_size: int, local_micro_batch_size: int, world_size: int, total_examples: int, what: str) -> BatchPlan:
    """Gradient accumulation from the global batch, with exact-division checks (one clear error)."""
    if batch_size < 1 or local_micro_batch_size < 1:
        raise UserInputError(f"--batch_size ({batch_size}) and --local_micro_batch_size ({local_micro_batch_size}) must be >= 1")
    per_step = local_micro_batch_size * world_size
    if batch_size % per_step:
        raise UserInputError(
            f"--batch_size {batch_size} is not divisible by --local_micro_batch_size {local_micro_batch_size} x "
            f"{world_size} processes = {per_step}; choose sizes with batch_size = micro x accumulation x processes"
        )
    num_updates = total_examples // batch_size
    if num_updates < 1:
        raise UserInputError(f"{what}: {total_examples} examples (--total_episodes, or epochs x train rows) are fewer than one batch "
                             f"of {batch_size}; lower --batch_size or raise --total_episodes")
    return BatchPlan(world_size, local_micro_batch_size, batch_size // per_step, batch_size, num_updates)


def shard_micro_batches(
    num_examples: int, plan: BatchPlan, rank: int, seed: int, per_rank_shuffle: bool = False
) -> list[list[list[int]]]:
    """G-2: for each update of ONE epoch (at most `plan.num_updates`), this rank's micro-batches of example indices.

    Default: ONE permutation (same seed on every rank); each global batch is cut into micro-batches of
    `local_micro_batch_size` and micro-batch k goes to rank k % world_size, so every example is seen once
    per epoch and the micro-batches do not depend on the number of processes. `per_rank_shuffle` is the
    authors' RM/DPO behaviour (a different permutation per rank: some examples twice, some never).
    """
    generator = torch_generator(seed + (rank * 100003 if per_rank_shuffle else 0))
    import torch

    order = torch.randperm(num_examples, generator=generator).tolist()
    updates = []
    for update in range(min(plan.num_updates, num_examples // plan.batch_size)):  # full batches of this epoch only
        batch = order[update * plan.batch_size : (update + 1) * plan.batch_size]
        micro = [batch[i : i + plan.local_micro_batch_size] for i in range(0, plan.batch_size, plan.local_micro_batch_size)]
        if per_rank_shuffle:  # each rank takes the first micro-batches of its own permutation's batch
            micro = micro[: plan.gradient_accumulation_steps]
        else:
            micro = micro[rank :: plan.world_size]
        updates.append(micro)
    return updates


def training_schedule(num_examples: int, plan: BatchPlan, rank: int, seed: int, per_rank_shuffle: bool = False) -> list[list[list[int]]]:
    """This rank's micro-batches for each of the `plan.num_updates` updates, over as many epochs as they
    need (a new permutation, seed + epoch, per epoch; a partial last batch of an epoch is dropped)."""
    per_epoch = num_examples // plan.batch_size
    if per_epoch < 1:
        raise UserInputError(f"{num_examples} examples are fewer than one batch of {plan.batch_size}; lower --batch_size")
    updates: list[list[list[int]]] = []
    epoch = 0
    while len(updates) < plan.num_updates:
        updates.extend(shard_micro_batches(num_examples, plan, rank, seed + epoch, per_rank_shuffle))
        epoch += 1
    return updates[: plan.num_updates]


def torch_generator(seed: int) -> Any:
    import torch

    return torch.Generator().manual_seed(seed)


def make_run_name(args: RunArgs) -> str:
    return args.run_name or f"{args.exp_name}__{args.seed}__{int(time.time())}"


def wandb_names(args: Any, run_dir: Path) -> tuple[str, str]:
    """(run name, group) on Weights & Biases: `{exp_name}__seed{seed}__{run}` grouped by exp_name, so the seeds
    of one sweep cell sit together and runs of different cells that share a run name stay apart."""
    exp_name = getattr(args, "exp_name", run_dir.name)
    return f"{exp_name}__seed{getattr(args, 'seed', 0)}__{run_dir.name}", exp_name


class RunLogger:
    """TensorBoard always (main process), Weights & Biases with --track; one printed line per call."""

    def __init__(self, run_dir: Path, args: Any, is_main: bool, purge_step: int | None = None):
        """`purge_step`: a resumed run continues its TensorBoard log there (events of that step and later, written
        after the checkpoint, are dropped) and its wandb run (the id kept in `{run_dir}/wandb_run_id`)."""
        self.is_main = is_main
        self.writer = None
        self.wandb = None
        if not is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
        config = dataclasses.asdict(args)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
        if getattr(args, "track", False):
            try:
                import wandb
            except ImportError as error:
                raise UserInputError("--track needs wandb: pip install -e '.[tracking]'") from error
            name, group = wandb_names(args, run_dir)
            id_file = run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if purge_step is not None and id_file.is_file() else None
            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=name, group=group,
                                    config=config, dir=str(run_dir), sync_tensorboard=False, id=run_id,
                                    resume="allow" if run_id else None)
            write_text(id_file, self.wandb.id)

    def log(self, metrics: dict[str, float], step: int, prefix: str = "") -> None:
        if not self.is_main:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        shown = " ".join(f"{k.split('/')[-1] if k.count('/') == 1 else k}={v:.4g}" for k, v in metrics.items())
        print(f"{prefix}step {step}: {shown}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def push_run_to_hub(folder: Path, args: RunArgs, run_name: str, repo_name: str) -> str:
    """Upload `folder` to `{hf_entity}/{repo_name}` on the branch `run_name` (one revision per run)."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = f"{args.hf_entity}/{repo_name}"
    api.create_repo(repo_id, exist_ok=True)
    api.create_branch(repo_id, branch=run_name, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=run_name, commit_message=f"{run_name}")
    return f"https://huggingface.co/{repo_id}/tree/{run_name}"
