"""Judge stage: win rates of a policy's summaries against the references (or another policy) by an LLM
judge through the `openai` client, or offline by the embedded task's gold utility or a "gold" reward model,
each with a 95% interval (SPEC "Evaluation with an LLM judge").

    python -m summarize_from_feedback_details.judge --table runs/ppo_embedded/query_responses_validation.parquet
    python -m summarize_from_feedback_details.judge --table <table> --protocol paper      # the authors' protocol
    OPENAI_BASE_URL=http://localhost:8000/v1 python -m summarize_from_feedback_details.judge --table <table> \\
        --model <served model name>                                                      # a local vLLM server
    python -m summarize_from_feedback_details.judge --table <ppo table> --baseline_table <sft table>  # A vs B
    python -m summarize_from_feedback_details.judge --table <table> --judge gold            # embedded task, offline
    python -m summarize_from_feedback_details.judge --table <table> --judge reward_model --reward_model_path <RM>

Reads like the protocol: load the table(s) and pair each policy summary with its baseline -> build every
prompt (one seeded random order per row, or both orders) -> take what the verdict cache already holds ->
ask the judge for the rest (bounded concurrency, each request bounded by --timeout as a whole, retries with
exponential backoff, every answer appended to the cache and flushed the moment it arrives) -> parse -> count
-> write the judged table and a summary json. The API key is read from the environment only; it, and any
credential in the base URL, is never written anywhere.

Exit status: 0 every row judged; 2 bad input or a request the server refused (401/403/404/400: one line);
3 some rows failed after every retry (counted in the summary; re-running the same command asks only those);
130 / 143 stopped by SIGINT / SIGTERM (one line; every answer received is in the cache).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from summarize_from_feedback_details.core import UserInputError, run_main, write_json

EOS_TEXT = "<|endoftext|>"
SYSTEM_PROMPT = "You are a helpful assistant."
OPENAI_BASE_URL = "https://api.openai.com/v1"
Z_95 = 1.959963984540054
"""the standard normal quantile of a two-sided 95% interval"""

# Detail J-1: the authors' judge prompt, character for character as their evaluation code sent it (it is the
# DPO paper's TL;DR prompt with "### " headers and "Judge based on accuracy, coverage, and coherence."; the
# stray backslash before "you prefer" comes from their raw-string line continuation and was sent too).
AUTHORS_TEMPLATE = (
    "\nWhich of the following summaries does a better job of summarizing the most important points in the given "
    "forum post, without including unimportant or irrelevant details? Judge based on accuracy, coverage, and "
    "coherence.\n\n### Post:\n{post}\n\n### Summary A:\n{summary_a}\n\n### Summary B:\n{summary_b}\n\n"
    "### Instructions:\nFIRST provide a one-sentence comparison of the two summaries, explaining which \\\n"
    'you prefer and why. SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response '
    "should use the format:\nComparison: <one-sentence comparison and explanation>\n"
    'Preferred: <"A" or "B">\n'
)
# The DPO paper's TL;DR prompt (Rafailov et al. 2023, appendix C.2, the "concise" variant).
DPO_TEMPLATE = (
    "Which of the following summaries does a better job of summarizing the most important points in the given "
    "forum post, without including unimportant or irrelevant details? A good summary is both precise and "
    "concise.\n\nPost:\n{post}\n\nSummary A:\n{summary_a}\n\nSummary B:\n{summary_b}\n\n"
    "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. "
    'SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the '
    'format:\nComparison: <one-sentence comparison and explanation>\nPreferred: <"A" or "B">'
)
TEMPLATES = {"authors": AUTHORS_TEMPLATE, "dpo": DPO_TEMPLATE}


@dataclass
class Args:
    table: str
    """the policy's `query_responses_{split}.csv|parquet` table written by a stage (columns query, response, reference)"""
    baseline_table: str | None = None
    """another policy's table of the same split, joined on the query: its responses replace the references as the baseline"""
    judge: Literal["llm", "gold", "reward_model"] = "llm"
    """`llm`: an LLM through the openai client; `gold`: the embedded task's gold utility; `reward_model`: a (gold) RM's scores"""
    protocol: Literal["both-orders", "paper"] = "both-orders"
    """Detail J-1 / J-2: `paper` = the authors' protocol (one seeded random order, exact A/B, parse failures dropped);
    `both-orders` = each pair judged in both orders at temperature 0, a win only when both agree"""
    template: Literal["authors", "dpo"] = "authors"
    """judge prompt: `authors` = the one the authors' code sent (their GPT-4 verdicts in shared/data used it); `dpo` = the DPO paper's"""
    model: str = "gpt-3.5-turbo-0125"
    """judge model name (the paper: gpt-3.5-turbo-0125; spot check: gpt-4-0125-preview); any name a local server serves"""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 for vLLM; None: $OPENAI_BASE_URL, else OpenAI's"""
    api_key_env: str = "OPENAI_API_KEY"
    """name of the environment variable holding the API key; the key itself is never an argument and never written"""
    temperature: float = 0.0
    """sampling temperature of the both-orders protocol (the paper protocol sends none, as the authors did)"""
    max_tokens: int | None = None
    """cap on the judge's answer tokens; None: no cap (as the authors)"""
    seed: int = 1
    """seeds the paper protocol's A/B order: one draw per row, in table order"""
    max_rows: int | None = None
    """judge only the first N paired rows; None: all"""
    max_concurrency: int = 8
    """requests in flight at once"""
    timeout: float = 60.0
    """seconds one whole request may take (connect, wait, every byte of the body) before it is dropped and retried"""
    max_retries: int = 6
    """retries of one request on a rate limit (429), a server error (5xx), a timeout, a dropped connection or a
    malformed reply (a body that is not JSON, JSON without `choices`); a request whose tries run out fails its row
    (counted, exit status 3) and the run goes on"""
    backoff_initial: float = 1.0
    """seconds before the first retry; doubles at each retry (with jitter), at least the server's Retry-After"""
    backoff_max: float = 60.0
    """longest wait between two retries, in seconds"""
    cache_path: str | None = None
    """append-only jsonl of verdicts keyed by (model, full prompt, sampling parameters); None: judge_cache.jsonl in the output dir"""
    retry_parse_failures: bool = False
    """ask again the cached answers the protocol cannot parse (empty or garbled); by default a paid answer is never re-asked"""
    max_answer_chars: int = 20_000
    """longest answer kept in the cache and the table; a longer one keeps its start and end, with a note"""
    output_dir: str | None = None
    """where the judged table and the summary go; None: the directory of --table"""
    output_name: str | None = None
    """file name stem of the outputs; None: `{table stem}[_vs_{baseline dir}-{baseline stem}]_judged_{model}_{protocol|gold|reward_model}`"""
    price_input_per_million: float | None = None
    """USD per 1M prompt tokens, for the cost in the summary (gpt-3.5-turbo-0125: 0.50); None: no cost computed"""
    price_output_per_million: float | None = None
    """USD per 1M completion tokens (gpt-3.5-turbo-0125: 1.50); None: no cost computed"""
    reward_model_path: str | None = None
    """--judge reward_model: a ScalarModel checkpoint written by reward.py (a larger RM = the "gold RM")"""
    rm_batch_size: int = 16
    """--judge reward_model: summaries scored per forward pass"""


