"""Data stage: OpenAI's TL;DR pre-processing, building the SFT and preference datasets (SPEC Details 1-5).

    python -m summarize_from_feedback_details.tldr_dataset embedded      # offline task, builds it if needed
    python -m summarize_from_feedback_details.tldr_dataset pythia        # the paper: hub data, Pythia tokenizer
    python -m summarize_from_feedback_details.tldr_dataset pythia --sft_dataset path/to/dir_with_split_files

Reads like the paper: load the two datasets -> check every row -> format and truncate queries -> format
responses -> tokenize to fixed shapes -> check the length maxima -> draw the dataset figures -> save.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from summarize_from_feedback_details.core import (
    CNNDM_BATCHES,
    PadChoice,
    UserInputError,
    atomic_directory,
    cli,
    column,
    load_tokenizer,
    looks_like_local_path,
    resolve_input,
    rows,
    validate_numbers,
    write_json,
)

# Detail 2.1: no space after `TL;DR:`, the space belongs to the completion.
TLDR_QUERY_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
CNNDM_QUERY_FORMAT = "Article:\n{article}\n\nTL;DR:\n"
SFT_SPLITS = ("train", "validation", "test")
PREFERENCE_SPLITS = ("train", "validation")
SFT_FIELDS = ("id", "subreddit", "title", "post", "summary")
PREFERENCE_FIELDS = ("info", "summaries", "choice", "worker", "batch", "split", "extra")


@dataclass
class Lengths:
    """Token lengths of the fixed shapes (Detail 4 and 5); the defaults are the Pythia-tokenizer maxima."""

    query: int = 512
    """TL;DR query length: posts are truncated to fit, then queries are left-padded to it (Detail 2.2, 2.3)"""
    sft_response: int = 53
    """SFT reference response (" " + summary + EOS), right-padded to it"""
    sft_query_response: int = 562
    """SFT `query.strip() + reference_response`, right-padded to it"""
    rm_response: int = 169
    """preference chosen/rejected response (summary + EOS), right-padded to it"""
    rm_query_response: int = 638
    """preference `query.strip() + response`, right-padded to it"""
    cnndm_query: int = 1919
    """CNN/DM query length (2047 - 128)"""
    cnndm_response: int = 155
    """CNN/DM chosen/rejected response"""
    cnndm_query_response: int = 2021
    """CNN/DM `query.strip() + response`"""


@dataclass
class Args:
    base_model: str = "EleutherAI/pythia-1b-deduped"
    """hub id or local path of the model whose tokenizer defines the token ids"""
    sft_dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """SFT data: hub id, or a directory with {train,validation,test}.{jsonl,json,parquet} (fields id, subreddit, title, post, summary)"""
    preference_dataset: str = "openai/summarize_from_feedback"
    """comparison data: hub id, or a directory with {train,validation}.{jsonl,json,parquet} in the hub schema"""
    preference_config: str = "comparisons"
    """hub config name of the comparison data"""
    embedded_dir: str | None = None
    """if set, build the embedded offline task there first (reused when already built); the `embedded` preset's
    model and dataset paths follow it unless given explicitly"""
    output_dir: str = "datasets/tldr"
    """where sft/, preference/, tokenizer/, figures/ and the resolved args are written (atomically)"""
    lengths: Lengths = field(default_factory=Lengths)
    truncation: Literal["paragraph", "hard"] = "paragraph"
    """Detail 2.2: `paragraph` drops the post's last paragraph until the query fits; `hard` (ablation) cuts the post mid-text at a token boundary"""
    leading_space: bool = True
    """Detail 3.1: completions start with exactly one space (the query ends at `TL;DR:`)"""
    single_leading_space: bool = True
    """Detail 3.1: a completion's own leading spaces are replaced by the one space, whatever the text starts with;
    off: the released code's handling (an SFT reference gets one space before its text as it is, a comparison summary
    is kept as it is: OpenAI's start with one space, a text with none or several keeps that)"""
    append_eos: bool = True
    """Detail 3.1: completions end with the EOS token so the model learns to stop"""
    pad_token: PadChoice = "[PAD]"
    """Detail 3.2: dedicated `[PAD]`; `eos` pads with EOS (ablation only, breaks stopping)"""
    decode_cleanup: bool = False
    """Detail 2.4: the authors' released processing: the `query` text goes through transformers 4's tokenization
    clean-up (" ." -> ".", " 's" -> "'s", ...), the query+response columns are built from it and their `_response_label`
    hides as many positions as the exact query had tokens (default: OpenAI's exact text throughout)"""
    check_length_correctness: bool = True
    """Detail 4: error unless the measured length maxima equal `lengths` (off: over-long rows are cut, with a warning)"""
    cnndm_batches: tuple[str, ...] = CNNDM_BATCHES
    """labelling batches whose comparisons are CNN/DM articles; moved to the `validation_cnndm` split (Detail 1)"""
    num_proc: int = 1
    """processes for tokenization"""
    figures: bool = True
    """draw the dataset figures (length histograms, confidence, policies, policy pairs) as PNG and PDF"""
    push_to_hub: bool = False
    """also push both datasets to the hub with a dataset card"""
    hf_entity: str | None = None
    """hub user/organisation for --push_to_hub"""
    hub_name_prefix: str = "summarize_from_feedback"
    """hub dataset names are {prefix}_tldr_3_filtered_oai_preprocessing_{time} and {prefix}_oai_preprocessing_{time}"""


