"""PPO stage: RLHF of the SFT policy against the frozen reward model, with every detail of the paper's
PPO section (SPEC Details 20-25, P-1..P-6).

    python -m summarize_from_feedback_details.ppo embedded --sft_model_path runs/sft_embedded/model \\
        --reward_model_path runs/reward_embedded/model
    torchrun --nproc_per_node 2 -m summarize_from_feedback_details.ppo embedded ...       # 2 processes on CPU
    accelerate launch --config_file configs/accelerate/deepspeed_zero2_bf16.yaml -m summarize_from_feedback_details.ppo pythia \\
        --sft_model_path <sft> --reward_model_path <rm> --dataset <processed tldr> --deepspeed
        [--frozen_models_config configs/accelerate/deepspeed_zero3_offload.yaml]  # 6.9B: ZeRO-3 + CPU offload, frozen models

Reads like the paper: policy and reference from SFT, critic and reward model from the RM (Detail 22) ->
for each update: take the next SFT train queries (Detail 21), sample a fixed number of tokens (23.1),
score the responses truncated after their first EOS (23.2) with -1 for a missing EOS (23.3), build
per-token KL rewards with the score after the EOS (P-2), GAE (P-3), whiten the advantages (Detail 25)
-> 4 epochs of clipped PPO losses (P-4) -> log (P-5), evaluate (P-6) -> save the policy. Every
--save_samples_every updates the validation batch's responses are kept as `samples/update_{k}` tables.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.profiler import record_function  # phase labels for `benchmark/bench_ppo.py --profile`

from summarize_from_feedback_details.core import (
    BatchPlan,
    TrainArgs,
    UserInputError,
    cli,
    column,
    plan_batches,
    push_run_to_hub,
    torch_generator,
    validate_numbers,
    write_text,
)
from summarize_from_feedback_details.modeling import (
    FROZEN_DTYPE,
    ScalarModel,
    disable_dropout,
    entropy_from_logits,
    first_true_indices,
    gather_logprobs,
    hidden_without_left_padding,
    masked_mean,
    masked_whiten,
    model_inputs,
    response_logits,
    sample,
    sequence_scores,
    truncate_after_eos,
)
from summarize_from_feedback_details.training import (
    Stage,
    batch_tensor,
    check_input_paths,
    check_vocabulary,
    evaluate_generations,
    frozen_engine,
    frozen_models_config,
    gold_utility,
    load_causal_lm,
    load_optional_splits,
    load_processed_split,
    make_optimizer_and_scheduler,
    require_columns,
    response_texts,
)

INVALID_LOGPROB = 1.0
"""log-prob written at positions after the EOS for the rollout, reference and training alike (their
difference, the KL and the log-ratio, is then exactly 0 there), as the released code did"""


@dataclass
class Args(TrainArgs):
    exp_name: str = "ppo"
    """experiment name; the run is `{exp_name}__{seed}__{unix time}`"""
    sft_model_path: str = "models/sft_model"
    """Detail 22: the SFT checkpoint; the policy and the frozen reference start from it"""
    reward_model_path: str = "models/reward_model"
    """Detail 22: the RM checkpoint (with its normalisation bias); the frozen reward model and the critic start from it"""
    dataset: str = "datasets/tldr"
    """output directory of `tldr_dataset` (with sft/ and tokenizer/) or a hub id; prompts are its SFT train queries"""
    scheduler: Literal["cosine", "linear", "constant"] = "linear"
    """Detail 20: the learning rate decays linearly to 0"""
    total_episodes: int | None = 1_000_000
    """Detail 20: rollouts to train on (1,953 updates of 512)"""
    batch_size: int = 512
    """Detail 20: rollouts per update, over all processes"""
    num_mini_batches: int = 1
    """Detail 20: minibatches per PPO epoch (the paper: 1, so each epoch is one optimizer step)"""
    local_micro_batch_size: int = 8
    """rollouts per training forward pass per process (gradient accumulation fills the minibatch)"""
    local_rollout_forward_batch_size: int = 64
    """queries per sampling / scoring forward pass per process"""
    num_ppo_epochs: int = 4
    """Detail 20: passes over each batch of rollouts"""
    response_length: int | None = 53
    """Detail 20 / 23.1: tokens sampled per query (None: the SFT data's reference length)"""
    temperature: float = 0.7
    """Detail 20: sampling temperature of the rollouts"""
    sampler: Literal["multinomial", "inverse_cdf"] = "multinomial"
    """how a token is drawn from softmax(logits / T): torch.multinomial, or inverse_cdf (one uniform per row against the
    cumulative distribution: the same distribution, faster on CPU, but the same seed gives other samples)"""
    skip_left_padding: bool = False
    """run the reference, critic, reward and training forwards one row at a time without the query's left pads (and, for
    GPT-NeoX, the last layer only at the positions read): the same numbers (pads are masked and keep their positions,
    G-3) for ~30% fewer positions on TL;DR queries; faster on CPU, slower where per-call overhead dominates (small
    batches on a GPU)"""
    scale_logits_by_temperature: bool = True
    """P-1: divide the logits of the reference and training forward passes by the temperature (off: the bug)"""
    kl_coef: float = 0.05
    """Detail 20: beta of the per-token KL reward -beta * (logp - ref_logp) (the paper also runs 0.07 and 0.1)"""
    adaptive_kl: bool = False
    """variant: the adaptive KL controller of Ziegler et al. (2019), starting from --kl_coef"""
    kl_target: float = 6.0
    """adaptive KL controller: target KL (nats per response)"""
    kl_horizon: int = 10_000
    """adaptive KL controller: horizon in episodes"""
    gamma: float = 1.0
    """P-3: discount"""
    lam: float = 0.95
    """P-3: GAE lambda"""
    cliprange: float = 0.2
    """P-4: policy ratio clip"""
    cliprange_value: float = 0.2
    """P-4: value clip around the rollout values"""
    vf_coef: float = 0.1
    """P-4: value-loss coefficient"""
    eos_trick: bool = True
    """Detail 23.3: a response without EOS scores --penalty_reward_value instead of the RM's score (off: the RM scores its last token)"""
    penalty_reward_value: float = -1.0
    """Detail 23.3: the score of a response without EOS"""
    score_at: Literal["eos_plus_one", "eos"] = "eos_plus_one"
    """P-2: where the score is added: one position after the EOS (the released code) or on the EOS token"""
    whiten_rewards: bool = False
    """Detail 24: whiten the per-token rewards (masked, mean kept); off in the released runs"""
    whiten_advantages: bool = True
    """Detail 25: whiten the advantages over the valid response tokens"""
    critic_init: Literal["reward", "sft"] = "reward"
    """Detail 22: the critic starts from the trained RM (with its bias), or from SFT with a fresh head"""
    masked_statistics: bool = False
    """P-5: average the logged policy/entropy_avg, policy/clipfrac_avg, val/ratio and val/ratio_var over the valid
    response tokens and sum objective/entropy over them only (default: as the released code logged them, over every
    response position: padding counts with ratio 1, no clipping, its logits' entropy and -1 in objective/entropy)"""
    eval_every: int = 1
    """P-6: score one validation batch at --eval_temperature every this many updates (0: never), before the update's
    rollouts as the released code did"""
    eval_after_update: bool = False
    """P-6: score the validation batch after the update's training (the policy the update produced) instead of before
    its rollouts (the released code; the score logged at update k is then the policy's after k - 1 updates)"""
    eval_temperature: float = 0.01
    """P-6: sampling temperature of every evaluation"""
    local_eval_batch_size: int = 16
    """queries per evaluation batch per process (also the size of the per-update validation batch)"""
    save_samples_every: int = 220
    """P-6: save the per-update validation batch's responses (T --eval_temperature; query, response, reference, RM
    scores) before the first update and every this many updates as `samples/update_{k}.csv|parquet`, as the authors
    kept sample tables through training (their print_sample_output_freq, 220); 0: never. A sample that is not also
    the evaluation's runs on a forked random state, so the tables never change the training run"""
    eval_splits: tuple[str, ...] = ("validation", "test")
    """P-6: SFT splits sampled at the end and saved as `query_responses_{split}` tables"""
    max_eval_samples: int | None = None
    """score only the first N queries of each split at the end (default: all)"""
    rouge_stemmer: bool = False
    """Detail 9: Porter-stem words before ROUGE (the authors' `evaluate` default does not; stemming adds ~0.01 to ROUGE-L)"""
    eval_before_training: bool = False
    """also evaluate the SFT policy before PPO (metrics prefixed `sft/`)"""
    gold_eval: bool = False
    """score responses with the embedded task's gold utility (win rate against references; embedded data only)"""
    frozen_models_config: str | None = None
    """Detail 8: an accelerate DeepSpeed yaml for the frozen reference policy and reward model, which then run as their
    own DeepSpeed inference engines (configs/accelerate/deepspeed_zero3_offload.yaml: ZeRO-3, parameters offloaded to
    CPU, the 6.9B setup); needs --deepspeed (default: a whole copy of each on every process)"""


@dataclass(frozen=True)
class PPOPlan:
    """Derived sizes: `batch_size = num_mini_batches x mini_batch_size`, `mini_batch_size = local_micro_batch_size
    x gradient_accumulation_steps x processes`, `local_batch_size = batch_size / processes`."""

    mini: BatchPlan
    local_batch_size: int
    local_mini_batch_size: int
    num_updates: int


def plan_ppo(args: Args, world_size: int) -> PPOPlan:
    """Every PPO batch size from the arguments, with exact-division checks (one clear error)."""
    if args.num_mini_batches < 1 or args.batch_size % args.num_mini_batches:
        raise UserInputError(f"--batch_size {args.batch_size} is not divisible by --num_mini_batches {args.num_mini_batches}")
    if args.batch_size % world_size:
        raise UserInputError(f"--batch_size {args.batch_size} is not divisible by the {world_size} processes")
    local_batch_size = args.batch_size // world_size
    if local_batch_size % args.local_rollout_forward_batch_size:
        raise UserInputError(
            f"the per-process batch {local_batch_size} (--batch_size / processes) is not divisible by "
            f"--local_rollout_forward_batch_size {args.local_rollout_forward_batch_size}"
        )
    mini_batch_size = args.batch_size // args.num_mini_batches
    total = args.total_episodes if args.total_episodes is not None else args.batch_size
    mini = plan_batches(mini_batch_size, args.local_micro_batch_size, world_size, mini_batch_size, "PPO minibatch")
    num_updates = total // args.batch_size
    if num_updates < 1:
        raise UserInputError(f"--total_episodes {total} is fewer than one batch of {args.batch_size}; raise --total_episodes or lower --batch_size")
    return PPOPlan(mini, local_batch_size, mini_batch_size // world_size, num_updates)


# ----------------------------------------------------------------------------------------------
# The math of one PPO update, as pure functions (tests pin each with hand-computed values)
# ----------------------------------------------------------------------------------------------
def prompt_batches(num_queries: int, batch_size: int, rank: int, world_size: int, seed: int) -> Any:
    """Detail 21: endless batches of SFT train query indices for this rank, reshuffled whenever they run out;
    G-2: every rank takes a disjoint slice of the same permutation (a partial last batch is dropped)."""
    local = batch_size // world_size
    epoch = 0
    while True:
        permutation = torch.randperm(num_queries, generator=torch_generator(seed + epoch)).tolist()
        for start in range(0, num_queries - batch_size + 1, batch_size):
            yield permutation[start + rank * local : start + (rank + 1) * local]
        epoch += 1


def response_masks(postprocessed: Any, pad_token_id: int, score_at: str) -> dict[str, Any]:
    """P-2 masks of responses truncated after their first EOS (Detail 23.2).

    `sequence_lengths`: index of the last response token (the EOS; the last index when there is none);
    `padding_mask`: positions after it (log-probs, KL and policy loss are masked there);
    `score_index`: where the score goes: `eos + 1` (the released code; the last index when the EOS is the
    last token or absent) or the EOS itself; `value_padding_mask`: positions after `score_index` (values
    and value loss masked there).
    """
    length = postprocessed.size(1)
    sequence_lengths = first_true_indices(postprocessed == pad_token_id) - 1
    positions = torch.arange(length, device=postprocessed.device)[None, :]
    if score_at == "eos_plus_one":  # Detail P-2: the released code's placement
        score_index = torch.where(sequence_lengths + 1 < length, sequence_lengths + 1, sequence_lengths)
    else:
        score_index = sequence_lengths
    return {
        "sequence_lengths": sequence_lengths,
        "padding_mask": positions > sequence_lengths[:, None],
        "score_index": score_index,
        "value_padding_mask": positions > score_index[:, None],
    }


def penalize_missing_eos(scores: Any, postprocessed: Any, eos_token_id: int, penalty: float) -> Any:
    """Detail 23.3: a response without an EOS gets the constant `penalty` (-1) instead of the RM's score.

    (The released code tested for a [PAD] after truncation, which also penalised an EOS in the very last
    slot; SPEC 23.3 says "no EOS", and an EOS in the last slot is a finished answer, so we test for the EOS.)"""
    has_eos = (postprocessed == eos_token_id).any(dim=1)
    return torch.where(has_eos, scores, torch.full_like(scores, penalty))


def per_token_rewards(logprobs: Any, ref_logprobs: Any, scores: Any, masks: dict[str, Any], kl_coef: float) -> tuple[Any, Any, Any]:
    """P-2: reward_t = -beta * (logp_t - ref_logp_t) on every response token (0 after the EOS), plus the
    score at `score_index`. Returns (rewards, kl, non_score_reward)."""
    kl = (logprobs - ref_logprobs).masked_fill(masks["padding_mask"], 0.0)
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, masks["score_index"]] += scores  # Detail P-2: the score after (default) or on the EOS
    return rewards, kl, non_score_reward


def whiten_rewards(rewards: Any, value_padding_mask: Any) -> Any:
    """Detail 24: whiten the per-token rewards over the valid positions keeping their mean (the released
    code's `masked_whiten(shift_mean=False)`), then zero them after the score position."""
    return masked_whiten(rewards, ~value_padding_mask, shift_mean=False).masked_fill(value_padding_mask, 0.0)


def generalized_advantage_estimation(rewards: Any, values: Any, gamma: float, lam: float) -> tuple[Any, Any]:
    """P-3: GAE over all response positions (values after the score position are 0, so nothing flows back
    from there); returns = advantages + values."""
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    length = rewards.size(1)
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    return advantages, advantages + values


def whiten_advantages(advantages: Any, padding_mask: Any) -> Any:
    """Detail 25: whiten over the batch's valid response tokens (mean shifted to 0), then 0 on padding."""
    return masked_whiten(advantages, ~padding_mask, shift_mean=True).masked_fill(padding_mask, 0.0)


def ppo_losses(
    new_logprobs: Any, old_logprobs: Any, advantages: Any, new_values: Any, old_values: Any, returns: Any,
    padding_mask: Any, value_padding_mask: Any, cliprange: float, cliprange_value: float, vf_coef: float,
) -> dict[str, Any]:
    """P-4: clipped surrogate averaged over valid response tokens + 0.5 x clipped squared value error
    averaged over positions up to the score; loss = pg + vf_coef x vf. Also the logged statistics."""
    valid, value_valid = ~padding_mask, ~value_padding_mask
    clipped_values = torch.clamp(new_values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (new_values - returns) ** 2
    vf_losses2 = (clipped_values - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), value_valid)
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), valid)
    with torch.no_grad():
        stats = {
            "pg_clipfrac": masked_mean((pg_losses2 > pg_losses).float(), valid),
            "vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), value_valid),
            "approxkl": 0.5 * (log_ratio**2).mean(),  # the released code's estimate (0 on padding by construction)
            "ratio": masked_mean(ratio, valid),
            "ratios": ratio.detach(),  # per position (1 on padding), for `policy_statistics`
            "clipped": pg_losses2 > pg_losses,  # per position (never on padding)
        }
    return {"loss": pg_loss + vf_coef * vf_loss, "pg_loss": pg_loss, "vf_loss": vf_loss, **stats}


