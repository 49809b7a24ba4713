"""SFT and reward-model stages end to end on the embedded task: subprocess runs with assertions on what
they wrote, 1 vs 2 processes (torchrun, gloo), DeepSpeed ZeRO-2 on CPU, and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, assert_tensorboard, read_metrics, run_module, torchrun
from summarize_from_feedback_details.core import UserInputError, column


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_sft_learns_the_task(sft_run):
    """Detail 9: validation loss falls, ROUGE-L beats the untrained base model, the model learns to stop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = read_metrics(sft_run)
    # the embedded preset scores the reference tokens only (completion_only_loss): measured 0.74 -> 0.44
    assert m["eval/validation/loss"] < m["base/validation/loss"] - 0.2
    assert m["eval/validation/rougeL"] > m["base/validation/rougeL"] + 0.1
    assert m["eval/test/rougeL"] > m["base/test/rougeL"] + 0.1
    # References average ~24 tokens (most carry an irrelevant detail, embedded version 4); measured SFT 26.6 of 33.
    assert m["eval/validation/eos_rate"] > 0.8 and 10 < m["eval/validation/response_token_len"] < 32
    model = AutoModelForCausalLM.from_pretrained(sft_run / "model")
    assert model.config.hidden_dropout == 0.0  # Detail 7
    assert AutoTokenizer.from_pretrained(sft_run / "model").pad_token == "[PAD]"
    import pandas as pd

    table = pd.read_csv(sft_run / "eval_query_responses_validation.csv")
    assert list(table.columns) == ["query", "reference", "response", "response_token_len", "has_eos", "gold_utility",
                                   "reference_gold_utility", "gold_win"] and len(table) == 100
    assert "eval/validation/gold_win_rate" in m and m["eval/validation/reference_gold_utility"] > 2.5
    args = json.loads((sft_run / "args.json").read_text())
    assert args["world_size"] == 1 and args["lr"] == 1e-3
    assert_tensorboard(sft_run, "train/loss")


def test_reward_model_accuracy_breakdown_and_normalisation(reward_run, embedded_dataset):
    """Details 12-16 on the embedded task; the bias survives reload and references average 0."""
    import datasets
    import pandas as pd

    from summarize_from_feedback_details.modeling import ScalarModel, sequence_scores

    m = read_metrics(reward_run)
    assert m["eval/accuracy/split/validation"] > 0.6, m  # chance is 0.5; see the note in the test docs
    # The CNN/DM-like split is out of distribution. On embedded task v4 the tiny RM does not transfer to it
    # (measured 0.40 and 0.46 on 300 rows; 0.60 on v3): it learned the Reddit references' irrelevant-detail habit,
    # whose news phrasing differs, and it cannot check facts. An open problem (README); the metric must be there.
    assert 0.0 <= m["eval/accuracy/split/validation_cnndm"] <= 1.0
    for batch in ("batch9", "batch10", "batch0_cnndm", "cnndm0", "cnndm2"):
        assert f"eval/accuracy/batch/{batch}" in m
    assert all(f"eval/accuracy/confidence/{c}" in m for c in range(1, 10))
    assert m["eval/padding/mean_abs_diff"] < 1e-3  # Detail 14: float noise only
    table = pd.read_csv(reward_run / "eval_comparisons.csv")
    assert len(table) == 1300 and {"chosen_score", "rejected_score", "batch", "confidence", "split", "correct"} <= set(table.columns)

    model = ScalarModel.from_pretrained(reward_run / "model").eval()
    assert model.config.bias == pytest.approx(m["normalization/bias"]) and m["normalization/bias"] != 0.0
    references = datasets.load_from_disk(str(embedded_dataset / "sft"))["train"].select(range(1000))
    tokens = torch.tensor(column(references, "query_reference_response_token"))
    with torch.no_grad():
        scores = torch.cat([sequence_scores(model, chunk, model_pad(reward_run)) for chunk in tokens.split(100)])
    # Detail 15: the 1000 normalisation references average 0 after reload (their spread is ~1).
    assert abs(scores.mean().item()) < 1e-4 and scores.std().item() > 0.1
    assert_tensorboard(reward_run, "train/accuracy")


def model_pad(run: Path) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run / "model").pad_token_id


SMALL_SFT = ["--total_episodes", "64", "--batch_size", "16", "--local_micro_batch_size", "4", "--max_eval_samples", "8",
             "--no-eval_before_training", "--logging_steps", "1"]
SMALL_RM = ["--total_episodes", "64", "--batch_size", "16", "--local_micro_batch_size", "4", "--max_eval_samples", "16",
            "--normalization_samples", "32", "--padding_check_samples", "8", "--logging_steps", "1"]
# 4 updates at lr 1e-3; 2 processes reduce in another order than 1 process accumulates, so weights agree
# to float rounding amplified by Adam, not bit for bit.
TOLERANCE = 1e-4


def test_sft_two_processes_match_one(embedded_dir, embedded_dataset, runs_dir):
    common = ["embedded", "--base_model", f"{embedded_dir}/models/{TINY}", "--dataset", str(embedded_dataset),
              "--output_dir", str(runs_dir), *SMALL_SFT]
    run_module("sft", *common, "--run_name", "sft_1proc")
    torchrun("sft", *common, "--run_name", "sft_2proc")
    assert read_metrics(runs_dir / "sft_2proc")["world_size"] == 2
    assert read_metrics(runs_dir / "sft_1proc")["world_size"] == 1
    assert _max_diff(runs_dir / "sft_1proc" / "model", runs_dir / "sft_2proc" / "model") < TOLERANCE
    assert _max_diff(runs_dir / "sft_1proc" / "model", Path(f"{embedded_dir}/models/{TINY}")) > 1e-3  # it did train


