"""Per-detail ablations: switch one implementation detail at a time, re-run its stage and every stage
downstream of it over several seeds, and tabulate what changed (markdown + csv + a plot).

    python -m summarize_from_feedback_details.ablate                        # every ablatable detail, seeds 1 2
    python -m summarize_from_feedback_details.ablate --details no_eos_penalty reward_whitening
    python -m summarize_from_feedback_details.ablate --details reward_whitening --quick   # a smoke run
    python -m summarize_from_feedback_details.ablate --dry_run              # print the commands, run nothing
    python -m summarize_from_feedback_details.ablate --list_details         # the keys --details accepts

Reads like the experiment: pick the details of the registry (details.py) -> per seed, the baseline chain
data -> SFT -> RM -> PPO -> DPO (only the stages the details need) -> per detail, its stage with the
registry's ablation arguments and every stage that trains on its output (data -> all; SFT -> RM, PPO,
DPO; RM -> PPO), the upstream runs shared with the baseline -> run what is not finished yet (a
metrics.json without a FAILED.json marks a finished run, so an interrupted ablation resumes) -> read every run's metrics ->
`ablation.md`, `ablation.csv`, `ablation.png` in --out_dir.

Where the preset already runs a detail's ablation (the embedded SFT preset trains on the reference only,
which is Detail 9's ablation), the ablated run takes the paper's value instead; the table says so.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from summarize_from_feedback_details.core import (
    UserInputError,
    run_finished,
    run_main,
    write_json,
    write_text,
)
from summarize_from_feedback_details.details import DETAILS, STAGE_MODULES, Detail

PACKAGE = "summarize_from_feedback_details"
PipelineStage = Literal["data", "sft", "reward", "ppo", "rloo", "dpo"]
STAGES: tuple[str, ...] = ("data", "sft", "reward", "ppo", "rloo", "dpo")
TRAINS_ON = {"data": (), "sft": ("data",), "reward": ("data", "sft"), "ppo": ("data", "sft", "reward"), "rloo": ("data", "sft", "reward"),
             "dpo": ("data", "sft")}
"""the runs whose outputs a stage trains on: an ablation of X re-runs every stage that (indirectly) trains on X"""
EVALUATES_WITH = {"dpo": ("reward",)}
"""runs a stage only evaluates with (DPO scores its samples with an RM): taken from the chain, never a reason to re-run"""
PAPER_PRESET = "pythia"
"""the preset that holds the paper's values (the inverted ablation of a detail takes its value from here)"""

QUICK_ARGS: dict[str, tuple[str, ...]] = {
    "data": ("--no-figures",),
    "sft": ("--total_episodes", "64", "--max_eval_samples", "8", "--eval_splits", "validation"),
    "reward": ("--total_episodes", "64", "--normalization_samples", "64", "--max_eval_samples", "64", "--padding_check_samples", "16"),
    "ppo": ("--total_episodes", "32", "--batch_size", "16", "--local_micro_batch_size", "16", "--local_rollout_forward_batch_size", "16",
            "--local_eval_batch_size", "8", "--max_eval_samples", "8", "--eval_splits", "validation", "--eval_every", "1",
            "--logging_steps", "1"),
    "rloo": ("--total_episodes", "32", "--batch_size", "16", "--local_micro_batch_size", "16", "--local_rollout_forward_batch_size", "16",
             "--local_eval_batch_size", "8", "--max_eval_samples", "8", "--eval_splits", "validation", "--eval_every", "1",
             "--logging_steps", "1"),
    "dpo": ("--total_episodes", "64", "--max_eval_samples", "8", "--eval_splits", "validation"),
}
"""--quick: a couple of updates and a few evaluation samples per stage (smoke runs and tests, not results)"""

STAGE_METRICS: dict[str, tuple[str, ...]] = {
    "data": ("truncated_queries/train", "truncated_queries/validation", "length_maxima/query", "length_maxima/sft_response",
             "length_maxima/sft_query_response", "length_maxima/rm_response", "length_maxima/rm_query_response"),
    "sft": ("eval/validation/rougeL", "eval/validation/gold_utility", "eval/validation/gold_win_rate", "eval/validation/eos_rate",
            "derived/validation/stop_rate", "eval/validation/response_token_len"),
    "reward": ("eval/accuracy/split/validation", "eval/accuracy/split/validation_cnndm", "normalization/bias"),
    # last/val/eos_rate: the rollouts (T 0.7) of the last update, the responses the EOS trick scores;
    # first/last value loss: how fast the critic fits the returns (Detail 22).
    "ppo": ("eval/validation/score", "eval/validation/gold_win_rate", "eval/validation/gold_utility", "eval/validation/eos_rate",
            "derived/validation/stop_rate", "eval/validation/response_token_len", "last/val/eos_rate", "last/objective/kl", "first/loss/value_avg", "last/loss/value_avg"),
    "rloo": ("eval/validation/score", "eval/validation/gold_win_rate", "eval/validation/gold_utility", "eval/validation/eos_rate",
             "derived/validation/stop_rate", "eval/validation/response_token_len", "last/val/eos_rate", "last/objective/kl"),
    "dpo": ("eval/accuracy/split/validation", "eval/validation/gold_win_rate", "eval/validation/gold_utility",
            "eval/validation/eos_rate", "derived/validation/stop_rate", "eval/validation/response_token_len", "eval/validation/score"),
}
"""the table's rows: for each stage a run re-ran, these keys of its metrics.json (data: summary.json)"""

