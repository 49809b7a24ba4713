"""DPO stage: the direct-preference baseline of the paper, trained from the SFT model on the comparisons
with a frozen SFT reference (SPEC "DPO", Detail 19).

    python -m summarize_from_feedback_details.dpo embedded --sft_model_path runs/sft_embedded/model \\
        --reward_model_path runs/reward_embedded/model       # the RM only scores the evaluation samples
    torchrun --nproc_per_node 2 -m summarize_from_feedback_details.dpo embedded ...

Reads like the paper: policy and frozen reference from SFT -> one epoch of the sigmoid DPO loss with beta
0.05 on log-probs summed over the response tokens -> implicit-reward accuracy on the validation
comparisons per split / batch / confidence (Detail 19) -> sample up to 128 tokens at T 0.01 on
validation and test, saved as `query_responses_{split}` tables like PPO's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from summarize_from_feedback_details import lora
from summarize_from_feedback_details.core import (
    TrainArgs,
    cli,
    plan_batches,
    push_run_to_hub,
    training_schedule,
    validate_numbers,
)
from summarize_from_feedback_details.modeling import (
    FROZEN_DTYPE,
    ScalarModel,
    disable_dropout,
    sequence_logprobs,
)
from summarize_from_feedback_details.training import (
    Stage,
    batch_tensor,
    check_input_paths,
    evaluate_comparisons,
    evaluate_generations,
    load_causal_lm,
    load_optional_splits,
    load_processed_split,
    make_optimizer_and_scheduler,
    require_columns,
)

PAIR_COLUMNS = ["query_chosen_token", "query_rejected_token", "query_chosen_token_response_label",
                "query_rejected_token_response_label"]
LABEL_COLUMNS = ["batch", "extra", "policies", "chosen_policy", "rejected_policy"]


@dataclass
class Args(TrainArgs, lora.LoraArgs):
    exp_name: str = "dpo"
    """experiment name; the run is `{exp_name}__{seed}__{unix time}`"""
    sft_model_path: str = "models/sft_model"
    """the SFT checkpoint: the policy starts from it and the frozen reference is a copy of it"""
    dataset: str = "datasets/tldr"
    """output directory of `tldr_dataset` (with preference/, sft/ and tokenizer/) or a hub id"""
    reward_model_path: str | None = None
    """a reward model to score the evaluation samples with (optional; DPO itself never uses one)"""
    batch_size: int = 64
    """global batch of comparisons = local_micro_batch_size x accumulation x processes"""
    local_micro_batch_size: int = 8
    """comparisons per forward pass per process (each is two sequences)"""
    beta: float = 0.05
    """DPO beta: strength of the implicit KL constraint to the reference"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO's sigmoid loss, or IPO's squared loss"""
    label_smoothing: float = 0.0
    """sigmoid loss only: assumed share of flipped labels (conservative DPO)"""
    per_rank_shuffle: bool = False
    """G-2 known deviation of the authors: every rank shuffles with its own permutation (about a third of the pairs never seen)"""
    comparison_splits: tuple[str, ...] = ("validation", "validation_cnndm")
    """Detail 19: preference splits on which the implicit-reward accuracy is measured"""
    eval_splits: tuple[str, ...] = ("validation", "test")
    """SFT splits sampled at the end and saved as `query_responses_{split}` tables"""
    eval_response_length: int = 128
    """tokens sampled per query at evaluation (the authors' 128; 53 matches PPO)"""
    temperature: float = 0.01
    """sampling temperature of the evaluation"""
    local_eval_batch_size: int = 16
    """queries (or comparisons) per evaluation forward per process"""
    max_eval_samples: int | None = None
    """use only the first N rows of each evaluation split (default: all)"""
    rouge_stemmer: bool = False
    """Detail 9: Porter-stem words before ROUGE (the authors' `evaluate` default does not; stemming adds ~0.01 to ROUGE-L)"""
    eval_before_training: bool = False
    """also sample from the SFT policy before training (metrics prefixed `sft/`)"""
    gold_eval: bool = False
    """score responses with the embedded task's gold utility (win rate against references; embedded data only)"""


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """The DPO loss on summed response log-probs: with h = (log pi_c - log pi_r) - (log ref_c - log ref_r),
    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); IPO: (h - 1 / (2 beta))^2."""
    # Detail DPO: the loss compares the policy's and the reference's log-ratio of chosen over rejected.
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "ipo":
        return ((margin - 1 / (2 * beta)) ** 2).mean()
    return (-F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing).mean()


