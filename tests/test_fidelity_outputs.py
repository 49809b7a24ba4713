"""Outputs the authors' code had: an evaluation-only reward-model run (their `reward_eval` runs, read by the
calibration figure), the SFT references' score statistics saved with the RM (Detail 15), and PPO sample tables
kept through training (P-6) with the token view of one query's response over training."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from conftest import read_metrics, run_module
from summarize_from_feedback_details.core import UserInputError

STAT_KEYS = ("mean", "std", "min", "max")


def tiny_neox(vocab: int = 16, hidden: int = 16) -> GPTNeoXConfig:
    return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=2 * hidden, max_position_embeddings=64)


# ----------------------------------------------------------------------------------------------
# (b) Detail 15: the references' score statistics, by hand and through save / from_pretrained
# ----------------------------------------------------------------------------------------------
def test_reference_score_stats_by_hand():
    from summarize_from_feedback_details.reward import reference_score_stats

    # Scores 1, 2, 3, 6 with the bias shift 3 (their mean): -2, -1, 0, 3 under the normalised RM.
    stats = reference_score_stats([1.0, 2.0, 3.0, 6.0], shift=3.0)
    assert stats == {"mean": 0.0, "std": pytest.approx(math.sqrt(14 / 3)), "min": -2.0, "max": 3.0, "count": 4}
    # An evaluated RM keeps its bias (shift 0); one score has no spread.
    assert reference_score_stats([0.5], shift=0.0) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "count": 1}


def test_normalization_stats_survive_from_pretrained(tmp_path: Path):
    from summarize_from_feedback_details.modeling import ScalarModel, ScalarModelConfig

    model = ScalarModel(ScalarModelConfig(base_config=tiny_neox().to_dict()))
    assert model.config.normalization_stats is None  # a fresh RM (and a checkpoint from before the field)
    stats = {"mean": 1e-8, "std": 0.75, "min": -2.5, "max": 3.25, "count": 1000}
    model.config.bias, model.config.normalization_stats = 0.5, stats
    model.save_pretrained(str(tmp_path / "rm"))
    reloaded = ScalarModel.from_pretrained(str(tmp_path / "rm"))
    assert reloaded.config.bias == 0.5 and reloaded.config.normalization_stats == stats
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["normalization_stats"] == stats


# ----------------------------------------------------------------------------------------------
# (a) the evaluation-only reward-model run
# ----------------------------------------------------------------------------------------------
def test_reward_eval_only_needs_a_trained_rm(tmp_path: Path):
    """0 updates without a trained RM (and a trained RM with updates) is one clear error before anything runs."""
    from summarize_from_feedback_details import reward

    base = reward.Args(dataset=str(tmp_path / "none"), output_dir=str(tmp_path / "runs"))
    with pytest.raises(UserInputError, match=r"^--total_episodes 0 trains nothing: pass --reward_model_path"):
        reward.main(reward.Args(**{**vars(base), "total_episodes": 0}))
    with pytest.raises(UserInputError, match=r"^--reward_model_path evaluates .* add --total_episodes 0"):
        reward.main(reward.Args(**{**vars(base), "reward_model_path": str(tmp_path / "rm")}))
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_reward_eval_only_run_reproduces_the_training_runs_evaluation(reward_run, sft_run, embedded_dataset, runs_dir, tmp_path):
    """An eval-only run of the session's trained RM scores every validation pair as the training run's own
    eval_comparisons.csv (which the training run shifted by the bias afterwards) and gives the same accuracies; its
    reference statistics, measured under the saved RM, are the training run's (Detail 15); the calibration
    figure reads it as a cell's reward run."""
    from summarize_from_feedback_details import paper_figures
    from summarize_from_feedback_details.modeling import ScalarModelConfig

    run_module("reward", "embedded", "--reward_model_path", str(reward_run / "model"), "--total_episodes", "0",
               "--dataset", str(embedded_dataset), "--output_dir", str(runs_dir), "--run_name", "reward_eval",
               "--normalization_samples", "1000")
    evaluated = runs_dir / "reward_eval"
    trained, again = read_metrics(reward_run), read_metrics(evaluated)
    assert again["num_updates"] == 0 and not (evaluated / "model").exists()
    accuracies = [k for k in trained if k.startswith("eval/accuracy")]
    assert "eval/accuracy/split/validation_cnndm" in accuracies
    for key in accuracies:
        assert again[key] == pytest.approx(trained[key], abs=1e-12), key
    before, after = (pd.read_csv(run / "eval_comparisons.csv") for run in (reward_run, evaluated))
    assert len(after) == len(before) == 1300
    assert (after[["split", "batch", "chosen_policy", "rejected_policy"]] == before[["split", "batch", "chosen_policy", "rejected_policy"]]).all().all()
    for column in ("chosen_score", "rejected_score", "margin"):
        assert (after[column] - before[column]).abs().max() < 1e-5, column
    assert (after["correct"] == before["correct"]).all()

    # Detail 15: the training run's statistics of its 1000 references after the shift, in metrics.json and in the
    # checkpoint's config, equal those the eval-only run measures with the saved RM (mean ~0, bias unchanged).
    config = ScalarModelConfig.from_pretrained(reward_run / "model")
    assert config.normalization_stats["count"] == 1000 and again["normalization/references"] == 1000
    assert abs(trained["normalization/mean"]) < 1e-6 and trained["normalization/std"] > 0.1
    assert trained["normalization/min"] < 0 < trained["normalization/max"]
    for key in STAT_KEYS:
        assert config.normalization_stats[key] == trained[f"normalization/{key}"]
        assert again[f"normalization/{key}"] == pytest.approx(trained[f"normalization/{key}"], abs=1e-5), key
    assert again["normalization/bias"] == trained["normalization/bias"] == config.bias

    # paper_figures' calibration reads the eval-only run as the cell's reward run: the same bins as the training run.
    bins = {}
    for name, run in (("trained", reward_run), ("evaluated", evaluated)):
        cell = tmp_path / name / "tiny-pythia-s" / "seed1"
        cell.mkdir(parents=True)
        (cell / "sft").symlink_to(sft_run)
        (cell / "reward").symlink_to(run)
        result = paper_figures.rm_calibration(tmp_path / name, tmp_path / name / "figures")
        bins[name] = result.data[result.data["panel"] == "dataset"].reset_index(drop=True)
        assert (tmp_path / name / "figures" / "rm_calibration.png").is_file()
    assert bins["evaluated"]["n"].sum() == 1000  # the TL;DR validation pairs
    pd.testing.assert_frame_equal(bins["evaluated"], bins["trained"], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# (c) PPO sample tables through training and the token view over training
# ----------------------------------------------------------------------------------------------
def test_validation_sample_on_a_forked_random_state_leaves_training_unchanged():
    """A samples table on an update without evaluation samples on a forked random state: the global stream is
    where it was; without the fork the same call moves it."""
    from summarize_from_feedback_details.modeling import ScalarModel, ScalarModelConfig
    from summarize_from_feedback_details.ppo import Args
    from summarize_from_feedback_details.rl import sample_validation_batch

    torch.manual_seed(0)
    policy = GPTNeoXForCausalLM(tiny_neox()).eval()
    reward_model = ScalarModel(ScalarModelConfig(base_config=tiny_neox().to_dict())).eval()
    queries = torch.tensor([[9, 3, 4, 5], [1, 2, 3, 4]])  # pad 9 (left), EOS 0
    args = Args(eval_temperature=1.0)
    with torch.no_grad():
        state = torch.get_rng_state()
        responses, scores = sample_validation_batch(policy, reward_model, queries, args, 9, 0, 6, keep_rng=True)
        assert torch.equal(torch.get_rng_state(), state)
        again, _ = sample_validation_batch(policy, reward_model, queries, args, 9, 0, 6, keep_rng=False)
        assert not torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again, responses) and responses.shape == (2, 6) and scores.shape == (2,)


