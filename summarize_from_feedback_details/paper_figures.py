"""Paper figures (SPEC "Figures to reproduce"): one function and one `--figure` choice per figure, reading a
sweep directory and writing PNG + PDF.

    python -m summarize_from_feedback_details.paper_figures --sweep_dir sweeps/embedded              # all figures
    python -m summarize_from_feedback_details.paper_figures --sweep_dir sweeps/pythia --figure win_rate_vs_size \\
        --judge llm --judge_model gpt-3.5-turbo-0125
    python -m summarize_from_feedback_details.paper_figures --figure dataset --dataset_dir datasets/embedded
    scripts/reproduce_figures.sh SWEEP_DIR [OUT_DIR]                                                # the same, all

The sweep layout (scripts/sweep.sh writes it):
    {sweep_dir}/{size}/seed{seed}/{sft,reward,ppo,dpo}/   stage run directories (metrics.json, args.json,
                                                          tensorboard/, query_responses_*, eval_comparisons.csv)
    {sweep_dir}/{size}/seed{seed}/judge/                  outputs of `python -m ...judge` (any file names, any
                                                          sub-folders: each `*.summary.json` names the table it judged)
`{size}` is a directory name: the last path component of the model id (`size_dir_name`), e.g. `pythia-1b-deduped`,
`1b` or `tiny-pythia-s`. Sizes are ordered by the parameter count of the SFT model's config.json (the name is a
fallback). Any other stage directory holding `query_responses_{split}` tables (e.g. `ppo_whiten_rewards`) is one
more policy. Seeds are drawn as individual points, their mean as a line.

Win rates come from one judge, `--judge`: `llm` (judge.py with an LLM), `gold` (judge.py --judge gold: the
embedded task's gold utility), `reward_model` (judge.py --judge reward_model: a "gold" RM), or `table` (the
`gold_win` column the stages write on the embedded task, the same utility without running judge.py); `auto`
takes the first of llm, gold, reward_model, table that the sweep holds.

Length-controlled win rate (figure 8) follows SPEC's definition: the win rate within bins of
log(response length / reference length), both in tokens of the run's tokenizer (EOS included, as the stages count
response_token_len), pooled over seeds; not the paper's alternative logistic regression of win on length.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from summarize_from_feedback_details.core import UserInputError, run_main
from summarize_from_feedback_details.judge import read_table, win_rate

FigureName = Literal[
    "all", "win_rate_vs_size", "win_rate_vs_length", "rouge_vs_size", "rm_accuracy", "rm_vs_dpo_accuracy",
    "rm_calibration", "rm_judge_agreement", "length_controlled_win_rate", "ppo_training_curves", "rloo_training_curves", "dataset",
]
JudgeChoice = Literal["auto", "llm", "gold", "reward_model", "table"]
JUDGE_ORDER = ("llm", "gold", "reward_model", "table")
"""`--judge auto` takes the first of these the sweep holds"""
POLICY_LABELS = {"base": "base model", "sft": "SFT", "ppo": "PPO", "rloo": "RLOO", "grpo": "GRPO", "dpo": "DPO"}
POLICY_COLORS = {"base": "tab:gray", "sft": "tab:blue", "ppo": "tab:orange", "rloo": "crimson", "grpo": "darkviolet", "dpo": "tab:green"}
EXTRA_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
SIZE_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
SEED_LINESTYLES = ("-", "--", ":", "-.")
PPO_CURVES = (
    ("objective/scores", "RM score of rollouts"),
    ("objective/validation_score", "RM score, validation (T 0.01)"),
    ("objective/kl", "KL to SFT (nats, sum over tokens)"),
    ("val/response_token_len", "rollout response length (tokens)"),
)
# Paper values (SPEC): for Pythia sweeps they are drawn as grey crosses next to ours.
PAPER_ROUGE_L = {"1b": 0.247, "2.8b": 0.258, "6.9b": 0.263}
PAPER_RM_ACCURACY = {"1b": 0.628, "2.8b": 0.669, "6.9b": 0.689}
PAPER_RM_ACCURACY_CNNDM = {"1b": 0.627, "2.8b": 0.665, "6.9b": 0.686}
PAPER_RM_JUDGE_AGREEMENT = {"1b": 0.40, "2.8b": 0.73, "6.9b": 0.77}
OPENAI_1_3B_PARAMS = 1.3e9
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    sweep_dir: str | None = None
    """the sweep: {sweep_dir}/{size}/seed{seed}/{sft,reward,ppo,dpo,judge}/ (scripts/sweep.sh); only `--figure dataset` works without it"""
    out_dir: str | None = None
    """where the PNG and PDF files go; None: {sweep_dir}/figures (dataset only: {dataset_dir}/figures)"""
    figure: tuple[FigureName, ...] = ("all",)
    """figures to draw; `all` draws every figure whose inputs the sweep holds and names the ones it skips"""
    judge: JudgeChoice = "auto"
    """whose verdicts the win rates use: llm | gold | reward_model (judge.py outputs) | table (the stages' gold_win column)"""
    judge_model: str | None = None
    """with several LLM judges in the sweep: the judge model to use (e.g. gpt-3.5-turbo-0125)"""
    judge_protocol: Literal["both-orders", "paper"] | None = None
    """with both LLM protocols in the sweep: the one to use"""
    split: Literal["validation", "test"] = "validation"
    """the split of the query_responses tables and of the judged tables"""
    dataset_dir: str | None = None
    """figure 10: the data stage's output directory; None: the `dataset` of the first cell's sft/args.json"""
    openai_win_rate: float | None = 0.70
    """figure 1: the OpenAI 1.3B PPO star (paper's GPT-3.5 plot, ~0.70); drawn only with an LLM judge and sizes of 100M+ parameters; None: no star"""
    calibration_bin_width: float = 0.5
    """figure 6: width of the |reward difference| bins"""
    calibration_max_margin: float = 4.0
    """figure 6: the last bin holds every |reward difference| above this"""
    length_bin_edges: tuple[float, ...] = (-0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75)
    """figure 8: inner edges of the log(response / reference length) bins; the outer bins are open"""
    min_bin_count: int = 5
    """figures 6 and 8: bins with fewer pairs are not drawn"""
    dpi: int = 150
    """PNG resolution"""


@dataclass(frozen=True)
class Size:
    """A model size of the sweep: its directory name and parameter count."""

    name: str
    params: int

    @property
    def label(self) -> str:
        return f"{self.name}\n({human_count(self.params)})"

    @property
    def pythia_key(self) -> str | None:
        """`1b`, `2.8b`, ... for Pythia names (`1b`, `pythia-1b`, `pythia-1b-deduped`), to match the paper's values."""
        match = re.fullmatch(r"(?:pythia-)?(\d+(?:\.\d+)?[mb])(?:-deduped)?", self.name.lower())
        return match.group(1) if match else None


@dataclass(frozen=True)
class Cell:
    """One (size, seed) directory of the sweep."""

    size: Size
    seed: int
    path: Path

    def stage(self, name: str) -> Path:
        return self.path / name


@dataclass
class Sweep:
    root: Path
    cells: list[Cell]

    @property
    def sizes(self) -> list[Size]:
        return sorted({cell.size for cell in self.cells}, key=lambda s: (s.params, s.name))

    @property
    def seeds(self) -> list[int]:
        return sorted({cell.seed for cell in self.cells})


@dataclass
class FigureResult:
    """What a figure function drew: the files and the plotted values (a DataFrame, or a dict of them)."""

    name: str
    paths: list[Path]
    data: Any
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Reading the sweep
# ----------------------------------------------------------------------------------------------
def size_dir_name(model: str) -> str:
    """The sweep directory of a model id or path: its last path component
    (`EleutherAI/pythia-1b-deduped` -> `pythia-1b-deduped`, `assets/embedded/models/tiny-pythia-s` -> `tiny-pythia-s`)."""
    name = model.rstrip("/").split("/")[-1]
    if not name:
        raise UserInputError(f"model id {model!r} has no name to use as a sweep directory")
    return name


def human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def local_path(path: str) -> Path | None:
    """A path written in a run's args.json: as given (relative to the working directory), else relative to the
    repository root (scripts/sweep.sh runs the stages from there); None when neither exists."""
    for candidate in (Path(path), REPO / path):
        if candidate.exists():
            return candidate
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as error:
        raise UserInputError(f"{path} is not valid json ({error}); rerun the stage that wrote it") from error


_PARAMS_CACHE: dict[str, int] = {}


def _safetensors_count(files: Sequence[Path]) -> int:
    """Elements of every tensor in the safetensors files, read from their json headers (no weights loaded)."""
    total = 0
    for file in files:
        with open(file, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total


def count_parameters(model_dir: Path) -> int:
    """Exact parameter count of a saved causal LM: from the headers of its safetensors weights when present,
    else by building the model of its config.json on the meta device (nothing allocated)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if (model_dir / "model.safetensors").is_file():
        return _safetensors_count([model_dir / "model.safetensors"])
    if index.is_file():
        shards = sorted({model_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
        if all(shard.is_file() for shard in shards):
            return _safetensors_count(shards)
    key = (model_dir / "config.json").read_text()
    if key not in _PARAMS_CACHE:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        _PARAMS_CACHE[key] = sum(p.numel() for p in model.parameters())
    return _PARAMS_CACHE[key]


def _params_from_name(name: str) -> int | None:
    match = re.search(r"(\d+(?:\.\d+)?)([mb])(?![a-z])", name.lower())
    return int(float(match.group(1)) * (1e9 if match.group(2) == "b" else 1e6)) if match else None


def size_parameters(size_name: str, cell_dirs: Sequence[Path]) -> int:
    """Parameter count of a size: from the config.json of the SFT model a cell saved (or its base model's, as
    named in sft/args.json when that path exists here), else from a count in the name (`1b`, `2.8b`, `410m`)."""
    candidates: list[Path] = []
    for cell in cell_dirs:
        candidates += [cell / stage / "model" for stage in ("sft", "ppo", "rloo", "dpo")]
        args = _read_json(cell / "sft" / "args.json") or {}
        if args.get("base_model") and (base := local_path(args["base_model"])):
            candidates.append(base)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return count_parameters(candidate)
    params = _params_from_name(size_name)
    if params is None:
        raise UserInputError(
            f"cannot tell the size of '{size_name}': no sft/model/config.json in its cells and no parameter count "
            "like '1b' in the name; keep the SFT model (or its config.json) in the sweep"
        )
    return params


def load_sweep(sweep_dir: str | Path) -> Sweep:
    """The cells `{sweep_dir}/{size}/seed{seed}/`, sizes ordered by parameter count, then seeds."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise UserInputError(f"--sweep_dir {sweep_dir!r} does not exist; run scripts/sweep.sh (or pass its --sweep_dir)")
    by_size: dict[str, list[tuple[int, Path]]] = {}
    for size_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for seed_dir in sorted(p for p in size_dir.iterdir() if p.is_dir()):
            match = re.fullmatch(r"seed(\d+)", seed_dir.name)
            if match:
                by_size.setdefault(size_dir.name, []).append((int(match.group(1)), seed_dir))
    if not by_size:
        raise UserInputError(
            f"--sweep_dir {sweep_dir!r} holds no {{size}}/seed{{seed}}/ directories; pass the directory scripts/sweep.sh wrote"
        )
    cells = []
    for name, seeds in by_size.items():
        size = Size(name, size_parameters(name, [path for _, path in seeds]))
        cells += [Cell(size, seed, path) for seed, path in seeds]
    cells.sort(key=lambda c: (c.size.params, c.size.name, c.seed))
    return Sweep(root, cells)


def _as_sweep(sweep: Sweep | str | Path) -> Sweep:
    return sweep if isinstance(sweep, Sweep) else load_sweep(sweep)


def stage_metrics(cell: Cell, stage: str) -> dict[str, Any] | None:
    return _read_json(cell.stage(stage) / "metrics.json")


def metric_rows(sweep: Sweep, stage: str, series: dict[str, str]) -> Any:
    """One row per (cell, series) whose `series[name]` key is in the cell's `{stage}/metrics.json`."""
    import pandas as pd

    rows = []
    for cell in sweep.cells:
        metrics = stage_metrics(cell, stage)
        for name, key in series.items():
            if metrics is not None and metrics.get(key) is not None:
                rows.append({"size": cell.size.name, "params": cell.size.params, "seed": cell.seed, "series": name,
                             "value": float(metrics[key])})
    if not rows:
        raise UserInputError(
            f"no {stage}/metrics.json with {sorted(set(series.values()))} in the cells of {sweep.root}; "
            f"run the {stage} stage of the sweep (scripts/sweep.sh --stages {stage})"
        )
    return pd.DataFrame(rows)


SUMMARY_METRICS = {
    "SFT ROUGE-L": ("sft", "eval/validation/rougeL"),
    "SFT tokens": ("sft", "eval/validation/response_token_len"),
    "RM acc TL;DR": ("reward", "eval/accuracy/split/validation"),
    "RM acc CNN/DM": ("reward", "eval/accuracy/split/validation_cnndm"),
    "DPO acc TL;DR": ("dpo", "eval/accuracy/split/validation"),
    "PPO RM score": ("ppo", "eval/validation/score"),
    "PPO final KL": ("ppo", "last/objective/kl"),
    "PPO tokens": ("ppo", "eval/validation/response_token_len"),
    "RLOO RM score": ("rloo", "eval/validation/score"),
    "RLOO final KL": ("rloo", "last/objective/kl"),
    "RLOO tokens": ("rloo", "eval/validation/response_token_len"),
    "DPO tokens": ("dpo", "eval/validation/response_token_len"),
}
"""the headline numbers of each cell (validation split): column -> (stage, metrics.json key)"""


def metrics_table(sweep: Sweep | str | Path) -> Any:
    """One row per cell with the headline metrics of SUMMARY_METRICS (NaN where a stage has not run)."""
    import pandas as pd

    sweep = _as_sweep(sweep)
    rows = []
    for cell in sweep.cells:
        row: dict[str, Any] = {"size": cell.size.name, "params": cell.size.params, "seed": cell.seed}
        for column_name, (stage, key) in SUMMARY_METRICS.items():
            value = (stage_metrics(cell, stage) or {}).get(key)
            row[column_name] = float(value) if value is not None else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _table_path(stem: Path) -> Path | None:
    for suffix in (".parquet", ".csv"):
        path = stem.with_name(stem.name + suffix)
        if path.is_file():
            return path
    return None


def policy_tables(cell: Cell, split: str) -> dict[str, Path]:
    """The policies' `query_responses` tables of a cell: SFT (sft/eval_query_responses, else the
    sft_query_responses a PPO/DPO run wrote with --eval_before_training) and every other stage directory's own."""
    tables: dict[str, Path] = {}
    for stem in (cell.stage("sft") / f"eval_query_responses_{split}", cell.stage("ppo") / f"sft_query_responses_{split}",
                 cell.stage("dpo") / f"sft_query_responses_{split}"):
        if "sft" not in tables and (path := _table_path(stem)):
            tables["sft"] = path
    if cell.path.is_dir():
        for stage in sorted(p for p in cell.path.iterdir() if p.is_dir() and p.name not in ("sft", "reward", "judge")):
            if path := _table_path(stage / f"query_responses_{split}"):
                tables[stage.name] = path
    return tables


def policy_of_table(table: str, split: str) -> tuple[str, int] | None:
    """(policy, source priority) of a judged table's path: `{stage}/query_responses_{split}` is that stage's policy,
    `eval_` (sft/) and `sft_` (ppo/, dpo/) tables are SFT, `base_` the base model; other splits: None."""
    path = Path(table)
    stem = path.stem
    if stem == f"query_responses_{split}":
        return path.parent.name, 0
    for prefix, policy, priority in (("eval_", "sft", 0), ("sft_", "sft", 1), ("base_", "base", 0)):
        if stem == f"{prefix}query_responses_{split}":
            return policy, priority
    return None


def policy_label(policy: str, cell_or_args: dict[str, Any] | None = None) -> str:
    if (cell_or_args or {}).get("baseline") == "grpo":  # rloo.py --baseline grpo
        return "GRPO"
    if policy in POLICY_LABELS:
        return POLICY_LABELS[policy]
    if (cell_or_args or {}).get("whiten_rewards") is True and policy.startswith("ppo"):
        return "PPO + reward whitening"
    return policy


def policy_color(policy: str, policies: Sequence[str]) -> str:
    if policy in POLICY_COLORS:
        return POLICY_COLORS[policy]
    extras = [p for p in policies if p not in POLICY_COLORS]
    return EXTRA_COLORS[extras.index(policy) % len(EXTRA_COLORS)] if policy in extras else "black"


def policy_order(policies: Iterable[str]) -> list[str]:
    known = ["base", "sft", "ppo", "rloo", "grpo", "dpo"]
    policies = set(policies)
    return [p for p in known if p in policies] + sorted(p for p in policies if p not in known)


# ----------------------------------------------------------------------------------------------
# Judges: which verdicts the win rates use
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdicts:
    """One policy's verdicts against the references in one cell, from one judge."""

    cell: Cell
    policy: str
    kind: str
    """llm | gold | reward_model | table"""
    model: str | None
    protocol: str | None
    table: Path
    """the judged table (for `table`: the stage's own query_responses table)"""
    summary: dict[str, Any]
    priority: int = 0

    @property
    def config(self) -> tuple[str, str | None, str | None]:
        return self.kind, self.model, self.protocol

    def outcomes(self) -> Any:
        """The judged rows with a float `win` column (1 win, 0.5 tie, 0 loss, NaN not counted)."""
        table = read_table(str(self.table), "judged table")
        if self.kind == "table":
            table = table.assign(win=table["gold_win"])
        table["win"] = table["win"].astype(float)
        return table

    def win_rate(self) -> dict[str, Any]:
        if self.kind == "table":
            result = win_rate(list(self.outcomes()["win"]))
            return result.as_dict() if result else {"win_rate": None, "ci_low": None, "ci_high": None, "n": 0}
        return {key: self.summary.get(key) for key in ("win_rate", "ci_low", "ci_high", "n")}


def judge_label(kind: str, model: str | None = None, protocol: str | None = None) -> str:
    if kind == "llm":
        return f"LLM judge {model} ({protocol})"
    if kind == "gold":
        return "gold utility of the embedded task (judge.py --judge gold)"
    if kind == "reward_model":
        path = Path(model or "?")
        name = path.parent.name if path.name == "model" else path.name  # the run's name, not its model/ folder
        return f"gold reward model {name} (judge.py --judge reward_model)"
    return "gold utility of the embedded task (the stages' gold_win column)"


def cell_verdicts(cell: Cell, split: str) -> list[Verdicts]:
    """Every verdict set of a cell against the references: judge.py summaries under {cell}/judge/ (their `table`
    field names the policy) and, where the stage tables carry `gold_win`, the `table` judge."""
    found: list[Verdicts] = []
    judge_dir = cell.stage("judge")
    for summary_path in sorted(judge_dir.rglob("*.summary.json")) if judge_dir.is_dir() else []:
        summary = _read_json(summary_path) or {}
        if summary.get("baseline", "reference") != "reference" or not summary.get("table"):
            continue  # policy vs policy tables are not win rates against the references
        policy = policy_of_table(str(summary["table"]), split)
        table = _table_path(summary_path.with_name(summary_path.name[: -len(".summary.json")]))
        if policy is None or table is None or summary.get("judge") not in JUDGE_ORDER:
            continue
        kind = summary["judge"]
        found.append(Verdicts(cell, policy[0], kind, summary.get("model"), summary.get("protocol") if kind == "llm" else None,
                              table, summary, policy[1]))
    for policy, table in policy_tables(cell, split).items():
        if "gold_win" in _columns(table):
            found.append(Verdicts(cell, policy, "table", None, None, table, {}, 0))
    return found


def _columns(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open(path, encoding="utf-8") as file:
        import csv

        return next(csv.reader(file), [])


@dataclass
class JudgeSelection:
    kind: str
    label: str
    verdicts: dict[tuple[Cell, str], Verdicts]


def select_judge(sweep: Sweep, judge: JudgeChoice = "auto", split: str = "validation", model: str | None = None,
                 protocol: str | None = None) -> JudgeSelection:
    """The verdicts of one judge for every (cell, policy) that has them. With several configurations of that
    judge (two LLMs, two protocols) the caller must pick one (`--judge_model`, `--judge_protocol`)."""
    everything = [v for cell in sweep.cells for v in cell_verdicts(cell, split)]
    kinds = JUDGE_ORDER if judge == "auto" else (judge,)
    for kind in kinds:
        chosen = [v for v in everything if v.kind == kind and (model is None or v.model == model)
                  and (protocol is None or v.protocol == protocol)]
        if not chosen:
            continue
        configs = sorted({v.config for v in chosen}, key=str)
        if len(configs) > 1:
            raise UserInputError(
                f"the sweep holds several {kind} judges: {[c[1:] for c in configs]}; pick one with --judge_model "
                "and/or --judge_protocol"
            )
        best: dict[tuple[Cell, str], Verdicts] = {}
        for v in sorted(chosen, key=lambda v: (v.priority, str(v.table))):
            best.setdefault((v.cell, v.policy), v)
        return JudgeSelection(kind, judge_label(*configs[0]), best)
    found = sorted({v.config for v in everything}, key=str)
    raise UserInputError(
        f"no {'judge' if judge == 'auto' else judge + ' judge'} verdicts for the {split} split in {sweep.root}"
        f"{' matching --judge_model/--judge_protocol' if (model or protocol) else ''} (found: {found or 'none'}); run "
        "`python -m summarize_from_feedback_details.judge --table {cell}/{stage}/query_responses_" + split + ".parquet "
        "--output_dir {cell}/judge/{stage}` for each cell"
    )


# ----------------------------------------------------------------------------------------------
# Drawing helpers
# ----------------------------------------------------------------------------------------------
def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.4, share: bool = False) -> tuple[Any, Any]:
    """A matplotlib Figure without pyplot (no global state, no backend switch: safe in notebooks and threads)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=share, sharey=share)
    return fig, axes


def save_figure(fig: Any, out_dir: str | Path, name: str, dpi: int = 150) -> list[Path]:
    """Write `name`.png and `name`.pdf into `out_dir`, each to a temporary file renamed into place."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in ("png", "pdf"):
        final = out / f"{name}.{fmt}"
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            fig.savefig(tmp, format=fmt, dpi=dpi)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(final)
    return paths


def _size_axis(ax: Any, sizes: Sequence[Size]) -> None:
    ax.set_xscale("log")
    ax.set_xticks([s.params for s in sizes], labels=[s.label for s in sizes])
    ax.minorticks_off()
    low, high = min(s.params for s in sizes), max(s.params for s in sizes)
    ax.set_xlim(low / 1.6, high * 1.6)
    ax.set_xlabel("model size (parameters, log scale)")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _scaling_series(ax: Any, data: Any, series: Sequence[str], colors: dict[str, str], labels: dict[str, str],
                    spread: float = 0.035, errorbars: bool = False, linestyles: dict[str, str] | None = None) -> Any:
    """Per series: every seed as a small dot, the mean over seeds as a line (± std with `errorbars`). Series are
    shifted sideways by a few hundredths of a decade so their seeds do not hide each other. Returns the means."""
    import pandas as pd

    means = []
    for k, name in enumerate(series):
        d = data[data["series"] == name]
        if d.empty:
            continue
        shift = 10 ** ((k - (len(series) - 1) / 2) * spread)
        ax.scatter(d["params"] * shift, d["value"], color=colors[name], alpha=0.5, s=18, edgecolors="none", zorder=3)
        g = d.groupby("params", sort=True)["value"]
        m = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=0), "seeds": g.size()}).reset_index()
        style = (linestyles or {}).get(name, "-")
        if errorbars:
            ax.errorbar(m["params"] * shift, m["mean"], yerr=m["std"], color=colors[name], marker="o", ms=6, capsize=3,
                        linestyle=style, label=labels[name], zorder=4)
        else:
            ax.plot(m["params"] * shift, m["mean"], color=colors[name], marker="o", ms=6, linestyle=style,
                    label=labels[name], zorder=4)
        means.append(m.assign(series=name))
    return pd.concat(means, ignore_index=True) if means else pd.DataFrame()


