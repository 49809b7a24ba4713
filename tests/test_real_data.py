"""Details 2-3 on the real data: 1,945 real TL;DR posts with the exact Pythia and GPT-2 tokenizers."""

from __future__ import annotations

import csv

import pytest

from summarize_from_feedback_details.core import (
    UserInputError,
    check_pad_token,
    load_tokenizer,
    set_pad_token,
)
from summarize_from_feedback_details.tldr_dataset import (
    TLDR_QUERY_FORMAT,
    QueryFormat,
    encode,
    format_completion,
    process_query,
)

QUERY_512 = QueryFormat(TLDR_QUERY_FORMAT, "post", 512)


def _fields(row: dict) -> dict:
    return {key: row[key] for key in ("subreddit", "title", "post")}


def test_real_queries_reproduced_with_pythia_tokenizer(real_posts, pythia_tokenizer):
    """Detail 2.1 + 2.3: every real query that fits in 512 Pythia tokens comes out exactly as OpenAI's."""
    tok = pythia_tokenizer
    fitting = [row for row in real_posts if row["n_tok_query_pythia"] <= 512]
    assert len(fitting) == 1945 - 14
    for row in fitting:
        out = process_query(_fields(row), QUERY_512, tok)
        assert out["query"] == row["query"], row["row"]
        assert not out["query"].endswith(" ")  # the space belongs to the completion
        tokens = out["query_token"]
        n_pad = 512 - row["n_tok_query_pythia"]
        assert len(tokens) == 512
        assert tokens[:n_pad] == [tok.pad_token_id] * n_pad  # left padding with [PAD]
        assert tok.pad_token_id not in tokens[n_pad:]
        assert tok.decode(tokens[n_pad:]) == row["query"]
        assert out["truncated_post"] == row["post"]


def test_real_long_posts_cut_at_last_fitting_paragraph(real_posts, pythia_tokenizer):
    """Detail 2.2: the 14 posts over 512 Pythia tokens are cut at the paragraph break that just fits."""
    tok = pythia_tokenizer
    long_rows = [row for row in real_posts if row["n_tok_query_pythia"] > 512]
    assert len(long_rows) == 14
    for row in long_rows:
        out = process_query(_fields(row), QUERY_512, tok)
        post, cut = row["post"], out["truncated_post"]
        assert len(cut) < len(post) and post.startswith(cut)
        assert post[len(cut)] == "\n"  # cut exactly at a line break
        assert out["query_token_len"] <= 512 and len(out["query_token"]) == 512
        assert out["query"] == TLDR_QUERY_FORMAT.format(subreddit=row["subreddit"], title=row["title"], post=cut)
        # One cut fewer (the next line break, or the whole post) would not fit.
        next_break = post.find("\n", len(cut) + 1)
        less_cut = post if next_break < 0 else post[:next_break]
        longer = TLDR_QUERY_FORMAT.format(subreddit=row["subreddit"], title=row["title"], post=less_cut)
        assert len(encode(tok, longer)) > 512


def test_real_queries_fit_gpt2_tokenizer_unchanged(real_posts, gpt2_tokenizer):
    """OpenAI measured the 512 limit in GPT-2 tokens: every real query already fits and is unchanged."""
    assert gpt2_tokenizer.eos_token_id == 50256 and gpt2_tokenizer.pad_token_id == 50257
    for row in real_posts:
        out = process_query(_fields(row), QUERY_512, gpt2_tokenizer)
        assert out["query"] == row["query"]
        assert out["truncated_post"] == row["post"]
        assert out["query_token_len"] == row["n_tok_query_gpt2"]


def test_backend_encode_equals_tokenizer_encode(real_posts, pythia_tokenizer, gpt2_tokenizer):
    """The fast `encode` (Rust backend) is identical to `tokenizer.encode` on real queries and references."""
    for tok in (pythia_tokenizer, gpt2_tokenizer):
        for row in real_posts[:400]:
            for text in (row["query"], " " + row["reference"] + "<|endoftext|>"):
                assert encode(tok, text) == tok.encode(text)


def test_real_references_get_one_leading_space_and_one_eos(real_posts, pythia_tokenizer, shared_data):
    """Detail 3.1: `" " + summary + EOS`, also for the CSV's references that carry two leading spaces."""
    tok = pythia_tokenizer
    with open(shared_data / "tldr" / "oai1b.csv_judged.csv", newline="") as handle:
        raw_references = [r["reference_responses"] for r in csv.DictReader(handle)]
    assert raw_references[0].startswith("  ")
    for row, raw in zip(real_posts, raw_references, strict=True):
        for summary in (row["reference"], raw):
            text = format_completion(summary, tok.eos_token)
            assert text.startswith(" ") and not text.startswith("  ")
            assert text.endswith("<|endoftext|>") and text.count("<|endoftext|>") == 1
            tokens = encode(tok, text)
            assert tokens[-1] == tok.eos_token_id == 0 and tokens.count(0) == 1
        assert len(encode(tok, format_completion(row["reference"], tok.eos_token))) == row["n_tok_reference_pythia"] + 1


def test_pad_token_is_dedicated_and_pad_equal_eos_refused(shared_data, pythia_tokenizer):
    """Detail 3.2: [PAD] is id 50277 with the Pythia tokenizer (inside its 50,304 rows) and differs from EOS
    (id 0); a tokenizer whose pad equals its EOS is refused unless the ablation asks for it."""
    assert pythia_tokenizer.pad_token == "[PAD]"
    assert pythia_tokenizer.pad_token_id == 50277 < 50304
    assert pythia_tokenizer.eos_token_id == 0
    assert pythia_tokenizer.convert_ids_to_tokens(1) == "<|padding|>"  # transformers' default pad, not used

    ablated = load_tokenizer(str(shared_data / "tokenizer" / "pythia"), pad_token="eos")
    assert ablated.pad_token_id == ablated.eos_token_id == 0
    with pytest.raises(UserInputError, match=r"pads with its EOS token \(id 0\).*--pad_token eos"):
        check_pad_token(ablated)
    check_pad_token(ablated, allow_pad_equals_eos=True)
    # Setting [PAD] again repairs it, and is idempotent (no second token added).
    repaired = set_pad_token(ablated)
    assert repaired.pad_token_id == 50277
    assert set_pad_token(repaired).pad_token_id == 50277 and len(repaired) == 50278
