"""Hand-computed checks of the shared model pieces: first EOS, truncation, the sampler, the scalar
reward model (Details 7, 11, 12, 15, 23.1, 23.2), losses, batch plans and G-2 sharding."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel, GPTNeoXConfig

from summarize_from_feedback_details.core import (
    UserInputError,
    atomic_directory,
    plan_batches,
    shard_micro_batches,
    training_schedule,
    wandb_names,
)
from summarize_from_feedback_details.modeling import (
    ScalarModel,
    ScalarModelConfig,
    first_true_indices,
    model_inputs,
    sample,
    sequence_scores,
    truncate_after_eos,
)
from summarize_from_feedback_details.reward import bradley_terry_loss
from summarize_from_feedback_details.sft import sft_loss
from summarize_from_feedback_details.training import (
    accuracy_breakdown,
    load_causal_lm,
    make_optimizer_and_scheduler,
    response_texts,
    rouge_scores,
    shard_range,
)

EOS, PAD = 0, 9


def tiny_config(hidden: int = 16, vocab: int = 16, **kwargs) -> GPTNeoXConfig:
    return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=2 * hidden, max_position_embeddings=64, **kwargs)


def test_first_true_indices_and_truncation_after_eos():
    """Detail 23.2 for an EOS at the start, in the middle, at the last position, and absent."""
    responses = torch.tensor([[0, 5, 6, 7], [5, 0, 6, 0], [5, 6, 7, 0], [5, 6, 7, 8]])
    assert first_true_indices(responses == EOS).tolist() == [0, 1, 3, 4]
    assert truncate_after_eos(responses, EOS, PAD).tolist() == [[0, 9, 9, 9], [5, 0, 9, 9], [5, 6, 7, 0], [5, 6, 7, 8]]


class DigitTokenizer:
    """Decodes id k as the letter 'a' + k; EOS 0, pad as given (what `response_texts` needs of a tokenizer)."""

    eos_token_id = EOS

    def __init__(self, pad: int) -> None:
        self.pad_token_id = pad

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + t) for t in ids)


@pytest.mark.parametrize("pad", [PAD, EOS])
def test_response_texts_counts_the_eos_also_when_it_is_the_pad(pad: int):
    """Truncated responses (Detail 23.2) -> text without EOS/PAD, length through the first EOS, EOS produced;
    the same answers when the pad token is EOS itself (Detail 3.2 ablated)."""
    responses = truncate_after_eos(torch.tensor([[0, 5, 6, 7], [5, 0, 6, 0], [5, 6, 7, 0], [5, 6, 7, 8]]), EOS, pad)
    texts, lengths, has_eos = response_texts(DigitTokenizer(pad), responses)
    assert texts == ["", "f", "fgh", "fghi"]
    assert lengths == [1, 2, 4, 4]
    assert has_eos == [True, True, True, False]


def test_model_inputs_mask_pads_and_replace_them_by_zero():
    """Detail 3.2: pad ids become 0 and are masked; EOS (also 0) stays visible."""
    inputs = model_inputs(torch.tensor([[PAD, 3, EOS, PAD]]), PAD)
    assert inputs["input_ids"].tolist() == [[0, 3, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[False, True, True, False]]


def test_sampler_cache_equals_full_forward_and_eos_does_not_stop():
    """The KV-cached sampler's scaled logits equal a full forward / T (P-1); Detail 23.1: a model that
    always emits EOS still yields exactly `response_length` tokens."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(tiny_config()).eval()
    pad = 99  # outside the 16-token vocabulary: a random model must not sample the pad id here
    queries = torch.tensor([[pad, pad, 3, 4, 5], [2, 3, 4, 5, 6]])
    responses, logprobs = sample(model, queries, pad, 6, 0.7, torch.Generator().manual_seed(1))
    assert responses.shape == (2, 6) and logprobs.shape == (2, 6)
    full = model(**model_inputs(torch.cat([queries, responses], 1), pad)).logits[:, 4:-1] / 0.7
    expected = torch.log_softmax(full, -1).gather(-1, responses[..., None])[..., 0]
    assert torch.allclose(expected, logprobs, atol=1e-5)

    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + 100.0 * (torch.arange(16) == EOS))
    responses, _ = sample(model, queries, pad, 6, 1.0)
    handle.remove()
    assert responses.tolist() == [[EOS] * 6, [EOS] * 6]