def _paper_marks(ax: Any, sizes: Sequence[Size], values: dict[str, float], label: str, color: str = "dimgray",
                 shift: float = 1.0) -> bool:
    """Crosses at the paper's values for the Pythia sizes of the sweep (x times `shift`, to sit next to the series
    they belong to); True when any was drawn."""
    points = [(s.params * shift, values[s.pythia_key]) for s in sizes if s.pythia_key in values]
    if points:
        ax.scatter(*zip(*points, strict=True), marker="x", s=70, linewidths=2, color=color, zorder=5, label=label)
    return bool(points)


def _seed_handle(ax: Any, mean: bool = True) -> None:
    """Legend entries explaining the small dots (seeds) and the big markers (their mean)."""
    ax.scatter([], [], s=18, color="gray", alpha=0.6, edgecolors="none", label="small dots: one seed each")
    if mean:
        ax.plot([], [], color="gray", marker="o", ms=6, label="big markers + line: mean over seeds")


# ----------------------------------------------------------------------------------------------
# Figures 1-2: win rates
# ----------------------------------------------------------------------------------------------
def win_rate_data(sweep: Sweep, selection: JudgeSelection, split: str = "validation") -> Any:
    """One row per (cell, policy): the judge's win rate against the references with its 95% Wilson interval and
    the mean response length (tokens, EOS included) of the summaries it judged."""
    import pandas as pd

    rows = []
    for (cell, policy), verdicts in selection.verdicts.items():
        if policy == "base":
            continue
        result = verdicts.win_rate()
        if result["win_rate"] is None:
            continue
        table = verdicts.outcomes()
        if "response_token_len" not in table:
            table = read_table(str(policy_tables(cell, split)[policy]), "policy table")
        args = _read_json(cell.stage(policy) / "args.json") if policy != "sft" else None
        rows.append({"size": cell.size.name, "params": cell.size.params, "seed": cell.seed, "policy": policy,
                     "label": policy_label(policy, args), **result,
                     "response_token_len": float(table["response_token_len"].mean())})
    if not rows:
        raise UserInputError(f"no win rate against the references in {sweep.root} ({selection.label})")
    data = pd.DataFrame(rows)
    order = {p: i for i, p in enumerate(policy_order(data["policy"]))}
    return data.sort_values(["policy", "params", "seed"], key=lambda c: c.map(order) if c.name == "policy" else c,
                            ignore_index=True)


