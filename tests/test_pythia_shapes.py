"""The `pythia` preset end to end at the paper's shapes, offline on CPU (slow: 3 minutes on the shared 2-core machine).

Every other stage test runs the embedded preset. Here the inputs have the real shapes:

* a random-weight GPT-NeoX of the EleutherAI/pythia-14m shape (hidden 128, 6 layers, 4 heads, intermediate 512,
  rotary_pct 0.25, 50,304 embedding rows, 2,048 positions, parallel residual), saved with `save_pretrained`
  together with the real Pythia tokenizer of shared/data;
* SFT data: the 1,945 real TL;DR posts with their references, split into train / validation / test files in the
  raw hub schema (id, subreddit, title, post, summary);
* comparisons: the 1,000 real GPT-4-judged pairs (OpenAI's 1.3B PPO sample vs the reference, chosen = GPT-4's
  verdict) in OpenAI's comparisons schema. They have no CNN/DM rows and no labeller confidence: bring-your-own
  data, whose empty `validation_cnndm` every stage must skip.

The stages run as subprocesses with the `pythia` preset; only the model and data paths, step counts, batch sizes
and evaluation sizes are overridden (fp32: the preset's bf16 applies on GPUs only): data -> SFT -> RM -> PPO ->
DPO -> RM judge -> paper figures. The checks are the paper's shapes: queries 512, SFT response 53, SFT
query+response 562, RM response 169 and query+response 638, PPO response 53.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import build_once, read_metrics, run_module, shared_root

pytestmark = pytest.mark.slow

# EleutherAI/pythia-14m's config.json (the hub's), dropout off as the stages set it anyway (Detail 7).
PYTHIA_14M = {
    "hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 512, "rotary_pct": 0.25,
    "rotary_emb_base": 10000, "vocab_size": 50304, "max_position_embeddings": 2048, "use_parallel_residual": True,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "initializer_range": 0.02, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 0, "hidden_dropout": 0.0, "attention_dropout": 0.0,
}
SHAPES = {"query": 512, "sft_response": 53, "sft_query_response": 562, "rm_response": 169, "rm_query_response": 638}
"""the pythia preset's lengths (Detail 4/5), which these tests check in every output"""
SIZE, SEED = "pythia-14m", 1
SFT_VALIDATION, SFT_TEST = range(0, 500), range(500, 1000)
"""post rows of the SFT validation and test files; the other 945 posts are the SFT train file"""
PREFERENCE_VALIDATION = range(0, 100)
"""judged rows of the preference validation file; the other 900 are its train file"""
POLICY_NAMES = {"policy": "oai_ppo_1p3b", "reference": "reference"}
"""policy names of the two summaries of a judged pair"""


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def sft_files(posts: list[dict], out: Path) -> Path:
    """The 1,945 posts with their references as {train,validation,test}.jsonl in the raw hub schema."""
    def row(post: dict) -> dict:
        return {"id": f"post{post['row']}", "subreddit": post["subreddit"], "title": post["title"], "post": post["post"],
                "summary": post["reference"]}

    splits = {"validation": SFT_VALIDATION, "test": SFT_TEST}
    for split, rows in splits.items():
        write_jsonl(out / f"{split}.jsonl", [row(p) for p in posts if p["row"] in rows])
    write_jsonl(out / "train.jsonl", [row(p) for p in posts if not any(p["row"] in r for r in splits.values())])
    return out


def comparison_files(posts: list[dict], judgments: list[dict], out: Path) -> Path:
    """The 1,000 GPT-4 verdicts as OpenAI comparisons (info, summaries, choice, worker, batch, split, extra): the
    summaries in the order GPT-4 saw them (A, B), `choice` the one it preferred. No labeller confidence: the train
    rows have no `extra` at all, the validation rows `{"confidence": null}` (some real batches have none either)."""
    by_row = {post["row"]: post for post in posts}
    texts = {"policy": "oai_ppo_1p3b_response", "reference": "reference"}
    files: dict[str, list[dict]] = {"train": [], "validation": []}
    for judgment in judgments:
        post = by_row[judgment["row"]]
        split = "validation" if judgment["row"] in PREFERENCE_VALIDATION else "train"
        order = [judgment["summary_a"], judgment["summary_b"]]
        row = {
            "info": {"id": f"post{post['row']}", "post": post["post"], "title": post["title"], "subreddit": post["subreddit"],
                     "site": None, "article": None},
            "summaries": [{"text": " " + post[texts[who]], "policy": POLICY_NAMES[who], "note": None} for who in order],
            "choice": order.index(judgment["preferred"]), "worker": judgment["judge"], "batch": "gpt4_oai1b_vs_reference",
            "split": "valid1" if split == "validation" else "train",
        }
        files[split].append({**row, "extra": {"confidence": None}} if split == "validation" else row)
    for split, rows in files.items():
        write_jsonl(out / f"{split}.jsonl", rows)
    return out


