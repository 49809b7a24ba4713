"""RLOO stage (and GRPO): RLHF of the SFT policy against the frozen reward model without a critic, k samples per
prompt, with the same details as `ppo.py` (fixed-length sampling, truncation after the first EOS, the EOS trick,
temperature-scaled log-probs, Details 20-23, P-1).

    python -m summarize_from_feedback_details.rloo embedded --sft_model_path runs/sft_embedded/model \\
        --reward_model_path runs/reward_embedded/model                                      # RLOO, k = 2
    python -m summarize_from_feedback_details.rloo embedded ... --rloo_k 4
    python -m summarize_from_feedback_details.rloo embedded ... --baseline grpo                # GRPO (KL in the loss)
    torchrun --nproc_per_node 2 -m summarize_from_feedback_details.rloo embedded ...        # 2 processes on CPU

Reads like the method (Ahmadian et al. 2024; GRPO: Shao et al. 2024): policy and reference from SFT, reward model
from the RM -> for each update: take --batch_size / --rloo_k SFT train queries (Detail 21), sample each --rloo_k
times a fixed number of tokens (23.1), score the responses truncated after their first EOS (23.2) with -1 for a
missing EOS (23.3); sequence reward = score - beta x the summed per-token KL (R-2); advantage = reward minus the mean
of the other k - 1 samples' rewards (R-3; GRPO: standardised within the group), optionally whitened (R-4) ->
--num_ppo_epochs passes of the clipped surrogate over the response tokens (R-5; or plain REINFORCE) -> log (P-5),
evaluate (P-6) -> save the policy. The outputs are ppo.py's: metrics.json (first/, last/), TensorBoard, the
query_responses tables, samples/, model/.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from summarize_from_feedback_details import lora
from summarize_from_feedback_details.core import UserInputError, cli, push_run_to_hub, validate_numbers
from summarize_from_feedback_details.modeling import (
    entropy_from_logits,
    gather_logprobs,
    masked_mean,
    masked_whiten,
    response_logits,
)
from summarize_from_feedback_details.rl import (
    INVALID_LOGPROB,
    PPOPlan,
    RLArgs,
    clipped_policy_loss,
    frozen_engines_config,
    history_step,
    load_frozen_models,
    load_prompts,
    per_token_kl,
    plan_ppo,
    policy_statistics,
    prompt_batches,
    response_masks,
    sample_and_score,
    sample_validation_batch,
    save_samples,
)
from summarize_from_feedback_details.training import (
    Stage,
    batch_tensor,
    check_input_paths,
    evaluate_generations,
    frozen_engine,
    load_causal_lm,
    make_optimizer_and_scheduler,
)


@dataclass
class Args(RLArgs):
    """RLOO's arguments: the shared RL arguments (`rl.RLArgs`; --batch_size counts rollouts, prompts x --rloo_k) and
    the group's."""

    exp_name: str = "rloo"
    """experiment name; the run is `{exp_name}__{seed}__{unix time}`"""
    rloo_k: int = 2
    """R-1: samples per prompt (>= 2); --batch_size counts prompts x k and the k samples of a prompt stay on one process"""
    baseline: Literal["rloo", "grpo"] = "rloo"
    """R-3: the advantage: reward minus the mean of the other k - 1 samples' rewards (rloo), or the reward standardised
    by the group's mean and standard deviation (grpo)"""
    kl_in_reward: bool | None = None
    """R-2: subtract beta x the summed per-token KL from the sequence reward (RLOO), or add beta x the k3 KL estimate
    per token to the loss (GRPO); default: in the reward for --baseline rloo, in the loss for --baseline grpo"""
    whiten_advantages: bool = False
    """R-4: whiten the sequence advantages over the process's batch (TRL's normalize_advantage; off in RLOO/GRPO)"""
    loss: Literal["ppo_clip", "reinforce"] = "ppo_clip"
    """R-5: the clipped surrogate over the response tokens (--cliprange), or the plain REINFORCE estimator
    -A x sum of the response log-probs (meant for --num_ppo_epochs 1)"""
    grpo_eps: float = 1e-4
    """R-3: added to the group's standard deviation in --baseline grpo (TRL's GRPO)"""