def win_rate_vs_size(sweep: Sweep | str | Path, out_dir: str | Path, judge: JudgeChoice = "auto", split: str = "validation",
                     judge_model: str | None = None, judge_protocol: str | None = None,
                     openai_win_rate: float | None = 0.70, dpi: int = 150) -> FigureResult:
    """Figure 1: win rate against the reference summaries vs model size (log x): every seed a dot, the mean a
    line, per policy (SFT, PPO, DPO, PPO variants); a dashed 0.5 line for the references; a star for OpenAI's
    1.3B PPO model (with an LLM judge only: the number comes from the paper's GPT-3.5 plot)."""
    sweep = _as_sweep(sweep)
    selection = select_judge(sweep, judge, split, judge_model, judge_protocol)
    data = win_rate_data(sweep, selection, split)
    policies = policy_order(data["policy"])
    plot = data.rename(columns={"policy": "series", "win_rate": "value"})
    labels = dict(zip(data["policy"], data["label"], strict=True))
    fig, axes = new_figure(width=8.4)  # room for the legend on the right
    ax = axes[0, 0]
    _scaling_series(ax, plot, policies, {p: policy_color(p, policies) for p in policies}, labels)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="reference summaries (0.5)")
    sizes = sweep.sizes
    # The star is a GPT-3.5 verdict on a 1.3B model: only next to LLM-judged models of a comparable scale.
    star = openai_win_rate is not None and selection.kind == "llm" and max(s.params for s in sweep.sizes) >= 1e8
    if star:
        ax.scatter([OPENAI_1_3B_PARAMS], [openai_win_rate], marker="*", s=260, color="gold", edgecolors="black",
                   zorder=6, label=f"OpenAI 1.3B PPO (paper, {openai_win_rate:.2f})")
    _size_axis(ax, sizes)
    if star:  # the legend names the star: a tick label of its own would collide with a 1B size's
        low, high = ax.get_xlim()
        ax.set_xlim(min(low, OPENAI_1_3B_PARAMS / 1.6), max(high, OPENAI_1_3B_PARAMS * 1.6))
    _seed_handle(ax)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(f"win rate against the reference ({split})")
    fig.suptitle(f"Win rate vs model size\njudge: {selection.label}", fontsize=10)  # wider than the axes
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
    ax.grid(alpha=0.3)
    return FigureResult("win_rate_vs_size", save_figure(fig, out_dir, "win_rate_vs_size", dpi), data,
                        [f"judge: {selection.label}"] + (["with the OpenAI 1.3B star"] if star else []))


