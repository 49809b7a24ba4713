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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.profiler import record_function  # phase labels for `benchmark/bench_ppo.py --profile`

from summarize_from_feedback_details import lora
from summarize_from_feedback_details.core import (
    UserInputError,
    cli,
    push_run_to_hub,
    validate_numbers,
)
from summarize_from_feedback_details.modeling import (
    ScalarModel,
    disable_dropout,
    entropy_from_logits,
    gather_logprobs,
    hidden_without_left_padding,
    masked_mean,
    masked_whiten,
    model_inputs,
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
    """PPO's arguments: the shared RL arguments (`rl.RLArgs`) and the critic's, GAE's and the KL controller's."""

    exp_name: str = "ppo"
    """experiment name; the run is `{exp_name}__{seed}__{unix time}`"""
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
    cliprange_value: float = 0.2
    """P-4: value clip around the rollout values"""
    vf_coef: float = 0.1
    """P-4: value-loss coefficient"""
    score_at: Literal["eos_plus_one", "eos"] = "eos_plus_one"
    """P-2: where the score is added: one position after the EOS (the released code) or on the EOS token"""
    whiten_rewards: bool = False
    """Detail 24: whiten the per-token rewards (masked, mean kept); off in the released runs"""
    whiten_advantages: bool = True
    """Detail 25: whiten the advantages over the valid response tokens"""
    critic_init: Literal["reward", "sft"] = "reward"
    """Detail 22: the critic starts from the trained RM (with its bias), or from SFT with a fresh head"""


# ----------------------------------------------------------------------------------------------
# The math of one PPO update, as pure functions (tests pin each with hand-computed values)
# ----------------------------------------------------------------------------------------------
def per_token_rewards(logprobs: Any, ref_logprobs: Any, scores: Any, masks: dict[str, Any], kl_coef: float) -> tuple[Any, Any, Any]:
    """P-2: reward_t = -beta * (logp_t - ref_logp_t) on every response token (0 after the EOS), plus the
    score at `score_index`. Returns (rewards, kl, non_score_reward)."""
    kl = per_token_kl(logprobs, ref_logprobs, masks["padding_mask"])
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
    value_valid = ~value_padding_mask
    clipped_values = torch.clamp(new_values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (new_values - returns) ** 2
    vf_losses2 = (clipped_values - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), value_valid)
    policy = clipped_policy_loss(new_logprobs, old_logprobs, advantages, padding_mask, cliprange)
    pg_loss = policy["pg_loss"]
    with torch.no_grad():
        stats = {**policy, "vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), value_valid)}
    return {"loss": pg_loss + vf_coef * vf_loss, "vf_loss": vf_loss, **stats}


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
    lora.check_args(args)
    check_input_paths(args, datasets=["dataset"], causal_lms=["sft_model_path"], reward_models=["reward_model_path"])
    stage = Stage.start(args)
    # ---- data and sizes (checked before any model is loaded)
    train, eval_data, validation, tokenizer, response_length = load_prompts(args, stage)  # Detail 21, 23.1
    plan = plan_ppo(args, stage.world_size)
    if len(train) < args.batch_size:
        raise UserInputError(f"--batch_size {args.batch_size} exceeds the {len(train)} SFT train queries")
    frozen_config = frozen_engines_config(args)  # Detail 8
    stage.print(f"PPO: {len(train)} prompts, {plan.num_updates} updates of {args.batch_size} rollouts, {plan.mini}, "
                f"response length {response_length}")
    stage.open_run()

    # ---- models, Detail 22: policy + reference from SFT, critic + reward model from the RM; dropout off (Detail 7)
    policy = load_causal_lm(args.sft_model_path, tokenizer)  # Detail 7
    policy = lora.prepare_trained(policy, args, args.sft_model_path)  # --lora_r, --gradient_checkpointing (lora.py)
    # Trained models in fp32 (TRAINED_DTYPE, the loaders' default), frozen ones in FROZEN_DTYPE, whatever the checkpoints say.
    ref_policy, reward_model = load_frozen_models(args, tokenizer)
    critic = initial_critic(args.critic_init, args.reward_model_path, args.sft_model_path)
    critic = lora.prepare_trained(critic, args, args.reward_model_path if args.critic_init == "reward" else args.sft_model_path)
    model = PolicyAndValue(policy, critic)
    # Detail 20 / G-1: one AdamW (lr 3e-6, eps 1e-5) over policy and critic, decayed linearly to 0.
    optimizer, scheduler = make_optimizer_and_scheduler(model, args.lr, args.eps, args.scheduler, args.warm_up_steps, plan.num_updates)
    accelerator = stage.accelerator(plan.mini)  # Detail 8
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler stays unprepared (stepped once per update)
    resumed = stage.restore(accelerator, scheduler)  # --resume: policy, critic, optimizer, scheduler, RNG states
    device = accelerator.device
    if frozen_config is not None and ref_policy is None:  # --lora_r: the reference is the policy, adapters off
        reward_model = frozen_engine(reward_model, frozen_config)
    elif frozen_config is not None:  # Detail 8: e.g. ZeRO-3 with the parameters streamed from CPU memory (6.9B)
        ref_policy, reward_model = frozen_engine(ref_policy, frozen_config), frozen_engine(reward_model, frozen_config)
    else:
        reward_model.to(device)
        if ref_policy is not None:
            ref_policy.to(device)
    unwrapped = accelerator.unwrap_model(model)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    # Detail P-1: the temperature the log-prob forwards divide by (None: the ablation that forgets it).
    loss_temperature = args.temperature if args.scale_logits_by_temperature else None
    kl_controller = AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.adaptive_kl else FixedKLController(args.kl_coef)
    if resumed:
        kl_controller.value = resumed["state"]["kl_coef"]

    metrics: dict[str, Any] = resumed["state"]["metrics"] if resumed else {}  # `first/`, `last/` so far
    if args.eval_before_training and not resumed:
        metrics.update(evaluate_generations(stage, unwrapped.policy, eval_data,
                                            tokenizer, response_length, args, prefix="sft", temperature=args.eval_temperature,
                                            reward_model=reward_model, gold=args.gold_eval, table_name="sft_query_responses"))
        stage.log({k: v for k, v in metrics.items() if k.endswith(("score", "gold_win_rate", "eos_rate", "response_token_len"))}, 0)

    # Detail P-6: a fixed validation batch, sampled at T 0.01 and scored every --eval_every updates.
    eval_rows = validation.select(range(stage.rank * args.local_eval_batch_size, (stage.rank + 1) * args.local_eval_batch_size))
    eval_queries = batch_tensor(eval_rows, "query_token", device)
    if args.save_samples_every and not resumed:  # P-6: the first samples table is the SFT policy's, before any update
        with torch.no_grad():
            responses, scores = sample_validation_batch(unwrapped.policy, reward_model, eval_queries, args, pad, eos,
                                                        response_length, keep_rng=True)
            save_samples(stage, tokenizer, reward_model, eval_rows, eval_queries, responses, scores, 0, args)
    prompts = prompt_batches(len(train), args.batch_size, stage.rank, stage.world_size, args.seed)
    shuffle = np.random.default_rng(args.seed + stage.rank * 100003)  # G-2: per-rank minibatch shuffles
    done = resumed["update"] if resumed else 0
    if resumed:  # the data position: the prompt batches already used, the shuffler's state
        for _ in range(done):
            next(prompts)
        shuffle.bit_generator.state = resumed["state"]["shuffle"]
    start_time = time.time() - (resumed["seconds"] if resumed else 0.0)
    for update in stage.progress(list(range(done + 1, plan.num_updates + 1)), "PPO updates"):
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
        stage.end_update(update, accelerator, scheduler, time.time() - start_time,  # --save_every, SIGTERM / SIGUSR1
                         {"metrics": metrics, "kl_coef": kl_controller.value, "shuffle": shuffle.bit_generator.state})
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
            # Details 23.1-23.3, P-1: fixed-length samples, reference log-probs, RM scores after truncation, EOS trick.
            rollout = sample_and_score(unwrapped.policy, ref_policy, reward_model, query, args, pad, eos, response_length,
                                       loss_temperature)
            response, postprocessed, logprob, ref_logprob, score = (rollout[k] for k in ("response", "postprocessed", "logprob",
                                                                                        "ref_logprob", "score"))
            with record_function("rollout/values"):
                value = unwrapped.values(torch.cat([query, response], 1), pad, context_length, args.skip_left_padding)
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
