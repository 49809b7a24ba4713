"""The embedded offline task: seeded data in the hub schemas, the gold utility, tokenizer, tiny models."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import shutil
import statistics

import pytest

from conftest import SIZES_PRETRAIN_STEPS
from summarize_from_feedback_details import embedded as E
from summarize_from_feedback_details.core import CNNDM_BATCHES, load_tokenizer
from summarize_from_feedback_details.tldr_dataset import PREFERENCE_FIELDS, SFT_FIELDS

SMALL = E.BuildConfig(sft_train=40, sft_validation=10, sft_test=10, preference_train=30, preference_validation=20, preference_cnndm=10)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_task_is_seeded_and_in_the_hub_schemas():
    task = E.generate_task(SMALL)
    assert task == E.generate_task(SMALL)
    assert task != E.generate_task(E.BuildConfig(**{**SMALL.__dict__, "seed": 1}))
    assert {s: len(r) for s, r in task["sft"].items()} == {"train": 40, "validation": 10, "test": 10}
    for rows in task["sft"].values():
        for row in rows:
            assert tuple(row) == SFT_FIELDS and all(isinstance(row[k], str) and row[k] for k in SFT_FIELDS)
            assert "\n\n" in row["post"] and not row["summary"].startswith(" ")
    assert len(task["preference"]["train"]) == 30 and len(task["preference"]["validation"]) == 30
    for split, rows in task["preference"].items():
        for row in rows:
            assert tuple(row) == PREFERENCE_FIELDS
            assert set(row["info"]) == {"id", "post", "title", "subreddit", "site", "article"}
            assert row["choice"] in (0, 1) and 1 <= row["extra"]["confidence"] <= 9
            assert [set(s) for s in row["summaries"]] == [{"text", "policy", "note"}] * 2
            assert all(s["text"].startswith(" ") and s["policy"] in E.POLICIES for s in row["summaries"])
            is_cnndm = row["batch"] in CNNDM_BATCHES
            assert is_cnndm == (row["info"]["article"] is not None) == (row["info"]["post"] is None)
            assert not (is_cnndm and split == "train")
    assert sum(row["batch"] in CNNDM_BATCHES for row in task["preference"]["validation"]) == 10


POST = "My boyfriend forgot my birthday. Honestly I feel hurt. Should I move out?"


@pytest.mark.parametrize(("summary", "expected"), [
    (" my boyfriend forgot my birthday and i feel hurt. should i move out?", 0.75 + 1.5 + 0.75 + 1.0),
    (" my boyfriend forgot my birthday at the gym.", 0.75 + 1.5 - 0.75),  # irrelevant detail
    (" my wife forgot my birthday.", 1.5 - 1.0),  # invented relation
    (" my boyfriend forgot my birthday", 0.75 + 1.5 - 0.25),  # no final punctuation
    (" i feel hurt i feel hurt i feel hurt.", 0.75 - 0.5 * 4),  # 7 trigrams, 3 distinct
    (" my boyfriend forgot my birthday.<|endoftext|>[PAD][PAD]", 0.75 + 1.5),  # EOS and PAD ignored
    (" " + "really " * 20 + "hurt.", 0.75 - 0.1 * (21 - 18) - 0.5 * (19 - 2)),  # 21 words, 19 trigrams, 2 distinct
    ("", -2.0),
    ("<|endoftext|>", -2.0),
])
def test_gold_utility_hand_computed(summary, expected):
    assert E.gold_utility(POST, summary) == pytest.approx(expected)


def test_gold_utility_news():
    article = "The city council in boston banned fireworks on friday, officials said."
    assert E.gold_utility(article, " the city council in boston banned fireworks on friday.") == pytest.approx(0.75 + 0.75 + 1.5 + 0.5)
    assert E.gold_utility(article, " the city council in miami banned fireworks.") == pytest.approx(0.75 + 1.5 - 1.0)


def test_labels_follow_the_utility_with_noise(embedded_dir):
    """Bradley-Terry labels: mostly the higher-utility summary, more often at high confidence; no comparison of
    two identical texts; the references are good but flawed (so a policy can beat them): more often than not
    they carry an irrelevant detail, a quarter are perfect."""
    rows = _read_jsonl(embedded_dir / "data" / "preference" / "validation.jsonl")
    agree_by_conf: dict[str, list[bool]] = {"low": [], "high": []}
    agree = []
    for row in rows:
        text = row["info"]["post"] or row["info"]["article"]
        assert row["summaries"][0]["text"] != row["summaries"][1]["text"]
        u = [E.gold_utility(text, s["text"]) for s in row["summaries"]]
        if u[0] == u[1]:
            continue
        ok = (u[1] > u[0]) == bool(row["choice"])
        agree.append(ok)
        conf = row["extra"]["confidence"]
        if conf <= 3:
            agree_by_conf["low"].append(ok)
        elif conf >= 7:
            agree_by_conf["high"].append(ok)
    assert 0.75 < statistics.mean(agree) < 0.95
    assert statistics.mean(agree_by_conf["high"]) > statistics.mean(agree_by_conf["low"]) + 0.2
    sft = _read_jsonl(embedded_dir / "data" / "sft" / "train.jsonl")
    terms = [E.gold_utility_breakdown(r["post"], r["summary"]) for r in sft[:1000]]
    assert 2.8 < statistics.mean(t["total"] for t in terms) < 3.5  # measured 3.06 on validation
    assert 0.15 < statistics.mean(t["total"] >= 4.0 for t in terms) < 0.35  # measured 0.23
    with_filler = statistics.mean(t["filler"] < 0 for t in terms)
    assert abs(with_filler - E.REFERENCE_FILLER_SHARE) < 0.05, with_filler


def test_tokenizer_is_pythia_like(embedded_dir):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(embedded_dir / "tokenizer"))
    from transformers import AutoConfig

    assert raw.eos_token == "<|endoftext|>" and raw.eos_token_id == 0 and 1000 < len(raw) <= E.VOCAB_SIZE
    assert raw.convert_tokens_to_ids("[PAD]") == raw.unk_token_id  # no [PAD] yet, like Pythia's hub files
    tok = load_tokenizer(str(embedded_dir / "tokenizer"))
    rows = AutoConfig.from_pretrained(str(embedded_dir / "models" / "tiny-pythia-s")).vocab_size
    assert tok.pad_token_id == len(raw) < rows and rows % 64 == 0  # [PAD] inside the embedding, like 50277 < 50304
    for row in _read_jsonl(embedded_dir / "data" / "sft" / "validation.jsonl")[:50]:
        assert tok.decode(tok.encode(row["post"])) == row["post"]
        assert tok.encode(" " + row["summary"] + "<|endoftext|>")[-1] == 0


def test_models_load_like_hub_models_and_bigger_is_better(embedded_sizes_dir):
    """Each size loads with AutoModelForCausalLM; after the same pre-training steps, the bigger models have a lower
    held-out LM loss (CI pre-trains every size for SIZES_PRETRAIN_STEPS; the shipped 1,000 steps: README)."""
    embedded_dir = embedded_sizes_dir
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(embedded_dir / "models" / "tiny-pythia-s"))
    posts = [r["title"] + "\n\n" + r["post"] for r in _read_jsonl(embedded_dir / "data" / "sft" / "test.jsonl")[:24]]
    batch = tok(posts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses, sizes = [], []
    for size in E.MODEL_SIZES:
        model = AutoModelForCausalLM.from_pretrained(str(embedded_dir / "models" / size.name)).eval()
        assert type(model).__name__ == "GPTNeoXForCausalLM" and model.config.vocab_size == E.embedding_rows(len(tok) - 1)
        with torch.no_grad():
            losses.append(model(input_ids=batch["input_ids"].masked_fill(labels == -100, 0),
                                attention_mask=batch["attention_mask"], labels=labels).loss.item())
        sizes.append(sum(p.numel() for p in model.parameters()))
        out = model.generate(**tok("TITLE: hello", return_tensors="pt"), max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert out.shape[1] == len(tok("TITLE: hello")["input_ids"]) + 5
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    manifest = json.loads((embedded_dir / "manifest.json").read_text())
    assert {m["pretrain_steps"] for m in manifest["models"].values()} == {SIZES_PRETRAIN_STEPS}  # a fair comparison
    # Measured held-out loss for s / m / l on task v4: 1.173 / 0.951 / 0.925 after 150 steps; after the shipped
    # 1,000 all three are near the templated corpus's floor, 0.513 / 0.509 / 0.499 (bigger is better, by little).
    assert losses[0] > losses[1] > losses[2] and losses[0] > losses[2] + 0.005, losses
    assert losses[2] < 2.0  # the models learned the corpus (uniform would be ln(2048) = 7.6)


def test_built_assets_are_reused_and_rebuilt_deterministically(embedded_sizes_dir, tmp_path, capsys):
    """A second call rebuilds nothing; a missing part is rebuilt alone, identically (seeded BPE); a model built
    with other pre-training steps is reused when no count is asked for (one line says so), stale when one is."""
    embedded_dir = embedded_sizes_dir
    weights = embedded_dir / "models" / "tiny-pythia-s" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    manifest = E.ensure_built(embedded_dir, pretrain_steps=SIZES_PRETRAIN_STEPS)
    assert weights.stat().st_mtime_ns == before
    assert E.ensure_built(embedded_dir)["models"] == manifest["models"] and weights.stat().st_mtime_ns == before
    assert f"reusing tiny-pythia-s pre-trained for {SIZES_PRETRAIN_STEPS} steps (its own count is 1000" in capsys.readouterr().out
    assert set(manifest["models"]) == {size.name for size in E.MODEL_SIZES}
    stamp = json.loads((embedded_dir / "models" / "tiny-pythia-s" / "embedded_stamp.json").read_text())
    assert stamp["size"]["pretrain_steps"] == SIZES_PRETRAIN_STEPS
    assert not E._is_built(embedded_dir / "models" / "tiny-pythia-s",
                           {**E._stamp(E.BuildConfig(), "model"), "size": dataclasses.asdict(E.MODEL_SIZES[0])})

    copy = tmp_path / "embedded"
    shutil.copytree(embedded_dir, copy)
    copied_weights = copy / "models" / "tiny-pythia-s" / "model.safetensors"
    copied_mtime = copied_weights.stat().st_mtime_ns
    shutil.rmtree(copy / "tokenizer")
    E.ensure_built(copy, pretrain_steps=SIZES_PRETRAIN_STEPS)
    assert filecmp.cmp(copy / "tokenizer" / "tokenizer.json", embedded_dir / "tokenizer" / "tokenizer.json", shallow=False)
    assert copied_weights.stat().st_mtime_ns == copied_mtime  # the models were not retrained


@pytest.mark.slow
def test_build_bad_input_is_one_line_before_any_work(tmp_path):
    """`embedded --pretrain_steps 0` (a real process): exit 2, one line naming the flag and the sizes' own counts,
    nothing written; an unknown size is the same kind of error."""
    import subprocess
    import sys

    out = tmp_path / "assets"
    result = subprocess.run([sys.executable, "-m", "summarize_from_feedback_details.embedded", "--out_dir", str(out),
                             "--pretrain_steps", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --pretrain_steps 0: give a positive step count, or leave it out for each size's own "
        "(tiny-pythia-s 1000, tiny-pythia-m 1000, tiny-pythia-l 1000)"]
    assert not out.exists()
    with pytest.raises(E.UserInputError, match=r"unknown embedded model size\(s\) \['tiny-pythia-xl'\]"):
        E.ensure_built(out, sizes=["tiny-pythia-xl"])
    assert not out.exists()