def win_rate_vs_length(sweep: Sweep | str | Path, out_dir: str | Path, judge: JudgeChoice = "auto", split: str = "validation",
                       judge_model: str | None = None, judge_protocol: str | None = None, dpi: int = 150) -> FigureResult:
    """Figure 2: the same win rates against the mean response length (tokens, EOS included): colour = policy,
    marker = size; small markers are seeds, large edged markers the mean over seeds."""
    sweep = _as_sweep(sweep)
    selection = select_judge(sweep, judge, split, judge_model, judge_protocol)
    data = win_rate_data(sweep, selection, split)
    policies = policy_order(data["policy"])
    sizes = [s for s in sweep.sizes if s.name in set(data["size"])]
    fig, axes = new_figure(width=8.4)  # room for the legend on the right
    ax = axes[0, 0]
    for policy in policies:
        color = policy_color(policy, policies)
        for k, size in enumerate(sizes):
            d = data[(data["policy"] == policy) & (data["size"] == size.name)]
            if d.empty:
                continue
            marker = SIZE_MARKERS[k % len(SIZE_MARKERS)]
            ax.scatter(d["response_token_len"], d["win_rate"], color=color, marker=marker, s=22, alpha=0.5, edgecolors="none")
            ax.scatter([d["response_token_len"].mean()], [d["win_rate"].mean()], color=color, marker=marker, s=90,
                       edgecolors="black", linewidths=0.8, zorder=4)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    from matplotlib.lines import Line2D

    labels = dict(zip(data["policy"], data["label"], strict=True))
    handles = [Line2D([], [], color=policy_color(p, policies), marker="o", linestyle="", label=labels[p]) for p in policies]
    handles += [Line2D([], [], color="black", marker=SIZE_MARKERS[k % len(SIZE_MARKERS)], linestyle="", markerfacecolor="white",
                       label=s.name) for k, s in enumerate(sizes)]
    handles += [Line2D([], [], color="gray", linestyle="--", label="reference summaries (0.5)"),
                Line2D([], [], color="gray", marker="o", linestyle="", markersize=4, alpha=0.6, label="one seed (small)"),
                Line2D([], [], color="gray", marker="o", linestyle="", markeredgecolor="black", markersize=8,
                       label="mean over seeds (large)")]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(f"mean response length (tokens, EOS included; {split})")
    ax.set_ylabel(f"win rate against the reference ({split})")
    fig.suptitle(f"Win rate vs response length\njudge: {selection.label}", fontsize=10)
    ax.grid(alpha=0.3)
    return FigureResult("win_rate_vs_length", save_figure(fig, out_dir, "win_rate_vs_length", dpi), data,
                        [f"judge: {selection.label}"])