class AdaptiveKLController:
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) x episodes / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, episodes: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * episodes / self.horizon


class FixedKLController:
    """Detail 20: a constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, episodes: int) -> None:
        pass


class PolicyAndValue(nn.Module):
    """Detail 22: the policy and the critic are separate networks trained by ONE optimizer (one module)."""

    def __init__(self, policy: nn.Module, critic: nn.Module):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(
        self, query_responses: torch.Tensor, pad_token_id: int, context_length: int, temperature: float | None, skip_left_padding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the policy's logits for the response tokens, divided by `temperature` (P-1); the critic's value
        of the state before each response token)."""
        logits = response_logits(self.policy, query_responses, pad_token_id, context_length, temperature, skip_left_padding)
        return logits, self.values(query_responses, pad_token_id, context_length, skip_left_padding)

    def values(self, query_responses: torch.Tensor, pad_token_id: int, context_length: int, skip_left_padding: bool = False) -> torch.Tensor:
        """The critic's value of the state before each response token (B, L); the rollout needs only these."""
        if skip_left_padding:
            batch, length = query_responses.shape  # the states before each response token: context - 1 .. length - 2
            rows = hidden_without_left_padding(self.critic.backbone, query_responses, pad_token_id, context_length,
                                               [context_length - 1] * batch, [length - 2] * batch)
            return self.critic.head(torch.cat([hidden[:, context_length - 1 - offset :] for offset, hidden in rows]))
        return self.critic(**model_inputs(query_responses, pad_token_id))[:, context_length - 1 : -1]


