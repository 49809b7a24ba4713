"""The data stage end to end: the embedded run as a subprocess, bad input, Detail 4, the ablation flags."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import tyro

from conftest import REPO, run_module
from summarize_from_feedback_details import embedded as E
from summarize_from_feedback_details.core import CNNDM_BATCHES, UserInputError, column
from summarize_from_feedback_details.details import DETAILS
from summarize_from_feedback_details.tldr_dataset import (
    PRESETS,
    Args,
    Lengths,
    dataset_card,
    follow_embedded_dir,
    main,
)

SFT_COLUMNS = {
    "id", "subreddit", "title", "post", "summary", "query_token", "query", "query_token_len", "truncated_post",
    "reference_response", "reference_response_token", "reference_response_token_len", "query_reference_response",
    "query_reference_response_token", "query_reference_response_token_len", "query_reference_response_token_response_label",
}
PREFERENCE_COLUMNS = {
    "info", "summaries", "choice", "worker", "batch", "split", "extra", "query_token", "query", "query_token_len",
    "policies", *(f"{p}{n}{s}" for n in ("chosen", "rejected") for p, s in (
        ("", ""), ("", "_token"), ("", "_token_len"), ("", "_policy"), ("query_", ""), ("query_", "_token"),
        ("query_", "_token_len"), ("query_", "_token_response_label"))),
}


def _load(path: Path):
    import datasets

    return datasets.load_from_disk(str(path / "sft")), datasets.load_from_disk(str(path / "preference"))


def test_embedded_data_stage_outputs(embedded_dataset, embedded_dir):
    """Details 1, 4, 5 on the whole embedded task, run as `tldr_dataset embedded` in a subprocess."""
    from transformers import AutoTokenizer

    sft, preference = _load(embedded_dataset)
    lengths = Lengths(**E.LENGTHS)
    tok = AutoTokenizer.from_pretrained(str(embedded_dataset / "tokenizer"))
    pad, eos = tok.pad_token_id, tok.eos_token_id
    assert tok.pad_token == "[PAD]" and pad != eos == 0

    assert list(sft) == ["train", "validation", "test"]
    assert list(preference) == ["train", "validation", "validation_cnndm"]
    assert {s: len(d) for s, d in sft.items()} == {"train": 6000, "validation": 500, "test": 500}
    assert {s: len(d) for s, d in preference.items()} == {"train": 6000, "validation": 1000, "validation_cnndm": 300}
    assert set(column(preference["validation_cnndm"], "batch")) <= set(CNNDM_BATCHES)
    assert not set(column(preference["validation"], "batch")) & set(CNNDM_BATCHES)
    for ds in sft.values():
        assert set(ds.column_names) == SFT_COLUMNS
    for ds in preference.values():
        assert set(ds.column_names) - {"truncated_post", "truncated_article"} == PREFERENCE_COLUMNS

    # Detail 5: fixed shapes, left-padded queries, right-padded responses ending in EOS, label masks.
    for row in sft["validation"]:
        q = row["query_token"]
        assert len(q) == lengths.query and q[-1] != pad
        n = row["query_token_len"]
        assert q[: lengths.query - n] == [pad] * (lengths.query - n) and pad not in q[lengths.query - n:]
        r = row["reference_response_token"]
        assert len(r) == lengths.sft_response
        assert r[row["reference_response_token_len"] - 1] == eos and set(r[row["reference_response_token_len"]:]) <= {pad}
        qr, label = row["query_reference_response_token"], row["query_reference_response_token_response_label"]
        assert len(qr) == len(label) == lengths.sft_query_response
        k = row["query_reference_response_token_len"]
        assert qr[:k] == q[lengths.query - n:] + r[: row["reference_response_token_len"]]
        assert label[:n] == [pad] * n and label[n:] == qr[n:]
        assert row["reference_response"] == " " + row["summary"] + "<|endoftext|>"
        assert row["query"].endswith("TL;DR:") and row["query_reference_response"] == row["query"] + row["reference_response"]
    for split, ds in preference.items():
        cnndm = split == "validation_cnndm"
        q_len = lengths.cnndm_query if cnndm else lengths.query
        r_len = lengths.cnndm_response if cnndm else lengths.rm_response
        qr_len = lengths.cnndm_query_response if cnndm else lengths.rm_query_response
        for row in ds.select(range(100)):
            assert len(row["query_token"]) == q_len
            assert len(row["chosen_token"]) == len(row["rejected_token"]) == r_len
            assert len(row["query_chosen_token"]) == len(row["query_rejected_token"]) == qr_len
            assert row["query"].startswith("Article:\n" if cnndm else "SUBREDDIT: r/")
            chosen = row["summaries"][row["choice"]]
            assert row["chosen"] == chosen["text"] + "<|endoftext|>" and row["chosen_policy"] == chosen["policy"]
            assert row["policies"] == "--".join(sorted(s["policy"] for s in row["summaries"]))
            assert row["chosen_token"][row["chosen_token_len"] - 1] == eos

    # Detail 4: the measured maxima are the configured ones; some queries needed truncation.
    assert json.loads((embedded_dataset / "length_maxima.json").read_text()) == E.LENGTHS
    summary = json.loads((embedded_dataset / "summary.json").read_text())
    assert summary["truncated_queries"]["train"] > 300
    truncated = [row for row in sft["train"].select(range(400)) if row["truncated_post"] != row["post"]]
    assert truncated and all(row["post"][len(row["truncated_post"])] == "\n" for row in truncated)
    assert json.loads((embedded_dataset / "args.json").read_text())["lengths"] == E.LENGTHS

    # Figure 10 as PNG and PDF.
    for name in ("sft_token_lengths", "preference_token_lengths", "cnndm_token_lengths", "confidence_distribution",
                 "policy_distribution", "policy_pair_distribution"):
        assert (embedded_dataset / "figures" / f"{name}.png").stat().st_size > 10_000
        assert (embedded_dataset / "figures" / f"{name}.pdf").stat().st_size > 1_000
    assert not list(embedded_dataset.parent.glob(".embedded.tmp-*"))  # written atomically, nothing left over


# ----------------------------------------------------------------------------------------------
# Small local datasets cut from the embedded task, for bad input and ablations
# ----------------------------------------------------------------------------------------------
def _write_small(embedded_dir: Path, out: Path, n: int = 30, edit=None) -> Path:
    """Copy the first `n` rows of each split (with the CNN/DM rows of validation) to `out`; `edit` mutates."""
    data = {}
    for dataset in ("sft", "preference"):
        for path in sorted((embedded_dir / "data" / dataset).glob("*.jsonl")):
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            keep = rows[:n] + ([r for r in rows if r["batch"] in CNNDM_BATCHES][:5] if path.stem == "validation" and dataset == "preference" else [])
            data[(dataset, path.stem)] = keep
    if edit:
        edit(data)
    for (dataset, split), rows in data.items():
        (out / dataset).mkdir(parents=True, exist_ok=True)
        (out / dataset / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _small_args(embedded_dir: Path, data: Path, **overrides) -> Args:
    args = Args(
        base_model=str(embedded_dir / "models" / "tiny-pythia-s"), sft_dataset=str(data / "sft"),
        preference_dataset=str(data / "preference"), output_dir=str(data / "out"), lengths=Lengths(**E.LENGTHS),
        check_length_correctness=False, figures=False,
    )
    return dataclasses.replace(args, **overrides)


def _set(path: tuple, value):
    def edit(data):
        (dataset, split, index, *keys) = path
        target = data[(dataset, split)][index]
        for key in keys[:-1]:
            target = target[key]
        if value is KeyError:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (_set(("sft", "train", 3, "post"), "   "), r"SFT split 'train' row 3 \(id '.*'\): field 'post' is empty"),
    (_set(("sft", "validation", 2, "summary"), KeyError), r"SFT split 'validation' row 2 .*field 'summary' is missing"),
    (_set(("sft", "test", 1, "title"), "word " * 200), r"SFT split 'test' row 1 .*even with an empty 'post'"),
    (_set(("preference", "train", 4, "batch"), "cnndm7"), r"preference split 'train' row 4 .*unknown CNN/DM batch 'cnndm7'"),
    (_set(("preference", "train", 5, "info", "article"), "An article."), r"row 5 .*has an article but its batch is not a CNN/DM batch"),
    (_set(("preference", "train", 6, "choice"), 2), r"row 6 .*'choice' must be 0 or 1"),
    (_set(("preference", "validation", 7, "extra", "confidence"), 12), r"row 7 .*'extra.confidence' must be an integer 1-9"),
    (_set(("preference", "train", 8, "summaries"), [{"text": " a", "policy": "ref", "note": None}]), r"row 8 .*exactly 2 summaries"),
])
def test_bad_rows_are_one_clear_error(embedded_dir, tmp_path, edit, message):
    data = _write_small(embedded_dir, tmp_path / "data", edit=edit)
    with pytest.raises(UserInputError, match=message):
        main(_small_args(embedded_dir, data))
    assert not (tmp_path / "data" / "out").exists()


def test_unknown_or_missing_splits_and_paths(embedded_dir, tmp_path):
    data = _write_small(embedded_dir, tmp_path / "data")
    (data / "sft" / "extra.jsonl").write_text((data / "sft" / "test.jsonl").read_text())
    with pytest.raises(UserInputError, match=r"unknown splits \['extra'\]"):
        main(_small_args(embedded_dir, data))
    (data / "sft" / "extra.jsonl").unlink()
    (data / "preference" / "validation.jsonl").unlink()
    with pytest.raises(UserInputError, match=r"no file for split 'validation'"):
        main(_small_args(embedded_dir, data))
    with pytest.raises(UserInputError, match=r"--base_model '.*missing-model' is not a saved model \(no such directory\)"):
        main(_small_args(embedded_dir, data, base_model=str(tmp_path / "missing-model")))


def test_bad_input_exits_2_with_one_line(embedded_dir, tmp_path):
    """The CLI turns a user error into one line on stderr and exit status 2, no traceback."""
    data = _write_small(embedded_dir, tmp_path / "data", edit=_set(("sft", "train", 0, "post"), ""))
    base = _small_args(embedded_dir, data)
    result = run_module("tldr_dataset", "embedded", "--embedded_dir", "None", "--base_model", base.base_model, "--sft_dataset", base.sft_dataset,
                        "--preference_dataset", base.preference_dataset, "--output_dir", base.output_dir, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: SFT split 'train' row 0")
    assert "Traceback" not in result.stderr


def test_length_mismatch_is_one_clear_error(embedded_dir, tmp_path):
    """Detail 4: measured maxima must equal the configuration; the check can be turned off."""
    data = _write_small(embedded_dir, tmp_path / "data")
    measured = main(_small_args(embedded_dir, data))["length_maxima"]
    lengths = Lengths(**{**E.LENGTHS, **measured})
    main(_small_args(embedded_dir, data, lengths=lengths, check_length_correctness=True))  # exact: passes
    wrong = dataclasses.replace(lengths, sft_response=lengths.sft_response + 1)
    with pytest.raises(UserInputError, match=rf"sft_response: measured max {lengths.sft_response} != configured {lengths.sft_response + 1}"):
        main(_small_args(embedded_dir, data, lengths=wrong, check_length_correctness=True))
    short = dataclasses.replace(lengths, rm_response=lengths.rm_response - 3)
    with pytest.raises(UserInputError, match="--no-check_length_correctness"):
        main(_small_args(embedded_dir, data, lengths=short, check_length_correctness=True))
    # Off: over-long rows are cut to the configured shape (the authors' behaviour), with a warning.
    main(_small_args(embedded_dir, data, lengths=short))
    _, preference = _load(Path(tmp_path / "data" / "out"))
    assert {len(t) for t in column(preference["train"], "chosen_token")} == {short.rm_response}


# Each data ablation of the registry, with what must change in the output.
def _no_leading_space(sft, preference, tok):
    assert not any(r.startswith(" ") for r in column(sft["train"], "reference_response"))
    assert not any(r.startswith(" ") for r in column(preference["train"], "chosen"))


def _no_eos(sft, preference, tok):
    assert not any(r.endswith("<|endoftext|>") for r in column(sft["train"], "reference_response"))
    assert all(tok.eos_token_id not in t for t in column(sft["train"], "reference_response_token"))


def _pad_eos(sft, preference, tok):
    assert tok.pad_token_id == tok.eos_token_id == 0
    assert any(t[0] == 0 for t in column(sft["train"], "query_token"))


def _hard(sft, preference, tok):
    cut = [(p, t) for p, t in zip(column(sft["train"], "post"), column(sft["train"], "truncated_post"), strict=True) if p != t]
    assert cut and any(p[len(t)] != "\n" for p, t in cut)  # some cut mid-paragraph


ABLATION_CHECKS = {"leading_space": _no_leading_space, "append_eos": _no_eos, "dedicated_pad": _pad_eos, "paragraph_truncation": _hard}


@pytest.mark.parametrize("detail", [d for d in DETAILS if d.stage == "data" and d.ablation], ids=lambda d: d.key)
def test_data_ablation_flags_from_the_registry(detail, embedded_dir, tmp_path):
    """The registry's ablation arguments parse with the real CLI and change the output as intended."""
    from transformers import AutoTokenizer

    assert detail.key in ABLATION_CHECKS, f"add an output check for the new data ablation {detail.key}"
    data = _write_small(embedded_dir, tmp_path / "data", n=60)
    base = _small_args(embedded_dir, data)
    cli_args = ["embedded", "--embedded_dir", "None", "--base_model", base.base_model, "--sft_dataset", base.sft_dataset, "--preference_dataset",
                base.preference_dataset, "--output_dir", base.output_dir, "--no-figures", "--no-check_length_correctness",
                *detail.ablation]
    args = tyro.extras.overridable_config_cli(PRESETS, args=cli_args, use_underscores=True)
    assert args.embedded_dir is None and args != PRESETS["embedded"][1]
    main(args)
    sft, preference = _load(Path(base.output_dir))
    ABLATION_CHECKS[detail.key](sft, preference, AutoTokenizer.from_pretrained(f"{base.output_dir}/tokenizer"))