# ----------------------------------------------------------------------------------------------
# Figures 3-5, 7: metrics vs size
# ----------------------------------------------------------------------------------------------
def rouge_vs_size(sweep: Sweep | str | Path, out_dir: str | Path, dpi: int = 150) -> FigureResult:
    """Figure 3: SFT ROUGE-L (T 0.01, validation and test) vs size, the base model's when sft.py scored it
    (--eval_before_training), and the paper's values for Pythia sizes."""
    sweep = _as_sweep(sweep)
    series = {"SFT, validation": "eval/validation/rougeL", "SFT, test": "eval/test/rougeL",
              "base model, validation": "base/validation/rougeL"}
    data = metric_rows(sweep, "sft", series)
    colors = {"SFT, validation": "tab:blue", "SFT, test": "tab:cyan", "base model, validation": "tab:gray"}
    names = [n for n in series if n in set(data["series"])]
    fig, axes = new_figure(width=8.4)  # room for the legend on the right
    ax = axes[0, 0]
    means = _scaling_series(ax, data, names, colors, {n: n for n in names})
    paper = _paper_marks(ax, sweep.sizes, PAPER_ROUGE_L, "paper, SFT (approx.)")
    _size_axis(ax, sweep.sizes)
    _seed_handle(ax)
    ax.set_ylabel("ROUGE-L F1")
    ax.set_title("SFT ROUGE-L vs model size")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
    ax.grid(alpha=0.3)
    return FigureResult("rouge_vs_size", save_figure(fig, out_dir, "rouge_vs_size", dpi), {"seeds": data, "means": means},
                        ["with the paper's values"] if paper else [])


def rm_accuracy(sweep: Sweep | str | Path, out_dir: str | Path, dpi: int = 150) -> FigureResult:
    """Figure 4 (Detail 16): RM validation accuracy vs size on TL;DR and CNN/DM (mean ± std over seeds, seeds as
    dots), and accuracy per labeller confidence level (one line per size, mean over seeds)."""
    import pandas as pd

    sweep = _as_sweep(sweep)
    data = metric_rows(sweep, "reward", {"TL;DR": "eval/accuracy/split/validation", "CNN/DM": "eval/accuracy/split/validation_cnndm"})
    rows = []
    for cell in sweep.cells:
        for key, value in (stage_metrics(cell, "reward") or {}).items():
            match = re.fullmatch(r"eval/accuracy/confidence/(\d+)", key)
            if match and value is not None:
                rows.append({"size": cell.size.name, "params": cell.size.params, "seed": cell.seed,
                             "confidence": int(match.group(1)), "value": float(value)})
    confidence = pd.DataFrame(rows, columns=["size", "params", "seed", "confidence", "value"])
    fig, axes = new_figure(ncols=2)
    ax = axes[0, 0]
    names = [n for n in ("TL;DR", "CNN/DM") if n in set(data["series"])]
    means = _scaling_series(ax, data, names, {"TL;DR": "tab:purple", "CNN/DM": "tab:brown"},
                            {"TL;DR": "TL;DR validation (mean ± std)", "CNN/DM": "CNN/DM validation (mean ± std)"}, errorbars=True)
    # the same sideways shifts as the two series drawn by _scaling_series (spread 0.035 decades)
    paper = _paper_marks(ax, sweep.sizes, PAPER_RM_ACCURACY, "paper, TL;DR", "tab:purple", 10**-0.0175)
    _paper_marks(ax, sweep.sizes, PAPER_RM_ACCURACY_CNNDM, "paper, CNN/DM", "tab:brown", 10**0.0175)
    _size_axis(ax, sweep.sizes)
    _seed_handle(ax)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_ylabel("reward model accuracy")
    ax.set_title("RM validation accuracy vs model size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[0, 1]
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    sizes = [s for s in sweep.sizes if s.name in set(confidence["size"])]
    for k, size in enumerate(sizes):
        d = confidence[confidence["size"] == size.name]
        color = cmap(k / max(1, len(sizes) - 1) * 0.85)
        ax.scatter(d["confidence"], d["value"], color=color, s=14, alpha=0.5, edgecolors="none")
        m = d.groupby("confidence")["value"].mean()
        ax.plot(m.index, m.values, marker="o", color=color, label=f"{size.name} (mean of {_plural(d['seed'].nunique(), 'seed')})")
    notes = ["with the paper's values"] if paper else []
    if confidence.empty:  # bring-your-own comparisons (and some real batches) carry no labeller confidence
        ax.text(0.5, 0.5, "no comparison with a labeller confidence\n(extra.confidence is null)", ha="center", va="center",
                transform=ax.transAxes)
        notes.append("no labeller confidence in the evaluated comparisons: right panel empty")
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(1, 10))
    ax.set_xlabel("labeller confidence (extra.confidence)")
    ax.set_ylabel("reward model accuracy (TL;DR + CNN/DM)")
    ax.set_title("RM accuracy per confidence level")
    _seed_handle(ax, mean=False)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return FigureResult("rm_accuracy", save_figure(fig, out_dir, "rm_accuracy", dpi),
                        {"seeds": data, "means": means, "confidence": confidence}, notes)


def rm_vs_dpo_accuracy(sweep: Sweep | str | Path, out_dir: str | Path, dpi: int = 150) -> FigureResult:
    """Figure 5 (Detail 19): accuracy of the explicit RM and of DPO's implicit reward on the same validation
    comparisons vs size (solid TL;DR, dashed CNN/DM)."""
    import pandas as pd

    sweep = _as_sweep(sweep)
    splits = {"TL;DR": "eval/accuracy/split/validation", "CNN/DM": "eval/accuracy/split/validation_cnndm"}
    parts = []
    for stage, who in (("reward", "RM"), ("dpo", "DPO implicit reward")):
        parts.append(metric_rows(sweep, stage, {f"{who}, {split}": key for split, key in splits.items()}))
    data = pd.concat(parts, ignore_index=True)
    names = [n for n in (f"{w}, {s}" for w in ("RM", "DPO implicit reward") for s in splits) if n in set(data["series"])]
    colors = {n: "tab:purple" if n.startswith("RM") else "tab:green" for n in names}
    styles = {n: "--" if n.endswith("CNN/DM") else "-" for n in names}
    fig, axes = new_figure(width=8.4)  # room for the legend on the right
    ax = axes[0, 0]
    means = _scaling_series(ax, data, names, colors, {n: n for n in names}, linestyles=styles)
    _size_axis(ax, sweep.sizes)
    _seed_handle(ax)
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="chance")
    ax.set_ylabel("accuracy on the validation comparisons")
    ax.set_title("Explicit RM vs DPO implicit reward")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
    ax.grid(alpha=0.3)
    return FigureResult("rm_vs_dpo_accuracy", save_figure(fig, out_dir, "rm_vs_dpo_accuracy", dpi), {"seeds": data, "means": means})


# ----------------------------------------------------------------------------------------------
# Figures 6-7: calibration and agreement
# ----------------------------------------------------------------------------------------------
def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def agreement(margin: Any, preferred: Any) -> Any:
    """Per pair: 1 when the reward difference `margin` (first minus second) has the sign of the label
    (`preferred` 1 = first, 0 = second), 0 when it has the other sign, 0.5 when the margin is 0."""
    import numpy as np

    margin = np.asarray(margin, dtype=float)
    first = np.asarray(preferred, dtype=float) == 1.0
    return np.where(margin == 0, 0.5, np.where((margin > 0) == first, 1.0, 0.0))