def initial_critic(critic_init: str, reward_model_path: str, sft_model_path: str) -> ScalarModel:
    """Detail 22: the critic is a copy of the trained RM, normalisation bias included (`critic_init="reward"`),
    or the SFT backbone with a fresh head (Detail 11 init, bias 0); dropout off either way (Detail 7)."""
    if critic_init == "reward":  # Detail 22
        return disable_dropout(ScalarModel.from_pretrained(reward_model_path))
    return disable_dropout(ScalarModel.from_backbone(sft_model_path))


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> dict[str, Any]:
    import numpy as np

    validate_numbers(args)  # every number, then every input path, before any work: a bad input leaves no run folder
    check_input_paths(args, datasets=["dataset"], causal_lms=["sft_model_path"], reward_models=["reward_model_path"])
    stage = Stage.start(args)
    # ---- data and sizes (checked before any model is loaded)
    train = load_processed_split(args.dataset, "sft", "train")  # Detail 21: prompts are the SFT train queries
    require_columns(train, ["query_token", "reference_response_token"], f"{args.dataset} sft/train")
    eval_data = load_optional_splits(args.dataset, "sft", args.eval_splits, say=stage.print)  # absent/empty: skipped
    validation = eval_data["validation"] if "validation" in eval_data else load_processed_split(args.dataset, "sft", "validation")
    for split, ds in {"validation": validation, **eval_data}.items():
        require_columns(ds, ["query_token", "query", "reference_response", "reference_response_token"], f"{args.dataset} sft/{split}")
    tokenizer = stage.load_tokenizer(args.dataset, args.sft_model_path, args.allow_pad_equals_eos)
    response_length = args.response_length or len(train[0]["reference_response_token"])
    plan = plan_ppo(args, stage.world_size)
    if len(train) < args.batch_size:
        raise UserInputError(f"--batch_size {args.batch_size} exceeds the {len(train)} SFT train queries")
    if (args.eval_every or args.save_samples_every) and len(validation) < args.local_eval_batch_size * stage.world_size:
        raise UserInputError(f"the validation split has fewer than --local_eval_batch_size x processes = {args.local_eval_batch_size * stage.world_size} queries")
    frozen_config = None
    if args.frozen_models_config is not None:  # Detail 8
        if not args.deepspeed:
            raise UserInputError("--frozen_models_config runs the frozen models as DeepSpeed engines next to the ZeRO-2 "
                                 "trained models: add --deepspeed")
        if args.skip_left_padding:
            raise UserInputError("--skip_left_padding (a CPU speed-up: one forward per row) does not go with --frozen_models_config "
                                 "(ZeRO-3 engines gather their parameters for every call): drop one of the two")
        frozen_config = frozen_models_config(args.frozen_models_config, args.local_rollout_forward_batch_size)
    stage.print(f"PPO: {len(train)} prompts, {plan.num_updates} updates of {args.batch_size} rollouts, {plan.mini}, "
                f"response length {response_length}")
    stage.open_run()

    # ---- models, Detail 22: policy + reference from SFT, critic + reward model from the RM; dropout off (Detail 7)
    policy = load_causal_lm(args.sft_model_path, tokenizer)  # Detail 7
    # Trained models in fp32 (TRAINED_DTYPE, the loaders' default), frozen ones in FROZEN_DTYPE, whatever the checkpoints say.
    ref_policy = load_causal_lm(args.sft_model_path, tokenizer, dtype=FROZEN_DTYPE).eval().requires_grad_(False)
    reward_model = disable_dropout(ScalarModel.from_pretrained(args.reward_model_path, dtype=FROZEN_DTYPE)).eval().requires_grad_(False)
    check_vocabulary(reward_model.config.backbone_config, tokenizer, args.reward_model_path)
    model = PolicyAndValue(policy, initial_critic(args.critic_init, args.reward_model_path, args.sft_model_path))
    # Detail 20 / G-1: one AdamW (lr 3e-6, eps 1e-5) over policy and critic, decayed linearly to 0.
    optimizer, scheduler = make_optimizer_and_scheduler(model, args.lr, args.eps, args.scheduler, args.warm_up_steps, plan.num_updates)
    accelerator = stage.accelerator(plan.mini)  # Detail 8
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler stays unprepared (stepped once per update)
    device = accelerator.device
    if frozen_config is not None:  # Detail 8: e.g. ZeRO-3 with the parameters streamed from CPU memory (6.9B)
        ref_policy, reward_model = frozen_engine(ref_policy, frozen_config), frozen_engine(reward_model, frozen_config)
    else:
        ref_policy.to(device)
        reward_model.to(device)
    unwrapped = accelerator.unwrap_model(model)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    # Detail P-1: the temperature the log-prob forwards divide by (None: the ablation that forgets it).
    loss_temperature = args.temperature if args.scale_logits_by_temperature else None
    kl_controller = AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.adaptive_kl else FixedKLController(args.kl_coef)

    metrics: dict[str, Any] = {}
    if args.eval_before_training:
        metrics.update(evaluate_generations(stage, unwrapped.policy, eval_data,
                                            tokenizer, response_length, args, prefix="sft", temperature=args.eval_temperature,
                                            reward_model=reward_model, gold=args.gold_eval, table_name="sft_query_responses"))
        stage.log({k: v for k, v in metrics.items() if k.endswith(("score", "gold_win_rate", "eos_rate", "response_token_len"))}, 0)

    # Detail P-6: a fixed validation batch, sampled at T 0.01 and scored every --eval_every updates.
    eval_rows = validation.select(range(stage.rank * args.local_eval_batch_size, (stage.rank + 1) * args.local_eval_batch_size))
    eval_queries = batch_tensor(eval_rows, "query_token", device)
    if args.save_samples_every:  # P-6: the first samples table is the SFT policy's, before any update
        with torch.no_grad():
            responses, scores = sample_validation_batch(unwrapped.policy, reward_model, eval_queries, args, pad, eos,
                                                        response_length, keep_rng=True)
            save_samples(stage, tokenizer, reward_model, eval_rows, eval_queries, responses, scores, 0, args)
    prompts = prompt_batches(len(train), args.batch_size, stage.rank, stage.world_size, args.seed)
    shuffle = np.random.default_rng(args.seed + stage.rank * 100003)  # G-2: per-rank minibatch shuffles
    start_time = time.time()
    for update in stage.progress(list(range(1, plan.num_updates + 1)), "PPO updates"):
        # Detail P-6: as in the released code, the validation batch is sampled and scored at the start of an update by
        # the policy that collects its rollouts (the score logged at update k is the policy's after k - 1 updates);
        # --eval_after_update scores it after the update's training instead.
        evaluate_now = args.eval_every and (update % args.eval_every == 0 or update == plan.num_updates)
        validation_score = None
        if evaluate_now and not args.eval_after_update:
            with torch.no_grad():
                validation_score = sample_validation_batch(unwrapped.policy, reward_model, eval_queries, args, pad, eos,
                                                           response_length, keep_rng=False)[1].mean()
        queries = batch_tensor(train.select(next(prompts)), "query_token", device)
        batch = collect_rollouts(unwrapped, ref_policy, reward_model, queries, args, kl_controller.value, pad, eos,
                                 response_length, loss_temperature)
        stats, ratios = train_on_rollouts(model, accelerator, optimizer, batch, args, plan, shuffle, pad, loss_temperature)
        scheduler.step()  # once per update: linear decay to 0 over the run (Detail 20)

        # ---- logging and the per-update validation batch
        with torch.no_grad():
            local = update_statistics(batch, stats, ratios, eos, args.masked_statistics)  # Detail P-5
            evaluate_after = evaluate_now and args.eval_after_update  # Detail P-6
            save_now = args.save_samples_every and update % args.save_samples_every == 0
            if evaluate_after or save_now:  # one sample of the validation batch serves both
                eval_responses, eval_scores = sample_validation_batch(unwrapped.policy, reward_model, eval_queries, args, pad, eos,
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
        kl_controller.update(logged["objective/kl"], args.batch_size)
        episodes = update * args.batch_size
        logged.update({"objective/kl_coef": kl_controller.value, "lr": scheduler.get_last_lr()[0], "episode": episodes,
                       "eps": episodes / (time.time() - start_time), "seconds_per_update": (time.time() - start_time) / update})
        history_step(metrics, logged)
        if update % args.logging_steps == 0 or update == plan.num_updates:
            stage.log(logged, update)
    metrics["train/seconds"] = round(time.time() - start_time, 1)
    metrics["train/seconds_per_update"] = round((time.time() - start_time) / plan.num_updates, 3)

    # ---- the whole validation and test splits at T 0.01, saved with RM scores of response and reference
    # Detail P-6: these tables are what the judge sees.
    metrics.update(evaluate_generations(stage, unwrapped.policy, eval_data, tokenizer, response_length, args, prefix="eval",
                                        temperature=args.eval_temperature, reward_model=reward_model, gold=args.gold_eval,
                                        table_name="query_responses"))
    stage.log({k: v for k, v in metrics.items() if k.startswith("eval/")}, plan.num_updates)

    # ---- save the policy (a causal LM + tokenizer, loadable with AutoModelForCausalLM)
    stage.save_model(accelerator, model, tokenizer, submodule="policy")
    summary = stage.finish({**metrics, "num_updates": plan.num_updates, "response_length": response_length})
    if args.push_to_hub and stage.is_main:
        summary["hub_url"] = push_run_to_hub(stage.run_dir / "model", args, stage.run_name, f"{Path(args.sft_model_path).name}__ppo__tldr")
    return summary


def sample_validation_batch(
    policy: Any, reward_model: Any, queries: Any, args: Args, pad: int, eos: int, response_length: int, keep_rng: bool,
) -> tuple[Any, Any]:
    """P-6: the fixed validation batch sampled at --eval_temperature, truncated after the first EOS (23.2), and the
    RM's scores. `keep_rng`: sample on a forked random state (an extra sample must not change the training run)."""
    policy.eval()
    devices = [queries.device] if queries.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices) if keep_rng else contextlib.nullcontext():
        responses = sample(policy, queries, pad, response_length, args.eval_temperature, sampler=args.sampler)[0]
    responses = truncate_after_eos(responses, eos, pad)
    return responses, sequence_scores(reward_model, torch.cat([queries, responses], 1), pad, queries.size(1))


