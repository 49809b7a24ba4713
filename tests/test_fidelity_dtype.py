"""Dtypes: trainable models hold fp32 master weights whatever the checkpoint's dtype says (Pythia's hub configs say
float16, and transformers 5 would load them so), frozen models load in the dtype the code states (FROZEN_DTYPE).

The checkpoints here are tiny GPT-NeoX models saved in float16 with `dtype: float16` in their config, as Pythia's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, run_module
from summarize_from_feedback_details.modeling import (
    FROZEN_DTYPE,
    TRAINED_DTYPE,
    ScalarModel,
    ScalarModelConfig,
)
from summarize_from_feedback_details.training import load_causal_lm


def tiny_neox_config(vocab_size: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=512, dtype="float16")


def save_float16_checkpoints(out: Path, vocab_size: int, tokenizer=None) -> tuple[Path, Path]:
    """A causal LM and a reward model, both stored in float16 with config dtype float16 (the RM's backbone config
    too). Returns (lm path, rm path)."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = tiny_neox_config(vocab_size)
    lm = GPTNeoXForCausalLM(config).half()
    rm = ScalarModel(ScalarModelConfig(base_config=config.to_dict(), base_model="tiny")).half()
    paths = out / "lm16", out / "rm16"
    for model, path in zip((lm, rm), paths, strict=True):
        model.save_pretrained(str(path))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        saved = json.loads((path / "config.json").read_text())
        assert saved["dtype"] == "float16", saved.get("dtype")  # the checkpoint says float16, as Pythia's does
    assert json.loads((paths[1] / "config.json").read_text())["base_config"]["dtype"] == "float16"
    return paths


class _Tokenizer:
    """What `load_causal_lm`'s vocabulary check reads."""

    pad_token_id = 63

    def __len__(self) -> int:
        return 64


def _dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


def test_loaders_hold_fp32_whatever_the_checkpoint_says(tmp_path):
    """The stated dtypes are fp32 (the released code loaded every model in fp32: transformers 4.33 ignored the config's
    dtype); every loader gives them from a float16 checkpoint, with the float16 values exactly, and obeys `dtype`."""
    assert TRAINED_DTYPE == torch.float32 and FROZEN_DTYPE == torch.float32
    lm_path, rm_path = save_float16_checkpoints(tmp_path, 64)
    from transformers import AutoModelForCausalLM

    stored = AutoModelForCausalLM.from_pretrained(str(lm_path))  # transformers 5 alone: the config's float16
    assert _dtypes(stored) == {torch.float16}
    lm = load_causal_lm(str(lm_path), _Tokenizer())
    assert _dtypes(lm) == {torch.float32}
    assert torch.equal(lm.get_output_embeddings().weight, stored.get_output_embeddings().weight.float())
    assert _dtypes(load_causal_lm(str(lm_path), _Tokenizer(), dtype=torch.bfloat16)) == {torch.bfloat16}

    rm_backbone = ScalarModel.from_backbone(str(lm_path))  # reward.py's new RM, ppo.py's --critic_init sft
    assert _dtypes(rm_backbone) == {torch.float32}
    rm = ScalarModel.from_pretrained(str(rm_path))  # ppo.py's critic, reward.py's evaluation-only run
    assert _dtypes(rm) == {torch.float32}
    assert _dtypes(ScalarModel.from_pretrained(str(rm_path), dtype=FROZEN_DTYPE)) == {FROZEN_DTYPE}
    assert _dtypes(ScalarModel.from_pretrained(str(rm_path), dtype=torch.bfloat16)) == {torch.bfloat16}
    tokens = torch.randint(0, 63, (2, 7))
    half = ScalarModel.from_pretrained(str(rm_path), dtype=torch.float16)
    assert _dtypes(half) == {torch.float16}
    # fp32 computes the same function as the stored fp16 weights, to fp16 rounding
    torch.testing.assert_close(rm(tokens), half.float()(tokens), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Each stage, run until its optimizer is built: what it loaded, and in which dtype
# ----------------------------------------------------------------------------------------------
class _Loaded(Exception):
    def __init__(self, model):
        super().__init__("models loaded")
        self.model = model


@pytest.fixture(scope="module")
def float16_checkpoints(embedded_dataset, tmp_path_factory) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_dataset / "tokenizer"))
    return save_float16_checkpoints(tmp_path_factory.mktemp("float16"), len(tokenizer), tokenizer)


def models_at_optimizer(monkeypatch, module, args) -> tuple[list, object]:
    """Run `module.main(args)` until it builds its optimizer; every model its loaders returned, and the model the
    optimizer trains."""
    loaded = []

    def spy(function):
        def wrapped(*args, **kwargs):
            loaded.append(function(*args, **kwargs))
            return loaded[-1]
        return wrapped

    from summarize_from_feedback_details import rl

    for loader in (module, rl):  # PPO and RLOO load their frozen reference in the shared rl.py
        if hasattr(loader, "load_causal_lm"):
            monkeypatch.setattr(loader, "load_causal_lm", spy(loader.load_causal_lm))
    monkeypatch.setattr(ScalarModel, "from_pretrained", spy(ScalarModel.from_pretrained))
    monkeypatch.setattr(ScalarModel, "from_backbone", spy(ScalarModel.from_backbone))

    def stop(model, *args, **kwargs):
        raise _Loaded(model)

    monkeypatch.setattr(module, "make_optimizer_and_scheduler", stop)
    with pytest.raises(_Loaded) as raised:
        module.main(args)
    return loaded, raised.value.model