def calibration_bins(margin: Any, agreed: Any, width: float, max_margin: float) -> Any:
    """Bins of |margin| of `width` (the last one open above `max_margin`): pairs, mean |margin|, observed
    accuracy, and the Bradley-Terry prediction sigma(|margin|) averaged over the bin's pairs."""
    import numpy as np
    import pandas as pd

    if width <= 0 or max_margin <= 0:
        raise UserInputError("--calibration_bin_width and --calibration_max_margin must be > 0")
    absolute = np.abs(np.asarray(margin, dtype=float))
    index = np.minimum(np.floor(absolute / width), math.ceil(max_margin / width)).astype(int)
    frame = pd.DataFrame({"bin": index, "margin": absolute, "agreed": np.asarray(agreed, dtype=float),
                          "predicted": 1.0 / (1.0 + np.exp(-absolute))})
    grouped = frame.groupby("bin")
    return pd.DataFrame({"n": grouped.size(), "margin": grouped["margin"].mean(), "accuracy": grouped["agreed"].mean(),
                         "predicted": grouped["predicted"].mean()}).reset_index()


def rm_judge_pairs(cell: Cell, verdicts: Verdicts) -> Any:
    """PPO vs reference pairs with the cell's RM difference (score - reference_score, as PPO's evaluation scored
    them) and the judge's verdict; ties and uncounted verdicts dropped."""
    table = verdicts.outcomes()
    missing = [c for c in ("score", "reference_score") if c not in table]
    if missing:
        raise UserInputError(f"{verdicts.table} lacks {missing}: judge the PPO stage's query_responses table, which "
                             "carries the RM scores of response and reference")
    table = table[table["win"].isin([0.0, 1.0])]
    margin = table["score"] - table["reference_score"]
    return table.assign(margin=margin, agreed=agreement(margin, table["win"]))


def rm_calibration(sweep: Sweep | str | Path, out_dir: str | Path, judge: JudgeChoice = "auto", split: str = "validation",
                   judge_model: str | None = None, judge_protocol: str | None = None, bin_width: float = 0.5,
                   max_margin: float = 4.0, min_count: int = 5, dpi: int = 150) -> FigureResult:
    """Figure 6 (Detail 18): RM accuracy in bins of |r(a) - r(b)| against the Bradley-Terry prediction
    sigma(|r(a) - r(b)|), per size pooled over seeds: (a) on the TL;DR validation comparisons
    (reward/eval_comparisons.csv); (b) against the judge's verdicts on PPO vs reference summaries. An exact tie
    (identical texts score the same) counts 1/2, as sigma(0) predicts; the stage's accuracy counts it wrong."""
    import pandas as pd

    sweep = _as_sweep(sweep)
    parts = []
    for cell in sweep.cells:
        path = cell.stage("reward") / "eval_comparisons.csv"
        if path.is_file():
            table = pd.read_csv(path)
            table = table[table["split"] == "validation"]
            parts.append(pd.DataFrame({"size": cell.size.name, "seed": cell.seed, "margin": table["chosen_score"] - table["rejected_score"]}))
    if not parts:
        raise UserInputError(f"no reward/eval_comparisons.csv in the cells of {sweep.root}; run the reward stage of the sweep")
    dataset = pd.concat(parts, ignore_index=True)
    dataset["agreed"] = agreement(dataset["margin"], [1.0] * len(dataset))  # the label always prefers `chosen`
    judged = pd.DataFrame(columns=["size", "seed", "margin", "agreed"])
    label, notes = None, []
    try:
        selection = select_judge(sweep, judge, split, judge_model, judge_protocol)
        label = selection.label
        pairs = [rm_judge_pairs(cell, v)[["margin", "agreed"]].assign(size=cell.size.name, seed=cell.seed)
                 for (cell, policy), v in selection.verdicts.items() if policy == "ppo"]
        if pairs:
            judged = pd.concat(pairs, ignore_index=True)
    except UserInputError as error:
        notes.append(f"panel (b) empty: {error}")
    rows = []
    for panel, frame in (("dataset", dataset), ("judge", judged)):
        for size in sweep.sizes:
            d = frame[frame["size"] == size.name]
            if d.empty:
                continue
            bins = calibration_bins(d["margin"], d["agreed"], bin_width, max_margin)
            rows.append(bins.assign(panel=panel, size=size.name, params=size.params, seeds=d["seed"].nunique()))
    data = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    fig, axes = new_figure(ncols=2)
    import matplotlib
    import numpy as np

    cmap = matplotlib.colormaps["viridis"]
    top = max(float(data["margin"].max()) if not data.empty else 1.0, 1.0) * 1.05
    titles = {"dataset": "(a) TL;DR validation comparisons",
              "judge": "(b) RM vs judge on PPO vs reference" + (f"\njudge: {label}" if label else "")}
    for ax, panel in zip(axes[0], ("dataset", "judge"), strict=True):
        xs = np.linspace(0, top, 100)
        ax.plot(xs, 1 / (1 + np.exp(-xs)), color="black", linestyle="--", linewidth=1, label="Bradley-Terry: σ(|Δr|)")
        d = data[(data["panel"] == panel) & (data["n"] >= min_count)] if not data.empty else data
        for k, size in enumerate(sweep.sizes):
            s = d[d["size"] == size.name] if not d.empty else d
            if s.empty:
                continue
            color = cmap(k / max(1, len(sweep.sizes) - 1) * 0.85)
            ax.plot(s["margin"], s["accuracy"], marker="o", color=color,
                    label=f"{size.name} ({_plural(int(s['seeds'].iloc[0]), 'seed')} pooled, {int(s['n'].sum())} pairs)")
        if d.empty:
            empty = "no judge verdicts on PPO summaries" if panel == "judge" else f"no bin with {min_count} pairs or more"
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("|RM score difference| (bin mean)")
        ax.set_ylabel("accuracy (share agreeing with the label)" if panel == "dataset" else "agreement with the judge")
        ax.set_title(titles[panel], fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Reward model calibration (bins of width {bin_width}, last open above {max_margin}; bins with < {min_count} pairs hidden)",
                 fontsize=10)
    return FigureResult("rm_calibration", save_figure(fig, out_dir, "rm_calibration", dpi), data, notes)