def test_reward_two_processes_match_one(sft_run, embedded_dataset, runs_dir):
    common = ["embedded", "--sft_model_path", str(sft_run / "model"), "--dataset", str(embedded_dataset),
              "--output_dir", str(runs_dir), *SMALL_RM]
    run_module("reward", *common, "--run_name", "rm_1proc")
    torchrun("reward", *common, "--run_name", "rm_2proc")
    m1, m2 = read_metrics(runs_dir / "rm_1proc"), read_metrics(runs_dir / "rm_2proc")
    assert m2["world_size"] == 2
    assert _max_diff(runs_dir / "rm_1proc" / "model", runs_dir / "rm_2proc" / "model") < TOLERANCE
    assert m1["normalization/bias"] == pytest.approx(m2["normalization/bias"], abs=1e-4)
    assert m1["eval/accuracy"] == pytest.approx(m2["eval/accuracy"])


def test_sft_deepspeed_zero2_on_cpu(embedded_dir, embedded_dataset, runs_dir):
    """Detail 8: DeepSpeed ZeRO-2 through accelerate, 2 processes over gloo; same result as plain DDP."""
    common = ["embedded", "--base_model", f"{embedded_dir}/models/{TINY}", "--dataset", str(embedded_dataset),
              "--output_dir", str(runs_dir), *SMALL_SFT]
    torchrun("sft", *common, "--run_name", "sft_ds", "--deepspeed")
    assert read_metrics(runs_dir / "sft_ds")["world_size"] == 2
    assert json.loads((runs_dir / "sft_ds" / "args.json").read_text())["deepspeed"] is True
    reference = runs_dir / "sft_1proc" / "model"
    if not reference.exists():
        run_module("sft", *common, "--run_name", "sft_1proc")
    assert _max_diff(reference, runs_dir / "sft_ds" / "model") < TOLERANCE


def test_stage_bad_input_is_one_clear_error(embedded_dir, embedded_dataset, tmp_path):
    from summarize_from_feedback_details import reward, sft

    base = dataclasses.replace(sft.embedded_args(), base_model=f"{embedded_dir}/models/{TINY}", dataset=str(embedded_dataset),
                               output_dir=str(tmp_path / "runs"), max_eval_samples=4)
    with pytest.raises(UserInputError, match=r"--base_model '.*nowhere' is not a saved model"):
        sft.main(dataclasses.replace(base, base_model=str(tmp_path / "nowhere")))
    with pytest.raises(UserInputError, match=r"not divisible by --local_micro_batch_size 5 x 1 processes"):
        sft.main(dataclasses.replace(base, batch_size=32, local_micro_batch_size=5))
    with pytest.raises(UserInputError, match=r"datasets?.*sft.* does not exist|does not exist: --dataset"):
        sft.main(dataclasses.replace(base, dataset=str(tmp_path / "no_dataset")))
    # A dataset without the needed columns: the preference data where SFT data is expected.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "sft").symlink_to(embedded_dataset / "preference")
    (wrong / "tokenizer").symlink_to(embedded_dataset / "tokenizer")
    with pytest.raises(UserInputError, match=r"has no split 'train'|lacks the column"):
        sft.main(dataclasses.replace(base, dataset=str(wrong)))
    with pytest.raises(UserInputError, match=r"--sft_model_path '.*missing' is not a saved model"):
        reward.main(dataclasses.replace(reward.embedded_args(), sft_model_path=str(tmp_path / "missing"),
                                        dataset=str(embedded_dataset), output_dir=str(tmp_path / "runs")))
    # Detail 3.2: a dataset made with pad == EOS is refused unless the ablation is asked for.
    from transformers import AutoTokenizer

    eos_pad = tmp_path / "eos_pad"
    eos_pad.mkdir()
    for name in ("sft", "preference"):
        (eos_pad / name).symlink_to(embedded_dataset / name)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_dataset / "tokenizer"))
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(str(eos_pad / "tokenizer"))
    with pytest.raises(UserInputError, match=r"pads with its EOS token.*--allow_pad_equals_eos"):
        sft.main(dataclasses.replace(base, dataset=str(eos_pad)))
    assert not (tmp_path / "runs").exists()  # nothing started, no empty run directories


def test_one_learning_rate_for_every_stage():
    """G-1: the paper's presets share lr 3e-6 and eps 1e-5; the embedded SFT/RM presets share EMBEDDED_LR, PPO's
    and DPO's use EMBEDDED_PPO_LR / EMBEDDED_DPO_LR (measured tiny-scale deviations documented in embedded.py)."""
    from summarize_from_feedback_details import dpo, ppo, reward, sft
    from summarize_from_feedback_details.embedded import EMBEDDED_DPO_LR, EMBEDDED_LR, EMBEDDED_PPO_LR

    for module in (sft, reward, ppo, dpo):
        paper, embedded = module.PRESETS["pythia"][1], module.PRESETS["embedded"][1]
        expected = {ppo: EMBEDDED_PPO_LR, dpo: EMBEDDED_DPO_LR}.get(module, EMBEDDED_LR)
        assert (paper.lr, paper.eps, embedded.lr, embedded.eps) == (3e-6, 1e-5, expected, 1e-5)