def test_cli_help_documents_every_field():
    """`--help` works for both presets and every Args field has a docstring (tyro shows it as help)."""
    tree = ast.parse((REPO / "summarize_from_feedback_details" / "tldr_dataset.py").read_text())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("Args", "Lengths")):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and node.target.id not in ("lengths",):
                documented = i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) and isinstance(body[i + 1].value, ast.Constant)
                assert documented, f"{cls.name}.{node.target.id} has no docstring"
    for preset in ("pythia", "embedded"):
        result = run_module("tldr_dataset", preset, "--help")
        for field in dataclasses.fields(Args):
            assert f"--{field.name}" in result.stdout or f"--no-{field.name}" in result.stdout or field.name == "lengths"
        assert "--lengths.query" in result.stdout and "Detail 2.2" in result.stdout


def test_dataset_card_describes_the_processing():
    card = dataset_card("me/tldr", Args(), {"sft_response": 53}, {"train": 10})
    assert "pythia-1b-deduped" in card and "TL;DR:" in card and "| train | 10 |" in card and '"sft_response": 53' in card
    with pytest.raises(UserInputError, match="--push_to_hub needs --hf_entity"):
        main(dataclasses.replace(Args(), push_to_hub=True))


def test_embedded_preset_paths_follow_embedded_dir():
    """`embedded --embedded_dir D` reads D's model and data; a path given explicitly is kept; the pythia preset's
    hub ids are never rewritten."""
    args = dataclasses.replace(PRESETS["embedded"][1], embedded_dir="/scratch/emb", sft_dataset="/mine/sft")
    follow_embedded_dir(args)
    assert (args.base_model, args.sft_dataset, args.preference_dataset) == (
        "/scratch/emb/models/tiny-pythia-s", "/mine/sft", "/scratch/emb/data/preference")
    pythia = dataclasses.replace(PRESETS["pythia"][1], embedded_dir="/scratch/emb")
    follow_embedded_dir(pythia)
    assert pythia.base_model == "EleutherAI/pythia-1b-deduped" and pythia.sft_dataset == PRESETS["pythia"][1].sft_dataset