def test_scalar_model_head_init_reward_at_eos_and_bias_survives_reload(tmp_path):
    """Detail 11: head ~ N(0, 1/sqrt(d+1)), bias 0; Detail 12: the score is read at the last non-pad token;
    Detail 15: the normalisation bias is subtracted and survives save_pretrained / from_pretrained."""
    torch.manual_seed(0)
    wide = ScalarModel(ScalarModelConfig(base_config=tiny_config(hidden=1024).to_dict()))
    assert wide.scalar_head.bias.item() == 0.0
    assert wide.scalar_head.weight.std().item() == pytest.approx(1 / math.sqrt(1025), rel=0.1)

    model = ScalarModel(ScalarModelConfig(base_config=tiny_config().to_dict())).eval()
    tokens = torch.tensor([[3, 4, EOS, PAD, PAD], [3, 4, 5, 6, EOS]])
    per_token = model(**model_inputs(tokens, PAD))
    assert per_token.shape == (2, 5)
    scores = sequence_scores(model, tokens, PAD)
    assert torch.equal(scores, torch.stack([per_token[0, 2], per_token[1, 4]]))
    # Left-padded query + right-padded response: read after the context.
    left = torch.tensor([[PAD, 3, 4, EOS, PAD]])
    assert sequence_scores(model, left, PAD, context_length=3).item() == pytest.approx(model(**model_inputs(left, PAD))[0, 3].item())

    model.config.bias = 0.25
    assert torch.allclose(model(**model_inputs(tokens, PAD)), per_token - 0.25)
    model.save_pretrained(tmp_path / "rm")
    reloaded = ScalarModel.from_pretrained(tmp_path / "rm").eval()
    assert reloaded.config.bias == 0.25
    reloaded_scores = sequence_scores(reloaded, tokens, PAD)
    # The weights survive (to float rounding: the reloaded tensors' layout can pick another kernel path, 1 ulp with 2
    # threads) and the bias is subtracted exactly.
    torch.testing.assert_close(reloaded_scores, scores - 0.25, rtol=0, atol=1e-6)
    reloaded.config.bias = 0.0
    assert torch.equal(reloaded_scores, sequence_scores(reloaded, tokens, PAD) - 0.25)
    assert type(AutoModel.from_pretrained(tmp_path / "rm")).__name__ == "ScalarModel"


