"""Token view: base / SFT / PPO / DPO responses to one query, token by token (SPEC "Token visualisation").

    python -m summarize_from_feedback_details.visualize_tokens          # after scripts/hello_world.sh
    python -m summarize_from_feedback_details.visualize_tokens --query_index 7 --html token_view.html
    python -m summarize_from_feedback_details.visualize_tokens --source sample --response_length 80
    python -m summarize_from_feedback_details.visualize_tokens --rows reference ppo --ppo_samples_over_training
    python -m summarize_from_feedback_details.visualize_tokens --base_model EleutherAI/pythia-1b-deduped \\
        --dataset datasets/tldr --sft_run runs/<sft> --ppo_run runs/<ppo> --dpo_run runs/<dpo> \\
        --reward_model runs/<reward>/model

Each response token is coloured by its rank under the BASE model, given the query and the response so far:
top-1 = unshifted, top-3 = marginal, otherwise shifted (how far alignment moved the model away from the
base distribution at that token). Under each token: that rank and the reward model's per-token output,
the scalar head applied at every position. Only the output at the last non-pad token (the EOS) is the
reward (Detail 12); the others were never trained and are mostly negative (Detail 13). EOS and PAD are
shown as markers.

The responses come from the stages' `query_responses` tables (`--source tables`, the default: no
re-sampling; the table's text is re-tokenized as `" " + response` plus EOS when the table says it had
one) or are sampled now with the pipeline's sampler (`--source sample`: T 0.01, `--response_length`
tokens, EOS does not stop sampling and the tokens after it become [PAD], Details 23.1-23.2). The
`reference` row is the dataset's exact reference tokens. `--ppo_samples_over_training` replaces the PPO row
by the PPO policy's response at every update ppo.py kept (`{ppo_run}/samples/update_{k}`, its
--save_samples_every tables of the per-update validation batch). Output: rich terminal text and, with
`--html`, one self-contained HTML file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from summarize_from_feedback_details.core import (
    UserInputError,
    check_pad_token,
    column,
    load_tokenizer,
    run_main,
    write_text,
)

RowName = Literal["reference", "base", "sft", "ppo", "dpo"]
ROW_LABELS = {
    "reference": "reference (human)",
    "base": "base model",
    "sft": "SFT",
    "ppo": "PPO",
    "dpo": "DPO",
}
# The run holding each row's table and the table's stem: `{stem}_{split}.parquet|csv`, as the stages write it.
ROW_TABLES = {
    "base": ("sft_run", "base_query_responses"),  # sft.py --eval_before_training (on in its embedded preset)
    "sft": ("sft_run", "eval_query_responses"),
    "ppo": ("ppo_run", "query_responses"),
    "dpo": ("dpo_run", "query_responses"),
}
MARGINAL_TOP_K = 3
"""SPEC: the aligned token is the base model's top-1 (unshifted), in its top-3 (marginal), or not (shifted)"""
RANK_CLASSES = ("unshifted", "marginal", "shifted")


@dataclass
class Args:
    dataset: str = "datasets/embedded"
    """output directory of `tldr_dataset` (sft/ gives the query and reference tokens; tokenizer/ is used)"""
    split: str = "validation"
    """split of the SFT dataset the query comes from (the tables of that split are read)"""
    query_index: int = 0
    """row of the split to show (tables keep the split's order and hold its first --max_eval_samples rows)"""
    rows: tuple[RowName, ...] = ("reference", "base", "sft", "ppo", "dpo")
    """rows to show, in this order: the dataset's reference and the responses of each model"""
    source: Literal["tables", "sample"] = "tables"
    """tables: the responses the stages saved (no sampling); sample: sample each model now"""
    base_model: str = "assets/embedded/models/tiny-pythia-s"
    """the pre-trained model the ranks are measured under (and the base row's model with --source sample)"""
    sft_run: str | None = "runs/sft_embedded"
    """SFT run directory (base_/eval_query_responses tables, model/); or, to sample, a model path / hub id"""
    ppo_run: str | None = "runs/ppo_embedded"
    """PPO run directory (query_responses tables, model/); or, to sample, a model path / hub id"""
    dpo_run: str | None = "runs/dpo_embedded"
    """DPO run directory (query_responses tables, model/); or, to sample, a model path / hub id"""
    ppo_samples_over_training: bool = False
    """replace the ppo row by one row per update ppo.py saved (`{ppo_run}/samples/update_{k}`, --save_samples_every):
    the response to this query over training (tables of the per-update validation batch, its first queries only)"""
    reward_model: str | None = "runs/reward_embedded/model"
    """reward model (ScalarModel checkpoint of reward.py) whose per-token outputs are shown; None: none"""
    response_length: int = 80
    """--source sample: tokens sampled per response (SPEC: up to 80); rows are shown padded to this length"""
    temperature: float = 0.01
    """--source sample: sampling temperature (SPEC: 0.01, greedy-like)"""
    seed: int = 1
    """--source sample: seed of each row's sampler (the same for every row)"""
    pads_shown: int = 3
    """[PAD] tokens after the EOS shown one by one (with their RM outputs); one marker counts the rest"""
    html: str | None = None
    """also write the view to this self-contained HTML file"""
    terminal: bool = True
    """print the view to the terminal (rich)"""


