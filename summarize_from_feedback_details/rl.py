"""What the RL stages share (`ppo.py`, `rloo.py`): their common arguments, batch sizes, prompt batches, the rollout
(fixed-length sampling, truncation after the first EOS, the EOS trick, temperature-scaled log-probs), response masks,
the per-token KL, the clipped surrogate, the logged statistics and the validation sample tables.

One stage script never imports another: both import this module.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.profiler import record_function  # phase labels for `benchmark/bench_ppo.py --profile`

from summarize_from_feedback_details import lora
from summarize_from_feedback_details.core import (
    BatchPlan,
    TrainArgs,
    UserInputError,
    column,
    plan_batches,
    torch_generator,
    write_text,
)
from summarize_from_feedback_details.modeling import (
    FROZEN_DTYPE,
    ScalarModel,
    disable_dropout,
    first_true_indices,
    gather_logprobs,
    masked_mean,
    response_logits,
    sample,
    sequence_scores,
    truncate_after_eos,
)
from summarize_from_feedback_details.training import (
    Stage,
    batch_tensor,
    check_vocabulary,
    frozen_models_config,
    gold_utility,
    load_causal_lm,
    load_optional_splits,
    load_processed_split,
    require_columns,
    response_texts,
)

INVALID_LOGPROB = 1.0
"""log-prob written at positions after the EOS for the rollout, reference and training alike (their
difference, the KL and the log-ratio, is then exactly 0 there), as the released code did"""


@dataclass
class RLArgs(TrainArgs, lora.LoraArgs):
    """The arguments of every RL stage (PPO, RLOO / GRPO): the same details, the same defaults."""

    sft_model_path: str = "models/sft_model"
    """Detail 22: the SFT checkpoint; the policy and the frozen reference start from it"""
    reward_model_path: str = "models/reward_model"
    """Detail 22: the RM checkpoint (with its normalisation bias); the frozen reward model (and PPO's critic) start from it"""
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
    """Detail 20: beta of the KL penalty -beta * (logp - ref_logp) (the paper also runs 0.07 and 0.1)"""
    cliprange: float = 0.2
    """P-4: policy ratio clip"""
    eos_trick: bool = True
    """Detail 23.3: a response without EOS scores --penalty_reward_value instead of the RM's score (off: the RM scores its last token)"""
    penalty_reward_value: float = -1.0
    """Detail 23.3: the score of a response without EOS"""
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
    """also evaluate the SFT policy before RL (metrics prefixed `sft/`)"""
    gold_eval: bool = False
    """score responses with the embedded task's gold utility (win rate against references; embedded data only)"""
    frozen_models_config: str | None = None
    """Detail 8: an accelerate DeepSpeed yaml for the frozen reference policy and reward model, which then run as their
    own DeepSpeed inference engines (configs/accelerate/deepspeed_zero3_offload.yaml: ZeRO-3, parameters offloaded to
    CPU, the 6.9B setup); needs --deepspeed (default: a whole copy of each on every process)"""


# ----------------------------------------------------------------------------------------------
# Batch sizes and prompts
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PPOPlan:
    """Derived sizes of a PPO-style update (rollouts, then epochs over minibatches): `batch_size = num_mini_batches x
    mini_batch_size`, `mini_batch_size = local_micro_batch_size x gradient_accumulation_steps x processes`,
    `local_batch_size = batch_size / processes`."""

    mini: BatchPlan
    local_batch_size: int
    local_mini_batch_size: int
    num_updates: int


def plan_ppo(args: RLArgs, world_size: int) -> PPOPlan:
    """Every batch size of a PPO-style update from the arguments, with exact-division checks (one clear error)."""
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


def load_prompts(args: RLArgs, stage: Stage) -> tuple[Any, dict[str, Any], Any, Any, int]:
    """Detail 21: the SFT train queries as prompts, the evaluation splits (absent or empty ones skipped) and the
    validation split of the per-update batch, checked before any model is loaded; the tokenizer and the number of
    tokens to sample (23.1). Returns (train, eval_data, validation, tokenizer, response_length)."""
    train = load_processed_split(args.dataset, "sft", "train")  # Detail 21: prompts are the SFT train queries
    require_columns(train, ["query_token", "reference_response_token"], f"{args.dataset} sft/train")
    eval_data = load_optional_splits(args.dataset, "sft", args.eval_splits, say=stage.print)  # absent/empty: skipped
    validation = eval_data["validation"] if "validation" in eval_data else load_processed_split(args.dataset, "sft", "validation")
    for split, ds in {"validation": validation, **eval_data}.items():
        require_columns(ds, ["query_token", "query", "reference_response", "reference_response_token"], f"{args.dataset} sft/{split}")
    tokenizer = stage.load_tokenizer(args.dataset, args.sft_model_path, args.allow_pad_equals_eos)
    response_length = args.response_length or len(train[0]["reference_response_token"])
    if (args.eval_every or args.save_samples_every) and len(validation) < args.local_eval_batch_size * stage.world_size:
        raise UserInputError(f"the validation split has fewer than --local_eval_batch_size x processes = {args.local_eval_batch_size * stage.world_size} queries")
    return train, eval_data, validation, tokenizer, response_length


def frozen_engines_config(args: RLArgs) -> dict[str, Any] | None:
    """Detail 8: the DeepSpeed config of --frozen_models_config for the frozen reference and reward model (None: whole
    copies on every process), checked before any model is loaded."""
    if args.frozen_models_config is None:
        return None
    if not args.deepspeed:
        raise UserInputError("--frozen_models_config runs the frozen models as DeepSpeed engines next to the ZeRO-2 "
                             "trained models: add --deepspeed")
    if args.skip_left_padding:
        raise UserInputError("--skip_left_padding (a CPU speed-up: one forward per row) does not go with --frozen_models_config "
                             "(ZeRO-3 engines gather their parameters for every call): drop one of the two")
    return frozen_models_config(args.frozen_models_config, args.local_rollout_forward_batch_size)


def load_frozen_models(args: RLArgs, tokenizer: Any) -> tuple[Any, Any]:
    """Detail 22: the frozen reference policy (from SFT) and reward model (from the RM), dropout off (Detail 7), in
    FROZEN_DTYPE whatever the checkpoints say."""
    # --lora_r: no copy (None); the reference is the policy with its adapters off (`lora.reference` in sample_and_score)
    ref_policy = None if args.lora_r else load_causal_lm(args.sft_model_path, tokenizer, dtype=FROZEN_DTYPE).eval().requires_grad_(False)
    reward_model = disable_dropout(ScalarModel.from_pretrained(args.reward_model_path, dtype=FROZEN_DTYPE)).eval().requires_grad_(False)
    check_vocabulary(reward_model.config.backbone_config, tokenizer, args.reward_model_path)
    return ref_policy, reward_model


# ----------------------------------------------------------------------------------------------
# Rollouts: sampling, truncation, scores, masks, KL (tests pin each with hand-computed values)
# ----------------------------------------------------------------------------------------------
def sample_and_score(
    policy: Any, ref_policy: Any, reward_model: Any, query: Any, args: RLArgs, pad: int, eos: int, response_length: int,
    loss_temperature: float | None,
) -> dict[str, Any]:
    """One forward batch of rollouts without gradients: the sampled responses and their temperature-scaled log-probs,
    the reference's log-probs, the responses truncated after the first EOS and the RM's scores of those (with the EOS
    trick). Keys: response, postprocessed, logprob, ref_logprob, score."""
    context_length = query.size(1)
    with record_function("rollout/sample"):  # Detail 23.1: a fixed number of tokens; P-1: temperature-scaled log-probs
        response, logprob = sample(policy, query, pad, response_length, args.temperature, sampler=args.sampler)
    query_response = torch.cat([query, response], 1)
    with record_function("rollout/ref_logprobs"), lora.reference(ref_policy, policy) as reference:  # LoRA: adapters off
        ref_logits = response_logits(reference, query_response, pad, context_length, loss_temperature, args.skip_left_padding)  # P-1
        ref_logprob = gather_logprobs(ref_logits, response)
    with record_function("rollout/scores"):
        # Detail 23.2: tokens after the first EOS become [PAD] before the RM sees them; Detail 12: read at EOS.
        postprocessed = truncate_after_eos(response, eos, pad)
        score = sequence_scores(reward_model, torch.cat([query, postprocessed], 1), pad, context_length, args.skip_left_padding).float()
        if args.eos_trick:  # Detail 23.3: -1 without an EOS
            score = penalize_missing_eos(score, postprocessed, eos, args.penalty_reward_value)
    return {"response": response, "postprocessed": postprocessed, "logprob": logprob, "ref_logprob": ref_logprob, "score": score}


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


def per_token_kl(logprobs: Any, ref_logprobs: Any, padding_mask: Any) -> Any:
    """P-2: the per-token KL estimate logp_t - ref_logp_t of the sampled tokens, 0 after the EOS."""
    return (logprobs - ref_logprobs).masked_fill(padding_mask, 0.0)


# ----------------------------------------------------------------------------------------------
# The policy loss and the logged statistics
# ----------------------------------------------------------------------------------------------
def clipped_policy_loss(new_logprobs: Any, old_logprobs: Any, advantages: Any, padding_mask: Any, cliprange: float) -> dict[str, Any]:
    """P-4: the clipped surrogate max(-A r, -A clip(r, 1 - eps, 1 + eps)) averaged over the valid response tokens, with
    its statistics: `pg_clipfrac`, `approxkl` (the released code's 0.5 x mean squared log-ratio over every position, 0
    on padding by construction), `ratio`, `ratios` (per position, 1 on padding) and `clipped` (never on padding)."""
    valid = ~padding_mask
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), valid)
    with torch.no_grad():
        stats = {
            "pg_clipfrac": masked_mean((pg_losses2 > pg_losses).float(), valid),
            "approxkl": 0.5 * (log_ratio**2).mean(),
            "ratio": masked_mean(ratio, valid),
            "ratios": ratio.detach(),
            "clipped": pg_losses2 > pg_losses,
        }
    return {"pg_loss": pg_loss, **stats}


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


def history_step(metrics: dict[str, Any], logged: dict[str, float]) -> None:
    """Keep the first and last value of each per-update metric in the summary (`first/...`, `last/...`)."""
    for key, value in logged.items():
        metrics.setdefault(f"first/{key}", value)
        metrics[f"last/{key}"] = value


# ----------------------------------------------------------------------------------------------
# The per-update validation batch and its sample tables (P-6)
# ----------------------------------------------------------------------------------------------
def sample_validation_batch(
    policy: Any, reward_model: Any, queries: Any, args: RLArgs, pad: int, eos: int, response_length: int, keep_rng: bool,
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
    stage: Stage, tokenizer: Any, reward_model: Any, rows: Any, queries: Any, responses: Any, scores: Any, update: int, args: RLArgs,
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