def test_fused_adamw_equals_the_per_tensor_loop():
    """The stages' fused AdamW (G-1: one lr, eps 1e-5, linear decay) moves the weights as torch's reference
    for-loop AdamW does, over 5 steps of a GPT-NeoX LM loss."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    fused_model = GPTNeoXForCausalLM(tiny_config())
    loop_model = GPTNeoXForCausalLM(tiny_config())
    loop_model.load_state_dict(fused_model.state_dict())
    start = {name: p.detach().clone() for name, p in fused_model.named_parameters()}
    fused, fused_schedule = make_optimizer_and_scheduler(fused_model, 1e-2, 1e-5, "linear", 0, 5)
    assert fused.defaults["fused"]
    loop = torch.optim.AdamW(loop_model.parameters(), lr=1e-2, eps=1e-5, foreach=False)
    loop_schedule = torch.optim.lr_scheduler.LambdaLR(loop, lambda step: 1 - step / 5)
    tokens = torch.randint(0, 16, (4, 12))
    for _ in range(5):
        for model, optimizer, schedule in ((fused_model, fused, fused_schedule), (loop_model, loop, loop_schedule)):
            model(tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
    moved = 0.0
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
        moved = max(moved, (a - start[name]).abs().max().item())
    assert moved > 1e-2  # the updates are far larger than the tolerance


def test_dropout_is_disabled_on_load(tmp_path):
    """Detail 7: a checkpoint saved with dropout loads with every dropout at 0."""
    from tokenizers import Tokenizer, models
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    GPTNeoXForCausalLM(tiny_config(hidden_dropout=0.3, attention_dropout=0.2)).save_pretrained(tmp_path / "lm")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")),
                                        eos_token="a", pad_token="b")
    model = load_causal_lm(str(tmp_path / "lm"), tokenizer)
    assert model.config.hidden_dropout == 0.0 and model.config.attention_dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_losses_hand_computed():
    """Detail 9: mean next-token cross-entropy over non-pad labels; Detail 10: Bradley-Terry."""
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(label 2 | position 0) = 3/6
    labels = torch.tensor([[1, 2, PAD]])
    assert sft_loss(logits, labels, PAD).item() == pytest.approx(-math.log(0.5))
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected)


def test_accuracy_breakdown_and_rouge():
    import pandas as pd

    table = pd.DataFrame({"split": ["validation", "validation", "validation_cnndm"], "batch": ["b1", "b2", "cnndm0"],
                          "confidence": [9, 9, 1], "correct": [True, False, True]})
    metrics = accuracy_breakdown(table)
    assert metrics["eval/accuracy"] == pytest.approx(2 / 3)
    assert metrics["eval/accuracy/split/validation"] == 0.5 and metrics["eval/accuracy/split/validation_cnndm"] == 1.0
    assert metrics["eval/accuracy/batch/b2"] == 0.0 and metrics["eval/accuracy/confidence/9"] == 0.5
    scores = rouge_scores(["the cat sat"], ["the cat sat"])
    assert scores == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_scores(["the cat sat"], ["a dog ran"])["rouge1"] == 0.0


def test_batch_plan_exact_division():
    plan = plan_batches(128, 8, 2, 1000, "SFT")
    assert (plan.gradient_accumulation_steps, plan.num_updates, plan.micro_batch_size) == (8, 7, 16)
    with pytest.raises(UserInputError, match="not divisible by --local_micro_batch_size 3 x 2 processes = 6"):
        plan_batches(64, 3, 2, 1000, "SFT")
    with pytest.raises(UserInputError, match="fewer than one batch"):
        plan_batches(64, 8, 1, 10, "SFT")


def test_sharding_sees_every_example_once_and_does_not_depend_on_world_size():
    """G-2: one permutation, disjoint shards; the micro-batches are the same for 1 or 2 processes."""
    one = plan_batches(8, 2, 1, 32, "x")
    two = plan_batches(8, 2, 2, 32, "x")
    single = shard_micro_batches(32, one, rank=0, seed=3)
    ranks = [shard_micro_batches(32, two, rank=r, seed=3) for r in range(2)]
    seen = [i for update in range(4) for r in range(2) for micro in ranks[r][update] for i in micro]
    assert sorted(seen) == list(range(32))
    for update in range(4):
        assert sorted(map(tuple, single[update])) == sorted(map(tuple, ranks[0][update] + ranks[1][update]))
    # The authors' per-rank shuffle: ranks draw from different permutations, some examples never seen.
    authors = [shard_micro_batches(32, two, rank=r, seed=3, per_rank_shuffle=True) for r in range(2)]
    seen = [i for r in range(2) for update in authors[r] for micro in update for i in micro]
    assert len(seen) == 32 and len(set(seen)) < 32
    assert [list(shard_range(10, r, 3)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_training_schedule_runs_several_epochs_with_new_permutations():
    """Multi-epoch runs: every epoch is a fresh permutation of full batches, exactly num_updates updates."""
    plan = plan_batches(4, 2, 1, 20, "x")  # 5 updates of 4 from 10 examples: 2 full batches per epoch
    updates = training_schedule(10, plan, rank=0, seed=3)
    assert len(updates) == 5 and all(len(u) == 2 and all(len(m) == 2 for m in u) for u in updates)
    flat = [[i for micro in update for i in micro] for update in updates]
    for epoch in range(2):
        seen = flat[2 * epoch] + flat[2 * epoch + 1]
        assert len(set(seen)) == 8  # no example twice within an epoch
    assert flat[:2] != flat[2:4]  # a new permutation per epoch
    with pytest.raises(UserInputError, match="fewer than one batch"):
        training_schedule(3, plan, rank=0, seed=3)


def test_atomic_directory_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("partial")
            raise RuntimeError("crash while saving")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_wandb_names_keep_sweep_cells_and_seeds_apart(tmp_path):
    """A sweep runs every cell with --run_name ppo: the W&B name adds the experiment and the seed, the group is
    the experiment (sweep.sh sets --exp_name {stage}_{size})."""
    from summarize_from_feedback_details.ppo import Args

    names = {wandb_names(Args(exp_name=f"ppo_{size}", seed=seed), tmp_path / "ppo") for size in ("1b", "2.8b") for seed in (1, 2)}
    assert len({name for name, _ in names}) == 4 and {group for _, group in names} == {"ppo_1b", "ppo_2.8b"}
    assert wandb_names(Args(exp_name="ppo_1b", seed=2), tmp_path / "ppo") == ("ppo_1b__seed2__ppo", "ppo_1b")


def test_zero2_plugin_ignores_the_launchers_offload_settings(monkeypatch):
    """Detail 8: the trained models run ZeRO-2 without offload, without gradient clipping, even when the launcher's
    environment asks for ZeRO-3 with CPU offload (as `accelerate launch` with the frozen-model yaml exports it)."""
    from summarize_from_feedback_details.training import zero2_plugin

    for name, value in {"OFFLOAD_PARAM_DEVICE": "cpu", "OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ZERO_STAGE": "3", "ZERO3_INIT": "true"}.items():
        monkeypatch.setenv(f"ACCELERATE_DEEPSPEED_{name}", value)
    config = zero2_plugin(4).deepspeed_config
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_param"]["device"] == "none" and zero["offload_optimizer"]["device"] == "none"
    assert config["gradient_accumulation_steps"] == 4  # (clipping: Stage.accelerator and the DeepSpeed run test)