# ----------------------------------------------------------------------------------------------
# Detail 2: queries
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueryFormat:
    """How one kind of row becomes a query: template, the one field that may be cut, target length."""

    template: str
    truncate_field: str
    length: int
    truncate_text: str = "\n"


class QueryTooLongError(UserInputError):
    pass


# Detail 2.4: transformers 4's `clean_up_tokenization` (applied by `decode` by default before transformers 5, which
# skips it for BPE tokenizers), in its order. The authors' `query` strings went through it.
CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """Detail 2.4: `text` with the spaces before punctuation and English contractions removed, as transformers 4 did."""
    for old, new in CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without any added special tokens (no BOS in the middle of a sequence).

    Calls the Rust backend directly: ~10x faster than `tokenizer.encode` and identical for the tokenizers
    we use (a test checks it on the real posts with the Pythia and GPT-2 tokenizers).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer.encode(text, add_special_tokens=False)
    return backend.encode(text, add_special_tokens=False).ids


def truncate_to_fit(fields: dict[str, str], fmt: QueryFormat, tokenizer: Any, truncation: str = "paragraph") -> list[int]:
    """Detail 2.2: tokens of `fmt.template` filled with `fields`, cutting `fields[truncate_field]` until it fits.

    `paragraph` (OpenAI): while too long, cut the field at its last `truncate_text` ("\\n"), or drop one
    character if it has none, and re-tokenize. `hard` (ablation): cut the field at the token boundary that
    removes just the overflow. Only the truncate field is ever cut; `fields` is updated in place. A query
    that does not fit even with an empty field raises `QueryTooLongError`.
    """
    name = fmt.truncate_field
    if name not in fields:
        raise UserInputError(f"cannot truncate field {name!r}: the row has only {sorted(fields)}")
    tokens = encode(tokenizer, fmt.template.format(**fields))
    # Detail 2.2: clever truncation, only ever of the post (or article), one paragraph at a time.
    while len(tokens) > fmt.length:
        text = fields[name]
        if not text:
            raise QueryTooLongError(
                f"the query is {len(tokens)} tokens even with an empty {name!r}, more than the query length "
                f"{fmt.length}; shorten the other fields or raise the query length"
            )
        if truncation == "paragraph":
            cut = text.rfind(fmt.truncate_text) if fmt.truncate_text else -1
            fields[name] = text[:cut] if cut >= 0 else text[:-1]
        elif truncation == "hard":
            field_tokens = encode(tokenizer, text)
            keep = max(len(field_tokens) - (len(tokens) - fmt.length), 0)
            shorter = tokenizer.decode(field_tokens[:keep], clean_up_tokenization_spaces=False)
            fields[name] = shorter if len(shorter) < len(text) else text[:-1]
        else:
            raise UserInputError(f"truncation must be 'paragraph' or 'hard', got {truncation!r}")
        tokens = encode(tokenizer, fmt.template.format(**fields))
    return tokens


def process_query(
    row: dict[str, Any], fmt: QueryFormat, tokenizer: Any, truncation: str = "paragraph", decode_cleanup: bool = False
) -> dict[str, Any]:
    """Format, truncate (Detail 2.2) and left-pad (Detail 2.3) one query.

    Returns `query_token` (exactly `fmt.length` ids, left-padded with the pad id), `query` (the decoded
    query without pads, left-stripped; with `decode_cleanup` cleaned up as the authors' was, Detail 2.4),
    `query_token_len` (the unpadded length of `query_token`) and the possibly cut value of the truncate field.
    """
    fields = {key: ("" if value is None else value) for key, value in row.items()}
    tokens = truncate_to_fit(fields, fmt, tokenizer, truncation)
    # Detail 2.3: pad on the LEFT so every query ends at the same position, right before the response.
    query_token = pad_tokens(tokens, fmt.length, tokenizer.pad_token_id, side="left")
    query = tokenizer.decode(tokens, clean_up_tokenization_spaces=False)
    if decode_cleanup:
        # Detail 2.4: only the decoded `query` string is cleaned, as in the authors' code: the truncation loop and
        # `query_token` keep the exact text's tokens; the query+response columns are re-tokenized from this string.
        query = clean_up_tokenization(query)
    query = query.lstrip()
    return {
        "query_token": query_token,
        "query": query,
        "query_token_len": len(tokens),
        f"truncated_{fmt.truncate_field}": fields[fmt.truncate_field],
    }