def save_samples(
    stage: Stage, tokenizer: Any, reward_model: Any, rows: Any, queries: Any, responses: Any, scores: Any, update: int, args: Args,
) -> None:
    """P-6, the authors' sample tables: the validation batch's responses after `update` updates, gathered over the
    processes, as `samples/update_{update}.csv|parquet`: update, query_index (row of the validation split), query,
    response, reference, score and reference_score (the RM's), response_token_len, has_eos (+ gold utility)."""
    import pandas as pd
    from accelerate.utils import gather_object

    references = batch_tensor(rows, "reference_response_token", queries.device)
    reference_scores = sequence_scores(reward_model, torch.cat([queries, references], 1), tokenizer.pad_token_id,
                                       queries.size(1)).tolist()
    texts, lengths, has_eos = response_texts(tokenizer, responses)
    table_rows = []
    for k, (query, reference) in enumerate(zip(column(rows, "query"), column(rows, "reference_response"), strict=True)):
        row = {"update": update, "query_index": stage.rank * args.local_eval_batch_size + k, "query": query,
               "response": texts[k].strip(), "reference": reference.replace(tokenizer.eos_token, "").strip(),
               "score": float(scores[k]), "reference_score": reference_scores[k], "response_token_len": lengths[k],
               "has_eos": has_eos[k]}
        if args.gold_eval:
            row.update(gold_utility(query, row["response"], row["reference"]))
        table_rows.append(row)
    gathered = gather_object(table_rows)
    if stage.is_main:
        table = pd.DataFrame(gathered)
        stem = stage.run_dir / "samples" / f"update_{update}"
        write_text(stem.with_suffix(".csv"), table.to_csv(index=False))  # atomic: temporary file + rename
        partial = stem.with_name(f".update_{update}.parquet.tmp")
        table.to_parquet(partial, index=False)
        os.replace(partial, stem.with_suffix(".parquet"))