SAMPLE_COLUMNS = ["update", "query_index", "query", "response", "reference", "score", "reference_score",
                  "response_token_len", "has_eos", "gold_utility", "reference_gold_utility", "gold_win"]


class RowParser(HTMLParser):
    """The token view's rows: each `<section>`'s attributes, its title and its tokens' texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.classes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self.rows.append({**attributes, "title": "", "tokens": []})
        elif tag == "span":
            self.classes.append(attributes.get("class", ""))
            if "tok" in attributes.get("class", "").split() and self.rows:
                self.rows[-1]["tokens"].append({"classes": set(attributes["class"].split()), "text": ""})
        elif tag == "h2":
            self.classes.append("h2")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("span", "h2") and self.classes:
            self.classes.pop()

    def handle_data(self, data: str) -> None:
        if not self.rows or not self.classes:
            return
        if self.classes[-1] == "h2":
            self.rows[-1]["title"] += data
        elif self.classes[-1] == "t" and self.rows[-1]["tokens"]:
            self.rows[-1]["tokens"][-1]["text"] += data


@pytest.mark.slow
def test_ppo_sample_tables_through_training_and_their_token_view(ppo_run, reward_run, embedded_dir, embedded_dataset, tmp_path):
    """The session's PPO run (24 updates, --save_samples_every 8, --eval_every 4) keeps the validation batch's
    responses before the first update and after updates 8, 16 and 24; the token view shows one query's response
    at each of them."""
    import datasets

    from summarize_from_feedback_details import visualize_tokens

    samples = ppo_run / "samples"
    assert sorted(p.name for p in samples.iterdir()) == sorted(f"update_{k}.{s}" for k in (0, 8, 16, 24) for s in ("csv", "parquet"))
    validation = datasets.load_from_disk(str(embedded_dataset / "sft"))["validation"].select(range(100))
    final = pd.read_csv(ppo_run / "query_responses_validation.csv", keep_default_na=False)  # the first 100 queries
    tables = {k: pd.read_parquet(samples / f"update_{k}.parquet") for k in (0, 8, 16, 24)}
    for k, table in tables.items():
        assert list(table.columns) == SAMPLE_COLUMNS, k
        assert len(table) == 100 and (table["update"] == k).all()  # the embedded preset's 100-query batch
        assert table["query_index"].tolist() == list(range(100)) and table["query"].tolist() == list(validation["query"])
        assert table["reference"].tolist() == final["reference"].tolist()
        assert (table["reference_score"] - final["reference_score"]).abs().max() < 1e-5  # the same RM, same tokens
        assert pd.read_csv(samples / f"update_{k}.csv", keep_default_na=False).shape == table.shape
    assert (tables[0]["response"] != tables[24]["response"]).any()  # PPO moved the policy

    html = tmp_path / "over_training.html"
    query_index = int((tables[0]["response"] != tables[24]["response"]).idxmax())  # a query whose response changed
    run_module("visualize_tokens", "--rows", "reference", "ppo", "--ppo_samples_over_training", "--ppo_run", str(ppo_run),
               "--dataset", str(embedded_dataset), "--base_model", str(embedded_dir / "models" / "tiny-pythia-s"),
               "--reward_model", str(reward_run / "model"), "--query_index", str(query_index), "--html", str(html))
    parser = RowParser()
    parser.feed(html.read_text(encoding="utf-8"))
    rows = {row["data-row"]: row for row in parser.rows}
    assert list(rows) == ["reference", "ppo_update_0", "ppo_update_8", "ppo_update_16", "ppo_update_24"]
    assert rows["ppo_update_0"]["title"].startswith("PPO after 0 updates (the SFT policy)")
    rescored = 0
    for k, table in tables.items():
        row = rows[f"ppo_update_{k}"]
        assert row["title"].startswith(f"PPO after {k} updates")
        text = "".join(t["text"] for t in row["tokens"] if not t["classes"] & {"eos", "pad"})
        assert text.strip() == table["response"][query_index], k  # the table's response, token by token
        assert row["data-eos"] == str(bool(table["has_eos"][query_index]))
        if int(row["data-tokens"]) == table["response_token_len"][query_index]:  # re-tokenized to the sampled length
            # The view's RM score of the response is the table's score (both the RM at the EOS, Detail 12).
            assert float(row["data-score"]) == pytest.approx(table["score"][query_index], abs=1e-4), k
            rescored += 1
    assert rescored >= 1

    # Bad input: one clear error before any model is loaded.
    common = {"dataset": str(embedded_dataset), "base_model": str(tmp_path / "none"), "terminal": False,
              "ppo_samples_over_training": True}
    for kwargs, message in (({"rows": ("ppo",), "ppo_run": str(tmp_path)}, "no samples/update_"),
                            ({"rows": ("ppo",), "ppo_run": str(ppo_run), "source": "sample"}, "use --source tables"),
                            ({"rows": ("reference",)}, "name ppo in --rows"),
                            ({"rows": ("ppo",), "ppo_run": str(ppo_run), "query_index": 100}, r"has 100 rows, so --query_index 100")):
        with pytest.raises(UserInputError, match=message):
            visualize_tokens.main(visualize_tokens.Args(**common, **kwargs))
