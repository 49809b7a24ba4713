"""Bring-your-own data: comparisons without CNN/DM rows or labeller confidence must not crash any stage.

Before the fix, such data crashed after all the processing work: the data stage in the dataset figures
(`KeyError: chosen_policy` on the empty `validation_cnndm`, which `map` never gave the processed columns), and the
reward and DPO stages in `datasets.load_from_disk` on the saved empty split (IndexError in `concat_tables`),
whatever `--eval_splits` said. tests/test_pythia_shapes.py runs every stage on such data end to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from summarize_from_feedback_details.core import UserInputError


def _old_preference_dir(root: Path) -> Path:
    """A `preference/` as the data stage saved it before: train and validation with rows, and the empty
    `validation_cnndm` that `filter` + `map` left with the raw columns only (saved without a data file)."""
    import datasets

    raw = datasets.Dataset.from_dict({"batch": ["b1", "b2", "b3"], "extra": [None, {"confidence": 7}, None]})
    def process(ds: datasets.Dataset) -> datasets.Dataset:
        return ds.map(lambda row: {"chosen_policy": "ppo"})

    empty = process(raw.filter(lambda batch: batch == "cnndm0", input_columns="batch"))
    datasets.DatasetDict(train=process(raw), validation=process(raw).select([0, 1]), validation_cnndm=empty).save_to_disk(
        str(root / "preference"))
    with pytest.raises(IndexError):  # what the stages met before the fix
        datasets.load_from_disk(str(root / "preference"))
    return root


def test_processed_splits_load_one_at_a_time(tmp_path):
    """The stages read each split on its own: an empty split saved next to them neither breaks the others (the
    IndexError of load_from_disk) nor is read itself; an evaluation split that is absent or empty is skipped with one
    line, a split the stage trains on is one clear error."""
    from summarize_from_feedback_details.training import load_optional_splits, load_processed_split

    dataset = str(_old_preference_dir(tmp_path))
    assert len(load_processed_split(dataset, "preference", "train")) == 3
    said: list[str] = []
    loaded = load_optional_splits(dataset, "preference", ("validation", "validation_cnndm", "test"), say=said.append)
    assert list(loaded) == ["validation"] and len(loaded["validation"]) == 2
    assert [line.split(":")[0] for line in said] == ["skipping preference/validation_cnndm", "skipping preference/test"]
    for split in ("validation_cnndm", "test"):
        with pytest.raises(UserInputError, match=f"no rows in preference/{split}"):
            load_processed_split(dataset, "preference", split)


def test_accuracy_breakdown_with_null_confidence():
    """Pairs without a labeller confidence count overall / per split / per batch only; the levels stay integers (a
    null among them used to turn them into `7.0` and add a `nan` level, which the figures cannot read)."""
    import pandas as pd

    from summarize_from_feedback_details.training import accuracy_breakdown

    table = pd.DataFrame({"split": ["validation"] * 5, "batch": ["b1", "b1", "b2", "b2", "b2"],
                          "confidence": [7, None, 3, 7, None], "correct": [True, False, True, False, True]})
    assert accuracy_breakdown(table) == {
        "eval/accuracy": 3 / 5, "eval/accuracy/split/validation": 3 / 5, "eval/accuracy/batch/b1": 1 / 2,
        "eval/accuracy/batch/b2": 2 / 3, "eval/accuracy/confidence/3": 1.0, "eval/accuracy/confidence/7": 1 / 2,
    }
    assert accuracy_breakdown(table.iloc[:0]) == {}


def test_evaluate_comparisons_null_extra_and_no_split(tmp_path):
    """`extra` null or without `confidence` is a pair without confidence; no evaluation split at all (all skipped)
    writes the table's header and no metrics instead of a KeyError."""
    import datasets
    import pandas as pd
    import torch

    from summarize_from_feedback_details.core import column
    from summarize_from_feedback_details.training import COMPARISON_COLUMNS, evaluate_comparisons

    stage = SimpleNamespace(rank=0, world_size=1, is_main=True, run_dir=tmp_path)
    pairs = datasets.Dataset.from_dict({
        "batch": ["b1", "b1", "b1"], "extra": [None, {"confidence": None}, {"confidence": 9}],
        "policies": ["a--b"] * 3, "chosen_policy": ["a"] * 3, "rejected_policy": ["b"] * 3,
        "chosen_score": [1.0, 0.0, 2.0], "rejected_score": [0.0, 1.0, 1.0]})

    def score_pairs(batch):
        return torch.tensor(column(batch, "chosen_score")), torch.tensor(column(batch, "rejected_score"))

    metrics = evaluate_comparisons(stage, {"validation": pairs}, score_pairs, None, 2)
    assert metrics == {"eval/accuracy": 2 / 3, "eval/accuracy/split/validation": 2 / 3, "eval/accuracy/batch/b1": 2 / 3,
                       "eval/accuracy/confidence/9": 1.0}
    assert evaluate_comparisons(stage, {}, score_pairs, None, 2) == {}
    assert list(pd.read_csv(tmp_path / "eval_comparisons.csv").columns) == [*COMPARISON_COLUMNS, "correct", "margin"]