def pad_tokens(tokens: Sequence[int], length: int, pad_id: int, side: Literal["left", "right"]) -> list[int]:
    """Pad `tokens` with `pad_id` to exactly `length`; longer input is cut on the right (callers check lengths)."""
    tokens = list(tokens)[:length]
    padding = [pad_id] * (length - len(tokens))
    return padding + tokens if side == "left" else tokens + padding


# ----------------------------------------------------------------------------------------------
# Detail 3: responses
# ----------------------------------------------------------------------------------------------
def format_completion(
    text: str, eos_token: str, leading_space: bool = True, append_eos: bool = True, released: Literal["prepend", "keep"] | None = None,
) -> str:
    """Detail 3.1: a completion is `" " + text + EOS`.

    The SFT summaries have no leading space and the comparison summaries already start with one; both
    come out with exactly one. The ablations drop the space or the EOS. `released` (--no-single_leading_space) is
    the released code's handling instead, which never strips: "prepend" one space to the text as it is (their SFT
    references), "keep" the text as it is (their comparison summaries).
    """
    # Detail 3.1: the query ends at "TL;DR:", so the completion carries the space and the EOS.
    if leading_space and released is not None:
        text = " " + text if released == "prepend" else text
    else:
        text = text.lstrip(" ")
        if leading_space:
            text = " " + text
    if append_eos:
        text = text + eos_token
    return text


def tokenize_completion(
    query: str, completion: str, tokenizer: Any, response_length: int, query_response_length: int, query_len: int
) -> dict[str, Any]:
    """Detail 5: the fixed-shape token columns of one (query, completion) pair.

    `query_response` is re-tokenized from `query.strip() + completion` (as the authors did), right-padded;
    its `_response_label` copy has its first `query_len` positions (the tokens of `query.strip()`)
    replaced by the pad id (used by DPO and by the completion-only SFT loss).
    """
    # Detail 5: fixed shapes, right-padded with the pad id (never EOS, Detail 3.2).
    pad_id = tokenizer.pad_token_id
    response = encode(tokenizer, completion)
    query_response_text = query.strip() + completion
    query_response = encode(tokenizer, query_response_text)
    label = pad_tokens(query_response, query_response_length, pad_id, side="right")
    label[: min(query_len, query_response_length)] = [pad_id] * min(query_len, query_response_length)
    return {
        "response_token": pad_tokens(response, response_length, pad_id, side="right"),
        "response_token_len": len(response),
        "query_response": query_response_text,
        "query_response_token": pad_tokens(query_response, query_response_length, pad_id, side="right"),
        "query_response_token_len": len(query_response),
        "query_response_token_response_label": label,
    }


# ----------------------------------------------------------------------------------------------
# Row processing (one function per dataset, used by `datasets.map`)
# ----------------------------------------------------------------------------------------------
def label_query_length(query: dict[str, Any], tokenizer: Any, decode_cleanup: bool) -> int:
    """How many leading positions of `query.strip() + completion` the `_response_label` columns hide: the tokens of
    `query.strip()`. With `decode_cleanup` (Detail 2.4) the authors' count, the tokens of the exact query text
    (`query_token` unpadded): it misses the cleaned query's own count by a token or two on ~1.7% of real posts, and
    for CNN/DM queries (which end in "\n", stripped) it is one more, so their label also hides the response's first token."""
    if decode_cleanup:
        return query["query_token_len"]
    return len(encode(tokenizer, query["query"].strip()))


def process_sft_row(row: dict[str, Any], *, tokenizer: Any, args: Args) -> dict[str, Any]:
    fmt = QueryFormat(TLDR_QUERY_FORMAT, "post", args.lengths.query)
    query = process_query({k: row[k] for k in ("subreddit", "title", "post")}, fmt, tokenizer, args.truncation, args.decode_cleanup)
    reference = format_completion(row["summary"], tokenizer.eos_token, args.leading_space, args.append_eos,
                                  None if args.single_leading_space else "prepend")  # Detail 3.1
    query_len = label_query_length(query, tokenizer, args.decode_cleanup)
    tokens = tokenize_completion(
        query["query"], reference, tokenizer, args.lengths.sft_response, args.lengths.sft_query_response, query_len
    )
    return {
        **query,
        "reference_response": reference,
        "reference_response_token": tokens["response_token"],
        "reference_response_token_len": tokens["response_token_len"],
        "query_reference_response": tokens["query_response"],
        "query_reference_response_token": tokens["query_response_token"],
        "query_reference_response_token_len": tokens["query_response_token_len"],
        "query_reference_response_token_response_label": tokens["query_response_token_response_label"],
    }