# ----------------------------------------------------------------------------------------------
# The math of one RLOO update, as pure functions (tests pin each with hand-computed values)
# ----------------------------------------------------------------------------------------------
def check_groups(args: Args, world_size: int) -> None:
    """R-1: every process holds whole groups of k samples: --batch_size must be divisible by k x processes."""
    if args.rloo_k < 2:
        raise UserInputError(f"--rloo_k {args.rloo_k}: the baseline needs at least 2 samples per prompt; use --rloo_k 2 or more")
    if args.batch_size % (args.rloo_k * world_size):
        raise UserInputError(f"--batch_size {args.batch_size} (rollouts: prompts x --rloo_k) is not divisible by --rloo_k "
                             f"{args.rloo_k} x {world_size} processes; choose --batch_size as a multiple of {args.rloo_k * world_size}")


def grouped_prompt_batches(num_queries: int, batch_size: int, k: int, rank: int, world_size: int, seed: int) -> Any:
    """R-1 with Detail 21 / G-2: endless batches of this rank's rollout rows as SFT train query indices. Each update
    takes batch_size / k prompts (the same shuffled, disjoint slices per rank as PPO's prompts); this rank repeats
    each of ITS prompts k times in consecutive rows, so the k samples of a prompt are always on one process and the
    leave-one-out baseline never needs another process's rewards."""
    for prompts in prompt_batches(num_queries, batch_size // k, rank, world_size, seed):
        yield [index for index in prompts for _ in range(k)]


def sequence_rewards(scores: Any, kl: Any, kl_coef: float, kl_in_reward: bool) -> Any:
    """R-2: the sequence reward: the RM score (with the EOS trick) minus beta x the summed per-token KL (0 after the
    EOS), or the score alone when the KL is a loss term (GRPO)."""
    return scores - kl_coef * kl.sum(1) if kl_in_reward else scores


def group_advantages(rewards: Any, k: int, baseline: str, grpo_eps: float = 1e-4) -> Any:
    """R-3: advantages of rows grouped k at a time (rows i*k .. i*k + k - 1 are one prompt's samples).
    rloo: r_i - mean of the other k - 1 rewards of the group = k / (k - 1) x (r_i - group mean);
    grpo: (r_i - group mean) / (group standard deviation (unbiased) + grpo_eps)."""
    grouped = rewards.view(-1, k)
    if baseline == "rloo":
        leave_one_out = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
        return (grouped - leave_one_out).flatten()
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + grpo_eps)).flatten()


def whiten_sequence_advantages(advantages: Any) -> Any:
    """R-4: (A - mean) / sqrt(var + 1e-8) over the process's sequences (the masked_whiten of Detail 25, one value
    per sequence)."""
    return masked_whiten(advantages, torch.ones_like(advantages, dtype=torch.bool))


def rloo_losses(
    new_logprobs: Any, old_logprobs: Any, ref_logprobs: Any, advantages: Any, padding_mask: Any, args: Args, kl_in_reward: bool,
) -> dict[str, Any]:
    """R-5: the policy loss of one micro-batch from per-token log-probs (B, L) (INVALID_LOGPROB after the EOS) and
    sequence advantages (B,): ppo_clip broadcasts each sequence's advantage to its response tokens and takes
    rl.clipped_policy_loss (the clipped surrogate of P-4, averaged over the valid tokens); reinforce is
    -mean(A x sum of the valid tokens' log-probs). GRPO's KL (kl_in_reward False): + beta x the k3 estimate
    exp(ref - new) - (ref - new) - 1 averaged over the valid tokens. Also the logged statistics."""
    token_advantages = advantages[:, None].expand_as(new_logprobs)
    out = clipped_policy_loss(new_logprobs, old_logprobs, token_advantages, padding_mask, args.cliprange)
    if args.loss == "reinforce":
        out["pg_loss"] = -(advantages * new_logprobs.masked_fill(padding_mask, 0.0).sum(1)).mean()
    loss = out["pg_loss"]
    if not kl_in_reward:  # Detail R-2, GRPO: the KL as a loss term against the frozen reference
        log_ratio = ref_logprobs - new_logprobs
        out["kl_loss"] = masked_mean(torch.exp(log_ratio) - log_ratio - 1.0, ~padding_mask)
        loss = loss + args.kl_coef * out["kl_loss"]
    return {"loss": loss, **out}