def rm_judge_agreement(sweep: Sweep | str | Path, out_dir: str | Path, judge: JudgeChoice = "auto", split: str = "validation",
                       judge_model: str | None = None, judge_protocol: str | None = None, dpi: int = 150) -> FigureResult:
    """Figure 7: share of PPO vs reference pairs where the cell's RM prefers the summary the judge prefers
    (ties dropped) vs size; the paper's values for Pythia sizes."""
    import pandas as pd

    sweep = _as_sweep(sweep)
    selection = select_judge(sweep, judge, split, judge_model, judge_protocol)
    rows = []
    for (cell, policy), verdicts in selection.verdicts.items():
        if policy == "ppo":
            pairs = rm_judge_pairs(cell, verdicts)
            if len(pairs):
                rows.append({"size": cell.size.name, "params": cell.size.params, "seed": cell.seed, "series": "PPO vs reference",
                             "value": float(pairs["agreed"].mean()), "n": len(pairs)})
    if not rows:
        raise UserInputError(f"no judged PPO table with verdicts in {sweep.root} ({selection.label}); judge ppo/query_responses_{split}")
    data = pd.DataFrame(rows).sort_values(["params", "seed"], ignore_index=True)
    fig, axes = new_figure(width=8.4)  # room for the legend on the right
    ax = axes[0, 0]
    means = _scaling_series(ax, data, ["PPO vs reference"], {"PPO vs reference": "tab:red"},
                            {"PPO vs reference": "RM-judge agreement (mean over seeds)"})
    paper = _paper_marks(ax, sweep.sizes, PAPER_RM_JUDGE_AGREEMENT, "paper (GPT-3.5 judge)")
    _size_axis(ax, sweep.sizes)
    _seed_handle(ax)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("share of pairs where RM and judge agree")
    fig.suptitle(f"RM-judge agreement on PPO vs reference ({split})\njudge: {selection.label}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a point
    ax.grid(alpha=0.3)
    return FigureResult("rm_judge_agreement", save_figure(fig, out_dir, "rm_judge_agreement", dpi), {"seeds": data, "means": means},
                        [f"judge: {selection.label}"] + (["with the paper's values"] if paper else []))


# ----------------------------------------------------------------------------------------------
# Figure 8: length-controlled win rate
# ----------------------------------------------------------------------------------------------
def _cell_tokenizer(cell: Cell) -> Any:
    for stage in ("sft", "ppo", "dpo", "reward"):
        model = cell.stage(stage) / "model"
        if (model / "tokenizer.json").is_file() or (model / "tokenizer_config.json").is_file():
            from summarize_from_feedback_details.core import load_tokenizer

            return load_tokenizer(str(model))
    return None


def length_ratios(table: Any, tokenizer: Any) -> tuple[Any, str]:
    """log(response length / reference length) per row: tokens (the stage's response_token_len, the reference
    re-tokenized as the data stage formats it, `" " + reference + EOS`) or, without a tokenizer, words."""
    import numpy as np

    from summarize_from_feedback_details.tldr_dataset import encode, format_completion

    if tokenizer is not None and "response_token_len" in table:
        reference = [len(encode(tokenizer, format_completion(str(r), tokenizer.eos_token))) for r in table["reference"]]
        response = table["response_token_len"].astype(float).to_numpy()
        unit = "tokens"
    else:
        reference = [len(str(r).split()) for r in table["reference"]]
        response = np.array([len(str(r).split()) for r in table["response"]], dtype=float)
        unit = "words"
    return np.log(np.maximum(response, 1.0) / np.maximum(np.asarray(reference, dtype=float), 1.0)), unit


def length_bins(log_ratio: Any, wins: Any, edges: Sequence[float]) -> Any:
    """Win rate (Wilson 95% interval) within bins of log(response / reference length); `edges` are the inner
    edges, the outer bins are open. Uncounted verdicts (NaN) are dropped."""
    import numpy as np
    import pandas as pd

    if list(edges) != sorted(edges) or len(set(edges)) != len(edges):
        raise UserInputError(f"--length_bin_edges {tuple(edges)} must be strictly increasing")
    log_ratio, wins = np.asarray(log_ratio, dtype=float), np.asarray(wins, dtype=float)
    keep = ~np.isnan(wins)
    frame = pd.DataFrame({"bin": np.searchsorted(np.asarray(edges), log_ratio[keep], side="right"),
                          "log_ratio": log_ratio[keep], "win": wins[keep]})
    rows = []
    for index, group in frame.groupby("bin"):
        result = win_rate(list(group["win"]))
        low = -math.inf if index == 0 else edges[index - 1]
        high = math.inf if index == len(edges) else edges[index]
        rows.append({"bin": int(index), "bin_low": low, "bin_high": high, "n": len(group),
                     "log_ratio": float(group["log_ratio"].mean()), "win_rate": result.rate, "ci_low": result.low,
                     "ci_high": result.high})
    return pd.DataFrame(rows, columns=["bin", "bin_low", "bin_high", "n", "log_ratio", "win_rate", "ci_low", "ci_high"])


def length_controlled_win_rate(sweep: Sweep | str | Path, out_dir: str | Path, judge: JudgeChoice = "auto",
                               split: str = "validation", judge_model: str | None = None, judge_protocol: str | None = None,
                               edges: Sequence[float] = (-0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75), min_count: int = 5,
                               dpi: int = 150) -> FigureResult:
    """Figure 8: win rate against the references within bins of log(summary length / reference length), one
    panel per size (seeds pooled), one line per policy (SFT, PPO, PPO variants such as reward whitening, DPO),
    with 95% Wilson intervals. Comparing policies at equal length ratios separates quality from length."""
    import pandas as pd

    sweep = _as_sweep(sweep)
    selection = select_judge(sweep, judge, split, judge_model, judge_protocol)
    chosen = {key: v for key, v in selection.verdicts.items() if key[1] != "base"}
    tokenizers = {cell: _cell_tokenizer(cell) for cell, _ in chosen}
    # One length unit for the whole figure: tokens when every cell kept a tokenizer, else words.
    by_tokens = all(t is not None for t in tokenizers.values())
    rows, units, labels = [], set(), {}
    for (cell, policy), verdicts in chosen.items():
        table = verdicts.outcomes()
        ratios, unit = length_ratios(table, tokenizers[cell] if by_tokens else None)
        units.add(unit)
        labels[policy] = policy_label(policy, _read_json(cell.stage(policy) / "args.json") if policy != "sft" else None)
        rows.append(pd.DataFrame({"size": cell.size.name, "seed": cell.seed, "policy": policy, "log_ratio": ratios,
                                  "win": table["win"].to_numpy()}))
    if not rows:
        raise UserInputError(f"no judged policy tables in {sweep.root} ({selection.label})")
    pairs = pd.concat(rows, ignore_index=True)
    unit = "tokens" if units == {"tokens"} else "words"
    if len(units) > 1:  # a judged table without response_token_len: every cell in words
        pairs["log_ratio"] = pd.concat([pd.Series(length_ratios(v.outcomes(), None)[0]) for v in chosen.values()],
                                       ignore_index=True)
    sizes = [s for s in sweep.sizes if s.name in set(pairs["size"])]
    policies = policy_order(pairs["policy"])
    binned = []
    for size in sizes:
        for policy in policies:
            d = pairs[(pairs["size"] == size.name) & (pairs["policy"] == policy)]
            if len(d):
                binned.append(length_bins(d["log_ratio"], d["win"], edges).assign(
                    size=size.name, params=size.params, policy=policy, seeds=d["seed"].nunique()))
    data = pd.concat(binned, ignore_index=True)
    fig, axes = new_figure(ncols=len(sizes), width=4.6, height=4.2, share=True)
    for ax, size in zip(axes[0], sizes, strict=True):
        for k, policy in enumerate(policies):
            d = data[(data["size"] == size.name) & (data["policy"] == policy) & (data["n"] >= min_count)]
            if d.empty:
                continue
            shift = (k - (len(policies) - 1) / 2) * 0.015  # sideways so the intervals do not overlap
            # clipped at 0: at a rate of exactly 0 or 1 the interval's end differs from it by float rounding only
            yerr = [(d["win_rate"] - d["ci_low"]).clip(lower=0), (d["ci_high"] - d["win_rate"]).clip(lower=0)]
            ax.errorbar(d["log_ratio"] + shift, d["win_rate"], yerr=yerr,
                        marker="o", ms=5, capsize=2, color=policy_color(policy, policies),
                        label=f"{labels[policy]} ({_plural(int(d['seeds'].iloc[0]), 'seed')}, {int(d['n'].sum())} pairs)")
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.axvline(0.0, color="gray", linestyle=":", linewidth=1)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(f"log(response / reference length), {unit}")
        ax.set_ylabel("win rate against the reference")
        ax.set_title(size.name)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Length-controlled win rate ({split}; 95% Wilson intervals; bins with < {min_count} pairs hidden)\n"
                 f"judge: {selection.label}", fontsize=10)
    return FigureResult("length_controlled_win_rate", save_figure(fig, out_dir, "length_controlled_win_rate", dpi), data,
                        [f"judge: {selection.label}", f"length unit: {unit}"])


