"""Details 2-3 and 5 on hand-made rows with hand-computed token ids (Pythia tokenizer, ids from
../shared/data/README.md: the template below is 27 tokens, `" hi there<|endoftext|>"` is [14260, 627, 0])."""

from __future__ import annotations

import pytest

from summarize_from_feedback_details.core import CNNDM_BATCHES, load_tokenizer
from summarize_from_feedback_details.tldr_dataset import (
    CNNDM_QUERY_FORMAT,
    TLDR_QUERY_FORMAT,
    Args,
    QueryFormat,
    QueryTooLongError,
    encode,
    format_completion,
    pad_tokens,
    preference_query_format,
    process_preference_row,
    process_query,
    process_sft_row,
    tokenize_completion,
)

FIELDS = {"subreddit": "relationships", "title": "hello", "post": "hi"}
QUERY = "SUBREDDIT: r/relationships\n\nTITLE: hello\n\nPOST: hi\n\nTL;DR:"
QUERY_IDS = [6971, 7941, 1703, 37, 1433, 27, 391, 16, 22842, 16458, 187, 187, 53, 43561, 27, 23120, 187, 187,
             15743, 27, 14260, 187, 187, 14135, 28, 4976, 27]
PAD, EOS = 50277, 0


def test_query_format_has_no_trailing_space(pythia_tokenizer):
    """Detail 2.1: the template ends at `TL;DR:`; the completion brings its own space."""
    out = process_query(FIELDS, QueryFormat(TLDR_QUERY_FORMAT, "post", 27), pythia_tokenizer)
    assert out["query"] == QUERY
    assert out["query_token"] == QUERY_IDS and out["query_token_len"] == 27
    assert out["query_token"][-4:] == [14135, 28, 4976, 27]  # "TL;DR:"


def test_query_is_left_padded_to_length(pythia_tokenizer):
    """Detail 2.3: left padding with [PAD] to exactly the query length; `query` has no pads."""
    out = process_query(FIELDS, QueryFormat(TLDR_QUERY_FORMAT, "post", 30), pythia_tokenizer)
    assert out["query_token"] == [PAD, PAD, PAD] + QUERY_IDS
    assert out["query"] == QUERY and out["query_token_len"] == 27
    assert pad_tokens([5, 6], 4, PAD, side="left") == [PAD, PAD, 5, 6]
    assert pad_tokens([5, 6], 4, PAD, side="right") == [5, 6, PAD, PAD]


def test_paragraph_truncation_drops_trailing_paragraphs(pythia_tokenizer):
    """Detail 2.2: while too long, cut the post at its last newline; only the post is cut."""
    fields = {**FIELDS, "post": "hi\n\nsecond paragraph here\nthird line\n\nlast one"}
    out = process_query(fields, QueryFormat(TLDR_QUERY_FORMAT, "post", 27), pythia_tokenizer)
    # Cuts: "...\n\nlast one" -> "...third line\n" -> "...third line" -> "hi\n\nsecond paragraph here"
    # -> "hi\n" (fits: "\n\n\n" is 2 tokens, like "\n\n" before "TL;DR") -- OpenAI's rule keeps that newline.
    assert out["truncated_post"] == "hi\n"
    assert out["query"] == QUERY.replace("POST: hi", "POST: hi\n") and out["query_token_len"] == 27
    assert fields["post"].startswith("hi\n\nsecond")  # the caller's row is not modified
    # With a little more room the cut happens at a later line break, never mid-paragraph.
    roomy = process_query(fields, QueryFormat(TLDR_QUERY_FORMAT, "post", 34), pythia_tokenizer)
    assert roomy["truncated_post"] in ("hi\n\nsecond paragraph here", "hi\n\nsecond paragraph here\nthird line")
    assert roomy["query_token_len"] <= 34


def test_truncation_without_newline_drops_characters(pythia_tokenizer):
    """Detail 2.2: a post without newline loses one character at a time: the longest fitting prefix."""
    fields = {**FIELDS, "post": "hi there my good friends"}
    out = process_query(fields, QueryFormat(TLDR_QUERY_FORMAT, "post", 29), pythia_tokenizer)
    cut = out["truncated_post"]
    assert fields["post"].startswith(cut) and out["query_token_len"] <= 29
    one_more = TLDR_QUERY_FORMAT.format(**{**FIELDS, "post": fields["post"][: len(cut) + 1]})
    assert len(encode(pythia_tokenizer, one_more)) > 29