def preference_query_format(batch: str, args: Args) -> tuple[QueryFormat, int, int]:
    """(query format, response length, query+response length) for a comparison row of `batch`."""
    lengths = args.lengths
    if batch in args.cnndm_batches:
        return QueryFormat(CNNDM_QUERY_FORMAT, "article", lengths.cnndm_query), lengths.cnndm_response, lengths.cnndm_query_response
    return QueryFormat(TLDR_QUERY_FORMAT, "post", lengths.query), lengths.rm_response, lengths.rm_query_response


def process_preference_row(row: dict[str, Any], *, tokenizer: Any, args: Args) -> dict[str, Any]:
    fmt, response_length, query_response_length = preference_query_format(row["batch"], args)
    info = row["info"]
    query_fields = {"article": info.get("article")} if fmt.truncate_field == "article" else {
        k: info.get(k) for k in ("subreddit", "title", "post")
    }
    query = process_query(query_fields, fmt, tokenizer, args.truncation, args.decode_cleanup)
    choice = int(row["choice"])
    out: dict[str, Any] = dict(query)
    query_len = label_query_length(query, tokenizer, args.decode_cleanup)
    for name, summary in (("chosen", row["summaries"][choice]), ("rejected", row["summaries"][1 - choice])):
        completion = format_completion(summary["text"], tokenizer.eos_token, args.leading_space, args.append_eos,
                                       None if args.single_leading_space else "keep")  # Detail 3.1
        tokens = tokenize_completion(query["query"], completion, tokenizer, response_length, query_response_length, query_len)
        out[name] = completion
        out[f"{name}_token"] = tokens["response_token"]
        out[f"{name}_token_len"] = tokens["response_token_len"]
        out[f"{name}_policy"] = summary["policy"]
        out[f"query_{name}"] = tokens["query_response"]
        out[f"query_{name}_token"] = tokens["query_response_token"]
        out[f"query_{name}_token_len"] = tokens["query_response_token_len"]
        out[f"query_{name}_token_response_label"] = tokens["query_response_token_response_label"]
    out["policies"] = "--".join(sorted([row["summaries"][0]["policy"], row["summaries"][1]["policy"]]))
    return out


# ----------------------------------------------------------------------------------------------
# Loading and checking the raw data (before any tokenization)
# ----------------------------------------------------------------------------------------------
DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_raw(source: str, splits: Sequence[str], config: str | None = None, fields: Sequence[str] = ()) -> Any:
    """Load `splits` of a dataset from a hub id or from a local directory of `{split}.{jsonl,json,parquet}`.
    An empty file (0 bytes, blank json/jsonl, a json `[]`) is a split without rows, with the columns `fields`
    (bring-your-own data); a file the reader cannot parse is one error naming it."""
    import datasets

    def load_file(path: Path) -> Any:
        if _empty(path):  # datasets' json reader fails on it (StopIteration), the parquet reader on 0 bytes
            return datasets.Dataset.from_dict({name: [] for name in fields})
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its reader logs the parse error too: one line is ours
        try:
            return datasets.load_dataset(DATA_EXTENSIONS[path.suffix], data_files=str(path), split="train")
        except Exception as error:  # noqa: BLE001 - the reader's many failures become one line naming the file
            cause = error
            while cause.__cause__ is not None:  # "An error occurred while generating the dataset" <- the parse error
                cause = cause.__cause__
            message = (str(cause).splitlines() or [""])[0]
            raise UserInputError(f"cannot read {path} as {path.suffix[1:]} ({type(cause).__name__}: {message}); fix the file "
                                 "(.jsonl: one JSON object per line; .json: a list of objects)") from error
        finally:
            datasets.logging.set_verbosity(verbosity)

    if looks_like_local_path(source):
        directory = Path(source)
        if not directory.is_dir():
            raise UserInputError(f"dataset directory {source!r} does not exist; pass a hub id or a directory of split files")
        files = {}
        for split in splits:
            found = [directory / f"{split}{ext}" for ext in DATA_EXTENSIONS if (directory / f"{split}{ext}").exists()]
            if not found:
                present = sorted(p.name for p in directory.iterdir())
                raise UserInputError(
                    f"dataset directory {source!r} has no file for split {split!r} (expected {split}.jsonl, "
                    f"{split}.json or {split}.parquet; found {present})"
                )
            files[split] = found[0]
        unknown = sorted(
            p.stem for p in directory.iterdir() if p.suffix in DATA_EXTENSIONS and p.stem not in splits
        )
        if unknown:
            raise UserInputError(f"dataset directory {source!r} has unknown splits {unknown}; expected only {list(splits)}")
        return datasets.DatasetDict({split: load_file(path) for split, path in files.items()})
    loaded = datasets.load_dataset(source, config) if config else datasets.load_dataset(source)
    missing = [split for split in splits if split not in loaded]
    if missing:
        raise UserInputError(f"dataset {source!r} has no split(s) {missing}; it has {list(loaded)}")
    return datasets.DatasetDict({split: loaded[split] for split in splits})