@pytest.mark.parametrize("stage, trained, frozen", [("sft", 1, 0), ("reward", 1, 0), ("ppo", 2, 2), ("dpo", 1, 2)])
def test_each_stage_loads_trained_fp32_and_frozen_in_the_stated_dtype(
    stage, trained, frozen, float16_checkpoints, embedded_dataset, tmp_path, monkeypatch
):
    """From float16 checkpoints: every model a stage trains holds fp32 parameters, every frozen one (no parameter
    requires a gradient) is in FROZEN_DTYPE; the counts say which models each stage loads (PPO: policy + critic,
    reference + RM; DPO: policy, reference + the RM that scores its samples)."""
    import importlib

    module = importlib.import_module(f"summarize_from_feedback_details.{stage}")
    lm_path, rm_path = (str(p) for p in float16_checkpoints)
    paths = {"sft": {"base_model": lm_path}, "reward": {"sft_model_path": lm_path},
             "ppo": {"sft_model_path": lm_path, "reward_model_path": rm_path},
             "dpo": {"sft_model_path": lm_path, "reward_model_path": rm_path}}[stage]
    args = dataclasses.replace(module.embedded_args(), dataset=str(embedded_dataset), output_dir=str(tmp_path),
                               run_name=f"{stage}_dtype", **paths)
    loaded, optimized = models_at_optimizer(monkeypatch, module, args)
    frozen_models = [m for m in loaded if not any(p.requires_grad for p in m.parameters())]
    trained_models = [m for m in loaded if any(p.requires_grad for p in m.parameters())]
    assert (len(trained_models), len(frozen_models)) == (trained, frozen)
    assert _dtypes(optimized) == {torch.float32}
    for model in trained_models:
        assert _dtypes(model) == {torch.float32}, type(model).__name__
    for model in frozen_models:
        assert _dtypes(model) == {FROZEN_DTYPE}, type(model).__name__


def test_judge_reward_model_is_loaded_in_the_stated_dtype(float16_checkpoints, monkeypatch):
    """judge.py's "gold RM" from a float16 checkpoint runs in FROZEN_DTYPE."""
    import pandas as pd

    from summarize_from_feedback_details import judge

    loaded = []
    original = ScalarModel.from_pretrained

    def spy(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(ScalarModel, "from_pretrained", spy)
    pairs = pd.DataFrame({"query": ["TL;DR:"] * 2, "response": ["a b", "c"], "baseline_response": ["d", "e f"]})
    table, _ = judge.judge_with_reward_model(pairs, judge.Args(table="unused", judge="reward_model",
                                                               reward_model_path=str(float16_checkpoints[1])))
    assert len(loaded) == 1 and _dtypes(loaded[0]) == {FROZEN_DTYPE}
    assert table["policy_rm_score"].notna().all()


@pytest.mark.slow
def test_ppo_from_float16_checkpoints_writes_fp32_and_scores_validation_before_the_update(
    float16_checkpoints, embedded_dataset, tmp_path
):
    """End to end: one PPO update from float16 checkpoints writes an fp32 policy (config and stored tensors).
    Detail P-6: the validation score of update 1 is taken before the update, from the SFT policy: it equals the SFT
    policy's score on the same validation queries (`--eval_before_training`; greedy at T 1e-6; a large learning rate
    makes the policy after the update score otherwise, which `--eval_after_update` would log)."""
    from safetensors import safe_open

    lm_path, rm_path = float16_checkpoints
    run_module("ppo", "embedded", "--sft_model_path", str(lm_path), "--reward_model_path", str(rm_path),
               "--dataset", str(embedded_dataset), "--output_dir", str(tmp_path), "--run_name", "ppo16",
               "--total_episodes", "8", "--batch_size", "8", "--local_rollout_forward_batch_size", "8",
               "--local_micro_batch_size", "8", "--local_eval_batch_size", "8", "--max_eval_samples", "8",
               "--eval_splits", "validation", "--eval_every", "1", "--eval_temperature", "1e-6", "--lr", "0.05",
               "--save_samples_every", "0")
    model_dir = tmp_path / "ppo16" / "model"
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "float32"
    with safe_open(str(model_dir / "model.safetensors"), "pt") as stored:
        assert {stored.get_tensor(name).dtype for name in stored.keys()} == {torch.float32}
    metrics = read_metrics(tmp_path / "ppo16")
    assert metrics["num_updates"] == 1
    assert metrics["first/objective/validation_score"] == pytest.approx(metrics["sft/validation/score"], abs=1e-5)
    assert metrics["eval/validation/score"] != pytest.approx(metrics["sft/validation/score"], abs=1e-3)