@dataclass
class TokenRow:
    """One response token by token: ids, kinds, ranks under the base model, the RM's per-token outputs."""

    name: str
    label: str
    source: str
    """where the response came from: the dataset, a table, or a model sampled now"""
    token_ids: list[int]
    texts: list[str]
    kinds: list[str]
    """'token', 'eos' (the first EOS) or 'pad' per position"""
    ranks: list[int | None] = field(default_factory=list)
    """rank of the token under the base model (1 = top-1); None on padding"""
    rm_values: list[float] | None = None
    """the RM head's output at each response position (Detail 13); None without --reward_model"""
    score: float | None = None
    """the RM's reward: its output at the last non-pad token (Detail 12)"""
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str | None]:
        return [rank_class(rank) for rank in self.ranks]

    @property
    def length(self) -> int:
        """Response tokens up to and including the first EOS (the non-pad ones when there is none)."""
        if "eos" in self.kinds:
            return self.kinds.index("eos") + 1
        return sum(kind != "pad" for kind in self.kinds)

    @property
    def scored_index(self) -> int:
        """Detail 12: where the RM output is the reward, before the first pad (as `sequence_scores`)."""
        first_pad = self.kinds.index("pad") if "pad" in self.kinds else len(self.kinds)
        return max(first_pad - 1, 0)


@dataclass
class TokenView:
    split: str
    query_index: int
    query: str
    query_pads: int
    query_length: int
    rows: list[TokenRow]
    settings: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Ranks and classes
# ----------------------------------------------------------------------------------------------
def token_ranks(logits: Any, tokens: Any) -> Any:
    """Rank of each token under `logits` (..., V): 1 + the number of vocabulary entries with a strictly
    higher logit, so the argmax has rank 1 and tied entries share a rank."""
    chosen = logits.gather(-1, tokens.unsqueeze(-1))
    return 1 + (logits > chosen).sum(-1)


def rank_class(rank: int | None) -> str | None:
    """SPEC: top-1 of the base model = unshifted, top-3 = marginal, else shifted; None for padding."""
    if rank is None:
        return None
    return "unshifted" if rank == 1 else "marginal" if rank <= MARGINAL_TOP_K else "shifted"


def token_kinds(token_ids: list[int], eos_token_id: int, pad_token_id: int) -> list[str]:
    """'eos' at the first EOS, 'pad' after it (Detail 23.2 makes those [PAD]) and on pad ids, else 'token'."""
    eos = token_ids.index(eos_token_id) if eos_token_id in token_ids else len(token_ids)
    return [
        "eos" if i == eos else "pad" if i > eos or t == pad_token_id else "token"
        for i, t in enumerate(token_ids)
    ]


def display_text(tokenizer: Any, token_id: int, kind: str) -> str:
    if kind == "eos":
        return "[EOS]"
    if kind == "pad":
        return "[PAD]"
    return tokenizer.decode([token_id]).replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")


# ----------------------------------------------------------------------------------------------
# Inputs: every path and table is checked before a model is loaded
# ----------------------------------------------------------------------------------------------
def table_path(run: str, stem: str, split: str) -> Path | None:
    for suffix in (".parquet", ".csv"):
        path = Path(run) / f"{stem}_{split}{suffix}"
        if path.exists():
            return path
    return None