def _empty(path: Path) -> bool:
    """Whether a split file holds no rows: 0 bytes, or json / jsonl with nothing but whitespace or an empty list."""
    if path.stat().st_size > 4096 or path.suffix == ".parquet":
        return path.stat().st_size == 0
    with open(path, "rb") as file:
        return file.read().strip() in (b"", b"[]")


def _check_text(value: Any, where: str, name: str) -> None:
    if not isinstance(value, str):
        raise UserInputError(f"{where}: field {name!r} is missing or not a string ({value!r}); fix or drop the row")
    if not value.strip():
        raise UserInputError(f"{where}: field {name!r} is empty; fix or drop the row")


def check_sft_rows(raw: Any) -> None:
    """Every SFT row has non-empty id, subreddit, title, post and summary."""
    for split, ds in raw.items():
        missing = [name for name in SFT_FIELDS if name not in ds.column_names]
        if missing:
            raise UserInputError(f"SFT split {split!r} lacks the column(s) {missing}; expected {list(SFT_FIELDS)}")
        for index, row in enumerate(rows(ds, list(SFT_FIELDS))):
            where = f"SFT split {split!r} row {index} (id {row['id']!r})"
            for name in SFT_FIELDS:
                _check_text(row[name], where, name)


def fill_optional_columns(raw: Any) -> Any:
    """Comparisons without an `extra` column (bring-your-own data with no labeller confidence) get a null one: the
    confidence is optional row by row anyway (null in some real batches) and the later stages read the column."""
    import datasets

    return datasets.DatasetDict({
        split: ds if "extra" in ds.column_names else ds.add_column("extra", [None] * len(ds)) for split, ds in raw.items()
    })


def drop_empty_splits(raw: Any, name: str, cnndm_batches: Sequence[str], source: str = "") -> Any:
    """Leave the splits without rows out of the output, each with one line; an empty train split is an error.

    Bring-your-own comparisons without CNN/DM rows leave `validation_cnndm` empty. An empty split gets none of
    the processed columns (`map` runs on no row) and `save_to_disk` writes it without a data file, which
    `load_from_disk` cannot read; left out, the stages skip it as an absent evaluation split.
    """
    import datasets

    if len(raw["train"]) == 0:
        raise UserInputError(f"{source}{': ' if source else ''}{name} split 'train' has no rows; the stages train on it: "
                             "pass data with train rows")
    for split in [split for split, ds in raw.items() if len(ds) == 0]:
        why = f" (no comparison is in a CNN/DM batch {list(cnndm_batches)})" if split == "validation_cnndm" else ""
        print(f"{name} split {split!r} has no rows{why}: left out of the output; the stages skip it")
    return datasets.DatasetDict({split: ds for split, ds in raw.items() if len(ds)})


def check_preference_rows(raw: Any, cnndm_batches: Sequence[str]) -> None:
    """Every comparison has two summaries with text and policy, a choice of 0/1, a known kind of batch
    (CNN/DM batches carry an article, the others a Reddit post) and a confidence of 1-9 or null."""
    for split, ds in raw.items():
        missing = [name for name in PREFERENCE_FIELDS if name not in ds.column_names]
        if missing:
            raise UserInputError(f"preference split {split!r} lacks the column(s) {missing}; expected {list(PREFERENCE_FIELDS)}")
        for index, row in enumerate(rows(ds, list(PREFERENCE_FIELDS))):
            info = row["info"] or {}
            where = f"preference split {split!r} row {index} (id {info.get('id')!r}, batch {row['batch']!r})"
            _check_text(row["batch"], where, "batch")
            is_cnndm = row["batch"] in cnndm_batches
            if "cnndm" in row["batch"] and not is_cnndm:
                raise UserInputError(
                    f"{where}: unknown CNN/DM batch {row['batch']!r}; known CNN/DM batches are {list(cnndm_batches)} "
                    "(add it with --cnndm_batches)"
                )
            if is_cnndm:
                _check_text(info.get("article"), where, "info.article")
            else:
                if info.get("article"):
                    raise UserInputError(
                        f"{where}: the row has an article but its batch is not a CNN/DM batch {list(cnndm_batches)}; "
                        "add the batch with --cnndm_batches"
                    )
                for name in ("subreddit", "title", "post"):
                    _check_text(info.get(name), where, f"info.{name}")
            summaries = row["summaries"]
            if not isinstance(summaries, list) or len(summaries) != 2:
                raise UserInputError(f"{where}: 'summaries' must hold exactly 2 summaries, got {summaries!r}")
            for k, summary in enumerate(summaries):
                _check_text((summary or {}).get("text"), where, f"summaries[{k}].text")
                _check_text((summary or {}).get("policy"), where, f"summaries[{k}].policy")
            if row["choice"] not in (0, 1):
                raise UserInputError(f"{where}: 'choice' must be 0 or 1, got {row['choice']!r}")
            confidence = (row["extra"] or {}).get("confidence")
            if confidence is not None and not (isinstance(confidence, int) and 1 <= confidence <= 9):
                raise UserInputError(f"{where}: 'extra.confidence' must be an integer 1-9 or null, got {confidence!r}")