def collect_rollouts(
    unwrapped: PolicyAndValue, ref_policy: Any, reward_model: Any, queries: Any, args: Args, kl_coef: float, pad: int, eos: int,
    response_length: int, loss_temperature: float | None,
) -> dict[str, Any]:
    """One batch of rollouts without gradients: sampled responses, the old log-probs, reference log-probs, values,
    RM scores, the per-token rewards, advantages and returns (Details 23-25, P-1..P-3), with the masks."""
    context_length = queries.size(1)
    unwrapped.policy.eval()
    with torch.no_grad():
        chunks: dict[str, list[Any]] = {k: [] for k in ("responses", "postprocessed", "logprobs", "ref_logprobs", "values", "scores")}
        for i in range(0, queries.size(0), args.local_rollout_forward_batch_size):
            query = queries[i : i + args.local_rollout_forward_batch_size]
            with record_function("rollout/sample"):  # Detail 23.1: a fixed number of tokens; P-1: temperature-scaled log-probs
                response, logprob = sample(unwrapped.policy, query, pad, response_length, args.temperature, sampler=args.sampler)
            query_response = torch.cat([query, response], 1)
            with record_function("rollout/ref_logprobs"):
                ref_logits = response_logits(ref_policy, query_response, pad, context_length, loss_temperature, args.skip_left_padding)  # P-1
                ref_logprob = gather_logprobs(ref_logits, response)
            with record_function("rollout/values"):
                value = unwrapped.values(query_response, pad, context_length, args.skip_left_padding)
            with record_function("rollout/scores"):
                # Detail 23.2: tokens after the first EOS become [PAD] before the RM sees them; Detail 12: read at EOS.
                postprocessed = truncate_after_eos(response, eos, pad)
                score = sequence_scores(reward_model, torch.cat([query, postprocessed], 1), pad, context_length, args.skip_left_padding).float()
                if args.eos_trick:  # Detail 23.3: -1 without an EOS
                    score = penalize_missing_eos(score, postprocessed, eos, args.penalty_reward_value)
            for key, tensor in zip(chunks, (response, postprocessed, logprob, ref_logprob, value, score), strict=True):
                chunks[key].append(tensor)
        with record_function("rollout/advantages"):
            responses, postprocessed, logprobs, ref_logprobs, values, scores = (torch.cat(chunks[k]) for k in chunks)
            masks = response_masks(postprocessed, pad, args.score_at)  # Detail P-2
            padding_mask, value_padding_mask = masks["padding_mask"], masks["value_padding_mask"]
            logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
            ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
            values = values.masked_fill(value_padding_mask, 0.0)
            rewards, kl, non_score_reward = per_token_rewards(logprobs, ref_logprobs, scores, masks, kl_coef)  # Detail P-2
            if args.whiten_rewards:  # Detail 24: off by default
                rewards = whiten_rewards(rewards, value_padding_mask)
            advantages, returns = generalized_advantage_estimation(rewards, values, args.gamma, args.lam)  # Detail P-3
            if args.whiten_advantages:  # Detail 25
                advantages = whiten_advantages(advantages, padding_mask)
    return {
        "query_responses": torch.cat([queries, responses], 1), "context_length": context_length, "responses": responses,
        "postprocessed": postprocessed, "logprobs": logprobs, "values": values, "scores": scores, "kl": kl,
        "non_score_reward": non_score_reward, "advantages": advantages, "returns": returns, **masks,
    }