def pythia_14m_model(tokenizer_dir: Path, out: Path) -> Path:
    """A random-weight GPT-NeoX of the pythia-14m shape with the real Pythia tokenizer, as `save_pretrained` writes it."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_14M)).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def pythia_root(shared_data: Path, tmp_path_factory) -> Path:
    """The raw SFT and comparison files and the model, written once per test run to a temporary folder every
    xdist worker sees (never the repository): `inputs/{models/pythia-14m, raw/sft, raw/preference}`."""
    def build() -> Path:
        root = shared_root(tmp_path_factory) / "pythia"
        tldr = shared_data / "tldr"
        posts = [json.loads(line) for line in (tldr / "tldr_posts_with_references.jsonl").read_text().splitlines()]
        judgments = [json.loads(line) for line in (tldr / "oai1b_vs_reference_gpt4_judgments.jsonl").read_text().splitlines()]
        assert (len(posts), len(judgments)) == (1945, 1000)
        pythia_14m_model(shared_data / "tokenizer" / "pythia", root / "inputs" / "models" / SIZE)
        sft_files(posts, root / "inputs" / "raw" / "sft")
        comparison_files(posts, judgments, root / "inputs" / "raw" / "preference")
        return root

    return build_once(tmp_path_factory, "pythia_inputs", build)


def cell(root: Path) -> Path:
    """The one sweep cell, `{root}/sweep/{size}/seed{seed}/{stage}`: the layout paper_figures reads."""
    return root / "sweep" / SIZE / f"seed{SEED}"


def logged(root: Path, name: str, module: str, *args: str) -> None:
    """Run a stage and keep its output in `{root}/sweep/logs/{name}.out` (the tests read what it said)."""
    result = run_module(module, *args)
    (root / "sweep" / "logs").mkdir(parents=True, exist_ok=True)
    (root / "sweep" / "logs" / f"{name}.out").write_text(result.stdout)


def said(root: Path, name: str) -> str:
    return (root / "sweep" / "logs" / f"{name}.out").read_text()


@pytest.fixture(scope="session")
def pythia_data(pythia_root, tmp_path_factory) -> Path:
    def build() -> Path:
        out, raw = pythia_root / "datasets" / "tldr", pythia_root / "inputs" / "raw"
        # Detail 4: the strict check wants the measured maxima to EQUAL the configured shapes (the configuration must
        # describe the data). The paper's shapes are maxima over the whole hub data; on these 1,945 posts the longest
        # reference is 49 + EOS = 50 tokens (< 53) and the longest comparison 558 (< 638), so the strict check refuses
        # the paper's shapes. Without it the columns are still padded to exactly 512 / 53 / 562 / 169 / 638, and only
        # rows longer than configured would be cut: there are none (test_data_shapes pins the measured maxima).
        logged(pythia_root, "data", "tldr_dataset", "pythia", "--base_model", str(pythia_root / "inputs" / "models" / SIZE),
               "--sft_dataset", str(raw / "sft"), "--preference_dataset", str(raw / "preference"), "--output_dir", str(out),
               "--no-check_length_correctness")
        return out

    return build_once(tmp_path_factory, "pythia_data", build)


def stage(tmp_path_factory, root: Path, module: str, *args: str) -> Path:
    """`module` with the pythia preset into the cell, once per test run; only the paths, step counts, batch sizes
    and evaluation sizes are overridden."""
    def build() -> Path:
        logged(root, module, module, "pythia", "--output_dir", str(cell(root)), "--run_name", module, "--seed", str(SEED), *args)
        return cell(root) / module

    return build_once(tmp_path_factory, f"pythia_{module}", build)


@pytest.fixture(scope="session")
def pythia_sft(pythia_root, pythia_data, tmp_path_factory) -> Path:
    return stage(tmp_path_factory, pythia_root, "sft", "--base_model", str(pythia_root / "inputs" / "models" / SIZE),
                 "--dataset", str(pythia_data), "--total_episodes", "8", "--batch_size", "8", "--local_micro_batch_size", "4",
                 "--local_eval_batch_size", "2", "--max_eval_samples", "2")


@pytest.fixture(scope="session")
def pythia_reward(pythia_root, pythia_sft, pythia_data, tmp_path_factory) -> Path:
    return stage(tmp_path_factory, pythia_root, "reward", "--sft_model_path", str(pythia_sft / "model"), "--dataset", str(pythia_data),
                 "--total_episodes", "16", "--batch_size", "8", "--local_micro_batch_size", "4", "--local_eval_batch_size", "4",
                 "--max_eval_samples", "8", "--padding_check_samples", "4", "--normalization_samples", "8")


@pytest.fixture(scope="session")
def pythia_ppo(pythia_root, pythia_sft, pythia_reward, pythia_data, tmp_path_factory) -> Path:
    return stage(tmp_path_factory, pythia_root, "ppo", "--sft_model_path", str(pythia_sft / "model"),
                 "--reward_model_path", str(pythia_reward / "model"), "--dataset", str(pythia_data),
                 "--total_episodes", "8", "--batch_size", "4", "--local_micro_batch_size", "2",
                 "--local_rollout_forward_batch_size", "4", "--local_eval_batch_size", "2", "--max_eval_samples", "2")


@pytest.fixture(scope="session")
def pythia_dpo(pythia_root, pythia_sft, pythia_reward, pythia_data, tmp_path_factory) -> Path:
    return stage(tmp_path_factory, pythia_root, "dpo", "--sft_model_path", str(pythia_sft / "model"),
                 "--reward_model_path", str(pythia_reward / "model"), "--dataset", str(pythia_data),
                 "--total_episodes", "4", "--batch_size", "4", "--local_micro_batch_size", "2",
                 "--local_eval_batch_size", "2", "--max_eval_samples", "2")


def token_lengths(dataset_dir: Path, name: str, split: str, columns: list[str]) -> dict[str, set[int]]:
    import datasets

    ds = datasets.load_from_disk(str(dataset_dir / name / split))
    return {c: {len(tokens) for tokens in ds.with_format("arrow")[c].to_pylist()} for c in columns}


def test_data_shapes(pythia_data, pythia_root):
    """The data stage pads every token column to the paper's shapes, measures maxima within them, and leaves out
    the empty CNN/DM split with one line instead of crashing."""
    out = pythia_data
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sft_rows"] == {"train": 945, "validation": 500, "test": 500}
    assert summary["preference_rows"] == {"train": 900, "validation": 100}
    assert json.loads((out / "preference" / "dataset_dict.json").read_text())["splits"] == ["train", "validation"]
    assert "preference split 'validation_cnndm' has no rows" in said(pythia_root, "data")
    lengths = json.loads((out / "args.json").read_text())["lengths"]
    assert {name: lengths[name] for name in SHAPES} == SHAPES
    for split in ("train", "validation", "test"):
        assert token_lengths(out, "sft", split, ["query_token", "reference_response_token", "query_reference_response_token",
                                                 "query_reference_response_token_response_label"]) == {
            "query_token": {512}, "reference_response_token": {53}, "query_reference_response_token": {562},
            "query_reference_response_token_response_label": {562}}
    for split in ("train", "validation"):
        assert token_lengths(out, "preference", split, ["query_token", "chosen_token", "rejected_token", "query_chosen_token",
                                                        "query_rejected_token_response_label"]) == {
            "query_token": {512}, "chosen_token": {169}, "rejected_token": {169}, "query_chosen_token": {638},
            "query_rejected_token_response_label": {638}}
    import datasets

    chosen = [p for split in ("train", "validation") for p in datasets.load_from_disk(str(out / "preference" / split))["chosen_policy"]]
    assert chosen.count(POLICY_NAMES["policy"]) == 640  # GPT-4 preferred the 1.3B sample in 640 of the 1,000 pairs
    maxima = json.loads((out / "length_maxima.json").read_text())
    assert maxima == summary["length_maxima"]
    # 14 posts are 513-519 tokens: truncated at a paragraph to fit 512. References are at most 49 tokens and the 1.3B
    # samples 50 (shared/data/README.md), + EOS. No row is longer than a configured shape; no CNN/DM maxima.
    assert maxima == {"query": 512, "sft_response": 50, "sft_query_response": 558, "rm_response": 51, "rm_query_response": 558}
    assert all(maxima[name] <= SHAPES[name] for name in maxima)
    assert sum(summary["truncated_queries"].values()) == 14
    assert {p.name for p in (out / "figures").glob("*.png")} == {
        "sft_token_lengths.png", "preference_token_lengths.png", "confidence_distribution.png",
        "policy_distribution.png", "policy_pair_distribution.png"}


def test_sft_at_pythia_shapes(pythia_sft):
    metrics = read_metrics(pythia_sft)
    assert metrics["response_length"] == 53 and metrics["num_updates"] == 1
    config = json.loads((pythia_sft / "model" / "config.json").read_text())
    rotary = config["rope_parameters"]["partial_rotary_factor"] if "rope_parameters" in config else config["rotary_pct"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"], rotary) == (128, 6, 50304, 0.25)
    for split in ("validation", "test"):
        table = _table(pythia_sft / f"eval_query_responses_{split}.parquet")
        assert len(table) == 2 and table["response_token_len"].between(1, 53).all()


def test_reward_at_pythia_shapes(pythia_reward, pythia_root):
    """No CNN/DM split, no confidence: the RM scores the TL;DR validation pairs and says it skipped the rest."""
    metrics = read_metrics(pythia_reward)
    assert "skipping preference/validation_cnndm" in said(pythia_root, "reward")
    assert metrics["num_updates"] == 2 and "eval/accuracy/split/validation" in metrics
    assert not any("cnndm" in key or key.startswith("eval/accuracy/confidence/") for key in metrics), sorted(metrics)
    table = _table(pythia_reward / "eval_comparisons.csv")
    assert len(table) == 8 and set(table["split"]) == {"validation"} and table["confidence"].isna().all()
    assert metrics["normalization/references"] == 8


def test_ppo_at_pythia_shapes(pythia_ppo):
    metrics = read_metrics(pythia_ppo)
    assert metrics["response_length"] == 53 and metrics["num_updates"] == 2
    for split in ("validation", "test"):
        table = _table(pythia_ppo / f"query_responses_{split}.parquet")
        assert len(table) == 2 and table["response_token_len"].between(1, 53).all()
        assert {"score", "reference_score"} <= set(table.columns)


def test_dpo_at_pythia_shapes(pythia_dpo, pythia_root):
    metrics = read_metrics(pythia_dpo)
    assert "skipping preference/validation_cnndm" in said(pythia_root, "dpo")
    assert metrics["num_updates"] == 1 and "eval/accuracy/split/validation" in metrics
    assert not any("cnndm" in key for key in metrics)
    for split in ("validation", "test"):
        table = _table(pythia_dpo / f"query_responses_{split}.parquet")
        assert len(table) == 2 and table["response_token_len"].between(1, 128).all()  # the preset's 128 tokens


def test_judge_and_figures_at_pythia_shapes(pythia_ppo, pythia_dpo, pythia_reward, pythia_data, pythia_root):
    """The RM judge on PPO's validation table, then every paper figure from the cell (no CNN/DM series, no
    confidence panel) and the dataset."""
    judged = cell(pythia_root) / "judge" / "ppo"
    run_module("judge", "--table", str(pythia_ppo / "query_responses_validation.parquet"), "--judge", "reward_model",
               "--reward_model_path", str(pythia_reward / "model"), "--output_dir", str(judged))
    summary = json.loads(next(judged.glob("*.summary.json")).read_text())
    assert summary["n"] == 2 and summary["judge"] == "reward_model"
    result = run_module("paper_figures", "--sweep_dir", str(pythia_root / "sweep"), "--dataset_dir", str(pythia_data))
    assert "skipped" not in result.stdout, result.stdout
    assert {p.stem for p in (pythia_root / "sweep" / "figures").glob("*.png")} == {
        "win_rate_vs_size", "win_rate_vs_length", "rouge_vs_size", "rm_accuracy", "rm_vs_dpo_accuracy", "rm_calibration",
        "rm_judge_agreement", "length_controlled_win_rate", "ppo_training_curves", "sft_token_lengths",
        "preference_token_lengths", "confidence_distribution", "policy_distribution", "policy_pair_distribution"}


def _table(path: Path):
    import pandas as pd

    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