def check_queries_can_fit(sft_raw: Any, preference_raw: Any, tokenizer: Any, args: Args) -> None:
    """Detail 2.2: a row whose query is too long even with an empty post/article is an error, found here
    (one short tokenization per row) before the full tokenization starts."""
    def check(where: str, fields: dict[str, Any], fmt: QueryFormat) -> None:
        empty = {**{k: v or "" for k, v in fields.items()}, fmt.truncate_field: ""}
        n_tokens = len(encode(tokenizer, fmt.template.format(**empty)))
        if n_tokens > fmt.length:
            raise QueryTooLongError(
                f"{where}: the query is {n_tokens} tokens even with an empty {fmt.truncate_field!r}, more than the "
                f"query length {fmt.length}; shorten the row's other fields, drop the row, or raise --lengths"
            )

    tldr = QueryFormat(TLDR_QUERY_FORMAT, "post", args.lengths.query)
    for split, ds in sft_raw.items():
        for index, row in enumerate(rows(ds, ["id", "subreddit", "title"])):
            check(f"SFT split {split!r} row {index} (id {row['id']!r})", {**row, "post": ""}, tldr)
    for split, ds in preference_raw.items():
        for index, row in enumerate(rows(ds, ["info", "batch"])):
            fmt = preference_query_format(row["batch"], args)[0]
            info = row["info"]
            fields = {"article": ""} if fmt.truncate_field == "article" else {k: info.get(k) for k in ("subreddit", "title", "post")}
            check(f"preference split {split!r} row {index} (id {info.get('id')!r})", fields, fmt)


def map_rows(raw: Any, function: Any, name: str, tokenizer: Any, args: Args) -> Any:
    """`function` over every split; an error in a row is re-raised naming the split and row."""
    import datasets

    def on_row(row: dict[str, Any], index: int, split: str) -> dict[str, Any]:
        try:
            return function(row, tokenizer=tokenizer, args=args)
        except UserInputError as error:
            raise UserInputError(f"{name} split {split!r} row {index}: {error}") from None

    # num_proc=None, not 1: datasets 5 starts a worker process even for num_proc=1.
    num_proc = args.num_proc if args.num_proc > 1 else None
    return datasets.DatasetDict({
        split: ds.map(on_row, with_indices=True, fn_kwargs={"split": split}, num_proc=num_proc,
                      load_from_cache_file=False, desc=f"{name} {split}")
        for split, ds in raw.items()
    })


# ----------------------------------------------------------------------------------------------
# Detail 4: measured length maxima against the configuration
# ----------------------------------------------------------------------------------------------
# (configured length field, dataset, splits, measured column(s))
LENGTH_CHECKS = (
    ("sft_response", "sft", SFT_SPLITS, ("reference_response_token_len",)),
    ("sft_query_response", "sft", SFT_SPLITS, ("query_reference_response_token_len",)),
    ("rm_response", "preference", PREFERENCE_SPLITS, ("chosen_token_len", "rejected_token_len")),
    ("rm_query_response", "preference", PREFERENCE_SPLITS, ("query_chosen_token_len", "query_rejected_token_len")),
    ("cnndm_response", "preference", ("validation_cnndm",), ("chosen_token_len", "rejected_token_len")),
    ("cnndm_query_response", "preference", ("validation_cnndm",), ("query_chosen_token_len", "query_rejected_token_len")),
)


def measure_length_maxima(sft: Any, preference: Any) -> dict[str, int]:
    """Detail 4: the longest response and query+response of each kind, over all splits."""
    data = {"sft": sft, "preference": preference}
    maxima = {}
    for name, dataset, splits, columns in LENGTH_CHECKS:
        values = [max(column(data[dataset][s], c)) for s in splits if s in data[dataset] and len(data[dataset][s]) for c in columns]
        if values:
            maxima[name] = max(values)
    queries = [max(column(ds, "query_token_len")) for key in ("sft", "preference") for s, ds in data[key].items() if s != "validation_cnndm" and len(ds)]
    maxima["query"] = max(queries)
    if "validation_cnndm" in preference and len(preference["validation_cnndm"]):
        maxima["cnndm_query"] = max(column(preference["validation_cnndm"], "query_token_len"))
    return maxima