def pair_logprobs(model: Any, rows: Any, pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of chosen and rejected (`query.strip() + response`, right-padded), one forward."""
    tokens = torch.cat([batch_tensor(rows, "query_chosen_token", device), batch_tensor(rows, "query_rejected_token", device)])
    labels = torch.cat([batch_tensor(rows, "query_chosen_token_response_label", device),
                        batch_tensor(rows, "query_rejected_token_response_label", device)])
    logprobs = sequence_logprobs(model, tokens, labels, pad)
    return logprobs[: len(rows)], logprobs[len(rows):]


def main(args: Args) -> dict[str, Any]:
    validate_numbers(args)  # every number, then every input path, before any work: a bad input leaves no run folder
    check_input_paths(args, datasets=["dataset"], causal_lms=["sft_model_path"], reward_models=["reward_model_path"])
    lora.check_args(args)
    stage = Stage.start(args)
    # ---- data (checked before any model is loaded)
    train = load_processed_split(args.dataset, "preference", "train")
    require_columns(train, PAIR_COLUMNS, f"{args.dataset} preference/train")
    comparisons = load_optional_splits(args.dataset, "preference", args.comparison_splits, say=stage.print)  # absent/empty: skipped
    for split, ds in comparisons.items():
        require_columns(ds, PAIR_COLUMNS + LABEL_COLUMNS, f"{args.dataset} preference/{split}")
    eval_data = load_optional_splits(args.dataset, "sft", args.eval_splits, say=stage.print)
    for split, ds in eval_data.items():
        require_columns(ds, ["query_token", "query", "reference_response", "reference_response_token"], f"{args.dataset} sft/{split}")
    tokenizer = stage.load_tokenizer(args.dataset, args.sft_model_path, args.allow_pad_equals_eos)
    total = args.total_episodes if args.total_episodes is not None else args.num_train_epochs * len(train)
    plan = plan_batches(args.batch_size, args.local_micro_batch_size, stage.world_size, total, "DPO")
    stage.print(f"DPO: {len(train)} comparisons, {plan}, beta {args.beta}, {args.loss_type} loss")
    stage.open_run()

    # ---- models: policy and frozen reference from SFT, dropout off (Detail 7)
    policy = load_causal_lm(args.sft_model_path, tokenizer)  # Detail 7
    policy = lora.prepare_trained(policy, args, args.sft_model_path)  # --lora_r, --gradient_checkpointing (lora.py)
    # The policy in fp32 (the loader's default), the frozen reference in FROZEN_DTYPE (fp32, as the released DPO's).
    # With LoRA no copy: the reference is the policy with its adapters switched off (`lora.reference`).
    reference = None if args.lora_r else load_causal_lm(args.sft_model_path, tokenizer, dtype=FROZEN_DTYPE).eval().requires_grad_(False)
    reward_model = None
    if args.reward_model_path is not None:
        reward_model = disable_dropout(ScalarModel.from_pretrained(args.reward_model_path, dtype=FROZEN_DTYPE)).eval().requires_grad_(False)
    optimizer, scheduler = make_optimizer_and_scheduler(policy, args.lr, args.eps, args.scheduler, args.warm_up_steps, plan.num_updates)
    accelerator = stage.accelerator(plan)  # Detail 8
    policy, optimizer = accelerator.prepare(policy, optimizer)  # the scheduler stays unprepared (stepped once per update)
    resumed = stage.restore(accelerator, scheduler)  # --resume: weights, optimizer, scheduler, RNG, metrics so far
    device = accelerator.device
    if reference is not None:
        reference.to(device)
    if reward_model is not None:
        reward_model.to(device)
    pad = tokenizer.pad_token_id

    metrics: dict[str, Any] = resumed["state"]["metrics"] if resumed else {}
    if args.eval_before_training and not resumed:
        metrics.update(evaluate_generations(stage, policy, eval_data, tokenizer, args.eval_response_length, args, prefix="sft",
                                            temperature=args.temperature, reward_model=reward_model, gold=args.gold_eval,
                                            table_name="sft_query_responses"))

    # ---- train: one epoch of the DPO loss; G-2: each comparison once per epoch over all processes
    updates = training_schedule(len(train), plan, stage.rank, args.seed, args.per_rank_shuffle)
    done = resumed["update"] if resumed else 0  # the data position: the schedule is a pure function of the seed
    policy.train()
    start = time.time() - (resumed["seconds"] if resumed else 0.0)
    for update, micro_batches in enumerate(stage.progress(updates[done:], "DPO updates"), start=done + 1):
        stats = []
        for indices in micro_batches:
            rows = train.select(indices)
            with torch.no_grad(), lora.reference(reference, accelerator.unwrap_model(policy)) as ref_model:
                ref_chosen, ref_rejected = pair_logprobs(ref_model, rows, pad, device)
            with accelerator.accumulate(policy):
                chosen, rejected = pair_logprobs(policy, rows, pad, device)  # Detail DPO: response tokens only
                loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta, args.loss_type, args.label_smoothing)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            with torch.no_grad():
                chosen_reward, rejected_reward = args.beta * (chosen - ref_chosen), args.beta * (rejected - ref_rejected)
                stats.append(torch.stack([loss, (chosen_reward > rejected_reward).float().mean(), chosen_reward.mean(),
                                          rejected_reward.mean(), (chosen_reward - rejected_reward).mean(), chosen.mean(), rejected.mean()]))
        scheduler.step()  # once per update, after the accumulated optimizer step
        if update % args.logging_steps == 0 or update == plan.num_updates:
            values = accelerator.gather(torch.stack(stats).mean(0)[None]).mean(0).tolist()
            names = ["loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
            stage.log({**{f"train/{k}": v for k, v in zip(names, values, strict=True)}, "train/lr": scheduler.get_last_lr()[0],
                       "train/episodes": update * plan.batch_size}, update)
        stage.end_update(update, accelerator, scheduler, time.time() - start, {"metrics": metrics})  # --save_every, SIGTERM
    metrics["train/seconds"] = round(time.time() - start, 1)
    unwrapped = accelerator.unwrap_model(policy)
    unwrapped.eval()

    # ---- Detail 19: implicit reward beta * (log pi - log ref) of chosen vs rejected, per split / batch / confidence
    def implicit_rewards(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = pair_logprobs(unwrapped, batch, pad, device)
        with lora.reference(reference, unwrapped) as ref_model:
            ref_chosen, ref_rejected = pair_logprobs(ref_model, batch, pad, device)
        return args.beta * (chosen - ref_chosen), args.beta * (rejected - ref_rejected)  # Detail 19

    with torch.no_grad():
        metrics.update(evaluate_comparisons(stage, comparisons, implicit_rewards, args.max_eval_samples, args.local_eval_batch_size))

    # ---- Detail DPO: sample up to eval_response_length (128) tokens at T 0.01 on validation and test, tables like PPO's
    metrics.update(evaluate_generations(stage, policy, eval_data, tokenizer, args.eval_response_length, args, prefix="eval",
                                        temperature=args.temperature, reward_model=reward_model, gold=args.gold_eval,
                                        table_name="query_responses"))
    stage.log({k: v for k, v in metrics.items() if k.count("/") <= 2 and not k.startswith("eval/accuracy/batch")}, plan.num_updates)

    stage.save_model(accelerator, policy, tokenizer)
    summary = stage.finish({**metrics, "num_updates": plan.num_updates})
    if args.push_to_hub and stage.is_main:
        summary["hub_url"] = push_run_to_hub(stage.run_dir / "model", args, stage.run_name, f"{Path(args.sft_model_path).name}__dpo__tldr")
    return summary


def embedded_args() -> Args:
    """DPO on the embedded offline task (pass --sft_model_path, and --reward_model_path to score samples)."""
    from summarize_from_feedback_details.embedded import EMBEDDED_DPO_LR

    return Args(dataset="datasets/embedded", lr=EMBEDDED_DPO_LR, batch_size=32, local_micro_batch_size=16, local_eval_batch_size=100,
                eval_before_training=True, gold_eval=True)


PRESETS = {
    "pythia": ("The paper's DPO baseline: from SFT, beta 0.05, batch 64, 1 epoch, lr 3e-6 cosine, bf16 on GPU.", Args(mixed_precision="bf16")),
    "embedded": ("The embedded offline task on CPU (pass --sft_model_path of an embedded SFT run).", embedded_args()),
}

if __name__ == "__main__":
    cli(PRESETS, main, description=__doc__.splitlines()[0])
