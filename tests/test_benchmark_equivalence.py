"""The optimisations the benchmark profile led to (ARCHITECTURE 'Performance principles') compute what the
plain computation does: chunked log-probs and their gradient, chunked entropy, response logits by index
with the temperature applied in place; the inverse-CDF sampler draws the same distribution."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from summarize_from_feedback_details import modeling
from summarize_from_feedback_details.modeling import (
    draw_tokens,
    entropy_from_logits,
    gather_logprobs,
    model_inputs,
    response_logits,
    sample,
)


def plain_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def plain_entropy(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


@pytest.mark.parametrize("chunk_elements", [1 << 18, 300])  # the default, and chunks of a few rows
def test_chunked_logprobs_and_gradient_equal_log_softmax_gather(monkeypatch, chunk_elements):
    """Above CPU_CHUNK_ELEMENTS the log-probs go through `_ChunkedLogprobs`; on a strided view (the training
    forward's `logits[:, :-1]`) its values and its gradient equal log_softmax + gather under autograd."""
    monkeypatch.setattr(modeling, "CPU_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3, 41, 2200, generator=generator) * 3
    tokens = torch.randint(0, 2200, (3, 40), generator=generator)
    weights = torch.randn(3, 40, generator=generator)
    ours_input = base.clone().requires_grad_(True)
    plain_input = base.clone().requires_grad_(True)
    ours = gather_logprobs(ours_input[:, :-1], tokens)
    plain = plain_logprobs(plain_input[:, :-1], tokens)
    assert ours.grad_fn is not None and "Chunked" in type(ours.grad_fn).__name__  # the chunked path ran
    torch.testing.assert_close(ours, plain, rtol=0, atol=2e-6)
    (ours * weights).sum().backward()
    (plain * weights).sum().backward()
    torch.testing.assert_close(ours_input.grad, plain_input.grad, rtol=0, atol=1e-6)
    assert (ours_input.grad[:, -1] == 0).all()  # the sliced-off position gets no gradient


def test_chunked_logprobs_by_hand():
    """One row, hand-computed: logits (0, ln 3) -> p = (1/4, 3/4); d log p[1] / d logits = onehot - p."""
    logits = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]]).requires_grad_(True)
    out = modeling._ChunkedLogprobs.apply(logits, torch.tensor([1]))
    assert out.item() == pytest.approx(torch.log(torch.tensor(0.75)).item(), abs=1e-6)
    out.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.25, 0.25]]))


def test_chunked_entropy_equals_the_plain_formula(monkeypatch):
    monkeypatch.setattr(modeling, "CPU_CHUNK_ELEMENTS", 500)
    logits = torch.randn(2, 33, 1000, generator=torch.Generator().manual_seed(1)) * 4
    with torch.no_grad():
        torch.testing.assert_close(entropy_from_logits(logits[:, :-1]), plain_entropy(logits[:, :-1]), rtol=0, atol=2e-5)
    uniform = torch.zeros(1, 2, 1000)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((1, 2), torch.log(torch.tensor(1000.0)).item()))


def _policy(seed: int = 0, use_parallel_residual: bool = True) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, rotary_pct=0.25,
                           use_parallel_residual=use_parallel_residual)
    return GPTNeoXForCausalLM(config)


def test_response_logits_by_index_and_in_place_temperature_match_the_plain_forward_and_its_gradient():
    """Logits kept by index (no extra row) and divided by T in place: the same values as a full forward
    sliced and divided, and the same parameter gradients through log-probs (P-1)."""
    policy = _policy()
    query_responses = torch.tensor([[99, 99, 3, 4, 5, 7, 8, 9], [2, 3, 4, 5, 6, 1, 0, 2]])  # 99: pad
    responses = query_responses[:, 5:]
    plain = policy(**model_inputs(query_responses, 99)).logits[:, 4:-1] / 0.7
    plain_loss = plain_logprobs(plain, responses).sum()
    plain_loss.backward()
    plain_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    ours = response_logits(policy, query_responses, 99, context_length=5, temperature=0.7)
    assert ours.shape == (2, 3, 64) and ours.is_contiguous()
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)
    gather_logprobs(ours, responses).sum().backward()
    for ours_grad, plain_grad in zip((p.grad for p in policy.parameters()), plain_grads, strict=True):
        torch.testing.assert_close(ours_grad, plain_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ["gpt_neox", "gpt_neox_sequential", "gpt2"])  # rotary / learned absolute positions