# ----------------------------------------------------------------------------------------------
# Figure 9: PPO training curves
# ----------------------------------------------------------------------------------------------
def tensorboard_scalars(run_dir: Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each tag in the run's tensorboard/ event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    available = set(events.Tags().get("scalars", []))
    return {tag: [(e.step, float(e.value)) for e in events.Scalars(tag)] for tag in tags if tag in available}


def ppo_training_curves(sweep: Sweep | str | Path, out_dir: str | Path, stage: str = "ppo", dpi: int = 150) -> FigureResult:
    """Figure 9: PPO's RM score (rollouts and validation), KL to the SFT policy and response length against
    episodes, one line per (size, seed): colour = size, line style = seed."""
    import matplotlib
    import pandas as pd

    sweep = _as_sweep(sweep)
    rows = []
    for cell in sweep.cells:
        run = cell.stage(stage)
        if not (run / "tensorboard").is_dir():
            continue
        scalars = tensorboard_scalars(run, [tag for tag, _ in PPO_CURVES] + ["episode"])
        episodes = dict(scalars.pop("episode", []))
        batch = (_read_json(run / "args.json") or {}).get("batch_size")
        for tag, points in scalars.items():
            for step, value in points:
                episode = episodes.get(step, step * batch if batch else step)
                rows.append({"size": cell.size.name, "params": cell.size.params, "seed": cell.seed, "tag": tag,
                             "step": step, "episode": episode, "value": value})
    if not rows:
        raise UserInputError(f"no {stage}/tensorboard in the cells of {sweep.root}; run the {stage} stage of the sweep")
    data = pd.DataFrame(rows)
    tags = [(tag, title) for tag, title in PPO_CURVES if tag in set(data["tag"])]
    ncols = 2 if len(tags) > 1 else 1
    fig, axes = new_figure(ncols=ncols, nrows=math.ceil(len(tags) / ncols), width=5.0, height=3.6)
    cmap = matplotlib.colormaps["viridis"]
    sizes = [s for s in sweep.sizes if s.name in set(data["size"])]
    seeds = sorted(set(data["seed"]))
    for ax, (tag, title) in zip(axes.flat, tags, strict=False):
        for k, size in enumerate(sizes):
            color = cmap(k / max(1, len(sizes) - 1) * 0.85)
            for seed in seeds:
                d = data[(data["tag"] == tag) & (data["size"] == size.name) & (data["seed"] == seed)]
                if len(d):
                    ax.plot(d["episode"], d["value"], color=color, linestyle=SEED_LINESTYLES[seeds.index(seed) % len(SEED_LINESTYLES)],
                            linewidth=1.3, label=f"{size.name}, seed {seed}")
        ax.set_xlabel("episodes")
        ax.set_ylabel(title)
        ax.set_title(tag, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{POLICY_LABELS.get(stage, stage)} training curves (colour: size; line style: seed)", fontsize=10)
    return FigureResult(f"{stage}_training_curves", save_figure(fig, out_dir, f"{stage}_training_curves", dpi), data)


# ----------------------------------------------------------------------------------------------
# Figure 10: the dataset (drawn by figures.py, the data stage's module)
# ----------------------------------------------------------------------------------------------
def dataset_dir_of(sweep: Sweep) -> Path:
    """The processed dataset the sweep trained on: `dataset` of the first cell's sft/args.json, when it exists here."""
    for cell in sweep.cells:
        args = _read_json(cell.stage("sft") / "args.json") or {}
        if args.get("dataset") and (path := local_path(args["dataset"])) and (path / "args.json").is_file():
            return path
    raise UserInputError(f"cannot find the dataset of {sweep.root} (sft/args.json names none that exists here); pass --dataset_dir")


def dataset(dataset_dir: str | Path, out_dir: str | Path) -> FigureResult:
    """Figure 10: token-length histograms, confidence distribution, policies and policy pairs, drawn by
    `figures.dataset_figures_from_disk` into a temporary directory and moved into `out_dir` file by file."""
    from summarize_from_feedback_details.figures import dataset_figures_from_disk

    root = Path(dataset_dir)
    if not (root / "args.json").is_file() or not (root / "sft").is_dir() or not (root / "preference").is_dir():
        raise UserInputError(f"--dataset_dir {dataset_dir!r} is not a directory written by tldr_dataset (args.json, sft/, preference/)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dataset-figures-", dir=out))
    try:
        drawn = dataset_figures_from_disk(root, tmp)
        paths = []
        for path in drawn:
            os.replace(path, out / path.name)
            paths.append(out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return FigureResult("dataset", paths, [p.name for p in paths])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
FIGURES: dict[str, Callable[[Sweep, Path, Args], FigureResult]] = {
    "win_rate_vs_size": lambda s, o, a: win_rate_vs_size(s, o, a.judge, a.split, a.judge_model, a.judge_protocol,
                                                         a.openai_win_rate, a.dpi),
    "win_rate_vs_length": lambda s, o, a: win_rate_vs_length(s, o, a.judge, a.split, a.judge_model, a.judge_protocol, a.dpi),
    "rouge_vs_size": lambda s, o, a: rouge_vs_size(s, o, a.dpi),
    "rm_accuracy": lambda s, o, a: rm_accuracy(s, o, a.dpi),
    "rm_vs_dpo_accuracy": lambda s, o, a: rm_vs_dpo_accuracy(s, o, a.dpi),
    "rm_calibration": lambda s, o, a: rm_calibration(s, o, a.judge, a.split, a.judge_model, a.judge_protocol,
                                                     a.calibration_bin_width, a.calibration_max_margin, a.min_bin_count, a.dpi),
    "rm_judge_agreement": lambda s, o, a: rm_judge_agreement(s, o, a.judge, a.split, a.judge_model, a.judge_protocol, a.dpi),
    "length_controlled_win_rate": lambda s, o, a: length_controlled_win_rate(
        s, o, a.judge, a.split, a.judge_model, a.judge_protocol, a.length_bin_edges, a.min_bin_count, a.dpi),
    "ppo_training_curves": lambda s, o, a: ppo_training_curves(s, o, dpi=a.dpi),
    "rloo_training_curves": lambda s, o, a: ppo_training_curves(s, o, stage="rloo", dpi=a.dpi),
    "dataset": lambda s, o, a: dataset(Path(a.dataset_dir) if a.dataset_dir else dataset_dir_of(s), o),
}


def main(args: Args) -> dict[str, FigureResult]:
    """Draw the requested figures. An explicitly requested figure whose inputs are missing is an error; `all`
    draws what the sweep holds and names each figure it skipped and why."""
    names = list(FIGURES) if "all" in args.figure else list(dict.fromkeys(args.figure))
    if args.min_bin_count < 1 or args.dpi < 10:
        raise UserInputError("--min_bin_count must be >= 1 and --dpi >= 10")
    if args.sweep_dir is None and names != ["dataset"]:
        raise UserInputError("--sweep_dir is required (only `--figure dataset --dataset_dir DIR` works without a sweep)")
    if args.sweep_dir is None and args.dataset_dir is None:
        raise UserInputError("--figure dataset needs --dataset_dir (or --sweep_dir to find it)")
    sweep = load_sweep(args.sweep_dir) if args.sweep_dir is not None else None
    if "all" in args.figure and not (sweep and any((cell.stage("rloo") / "tensorboard").is_dir() for cell in sweep.cells)):
        names.remove("rloo_training_curves")  # RLOO is an optional stage of a sweep: `all` draws its curves when it ran
    if args.out_dir is not None:
        out = Path(args.out_dir)
    else:
        out = Path(args.sweep_dir) / "figures" if args.sweep_dir else Path(args.dataset_dir) / "figures"
    if sweep is not None:
        print(f"sweep {sweep.root}: sizes {[f'{s.name} ({human_count(s.params)})' for s in sweep.sizes]}, seeds {sweep.seeds}, "
              f"{len(sweep.cells)} cells")
    results: dict[str, FigureResult] = {}
    skipped = []
    for name in names:
        try:
            results[name] = FIGURES[name](sweep, out, args)  # type: ignore[arg-type]
        except UserInputError as error:
            if "all" not in args.figure:
                raise
            skipped.append(name)
            print(f"skipped {name}: {error}")
            continue
        result = results[name]
        notes = f" ({'; '.join(result.notes)})" if result.notes else ""
        print(f"{name}: {', '.join(str(p) for p in result.paths)}{notes}")
    if skipped:
        print(f"drew {len(results)} of {len(names)} figures; skipped (inputs missing): {', '.join(skipped)}")
    if not results:
        raise UserInputError(f"no figure could be drawn from {args.sweep_dir}; see the reasons above")
    return results


if __name__ == "__main__":
    import tyro

    run_main(main, tyro.cli(Args, description=__doc__.splitlines()[0], use_underscores=True))
