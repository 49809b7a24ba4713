"""Reward-model stage: Bradley-Terry training on the comparisons, accuracy by split / batch / confidence,
normalisation on the SFT references (SPEC Details 10-16, G-2).

    python -m summarize_from_feedback_details.reward embedded --sft_model_path runs/sft__1__.../model
    torchrun --nproc_per_node 2 -m summarize_from_feedback_details.reward embedded --sft_model_path ...

Reads like the paper: SFT backbone + a scalar head (Detail 11) -> one epoch of -log sigmoid(r_chosen -
r_rejected) with the reward read at EOS (Detail 12) -> validation accuracy overall, per split, batch and
confidence (Detail 16), left- vs right-padding check (Detail 14) -> normalise so the SFT references score
0 on average (Detail 15) -> save (the bias and the references' score statistics are part of the checkpoint).

Evaluation only (the authors' `reward_eval` runs, for the calibration figures): `--total_episodes 0
--reward_model_path <rm run>/model` scores a trained RM, bias kept, with no update and writes the same
eval_comparisons.csv and metrics.json (no model/).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from summarize_from_feedback_details import lora
from summarize_from_feedback_details.core import (
    BatchPlan,
    Range,
    TrainArgs,
    UserInputError,
    cli,
    plan_batches,
    push_run_to_hub,
    training_schedule,
    validate_numbers,
)
from summarize_from_feedback_details.modeling import ScalarModel, disable_dropout, sequence_scores
from summarize_from_feedback_details.training import (
    Stage,
    batch_tensor,
    check_input_paths,
    check_vocabulary,
    evaluate_comparisons,
    load_optional_splits,
    load_processed_split,
    make_optimizer_and_scheduler,
    require_columns,
    shard_range,
)

PAIR_COLUMNS = ["query_chosen_token", "query_rejected_token", "query_token", "chosen_token", "rejected_token",
                "batch", "extra", "policies", "chosen_policy", "rejected_policy"]


@dataclass
class Args(TrainArgs, lora.LoraArgs):
    exp_name: str = "reward"
    """experiment name; the run is `{exp_name}__{seed}__{unix time}`"""
    sft_model_path: str = "models/sft_model"
    """Detail 10: the SFT checkpoint the reward model starts from (hub id or local path)"""
    reward_model_path: str | None = None
    """evaluation only (with --total_episodes 0, the authors' `reward_eval` runs): score this trained RM checkpoint,
    its normalisation bias kept, instead of training a new one; writes eval_comparisons.csv and metrics.json, no model/"""
    dataset: str = "datasets/tldr"
    """output directory of `tldr_dataset` (with preference/, sft/ and tokenizer/) or a hub id"""
    sft_dataset: str | None = None
    """hub id of the processed SFT data for the normalisation (default: `{dataset}/sft`)"""
    batch_size: int = 64
    """global batch of comparisons = local_micro_batch_size x accumulation x processes"""
    local_micro_batch_size: int = 8
    """comparisons per forward pass per process (each is two sequences)"""
    local_eval_batch_size: int = 32
    """comparisons per evaluation forward per process"""
    per_rank_shuffle: bool = False
    """G-2 known deviation of the authors: every rank shuffles with its own permutation (about a third of the pairs never seen)"""
    normalize_reward: bool = True
    """Detail 15: store the mean score of the SFT train references as the bias, so references average 0"""
    normalization_samples: int | None = None
    """score only the first N SFT train references for the bias and their statistics (default: all)"""
    eval_splits: tuple[str, ...] = ("validation", "validation_cnndm")
    """preference splits scored at the end (Detail 16)"""
    max_eval_samples: int | None = None
    """score only the first N comparisons of each split (default: all)"""
    padding_check_samples: int = 256
    """Detail 14: validation pairs scored both left- and right-padded (0: no check; the released code had none, it
    changes only the logged eval/padding/* metrics)"""


def bradley_terry_loss(chosen: Any, rejected: Any) -> Any:
    """Detail 10: -log sigmoid(r_chosen - r_rejected), mean over pairs."""
    import torch.nn.functional as F

    # Detail 10: the Bradley-Terry loss of the paper.
    return -F.logsigmoid(chosen - rejected).mean()


def pair_scores(model: Any, chosen: Any, rejected: Any, pad: int) -> tuple[Any, Any]:
    """Scores of right-padded `query + chosen` and `query + rejected` in one forward pass (Detail 12)."""
    import torch

    scores = sequence_scores(model, torch.cat([chosen, rejected]), pad)  # Detail 12: read at EOS
    return scores[: len(chosen)], scores[len(chosen):]


def reference_score_stats(scores: list[float], shift: float) -> dict[str, float]:
    """Detail 15: mean, std (n - 1, as the authors' pandas), min, max and count of the SFT references' scores
    minus `shift` (the bias added by this run), i.e. their scores under the saved, normalised RM (mean ~0)."""
    import torch

    shifted = torch.tensor(scores, dtype=torch.float64) - shift
    std = float(shifted.std()) if len(scores) > 1 else 0.0
    return {"mean": float(shifted.mean()), "std": std, "min": float(shifted.min()), "max": float(shifted.max()),
            "count": len(scores)}


def main(args: Args) -> dict[str, Any]:
    import pandas as pd
    import torch
    from accelerate.utils import gather_object

    # An evaluation-only run (the authors' `reward_eval`): 0 updates of a trained RM, scored as it was saved.
    validate_numbers(args, {"total_episodes": Range("the comparisons to train on (0: evaluate --reward_model_path)", low=0)})
    eval_only = args.total_episodes == 0
    if eval_only and args.reward_model_path is None:
        raise UserInputError("--total_episodes 0 trains nothing: pass --reward_model_path <rm run>/model to evaluate a "
                             "trained reward model, or train with --total_episodes > 0")
    if args.reward_model_path is not None and not eval_only:
        raise UserInputError("--reward_model_path evaluates a trained reward model without training it: add "
                             "--total_episodes 0 (continuing to train a reward model is not supported)")
    # every input path before any work: a bad input leaves no run folder
    check_input_paths(args, datasets=["dataset", "sft_dataset"], causal_lms=[] if eval_only else ["sft_model_path"],
                      reward_models=["reward_model_path"])
    lora.check_args(args)
    stage = Stage.start(args)
    model_path = args.reward_model_path if eval_only else args.sft_model_path
    # ---- data (checked before any model is loaded)
    train = load_processed_split(args.dataset, "preference", "train")
    require_columns(train, ["query_chosen_token", "query_rejected_token"], f"{args.dataset} preference/train")
    eval_data = load_optional_splits(args.dataset, "preference", args.eval_splits, say=stage.print)  # absent/empty: skipped
    for split, ds in eval_data.items():
        require_columns(ds, PAIR_COLUMNS, f"{args.dataset} preference/{split}")
    references = load_processed_split(args.sft_dataset or args.dataset, "sft", "train") if args.normalize_reward else None
    if references is not None:
        require_columns(references, ["query_reference_response_token"], "SFT train (normalisation)")
    tokenizer = stage.load_tokenizer(args.dataset, model_path, args.allow_pad_equals_eos)
    total = args.total_episodes if args.total_episodes is not None else args.num_train_epochs * len(train)
    if eval_only:  # no update: one micro-batch per process stands in for the plan the accelerator is built from
        plan = BatchPlan(stage.world_size, args.local_micro_batch_size, 1, args.local_micro_batch_size * stage.world_size, 0)
        stage.print(f"reward model: evaluating {model_path} (0 updates)")
    else:
        plan = plan_batches(args.batch_size, args.local_micro_batch_size, stage.world_size, total, "reward model")
        stage.print(f"reward model: {len(train)} comparisons, {plan}")
    stage.open_run()

    # ---- model: Detail 10/11, SFT backbone + Linear(d, 1) head ~ N(0, 1/sqrt(d+1)); dropout off (Detail 7)
    # Detail 10/11: SFT backbone + new head; Detail 7: dropout off.
    # Evaluation only: the trained RM as saved, bias included (Detail 15).
    # fp32 master weights (TRAINED_DTYPE, the loaders' default) whatever dtype the checkpoint records.
    model = disable_dropout(ScalarModel.from_pretrained(model_path) if eval_only else ScalarModel.from_backbone(model_path))
    check_vocabulary(model.config.backbone_config, tokenizer, model_path)
    if not eval_only:  # --lora_r: adapters on the backbone, the head trains fully; --gradient_checkpointing (lora.py)
        model = lora.prepare_trained(model, args, model_path)
    optimizer, scheduler = make_optimizer_and_scheduler(model, args.lr, args.eps, args.scheduler, args.warm_up_steps, plan.num_updates)
    accelerator = stage.accelerator(plan)
    # The scheduler stays unprepared: accelerate would step it once per process per update.
    model, optimizer = accelerator.prepare(model, optimizer)
    resumed = stage.restore(accelerator, scheduler)  # --resume: weights, optimizer, scheduler, RNG states
    pad = tokenizer.pad_token_id

    # ---- train: G-2, each comparison once per epoch across all processes (one sharded permutation)
    # Detail G-2: one sharded permutation per epoch (--per_rank_shuffle: the authors' per-rank permutations).
    updates = [] if eval_only else training_schedule(len(train), plan, stage.rank, args.seed, args.per_rank_shuffle)
    done = resumed["update"] if resumed else 0  # the data position: the schedule is a pure function of the seed
    model.train()
    start = time.time() - (resumed["seconds"] if resumed else 0.0)
    for update, micro_batches in enumerate(stage.progress(updates[done:], "RM updates"), start=done + 1):
        stats = []
        for indices in micro_batches:
            rows = train.select(indices)
            with accelerator.accumulate(model):
                chosen, rejected = pair_scores(model, batch_tensor(rows, "query_chosen_token", accelerator.device),
                                               batch_tensor(rows, "query_rejected_token", accelerator.device), pad)
                loss = bradley_terry_loss(chosen, rejected)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            stats.append(torch.stack([loss.detach(), (chosen > rejected).float().mean().detach(), (chosen - rejected).mean().detach()]))
        scheduler.step()  # once per update, after the accumulated optimizer step
        if update % args.logging_steps == 0 or update == plan.num_updates:
            loss, accuracy, margin = accelerator.gather(torch.stack(stats).mean(0)[None]).mean(0).tolist()
            stage.log({"train/loss": loss, "train/accuracy": accuracy, "train/margin": margin, "train/lr": scheduler.get_last_lr()[0],
                       "train/episodes": update * plan.batch_size}, update)
        stage.end_update(update, accelerator, scheduler, time.time() - start, {})  # --save_every, SIGTERM / SIGUSR1
    metrics: dict[str, Any] = {"train/seconds": round(time.time() - start, 1)}
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()

    # ---- evaluate: Detail 16, accuracy overall / per split / batch / confidence; every pair's scores saved
    def score_pairs(batch: Any) -> tuple[Any, Any]:
        return pair_scores(unwrapped, batch_tensor(batch, "query_chosen_token", accelerator.device),
                           batch_tensor(batch, "query_rejected_token", accelerator.device), pad)

    with torch.no_grad():
        metrics.update(evaluate_comparisons(stage, eval_data, score_pairs, args.max_eval_samples, args.local_eval_batch_size))
        # Detail 14: [left-padded query | right-padded response] vs right-padded query.strip() + response
        padding_diffs: list[float] = []
        if "validation" in eval_data:
            n = min(args.padding_check_samples, len(eval_data["validation"]))
            shard = shard_range(n, stage.rank, stage.world_size)
            for start_index in range(shard.start, shard.stop, args.local_eval_batch_size):
                batch = eval_data["validation"].select(range(start_index, min(start_index + args.local_eval_batch_size, shard.stop)))
                query = batch_tensor(batch, "query_token", accelerator.device)
                chosen = sequence_scores(unwrapped, batch_tensor(batch, "query_chosen_token", accelerator.device), pad)
                left = sequence_scores(unwrapped, torch.cat([query, batch_tensor(batch, "chosen_token", accelerator.device)], 1),
                                       pad, context_length=query.size(1))
                padding_diffs.extend((left - chosen).tolist())
    diffs = gather_object(padding_diffs)
    if stage.is_main and diffs:
        abs_diffs = torch.tensor(diffs).abs()
        metrics["eval/padding/mean_abs_diff"] = float(abs_diffs.mean())
        metrics["eval/padding/share_above_1e-2"] = float((abs_diffs > 1e-2).float().mean())

    # ---- normalise on the SFT references; the bias and the references' score statistics are stored in the config
    if references is not None:  # Detail 15: references score 0 on average after this (a trained RM: measured only)
        n = len(references) if args.normalization_samples is None else min(args.normalization_samples, len(references))
        shard = shard_range(n, stage.rank, stage.world_size)
        scores = []
        with torch.no_grad():
            for start_index in range(shard.start, shard.stop, args.local_eval_batch_size):
                batch = references.select(range(start_index, min(start_index + args.local_eval_batch_size, shard.stop)))
                scores.extend(sequence_scores(unwrapped, batch_tensor(batch, "query_reference_response_token", accelerator.device), pad).tolist())
        all_scores = gather_object(scores)
        shift = 0.0 if eval_only else float(torch.tensor(all_scores).mean())  # an evaluated RM keeps its bias
        bias = unwrapped.config.bias + shift
        unwrapped.config.bias = bias
        # Detail 15: the references' scores under the normalised RM (mean ~0, std, min, max), saved with it.
        unwrapped.config.normalization_stats = reference_score_stats(all_scores, shift)
        metrics.update({"normalization/bias": bias, "normalization/references": len(all_scores),
                        **{f"normalization/{k}": v for k, v in unwrapped.config.normalization_stats.items() if k != "count"}})
        if stage.is_main and not eval_only:
            table = pd.read_csv(stage.run_dir / "eval_comparisons.csv")
            table[["chosen_score", "rejected_score"]] -= shift
            table.to_csv(stage.run_dir / "eval_comparisons.csv", index=False)
    stage.log({k: v for k, v in metrics.items() if k.count("/") <= 1 or k.startswith("eval/accuracy/split")}, plan.num_updates)

    if not eval_only:  # an evaluation-only run saves no model
        stage.save_model(accelerator, model, tokenizer)
    summary = stage.finish({**metrics, "num_updates": plan.num_updates})
    if args.push_to_hub and stage.is_main and not eval_only:
        summary["hub_url"] = push_run_to_hub(stage.run_dir / "model", args, stage.run_name, f"{Path(args.sft_model_path).name}__reward__tldr")
    return summary


def embedded_args() -> Args:
    """The reward model on the embedded offline task (needs an SFT run; pass --sft_model_path)."""
    from summarize_from_feedback_details.embedded import EMBEDDED_LR

    return Args(dataset="datasets/embedded", lr=EMBEDDED_LR, batch_size=32, local_micro_batch_size=16, local_eval_batch_size=64)


PRESETS = {
    "pythia": ("The paper: from the SFT checkpoint, lr 3e-6, batch 64, 1 epoch, bf16 on GPU.", Args(mixed_precision="bf16")),
    "embedded": ("The embedded offline task on CPU (pass --sft_model_path of an embedded SFT run).", embedded_args()),
}

if __name__ == "__main__":
    cli(PRESETS, main, description=__doc__.splitlines()[0])