def test_forwards_without_left_padding_equal_the_padded_batch_with_gradients(monkeypatch, architecture):
    """--skip_left_padding: one forward per row without its query's left pads gives the padded batch's response
    logits, critic values and RM scores and the same parameter gradients. Rows with 2, 0 and 4 (all but one
    query token) left pads, responses with pads after their EOS (id 0). With rotary positions only relative
    positions count; GPT-2's learned absolute positions fail unless the pads keep their positions (G-3).
    GPT-NeoX (parallel and sequential residual) runs its last layer only where the caller reads it on the rows
    without pads inside (`_gpt_neox_last_layer_from`): counted, so the test cannot pass through the full path alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from summarize_from_feedback_details.modeling import ScalarModel, ScalarModelConfig, sequence_scores
    from summarize_from_feedback_details.ppo import PolicyAndValue

    pruned_calls = []
    pruned = modeling._gpt_neox_last_layer_from
    monkeypatch.setattr(modeling, "_gpt_neox_last_layer_from", lambda *a: pruned_calls.append(a[3]) or pruned(*a))
    torch.manual_seed(0)
    if architecture == "gpt2":
        policy = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                                            embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        policy = _policy(use_parallel_residual=architecture == "gpt_neox")
    critic = ScalarModel(ScalarModelConfig(base_config=policy.config.to_dict()))
    model = PolicyAndValue(policy, critic)
    query_responses = torch.tensor([[99, 99, 3, 4, 5, 7, 8, 9, 10], [2, 3, 4, 5, 6, 1, 0, 99, 99], [99, 99, 99, 99, 5, 7, 0, 99, 99]])
    responses = query_responses[:, 5:]
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    results = {}
    for skip in (False, True):
        model.zero_grad()
        logits, values = model(query_responses, 99, 5, 0.7, skip_left_padding=skip)
        scores = sequence_scores(critic, query_responses, 99, 5, skip_left_padding=skip)
        ((gather_logprobs(logits, responses.masked_fill(responses == 99, 0)) + values) * weights).sum().add(scores.sum()).backward()
        results[skip] = logits.detach(), values.detach(), scores.detach(), [p.grad.clone() for p in model.parameters()]
    (padded_logits, padded_values, padded_scores, padded_grads), (logits, values, scores, grads) = results[False], results[True]
    assert logits.shape == (3, 4, 64) and values.shape == (3, 4) and scores.shape == (3,)
    torch.testing.assert_close(logits, padded_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(values, padded_values, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, padded_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[1], critic(**model_inputs(query_responses[1:2, :7], 99))[0, 6])  # read at the EOS
    for grad, padded_grad in zip(grads, padded_grads, strict=True):
        torch.testing.assert_close(grad, padded_grad, rtol=1e-4, atol=1e-5)
    # Pruned last layers (first kept index within the unpadded row): row 0 (2 pads, no pad inside up to position 7)
    # for the policy and the critic (position 4 = 2 after the pads), then the RM's three rows cut after their last
    # non-pad token (positions 8, 6, 6 = 6, 6, 2 after the pads). Rows 1 and 2 of the policy and critic hold pads after
    # their EOS: the full path with a mask.
    assert pruned_calls == ([] if architecture == "gpt2" else [2, 2, 6, 6, 2])


def test_inverse_cdf_draws_by_hand():
    """probs (0.1, 0, 0.6, 0.3): the CDF is (0.1, 0.1, 0.7, 1.0); u picks the first index whose CDF exceeds it."""
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    generator = torch.Generator().manual_seed(3)
    u = torch.rand(1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64).item()
    expected = 0 if u < 0.1 else 2 if u < 0.7 else 3
    assert draw_tokens(probs, generator, "inverse_cdf").item() == expected
    many = torch.cat([draw_tokens(probs.expand(4000, 4), generator, "inverse_cdf") for _ in range(5)])[:, 0]
    frequencies = torch.bincount(many, minlength=4).double() / many.numel()
    assert frequencies[1] == 0  # a zero-probability token is never drawn
    torch.testing.assert_close(frequencies, probs[0].double(), rtol=0, atol=0.01)
    with pytest.raises(ValueError, match="sampler"):
        draw_tokens(probs, generator, "top_k")


def test_inverse_cdf_sampling_keeps_the_rollout_logprobs_of_the_training_forward():
    """With either sampler the rollout log-probs are those of the temperature-scaled scores (P-1), so the
    training forward reproduces them (ratio 1 on the first minibatch); the default stays multinomial."""
    policy = _policy().eval()
    queries = torch.tensor([[99, 99, 3, 4, 5], [2, 3, 4, 5, 6]])
    for sampler in ("multinomial", "inverse_cdf"):
        responses, logprobs = sample(policy, queries, 99, 6, 0.7, torch.Generator().manual_seed(0), sampler=sampler)
        logits = response_logits(policy, torch.cat([queries, responses], 1), 99, queries.size(1), 0.7)
        torch.testing.assert_close(gather_logprobs(logits, responses), logprobs, rtol=0, atol=1e-5)
    default, _ = sample(policy, queries, 99, 6, 0.7, torch.Generator().manual_seed(0))
    explicit, _ = sample(policy, queries, 99, 6, 0.7, torch.Generator().manual_seed(0), sampler="multinomial")
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("chunk_elements", [1 << 18, 300])  # one block, and the chunked path
def test_sft_loss_equals_cross_entropy_over_the_masked_positions(monkeypatch, chunk_elements):
    """Detail 9's loss through `gather_logprobs` (no masked copy of the logits, no log-softmax tensor) equals
    F.cross_entropy over the non-pad label positions, in value and in gradient; a hand-made case too."""
    import torch.nn.functional as F

    from summarize_from_feedback_details.sft import sft_loss

    monkeypatch.setattr(modeling, "CPU_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(3, 12, 500, generator=generator) * 2
    labels = torch.randint(0, 499, (3, 12), generator=generator)
    labels[0, 8:] = 499  # right padding (pad id 499), and a row whose query part is masked too
    labels[2, :5] = 499
    ours_input, plain_input = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    ours = sft_loss(ours_input, labels, 499)
    mask = labels[:, 1:] != 499
    plain = F.cross_entropy(plain_input[:, :-1][mask], labels[:, 1:][mask])
    torch.testing.assert_close(ours, plain, rtol=0, atol=2e-6)
    ours.backward()
    plain.backward()
    torch.testing.assert_close(ours_input.grad, plain_input.grad, rtol=0, atol=1e-7)
    # By hand: logits (0, ln 3) for the one labelled position -> -log(3/4) when the label is 1.
    logits = torch.tensor([[[0.0, torch.log(torch.tensor(3.0)).item()], [5.0, 5.0]]])
    assert sft_loss(logits, torch.tensor([[9, 1]]), 9).item() == pytest.approx(-torch.log(torch.tensor(0.75)).item(), abs=1e-6)