def read_table_row(
    path: Path, index: int, query: str, limit: str = "the stage evaluated the first --max_eval_samples rows"
) -> dict[str, Any]:
    """Row `index` of a stage's query-response table; refuses a table made for other queries. `limit` says
    which rows such a table holds (for the error when `index` is beyond them)."""
    import pandas as pd

    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)
    missing = [c for c in ("query", "response", "has_eos") if c not in table.columns]
    if missing:
        raise UserInputError(
            f"{path} lacks the column(s) {missing}; pass a query_responses table written by a stage"
        )
    if index >= len(table):
        raise UserInputError(
            f"{path} has {len(table)} rows, so --query_index {index} is not in it ({limit}); "
            "choose a smaller --query_index or use --source sample"
        )
    row = table.iloc[index].to_dict()
    if str(row["query"]).strip() != query.strip():
        raise UserInputError(
            f"row {index} of {path} is for another query than row {index} of the split in --dataset: "
            "the table was made from another dataset or split; pass the --dataset and --split the run used"
        )
    row["has_eos"] = row["has_eos"] in (True, "True", "true", 1)
    return row


def policy_model_path(run: str) -> str:
    """A run directory's `model/` (a saved model or a LoRA run's adapters), or `run` itself (a model directory or hub id)."""
    from summarize_from_feedback_details.lora import is_adapter_folder

    model = Path(run) / "model"
    return str(model) if (model / "config.json").exists() or is_adapter_folder(model) else run


@dataclass
class RowPlan:
    name: str
    table: Path | None = None
    table_row: dict[str, Any] | None = None
    model: str | None = None
    label: str | None = None
    """the row's title (default: ROW_LABELS[name])"""


def ppo_sample_plans(run: str, query_index: int, query: str) -> list[RowPlan]:
    """--ppo_samples_over_training: one row per sample table ppo.py saved (`samples/update_{k}.parquet|csv`,
    --save_samples_every), in update order, each the PPO policy's response to the query after k updates."""
    import re

    tables: dict[int, Path] = {}
    for path in sorted((Path(run) / "samples").glob("update_*"), key=lambda p: p.suffix != ".parquet"):
        match = re.fullmatch(r"update_(\d+)\.(parquet|csv)", path.name)
        if match:
            tables.setdefault(int(match.group(1)), path)  # parquet first, else csv
    if not tables:
        raise UserInputError(
            f"no samples/update_*.parquet or .csv in --ppo_run {run!r}; ppo.py writes them with --save_samples_every "
            "(or drop --ppo_samples_over_training)"
        )
    limit = "the tables hold ppo.py's per-update validation batch: --local_eval_batch_size x processes queries"
    return [
        RowPlan(f"ppo_update_{k}", table=path, table_row=read_table_row(path, query_index, query, limit),
                label=f"PPO after {k} updates" + (" (the SFT policy)" if k == 0 else ""))
        for k, path in sorted(tables.items())
    ]  # fmt: skip


def plan_rows(args: Args, query: str) -> list[RowPlan]:
    """Where each row comes from, checked (tables read, model paths present) before any model is loaded."""
    from summarize_from_feedback_details.training import check_model_path

    plans = []
    for name in args.rows:
        if name == "reference":
            plans.append(RowPlan(name))
            continue
        run_field, stem = ROW_TABLES[name]
        run = getattr(args, run_field)
        if name == "base" and args.source == "sample":
            plans.append(RowPlan(name, model=args.base_model))
            continue
        if run is None:
            raise UserInputError(f"the {name} row needs --{run_field} (or leave it out with --rows)")
        if name == "ppo" and args.ppo_samples_over_training:
            plans.extend(ppo_sample_plans(run, args.query_index, query))
            continue
        if args.source == "sample":
            model = policy_model_path(run)
            check_model_path(model, f"--{run_field}")
            plans.append(RowPlan(name, model=model))
            continue
        path = table_path(run, stem, args.split)
        if path is None:
            hint = " (sft.py writes it with --eval_before_training)" if name == "base" else ""
            raise UserInputError(
                f"no {stem}_{args.split}.parquet or .csv in --{run_field} {run!r}{hint}; pass the run "
                "directory, use --source sample, or leave the row out with --rows"
            )
        plans.append(RowPlan(name, table=path, table_row=read_table_row(path, args.query_index, query)))
    return plans