STOP_RATE = "derived/validation/stop_rate"
"""share of the validation responses (T 0.01) that produced an EOS: `has_eos`, or fewer kept tokens than were
sampled. Derived from the run's validation table because the stages' `eos_rate` cannot see an EOS that is also
the pad token (Detail 3.2's ablation reads 0 there even when the model stops)"""
VALIDATION_TABLES = {"sft": "eval_query_responses_validation.csv", "ppo": "query_responses_validation.csv", "rloo": "query_responses_validation.csv",
                     "dpo": "query_responses_validation.csv"}


def stop_rate(run_dir: Path, stage: str, metrics: dict[str, Any]) -> float | None:
    """STOP_RATE of a finished run, or None without a validation table."""
    import pandas as pd

    table_path = run_dir / VALIDATION_TABLES.get(stage, "-")
    if not table_path.exists():
        return None
    if stage == "dpo":  # DPO samples its own evaluation length
        length = json.loads((run_dir / "args.json").read_text())["eval_response_length"]
    else:
        length = metrics["response_length"]
    table = pd.read_csv(table_path, usecols=["has_eos", "response_token_len"])
    return float((table["has_eos"].astype(bool) | (table["response_token_len"] < length)).mean())


@dataclass(frozen=True)
class Finding:
    """A qualitative finding of the paper, checked on a detail's rows: every (stage, metric) moves in `sign` when ablated."""

    detail: str
    claim: str
    criteria: tuple[tuple[str, str, int], ...]


FINDINGS = (
    Finding("no_eos_penalty", "without the EOS trick fewer responses end with EOS, so the RM score (read at the last token) is "
            "invalid more often (invalid share = 1 - EOS rate)",
            (("ppo", "last/val/eos_rate", -1), ("ppo", "eval/validation/eos_rate", -1))),
    Finding("reward_whitening", "reward whitening shortens responses and lowers the win rate",
            (("ppo", "eval/validation/response_token_len", -1), ("ppo", "eval/validation/gold_win_rate", -1))),
    Finding("dedicated_pad", "pad == EOS breaks stopping (fewer responses produce an EOS; the stop rate, since eos_rate "
            "cannot see an EOS that is the pad)",
            (("sft", STOP_RATE, -1), ("ppo", STOP_RATE, -1))),
    Finding("critic_from_rm", "the critic initialised from the RM trains faster than from SFT (the SFT-initialised critic "
            "has the higher value loss)", (("ppo", "first/loss/value_avg", +1), ("ppo", "last/loss/value_avg", +1))),
)


@dataclass
class Args:
    details: tuple[str, ...] = ()
    """registry keys to ablate (default: every detail with ablation arguments in the --stages)"""
    seeds: tuple[int, ...] = (1, 2)
    """seeds of the baseline and the ablated runs (the data stage has no seed and runs once per variant)"""
    out_dir: str = "ablations/embedded"
    """runs go to {out_dir}/seed{seed}/{baseline|detail}/{stage}, data to {out_dir}/data/{baseline|detail}; logs and the table beside"""
    preset: Literal["embedded", "pythia"] = "embedded"
    """the preset every stage run starts from"""
    embedded_dir: str = "assets/embedded"
    """embedded preset: the task data, tokenizer and tiny models (the data stage builds them when missing)"""
    base_model: str | None = None
    """the SFT base model and the data stage's tokenizer (default: the preset's; embedded: {embedded_dir}/models/tiny-pythia-s)"""
    dataset: str | None = None
    """an existing processed dataset as the baseline data (default: run the data stage into {out_dir}/data/baseline)"""
    sft_run: str | None = None
    """an existing SFT run directory as the baseline SFT of every seed (default: train one per seed)"""
    reward_run: str | None = None
    """an existing reward-model run directory as the baseline RM of every seed (default: train one per seed)"""
    stages: tuple[PipelineStage, ...] = ("data", "sft", "reward", "ppo", "dpo")
    """stages that may run: downstream stages outside this list are not re-run (e.g. `data sft` stops every chain at SFT;
    add rloo for RLOO's details and RLOO re-runs beside PPO's)"""
    quick: bool = False
    """a couple of updates and a few evaluation samples per stage (QUICK_ARGS): smoke runs and tests, not results"""
    data_args: str = ""
    """extra arguments for every data-stage run, one shell-quoted string (after --quick's)"""
    sft_args: str = ""
    """extra arguments for every SFT run, e.g. '--max_eval_samples 200' (after --quick's)"""
    reward_args: str = ""
    """extra arguments for every reward-model run (after --quick's)"""
    ppo_args: str = ""
    """extra arguments for every PPO run, e.g. '--total_episodes 768 --batch_size 32' (after --quick's)"""
    rloo_args: str = ""
    """extra arguments for every RLOO run, e.g. '--rloo_k 4' or '--baseline grpo' (after --quick's)"""
    dpo_args: str = ""
    """extra arguments for every DPO run (after --quick's)"""
    launcher: str = ""
    """what starts a training stage instead of `python` (e.g. 'torchrun --standalone --nproc_per_node 2'); it gets `-m <module> ...`"""
    jobs: int = 1
    """runs at a time (runs of other seeds and details are independent)"""
    dry_run: bool = False
    """print the commands in run order (shell-quoted, one per line; `# done` marks finished runs) and run nothing"""
    list_details: bool = False
    """print the ablatable details (key, number, stage, ablation arguments, title) and exit"""


