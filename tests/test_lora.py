"""LoRA adapters and gradient checkpointing (lora.py): on a tiny random GPT-NeoX, in process."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from conftest import read_metrics, run_module
from summarize_from_feedback_details import lora
from summarize_from_feedback_details.core import UserInputError
from summarize_from_feedback_details.modeling import (
    ScalarModel,
    response_logits,
    sequence_logprobs,
    sequence_scores,
)
from summarize_from_feedback_details.training import load_causal_lm, make_optimizer_and_scheduler

VOCAB, PAD = 64, 63


class Tokenizer:
    pad_token_id = PAD

    def __len__(self) -> int:
        return VOCAB

    def save_pretrained(self, path: str) -> None:
        pass


@pytest.fixture
def base_dir(tmp_path):
    """A tiny random GPT-NeoX causal LM saved as a checkpoint (the "SFT model")."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, attention_dropout=0.0, hidden_dropout=0.0)
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "sft")
    return tmp_path / "sft"


def lora_args(**kwargs) -> lora.LoraArgs:
    return lora.LoraArgs(**{"lora_r": 4, **kwargs})


def randomize_adapters(model) -> None:
    """Trained-looking adapters: B starts at 0, so a fresh adapter changes nothing."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)


def tokens(batch: int = 3, length: int = 10, pads: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    out = torch.randint(0, PAD, (batch, length), generator=generator)
    out[1, :pads] = PAD  # a left-padded query
    out[2, -pads:] = PAD  # a right-padded response
    return out


def test_reference_from_disabled_adapters_is_the_base_model_exactly(base_dir):
    base = load_causal_lm(str(base_dir), Tokenizer())
    x = tokens()
    labels = x.clone()
    expected = sequence_logprobs(base, x, labels, PAD)
    policy = lora.prepare_trained(load_causal_lm(str(base_dir), Tokenizer()), lora_args(), str(base_dir))
    # PPO's first minibatch: the fresh adapters (B = 0) change nothing, so new / old log-probs give ratio 1 exactly.
    assert torch.equal(sequence_logprobs(policy, x, labels, PAD), expected)
    assert torch.equal(torch.exp(response_logits(policy, x, PAD, 4, 0.7) - response_logits(base, x, PAD, 4, 0.7)),
                       torch.ones(3, 6, VOCAB))
    randomize_adapters(policy)
    trained = sequence_logprobs(policy, x, labels, PAD)
    assert (trained - expected).abs().max() > 1e-2  # the adapters now matter
    with torch.no_grad(), lora.reference(None, policy) as reference:
        assert reference is policy
        assert torch.equal(sequence_logprobs(reference, x, labels, PAD), expected)
    # switched back on, and trainable again
    assert torch.equal(sequence_logprobs(policy, x, labels, PAD), trained)
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    frozen = object()
    with lora.reference(frozen, policy) as reference:  # a full fine-tuning run's separate reference
        assert reference is frozen


def test_only_adapter_and_head_parameters_train(base_dir):
    policy = lora.prepare_trained(load_causal_lm(str(base_dir), Tokenizer()), lora_args(), str(base_dir))
    randomize_adapters(policy)
    x = tokens()
    sequence_logprobs(policy, x, x, PAD).sum().backward()
    with_grad = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in policy.named_parameters() if "lora_" in n}
    assert len(with_grad) == 2 * 4 * 2  # A and B on the 4 target layers of 2 blocks
    optimizer, _ = make_optimizer_and_scheduler(policy, 1e-3, 1e-5, "constant", 0, 1)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == lora.trainable_parameters(policy)[0]

    reward = lora.prepare_trained(ScalarModel.from_backbone(str(base_dir)), lora_args(), str(base_dir))
    randomize_adapters(reward)
    sequence_scores(reward, x, PAD).sum().backward()
    with_grad = {n for n, p in reward.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in reward.named_parameters() if "lora_" in n} | {"scalar_head.weight", "scalar_head.bias"}


def test_save_merge_reload_give_the_same_outputs(base_dir, tmp_path):
    x = tokens()
    policy = lora.prepare_trained(load_causal_lm(str(base_dir), Tokenizer()), lora_args(), str(base_dir))
    randomize_adapters(policy)
    policy.eval()
    expected = policy(input_ids=x.clamp(max=PAD - 1)).logits
    lora.save(policy, tmp_path / "adapters")
    lora.save_merged(policy, tmp_path / "merged")
    config = json.loads((tmp_path / "adapters" / lora.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve()) and config["r"] == 4
    assert not (tmp_path / "adapters" / "config.json").exists()
    for folder in ("adapters", "merged"):
        reloaded = load_causal_lm(str(tmp_path / folder), Tokenizer())
        assert not lora.has_adapters(reloaded) and not any("lora_" in n for n, _ in reloaded.named_parameters())
        torch.testing.assert_close(reloaded(input_ids=x.clamp(max=PAD - 1)).logits, expected, atol=1e-5, rtol=0)

    # a LoRA reward model on a LoRA SFT model: adapters (head and bias included) or merged
    reward = lora.prepare_trained(ScalarModel.from_backbone(str(tmp_path / "adapters")), lora_args(lora_r=2), str(tmp_path / "adapters"))
    randomize_adapters(reward)
    with torch.no_grad():
        reward.scalar_head.weight.add_(1.0)
    reward.config.bias, reward.config.normalization_stats = 0.25, {"mean": 0.0}
    expected = sequence_scores(reward.eval(), x, PAD)
    lora.save(reward, tmp_path / "rm")
    lora.save_merged(reward, tmp_path / "rm_merged")
    for folder in ("rm", "rm_merged"):
        reloaded = ScalarModel.from_pretrained(str(tmp_path / folder))
        assert reloaded.config.bias == 0.25 and reloaded.config.normalization_stats == {"mean": 0.0}
        torch.testing.assert_close(sequence_scores(reloaded.eval(), x, PAD), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(base_dir, adapters):
    x = tokens()

    def loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        args = lora_args(lora_r=4 if adapters else 0, gradient_checkpointing=checkpointing)
        policy = lora.prepare_trained(load_causal_lm(str(base_dir), Tokenizer()), args, str(base_dir))
        reward = lora.prepare_trained(ScalarModel.from_backbone(str(base_dir)), args, str(base_dir))
        randomize_adapters(policy)
        randomize_adapters(reward)
        policy.train(), reward.train()
        assert policy.gpt_neox.gradient_checkpointing == checkpointing == reward.backbone.gradient_checkpointing
        loss = (sequence_logprobs(policy, x, x, PAD).sum() + response_logits(policy, x, PAD, 4, 0.7, skip_left_padding=True).mean()
                + sequence_scores(reward, x, PAD).sum() + sequence_scores(reward, x, PAD, 4, skip_left_padding=True).sum())
        loss.backward()
        grads = {f"{k}.{n}": p.grad for k, m in (("policy", policy), ("reward", reward)) for n, p in m.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    loss, grads = loss_and_grads(False)
    checkpointed_loss, checkpointed_grads = loss_and_grads(True)
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-5, rtol=0)
    assert checkpointed_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_bad_lora_settings_are_one_clear_error(base_dir):
    with pytest.raises(UserInputError, match="--merge_lora needs adapters"):
        lora.check_args(lora.LoraArgs(merge_lora=True))
    with pytest.raises(UserInputError, match="--lora_target_modules is empty"):
        lora.check_args(lora_args(lora_target_modules=()))
    with pytest.raises(UserInputError, match=r"--lora_target_modules \['q_proj'\] name no layer"):
        lora.prepare_trained(load_causal_lm(str(base_dir), Tokenizer()), lora_args(lora_target_modules=("q_proj",)), str(base_dir))


# A LoRA DPO from the session's SFT run: 20 updates at the LoRA learning rate, merged too (gradient checkpointing is
# tested in process above). Measured (first 100 validation queries, T 0.01, 53 tokens): gold utility 0.35 (SFT) -> 0.80.
LORA_DPO_ARGS = ["--total_episodes", "640", "--lr", "5e-3", "--lora_r", "8", "--lora_alpha", "16", "--merge_lora",
                 "--no-eval_before_training", "--comparison_splits", "validation",
                 "--eval_splits", "validation", "--max_eval_samples", "100", "--eval_response_length", "53"]


@pytest.mark.slow
def test_lora_dpo_raises_the_gold_utility_over_sft(sft_run, embedded_dataset, runs_dir, embedded_tokenizer):
    run_module("dpo", "embedded", "--sft_model_path", str(sft_run / "model"), "--dataset", str(embedded_dataset),
               "--output_dir", str(runs_dir), "--run_name", "dpo_lora", *LORA_DPO_ARGS)
    run = runs_dir / "dpo_lora"
    sft, dpo = read_metrics(sft_run), read_metrics(run)
    assert dpo["eval/validation/gold_utility"] > sft["eval/validation/gold_utility"] + 0.2, (sft, dpo)
    assert dpo["eval/accuracy"] > 0.6
    assert sorted(p.name for p in (run / "model").glob("adapter_*")) == ["adapter_config.json", "adapter_model.safetensors"]
    x = tokens().clamp(max=len(embedded_tokenizer) - 1)
    adapters = load_causal_lm(str(run / "model"), embedded_tokenizer)
    merged = load_causal_lm(str(run / "model_merged"), embedded_tokenizer)
    base = load_causal_lm(str(sft_run / "model"), embedded_tokenizer)
    torch.testing.assert_close(adapters(input_ids=x).logits, merged(input_ids=x).logits, atol=1e-5, rtol=0)
    assert (adapters(input_ids=x).logits - base(input_ids=x).logits).abs().max() > 1e-3  # the adapters were trained


# 8 updates of 32 rollouts with adapters on the policy and the critic, the SFT reference from the disabled adapters
LORA_PPO_ARGS = ["--total_episodes", "256", "--batch_size", "32", "--local_rollout_forward_batch_size", "32",
                 "--local_micro_batch_size", "32", "--lr", "5e-3", "--lora_r", "8", "--lora_alpha", "16",
                 "--gradient_checkpointing", "--eval_splits", "validation", "--max_eval_samples", "100",
                 "--eval_every", "0", "--save_samples_every", "0"]


@pytest.mark.slow
def test_lora_ppo_raises_the_gold_utility_over_sft(sft_run, reward_run, embedded_dataset, runs_dir):
    """A LoRA PPO (with gradient checkpointing) from the session's SFT and RM: its policy beats SFT's gold utility on
    the validation queries, the first update's KL is 0 (the adapters start at 0, so the run starts at SFT; that the
    reference is the policy with its adapters off is pinned with trained adapters by
    test_rollouts_take_the_reference_from_the_policy_with_adapters_off), and it saves adapters only."""
    run_module("ppo", "embedded", "--sft_model_path", str(sft_run / "model"), "--reward_model_path", str(reward_run / "model"),
               "--dataset", str(embedded_dataset), "--output_dir", str(runs_dir), "--run_name", "ppo_lora", *LORA_PPO_ARGS)
    run = runs_dir / "ppo_lora"
    sft, ppo = read_metrics(sft_run), read_metrics(run)
    assert ppo["eval/validation/gold_utility"] > sft["eval/validation/gold_utility"] + 0.2, (sft, ppo)
    assert ppo["first/objective/kl"] == pytest.approx(0.0, abs=1e-5)  # update 1: policy = SFT = the reference
    assert (run / "model" / "adapter_config.json").exists() and not (run / "model" / "model.safetensors").exists()
    args = json.loads((run / "args.json").read_text())
    assert (args["lora_r"], args["gradient_checkpointing"]) == (8, True)


def test_rollouts_take_the_reference_from_the_policy_with_adapters_off(base_dir):
    """PPO / RLOO with --lora_r load no reference copy (None): the rollouts' reference log-probs are the SFT model's."""
    from summarize_from_feedback_details import rl
    from summarize_from_feedback_details.modeling import gather_logprobs

    base = load_causal_lm(str(base_dir), Tokenizer())
    policy = lora.prepare_trained(load_causal_lm(str(base_dir), Tokenizer()), lora_args(), str(base_dir)).eval()
    randomize_adapters(policy)
    reward = ScalarModel.from_backbone(str(base_dir)).eval()
    args = rl.RLArgs(lora_r=4)
    query = tokens(3, 6)
    with torch.no_grad():
        rollout = rl.sample_and_score(policy, None, reward, query, args, PAD, 0, 5, args.temperature)
        query_response = torch.cat([query, rollout["response"]], 1)
        expected = gather_logprobs(response_logits(base, query_response, PAD, 6, args.temperature), rollout["response"])
        trained = gather_logprobs(response_logits(policy, query_response, PAD, 6, args.temperature), rollout["response"])
    assert torch.equal(rollout["ref_logprob"], expected)
    assert (trained - expected).abs().max() > 1e-2