def train_on_rollouts(
    model: Any, accelerator: Any, optimizer: Any, batch: dict[str, Any], args: Args, plan: PPOPlan, shuffle: Any, pad: int,
    loss_temperature: float | None,
) -> tuple[dict[str, list[Any]], list[Any]]:
    """`num_ppo_epochs` passes of clipped PPO (Detail P-4) over shuffled minibatches of the rollouts, gradient
    accumulation over micro-batches inside each; returns the per-micro-batch statistics and probability ratios."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.policy.train()
    query_responses, responses, context_length = batch["query_responses"], batch["responses"], batch["context_length"]
    logprobs, values, advantages, returns = batch["logprobs"], batch["values"], batch["advantages"], batch["returns"]
    padding_mask, value_padding_mask = batch["padding_mask"], batch["value_padding_mask"]
    stats: dict[str, list[Any]] = {k: [] for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "entropy")}
    ratios = []
    for _ in range(args.num_ppo_epochs):
        order = torch.as_tensor(shuffle.permutation(plan.local_batch_size), device=responses.device)
        for mini_start in range(0, plan.local_batch_size, plan.local_mini_batch_size):
            mini = order[mini_start : mini_start + plan.local_mini_batch_size]
            for micro_start in range(0, plan.local_mini_batch_size, args.local_micro_batch_size):
                idx = mini[micro_start : micro_start + args.local_micro_batch_size]
                with accelerator.accumulate(model):
                    with record_function("train/forward"):
                        logits, new_values = model(query_responses[idx], pad, context_length, loss_temperature, args.skip_left_padding)
                        new_logprobs = gather_logprobs(logits, responses[idx]).masked_fill(padding_mask[idx], INVALID_LOGPROB)
                        new_values = new_values.masked_fill(value_padding_mask[idx], 0.0)
                        # Detail P-4: clipped surrogate + 0.1 x clipped value loss.
                        losses = ppo_losses(new_logprobs, logprobs[idx], advantages[idx], new_values, values[idx], returns[idx],
                                            padding_mask[idx], value_padding_mask[idx], args.cliprange, args.cliprange_value, args.vf_coef)
                    with record_function("train/backward"):
                        accelerator.backward(losses["loss"])
                    with record_function("train/optimizer"):
                        optimizer.step()
                        optimizer.zero_grad()
                with torch.no_grad(), record_function("train/stats"):
                    logged, ratio = policy_statistics(entropy_from_logits(logits.detach()), losses["ratios"], losses["clipped"],
                                                      padding_mask[idx], args.masked_statistics)  # Detail P-5
                    losses.update(logged)
                    ratios.append(ratio)
                for key in stats:
                    stats[key].append(losses[key].detach())
    return stats, ratios


def policy_statistics(entropy: Any, ratios: Any, clipped: Any, padding_mask: Any, masked: bool) -> tuple[dict[str, Any], Any]:
    """Detail P-5: one micro-batch's logged entropy and policy clip fraction, and its probability ratios for
    `val/ratio` / `val/ratio_var`, from per-position tensors (B, L). The released code logged the entropy and clip
    fraction as means over every response position (padding included: the entropy of the logits there, never clipped)
    and one ratio per micro-batch, its mean over every position (1 on padding); `masked` (--masked_statistics)
    averages over the valid tokens only and keeps every valid token's ratio."""
    valid = ~padding_mask
    if masked:
        return {"entropy": masked_mean(entropy, valid), "pg_clipfrac": masked_mean(clipped.float(), valid)}, ratios[valid]
    return {"entropy": entropy.mean(), "pg_clipfrac": clipped.float().mean()}, ratios.mean().reshape(1)