def test_query_that_cannot_fit_is_an_error(pythia_tokenizer):
    """Detail 2.2: no silent hard cut of the title: one clear error."""
    fields = {**FIELDS, "title": "a very long title " * 20}
    with pytest.raises(QueryTooLongError, match=r"even with an empty 'post'.*query length 27"):
        process_query(fields, QueryFormat(TLDR_QUERY_FORMAT, "post", 27), pythia_tokenizer)


def test_hard_truncation_ablation_cuts_mid_paragraph(pythia_tokenizer):
    """Ablation of Detail 2.2: `hard` cuts at a token boundary, keeping more text than `paragraph`."""
    fields = {**FIELDS, "post": "hi\n\n" + "word " * 60}
    fmt = QueryFormat(TLDR_QUERY_FORMAT, "post", 40)
    paragraph = process_query(fields, fmt, pythia_tokenizer, truncation="paragraph")
    hard = process_query(fields, fmt, pythia_tokenizer, truncation="hard")
    assert paragraph["truncated_post"] in ("hi", "hi\n")  # the only line breaks follow "hi"
    assert hard["truncated_post"].startswith("hi\n\nword word")
    assert len(hard["truncated_post"]) > len(paragraph["truncated_post"])
    assert 38 <= hard["query_token_len"] <= 40 and len(hard["query_token"]) == 40


def test_completion_leading_space_and_eos_flags(pythia_tokenizer):
    """Detail 3.1 and its two ablation flags: exactly one leading space, one EOS."""
    eos = "<|endoftext|>"
    assert format_completion("hi there", eos) == " hi there<|endoftext|>"
    assert format_completion(" hi there", eos) == " hi there<|endoftext|>"  # comparison summaries
    assert format_completion("  hi there", eos) == " hi there<|endoftext|>"
    assert format_completion("hi there", eos, leading_space=False) == "hi there<|endoftext|>"
    assert format_completion(" hi there", eos, append_eos=False) == " hi there"
    assert format_completion(" hi there", eos, leading_space=False, append_eos=False) == "hi there"
    assert encode(pythia_tokenizer, format_completion("hi there", eos)) == [14260, 627, EOS]


def test_completion_tokens_fixed_shapes_and_response_label(pythia_tokenizer):
    """Detail 5: right padding to fixed lengths; the response label masks exactly the query tokens."""
    out = tokenize_completion(QUERY, " hi there<|endoftext|>", pythia_tokenizer, 5, 32, query_len=27)
    assert out["response_token"] == [14260, 627, EOS, PAD, PAD] and out["response_token_len"] == 3
    assert out["query_response"] == QUERY + " hi there<|endoftext|>"
    assert out["query_response_token"] == QUERY_IDS + [14260, 627, EOS, PAD, PAD]
    assert out["query_response_token_len"] == 30
    assert out["query_response_token_response_label"] == [PAD] * 27 + [14260, 627, EOS, PAD, PAD]


def test_cnndm_rows_use_their_own_format_and_lengths(pythia_tokenizer):
    """Detail 1/2: CNN/DM batches get `Article:\\n...\\n\\nTL;DR:\\n` and their own lengths; the response
    label masks the tokens of `query.strip()`, so the first response token stays a label."""
    args = Args()
    for batch in CNNDM_BATCHES:
        fmt, response_length, query_response_length = preference_query_format(batch, args)
        assert (fmt.template, fmt.truncate_field, fmt.length) == (CNNDM_QUERY_FORMAT, "article", 1919)
        assert (response_length, query_response_length) == (155, 2021)
    fmt, response_length, query_response_length = preference_query_format("batch7", args)
    assert (fmt.template, fmt.length, response_length, query_response_length) == (TLDR_QUERY_FORMAT, 512, 169, 638)

    out = process_query({"article": "hello"}, QueryFormat(CNNDM_QUERY_FORMAT, "article", 12), pythia_tokenizer)
    assert out["query"] == "Article:\nhello\n\nTL;DR:\n"
    query_len = len(encode(pythia_tokenizer, out["query"].strip()))
    tokens = tokenize_completion(out["query"], " hi there<|endoftext|>", pythia_tokenizer, 4, 16, query_len)
    assert tokens["query_response"] == "Article:\nhello\n\nTL;DR: hi there<|endoftext|>"
    label = tokens["query_response_token_response_label"]
    assert [t for t in label if t != PAD] == [14260, 627, EOS]