# ----------------------------------------------------------------------------------------------
# Statistics: the functions the figure scripts import
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WinRate:
    """A win rate with its 95% Wilson score interval (see `win_rate`)."""

    rate: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"win_rate": self.rate, "ci_low": self.low, "ci_high": self.high, "n": self.n,
                "interval": "wilson score, 95%"}


def wilson_interval(p_hat: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion `p_hat` observed over `n` trials: the p for which
    |p_hat - p| = z sqrt(p (1 - p) / n). Unlike the normal approximation it stays inside [0, 1] and keeps
    its coverage near 0 and 1 and for small n."""
    if n <= 0:
        raise ValueError("the Wilson interval needs n >= 1")
    denominator = 1 + z * z / n
    center = (p_hat + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(outcomes: Sequence[float], z: float = Z_95) -> WinRate | None:
    """Mean of per-pair outcomes (1 win, 0.5 tie, 0 loss; NaN = not counted, dropped) with a 95% Wilson score
    interval. For 0/1 outcomes this is the exact Wilson interval; with ties counted 1/2 it is conservative,
    because an outcome in [0, 1] with mean p has variance at most p (1 - p). None when nothing is counted."""
    counted = [float(x) for x in outcomes if not _is_nan(x)]
    if not counted:
        return None
    rate = sum(counted) / len(counted)
    low, high = wilson_interval(rate, len(counted), z)
    return WinRate(rate, low, high, len(counted))


def position_bias(policy_first: Sequence[bool], picked_policy: Sequence[bool]) -> dict[str, Any]:
    """Position bias of counted verdicts: `policy_first[i]` says the policy was shown as Summary A in verdict
    i, `picked_policy[i]` that the verdict preferred the policy. Returns the share of verdicts that picked A
    (0.5 = no bias) and the policy's win rate when shown first (A) and second (B)."""
    if len(policy_first) != len(picked_policy):
        raise ValueError("policy_first and picked_policy must have the same length")
    picked_a = [first == picked for first, picked in zip(policy_first, picked_policy, strict=True)]
    first = [picked for shown_first, picked in zip(policy_first, picked_policy, strict=True) if shown_first]
    second = [picked for shown_first, picked in zip(policy_first, picked_policy, strict=True) if not shown_first]
    return {
        "first_position_rate": _mean(picked_a),
        "policy_win_rate_when_first": _mean(first),
        "policy_win_rate_when_second": _mean(second),
        "n_first": len(first),
        "n_second": len(second),
    }


def outcome_counts(outcomes: Sequence[float]) -> dict[str, Any]:
    """Wins, ties, losses and not-counted rows of per-pair outcomes, with the win rate and its interval."""
    counted = [float(x) for x in outcomes if not _is_nan(x)]
    result = win_rate(counted)
    return {
        **(result.as_dict() if result else {"win_rate": None, "ci_low": None, "ci_high": None, "n": 0,
                                            "interval": "wilson score, 95%"}),
        "wins": sum(x == 1.0 for x in counted),
        "ties": sum(x == 0.5 for x in counted),
        "losses": sum(x == 0.0 for x in counted),
        "not_counted": len(outcomes) - len(counted),
    }


def _mean(values: Sequence[Any]) -> float | None:
    return sum(bool(v) for v in values) / len(values) if len(values) else None


def _is_nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# ----------------------------------------------------------------------------------------------
# Prompts and parsing
# ----------------------------------------------------------------------------------------------
def clean_summary(text: str) -> str:
    """A summary as the judge sees it: cut at the first EOS, stripped (as the authors did)."""
    return str(text).split(EOS_TEXT)[0].strip()


def judge_prompt(post: str, summary_a: str, summary_b: str, template: str = "authors") -> str:
    """The judge's user message: the template filled in ONE pass, so braces inside a post are never read as
    placeholders. The post is the whole formatted query, stripped; summaries are cut at EOS and stripped."""
    values = {"post": str(post).strip(), "summary_a": clean_summary(summary_a), "summary_b": clean_summary(summary_b)}
    return re.sub(r"\{(post|summary_a|summary_b)\}", lambda m: values[m.group(1)], TEMPLATES[template])


def chat_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def paper_orders(num_rows: int, seed: int) -> list[int]:
    """Detail J-1: one random order per row from a seeded generator: `shuffled_index` 0 shows the policy as
    Summary A, 1 shows it as Summary B (the authors drew `random.randint(0, 1)` per row, unseeded)."""
    rng = random.Random(seed)
    return [rng.randint(0, 1) for _ in range(num_rows)]


def parse_paper(answer: str | None) -> tuple[str, str] | None:
    """The authors' parsing: the text between `Comparison:` and `Preferred:` (stripped) and everything after
    `Preferred:` (stripped). None where their code failed (a marker missing) and fell back to a random letter."""
    answer = answer or ""
    if "Comparison:" not in answer or "Preferred:" not in answer:
        return None
    explanation = answer.split("Comparison:")[1].split("Preferred:")[0].strip()
    letter = answer.split("Preferred:")[1].strip()
    return explanation, letter


def paper_outcome(shuffled_index: int, answer: str | None) -> dict[str, Any]:
    """Detail J-1: one verdict counted the authors' way. Only an exact `A`/`B` naming the policy's slot is a
    win; any other text after `Preferred:` (`"A"`, `A.`, `Summary A`) counts for the baseline. A verdict
    without both markers, or with an empty comparison, is dropped from the denominator: their code wrote an
    empty explanation, which their analysis read back as NaN and removed with `dropna()`."""
    parsed = parse_paper(answer)
    if parsed is None or not parsed[0]:
        return {"explanation": parsed[0] if parsed else None, "preferred_letter": parsed[1] if parsed else None,
                "preferred": None, "win": math.nan}
    explanation, letter = parsed
    # Detail J-1: exact string comparison, as the authors' `preferred == "A"`.
    won = letter == ("A" if shuffled_index == 0 else "B")
    return {"explanation": explanation, "preferred_letter": letter, "preferred": "policy" if won else "baseline",
            "win": 1.0 if won else 0.0}


_DECORATION = " \t*_`'\"“”‘’<>[](){}:.,;!-"
_PREFERRED = re.compile(r"preferred\s*\**\s*[:：]", re.IGNORECASE)
_LETTER = re.compile(r"(summary\s*)?([AB])(?![A-Za-z0-9])", re.IGNORECASE)
_SECOND_LETTER = re.compile(r"""[\s"'*>\])]*(?:or|and|/|\|)\s*["'*<\[(]*(?:summary\s*)?[AB](?![A-Za-z0-9])""", re.IGNORECASE)


def parse_preference(answer: str | None) -> str | None:
    """Robust parsing (both-orders protocol): the letter after the LAST `Preferred:` marker, allowing markdown,
    quotes, brackets and a leading "Summary" (`**Preferred:** "B".`, `Preferred: Summary A`); without a marker,
    a last line that is only a letter. None when no single letter is stated (`A or B`, `TIE`, `Neither`)."""
    text = answer or ""
    markers = list(_PREFERRED.finditer(text))
    if markers:
        rest = text[markers[-1].end():].strip()
        candidate = rest.splitlines()[0] if rest else ""
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        candidate = lines[-1] if lines else ""
        if not re.fullmatch(r"(?:summary\s*)?[AB]", candidate.strip(_DECORATION), re.IGNORECASE):
            return None  # without a marker only a bare letter is a verdict
    candidate = candidate.strip(_DECORATION)
    match = _LETTER.match(candidate)
    if not match or (match.group(2).islower() and not match.group(1)):
        return None  # a lower-case "a" alone is an article ("a summary that ..."), not a verdict
    if _SECOND_LETTER.match(candidate[match.end():]):
        return None  # "A or B", "A/B": no single verdict
    return match.group(2).upper()


def answer_status(answer: str | None, protocol: str) -> str:
    """`ok` when the protocol reads a verdict in the answer, else `parse_failure`: the authors' protocol needs
    both markers and a comparison (J-1), both-orders a single letter (J-2)."""
    if protocol == "paper":
        parsed = parse_paper(answer)
        return "ok" if parsed is not None and parsed[0] else "parse_failure"
    return "ok" if parse_preference(answer) is not None else "parse_failure"


def cut_answer(answer: str, max_chars: int) -> str:
    """An answer of at most about `max_chars` characters: a longer one keeps its first and last `max_chars // 2`
    (where the comparison and the verdict are) around a marker."""
    if len(answer) <= max_chars:
        return answer
    half = max_chars // 2
    return f"{answer[:half]}\n[... {len(answer) - 2 * half} characters cut ...]\n{answer[len(answer) - half:]}"


def both_orders_outcome(letter_policy_first: str | None, letter_policy_second: str | None) -> tuple[str, float]:
    """Detail J-2: the pair's outcome from its two verdicts (policy shown as A, then as B). A win or a loss only
    when both orders agree; disagreement means the position decided, a tie (1/2); a missing letter fails the pair."""
    if letter_policy_first is None or letter_policy_second is None:
        return "parse_failure", math.nan
    first = letter_policy_first == "A"  # the policy was Summary A
    second = letter_policy_second == "B"  # the policy was Summary B
    if first and second:
        return "win", 1.0
    if not first and not second:
        return "loss", 0.0
    return "tie", 0.5


# ----------------------------------------------------------------------------------------------
# The verdict cache: append-only jsonl, one flushed line per verdict
# ----------------------------------------------------------------------------------------------
def request_key(request: dict[str, Any]) -> str:
    """Cache key of one request: sha256 of (model, the full messages, the sampling parameters)."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class VerdictCache:
    """Verdicts by request key in an append-only jsonl file. Each verdict is written as one line, flushed and
    fsynced before the next, so a killed run loses at most the calls in flight; a torn last line is skipped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        self.skipped_lines = 0
        self._file: Any = None
        self._needs_newline = False
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            self._needs_newline = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                    self.records[record["key"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.skipped_lines += 1

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.records[key]

    def add(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run
            if self._needs_newline:  # a killed run left a torn line: start on a fresh one
                self._file.write("\n")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[record["key"]] = record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ----------------------------------------------------------------------------------------------
# Calling the judge: bounded concurrency, retries with exponential backoff
# ----------------------------------------------------------------------------------------------
class JudgeCallError(UserInputError):
    """A judge request failed for good (after retries, or with an error a retry cannot fix)."""


def resolve_base_url(args: Args) -> str:
    return (args.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")


def redact_url(url: str) -> str:
    """The URL without user/password or query string (which can carry keys), safe to write in a summary."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def secret_values(args: Args) -> list[str]:
    """Every secret a user can hand the judge: the API key's value and the user name, password and query values
    of the base URL (--base_url or $OPENAI_BASE_URL). Values under 8 characters are left alone: scrubbing a
    user name like "user" would garble every text that contains the word."""
    parts = urlsplit(resolve_base_url(args))
    values = [os.environ.get(args.api_key_env), parts.username, parts.password] + [v for _, v in parse_qsl(parts.query)]
    return sorted({v for v in values if v and len(v) >= 8}, key=len, reverse=True)


def scrub(value: Any, secrets: Sequence[str]) -> Any:
    """`value` (a string, or dicts / lists of them) with every secret replaced by `***`: applied to everything
    the judge writes or prints (cache lines, summary, error messages), on top of `redact_url`."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    return value


def make_client(args: Args, base_url: str) -> Any:
    """An `AsyncOpenAI` client for `base_url` with the key from `$api_key_env` (its own retries off: ours
    count and back off explicitly)."""
    from openai import AsyncOpenAI

    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        if urlsplit(base_url).hostname == "api.openai.com":
            raise UserInputError(
                f"no API key: set the environment variable {args.api_key_env} (it is read from the environment only "
                "and never written), or point --base_url / OPENAI_BASE_URL at a local OpenAI-compatible server"
            )
        api_key = "EMPTY"  # a local server (vLLM) accepts any key unless it was started with --api-key
    return AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=args.timeout)  # per read: see _ask


def _retry_after(error: Any) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def backoff_delay(attempt: int, args: Args, retry_after: float | None = None) -> float:
    """Seconds before retry `attempt` (0-based): initial x 2^attempt with jitter in [0.5, 1], at least the
    server's Retry-After, at most --backoff_max."""
    delay = args.backoff_initial * (2**attempt) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, args.backoff_max)


def _is_retryable(error: Exception | None) -> bool:
    """Worth another try: a timeout (ours or the client's), a dropped connection, a malformed reply (a body
    that is not JSON, or not a chat completion), a rate limit (429), 408, 409 or a server error (5xx)."""
    import openai

    if isinstance(error, (openai.APIConnectionError, openai.APIResponseValidationError, MalformedReply, TimeoutError,
                          ValueError)):  # APIConnectionError includes APITimeoutError; ValueError: JSON that does not decode
        return True
    status = getattr(error, "status_code", None)
    return isinstance(error, openai.APIStatusError) and (status in (408, 409, 429) or (status or 0) >= 500)


def _fatal_message(error: Exception, args: Args, base_url: str) -> str:
    status = getattr(error, "status_code", None)
    where = f"{redact_url(base_url)} (model {args.model!r})"
    if status in (401, 403):
        return f"the judge server {where} refused the API key (HTTP {status}); check ${args.api_key_env}"
    if status == 404:
        return f"the judge server {where} answered 404: check --model and --base_url"
    return f"the judge server {where} rejected a request ({type(error).__name__}: {str(error)[:300]})"


class MalformedReply(Exception):
    """A reply that is not a chat completion: no `choices`, or a choice without a message (retried like a 5xx)."""


def reply_answer(response: Any) -> str:
    """The answer text of a reply; `MalformedReply` when there is none to read (the client hands back a string
    for a body served as text, and a JSON body without `choices` as an object whose `choices` is None)."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise MalformedReply(f"a reply without choices: {str(response)[:100]!r}")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if message is None or not (content is None or isinstance(content, str)):
        raise MalformedReply(f"a reply whose first choice has no message: {str(choices[0])[:100]!r}")
    return content or ""  # None: a refusal or a tool call, an empty answer (a parse failure)


def _count(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


@dataclass
class CallStats:
    new_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    """request key -> the last error of a request whose tries ran out (its row fails; it is not cached)"""
    fatal: str | None = None
    """set by a request the server refused (401/403/404/400): nothing more is asked and the run stops"""


async def _ask(client: Any, key: str, request: dict[str, Any], cache: VerdictCache, args: Args, base_url: str,
               limiter: asyncio.Semaphore, stats: CallStats, progress: Any, secrets: Sequence[str]) -> None:
    """One verdict: ask until an answer arrives (cached the moment it does, whatever it says), the tries run
    out (the request is recorded as failed and the run goes on) or another request was refused (stop)."""
    error: Exception | None = None
    for attempt in range(args.max_retries + 1):
        if attempt:
            stats.retries += 1
            await asyncio.sleep(backoff_delay(attempt - 1, args, _retry_after(error)))
        async with limiter:  # bounded concurrency; released while backing off
            if stats.fatal is not None:
                return
            try:
                # The client's own timeout bounds each read of the socket (httpx semantics), so a server that
                # trickles its body a byte at a time holds a call for ever; wait_for bounds the whole call, and
                # cancelling it closes the connection. Simpler than a watchdog thread: everything stays in one loop.
                response = await asyncio.wait_for(client.chat.completions.create(**request), args.timeout)
                answer = reply_answer(response)
            except Exception as caught:  # noqa: BLE001 - classified below
                error = caught
            else:
                cache.add(scrub(verdict_record(key, request, response, answer, args), secrets))  # before anything else
                stats.new_calls += 1
                stats.prompt_tokens += cache[key]["prompt_tokens"]
                stats.completion_tokens += cache[key]["completion_tokens"]
                progress.update(1)
                return
        if not _is_retryable(error):
            stats.fatal = stats.fatal or scrub(_fatal_message(error, args, base_url), secrets)
            return
    stats.failed[key] = scrub(f"{type(error).__name__}: {str(error)[:200]}", secrets)
    progress.update(1)


def verdict_record(key: str, request: dict[str, Any], response: Any, answer: str, args: Args) -> dict[str, Any]:
    """The cache line of one answer: `status` says whether the protocol can read a verdict in it (a parse
    failure keeps its raw text, and is only asked again with --retry_parse_failures); an answer longer than
    --max_answer_chars keeps its start and end, with its full length and a note."""
    text = cut_answer(answer, args.max_answer_chars)
    usage = getattr(response, "usage", None)
    served = getattr(response, "model", None)
    record = {
        "key": key, "model": request["model"], "served_model": None if served is None else str(served),
        "status": answer_status(text, args.protocol), "answer": text,
        "finish_reason": getattr(response.choices[0], "finish_reason", None),
        "prompt_tokens": _count(getattr(usage, "prompt_tokens", 0)),
        "completion_tokens": _count(getattr(usage, "completion_tokens", 0)), "time": time.time(),
    }
    if text != answer:
        record["answer_chars"] = len(answer)
        record["note"] = f"answer cut to its first and last {args.max_answer_chars // 2} of {len(answer)} characters"
    return record


def to_ask(requests: dict[str, dict[str, Any]], cache: VerdictCache, args: Args) -> dict[str, dict[str, Any]]:
    """The requests without a cached answer, and with --retry_parse_failures those whose answer is unparseable."""
    return {key: request for key, request in requests.items() if key not in cache
            or (args.retry_parse_failures and answer_status(cache[key]["answer"], args.protocol) == "parse_failure")}


async def _ask_all(missing: dict[str, dict[str, Any]], cache: VerdictCache, args: Args, base_url: str,
                   secrets: Sequence[str]) -> CallStats:
    from tqdm.auto import tqdm

    stats = CallStats()
    if not missing:
        return stats
    client = make_client(args, base_url)
    limiter = asyncio.Semaphore(args.max_concurrency)
    with tqdm(total=len(missing), desc="judge calls", mininterval=2.0) as progress:
        tasks = [asyncio.ensure_future(_ask(client, key, request, cache, args, base_url, limiter, stats, progress, secrets))
                 for key, request in missing.items()]
        try:
            await asyncio.gather(*tasks)  # a refused request lets the calls in flight finish (and be cached)
        finally:
            for task in tasks:  # only when interrupted: nothing is left to cancel otherwise
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
    if stats.fatal is not None:
        raise JudgeCallError(f"{stats.fatal}; the {stats.new_calls} answers received are cached")
    return stats


# ----------------------------------------------------------------------------------------------
# Inputs: the stage tables, paired
# ----------------------------------------------------------------------------------------------
def read_table(path: str, what: str) -> Any:
    import pandas as pd

    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"{what} {path!r} does not exist; pass a query_responses_{{split}}.csv|parquet table a stage wrote")
    if file.suffix == ".parquet":
        return pd.read_parquet(file)
    if file.suffix == ".csv":
        return pd.read_csv(file, keep_default_na=False)  # an empty summary stays "", not NaN
    raise UserInputError(f"{what} {path!r} must be a .csv or .parquet table")


def _require(table: Any, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserInputError(f"{what} lacks the column(s) {missing} (it has {list(table.columns)}); "
                             "pass a query_responses table written by sft.py, ppo.py, rloo.py or dpo.py")


def load_pairs(args: Args) -> Any:
    """The rows to judge: the policy table with a `baseline_response` column, either its references or the
    responses of --baseline_table for the same query (joined on the query and its occurrence number)."""
    table = read_table(args.table, "--table")
    _require(table, ["query", "response"], f"--table {args.table}")
    if args.baseline_table is None:
        _require(table, ["reference"], f"--table {args.table}")
        pairs = table.assign(baseline_response=table["reference"])
    else:
        baseline = read_table(args.baseline_table, "--baseline_table")
        _require(baseline, ["query", "response"], f"--baseline_table {args.baseline_table}")
        left = table.assign(_occurrence=table.groupby("query").cumcount())
        right = baseline.assign(_occurrence=baseline.groupby("query").cumcount())[["query", "_occurrence", "response"]]
        pairs = left.merge(right.rename(columns={"response": "baseline_response"}), on=["query", "_occurrence"], how="inner")
        pairs = pairs.drop(columns="_occurrence")
        if pairs.empty:
            raise UserInputError(f"no query of --table {args.table} is in --baseline_table {args.baseline_table}; "
                                 "pass two tables of the same split")
        if len(pairs) < len(table):
            print(f"judge: {len(table) - len(pairs)} rows of --table have no match in --baseline_table; judging {len(pairs)}")
    pairs = pairs.reset_index(drop=True)
    if args.max_rows is not None:
        pairs = pairs.iloc[: args.max_rows].reset_index(drop=True)
    if pairs.empty:
        raise UserInputError(f"--table {args.table} has no rows to judge")
    for column in ("query", "response", "baseline_response"):
        pairs[column] = pairs[column].fillna("").astype(str)
    return pairs


# ----------------------------------------------------------------------------------------------
# The judges
# ----------------------------------------------------------------------------------------------
def llm_requests(pairs: Any, args: Args) -> list[tuple[str, dict[str, Any]]]:
    """Per row: the (policy order, request) of each verdict to ask. Paper: one seeded order per row and no
    sampling parameters (the authors set none). Both-orders: policy as A, then as B, at --temperature."""
    params: dict[str, Any] = {}
    if args.protocol == "both-orders":
        params["temperature"] = args.temperature  # Detail J-2: pinned model, temperature 0
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    orders = paper_orders(len(pairs), args.seed) if args.protocol == "paper" else None
    per_row = []
    for i, (query, policy, baseline) in enumerate(zip(pairs["query"], pairs["response"], pairs["baseline_response"], strict=True)):
        shown = [orders[i]] if orders is not None else [0, 1]  # shuffled_index: 0 = policy is Summary A
        for shuffled_index in shown:
            a, b = (policy, baseline) if shuffled_index == 0 else (baseline, policy)
            request = {"model": args.model, "messages": chat_messages(judge_prompt(query, a, b, args.template)), **params}
            per_row.append((i, shuffled_index, request))
    return per_row


def judge_with_llm(pairs: Any, args: Args) -> tuple[Any, dict[str, Any]]:
    base_url = resolve_base_url(args)
    cache_path = Path(args.cache_path) if args.cache_path else _output_dir(args) / "judge_cache.jsonl"
    cache = VerdictCache(cache_path)
    asks = llm_requests(pairs, args)
    requests = {request_key(request): request for _, _, request in asks}
    missing = to_ask(requests, cache, args)
    reasked = sum(key in cache for key in missing)
    print(f"judge: {len(pairs)} pairs, {len(requests)} verdicts ({args.protocol}), {len(requests) - len(missing)} cached, "
          f"{len(missing)} to ask{f' ({reasked} parse failures again)' if reasked else ''} {args.model} at {redact_url(base_url)}")
    try:
        stats = asyncio.run(_ask_all(missing, cache, args, base_url, secret_values(args)))
    finally:
        cache.close()
    # None: a request whose tries ran out (not cached: the next run asks it again)
    verdicts = [cache.records.get(request_key(request)) for _, _, request in asks]
    answers = [v["answer"] if v else None for v in verdicts]
    table = pairs.copy()
    if args.protocol == "paper":
        rows = [paper_outcome(shuffled_index, answer) for (_, shuffled_index, _), answer in zip(asks, answers, strict=True)]
        table["shuffled_index"] = [shuffled_index for _, shuffled_index, _ in asks]
        table["judge_answer"] = answers
        table["judge_status"] = ["failed" if v is None else answer_status(v["answer"], "paper") for v in verdicts]
        for key in ("explanation", "preferred_letter", "preferred", "win"):
            table[key] = [row[key] for row in rows]
        counted = table[table["win"].notna()]
        bias = position_bias(list(counted["shuffled_index"] == 0), list(counted["win"] == 1.0))
        failed_rows = int((table["judge_status"] == "failed").sum())
        failures = int(table["win"].isna().sum()) - failed_rows
        num_verdicts = len(table)
    else:
        first, second = answers[0::2], answers[1::2]
        table["answer_policy_first"], table["answer_policy_second"] = first, second
        letters_first = [parse_preference(a) for a in first]
        letters_second = [parse_preference(a) for a in second]
        table["letter_policy_first"], table["letter_policy_second"] = letters_first, letters_second
        outcomes = [("failed", math.nan) if a is None or b is None else both_orders_outcome(letter_a, letter_b)
                    for a, b, letter_a, letter_b in zip(first, second, letters_first, letters_second, strict=True)]
        table["outcome"] = [o for o, _ in outcomes]
        table["win"] = [w for _, w in outcomes]
        counted = table[table["win"].notna()]
        n = len(counted)
        # Each counted pair gives two verdicts: policy first (picked it iff "A"), policy second (iff "B").
        bias = position_bias([True] * n + [False] * n,
                             list(counted["letter_policy_first"] == "A") + list(counted["letter_policy_second"] == "B"))
        bias["order_disagreement_rate"] = float((counted["outcome"] == "tie").mean()) if n else None
        failures = sum(answer is not None and parse_preference(answer) is None for answer in answers)
        failed_rows = int((table["outcome"] == "failed").sum())
        num_verdicts = 2 * len(table)
    answered = [v for v in verdicts if v is not None]
    prompt_tokens = sum(v["prompt_tokens"] for v in answered)
    completion_tokens = sum(v["completion_tokens"] for v in answered)
    extra = {
        "model": args.model,
        "served_models": sorted({str(v.get("served_model")) for v in answered}),
        "base_url": redact_url(base_url),
        "protocol": args.protocol,
        "template": args.template,
        "temperature": args.temperature if args.protocol == "both-orders" else None,
        "seed": args.seed if args.protocol == "paper" else None,
        "verdicts": num_verdicts,
        "parse_failures": failures,
        "parse_failure_rate": failures / num_verdicts,
        "parse_failures_asked_again": reasked,
        "failed_rows": failed_rows,
        "failed_requests": len(stats.failed),
        "failure_reasons": dict(Counter(reason.split(":")[0] for reason in stats.failed.values())),
        "max_tries": args.max_retries + 1,
        "answers_cut": sum("note" in v for v in answered),
        "position_bias": bias,
        "calls": {"cached": len(requests) - len(missing), "new": stats.new_calls, "retries": stats.retries},
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens, "total": prompt_tokens + completion_tokens},
        "tokens_this_run": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens},
        "cost_usd": _cost(prompt_tokens, completion_tokens, args),
        "cost_usd_this_run": _cost(stats.prompt_tokens, stats.completion_tokens, args),
        "prices_per_million": {"input": args.price_input_per_million, "output": args.price_output_per_million},
        "cache": str(cache_path),
    }
    return table, extra


def _cost(prompt_tokens: int, completion_tokens: int, args: Args) -> float | None:
    if args.price_input_per_million is None or args.price_output_per_million is None:
        return None
    return (prompt_tokens * args.price_input_per_million + completion_tokens * args.price_output_per_million) / 1e6


def compare(policy_value: float, baseline_value: float) -> tuple[str, float]:
    """Offline judges: a win when the policy's value is strictly higher, a tie (1/2) when equal."""
    if policy_value > baseline_value:
        return "win", 1.0
    if policy_value < baseline_value:
        return "loss", 0.0
    return "tie", 0.5


def judge_with_gold(pairs: Any, args: Args) -> tuple[Any, dict[str, Any]]:
    """The embedded task's `gold_utility(query, summary)` of policy and baseline (the same utility the stages'
    `gold_win` column uses)."""
    from summarize_from_feedback_details.embedded import gold_utility

    table = pairs.copy()
    table["policy_gold_utility"] = [gold_utility(q, r) for q, r in zip(table["query"], table["response"], strict=True)]
    table["baseline_gold_utility"] = [gold_utility(q, r) for q, r in zip(table["query"], table["baseline_response"], strict=True)]
    outcomes = [compare(p, b) for p, b in zip(table["policy_gold_utility"], table["baseline_gold_utility"], strict=True)]
    table["outcome"], table["win"] = [o for o, _ in outcomes], [w for _, w in outcomes]
    return table, {"model": "embedded.gold_utility", "policy_mean": float(table["policy_gold_utility"].mean()),
                   "baseline_mean": float(table["baseline_gold_utility"].mean())}


def reward_model_scores(model: Any, tokenizer: Any, queries: Sequence[str], summaries: Sequence[str], batch_size: int) -> list[float]:
    """The RM's score of each `query` + `" " + summary + EOS`, laid out as the stages score responses:
    query left-padded, response right-padded, the reward read at the last non-pad token, the EOS (Detail 12).
    Every summary gets an EOS: the RM is only trained at the EOS, so each is scored as a finished summary."""
    import torch

    from summarize_from_feedback_details.modeling import sequence_scores
    from summarize_from_feedback_details.tldr_dataset import encode, format_completion, pad_tokens

    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(queries), batch_size):
        query_tokens = [encode(tokenizer, q) for q in queries[start : start + batch_size]]
        response_tokens = [encode(tokenizer, format_completion(clean_summary(s), tokenizer.eos_token))
                           for s in summaries[start : start + batch_size]]
        context, length = max(map(len, query_tokens)), max(map(len, response_tokens))
        rows = [pad_tokens(q, context, pad, "left") + pad_tokens(r, length, pad, "right")
                for q, r in zip(query_tokens, response_tokens, strict=True)]
        with torch.no_grad():
            batch_scores = sequence_scores(model, torch.tensor(rows, device=device), pad, context)
        scores.extend(batch_scores.float().tolist())
    return scores


def judge_with_reward_model(pairs: Any, args: Args) -> tuple[Any, dict[str, Any]]:
    """The "gold RM" win rate: a (larger) reward model scores policy and baseline; the higher score wins."""
    import torch

    from summarize_from_feedback_details.core import load_tokenizer
    from summarize_from_feedback_details.modeling import FROZEN_DTYPE, ScalarModel, disable_dropout
    from summarize_from_feedback_details.training import check_model_path, check_vocabulary

    if not args.reward_model_path:
        raise UserInputError("--judge reward_model needs --reward_model_path (a reward model written by reward.py)")
    check_model_path(args.reward_model_path, "--reward_model_path")
    tokenizer = load_tokenizer(args.reward_model_path)
    model = disable_dropout(ScalarModel.from_pretrained(args.reward_model_path, dtype=FROZEN_DTYPE)).eval()
    check_vocabulary(model.config.backbone_config, tokenizer, args.reward_model_path)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    table = pairs.copy()
    queries = list(table["query"])
    table["policy_rm_score"] = reward_model_scores(model, tokenizer, queries, list(table["response"]), args.rm_batch_size)
    table["baseline_rm_score"] = reward_model_scores(model, tokenizer, queries, list(table["baseline_response"]), args.rm_batch_size)
    outcomes = [compare(p, b) for p, b in zip(table["policy_rm_score"], table["baseline_rm_score"], strict=True)]
    table["outcome"], table["win"] = [o for o, _ in outcomes], [w for _, w in outcomes]
    return table, {"model": args.reward_model_path, "policy_mean": float(table["policy_rm_score"].mean()),
                   "baseline_mean": float(table["baseline_rm_score"].mean())}


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def _output_dir(args: Args) -> Path:
    return Path(args.output_dir) if args.output_dir else Path(args.table).parent


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def output_name(args: Args) -> str:
    if args.output_name:
        return args.output_name
    name = Path(args.table).stem
    if args.baseline_table:
        baseline = Path(args.baseline_table)
        name += f"_vs_{_slug(baseline.parent.name)}-{baseline.stem}"
    judge = {"llm": f"{_slug(args.model)}_{args.protocol}", "gold": "gold", "reward_model": "reward_model"}[args.judge]
    return f"{name}_judged_{judge}"


def write_table(table: Any, stem: Path) -> list[Path]:
    """The judged table as csv and parquet, each written to a temporary file and renamed."""
    paths = []
    for suffix in (".csv", ".parquet"):
        path = stem.with_name(stem.name + suffix)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        (table.to_csv if suffix == ".csv" else table.to_parquet)(tmp, index=False)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def check_args(args: Args) -> None:
    """Errors a user can cause, before any table is read or any call is made."""
    if args.max_concurrency < 1 or args.max_retries < 0 or args.timeout <= 0:
        raise UserInputError("--max_concurrency must be >= 1, --max_retries >= 0 and --timeout > 0")
    if args.max_rows is not None and args.max_rows < 1:
        raise UserInputError("--max_rows must be >= 1")
    if args.max_answer_chars < 100:
        raise UserInputError(f"--max_answer_chars {args.max_answer_chars} keeps too little of an answer to read its verdict; "
                             "pass at least 100 (default 20000)")
    if (args.price_input_per_million is None) != (args.price_output_per_million is None):
        raise UserInputError("give both --price_input_per_million and --price_output_per_million, or neither")
    if args.judge == "reward_model" and not args.reward_model_path:
        raise UserInputError("--judge reward_model needs --reward_model_path (a reward model written by reward.py)")


def main(args: Args) -> dict[str, Any]:
    check_args(args)
    start = time.time()
    pairs = load_pairs(args)
    if args.judge == "llm":
        table, extra = judge_with_llm(pairs, args)
    elif args.judge == "gold":
        table, extra = judge_with_gold(pairs, args)
    else:
        table, extra = judge_with_reward_model(pairs, args)
    if args.judge != "llm":
        extra = {"protocol": None, "parse_failures": 0, "parse_failure_rate": 0.0, "failed_rows": 0, "position_bias": None,
                 **extra}
    out_dir = _output_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / output_name(args)
    paths = write_table(table, stem)
    summary = {
        "judge": args.judge,
        **outcome_counts(list(table["win"])),
        "ties_count_as": 0.5,
        **extra,
        "rows": len(table),
        "table": args.table,
        "baseline": args.baseline_table or "reference",
        "outputs": [str(p) for p in paths],
        "seconds": round(time.time() - start, 2),
        # the name of the key's variable, never the key; the base URL without credentials
        "args": {**dataclasses.asdict(args), "base_url": args.base_url and redact_url(args.base_url)},
    }
    summary = scrub(summary, secret_values(args))
    write_json(stem.with_name(stem.name + ".summary.json"), summary)
    interval = f"[{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]" if summary["n"] else "[-]"
    rate = f"{summary['win_rate']:.3f}" if summary["n"] else "-"
    print(f"judge {args.judge}{' ' + args.protocol if args.judge == 'llm' else ''}: win rate {rate} {interval} over "
          f"{summary['n']} pairs ({summary['wins']} wins, {summary['ties']} ties, {summary['losses']} losses, "
          f"{summary['not_counted']} not counted) -> {stem}.summary.json")
    if summary["failed_rows"]:
        failed = summary["failed_rows"]
        print(f"judge: {failed} row{'s' if failed > 1 else ''} failed after {summary['max_tries']} tries; re-run the same "
              "command to retry only those", file=sys.stderr)
    return summary


EXIT_FAILED_ROWS = 3
"""exit status when some rows failed after every retry (the outputs and the summary are written)"""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: raised in the main thread, so the asyncio run cancels its calls, closes the client and
    the cache file, and the command line ends with one line instead of a traceback."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def _main_with_status(args: Args) -> None:
    if main(args)["failed_rows"]:
        raise SystemExit(EXIT_FAILED_ROWS)


def cli(args: Args) -> None:
    """The command line: `main` with the exit statuses of the module docstring."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _interrupt)
    try:
        run_main(_main_with_status, args)
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        print(f"judge: stopped by {signal.Signals(signum).name}; every answer received is in the cache: re-run the "
              "same command to resume", file=sys.stderr)
        raise SystemExit(128 + signum) from None


CLI_DESCRIPTION = __doc__.split("\n\n")[0].replace("\n", " ") + "\n\nExit status:" + __doc__.split("Exit status:")[1].rstrip()


if __name__ == "__main__":
    import tyro

    cli(tyro.cli(Args, description=CLI_DESCRIPTION, use_underscores=True))