def check_length_maxima(measured: dict[str, int], lengths: Lengths, strict: bool, decode_cleanup: bool = False) -> list[str]:
    """Compare measured maxima with the configuration.

    Responses and query+responses must match exactly (longer rows would be cut, losing their EOS; shorter
    maxima mean the configuration does not describe this data). Queries are truncated to fit, so they
    only must not exceed. Returns the problems; raises when `strict`. The default (pythia) lengths 562, 638, ...
    are the authors' maxima, measured on their cleaned query text: without `decode_cleanup` the error says so.
    """
    problems = []
    for name, value in measured.items():
        configured = getattr(lengths, name)
        if value > configured or (value != configured and name not in ("query", "cnndm_query")):
            problems.append(f"{name}: measured max {value} != configured {configured} (--lengths.{name} {value})")
    if problems and strict:
        # Detail 2.4: the query+response maxima depend on the query text, exact (default) or cleaned (the authors').
        cleanup = "" if decode_cleanup or lengths != Lengths() else (
            " (the pythia defaults are the authors' maxima, measured on their cleaned query text: --decode_cleanup "
            "reproduces their processing and their numbers)")
        raise UserInputError(
            "Detail 4 length check failed: " + "; ".join(problems) + ". Set the lengths to the measured maxima" + cleanup
            + ", or pass --no-check_length_correctness to cut over-long rows to the configured shapes"
        )
    return problems


# ----------------------------------------------------------------------------------------------
# Hub push
# ----------------------------------------------------------------------------------------------
def dataset_card(title: str, args: Args, maxima: dict[str, int], splits: dict[str, int]) -> str:
    """A dataset card that says how the data was made (and how to make it again)."""
    rows = "\n".join(f"| {split} | {count} |" for split, count in splits.items())
    return f"""---
tags: [rlhf, summarization, tldr]
---
# {title}

Pre-processed with `summarize_from_feedback_details.tldr_dataset` (OpenAI's TL;DR recipe as in
"The N+ Implementation Details of RLHF with PPO", arXiv 2403.17031).

* tokenizer: `{args.base_model}` with pad token `{args.pad_token}` (Detail 3.2)
* query format: `{TLDR_QUERY_FORMAT!r}`, truncated at the post's last paragraph ({args.truncation}), left-padded to {args.lengths.query} tokens
* decoded `query` text cleaned up as the authors' (transformers 4) was: {args.decode_cleanup} (Detail 2.4)
* CNN/DM batches {list(args.cnndm_batches)} in `validation_cnndm` with format `{CNNDM_QUERY_FORMAT!r}`, length {args.lengths.cnndm_query}
* completions: leading space {args.leading_space}, EOS appended {args.append_eos}
* measured length maxima: `{json.dumps(maxima)}`

| split | rows |
|---|---|
{rows}

Arguments:
```json
{json.dumps(dataclasses.asdict(args), indent=2)}
```
"""