def update_statistics(
    batch: dict[str, Any], stats: dict[str, list[Any]], ratios: list[Any], eos: int, masked: bool = False,
) -> dict[str, Any]:
    """Detail P-5: the paper's per-update metrics on this process's rollouts and PPO passes (not yet reduced).
    `objective/entropy` sums -log-prob over every response position as the released code did, so each padding
    position adds -INVALID_LOGPROB (-1); `masked` (--masked_statistics) sums over the valid tokens only. `val/ratio_var`
    is the variance of what `policy_statistics` kept: per-micro-batch mean ratios (released) or per-token ratios."""
    padding_mask, postprocessed, scores = batch["padding_mask"], batch["postprocessed"], batch["scores"]
    non_score_reward = batch["non_score_reward"].sum(1).mean()
    logprobs = batch["logprobs"].masked_fill(padding_mask, 0.0) if masked else batch["logprobs"]
    ratio = torch.cat(ratios)
    return {
        "objective/kl": batch["kl"].sum(1).mean(),
        "objective/entropy": (-logprobs).sum(1).mean(),
        "objective/non_score_reward": non_score_reward,
        "objective/rlhf_reward": non_score_reward + scores.mean(),
        "objective/scores": scores.mean(),
        "policy/approxkl_avg": torch.stack(stats["approxkl"]).mean(),
        "policy/clipfrac_avg": torch.stack(stats["pg_clipfrac"]).mean(),
        "policy/entropy_avg": torch.stack(stats["entropy"]).mean(),
        "loss/policy_avg": torch.stack(stats["pg_loss"]).mean(),
        "loss/value_avg": torch.stack(stats["vf_loss"]).mean(),
        "val/clipfrac_avg": torch.stack(stats["vf_clipfrac"]).mean(),
        "val/ratio": ratio.mean(),
        "val/ratio_var": ratio.var() if ratio.numel() > 1 else torch.zeros((), device=ratio.device),
        "val/num_eos_tokens": (batch["responses"] == eos).sum().float(),
        "val/eos_rate": (postprocessed == eos).any(1).float().mean(),
        "val/response_token_len": (batch["sequence_lengths"] + 1).float().mean(),
    }


