"""RLOO and GRPO (rloo.py): the leave-one-out baseline and GRPO's group normalisation by hand, whole groups on one
process, the policy losses by hand, the first minibatch's ratio 1, and an embedded run under 2 processes that
improves the gold utility over SFT."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from conftest import read_metrics, torchrun
from summarize_from_feedback_details.core import UserInputError
from summarize_from_feedback_details.modeling import gather_logprobs, sample
from summarize_from_feedback_details.rl import INVALID_LOGPROB, per_token_kl, prompt_batches, response_masks
from summarize_from_feedback_details.rloo import (
    Args,
    Policy,
    check_groups,
    group_advantages,
    grouped_prompt_batches,
    rloo_losses,
    sequence_rewards,
    whiten_sequence_advantages,
)

T, F = True, False


@pytest.mark.parametrize(("k", "rewards", "expected"), [
    # each sample minus the mean of the OTHER k - 1 rewards of its prompt (rows grouped k at a time)
    (2, [1.0, 3.0, 0.0, -2.0], [1 - 3, 3 - 1, 0 - (-2), -2 - 0]),
    (3, [1.0, 2.0, 6.0], [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2]),
    (4, [0.0, 4.0, 2.0, 6.0, 1.0, 1.0, 1.0, 1.0], [0 - 12 / 3, 4 - 8 / 3, 2 - 10 / 3, 6 - 6 / 3, 0, 0, 0, 0]),
])
def test_leave_one_out_baseline_by_hand(k, rewards, expected):
    advantages = group_advantages(torch.tensor(rewards), k, "rloo")
    assert advantages.tolist() == pytest.approx(expected)


def test_grpo_normalisation_by_hand():
    """GRPO: (r - group mean) / (unbiased group std + 1e-4), each group on its own."""
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])  # mean 3, std sqrt((4 + 1 + 9) / 2); a tied group: 0
    expected = [-2 / (math.sqrt(7) + 1e-4), -1 / (math.sqrt(7) + 1e-4), 3 / (math.sqrt(7) + 1e-4), 0, 0, 0]
    assert group_advantages(rewards, 3, "grpo").tolist() == pytest.approx(expected)
    two = group_advantages(torch.tensor([0.0, 2.0]), 2, "grpo", grpo_eps=0.0)
    assert two.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_sequence_reward_and_whitening_by_hand():
    """R-2: score - beta x the summed per-token KL (0 after the EOS), or the score alone (GRPO); R-4."""
    logprobs = torch.tensor([[-1.0, -0.5, INVALID_LOGPROB], [-2.0, INVALID_LOGPROB, INVALID_LOGPROB]])
    ref = torch.tensor([[-1.2, -0.8, INVALID_LOGPROB], [-2.1, INVALID_LOGPROB, INVALID_LOGPROB]])
    kl = per_token_kl(logprobs, ref, torch.tensor([[F, F, T], [F, T, T]]))
    assert kl.flatten().tolist() == pytest.approx([0.2, 0.3, 0.0, 0.1, 0.0, 0.0])
    scores = torch.tensor([1.0, 0.5])
    assert sequence_rewards(scores, kl, 0.1, True).tolist() == pytest.approx([1 - 0.05, 0.5 - 0.01])
    assert sequence_rewards(scores, kl, 0.1, False).tolist() == [1.0, 0.5]
    assert whiten_sequence_advantages(torch.tensor([1.0, 3.0])).tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)


def test_groups_stay_on_one_process_under_two_processes():
    """R-1: each rank gets its own prompts (PPO's disjoint slices of one permutation), each repeated k times in
    consecutive rows, so no group is split across the 2 processes; sizes that would split one are refused."""
    for k in (2, 4):
        ranks = [next(grouped_prompt_batches(20, 16, k, rank, 2, seed=3)) for rank in (0, 1)]
        prompts = [next(prompt_batches(20, 16 // k, rank, 2, seed=3)) for rank in (0, 1)]
        for rows, own in zip(ranks, prompts, strict=True):
            assert len(rows) == 8 and rows == [index for index in own for _ in range(k)]
        assert not set(ranks[0]) & set(ranks[1])
    check_groups(Args(batch_size=16, rloo_k=4), 2)
    with pytest.raises(UserInputError, match="--rloo_k 4 x 2 processes"):
        check_groups(Args(batch_size=12, rloo_k=4), 2)  # 6 rows per process: a group of 4 would straddle them
    with pytest.raises(UserInputError, match="--rloo_k 1"):
        check_groups(Args(rloo_k=1), 1)


def test_policy_losses_by_hand():
    """R-5: the clipped surrogate with the sequence advantage on every valid token; REINFORCE; GRPO's k3 KL term."""
    new = torch.tensor([[0.5, 0.5, INVALID_LOGPROB]])
    old = torch.tensor([[0.0, 0.0, INVALID_LOGPROB]])
    ref = torch.tensor([[0.0, 0.5, INVALID_LOGPROB]])
    padding = torch.tensor([[F, F, T]])
    args = Args(cliprange=0.2, kl_coef=0.1)
    clip = rloo_losses(new, old, ref, torch.tensor([1.0]), padding, args, kl_in_reward=True)
    assert clip["loss"].item() == pytest.approx(-1.2)  # ratio e^0.5 clipped to 1.2 on both valid tokens
    assert clip["pg_clipfrac"].item() == pytest.approx(1.0) and "kl_loss" not in clip
    reinforce = rloo_losses(new, old, ref, torch.tensor([1.0]), padding, dataclasses.replace(args, loss="reinforce"), True)
    assert reinforce["loss"].item() == pytest.approx(-(0.5 + 0.5))
    grpo = rloo_losses(new, old, ref, torch.tensor([1.0]), padding, args, kl_in_reward=False)
    k3 = (math.exp(-0.5) + 0.5 - 1 + 0.0) / 2  # exp(ref - new) - (ref - new) - 1 over the 2 valid tokens
    assert grpo["kl_loss"].item() == pytest.approx(k3) and grpo["loss"].item() == pytest.approx(-1.2 + 0.1 * k3)


def test_first_minibatch_ratio_is_one():
    """Dropout off, same weights: the training forward (P-1, temperature-scaled) reproduces the sampler's log-probs,
    so the first minibatch's ratio is 1, nothing is clipped and approx-KL is 0 (to float rounding)."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    policy = GPTNeoXForCausalLM(config).eval()
    queries = torch.tensor([[99, 5, 6, 7], [99, 99, 8, 9]]).repeat_interleave(2, 0)  # 2 prompts x k 2
    responses, rollout_logprobs = sample(policy, queries, 99, 6, 0.7, torch.Generator().manual_seed(0))
    logits = Policy(policy)(torch.cat([queries, responses], 1), 99, queries.size(1), 0.7)
    padding = response_masks(responses, 99, "eos")["padding_mask"]
    old = rollout_logprobs.masked_fill(padding, INVALID_LOGPROB)
    new = gather_logprobs(logits, responses).masked_fill(padding, INVALID_LOGPROB)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0]), 2, "rloo")
    out = rloo_losses(new, old, old, advantages, padding, Args(), kl_in_reward=True)
    assert out["ratio"].item() == pytest.approx(1.0, abs=1e-5) and out["approxkl"].item() < 1e-10
    assert out["pg_clipfrac"].item() == 0.0


@pytest.mark.slow
def test_rloo_end_to_end_two_processes_beats_sft(sft_run, reward_run, embedded_dataset, runs_dir):
    """An embedded RLOO run (k 2) under torchrun with 2 processes: ppo.py's outputs, and the gold utility of its
    validation responses (T 0.01, the first 100 queries) above the SFT policy's on the same queries."""
    torchrun("rloo", "embedded", "--sft_model_path", str(sft_run / "model"), "--reward_model_path", str(reward_run / "model"),
             "--dataset", str(embedded_dataset), "--output_dir", str(runs_dir), "--run_name", "rloo",
             "--total_episodes", "512", "--batch_size", "32", "--local_micro_batch_size", "16",
             "--local_rollout_forward_batch_size", "16", "--local_eval_batch_size", "50", "--max_eval_samples", "100",
             "--eval_splits", "validation", "--eval_every", "8", "--logging_steps", "8", "--save_samples_every", "16",
             "--no-eval_before_training")
    run = runs_dir / "rloo"
    metrics, sft = read_metrics(run), read_metrics(sft_run)
    assert metrics["num_updates"] == 16 and metrics["rloo_k"] == 2 and metrics["kl_in_reward"] is True
    assert {"first/objective/scores", "last/objective/kl", "last/val/ratio"} <= set(metrics)
    assert (run / "query_responses_validation.csv").exists() and (run / "samples" / "update_16.csv").exists()
    assert (run / "model" / "model.safetensors").exists() and any((run / "tensorboard").iterdir())
    assert metrics["last/objective/scores"] > metrics["first/objective/scores"]
    assert metrics["eval/validation/gold_utility"] > sft["eval/validation/gold_utility"] + 0.2, (metrics, sft)


def test_ablate_plans_rloo_only_when_asked(tmp_path, capsys):
    """ablate.py: RLOO is an opt-in stage. With it in --stages, an RM detail re-runs RLOO beside PPO and an RLOO detail
    (R-3, --baseline grpo) re-runs RLOO alone on the baseline runs; the default stages plan no RLOO run."""
    from summarize_from_feedback_details import ablate

    data = tmp_path / "data"
    data.mkdir()
    common = {"seeds": (1,), "out_dir": str(tmp_path / "out"), "dataset": str(data), "embedded_dir": "E", "dry_run": True}
    ablate.main(ablate.Args(details=("reward_normalization", "rloo_baseline"), stages=("data", "sft", "reward", "ppo", "rloo", "dpo"),
                            **common))
    lines = capsys.readouterr().out.splitlines()
    rloo = [line for line in lines if ".rloo embedded" in line]
    assert len(rloo) == 3, lines  # the baseline's, the RM detail's, the R-3 detail's
    assert any("/reward_normalization/reward/model" in line for line in rloo)
    assert rloo[-1].endswith("--run_name rloo --seed 1 --baseline grpo") and "/baseline/reward/model" in rloo[-1]
    ablate.main(ablate.Args(**common))
    assert ".rloo " not in capsys.readouterr().out


def test_figures_order_and_label_rloo_and_grpo():
    """paper_figures.py draws RLOO beside PPO and DPO: its own colour, label and place in the legend, GRPO named by the
    run's --baseline, its headline metrics and training curves."""
    from summarize_from_feedback_details import paper_figures as pf

    assert pf.policy_order(["dpo", "rloo", "sft", "ppo", "grpo"]) == ["sft", "ppo", "rloo", "grpo", "dpo"]
    assert pf.policy_label("rloo", {"baseline": "rloo"}) == "RLOO" and pf.policy_label("rloo", {"baseline": "grpo"}) == "GRPO"
    assert len({pf.policy_color(p, ["sft", "ppo", "rloo", "grpo", "dpo"]) for p in ("sft", "ppo", "rloo", "grpo", "dpo")}) == 5
    assert pf.SUMMARY_METRICS["RLOO final KL"] == ("rloo", "last/objective/kl") and "rloo_training_curves" in pf.FIGURES
