"""Two text-level quirks of the authors' code, measured on the 1,945 real TL;DR posts: ROUGE without stemming
(their `evaluate` default, Detail 9) and the clean-up of the decoded query text (their transformers 4, Detail 2.4)."""

from __future__ import annotations

import pandas as pd
import pytest

from summarize_from_feedback_details import ablate
from summarize_from_feedback_details.core import UserInputError
from summarize_from_feedback_details.tldr_dataset import (
    Args,
    Lengths,
    check_length_maxima,
    clean_up_tokenization,
    encode,
    pad_tokens,
    process_sft_row,
)
from summarize_from_feedback_details.training import generation_metrics, rouge_scores


def test_rouge_unstemmed_by_default_on_real_pairs(real_posts):
    """Detail 9: OpenAI's 1.3B PPO samples against the human references, scored as the authors' `evaluate` did
    (rouge-score's RougeScorer, default tokenizer, no stemming) by default; `--rouge_stemmer` stems (measured)."""
    table = pd.DataFrame({
        "reference": [row["reference"] for row in real_posts],
        "response": [row["oai_ppo_1p3b_response"] for row in real_posts],
        "response_token_len": [row["n_tok_response_pythia"] for row in real_posts],
        "has_eos": True,
    })
    plain, stemmed = generation_metrics(table), generation_metrics(table, rouge_stemmer=True)
    assert len(table) == 1945
    assert {k: round(plain[k], 4) for k in ("rouge1", "rouge2", "rougeL")} == {"rouge1": 0.3307, "rouge2": 0.1121, "rougeL": 0.2477}
    assert {k: round(stemmed[k], 4) for k in ("rouge1", "rouge2", "rougeL")} == {"rouge1": 0.3460, "rouge2": 0.1183, "rougeL": 0.2573}
    assert stemmed["rougeL"] - plain["rougeL"] == pytest.approx(0.0095, abs=1e-4)
    assert rouge_scores(list(table["reference"]), list(table["response"]))["rougeL"] == plain["rougeL"]
    # By hand: "cats" and "cat" match only when stemmed (ROUGE-1 F1 0 -> 1).
    assert rouge_scores(["cats"], ["cat"])["rouge1"] == 0.0 and rouge_scores(["cats"], ["cat"], use_stemmer=True)["rouge1"] == 1.0
    # Every stage that scores ROUGE (through training.evaluate_generations) has the flag, off by default.
    for stage in ("sft", "ppo", "dpo"):
        assert ablate.stage_config(stage, "pythia", []).rouge_stemmer is False
        assert ablate.stage_config(stage, "pythia", ["--rouge_stemmer"]).rouge_stemmer is True


def test_decode_cleanup_reproduces_the_authors_query_text_on_real_posts(real_posts, pythia_tokenizer):
    """Detail 2.4: with --decode_cleanup the `query` is transformers 4's cleaned-up decode (88 of the 1,945 real
    posts change, 33 of them in token count) and the query+response columns are the tokens of that text; the
    exact-text `query_token` and the authors' label mask (its unpadded length) stay. (Default: OpenAI's exact text,
    tests/test_real_data.py.)"""
    tok = pythia_tokenizer
    # By hand, in transformers' order (" ." goes first, so "' ." loses its space before " ' " is looked for).
    assert clean_up_tokenization("I 'm sure it 's fine , is n't it ? ' ok ' . Yes !") == "I'm sure it's fine, isn't it?'ok '. Yes!"
    args = Args(decode_cleanup=True)
    changed = length_changed = 0
    for row in real_posts:
        raw = {**{k: row[k] for k in ("subreddit", "title", "post")}, "summary": row["reference"]}
        out = process_sft_row(raw, tokenizer=tok, args=args)
        n = out["query_token_len"]
        exact = tok.decode(out["query_token"][-n:])  # `query_token` holds the exact text's tokens, as the authors' did
        assert out["query_token"][:-n] == [tok.pad_token_id] * (512 - n) and exact == exact.lstrip()
        assert out["query"] == clean_up_tokenization(exact) == tok.clean_up_tokenization(exact)
        tokens = encode(tok, out["query"].strip() + out["reference_response"])
        assert out["query_reference_response_token"] == pad_tokens(tokens, 562, tok.pad_token_id, "right")
        assert out["query_reference_response_token_len"] == len(tokens)
        label = out["query_reference_response_token_response_label"]  # the authors hide n positions (exact count)
        assert label[:n] == [tok.pad_token_id] * n and label[n:] == out["query_reference_response_token"][n:]
        if out["query"] != exact:
            changed += 1
            length_changed += len(encode(tok, out["query"].strip())) != n
    assert (changed, length_changed) == (88, 33)  # 4.5% and 1.7% of the posts


def test_length_check_error_names_decode_cleanup():
    """Detail 4 + 2.4: a failed check of the pythia defaults (measured by the authors on cleaned text) names
    --decode_cleanup as the way to their numbers; not when it is on, nor for other lengths."""
    measured = {"sft_query_response": 563}
    with pytest.raises(UserInputError, match=r"sft_query_response: measured max 563 != configured 562.*--decode_cleanup"):
        check_length_maxima(measured, Lengths(), strict=True)
    for lengths, cleanup in ((Lengths(), True), (Lengths(sft_query_response=500), False)):
        with pytest.raises(UserInputError) as error:
            check_length_maxima(measured, lengths, strict=True, decode_cleanup=cleanup)
        assert "--decode_cleanup" not in str(error.value)
