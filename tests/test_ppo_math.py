"""The math of PPO pinned by hand-computed values (SPEC Details 20-25, P-1..P-4), and the optimised
log-prob computations proven equal to the plain ones."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from summarize_from_feedback_details.core import UserInputError
from summarize_from_feedback_details.dpo import dpo_loss
from summarize_from_feedback_details.modeling import (
    ScalarModel,
    ScalarModelConfig,
    gather_logprobs,
    masked_var,
    masked_whiten,
    model_inputs,
    response_logits,
    sample,
    sequence_logprobs,
)
from summarize_from_feedback_details.ppo import (
    AdaptiveKLController,
    Args,
    PolicyAndValue,
    generalized_advantage_estimation,
    per_token_rewards,
    ppo_losses,
    update_statistics,
    whiten_advantages,
    whiten_rewards,
)
from summarize_from_feedback_details.rl import (
    INVALID_LOGPROB,
    penalize_missing_eos,
    plan_ppo,
    policy_statistics,
    prompt_batches,
    response_masks,
)

EOS, PAD = 0, 9
# The four cases of every mask test: first EOS at the start, in the middle, at the last position, absent
# (already truncated after the first EOS, Detail 23.2).
RESPONSES = torch.tensor([[0, 9, 9, 9], [5, 0, 9, 9], [5, 6, 7, 0], [5, 6, 7, 8]])
T, F = True, False


def test_masks_for_eos_at_start_middle_last_and_absent():
    """P-2: log-probs masked after the EOS; the score at EOS + 1 (last index when EOS is last or absent);
    values masked after the score position."""
    masks = response_masks(RESPONSES, PAD, "eos_plus_one")
    assert masks["sequence_lengths"].tolist() == [0, 1, 3, 3]
    assert masks["padding_mask"].tolist() == [[F, T, T, T], [F, F, T, T], [F, F, F, F], [F, F, F, F]]
    assert masks["score_index"].tolist() == [1, 2, 3, 3]
    assert masks["value_padding_mask"].tolist() == [[F, F, T, T], [F, F, F, T], [F, F, F, F], [F, F, F, F]]
    on_eos = response_masks(RESPONSES, PAD, "eos")
    assert on_eos["score_index"].tolist() == [0, 1, 3, 3]
    assert on_eos["value_padding_mask"].tolist() == on_eos["padding_mask"].tolist()


def test_missing_eos_scores_minus_one():
    """Detail 23.3: only the response without any EOS gets the penalty (an EOS in the last slot counts)."""
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert penalize_missing_eos(scores, RESPONSES, EOS, -1.0).tolist() == [1.0, 2.0, 3.0, -1.0]


@pytest.mark.parametrize("score_at", ["eos_plus_one", "eos"])
def test_per_token_rewards_place_the_score(score_at):
    """P-2: reward_t = -beta (logp - ref_logp) on valid tokens, 0 after the EOS, + score at the score index."""
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0]]).repeat(4, 1)
    ref_logprobs = torch.tensor([[-2.0, -2.5, -1.0, -4.0]]).repeat(4, 1)  # kl per token: 1, 0.5, -2, 0
    scores = torch.tensor([10.0, 20.0, 30.0, 40.0])
    masks = response_masks(RESPONSES, PAD, score_at)
    rewards, kl, non_score = per_token_rewards(logprobs, ref_logprobs, scores, masks, kl_coef=0.5)
    assert kl.tolist() == [[1, 0, 0, 0], [1, 0.5, 0, 0], [1, 0.5, -2, 0], [1, 0.5, -2, 0]]
    assert non_score.tolist() == [[-0.5, 0, 0, 0], [-0.5, -0.25, 0, 0], [-0.5, -0.25, 1, 0], [-0.5, -0.25, 1, 0]]
    if score_at == "eos_plus_one":
        expected = [[-0.5, 10, 0, 0], [-0.5, -0.25, 20, 0], [-0.5, -0.25, 1, 30], [-0.5, -0.25, 1, 40]]
    else:
        expected = [[9.5, 0, 0, 0], [-0.5, 19.75, 0, 0], [-0.5, -0.25, 1, 30], [-0.5, -0.25, 1, 40]]
    assert rewards.tolist() == expected


def test_gae_by_hand():
    """P-3: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}, returns = A + V."""
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 0.0]])
    advantages, returns = generalized_advantage_estimation(rewards, values, gamma=1.0, lam=0.5)
    # t=2: 2 + 0 - 0 = 2; t=1: 0 + 0 - 1 + 0.5*2 = 0; t=0: 1 + 1 - 0.5 + 0.5*0 = 1.5
    assert advantages.tolist() == [[1.5, 0.0, 2.0]] and returns.tolist() == [[2.0, 1.0, 2.0]]
    advantages, _ = generalized_advantage_estimation(rewards, values, gamma=0.5, lam=1.0)
    # t=2: 2; t=1: 0 + 0 - 1 + 0.5*2 = 0; t=0: 1 + 0.5 - 0.5 + 0.5*0 = 1
    assert advantages.tolist() == [[1.0, 0.0, 2.0]]


def test_whitening_with_masks():
    """Details 24/25: masked mean / biased variance (the released `masked_whiten` calls `masked_var(.., False)`);
    advantages centred and zeroed on padding; rewards rescaled with their mean kept and zeroed after the score."""
    values = torch.tensor([[2.0, 5.0, 8.0, 100.0]])
    mask = torch.tensor([[T, T, T, F]])  # mean 5, biased var (9 + 0 + 9) / 3 = 6 (Bessel's would be 9)
    s = 6**0.5
    assert masked_var(values, mask).item() == pytest.approx(6.0, abs=1e-6)
    assert masked_var(values, mask, unbiased=True).item() == pytest.approx(9.0, abs=1e-6)
    assert masked_whiten(values, mask)[0, :3].tolist() == pytest.approx([-3 / s, 0.0, 3 / s], abs=1e-6)
    assert masked_whiten(values, mask, shift_mean=False)[0, :3].tolist() == pytest.approx([5 - 3 / s, 5.0, 5 + 3 / s], abs=1e-6)
    assert whiten_advantages(values, ~mask)[0].tolist() == pytest.approx([-3 / s, 0.0, 3 / s, 0.0], abs=1e-6)
    assert whiten_rewards(values, ~mask)[0].tolist() == pytest.approx([5 - 3 / s, 5.0, 5 + 3 / s, 0.0], abs=1e-6)
    # a single valid token whitens to 0 (biased variance 0), as in the released code
    assert masked_whiten(values, torch.tensor([[T, F, F, F]]))[0, 0].item() == pytest.approx(0.0, abs=1e-6)


def test_ppo_losses_by_hand():
    """P-4: clipped surrogate and clipped value loss; ratio 1 gives pg = -mean(A) and no clipping."""
    zeros = torch.zeros(1, 3)
    valid, value_valid = torch.tensor([[F, F, T]]), torch.tensor([[F, F, F]])  # last token is padding
    advantages = torch.tensor([[1.0, -2.0, 5.0]])
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    out = ppo_losses(zeros, zeros, advantages, zeros, zeros, returns, valid, value_valid, 0.2, 0.2, 0.1)
    assert out["pg_loss"].item() == pytest.approx(0.5)  # -(1 - 2) / 2
    assert out["approxkl"].item() == 0.0 and out["pg_clipfrac"].item() == 0.0 and out["ratio"].item() == 1.0
    # value: V 0, clipped to [-0.2, 0.2] around V_old 0 -> still 0; 0.5 * mean(1, 4, 9) = 7/3
    assert out["vf_loss"].item() == pytest.approx(7 / 3)
    assert out["loss"].item() == pytest.approx(0.5 + 0.1 * 7 / 3)
    # ratio e^0.5 = 1.65 with A = +1 is clipped at 1.2; with A = -2 the unclipped term is larger
    new = torch.tensor([[0.5, 0.5, 0.0]])
    out = ppo_losses(new, zeros, advantages, torch.tensor([[1.0, 1.0, 0.0]]), zeros, returns, valid, value_valid, 0.2, 0.2, 0.1)
    ratio = torch.exp(torch.tensor(0.5)).item()
    assert out["pg_loss"].item() == pytest.approx((-1.2 + 2 * ratio) / 2)
    assert out["pg_clipfrac"].item() == pytest.approx(0.5)
    # V = 1 is clipped to 0.2: max((1-1)^2, (0.2-1)^2) = 0.64; max((1-2)^2, (0.2-2)^2) = 3.24; (0-3)^2 = 9
    assert out["vf_loss"].item() == pytest.approx(0.5 * (0.64 + 3.24 + 9) / 3)
    assert out["vf_clipfrac"].item() == pytest.approx(2 / 3)


def test_adaptive_kl_controller():
    """Ziegler et al.: beta *= 1 + clip(KL/target - 1, +-0.2) * n / horizon."""
    controller = AdaptiveKLController(0.05, target=6.0, horizon=10_000)
    controller.update(12.0, 512)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.05 * (1 + 0.2 * 512 / 10_000))
    controller.update(5.4, 1000)  # error -0.1
    assert controller.value == pytest.approx(0.05 * (1 + 0.2 * 512 / 10_000) * (1 - 0.1 * 1000 / 10_000))


def test_prompts_are_reshuffled_when_exhausted_and_disjoint_across_ranks():
    """Detail 21 + G-2: each rank gets a disjoint slice of one permutation; a new permutation per pass."""
    ranks = [prompt_batches(10, 4, rank, 2, seed=3) for rank in range(2)]
    first_pass = [next(ranks[0]) + next(ranks[1]) for _ in range(2)]  # 2 batches of 4 (2 left over)
    seen = [i for batch in first_pass for i in batch]
    assert len(seen) == 8 and len(set(seen)) == 8
    second_pass = [next(ranks[0]) + next(ranks[1]) for _ in range(2)]
    assert len({i for batch in second_pass for i in batch}) == 8 and second_pass != first_pass
    single = prompt_batches(10, 4, 0, 1, seed=3)
    assert next(single) == first_pass[0][:2] + first_pass[0][2:]  # the same permutation with 1 process


def test_batch_plan_checks():
    plan = plan_ppo(Args(batch_size=64, num_mini_batches=2, local_micro_batch_size=8, local_rollout_forward_batch_size=16,
                         total_episodes=640), world_size=2)
    assert (plan.local_batch_size, plan.local_mini_batch_size, plan.mini.gradient_accumulation_steps, plan.num_updates) == (32, 16, 2, 10)
    with pytest.raises(UserInputError, match="not divisible by --num_mini_batches 3"):
        plan_ppo(Args(batch_size=64, num_mini_batches=3), 1)
    with pytest.raises(UserInputError, match="--local_rollout_forward_batch_size 48"):
        plan_ppo(Args(batch_size=64, local_rollout_forward_batch_size=48), 1)
    with pytest.raises(UserInputError, match="not divisible by --local_micro_batch_size 12"):
        plan_ppo(Args(batch_size=64, local_micro_batch_size=12, local_rollout_forward_batch_size=16), 1)
    with pytest.raises(UserInputError, match="fewer than one batch"):
        plan_ppo(Args(batch_size=64, local_rollout_forward_batch_size=16, total_episodes=32), 1)


def test_dpo_loss_by_hand():
    """DPO: h = (pi_c - pi_r) - (ref_c - ref_r); sigmoid -log sigmoid(beta h) (with label smoothing eps:
    -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)); IPO (h - 1/(2 beta))^2."""
    import math

    pi_c, pi_r, ref_c, ref_r = (torch.tensor([v]) for v in (-10.0, -14.0, -12.0, -13.0))  # h = 4 - 1 = 3
    assert dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5).item() == pytest.approx(math.log(1 + math.exp(-1.5)))
    smoothed = 0.9 * math.log(1 + math.exp(-1.5)) + 0.1 * math.log(1 + math.exp(1.5))
    assert dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, label_smoothing=0.1).item() == pytest.approx(smoothed)
    assert dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, loss_type="ipo").item() == pytest.approx((3 - 1) ** 2)


def test_sequence_logprobs_sum_only_the_response_tokens():
    """DPO log-probs: summed over the label positions that are not padding (the query is hidden by pads)."""
    policy, _ = _tiny_policy_and_critic()
    tokens = torch.tensor([[3, 4, 5, 6, 0, 99], [3, 4, 7, 0, 99, 99]])
    labels = torch.tensor([[99, 99, 5, 6, 0, 99], [99, 99, 7, 0, 99, 99]])
    logp = torch.log_softmax(policy(**model_inputs(tokens, 99)).logits, -1)
    expected = [logp[0, 1, 5] + logp[0, 2, 6] + logp[0, 3, 0], logp[1, 1, 7] + logp[1, 2, 0]]
    assert torch.allclose(sequence_logprobs(policy, tokens, labels, 99), torch.stack(expected), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Forward passes: P-1 temperature, logits_to_keep and gather equal the plain computation
# ----------------------------------------------------------------------------------------------
def _tiny_policy_and_critic(seed: int = 0) -> tuple[GPTNeoXForCausalLM, ScalarModel]:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    return GPTNeoXForCausalLM(config).eval(), ScalarModel(ScalarModelConfig(base_config=config.to_dict())).eval()


QUERIES = torch.tensor([[99, 99, 3, 4, 5], [2, 3, 4, 5, 6], [99, 7, 8, 1, 2]])  # 99: pad outside the vocabulary


def test_response_logits_equal_the_plain_full_forward_with_temperature():
    """`logits_to_keep` (no vocabulary logits for the query) and logit - logsumexp (no full log-softmax)
    equal a full forward followed by log_softmax and gather; P-1: the logits are divided by T."""
    policy, _ = _tiny_policy_and_critic()
    query_responses = torch.cat([QUERIES, torch.tensor([[1, 0, 3], [4, 4, 2], [0, 5, 6]])], 1)
    plain = policy(**model_inputs(query_responses, 99)).logits[:, 4:-1] / 0.7
    optimised = response_logits(policy, query_responses, 99, context_length=5, temperature=0.7)
    assert torch.allclose(plain, optimised, atol=1e-6)
    assert torch.allclose(response_logits(policy, query_responses, 99, 5, None) / 0.7, optimised, atol=1e-6)
    responses = query_responses[:, 5:]
    expected = torch.log_softmax(plain, dim=-1).gather(-1, responses[..., None])[..., 0]
    assert torch.allclose(gather_logprobs(optimised, responses), expected, atol=1e-6)


@pytest.mark.parametrize("scale", [True, False])
def test_first_minibatch_ratio_is_one_and_rollout_logprobs_match_training(scale):
    """Dropout off + same weights: the training forward reproduces the sampler's log-probs, so the first
    minibatch has ratio 1 and approx-KL 0 (to float rounding, 1e-5). P-1 ablation: forgetting to divide
    by the temperature breaks exactly this."""
    policy, critic = _tiny_policy_and_critic()
    model = PolicyAndValue(policy, critic)
    temperature = 0.7
    responses, rollout_logprobs = sample(policy, QUERIES, 99, 6, temperature, torch.Generator().manual_seed(0))
    query_responses = torch.cat([QUERIES, responses], 1)
    logits, values = model(query_responses, 99, QUERIES.size(1), temperature if scale else None)
    assert values.shape == responses.shape
    new_logprobs = gather_logprobs(logits, responses)
    masks = response_masks(responses, 99, "eos_plus_one")
    old = rollout_logprobs.masked_fill(masks["padding_mask"], INVALID_LOGPROB)
    new = new_logprobs.masked_fill(masks["padding_mask"], INVALID_LOGPROB)
    zeros = torch.zeros_like(values)
    out = ppo_losses(new, old, torch.randn_like(values), values, values, zeros, masks["padding_mask"],
                     masks["value_padding_mask"], 0.2, 0.2, 0.1)
    if scale:
        assert torch.allclose(new_logprobs, rollout_logprobs, atol=1e-5)
        assert out["ratio"].item() == pytest.approx(1.0, abs=1e-5) and out["approxkl"].item() < 1e-10
        assert out["pg_clipfrac"].item() == 0.0
    else:
        assert out["approxkl"].item() > 1e-5  # the KL and the ratio are wrong without P-1 (random logits are flat, so it is small)


def test_logged_statistics_as_released_or_masked():
    """P-5, hand-computed: by default the released code's logging, means over every response position (padding:
    ratio 1, never clipped, the entropy of its logits; objective/entropy adds -INVALID_LOGPROB = -1 per padding
    position) and one ratio per micro-batch; --masked_statistics averages over the valid tokens only."""
    padding = torch.tensor([[F, F, T]])
    zeros = torch.zeros(1, 3)
    # the hand case of test_ppo_losses_by_hand: ratio e^0.5 on the two valid tokens, the first one clipped
    out = ppo_losses(torch.tensor([[0.5, 0.5, INVALID_LOGPROB]]), torch.tensor([[0.0, 0.0, INVALID_LOGPROB]]),
                     torch.tensor([[1.0, -2.0, 0.0]]), zeros, zeros, zeros, padding, padding, 0.2, 0.2, 0.1)
    ratio = torch.exp(torch.tensor(0.5)).item()
    assert out["ratios"][0].tolist() == pytest.approx([ratio, ratio, 1.0]) and out["clipped"][0].tolist() == [T, F, F]
    entropy = torch.tensor([[1.0, 2.0, 6.0]])
    released, kept = policy_statistics(entropy, out["ratios"], out["clipped"], padding, masked=False)
    assert released["entropy"].item() == pytest.approx(3.0) and released["pg_clipfrac"].item() == pytest.approx(1 / 3)
    assert kept.tolist() == pytest.approx([(2 * ratio + 1) / 3])
    masked, kept = policy_statistics(entropy, out["ratios"], out["clipped"], padding, masked=True)
    assert masked["entropy"].item() == pytest.approx(1.5) and masked["pg_clipfrac"].item() == pytest.approx(0.5)
    assert kept.tolist() == pytest.approx([ratio, ratio])

    batch = {"padding_mask": padding, "logprobs": torch.tensor([[-1.0, -2.0, INVALID_LOGPROB]]), "kl": zeros,
             "non_score_reward": zeros, "scores": torch.zeros(1), "postprocessed": torch.tensor([[5, EOS, PAD]]),
             "responses": torch.tensor([[5, EOS, 7]]), "sequence_lengths": torch.tensor([1])}
    stats = {k: [torch.tensor(0.0)] for k in ("approxkl", "pg_clipfrac", "entropy", "pg_loss", "vf_loss", "vf_clipfrac")}
    micro_batch_means = [torch.tensor([1.0]), torch.tensor([1.2]), torch.tensor([1.4])]
    logged = update_statistics(batch, stats, micro_batch_means, EOS)
    assert logged["objective/entropy"].item() == pytest.approx(1 + 2 - 1)  # the released sum, the sentinel included
    assert logged["val/ratio"].item() == pytest.approx(1.2)
    assert logged["val/ratio_var"].item() == pytest.approx(0.04)  # unbiased: (0.2^2 + 0 + 0.2^2) / 2
    assert update_statistics(batch, stats, micro_batch_means, EOS, masked=True)["objective/entropy"].item() == pytest.approx(3.0)
    assert Args().masked_statistics is False


def test_logprob_math_is_fp32_from_bf16_logits():
    """The log-prob math runs in fp32 even when the logits are bf16 (the released code's, under DeepSpeed bf16, ran
    in bf16): log softmax([0, 1]) = [-log(1 + e), 1 - log(1 + e)] to fp32 precision (bf16 would be off by ~1e-3)."""
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.bfloat16)
    logprobs = gather_logprobs(logits, torch.tensor([0, 1]))
    expected = [-1.3132616875182228, -0.3132616875182228]
    assert logprobs.dtype == torch.float32 and logprobs.tolist() == pytest.approx(expected, abs=1e-6)
    assert logits.float().log_softmax(-1).bfloat16().float()[[0, 1], [0, 1]].tolist() != pytest.approx(expected, abs=1e-4)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    policy = GPTNeoXForCausalLM(config).to(torch.bfloat16).eval()
    tokens = torch.tensor([[3, 4, 5, 6, 7]])
    logits = response_logits(policy, tokens, PAD, 2, 0.7)
    assert logits.dtype == torch.float32
    responses, sampled = sample(policy, tokens[:, :2], PAD, 3, 0.7)
    assert sampled.dtype == torch.float32