def push_to_hub(args: Args, sft: Any, preference: Any, maxima: dict[str, int]) -> list[str]:
    from huggingface_hub import HfApi

    if not args.hf_entity:
        raise UserInputError("--push_to_hub needs --hf_entity (your hub user or organisation)")
    stamp = int(time.time())
    repos = []
    for suffix, ds in (("tldr_3_filtered_oai_preprocessing", sft), ("oai_preprocessing", preference)):
        repo_id = f"{args.hf_entity}/{args.hub_name_prefix}_{suffix}_{stamp}"
        ds.push_to_hub(repo_id)
        card = dataset_card(repo_id, args, maxima, {split: len(part) for split, part in ds.items()})
        HfApi().upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id, repo_type="dataset")
        repos.append(repo_id)
    return repos


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> dict[str, Any]:
    import datasets

    start = time.time()
    validate_numbers(args)  # every number, then every input path, before any work
    if args.push_to_hub and not args.hf_entity:
        raise UserInputError("--push_to_hub needs --hf_entity (your hub user or organisation)")
    for name in ("embedded_dir", "output_dir"):
        if getattr(args, name) is not None and Path(getattr(args, name)).is_file():
            raise UserInputError(f"--{name} {getattr(args, name)!r} is a file, not a directory; pass a directory (it is created)")
    if args.embedded_dir is not None:
        from summarize_from_feedback_details import embedded

        follow_embedded_dir(args)
        # Build the task, the tokenizer and the one model whose tokenizer we read (other sizes when a stage needs them).
        models_dir = Path(args.embedded_dir) / "models"
        base_size = [Path(args.base_model).name] if Path(args.base_model).parent == models_dir else []
        embedded.ensure_built(args.embedded_dir, sizes=base_size)

    resolve_input(args.base_model, "--base_model", "a directory with a tokenizer (e.g. a model saved with save_pretrained) "
                  "or a hub model id such as EleutherAI/pythia-1b-deduped", "model")
    for name in ("sft_dataset", "preference_dataset"):
        splits = SFT_SPLITS if name == "sft_dataset" else PREFERENCE_SPLITS
        resolve_input(getattr(args, name), f"--{name}", f"a directory of {{{','.join(splits)}}}.{{jsonl,json,parquet}} files "
                      "or a hub dataset id", "dataset")

    # Detail 3.2: a dedicated [PAD] (refused if it equals EOS unless --pad_token eos asks for it).
    tokenizer = load_tokenizer(args.base_model, args.pad_token)

    # Detail 1: two datasets with fixed splits; check every row before any tokenization.
    sft_raw = load_raw(args.sft_dataset, SFT_SPLITS, fields=SFT_FIELDS)
    preference_raw = fill_optional_columns(load_raw(args.preference_dataset, PREFERENCE_SPLITS, args.preference_config, PREFERENCE_FIELDS))
    check_sft_rows(sft_raw)
    check_preference_rows(preference_raw, args.cnndm_batches)

    # Detail 1: CNN/DM rows leave the validation split and form `validation_cnndm`.
    cnndm = set(args.cnndm_batches)
    validation = preference_raw["validation"]
    preference_raw = datasets.DatasetDict(
        train=preference_raw["train"],
        validation=validation.filter(lambda batch: batch not in cnndm, input_columns="batch"),
        validation_cnndm=validation.filter(lambda batch: batch in cnndm, input_columns="batch"),
    )
    sft_raw = drop_empty_splits(sft_raw, "SFT", args.cnndm_batches, f"--sft_dataset {args.sft_dataset!r}")
    preference_raw = drop_empty_splits(preference_raw, "preference", args.cnndm_batches, f"--preference_dataset {args.preference_dataset!r}")

    check_queries_can_fit(sft_raw, preference_raw, tokenizer, args)

    # Details 2, 3, 5: format, truncate, pad and tokenize to fixed shapes.
    sft = map_rows(sft_raw, process_sft_row, "SFT", tokenizer, args)
    preference = map_rows(preference_raw, process_preference_row, "preference", tokenizer, args)

    # Detail 4: the measured maxima must be the configured shapes.
    maxima = measure_length_maxima(sft, preference)
    problems = check_length_maxima(maxima, args.lengths, strict=args.check_length_correctness, decode_cleanup=args.decode_cleanup)
    for problem in problems:
        print(f"warning: {problem} (rows longer than configured are cut)")
    print("measured length maxima:", json.dumps(maxima))

    with atomic_directory(args.output_dir) as out:
        sft.save_to_disk(str(out / "sft"))
        preference.save_to_disk(str(out / "preference"))
        tokenizer.save_pretrained(str(out / "tokenizer"))
        write_json(out / "args.json", dataclasses.asdict(args))
        write_json(out / "length_maxima.json", maxima)
        if args.figures:
            from summarize_from_feedback_details.figures import dataset_figures

            dataset_figures(sft, preference, out / "figures", args.lengths)
    summary = {
        "output_dir": args.output_dir,
        "sft_rows": {split: len(ds) for split, ds in sft.items()},
        "preference_rows": {split: len(ds) for split, ds in preference.items()},
        "length_maxima": maxima,
        "truncated_queries": {
            split: sum(1 for n, p in zip(column(ds, "post"), column(ds, "truncated_post"), strict=True) if n != p) for split, ds in sft.items()
        },
        "seconds": round(time.time() - start, 1),
    }
    if args.push_to_hub:
        summary["hub_repos"] = push_to_hub(args, sft, preference, maxima)
    write_json(Path(args.output_dir) / "summary.json", summary)
    print(json.dumps(summary))
    return summary


EMBEDDED_DIR = "assets/embedded"


def follow_embedded_dir(args: Args) -> None:
    """`embedded --embedded_dir D`: the preset's paths under the default folder move to D (explicit ones stay)."""
    default = Path(EMBEDDED_DIR)
    for name in ("base_model", "sft_dataset", "preference_dataset"):
        path = Path(getattr(args, name))
        if path.is_relative_to(default) and Path(args.embedded_dir) != default:
            setattr(args, name, str(Path(args.embedded_dir) / path.relative_to(default)))


def embedded_args(embedded_dir: str = EMBEDDED_DIR, output_dir: str = "datasets/embedded") -> Args:
    """The data stage on the embedded offline task (same code path, CPU-sized lengths)."""
    from summarize_from_feedback_details import embedded

    base = Path(embedded_dir)
    return Args(
        base_model=str(base / "models" / embedded.MODEL_SIZES[0].name),
        sft_dataset=str(base / "data" / "sft"),
        preference_dataset=str(base / "data" / "preference"),
        embedded_dir=embedded_dir,
        output_dir=output_dir,
        lengths=Lengths(**embedded.LENGTHS),
    )


PRESETS = {
    "pythia": ("The paper: hub datasets, Pythia tokenizer, 512-token queries.", Args()),
    "embedded": ("The embedded offline task (built on first use), CPU-sized lengths.", embedded_args()),
}

if __name__ == "__main__":
    cli(PRESETS, main, description=__doc__.splitlines()[0])