def history_step(metrics: dict[str, Any], logged: dict[str, float]) -> None:
    """Keep the first and last value of each per-update metric in the summary (`first/...`, `last/...`)."""
    for key, value in logged.items():
        metrics.setdefault(f"first/{key}", value)
        metrics[f"last/{key}"] = value


def embedded_args() -> Args:
    """PPO on the embedded offline task (pass --sft_model_path and --reward_model_path of embedded runs):
    40 updates of 64 rollouts, 33 tokens (the SFT data's reference length), lr 1e-4 and beta 0.1 (both measured
    deviations, see embedded.py)."""
    from summarize_from_feedback_details.embedded import EMBEDDED_KL_COEF, EMBEDDED_PPO_LR

    return Args(
        dataset="datasets/embedded", lr=EMBEDDED_PPO_LR, kl_coef=EMBEDDED_KL_COEF, total_episodes=64 * 40, batch_size=64, local_micro_batch_size=64,
        local_rollout_forward_batch_size=64, response_length=None, local_eval_batch_size=100, eval_every=5,
        logging_steps=5, eval_before_training=True, gold_eval=True, save_samples_every=10,
    )


PRESETS = {
    "pythia": ("The paper: 1M episodes, batch 512, 4 epochs, beta 0.05, T 0.7, 53 tokens, lr 3e-6 linear, bf16 on GPU.",
               Args(mixed_precision="bf16")),
    "embedded": ("The embedded offline task on CPU (pass --sft_model_path and --reward_model_path of embedded runs).", embedded_args()),
}

if __name__ == "__main__":
    cli(PRESETS, main, description=__doc__.splitlines()[0])