def check_args(args: Args) -> None:
    if not args.rows:
        raise UserInputError("--rows is empty; name at least one of reference base sft ppo dpo")
    if len(set(args.rows)) != len(args.rows):
        raise UserInputError(f"--rows {' '.join(args.rows)} names a row twice")
    if args.query_index < 0:
        raise UserInputError(f"--query_index must be >= 0, got {args.query_index}")
    if args.response_length < 1:
        raise UserInputError(f"--response_length must be >= 1, got {args.response_length}")
    if not args.temperature > 0:
        raise UserInputError(f"--temperature must be > 0, got {args.temperature}")
    if args.pads_shown < 0:
        raise UserInputError(f"--pads_shown must be >= 0, got {args.pads_shown}")
    if args.ppo_samples_over_training:
        if args.source != "tables":
            raise UserInputError("--ppo_samples_over_training reads the sample tables ppo.py saved: use --source tables")
        if "ppo" not in args.rows:
            raise UserInputError("--ppo_samples_over_training replaces the ppo row: name ppo in --rows")
        if args.split != "validation":
            raise UserInputError(f"ppo.py's sample tables hold validation queries: use --split validation, not {args.split!r}")


def load_dataset_tokenizer(dataset: str, base_model: str) -> Any:
    """The tokenizer of the data (`{dataset}/tokenizer`), else the base model's with [PAD] (Detail 3.2)."""
    from transformers import AutoTokenizer

    local = Path(dataset) / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(local)) if local.is_dir() else load_tokenizer(base_model)
    # The Detail 3.2 ablation's data (pad == EOS) can be viewed too: the first EOS is the EOS, the rest pads.
    check_pad_token(tokenizer, allow_pad_equals_eos=True)
    return tokenizer


# ----------------------------------------------------------------------------------------------
# The view
# ----------------------------------------------------------------------------------------------
def build_view(args: Args) -> TokenView:
    import torch

    from summarize_from_feedback_details.modeling import (
        FROZEN_DTYPE,
        ScalarModel,
        disable_dropout,
        model_inputs,
        response_logits,
        sample,
        sequence_scores,
        truncate_after_eos,
    )
    from summarize_from_feedback_details.training import (
        check_model_path,
        check_vocabulary,
        load_causal_lm,
        load_processed_split,
        require_columns,
    )

    check_args(args)
    split = load_processed_split(args.dataset, "sft", args.split)
    require_columns(
        split,
        ["query", "query_token", "reference_response_token"],
        f"the {args.split} split of {args.dataset}",
    )
    if args.query_index >= len(split):
        raise UserInputError(
            f"--query_index {args.query_index} is out of range: the {args.split} split has {len(split)} rows"
        )
    example = split.select([args.query_index])
    query_text = column(example, "query")[0]
    plans = plan_rows(args, query_text)
    check_model_path(args.base_model, "--base_model")
    if args.reward_model is not None:
        check_model_path(args.reward_model, "--reward_model")

    tokenizer = load_dataset_tokenizer(args.dataset, args.base_model)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # (1, query length), left-padded (Detail 2.3)
    query = torch.tensor(column(example, "query_token"), device=device)
    base = load_causal_lm(args.base_model, tokenizer, dtype=FROZEN_DTYPE).to(device).eval()

    rows: list[TokenRow] = []
    for plan in plans:
        notes: list[str] = []
        if plan.name == "reference":
            ids = column(example, "reference_response_token")[0]  # the exact tokens, right-padded (Detail 5)
            source = f"dataset {args.dataset} ({args.split} row {args.query_index})"
        elif plan.table_row is not None:
            row = plan.table_row
            ids = tokenizer(" " + str(row["response"]), add_special_tokens=False).input_ids + (
                [eos] if row["has_eos"] else []
            )
            source = f"table {plan.table}"
            expected = row.get("response_token_len")
            if expected is not None and int(expected) != len(ids):
                notes.append(
                    f"re-tokenized to {len(ids)} tokens, the table says {int(expected)} (tokens differ)"
                )
            if row.get("score") is not None:
                notes.append(f"table's RM score {float(row['score']):.3f}")
            ids = ids + [pad] * max(0, args.response_length - len(ids))
        else:
            model = (
                base
                if plan.model == args.base_model
                else load_causal_lm(plan.model, tokenizer, dtype=FROZEN_DTYPE).to(device).eval()
            )
            generator = torch.Generator(device=device).manual_seed(args.seed)
            with torch.no_grad():
                response = sample(model, query, pad, args.response_length, args.temperature, generator)[0]
            ids = truncate_after_eos(response, eos, pad)[0].tolist()  # Detail 23.2: [PAD] after the first EOS
            source = (
                f"sampled now from {plan.model} (T {args.temperature}, {args.response_length} tokens, "
                f"seed {args.seed})"
            )
            if model is not base:
                del model
        kinds = token_kinds(ids, eos, pad)
        rows.append(
            TokenRow(
                plan.name,
                plan.label or ROW_LABELS[plan.name],
                source,
                ids,
                [display_text(tokenizer, t, k) for t, k in zip(ids, kinds, strict=True)],
                kinds,
                notes=notes,
            )
        )

    # Ranks under the base model given the query and the response so far (teacher-forced on each row).
    context = query.size(1)
    with torch.no_grad():
        for row in rows:
            tokens = torch.tensor([row.token_ids], device=device)
            logits = response_logits(base, torch.cat([query, tokens], 1), pad, context, None)[0]
            ranks = token_ranks(logits, tokens[0]).tolist()
            row.ranks = [None if kind == "pad" else rank for rank, kind in zip(ranks, row.kinds, strict=True)]
    del base

    if args.reward_model is not None:
        reward_model = disable_dropout(ScalarModel.from_pretrained(args.reward_model, dtype=FROZEN_DTYPE)).to(device).eval()
        check_vocabulary(reward_model.config, tokenizer, args.reward_model)
        with torch.no_grad():
            for row in rows:
                query_response = torch.cat([query, torch.tensor([row.token_ids], device=device)], 1)
                # Detail 13: the head applied at every position; only the last non-pad one was ever trained.
                row.rm_values = reward_model(**model_inputs(query_response, pad))[0, context:].tolist()
                row.score = float(sequence_scores(reward_model, query_response, pad, context)[0])  # Detail 12
                if "eos" not in row.kinds:
                    row.notes.append("no EOS: PPO would score it -1 instead (Detail 23.3)")

    settings = {
        "source": args.source + (" (PPO: samples over training)" if args.ppo_samples_over_training else ""),
        "base_model": args.base_model,
        "reward_model": args.reward_model,
        "dataset": args.dataset,
        "marginal_top_k": MARGINAL_TOP_K,
    }
    if args.source == "sample":
        settings.update(temperature=args.temperature, response_length=args.response_length, seed=args.seed)
    return TokenView(
        args.split, args.query_index, query_text, int((query == pad).sum()), context, rows, settings
    )