class Policy(nn.Module):
    """The trained policy as one module whose forward gives the temperature-scaled logits of the response tokens (P-1),
    so the DDP / DeepSpeed wrapper sees the training forward."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, query_responses: torch.Tensor, pad_token_id: int, context_length: int, temperature: float | None,
                skip_left_padding: bool = False) -> torch.Tensor:
        return response_logits(self.policy, query_responses, pad_token_id, context_length, temperature, skip_left_padding)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> dict[str, Any]:
    import numpy as np

    validate_numbers(args)  # every number, then every input path, before any work: a bad input leaves no run folder
    lora.check_args(args)
    check_input_paths(args, datasets=["dataset"], causal_lms=["sft_model_path"], reward_models=["reward_model_path"])
    stage = Stage.start(args)
    # ---- data and sizes (checked before any model is loaded)
    train, eval_data, validation, tokenizer, response_length = load_prompts(args, stage)  # Detail 21, 23.1
    check_groups(args, stage.world_size)  # Detail R-1: whole groups per process
    plan = plan_ppo(args, stage.world_size)
    kl_in_reward = args.baseline == "rloo" if args.kl_in_reward is None else args.kl_in_reward  # Detail R-2
    if len(train) < args.batch_size // args.rloo_k:
        raise UserInputError(f"--batch_size {args.batch_size} / --rloo_k {args.rloo_k} exceeds the {len(train)} SFT train queries")
    frozen_config = frozen_engines_config(args)  # Detail 8
    stage.print(f"RLOO ({args.baseline}, k {args.rloo_k}, KL {'in the reward' if kl_in_reward else 'in the loss'}): {len(train)} "
                f"prompts, {plan.num_updates} updates of {args.batch_size} rollouts, {plan.mini}, response length {response_length}")
    stage.open_run()

    # ---- models: policy + reference from SFT, reward model from the RM (Detail 22 without the critic); dropout off (Detail 7)
    # Detail 7; fp32 master weights; --lora_r, --gradient_checkpointing (lora.py)
    model = Policy(lora.prepare_trained(load_causal_lm(args.sft_model_path, tokenizer), args, args.sft_model_path))
    ref_policy, reward_model = load_frozen_models(args, tokenizer)
    # Detail 20 / G-1: AdamW (eps 1e-5), the learning rate decayed linearly to 0.
    optimizer, scheduler = make_optimizer_and_scheduler(model, args.lr, args.eps, args.scheduler, args.warm_up_steps, plan.num_updates)
    accelerator = stage.accelerator(plan.mini)  # Detail 8
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler stays unprepared (stepped once per update)
    resumed = stage.restore(accelerator, scheduler)  # --resume: policy, optimizer, scheduler, RNG states
    device = accelerator.device
    if frozen_config is not None and ref_policy is None:  # --lora_r: the reference is the policy, adapters off
        reward_model = frozen_engine(reward_model, frozen_config)
    elif frozen_config is not None:  # Detail 8
        ref_policy, reward_model = frozen_engine(ref_policy, frozen_config), frozen_engine(reward_model, frozen_config)
    else:
        reward_model.to(device)
        if ref_policy is not None:
            ref_policy.to(device)
    policy = accelerator.unwrap_model(model).policy
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    loss_temperature = args.temperature if args.scale_logits_by_temperature else None  # Detail P-1

    metrics: dict[str, Any] = resumed["state"]["metrics"] if resumed else {}  # `first/`, `last/` so far
    if args.eval_before_training and not resumed:
        metrics.update(evaluate_generations(stage, policy, eval_data, tokenizer, response_length, args, prefix="sft",
                                            temperature=args.eval_temperature, reward_model=reward_model, gold=args.gold_eval,
                                            table_name="sft_query_responses"))
        stage.log({k: v for k, v in metrics.items() if k.endswith(("score", "gold_win_rate", "eos_rate", "response_token_len"))}, 0)

    # Detail P-6: a fixed validation batch, sampled at T 0.01 and scored every --eval_every updates.
    eval_rows = validation.select(range(stage.rank * args.local_eval_batch_size, (stage.rank + 1) * args.local_eval_batch_size))
    eval_queries = batch_tensor(eval_rows, "query_token", device)
    if args.save_samples_every and not resumed:  # P-6: the SFT policy's samples, before any update
        with torch.no_grad():
            responses, scores = sample_validation_batch(policy, reward_model, eval_queries, args, pad, eos, response_length, keep_rng=True)
            save_samples(stage, tokenizer, reward_model, eval_rows, eval_queries, responses, scores, 0, args)
    rows = grouped_prompt_batches(len(train), args.batch_size, args.rloo_k, stage.rank, stage.world_size, args.seed)  # Detail R-1
    shuffle = np.random.default_rng(args.seed + stage.rank * 100003)  # G-2: per-rank minibatch shuffles
    done = resumed["update"] if resumed else 0
    if resumed:  # the data position: the prompt batches already used, the shuffler's state
        for _ in range(done):
            next(rows)
        shuffle.bit_generator.state = resumed["state"]["shuffle"]
    start_time = time.time() - (resumed["seconds"] if resumed else 0.0)
    for update in stage.progress(list(range(done + 1, plan.num_updates + 1)), "RLOO updates"):
        evaluate_now = args.eval_every and (update % args.eval_every == 0 or update == plan.num_updates)
        validation_score = None
        if evaluate_now and not args.eval_after_update:  # Detail P-6: before the rollouts, as ppo.py
            with torch.no_grad():
                validation_score = sample_validation_batch(policy, reward_model, eval_queries, args, pad, eos, response_length,
                                                           keep_rng=False)[1].mean()
        queries = batch_tensor(train.select(next(rows)), "query_token", device)  # k consecutive copies of each prompt
        batch = collect_rollouts(policy, ref_policy, reward_model, queries, args, kl_in_reward, pad, eos, response_length,
                                 loss_temperature)
        stats, ratios = train_on_rollouts(model, accelerator, optimizer, batch, args, plan, shuffle, pad, loss_temperature, kl_in_reward)
        scheduler.step()  # once per update: linear decay to 0 over the run (Detail 20)

        with torch.no_grad():
            local = update_statistics(batch, stats, ratios, eos, args.masked_statistics)  # Detail P-5
            evaluate_after = evaluate_now and args.eval_after_update
            save_now = args.save_samples_every and update % args.save_samples_every == 0
            if evaluate_after or save_now:
                eval_responses, eval_scores = sample_validation_batch(policy, reward_model, eval_queries, args, pad, eos,
                                                                      response_length, keep_rng=not evaluate_after)
                if evaluate_after:
                    validation_score = eval_scores.mean()
                if save_now:
                    save_samples(stage, tokenizer, reward_model, eval_rows, eval_queries, eval_responses, eval_scores, update, args)
            if validation_score is not None:
                local["objective/validation_score"] = validation_score
            names = list(local)
            reduced = accelerator.reduce(torch.stack([local[k].float() for k in names]).to(device), reduction="mean")
            logged = dict(zip(names, reduced.tolist(), strict=True))
            logged["val/num_eos_tokens"] *= stage.world_size  # a count over the global batch
        episodes = update * args.batch_size
        logged.update({"objective/kl_coef": args.kl_coef, "lr": scheduler.get_last_lr()[0], "episode": episodes,
                       "eps": episodes / (time.time() - start_time), "seconds_per_update": (time.time() - start_time) / update})
        history_step(metrics, logged)
        if update % args.logging_steps == 0 or update == plan.num_updates:
            stage.log(logged, update)
        stage.end_update(update, accelerator, scheduler, time.time() - start_time,  # --save_every, SIGTERM / SIGUSR1
                         {"metrics": metrics, "shuffle": shuffle.bit_generator.state})
    metrics["train/seconds"] = round(time.time() - start_time, 1)
    metrics["train/seconds_per_update"] = round((time.time() - start_time) / plan.num_updates, 3)

    # ---- the whole validation and test splits at T 0.01 (Detail P-6: what the judge sees)
    metrics.update(evaluate_generations(stage, policy, eval_data, tokenizer, response_length, args, prefix="eval",
                                        temperature=args.eval_temperature, reward_model=reward_model, gold=args.gold_eval,
                                        table_name="query_responses"))
    stage.log({k: v for k, v in metrics.items() if k.startswith("eval/")}, plan.num_updates)

    stage.save_model(accelerator, model, tokenizer, submodule="policy")
    summary = stage.finish({**metrics, "num_updates": plan.num_updates, "response_length": response_length,
                            "rloo_k": args.rloo_k, "baseline": args.baseline, "kl_in_reward": kl_in_reward})
    if args.push_to_hub and stage.is_main:
        summary["hub_url"] = push_run_to_hub(stage.run_dir / "model", args, stage.run_name, f"{Path(args.sft_model_path).name}__rloo__tldr")
    return summary


def collect_rollouts(
    policy: Any, ref_policy: Any, reward_model: Any, queries: Any, args: Args, kl_in_reward: bool, pad: int, eos: int,
    response_length: int, loss_temperature: float | None,
) -> dict[str, Any]:
    """One batch of rollouts without gradients (k consecutive rows per prompt): sampled responses, old and reference
    log-probs, RM scores (Details 23.1-23.3, P-1), the per-token KL, sequence rewards (R-2) and advantages (R-3, R-4)."""
    context_length = queries.size(1)
    policy.eval()
    with torch.no_grad():
        keys = ("response", "postprocessed", "logprob", "ref_logprob", "score")
        chunks: dict[str, list[Any]] = {k: [] for k in keys}
        for i in range(0, queries.size(0), args.local_rollout_forward_batch_size):
            rollout = sample_and_score(policy, ref_policy, reward_model, queries[i : i + args.local_rollout_forward_batch_size],
                                       args, pad, eos, response_length, loss_temperature)
            for key in keys:
                chunks[key].append(rollout[key])
        responses, postprocessed, logprobs, ref_logprobs, scores = (torch.cat(chunks[k]) for k in keys)
        masks = response_masks(postprocessed, pad, "eos")  # Detail 23.2: the policy loss and the KL stop at the EOS
        logprobs = logprobs.masked_fill(masks["padding_mask"], INVALID_LOGPROB)
        ref_logprobs = ref_logprobs.masked_fill(masks["padding_mask"], INVALID_LOGPROB)
        kl = per_token_kl(logprobs, ref_logprobs, masks["padding_mask"])
        rewards = sequence_rewards(scores, kl, args.kl_coef, kl_in_reward)  # Detail R-2: score - beta x summed KL
        advantages = group_advantages(rewards, args.rloo_k, args.baseline, args.grpo_eps)  # Detail R-3: leave-one-out / GRPO
        if args.whiten_advantages:  # Detail R-4: off by default
            advantages = whiten_sequence_advantages(advantages)
    return {
        "query_responses": torch.cat([queries, responses], 1), "context_length": context_length, "responses": responses,
        "postprocessed": postprocessed, "logprobs": logprobs, "ref_logprobs": ref_logprobs, "scores": scores, "kl": kl,
        "rewards": rewards, "advantages": advantages, **masks,
    }


def train_on_rollouts(
    model: Any, accelerator: Any, optimizer: Any, batch: dict[str, Any], args: Args, plan: PPOPlan, shuffle: Any, pad: int,
    loss_temperature: float | None, kl_in_reward: bool,
) -> tuple[dict[str, list[Any]], list[Any]]:
    """`num_ppo_epochs` passes of the policy loss (R-5) over shuffled minibatches of the rollouts (groups may be split
    across minibatches: the advantages are fixed before training), gradient accumulation over micro-batches inside
    each; returns the per-micro-batch statistics and probability ratios."""
    accelerator.unwrap_model(model).train()
    query_responses, responses, context_length = batch["query_responses"], batch["responses"], batch["context_length"]
    padding_mask = batch["padding_mask"]
    stats: dict[str, list[Any]] = {k: [] for k in ("pg_loss", "pg_clipfrac", "approxkl", "entropy", "kl_loss")}
    ratios = []
    for _ in range(args.num_ppo_epochs):
        order = torch.as_tensor(shuffle.permutation(plan.local_batch_size), device=responses.device)
        for mini_start in range(0, plan.local_batch_size, plan.local_mini_batch_size):
            mini = order[mini_start : mini_start + plan.local_mini_batch_size]
            for micro_start in range(0, plan.local_mini_batch_size, args.local_micro_batch_size):
                idx = mini[micro_start : micro_start + args.local_micro_batch_size]
                with accelerator.accumulate(model):
                    logits = model(query_responses[idx], pad, context_length, loss_temperature, args.skip_left_padding)  # P-1
                    new_logprobs = gather_logprobs(logits, responses[idx]).masked_fill(padding_mask[idx], INVALID_LOGPROB)
                    losses = rloo_losses(new_logprobs, batch["logprobs"][idx], batch["ref_logprobs"][idx], batch["advantages"][idx],
                                         padding_mask[idx], args, kl_in_reward)  # Detail R-5: clipped surrogate or REINFORCE
                    accelerator.backward(losses["loss"])
                    optimizer.step()
                    optimizer.zero_grad()
                with torch.no_grad():
                    logged, ratio = policy_statistics(entropy_from_logits(logits.detach()), losses["ratios"], losses["clipped"],
                                                      padding_mask[idx], args.masked_statistics)  # Detail P-5
                    losses.update(logged)
                    losses.setdefault("kl_loss", torch.zeros((), device=responses.device))
                    ratios.append(ratio)
                for key in stats:
                    stats[key].append(losses[key].detach())
    return stats, ratios


def update_statistics(batch: dict[str, Any], stats: dict[str, list[Any]], ratios: list[Any], eos: int, masked: bool = False) -> dict[str, Any]:
    """Detail P-5: ppo.py's per-update metrics that RLOO has (no value loss), on this process's rollouts, plus the
    sequence rewards and advantages (not yet reduced)."""
    padding_mask, postprocessed, scores = batch["padding_mask"], batch["postprocessed"], batch["scores"]
    logprobs = batch["logprobs"].masked_fill(padding_mask, 0.0) if masked else batch["logprobs"]
    ratio = torch.cat(ratios)
    kl = batch["kl"].sum(1).mean()
    return {
        "objective/kl": kl,
        "objective/entropy": (-logprobs).sum(1).mean(),
        "objective/rlhf_reward": batch["rewards"].mean(),
        "objective/scores": scores.mean(),
        "objective/advantage_std": batch["advantages"].std() if batch["advantages"].numel() > 1 else torch.zeros((), device=scores.device),
        "policy/approxkl_avg": torch.stack(stats["approxkl"]).mean(),
        "policy/clipfrac_avg": torch.stack(stats["pg_clipfrac"]).mean(),
        "policy/entropy_avg": torch.stack(stats["entropy"]).mean(),
        "loss/policy_avg": torch.stack(stats["pg_loss"]).mean(),
        "loss/kl_avg": torch.stack(stats["kl_loss"]).mean(),
        "val/ratio": ratio.mean(),
        "val/ratio_var": ratio.var() if ratio.numel() > 1 else torch.zeros((), device=ratio.device),
        "val/num_eos_tokens": (batch["responses"] == eos).sum().float(),
        "val/eos_rate": (postprocessed == eos).any(1).float().mean(),
        "val/response_token_len": (batch["sequence_lengths"] + 1).float().mean(),
    }


def embedded_args() -> Args:
    """RLOO on the embedded offline task (pass --sft_model_path and --reward_model_path of embedded runs): PPO's
    embedded budget, 40 updates of 64 rollouts (32 prompts x k 2), the same lr 1e-4 and beta 0.1 (see embedded.py)."""
    from summarize_from_feedback_details.embedded import EMBEDDED_KL_COEF, EMBEDDED_PPO_LR

    return Args(
        dataset="datasets/embedded", lr=EMBEDDED_PPO_LR, kl_coef=EMBEDDED_KL_COEF, total_episodes=64 * 40, batch_size=64, local_micro_batch_size=64,
        local_rollout_forward_batch_size=64, response_length=None, local_eval_batch_size=100, eval_every=5,
        logging_steps=5, eval_before_training=True, gold_eval=True, save_samples_every=10,
    )


PRESETS = {
    "pythia": ("PPO's settings without the critic: 1M episodes, batch 512 (256 prompts x k 2), 4 epochs, beta 0.05, T 0.7, "
               "53 tokens, lr 3e-6 linear, bf16 on GPU.", Args(mixed_precision="bf16")),
    "embedded": ("The embedded offline task on CPU (pass --sft_model_path and --reward_model_path of embedded runs).", embedded_args()),
}

if __name__ == "__main__":
    cli(PRESETS, main, description=__doc__.splitlines()[0])