@dataclass
class Run:
    """One stage run of the plan: where it writes, the command, the runs it needs first."""

    variant: str
    """`baseline` or a detail key"""
    stage: str
    seed: int | None
    """None for the data stage (it has no seed)"""
    path: Path
    """the run directory (data: the processed dataset)"""
    command: list[str] | None
    """None: an existing run the user passed in"""
    needs: list[Run] = field(default_factory=list)
    seconds: float | None = None
    status: str = "planned"

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.stage}" + ("" if self.seed is None else f"/seed{self.seed}")

    @property
    def done(self) -> bool:
        """Finished: the data stage's summary.json, a training run's metrics.json without FAILED.json (core.run_finished)."""
        return (self.path / "summary.json").exists() if self.stage == "data" else run_finished(self.path)

    def metrics(self) -> dict[str, Any] | None:
        """The run's metrics.json (data: summary.json) flattened, plus the derived stop rate (STOP_RATE)."""
        path = self.path / ("summary.json" if self.stage == "data" else "metrics.json")
        if not path.exists():
            return None
        metrics = flatten(json.loads(path.read_text()))
        rate = stop_rate(self.path, self.stage, metrics)
        return metrics if rate is None else {**metrics, STOP_RATE: rate}


@dataclass
class Variant:
    """A detail's ablation as it runs: the arguments of its stage, the stages it re-runs, whether it was inverted."""

    detail: Detail
    args: tuple[str, ...]
    inverted: bool
    stages: tuple[str, ...]
    downstream_args: tuple[str, ...]


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with `/`-joined keys (summary.json's `truncated_queries/train`)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ----------------------------------------------------------------------------------------------
# Which arguments an ablation runs with: parsed with the stage's own CLI and preset
# ----------------------------------------------------------------------------------------------
def stage_config(stage: str, preset: str, argv: list[str] | tuple[str, ...]) -> Any:
    """The stage's resolved `Args` for `python -m <stage> {preset} argv` (the stage's own tyro CLI; touches no file)."""
    import tyro

    module = importlib.import_module(f"{PACKAGE}.{STAGE_MODULES[stage]}")
    default = module.PRESETS[preset][1]
    try:
        return tyro.cli(type(default), default=default, args=list(argv), use_underscores=True)
    except SystemExit as error:
        raise UserInputError(f"`{shlex.join(argv)}` does not parse for the {stage} stage ({STAGE_MODULES[stage]}.py); "
                             f"see the message above and fix --{stage}_args or the registry's ablation arguments") from error


def _flat_config(config: Any) -> dict[str, Any]:
    return flatten(dataclasses.asdict(config), "")


def _cli_args(name: str, value: Any) -> list[str]:
    """One field back as command-line arguments (tyro's syntax with underscores)."""
    name = name.replace("/", ".")
    if isinstance(value, bool):
        return [f"--{name}" if value else f"--no-{name}"]
    if isinstance(value, (list, tuple)):
        return [f"--{name}", *map(str, value)]
    return [f"--{name}", str(value)]


def ablation_args(detail: Detail, preset: str, stage_args: list[str]) -> tuple[tuple[str, ...], bool]:
    """The arguments that switch `detail` relative to the baseline, and whether they had to be inverted.

    Normally the registry's `ablation`. When those parse to the baseline's own config (the preset already
    runs the ablated value), the switched run takes the paper's value of every field the ablation sets.
    """
    assert detail.ablation is not None
    base = stage_config(detail.stage, preset, stage_args)
    if stage_config(detail.stage, preset, [*stage_args, *detail.ablation]) != base:
        return tuple(detail.ablation), False
    paper = _flat_config(stage_config(detail.stage, PAPER_PRESET, []))
    ablated = _flat_config(stage_config(detail.stage, PAPER_PRESET, detail.ablation))
    changed = {name: value for name, value in paper.items() if ablated[name] != value}
    if not changed:
        raise UserInputError(f"detail {detail.key!r}: its ablation arguments {list(detail.ablation)} change nothing in the "
                             f"{PAPER_PRESET} preset of the {detail.stage} stage; fix its `ablation` in details.py")
    inverted = tuple(arg for name, value in changed.items() for arg in _cli_args(name, value))
    if stage_config(detail.stage, preset, [*stage_args, *inverted]) == base:
        raise UserInputError(f"detail {detail.key!r}: neither {list(detail.ablation)} nor the paper's value {list(inverted)} "
                             f"changes the {preset} preset of the {detail.stage} stage (given --{detail.stage}_args); nothing to compare")
    return inverted, True


def data_downstream_args(data_config: Any) -> tuple[str, ...]:
    """Arguments every stage trained on a dataset needs: Detail 3.2, the stages refuse data padded with EOS
    unless told that this is the ablation."""
    return ("--allow_pad_equals_eos",) if getattr(data_config, "pad_token", None) == "eos" else ()


def downstream(stage: str) -> set[str]:
    """Every stage that trains, directly or not, on `stage`'s output."""
    found: set[str] = set()
    frontier = {stage}
    while frontier:
        frontier = {s for s in STAGES if s not in found and any(t in frontier for t in TRAINS_ON[s])}
        found |= frontier
    return found


# ----------------------------------------------------------------------------------------------
# The plan: baseline chains, then each detail's re-runs
# ----------------------------------------------------------------------------------------------
def ablatable() -> list[Detail]:
    return [d for d in DETAILS if d.ablation and d.stage in STAGES]


def select_details(keys: tuple[str, ...]) -> list[Detail]:
    options = {d.key: d for d in ablatable()}
    if not keys:
        return list(options.values())
    unknown = [k for k in keys if k not in options]
    if unknown:
        raise UserInputError(f"--details: {unknown} are not ablatable details of the registry; choose from {sorted(options)}")
    return [options[k] for k in dict.fromkeys(keys)]


def user_stage_args(args: Args, stage: str) -> list[str]:
    """The arguments every run of `stage` gets besides paths: --quick's, then --{stage}_args."""
    quick = list(QUICK_ARGS[stage]) if args.quick else []
    try:
        return quick + shlex.split(getattr(args, f"{stage}_args"))
    except ValueError as error:
        raise UserInputError(f"--{stage}_args {getattr(args, f'{stage}_args')!r} is not a valid shell-quoted string ({error})") from error


class Planner:
    def __init__(self, args: Args):
        self.args = args
        self.out = Path(args.out_dir)
        self.runs: dict[tuple[str, str, int | None], Run] = {}
        self.base_model = args.base_model or (f"{args.embedded_dir}/models/tiny-pythia-s" if args.preset == "embedded" else None)
        self.launcher = shlex.split(args.launcher) or [sys.executable]
        self.provided = {"data": args.dataset, "sft": args.sft_run, "reward": args.reward_run}
        for stage, path in self.provided.items():
            flag = "--dataset" if stage == "data" else f"--{stage}_run"
            if path is not None and not Path(path).exists():
                raise UserInputError(f"{flag} {path!r} does not exist; pass an existing directory or leave it out to run that stage")
            if path is not None and stage != "data" and not (Path(path) / "model").is_dir():
                raise UserInputError(f"{flag} {path!r} has no model/ directory: pass the run directory of a finished {stage} run")

    def runnable(self, stage: str) -> bool:
        return self.provided.get(stage) is not None or stage in self.args.stages

    def variant(self, detail: Detail) -> Variant:
        if detail.stage not in self.args.stages:
            raise UserInputError(f"--details {detail.key} switches the {detail.stage} stage, which --stages {list(self.args.stages)} leaves out")
        switched, inverted = ablation_args(detail, self.args.preset, user_stage_args(self.args, detail.stage))
        stages = tuple(s for s in STAGES if (s == detail.stage or s in downstream(detail.stage)) and s in self.args.stages)
        extra: tuple[str, ...] = ()
        if detail.stage == "data":
            extra = data_downstream_args(stage_config("data", self.args.preset, [*user_stage_args(self.args, "data"), *switched]))
        return Variant(detail, switched, inverted, stages, extra)

    def baseline_stages(self, variants: list[Variant]) -> list[str]:
        needed = {s for v in variants for s in v.stages}
        for stage in reversed(STAGES):  # inputs of what is needed, transitively (inputs come earlier in STAGES)
            if stage in needed:
                for need in TRAINS_ON[stage]:
                    if not self.runnable(need):
                        flag = "--dataset" if need == "data" else f"--{need}_run"
                        raise UserInputError(f"the {stage} stage trains on a {need} run: add {need} to --stages or pass {flag}")
                    needed.add(need)
                needed |= {s for s in EVALUATES_WITH.get(stage, ()) if self.runnable(s)}
        return [s for s in STAGES if s in needed]

    def add(self, variant: str, stage: str, seed: int | None, chain: dict[str, Run], switched: tuple[str, ...] = (),
            extra: tuple[str, ...] = ()) -> Run:
        seed = None if stage == "data" else seed  # the data stage has no seed: one run per variant serves every seed
        key = (variant, stage, seed)
        if key in self.runs:
            return self.runs[key]
        if variant == "baseline" and self.provided.get(stage) is not None:
            run = Run(variant, stage, seed, Path(self.provided[stage]), None, status="given")
        elif stage == "data":
            path = self.out / "data" / variant
            run = Run(variant, stage, None, path, self.data_command(path, switched))
        else:
            path = self.out / f"seed{seed}" / variant / stage
            inputs = {s: chain[s] for s in (*TRAINS_ON[stage], *EVALUATES_WITH.get(stage, ())) if s in chain}
            run = Run(variant, stage, seed, path, self.stage_command(stage, path, seed, inputs, [*switched, *extra]),
                      needs=list(inputs.values()))
        self.runs[key] = run
        return run

    def data_command(self, path: Path, switched: tuple[str, ...]) -> list[str]:
        command = [sys.executable, "-m", f"{PACKAGE}.tldr_dataset", self.args.preset]
        if self.args.preset == "embedded":
            e = self.args.embedded_dir
            command += ["--embedded_dir", e, "--sft_dataset", f"{e}/data/sft", "--preference_dataset", f"{e}/data/preference"]
        if self.base_model:
            command += ["--base_model", self.base_model]
        return [*command, "--output_dir", str(path), *user_stage_args(self.args, "data"), *switched]

    def stage_command(self, stage: str, path: Path, seed: int | None, inputs: dict[str, Run], switched: list[str]) -> list[str]:
        command = [*self.launcher, "-m", f"{PACKAGE}.{STAGE_MODULES[stage]}", self.args.preset]
        if stage == "sft" and self.base_model:
            command += ["--base_model", self.base_model]
        if "sft" in inputs:
            command += ["--sft_model_path", str(inputs["sft"].path / "model")]
        if "reward" in inputs:
            command += ["--reward_model_path", str(inputs["reward"].path / "model")]
        command += ["--dataset", str(inputs["data"].path), "--output_dir", str(path.parent), "--run_name", path.name, "--seed", str(seed)]
        return [*command, *user_stage_args(self.args, stage), *switched]

    def plan(self) -> tuple[list[Variant], list[Run]]:
        if not self.args.seeds:
            raise UserInputError("--seeds is empty; give at least one seed (the table wants two or more)")
        if self.args.jobs < 1:
            raise UserInputError(f"--jobs {self.args.jobs} must be >= 1")
        chosen = select_details(self.args.details)  # by default only the details of stages that may run
        variants = [self.variant(d) for d in chosen if self.args.details or d.stage in self.args.stages]
        base_stages = self.baseline_stages(variants)
        for seed in self.args.seeds:
            chain: dict[str, Run] = {}
            for stage in base_stages:
                chain[stage] = self.add("baseline", stage, seed, chain)
            for v in variants:
                own = dict(chain)  # upstream runs are the baseline's; re-run stages replace them in this chain
                for stage in v.stages:
                    own[stage] = self.add(v.detail.key, stage, seed, own, v.args if stage == v.detail.stage else (), v.downstream_args)
        return variants, list(self.runs.values())


# ----------------------------------------------------------------------------------------------
# Running: a small scheduler over the plan (dependencies first, --jobs at a time, finished runs skipped)
# ----------------------------------------------------------------------------------------------
def threads_per_job(jobs: int) -> int:
    """CPU threads for each of `jobs` runs at once: their share of the cores. torch's default (every core in every
    process) oversubscribes the machine: on 2 cores, 2 quick PPO runs at once took 50-65 s each with the default
    instead of about 10 s with one thread each."""
    return max(1, (os.cpu_count() or 1) // jobs)


def execute(runs: list[Run], out: Path, jobs: int) -> list[Run]:
    """Run every unfinished run whose inputs are ready, `jobs` at a time; returns the failed runs.

    Each run logs to {out}/logs/<variant>__<stage>[__seed<seed>].log; a failed run's dependents are skipped;
    {out}/timings.json collects the seconds of every finished run.
    """
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", str(threads_per_job(jobs)))  # the user's own value wins
    todo = []
    for run in runs:
        if run.command is None:
            continue
        if run.done:
            run.status = "done"
        else:
            todo.append(run)
    print(f"ablate: {len(todo)} runs to do, {sum(r.status == 'done' for r in runs)} already finished", flush=True)
    active: dict[int, tuple[Run, subprocess.Popen, float, Any]] = {}
    failed: list[Run] = []
    timings_path = out / "timings.json"  # seconds per finished run, kept across resumed calls
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    while todo or active:
        for run in list(todo):
            if any(n.status in ("failed", "skipped") for n in run.needs):
                run.status = "skipped"
                todo.remove(run)
                print(f"ablate: skip {run.name} (an input failed)", flush=True)
        ready = [r for r in todo if all(n.status in ("done", "given") for n in r.needs)]
        for run in ready[: jobs - len(active)]:
            todo.remove(run)
            log_path = out / "logs" / (run.name.replace("/", "__") + ".log")
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = log_path.open("w")
            print(f"ablate: start {run.name}: {shlex.join(run.command)}", flush=True)
            run.status = "running"
            process = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env=env)
            active[process.pid] = (run, process, time.time(), log)
        if not active:
            if todo:  # cannot happen with a plan in dependency order; never spin
                raise RuntimeError(f"ablate: no run is ready: {[r.name for r in todo]}")
            continue
        time.sleep(0.5)
        for pid, (run, process, start, log) in list(active.items()):
            if process.poll() is None:
                continue
            log.close()
            del active[pid]
            run.seconds = round(time.time() - start, 1)
            run.status = "done" if process.returncode == 0 and run.done else "failed"
            if run.status == "failed":
                failed.append(run)
            print(f"ablate: {run.status} {run.name} in {run.seconds} s (log: {log.name})", flush=True)
            if run.status == "done":
                timings[run.name] = run.seconds
                write_json(timings_path, timings)
    return failed


# ----------------------------------------------------------------------------------------------
# The table, the findings and the plot
# ----------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def table_rows(variants: list[Variant], runs: list[Run], seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per (detail, re-run stage, metric): the paired per-seed values of baseline and ablated runs."""
    by_key = {(r.variant, r.stage, r.seed): r for r in runs}
    cache: dict[int, dict[str, Any] | None] = {}

    def value(variant: str, stage: str, seed: int, key: str) -> float | None:
        run = by_key.get((variant, stage, None if stage == "data" else seed))
        if run is None:
            return None
        if id(run) not in cache:
            cache[id(run)] = run.metrics()
        metrics = cache[id(run)]
        found = None if metrics is None else metrics.get(key)
        return float(found) if isinstance(found, (int, float)) and not isinstance(found, bool) else None

    rows = []
    for v in variants:
        for stage in v.stages:
            for key in STAGE_METRICS[stage]:
                pairs = [(s, value("baseline", stage, s, key), value(v.detail.key, stage, s, key)) for s in seeds]
                pairs = [(s, b, a) for s, b, a in pairs if b is not None and a is not None]
                if not pairs:
                    continue
                baseline, ablated = _mean([b for _, b, _ in pairs]), _mean([a for _, _, a in pairs])
                rows.append({
                    "detail": v.detail.key, "number": v.detail.number, "args": shlex.join(v.args), "inverted": v.inverted,
                    "stage": stage, "metric": key, "baseline": baseline, "ablated": ablated, "delta": ablated - baseline,
                    "seeds": " ".join(str(s) for s, _, _ in pairs),
                    "baseline_per_seed": " ".join(repr(b) for _, b, _ in pairs),
                    "ablated_per_seed": " ".join(repr(a) for _, _, a in pairs),
                })
    return rows


def verdict(signed_delta: float, agreeing: int, seeds: int) -> str:
    """`yes`: the mean moved the expected way and so did every seed; `mixed`: the mean did, not every seed; `no`: the
    mean did not move the expected way (or did not move)."""
    if signed_delta <= 0:
        return "no"
    return "yes" if agreeing == seeds else "mixed"


def findings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's qualitative findings checked on the rows of their details (see `verdict`)."""
    out = []
    for finding in FINDINGS:
        checks = []
        for stage, metric, sign in finding.criteria:
            row = next((r for r in rows if r["detail"] == finding.detail and r["stage"] == stage and r["metric"] == metric), None)
            if row is None:
                continue
            base = [float(x) for x in row["baseline_per_seed"].split()]
            abl = [float(x) for x in row["ablated_per_seed"].split()]
            agreeing = sum((a - b) * sign > 0 for a, b in zip(abl, base, strict=True))
            checks.append({**row, "sign": sign, "agreeing": f"{agreeing}/{len(base)}",
                           "holds": verdict(row["delta"] * sign, agreeing, len(base))})
        if checks:
            out.append({"finding": finding, "checks": checks})
    return out


def baseline_policies(runs: list[Run]) -> list[dict[str, Any]]:
    """Per seed, the baseline SFT (evaluated by the PPO run before training), PPO and DPO policies on validation."""
    rows = []
    for run in runs:
        if run.variant != "baseline" or run.stage not in ("ppo", "dpo") or not run.done:
            continue
        m = run.metrics() or {}
        sources = [("SFT", "sft/validation"), ("PPO", "eval/validation")] if run.stage == "ppo" else [("DPO", "eval/validation")]
        for policy, prefix in sources:
            if f"{prefix}/score" in m or f"{prefix}/gold_win_rate" in m:
                rows.append({"seed": run.seed, "policy": policy, **{k: m.get(f"{prefix}/{k}", math.nan) for k in
                             ("score", "gold_win_rate", "gold_utility", "response_token_len", "eos_rate")}})
    return rows


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def markdown(args: Args, variants: list[Variant], rows: list[dict[str, Any]], runs: list[Run]) -> str:
    lines = [
        "# Ablations: one implementation detail switched at a time", "",
        f"Preset `{args.preset}`{' (--quick: smoke-run sizes, not results)' if args.quick else ''}, seeds {' '.join(map(str, args.seeds))}. "
        "Each row compares the baseline chain with the chain where the detail is switched: the detail's stage and every "
        "stage that trains on its output re-run, upstream runs shared. Values are means over the seeds where both runs "
        "finished; delta = ablated - baseline; per seed: baseline -> ablated. Metrics are those of each run's metrics.json "
        "(validation split, T 0.01; `last/val/eos_rate` is the last update's rollouts; `first/last/loss/value_avg` the critic's "
        "value loss at the first and last update), except `derived/validation/stop_rate`: the share of validation responses "
        "that produced an EOS, read from the run's validation table (`has_eos` or fewer kept tokens than sampled), because "
        "`eos_rate` cannot see an EOS that is also the pad token.", "",
    ]
    inverted = [v for v in variants if v.inverted]
    for v in inverted:
        lines.append(f"- `{v.detail.key}`: the {args.preset} preset already runs the registry's ablation "
                     f"`{shlex.join(v.detail.ablation or ())}`, so the switched run uses the paper's value `{shlex.join(v.args)}` "
                     "and the baseline column is the ablated setting.")
    if inverted:
        lines.append("")
    checked = findings(rows)
    policies = baseline_policies(runs)
    if checked or policies:
        lines += ["## The paper's findings at this scale", "",
                  "Holds: `yes` when the mean and every seed moved the expected way, `mixed` when the mean did but not every "
                  "seed, `no` otherwise. Two seeds and a few hundred evaluation samples: small deltas are noise.", "",
                  "| finding | detail | metric | expected | baseline | ablated | delta | seeds agreeing | holds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for f in checked:
            for c in f["checks"]:
                lines.append(f"| {f['finding'].claim} | {f['finding'].detail} | {c['stage']}: `{c['metric']}` | "
                             f"{'lower' if c['sign'] < 0 else 'higher'} | {_fmt(c['baseline'])} | {_fmt(c['ablated'])} | "
                             f"{_fmt(c['delta'])} | {c['agreeing']} | {c['holds']} |")
        ppo = [r for r in policies if r["policy"] == "PPO"]
        sft = [r for r in policies if r["policy"] == "SFT"]
        if ppo and sft:
            p, s = _mean([r["gold_win_rate"] for r in ppo]), _mean([r["gold_win_rate"] for r in sft])
            agreeing = sum(a["gold_win_rate"] > b["gold_win_rate"] for a, b in zip(ppo, sft, strict=True))
            lines.append(f"| PPO beats SFT on win rate (baseline chain) | - | `gold_win_rate` | PPO higher | SFT {_fmt(s)} | "
                         f"PPO {_fmt(p)} | {_fmt(p - s)} | {agreeing}/{len(ppo)} | {verdict(p - s, agreeing, len(ppo))} |")
        lines.append("")
    if policies:
        lines += ["## Baseline policies (validation, T 0.01)", "",
                  "| seed | policy | RM score | gold win rate | gold utility | tokens | EOS rate |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['policy']} | {_fmt(r['score'])} | {_fmt(r['gold_win_rate'])} | {_fmt(r['gold_utility'])} | "
                  f"{_fmt(r['response_token_len'])} | {_fmt(r['eos_rate'])} |" for r in policies]
        lines.append("")
    lines += ["## Every detail", "", "| detail | # | switched with | metric | baseline | ablated | delta | per seed |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{s}: {_fmt(float(b))} -> {_fmt(float(a))}" for s, b, a in
                             zip(r["seeds"].split(), r["baseline_per_seed"].split(), r["ablated_per_seed"].split(), strict=True))
        args_text = f"`{r['args']}`" + (" (inverted)" if r["inverted"] else "")
        lines.append(f"| {r['detail']} | {r['number']} | {args_text} | {r['stage']}: `{r['metric']}` | {_fmt(r['baseline'])} | "
                     f"{_fmt(r['ablated'])} | {_fmt(r['delta'])} | {per_seed} |")
    missing = [v.detail.key for v in variants if not any(r["detail"] == v.detail.key for r in rows)]
    if missing:
        lines += ["", f"Not finished (no paired runs yet): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per detail: each metric's delta per seed (points) and its mean (bar), on a symmetric log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    details = list(dict.fromkeys(r["detail"] for r in rows))
    cols = min(3, max(1, len(details)))
    nrows = max(1, math.ceil(len(details) / cols))
    heights = [max(len([r for r in rows if r["detail"] == d]) for d in details[i * cols:(i + 1) * cols]) for i in range(nrows)] or [1]
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, sum(0.32 * h + 1.2 for h in heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, detail in zip(axes.flat, details, strict=False):
        mine = [r for r in rows if r["detail"] == detail]
        labels = [f"{r['stage']}: {r['metric']}" for r in mine]
        ys = range(len(mine))
        ax.barh(list(ys), [r["delta"] for r in mine], color="#9ecae1", height=0.6)
        for y, r in zip(ys, mine, strict=True):
            deltas = [float(a) - float(b) for a, b in zip(r["ablated_per_seed"].split(), r["baseline_per_seed"].split(), strict=True)]
            ax.scatter(deltas, [y] * len(deltas), color="#08519c", s=14, zorder=3)
        ax.set_yticks(list(ys), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xscale("symlog", linthresh=0.01)
        reach = max([abs(r["delta"]) for r in mine] + [abs(float(a) - float(b)) for r in mine for a, b in
                     zip(r["ablated_per_seed"].split(), r["baseline_per_seed"].split(), strict=True)] + [0.01])
        ax.set_xlim(-3 * reach, 3 * reach)  # symmetric, with room for the outermost points
        number = mine[0]["number"]
        ax.set_title(f"{detail} (Detail {number}): {mine[0]['args']}" + (" [inverted]" if mine[0]["inverted"] else ""), fontsize=8)
        ax.set_xlabel("ablated - baseline (symlog; points: seeds, bar: mean)", fontsize=7)
    for ax in list(axes.flat)[len(details):]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(args: Args, variants: list[Variant], runs: list[Run]) -> list[dict[str, Any]]:
    """ablation.csv, ablation.md, ablation.png (atomically) and the plan as plan.json; returns the rows."""
    import pandas as pd

    out = Path(args.out_dir)
    rows = table_rows(variants, runs, args.seeds)
    columns = ["detail", "number", "args", "inverted", "stage", "metric", "baseline", "ablated", "delta", "seeds",
               "baseline_per_seed", "ablated_per_seed"]
    write_text(out / "ablation.csv", pd.DataFrame(rows, columns=columns).to_csv(index=False))
    write_text(out / "ablation.md", markdown(args, variants, rows, runs))
    if rows:
        plot(rows, out / "ablation.png")
    write_json(out / "plan.json", {
        "args": dataclasses.asdict(args),
        "runs": [{"name": r.name, "path": str(r.path), "status": r.status, "seconds": r.seconds, "command": r.command} for r in runs],
    })
    return rows


def main(args: Args) -> list[dict[str, Any]]:
    if args.list_details:
        for d in ablatable():
            print(f"{d.key:24} {d.number:5} {d.stage:7} {shlex.join(d.ablation or ()):40} {d.title}")
        return []
    variants, runs = Planner(args).plan()
    if args.dry_run:
        for run in runs:
            if run.command is not None:
                print(shlex.join(run.command) + ("  # done" if run.done else ""))
        return []
    failed = execute(runs, Path(args.out_dir), args.jobs)
    rows = write_outputs(args, variants, runs)
    print(f"ablate: {len(rows)} rows -> {args.out_dir}/ablation.md, ablation.csv, ablation.png", flush=True)
    if failed:
        names = ", ".join(f"{r.name} ({args.out_dir}/logs/{r.name.replace('/', '__')}.log)" for r in failed)
        raise SystemExit(f"ablate: {len(failed)} runs failed: {names}")
    return rows


if __name__ == "__main__":
    import tyro

    run_main(main, tyro.cli(Args, description=__doc__.splitlines()[0], use_underscores=True))