def row_summary(row: TokenRow) -> dict[str, Any]:
    """Rank-class counts up to the EOS; the RM's output at the scored token vs at the others (Detail 13)."""
    counted = [c for c, kind in zip(row.classes, row.kinds, strict=True) if kind != "pad"]
    summary: dict[str, Any] = {
        "tokens": row.length,
        "eos": "eos" in row.kinds,
        **{c: counted.count(c) for c in RANK_CLASSES},
    }
    if row.rm_values is not None:
        others = [v for i, v in enumerate(row.rm_values) if i != row.scored_index and row.kinds[i] != "pad"]
        summary["score"] = row.score
        summary["others_mean"] = sum(others) / len(others) if others else None
        summary["others_negative"] = sum(v < 0 for v in others) / len(others) if others else None
    return summary


def summary_text(row: TokenRow) -> str:
    s = row_summary(row)
    text = f"{s['tokens']} tokens, {'EOS' if s['eos'] else 'no EOS'}; " + ", ".join(
        f"{c} {s[c]}" for c in RANK_CLASSES
    )
    if row.rm_values is not None:
        text += f"; RM score {s['score']:.3f}"
        if s["others_mean"] is not None:
            text += f" (other tokens: mean {s['others_mean']:.2f}, {s['others_negative']:.0%} negative)"
    return text


def visible_positions(row: TokenRow, pads_shown: int) -> tuple[list[int], int]:
    """Positions to draw (all up to the EOS, then `pads_shown` pads) and how many pads are left out."""
    shown, hidden, pads = [], 0, 0
    for i, kind in enumerate(row.kinds):
        if kind == "pad" and i > row.length - 1:
            pads += 1
            if pads > pads_shown:
                hidden += 1
                continue
        shown.append(i)
    return shown, hidden


# ----------------------------------------------------------------------------------------------
# Terminal (rich)
# ----------------------------------------------------------------------------------------------
TERMINAL_STYLES = {
    "unshifted": "green",
    "marginal": "black on yellow",
    "shifted": "white on red",
    None: "dim italic",
}