def test_pad_eos_ablation_pads_with_eos(shared_data):
    """Ablation of Detail 3.2: with `--pad_token eos` the query is left-padded with id 0."""
    tok = load_tokenizer(str(shared_data / "tokenizer" / "pythia"), pad_token="eos")
    out = process_query(FIELDS, QueryFormat(TLDR_QUERY_FORMAT, "post", 29), tok)
    assert out["query_token"] == [EOS, EOS] + QUERY_IDS and out["query"] == QUERY


def _comparison(batch: str, info: dict, texts: tuple[str, str]) -> dict:
    return {"batch": batch, "info": info, "choice": 0,
            "summaries": [{"text": texts[0], "policy": "a"}, {"text": texts[1], "policy": "b"}]}


def test_completion_spaces_single_or_as_released(pythia_tokenizer):
    """Detail 3.1: by default a completion's own leading spaces become exactly one; --no-single_leading_space is the
    released code's handling, which never strips: one space before an SFT reference as it is, a comparison summary
    kept as it is (OpenAI's start with one space, so those are the same either way)."""
    eos = "<|endoftext|>"
    for text, prepend, keep in [("hi", " hi", "hi"), (" hi", "  hi", " hi"), ("  hi", "   hi", "  hi")]:
        assert format_completion(text, eos) == " hi" + eos
        assert format_completion(text, eos, released="prepend") == prepend + eos
        assert format_completion(text, eos, released="keep") == keep + eos
        assert format_completion(text, eos, leading_space=False, released="keep") == "hi" + eos  # the ablation strips
    released = Args(single_leading_space=False)
    assert Args().single_leading_space is True
    row = _comparison("batch3", {**FIELDS, "id": "x"}, ("  two spaces", " one space"))
    assert process_preference_row(row, tokenizer=pythia_tokenizer, args=Args())["chosen"] == " two spaces" + eos
    out = process_preference_row(row, tokenizer=pythia_tokenizer, args=released)
    assert (out["chosen"], out["rejected"]) == ("  two spaces" + eos, " one space" + eos)
    assert out["query_chosen"] == QUERY + "  two spaces" + eos
    sft = {**FIELDS, "summary": " spaced"}
    assert process_sft_row(sft, tokenizer=pythia_tokenizer, args=Args())["reference_response"] == " spaced" + eos
    assert process_sft_row(sft, tokenizer=pythia_tokenizer, args=released)["reference_response"] == "  spaced" + eos


def test_cnndm_response_label_hides_the_query_only(pythia_tokenizer):
    """The `_response_label` of a CNN/DM comparison hides exactly the 12 tokens of `query.strip()` ("Article", ":",
    "\n", "Some", " news", ".", "\n", "\n", "TL", ";", "DR", ":"), so DPO scores the response from its first token
    " A"; the released code hid as many positions as the unstripped query had tokens (13, its trailing "\n"), so
    its label also hid " A": that is --decode_cleanup (Detail 2.4, the authors' processing)."""
    row = _comparison("cnndm0", {"article": "Some news."}, (" A summary.", " Other."))
    response = encode(pythia_tokenizer, " A summary.<|endoftext|>")
    for decode_cleanup, hidden in ((False, 12), (True, 13)):
        out = process_preference_row(row, tokenizer=pythia_tokenizer, args=Args(decode_cleanup=decode_cleanup))
        assert out["query_token_len"] == 13 and out["query_chosen_token"][:16] == out["query_chosen_token"][:12] + response
        label = out["query_chosen_token_response_label"]
        assert label[:hidden] == [PAD] * hidden and label[hidden:16] == response[hidden - 12 :]