def _raw_data(real_posts: list[dict], root: Path) -> tuple[Path, Path]:
    """Four real posts as SFT files (the test file is empty) and four comparisons with no CNN/DM row; the train
    comparisons have no `extra`."""
    def write(path: Path, rows: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    posts = real_posts[:6]
    for k, split in enumerate(("train", "validation")):
        write(root / "sft" / f"{split}.jsonl", [{"id": str(p["row"]), "subreddit": p["subreddit"], "title": p["title"],
                                                   "post": p["post"], "summary": p["reference"]} for p in posts[2 * k: 2 * k + 2]])
    write(root / "sft" / "test.jsonl", [])
    for split, extras in (("train", None), ("validation", [None, {"confidence": 4}])):
        rows = []
        for k, p in enumerate(posts[:2]):
            row = {"info": {"id": str(p["row"]), "post": p["post"], "title": p["title"], "subreddit": p["subreddit"]},
                   "summaries": [{"text": " " + p["reference"], "policy": "ref"}, {"text": " " + p["oai_ppo_1p3b_response"], "policy": "oai"}],
                   "choice": k % 2, "worker": "me", "batch": "my_batch", "split": split}
            rows.append(row if extras is None else {**row, "extra": extras[k]})
        write(root / "preference" / f"{split}.jsonl", rows)
    return root / "sft", root / "preference"


def test_data_stage_without_cnndm_rows(shared_data, real_posts, tmp_path, capsys):
    """The data stage on comparisons without CNN/DM rows and an empty SFT test file: `validation_cnndm` and `test`
    are left out with one line each, the figures are drawn, and everything it saved loads whole."""
    import datasets

    from summarize_from_feedback_details.tldr_dataset import Args, main

    sft_dir, preference_dir = _raw_data(real_posts, tmp_path / "raw")
    out = tmp_path / "out"
    summary = main(Args(base_model=str(shared_data / "tokenizer" / "pythia"), sft_dataset=str(sft_dir),
                        preference_dataset=str(preference_dir), output_dir=str(out), check_length_correctness=False))
    out_lines = capsys.readouterr().out
    assert "preference split 'validation_cnndm' has no rows" in out_lines and "SFT split 'test' has no rows" in out_lines
    assert summary["preference_rows"] == {"train": 2, "validation": 2} and summary["sft_rows"] == {"train": 2, "validation": 2}
    preference = datasets.load_from_disk(str(out / "preference"))
    assert list(preference) == ["train", "validation"]
    assert preference["train"]["extra"] == [None, None] and preference["validation"]["extra"] == [None, {"confidence": 4}]
    assert list(datasets.load_from_disk(str(out / "sft"))) == ["train", "validation"]
    assert len(list((out / "figures").glob("*.png"))) == 5


def test_dataset_figures_skip_empty_splits(tmp_path, capsys):
    """Figure 10 from a dataset directory holding an empty split (as data stages before the fix saved it): the split
    is skipped with one line, the figures are drawn."""
    import datasets

    from summarize_from_feedback_details.figures import dataset_figures, dataset_figures_from_disk

    def split(n: int) -> datasets.Dataset:
        columns = {"query_token_len": [5] * n, "reference_response_token_len": [3] * n, "query_reference_response_token_len": [8] * n,
                   "chosen_token_len": [3] * n, "rejected_token_len": [2] * n, "query_chosen_token_len": [8] * n,
                   "query_rejected_token_len": [7] * n, "extra": [None] * n, "chosen_policy": ["a"] * n,
                   "rejected_policy": ["b"] * n, "policies": ["a--b"] * n}
        return datasets.Dataset.from_dict(columns)

    sft = datasets.DatasetDict(train=split(2), validation=split(1))
    preference = datasets.DatasetDict(train=split(2), validation=split(2), validation_cnndm=datasets.Dataset.from_dict({"batch": []}))
    assert len(dataset_figures(sft, preference, tmp_path / "direct")) == 10
    sft.save_to_disk(str(tmp_path / "data" / "sft"))
    preference.save_to_disk(str(tmp_path / "data" / "preference"))
    (tmp_path / "data" / "args.json").write_text(json.dumps({"lengths": {}}))
    capsys.readouterr()
    assert len(dataset_figures_from_disk(tmp_path / "data")) == 10
    assert capsys.readouterr().out.count("skipping preference/validation_cnndm") == 1