def print_terminal(view: TokenView, pads_shown: int, console: Any = None) -> None:
    """Interlinear text: each token (coloured by rank class), its rank and the RM's output under it."""
    from rich.cells import cell_len
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    console.rule(
        f"[bold]{view.split} query {view.query_index}[/bold]: ranks under {view.settings['base_model']}"
    )
    console.print(Text(view.query, style="dim"))
    console.print(
        Text(
            f"(query: {view.query_length} tokens, {view.query_pads} of them left [PAD], Detail 2.3)",
            style="dim",
        )
    )
    legend = Text("rank under the base model: ")
    for name, description in (
        ("unshifted", "top-1"),
        ("marginal", f"top-{MARGINAL_TOP_K}"),
        ("shifted", "lower"),
    ):
        legend.append(f" {name} ({description}) ", style=TERMINAL_STYLES[name]).append("  ")
    if any(row.rm_values is not None for row in view.rows):
        legend.append(
            "lines: token / rank / RM output (bold: the reward, Detail 12; the rest is untrained, Detail 13)"
        )
    else:
        legend.append("lines: token / rank")
    console.print(legend)
    for row in view.rows:
        console.print()
        console.print(Text.assemble((row.label, "bold"), f"  {summary_text(row)}"))
        console.print(Text(f"  {row.source}" + "".join(f"; {note}" for note in row.notes), style="dim"))
        positions, hidden = visible_positions(row, pads_shown)
        cells = []
        for i in positions:
            rank = "" if row.ranks[i] is None else str(row.ranks[i])
            value = "" if row.rm_values is None else f"{row.rm_values[i]:.1f}"
            style = TERMINAL_STYLES[row.classes[i]] + (" bold underline" if row.kinds[i] == "eos" else "")
            value_style = ("bold " if i == row.scored_index else "") + (
                "blue" if row.rm_values and row.rm_values[i] >= 0 else "magenta"
            )
            cells.append((row.texts[i], style, rank, value, value_style))
        if hidden:
            cells.append((f"+{hidden} [PAD]", TERMINAL_STYLES[None], "", "", ""))
        line: list[tuple[str, str, str, str, str, int]] = []
        used = 0
        for cell in [*cells, None]:
            width = 0 if cell is None else max(cell_len(cell[0]), len(cell[2]), len(cell[3])) + 1
            if line and (cell is None or used + width > console.width):
                token_line, rank_line, value_line = Text(), Text(), Text()
                for text, style, rank, value, value_style, w in line:
                    token_line.append(text, style=style).append(" " * (w - cell_len(text)))
                    rank_line.append(rank.ljust(w), style="dim")
                    value_line.append(value.ljust(w), style=value_style)
                for text_line in (
                    (token_line, rank_line, value_line)
                    if row.rm_values is not None
                    else (token_line, rank_line)
                ):
                    console.print(text_line, no_wrap=True, overflow="ignore", crop=False)
                line, used = [], 0
            if cell is not None:
                line.append((*cell, width))
                used += width


# ----------------------------------------------------------------------------------------------
# HTML (one self-contained file: inline CSS, no scripts, no external resources)
# ----------------------------------------------------------------------------------------------
HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 80em; color: #222; }
pre.query { background: #f6f6f6; padding: .6em; white-space: pre-wrap; font-size: 90%; }
.legend span.tok { display: inline-block; margin-right: .6em; }
.tokens { display: flex; flex-wrap: wrap; gap: 3px 2px; font-family: ui-monospace, monospace; margin: 4px 0; }
.tok { display: inline-flex; flex-direction: column; align-items: center; min-width: 1.4em; }
.tok .t { white-space: pre; padding: 1px 2px; border-radius: 3px; }
.tok .r { font-size: 70%; color: #666; }
.tok .v { font-size: 70%; padding: 0 2px; border-radius: 2px; }
.unshifted .t { background: #d8f0dc; }
.marginal .t { background: #ffe98a; }
.shifted .t { background: #f5a3a3; }
.eos .t { outline: 2px solid #222; font-weight: bold; }
.pad .t { background: #e8e8e8; color: #888; font-style: italic; }
.scored .v { outline: 1px solid #222; font-weight: bold; }
.row h2 { font-size: 110%; margin: 1.2em 0 .1em; }
.meta, .notes { color: #555; font-size: 85%; }
"""


def rm_background(value: float, scale: float) -> str:
    """Blue for positive, red for negative RM outputs, stronger the larger (relative to the largest)."""
    alpha = min(1.0, abs(value) / scale) * 0.55 if scale > 0 else 0.0
    return f"rgba(40,90,200,{alpha:.2f})" if value >= 0 else f"rgba(200,40,40,{alpha:.2f})"


def html_view(view: TokenView, pads_shown: int) -> str:
    e = html.escape
    values = [abs(v) for row in view.rows for v in (row.rm_values or [])]
    scale = max(values, default=0.0)
    title = f"Token view: {view.split} query {view.query_index}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{HTML_STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        '<p class="legend">Each token is coloured by its rank under the base model <code>'
        f"{e(str(view.settings['base_model']))}</code> given the query and the response so far: "
        '<span class="tok unshifted"><span class="t">unshifted</span></span> top-1, '
        f'<span class="tok marginal"><span class="t">marginal</span></span> top-{MARGINAL_TOP_K}, '
        '<span class="tok shifted"><span class="t">shifted</span></span> lower. '
        "Under each token: its rank, then the reward model's output at that position "
        "(outlined: the reward, read at the last non-pad token, Detail 12; the other outputs were "
        'never trained, Detail 13). <span class="tok eos"><span class="t">[EOS]</span></span> and '
        '<span class="tok pad"><span class="t">[PAD]</span></span> are markers.</p>',
        f'<h2>Query</h2><pre class="query">{e(view.query)}</pre>',
        f'<p class="meta">{view.query_length} query tokens, {view.query_pads} of them left [PAD] '
        "(Detail 2.3)</p>",
    ]
    for row in view.rows:
        summary = row_summary(row)
        attributes = " ".join(f'data-{k.replace("_", "-")}="{e(str(v))}"' for k, v in summary.items())
        parts.append(f'<section class="row" data-row="{e(row.name)}" {attributes}>')
        parts.append(f'<h2>{e(row.label)} <span class="meta">{e(summary_text(row))}</span></h2>')
        parts.append(f'<p class="notes">{e(row.source)}{"".join("; " + e(n) for n in row.notes)}</p>')
        parts.append('<div class="tokens">')
        positions, hidden = visible_positions(row, pads_shown)
        for i in positions:
            rank, kind, cls = row.ranks[i], row.kinds[i], row.classes[i]
            classes = " ".join(
                c
                for c in (
                    "tok",
                    kind if kind != "token" else None,
                    cls,
                    "scored" if i == row.scored_index and row.rm_values is not None else None,
                )
                if c
            )
            tooltip = [f"id {row.token_ids[i]}"]
            data = [f'data-pos="{i}"', f'data-id="{row.token_ids[i]}"']
            if rank is not None:
                tooltip.append(f"rank {rank} under the base model ({cls})")
                data.append(f'data-rank="{rank}"')
            value_html = ""
            if row.rm_values is not None:
                value = row.rm_values[i]
                tooltip.append(f"RM output {value:.4f}")
                data.append(f'data-rm="{value!r}"')
                value_html = (
                    f'<span class="v" style="background:{rm_background(value, scale)}">{value:.2f}</span>'
                )
            parts.append(
                f'<span class="{classes}" {" ".join(data)} title="{e(" · ".join(tooltip))}">'
                f'<span class="t">{e(row.texts[i])}</span>'
                f'<span class="r">{"" if rank is None else rank}</span>'
                f"{value_html}</span>"
            )
        if hidden:
            parts.append(
                f'<span class="tok pad more" data-count="{hidden}">'
                f'<span class="t">+{hidden} [PAD]</span></span>'
            )
        parts.append("</div></section>")
    settings = ", ".join(f"{k} {v}" for k, v in view.settings.items())
    parts.append(f'<p class="meta">Settings: {e(settings)}.</p></body></html>')
    return "\n".join(parts) + "\n"


def main(args: Args) -> TokenView:
    if args.html is not None and Path(args.html).is_dir():
        raise UserInputError(f"--html {args.html!r} is a directory; give a file name such as token_view.html")
    view = build_view(args)
    if args.terminal:
        print_terminal(view, args.pads_shown)
    if args.html is not None:
        write_text(args.html, html_view(view, args.pads_shown))
        print(f"wrote {args.html}")
    return view


if __name__ == "__main__":
    import tyro

    run_main(main, tyro.cli(Args, description=__doc__.splitlines()[0], use_underscores=True))
