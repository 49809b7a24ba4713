"""The judge (judge.py): the real `openai` client against a real HTTP server on 127.0.0.1, the authors' protocol
(J-1) and the both-orders protocol (J-2), retries, the verdict cache across a killed run, a hostile server (malformed
replies, trickled bodies, unparseable and huge answers, echoed keys, SIGTERM / SIGINT), the offline judges, and the
real GPT-4 verdicts of shared/data (640/1000)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO
from summarize_from_feedback_details import judge
from summarize_from_feedback_details.core import UserInputError
from summarize_from_feedback_details.judge import Args

SECRET = "sk-test-DO-NOT-WRITE-1f2e3d"
QUERY = "SUBREDDIT: r/relationships\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


# ----------------------------------------------------------------------------------------------
# A real OpenAI-compatible server: /v1/chat/completions on a free port, behaviour scripted per test
# ----------------------------------------------------------------------------------------------
def summaries(prompt: str) -> tuple[str, str]:
    """Summary A and Summary B of a judge prompt of either template."""
    match = re.search(r"Summary A:\n(.*?)\n\n(?:### )?Summary B:\n(.*?)\n\n", prompt, re.S)
    assert match, prompt
    return match.group(1), match.group(2)


def rule_judge(body: dict, attempt: int) -> tuple[int, str, float]:
    """Prefers the summary containing "good"; when both or neither do, it picks A (a position-biased judge).
    "MALFORMED" anywhere gets an answer without a verdict; "markdown" gets a decorated one."""
    a, b = summaries(body["messages"][-1]["content"])
    if "MALFORMED" in a + b:
        return 200, "Both summaries have merits and I cannot decide.", 0.0
    letter = "B" if ("good" in b and "good" not in a) else "A"
    if "markdown" in a + b:
        return 200, f'Comparison: Summary {letter} is clearer.\n\n**Preferred:** "{letter}".', 0.0
    return 200, f"Comparison: Summary {letter} is clearer.\nPreferred: {letter}", 0.0


class JudgeServer:
    """`ThreadingHTTPServer` in a thread; records every request (body and Authorization header), and counts the
    requests for a prompt whose answer it had already delivered in full (`reasked`).

    `decide(body, attempt)` returns (status, answer, delay) or (status, answer, delay, mode), mode one of
    `json` (a chat completion), `nonjson` (a 200 body that is not JSON), `nochoices` (JSON without `choices`),
    `trickle` (the answer sent a byte at a time over `trickle_seconds`), `drop` (the connection closed, no reply)."""

    def __init__(self, decide=rule_judge, trickle_seconds: float = 2.5):
        self.decide = decide
        self.trickle_seconds = trickle_seconds
        self.requests: list[dict] = []
        self.authorization: list[str | None] = []
        self.attempts: Counter = Counter()
        self.delivered: Counter = Counter()
        self.reasked = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    prompt = body["messages"][-1]["content"]
                    attempt = server.attempts[prompt]
                    server.attempts[prompt] += 1
                    server.reasked += server.delivered[prompt] > 0
                    server.requests.append(body)
                    server.authorization.append(self.headers.get("Authorization"))
                reply = (404, "unknown path", 0.0) if self.path != "/v1/chat/completions" else server.decide(body, attempt)
                status, content, delay = reply[:3]
                mode = reply[3] if len(reply) > 3 else "json"
                time.sleep(delay)
                if mode == "drop":
                    self.close_connection = True
                    return
                if status == 200:
                    payload = {
                        "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0,
                        "model": body["model"] + "-served",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split()),
                                  "total_tokens": len(prompt.split()) + len(content.split())},
                    }
                else:
                    payload = {"error": {"message": content, "type": "test_error", "code": None}}
                if mode == "nochoices":
                    del payload["choices"]
                data = b"<html><body>502 Bad Gateway</body></html>" if mode == "nonjson" else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    if mode == "trickle":
                        for i in range(len(data)):
                            self.wfile.write(data[i : i + 1])
                            time.sleep(server.trickle_seconds / len(data))
                    else:
                        self.wfile.write(data)
                    if status == 200 and mode in ("json", "trickle") and delay == 0:
                        with server.lock:
                            server.delivered[prompt] += 1
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_table(path: Path, rows: list[tuple[str, str]], title: str = "help") -> str:
    """A stage-like query_responses table: (response, reference) pairs on distinct posts."""
    table = pd.DataFrame({
        "query": [QUERY.format(title=f"{title} {i}", post=f"post number {i}.") for i in range(len(rows))],
        "reference": [reference for _, reference in rows],
        "response": [response for response, _ in rows],
        "response_token_len": [len(response.split()) for response, _ in rows],
        "has_eos": [True] * len(rows),
    })
    table.to_csv(path, index=False)
    return str(path)


def llm_args(server: JudgeServer, table: str, out: Path, **kwargs) -> Args:
    defaults = dict(table=table, base_url=server.url, output_dir=str(out), backoff_initial=0.01, backoff_max=0.05,
                    timeout=5.0)
    return Args(**{**defaults, **kwargs})


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return SECRET


def assert_secret_not_written(*folders: Path, secrets: tuple[str, ...] = (SECRET,)) -> None:
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                text = path.read_bytes().decode("utf-8", "replace")
                assert not [secret for secret in secrets if secret in text], path


# ----------------------------------------------------------------------------------------------
# Statistics and parsing, by hand
# ----------------------------------------------------------------------------------------------
def test_win_rate_wilson_interval_and_position_bias_by_hand():
    # 0.64 over 1000: bounds solve (0.64 - p)^2 = z^2 p (1 - p) / 1000 (worked by hand with the quadratic formula).
    low, high = judge.wilson_interval(0.64, 1000)
    assert low == pytest.approx(0.609766, abs=1e-6) and high == pytest.approx(0.669162, abs=1e-6)
    for bound in (low, high):
        assert (0.64 - bound) ** 2 == pytest.approx(judge.Z_95**2 * bound * (1 - bound) / 1000, rel=1e-9)
    # outcomes 1, 1, 0, 1/2 and one not counted: (1 + 1 + 0 + 0.5) / 4
    result = judge.win_rate([1.0, 1.0, 0.0, 0.5, math.nan])
    assert (result.rate, result.n) == (0.625, 4)
    assert (result.low, result.high) == pytest.approx((0.219427, 0.908101), abs=1e-6)
    assert judge.win_rate([math.nan]) is None
    assert judge.wilson_interval(0.0, 10)[0] == pytest.approx(0.0) and judge.wilson_interval(1.0, 10)[1] == pytest.approx(1.0)
    counts = judge.outcome_counts([1.0, 0.5, 0.0, 0.0, math.nan])
    assert (counts["wins"], counts["ties"], counts["losses"], counts["not_counted"], counts["n"]) == (1, 1, 2, 1, 4)
    # verdicts: policy shown first twice (picked once), second three times (picked once)
    bias = judge.position_bias([True, True, False, False, False], [True, False, False, False, True])
    # picked A: yes (policy in A, picked), no, yes (baseline in A), yes, no -> 3 of 5
    assert bias == {"first_position_rate": 0.6, "policy_win_rate_when_first": 0.5,
                    "policy_win_rate_when_second": pytest.approx(1 / 3), "n_first": 2, "n_second": 3}
    assert judge.both_orders_outcome("A", "B") == ("win", 1.0)
    assert judge.both_orders_outcome("B", "A") == ("loss", 0.0)
    assert judge.both_orders_outcome("A", "A") == ("tie", 0.5) and judge.both_orders_outcome("B", "B") == ("tie", 0.5)
    assert judge.both_orders_outcome("A", None)[0] == "parse_failure"


def test_robust_parsing_and_the_authors_parsing():
    robust = {
        "Comparison: B is better.\nPreferred: B": "B",
        'Comparison: x\n\n**Preferred:** "A".': "A",
        "Comparison: x\nPreferred: Summary B": "B",
        "comparison: x\npreferred:   [A]": "A",
        "Comparison: Preferred: B is wrong.\nPreferred: A": "A",  # the last marker counts
        "Summary A is more precise.\n\nB": "B",  # no marker: a last line that is only a letter
        "Comparison: x\nPreferred: A or B": None,
        'Comparison: x\nPreferred: <"A" or "B">': None,
        "Comparison: x\nPreferred: Both": None,
        "Comparison: x\nPreferred: TIE": None,
        "Comparison: x\nPreferred: a summary that is short": None,
        "I cannot decide.": None,
        "": None,
        None: None,
    }
    for answer, letter in robust.items():
        assert judge.parse_preference(answer) == letter, answer
    # Detail J-1: their split on the markers; only an exact letter naming the policy's slot wins
    assert judge.parse_paper("Comparison: A is precise.\nPreferred: A") == ("A is precise.", "A")
    assert judge.parse_paper("A is better.\nPreferred: A") is None
    assert judge.paper_outcome(0, "Comparison: ok\nPreferred: A")["win"] == 1.0  # policy shown as A
    assert judge.paper_outcome(1, "Comparison: ok\nPreferred: A")["win"] == 0.0  # policy shown as B
    assert judge.paper_outcome(1, "Comparison: ok\nPreferred: B")["win"] == 1.0
    assert judge.paper_outcome(0, 'Comparison: ok\nPreferred: "A"')["win"] == 0.0  # not exact: the baseline's
    assert judge.paper_outcome(0, "Comparison: ok\nPreferred: A.")["win"] == 0.0
    assert math.isnan(judge.paper_outcome(0, "Summary A.\nPreferred: A")["win"])  # no Comparison: dropped
    assert math.isnan(judge.paper_outcome(0, "Comparison:\nPreferred: A")["win"])  # empty comparison: dropped
    assert judge.redact_url("https://user:pw@example.com:8443/v1?api-key=abc") == "https://example.com:8443/v1"


def test_paper_prompt_text():
    """Detail J-1: the authors' prompt, character for character (their stray backslash included)."""
    prompt = judge.judge_prompt("  SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p\n\nTL;DR: ", " one {summary_b} ", "two<|endoftext|>")
    assert prompt == (
        "\nWhich of the following summaries does a better job of summarizing the most important points in the given "
        "forum post, without including unimportant or irrelevant details? Judge based on accuracy, coverage, and "
        "coherence.\n\n### Post:\nSUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p\n\nTL;DR:\n\n### Summary A:\none {summary_b}\n\n"
        "### Summary B:\ntwo\n\n### Instructions:\nFIRST provide a one-sentence comparison of the two summaries, "
        "explaining which \\\nyou prefer and why. SECOND, on a new line, state only \"A\" or \"B\" to indicate your "
        "choice. Your response should use the format:\nComparison: <one-sentence comparison and explanation>\n"
        "Preferred: <\"A\" or \"B\">\n"
    )
    dpo = judge.judge_prompt("post", "one", "two", "dpo")
    assert dpo.startswith("Which of the following summaries does a better job of summarizing the most important points "
                          "in the given forum post, without including unimportant or irrelevant details? A good summary "
                          "is both precise and concise.\n\nPost:\npost\n\nSummary A:\none\n\nSummary B:\ntwo\n\nFIRST")
    assert dpo.endswith('Comparison: <one-sentence comparison and explanation>\nPreferred: <"A" or "B">')


# ----------------------------------------------------------------------------------------------
# The protocols against the real client and server
# ----------------------------------------------------------------------------------------------
def paper_answers(body: dict, attempt: int) -> tuple[int, str, float]:
    """Answers by the kind written in the policy summary, naming the slot the policy was shown in."""
    a, b = summaries(body["messages"][-1]["content"])
    policy_slot, policy = ("A", a) if "POLICY" in a else ("B", b)
    other = "B" if policy_slot == "A" else "A"
    kind = policy.split()[1]
    answer = {
        "exact": f"Comparison: the policy is better.\nPreferred: {policy_slot}",
        "quoted": f'Comparison: the policy is better.\nPreferred: "{policy_slot}"',
        "baseline": f"Comparison: the reference is better.\nPreferred: {other}",
        "nomarker": f"Summary {policy_slot} is better.\nPreferred: {policy_slot}",
        "emptycomparison": f"Comparison:\nPreferred: {policy_slot}",
        "exact2": f"Comparison: the policy is better.\nPreferred: {policy_slot}",
    }[kind]
    return 200, answer, 0.0


def test_paper_protocol_prompt_order_and_counting(tmp_path, api_key):
    """Detail J-1: one seeded order per row, the authors' prompt and system message, no sampling parameters,
    exact-letter counting, parse failures dropped from the denominator."""
    kinds = ["exact", "quoted", "baseline", "nomarker", "emptycomparison", "exact2"]
    table = write_table(tmp_path / "t.csv", [(f"POLICY {kind} text", f"reference {i}") for i, kind in enumerate(kinds)])
    orders = judge.paper_orders(len(kinds), seed=7)
    assert orders == judge.paper_orders(len(kinds), seed=7) and 0 in orders and 1 in orders
    assert orders != judge.paper_orders(len(kinds), seed=8)
    with JudgeServer(paper_answers) as server:
        summary = judge.main(llm_args(server, table, tmp_path / "out", protocol="paper", seed=7, model="gpt-4"))
    assert len(server.requests) == len(kinds)
    by_policy = {}
    for body in server.requests:
        assert set(body) == {"model", "messages"} and body["model"] == "gpt-4"  # no temperature, no seed
        assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
        prompt = body["messages"][1]["content"]
        a, b = summaries(prompt)
        by_policy[a if "POLICY" in a else b] = (prompt, 0 if "POLICY" in a else 1)
    for i, kind in enumerate(kinds):
        prompt, shown = by_policy[f"POLICY {kind} text"]
        assert shown == orders[i]
        pair = (f"POLICY {kind} text", f"reference {i}")
        a, b = pair if orders[i] == 0 else pair[::-1]
        assert prompt == judge.judge_prompt(QUERY.format(title=f"help {i}", post=f"post number {i}."), a, b)
    judged = pd.read_parquet(tmp_path / "out" / "t_judged_gpt-4_paper.parquet")
    assert list(judged["shuffled_index"]) == orders
    # exact: win; quoted: counts for the reference; baseline: loss; nomarker / empty comparison: dropped; exact2: win
    assert judged["win"].tolist()[:3] == [1.0, 0.0, 0.0] and judged["win"].isna().tolist()[3:5] == [True, True]
    assert judged["win"].iloc[5] == 1.0
    assert (summary["n"], summary["wins"], summary["losses"], summary["not_counted"]) == (4, 2, 2, 2)
    assert summary["win_rate"] == 0.5 and (summary["ci_low"], summary["ci_high"]) == pytest.approx(judge.wilson_interval(0.5, 4))
    assert summary["parse_failures"] == 2 and summary["parse_failure_rate"] == pytest.approx(2 / 6)
    # counted rows 0, 1, 2, 5 of which 0 and 5 are wins; the split by the slot the seeded order gave the policy
    first = [i for i in (0, 1, 2, 5) if orders[i] == 0]
    second = [i for i in (0, 1, 2, 5) if orders[i] == 1]
    bias = summary["position_bias"]
    assert (bias["n_first"], bias["n_second"]) == (len(first), len(second))
    assert bias["policy_win_rate_when_first"] == (sum(i in (0, 5) for i in first) / len(first) if first else None)
    assert bias["policy_win_rate_when_second"] == (sum(i in (0, 5) for i in second) / len(second) if second else None)
    assert summary["served_models"] == ["gpt-4-served"] and summary["protocol"] == "paper"


def test_both_orders_win_rate_ties_failures_and_position_bias(tmp_path, api_key):
    """Detail J-2: both orders at temperature 0, a win only when both agree, ties and parse failures reported,
    position bias, tokens and cost; the key goes to the server and nowhere else."""
    rows = [
        ("a good one", "plain"),  # both orders pick the policy: win
        ("good two markdown", "plain"),  # win, answered as **Preferred:** "X".
        ("plain", "a good reference"),  # loss
        ("plain a", "plain b"),  # the judge picks A both times: tie
        ("good x", "good y"),  # tie
        ("MALFORMED", "plain"),  # no verdict in either order: parse failure
    ]
    table = write_table(tmp_path / "t.csv", rows)
    with JudgeServer() as server:
        summary = judge.main(llm_args(server, table, tmp_path / "out", price_input_per_million=0.5,
                                      price_output_per_million=1.5))
    assert len(server.requests) == 12
    assert all(body["temperature"] == 0.0 and body["model"] == "gpt-3.5-turbo-0125" for body in server.requests)
    assert server.authorization == [f"Bearer {SECRET}"] * 12
    judged = pd.read_parquet(tmp_path / "out" / "t_judged_gpt-3.5-turbo-0125_both-orders.parquet")
    assert judged["outcome"].tolist() == ["win", "win", "loss", "tie", "tie", "parse_failure"]
    assert judged["letter_policy_first"].tolist()[:5] == ["A", "A", "B", "A", "A"]
    assert judged["letter_policy_second"].tolist()[:5] == ["B", "B", "A", "A", "A"]
    # (2 wins + 2 ties / 2) / 5 counted pairs
    assert (summary["n"], summary["wins"], summary["ties"], summary["losses"]) == (5, 2, 2, 1)
    assert summary["win_rate"] == pytest.approx(0.6)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((0.230724, 0.882379), abs=1e-6)
    assert summary["parse_failures"] == 2 and summary["parse_failure_rate"] == pytest.approx(2 / 12)
    # 10 counted verdicts: A picked in 7; policy first won 4 of 5 (not in the loss), second 2 of 5 (wins only)
    bias = summary["position_bias"]
    assert bias["first_position_rate"] == pytest.approx(0.7)
    assert bias["policy_win_rate_when_first"] == pytest.approx(0.8) and bias["policy_win_rate_when_second"] == pytest.approx(0.4)
    assert bias["order_disagreement_rate"] == pytest.approx(0.4)
    prompt_tokens = sum(len(body["messages"][-1]["content"].split()) for body in server.requests)
    completion_tokens = sum(len(a.split()) for a in list(judged["answer_policy_first"]) + list(judged["answer_policy_second"]))
    assert summary["tokens"] == {"prompt": prompt_tokens, "completion": completion_tokens, "total": prompt_tokens + completion_tokens}
    assert summary["cost_usd"] == pytest.approx((prompt_tokens * 0.5 + completion_tokens * 1.5) / 1e6)
    assert summary["calls"] == {"cached": 0, "new": 12, "retries": 0}
    assert summary["base_url"] == server.url and summary["served_models"] == ["gpt-3.5-turbo-0125-served"]
    assert_secret_not_written(tmp_path)


def flaky(body: dict, attempt: int) -> tuple[int, str, float]:
    """Per prompt: a rate limit, a server error, an answer slower than the client's timeout, then the answer."""
    if attempt == 0:
        return 429, "rate limited", 0.0
    if attempt == 1:
        return 500, "server error", 0.0
    if attempt == 2:
        return 200, "Comparison: late.\nPreferred: A", 2.5
    return rule_judge(body, attempt)


def test_retries_on_rate_limit_server_error_and_timeout(tmp_path, api_key):
    table = write_table(tmp_path / "t.csv", [("a good one", "plain"), ("plain", "good ref")])
    with JudgeServer(flaky) as server:
        summary = judge.main(llm_args(server, table, tmp_path / "out", timeout=1.0, max_concurrency=4))
    assert len(server.requests) == 4 * 4  # 4 prompts x (429, 500, timeout, answer)
    assert summary["calls"] == {"cached": 0, "new": 4, "retries": 12}
    assert (summary["wins"], summary["losses"]) == (1, 1)
    # retries run out: the row fails, counted, and the run goes on; a refused key fails at once, without retries
    with JudgeServer(lambda body, attempt: (503, "overloaded", 0.0)) as server:
        failed = judge.main(llm_args(server, table, tmp_path / "out2", protocol="paper", max_retries=2, max_rows=1))
    assert len(server.requests) == 3  # one prompt: the first try and 2 retries
    assert (failed["failed_rows"], failed["failure_reasons"], failed["n"]) == (1, {"InternalServerError": 1}, 0)
    with JudgeServer(lambda body, attempt: (401, "bad key", 0.0)) as server:
        with pytest.raises(UserInputError, match="refused the API key"):
            judge.main(llm_args(server, table, tmp_path / "out3", protocol="paper", max_rows=1))
    assert len(server.requests) == 1


def test_interrupted_run_resumes_without_repeating_calls(tmp_path, monkeypatch):
    """A run killed (SIGKILL) mid-way keeps every answered verdict; the re-run asks only for the others, and a
    third run asks nothing. The subprocess finds the server through OPENAI_BASE_URL."""
    table = write_table(tmp_path / "t.csv", [(f"good {i}" if i % 2 else f"plain {i}", f"plain ref {i}") for i in range(5)])
    cache = tmp_path / "out" / "judge_cache.jsonl"
    release, lock = threading.Event(), threading.Lock()
    served = []

    def first_three_then_hang(body, attempt):
        with lock:
            served.append(1)
            hang = len(served) > 3
        if hang:  # the run is killed while these requests wait
            release.wait(60)
        return rule_judge(body, attempt)

    env = {**os.environ, "OPENAI_API_KEY": SECRET, "TOKENIZERS_PARALLELISM": "false"}
    with JudgeServer(first_three_then_hang) as server:
        env["OPENAI_BASE_URL"] = server.url
        process = subprocess.Popen(
            [sys.executable, "-m", "summarize_from_feedback_details.judge", "--table", table, "--output_dir",
             str(tmp_path / "out"), "--max_concurrency", "2"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline and not (cache.exists() and cache.read_text().count("\n") >= 3):
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.1)
        assert cache.read_text().count("\n") == 3
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        release.set()
        assert not list((tmp_path / "out").glob("*.summary.json"))  # a killed run writes no result
    with cache.open("a") as file:  # a torn line, as a kill during a write would leave
        file.write('{"key": "torn')
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with JudgeServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        summary = judge.main(Args(table=table, output_dir=str(tmp_path / "out"), backoff_initial=0.01))
        assert len(server.requests) == 10 - 3
        assert summary["calls"] == {"cached": 3, "new": 7, "retries": 0}
        again = judge.main(Args(table=table, output_dir=str(tmp_path / "out")))
        assert len(server.requests) == 7  # nothing asked twice
    assert again["calls"] == {"cached": 10, "new": 0, "retries": 0}
    assert (again["win_rate"], again["n"], again["tokens"]) == (summary["win_rate"], 5, summary["tokens"])
    assert summary["wins"] == 2 and summary["ties"] == 3  # "good" policies win; plain vs plain: position ties
    lines = cache.read_text().splitlines()
    assert len(lines) == 11 and sum(1 for line in lines if line.startswith('{"key": "torn')) == 1
    assert all(json.loads(line)["answer"] for line in lines if not line.startswith('{"key": "torn'))
    assert_secret_not_written(tmp_path)


# ----------------------------------------------------------------------------------------------
# A hostile server: malformed replies, trickled bodies, unparseable and huge answers, secrets, signals
# ----------------------------------------------------------------------------------------------
def bad_then_good(body: dict, attempt: int) -> tuple:
    """Per prompt: a body that is not JSON, JSON without choices, a dropped connection, a body trickled slower
    than the timeout, then the answer; a prompt of a "HOPELESS" row never gets a well-formed reply."""
    a, b = summaries(body["messages"][-1]["content"])
    if "HOPELESS" in a + b:
        return 200, "Comparison: x.\nPreferred: A", 0.0, "nochoices"
    if attempt < 4:
        return 200, "Comparison: x.\nPreferred: A", 0.0, ["nonjson", "nochoices", "drop", "trickle"][attempt]
    return rule_judge(body, attempt)


def test_bad_replies_are_retried_and_a_row_whose_tries_run_out_fails_alone(tmp_path, api_key, capsys):
    """A body that is not JSON, JSON without choices, a dropped connection and a body trickled over 8 s are each
    retried (the trickle dropped at the 1 s --timeout of the whole request); a row whose 5 tries all fail is
    counted as failed while the others are judged, the exit status is 3, and the re-run asks only that row."""
    table = write_table(tmp_path / "t.csv", [("HOPELESS", "plain"), ("a good one", "plain"), ("plain", "good ref")])
    start = time.time()
    with JudgeServer(bad_then_good, trickle_seconds=8.0) as server:
        with pytest.raises(SystemExit) as exit_status:
            judge._main_with_status(llm_args(server, table, tmp_path / "out", timeout=1.0, max_retries=4))
    seconds = time.time() - start
    assert exit_status.value.code == judge.EXIT_FAILED_ROWS == 3 and "\n3 some rows failed" in judge.CLI_DESCRIPTION
    assert "judge: 1 row failed after 5 tries; re-run the same command to retry only those" in capsys.readouterr().err
    assert len(server.requests) == 6 * 5 and server.reasked == 0
    assert seconds < 6.0  # the trickled replies were dropped after 1 s, not read to their last byte at 8 s
    summary = json.loads((tmp_path / "out" / "t_judged_gpt-3.5-turbo-0125_both-orders.summary.json").read_text())
    assert (summary["failed_rows"], summary["failed_requests"], summary["failure_reasons"]) == (1, 2, {"MalformedReply": 2})
    assert summary["calls"] == {"cached": 0, "new": 4, "retries": 6 * 4}
    assert (summary["n"], summary["wins"], summary["losses"], summary["not_counted"]) == (2, 1, 1, 1)
    judged = pd.read_parquet(tmp_path / "out" / "t_judged_gpt-3.5-turbo-0125_both-orders.parquet")
    assert judged["outcome"].tolist() == ["failed", "win", "loss"] and pd.isna(judged["answer_policy_first"][0])
    assert len((tmp_path / "out" / "judge_cache.jsonl").read_text().splitlines()) == 4  # failures are not cached
    with JudgeServer() as server:
        again = judge.main(llm_args(server, table, tmp_path / "out"))
    assert len(server.requests) == 2 and again["calls"] == {"cached": 4, "new": 2, "retries": 0}
    assert (again["failed_rows"], again["n"], again["wins"], again["losses"]) == (0, 3, 1, 1)


GARBLED = "\x00#@!~ Pr3f3rr3d ?? ~"
HUGE = "Comparison: " + "long " * 200_000 + "\nPreferred: A"  # 1 MB, its verdict at the end


def odd_answers(body: dict, attempt: int) -> tuple[int, str, float]:
    """First answers: empty ("EMPTY" rows), garbled ("GARBLED"); always 1 MB ("HUGE")."""
    a, b = summaries(body["messages"][-1]["content"])
    if attempt == 0 and "EMPTY" in a + b:
        return 200, "", 0.0
    if attempt == 0 and "GARBLED" in a + b:
        return 200, GARBLED, 0.0
    if "HUGE" in a + b:
        return 200, HUGE, 0.0
    return rule_judge(body, attempt)


def test_unparseable_answers_are_cached_as_parse_failures_and_huge_ones_cut(tmp_path, api_key):
    """An empty or garbled answer is paid once and cached as a parse failure with its raw text: a re-run asks
    nothing, --retry_parse_failures asks only those again. A 1 MB answer is cached cut to --max_answer_chars
    (its start and end kept, so its verdict still counts) with its length and a note."""
    table = write_table(tmp_path / "t.csv", [("EMPTY good", "plain"), ("GARBLED good", "plain"), ("HUGE", "plain"),
                                             ("a good one", "plain")])
    cache = tmp_path / "out" / "judge_cache.jsonl"
    with JudgeServer(odd_answers) as server:
        first = judge.main(llm_args(server, table, tmp_path / "out"))
        records = [json.loads(line) for line in cache.read_text().splitlines()]
        again = judge.main(llm_args(server, table, tmp_path / "out"))
        assert len(server.requests) == 8  # the re-run asked nothing
        retried = judge.main(llm_args(server, table, tmp_path / "out", retry_parse_failures=True))
        assert len(server.requests) == 8 + 4 and server.attempts.most_common(1)[0][1] == 2
    by_status = Counter(record["status"] for record in records)
    assert by_status == {"parse_failure": 4, "ok": 4}
    assert sorted(r["answer"] for r in records if r["status"] == "parse_failure") == ["", "", GARBLED, GARBLED]
    huge = [r for r in records if "note" in r]
    assert len(huge) == 2 and all(r["answer_chars"] == len(HUGE) and r["status"] == "ok" for r in huge)
    assert all(r["answer"].endswith("long \nPreferred: A") and len(r["answer"]) < 20_100 for r in huge)
    assert cache.stat().st_size < 100_000 and first["answers_cut"] == 2
    for summary in (first, again):
        assert (summary["parse_failures"], summary["n"], summary["failed_rows"]) == (4, 2, 0)
        assert (summary["wins"], summary["ties"]) == (1, 1)  # HUGE: A in both orders, a tie
    assert again["calls"] == {"cached": 8, "new": 0, "retries": 0}
    assert (retried["parse_failures"], retried["parse_failures_asked_again"], retried["n"], retried["wins"]) == (0, 4, 4, 3)
    assert retried["calls"] == {"cached": 4, "new": 4, "retries": 0}
    with pytest.raises(UserInputError, match="--max_answer_chars 10 keeps too little"):
        judge.main(Args(table=table, max_answer_chars=10))


MIX = [(0.10, "nonjson"), (0.10, "nochoices"), (0.05, "drop"), (0.05, "trickle"), (0.05, 429), (0.05, 503)]


def hostile(seed: int, modes: Counter):
    """A seeded mix of transient failures, drawn per (prompt, attempt): 10% bodies that are not JSON, 10% JSON
    without choices, 5% each dropped connections, trickled bodies, 429 and 503; otherwise the answer."""

    def decide(body: dict, attempt: int) -> tuple:
        draw = random.Random(f"{seed}:{body['messages'][-1]['content']}:{attempt}").random()
        for share, failure in MIX:
            if draw < share:
                modes[failure] += 1
                if isinstance(failure, int):
                    return failure, "hostile", 0.0
                return 200, "Comparison: x.\nPreferred: A", 0.0, failure
            draw -= share
        modes["answer"] += 1
        return rule_judge(body, attempt)

    return decide


def test_mixed_hostile_server_finishes_in_one_run_and_reasks_nothing(tmp_path, api_key):
    """20 rows (40 prompts) against the seeded mix: one invocation judges every row, no prompt is asked again
    after its answer was delivered, and a re-run asks nothing."""
    table = write_table(tmp_path / "t.csv", [(f"good {i}" if i % 3 else f"plain {i}", f"plain ref {i}") for i in range(20)])
    modes: Counter = Counter()
    with JudgeServer(hostile(seed=0, modes=modes), trickle_seconds=2.5) as server:
        summary = judge.main(llm_args(server, table, tmp_path / "out", timeout=1.0, max_concurrency=8))
        again = judge.main(llm_args(server, table, tmp_path / "out"))
    assert set(modes) == {"nonjson", "nochoices", "drop", "trickle", 429, 503, "answer"}
    assert modes["answer"] == 40 and len(server.attempts) == 40 and server.reasked == 0
    assert summary["failed_rows"] == 0 and (summary["calls"]["cached"], summary["calls"]["new"]) == (0, 40)
    assert summary["calls"]["retries"] >= len(server.requests) - 40  # a connection refused never reaches the log
    assert (summary["wins"], summary["ties"], summary["n"]) == (13, 7, 20)  # "good" policies win, plain vs plain ties
    assert again["calls"] == {"cached": 40, "new": 0, "retries": 0} and len(server.requests) == sum(modes.values())


def test_no_secret_reaches_any_file_or_output(tmp_path, api_key, capsys):
    """A key planted in every place a user can put one (the key's environment variable, the base URL's password
    and its query) and echoed back by the server reaches no output, cache, summary or printed line."""
    url_secret, query_secret = "pw-URL-SECRET-9a8b7c", "qs-QUERY-SECRET-6d5e4f"
    table = write_table(tmp_path / "t.csv", [("a good one", "plain"), ("ECHO", "plain"), ("HOPELESS", "plain")])

    def echo(body: dict, attempt: int) -> tuple[int, str, float]:
        a, b = summaries(body["messages"][-1]["content"])
        if "ECHO" in a + b:
            return 200, f"Comparison: your keys are {SECRET} and {url_secret}.\nPreferred: A", 0.0
        if "HOPELESS" in a + b:
            return 500, f"this key is wrong: {SECRET}", 0.0
        return rule_judge(body, attempt)

    with JudgeServer(echo) as server:
        base_url = server.url.replace("http://", f"http://judge-user:{url_secret}@")
        summary = judge.main(llm_args(server, table, tmp_path / "out", base_url=base_url, max_retries=1,
                                      cache_path=str(tmp_path / "cache" / "verdicts.jsonl")))
        with pytest.raises(UserInputError, match="answered 404") as refused:
            judge.main(llm_args(server, table, tmp_path / "out2", base_url=f"{server.url}?api_key={query_secret}"))
    assert summary["args"]["base_url"] == summary["base_url"] == server.url and summary["failed_rows"] == 1
    assert "***" in (tmp_path / "cache" / "verdicts.jsonl").read_text()  # the echoed keys, scrubbed
    printed = capsys.readouterr()
    for secret in (SECRET, url_secret, query_secret):
        assert secret not in printed.out + printed.err + str(refused.value)
    assert_secret_not_written(tmp_path / "out", tmp_path / "out2", tmp_path / "cache", secrets=(SECRET, url_secret, query_secret))


def test_sigterm_and_sigint_end_with_one_line_and_a_clean_cache(tmp_path):
    """SIGTERM and SIGINT while requests hang: exit status 143 / 130, one line, no traceback, the 4 answers
    received in the cache, every line whole. The server's URL (with a password) comes from OPENAI_BASE_URL."""
    table = write_table(tmp_path / "t.csv", [("good 0", "plain"), ("plain 1", "good"), ("HANG 2", "x"), ("HANG 3", "y")])
    release = threading.Event()
    url_secret = "pw-URL-SECRET-9a8b7c"

    def hang(body: dict, attempt: int) -> tuple[int, str, float]:
        if "HANG" in body["messages"][-1]["content"]:
            release.wait(60)
        return rule_judge(body, attempt)

    with JudgeServer(hang) as server:
        env = {**os.environ, "OPENAI_API_KEY": SECRET, "TOKENIZERS_PARALLELISM": "false",
               "OPENAI_BASE_URL": server.url.replace("http://", f"http://judge-user:{url_secret}@")}
        processes = {signum: subprocess.Popen(
            [sys.executable, "-m", "summarize_from_feedback_details.judge", "--table", table, "--output_dir",
             str(tmp_path / signum.name)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ) for signum in (signal.SIGTERM, signal.SIGINT)}
        deadline = time.time() + 120
        for signum, process in processes.items():
            cache = tmp_path / signum.name / "judge_cache.jsonl"
            while not (cache.exists() and cache.read_text().count("\n") >= 4):
                assert process.poll() is None and time.time() < deadline, process.communicate()
                time.sleep(0.05)
            process.send_signal(signum)
        outputs = {signum: process.communicate(timeout=60) for signum, process in processes.items()}
        release.set()
    for signum, (stdout, stderr) in outputs.items():
        assert processes[signum].returncode == 128 + signum, stderr
        assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == (
            f"judge: stopped by {signum.name}; every answer received is in the cache: re-run the same command to resume"), stderr
        assert not list((tmp_path / signum.name).glob("*.summary.json"))
        cache = judge.VerdictCache(tmp_path / signum.name / "judge_cache.jsonl")
        assert (len(cache.records), cache.skipped_lines) == (4, 0)
        assert SECRET not in stdout + stderr and url_secret not in stdout + stderr
    assert_secret_not_written(tmp_path, secrets=(SECRET, url_secret))


def test_missing_key_and_bad_input_fail_before_any_call(tmp_path, monkeypatch):
    table = write_table(tmp_path / "t.csv", [("a", "b")])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(UserInputError, match="set the environment variable OPENAI_API_KEY"):
        judge.main(Args(table=table, output_dir=str(tmp_path)))
    with pytest.raises(UserInputError, match="does not exist"):
        judge.main(Args(table=str(tmp_path / "missing.csv")))
    pd.DataFrame({"query": ["q"], "text": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(UserInputError, match=r"lacks the column\(s\) \['response'\]"):
        judge.main(Args(table=str(tmp_path / "bad.csv"), judge="gold"))
    with pytest.raises(UserInputError, match="needs --reward_model_path"):
        judge.main(Args(table=table, judge="reward_model"))
    result = subprocess.run([sys.executable, "-m", "summarize_from_feedback_details.judge", "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--protocol" in result.stdout and "--baseline_table" in result.stdout


# ----------------------------------------------------------------------------------------------
# Offline judges
# ----------------------------------------------------------------------------------------------
def test_gold_judge_by_hand_and_policy_vs_policy(tmp_path):
    """Gold utility of the embedded task (embedded.gold_utility), computed by hand for a post whose key facts are
    boyfriend (0.75), forgot my birthday (1.5), hurt (0.75), talk to them (1.0)."""
    post = "My boyfriend forgot my birthday. I feel hurt. Should I talk to them? We met at the gym."
    queries = [QUERY.format(title=f"need some advice {i}", post=post) for i in range(4)]
    rows = [
        ("my boyfriend forgot my birthday and i feel hurt.", "my boyfriend forgot my birthday."),  # 3.0 vs 2.25: win
        ("we met at the gym", "my boyfriend forgot my birthday."),  # -0.75 filler - 0.25 punctuation = -1.0: loss
        ("my boyfriend forgot my birthday.", "my boyfriend forgot my birthday!"),  # 2.25 vs 2.25: tie
        ("", "we met at the gym"),  # empty -2.0 vs -1.0: loss
    ]
    table = pd.DataFrame({"query": queries, "reference": [r for _, r in rows], "response": [p for p, _ in rows]})
    table.to_csv(tmp_path / "policy.csv", index=False)
    summary = judge.main(Args(table=str(tmp_path / "policy.csv"), judge="gold"))
    judged = pd.read_csv(tmp_path / "policy_judged_gold.csv", keep_default_na=False)
    assert judged["policy_gold_utility"].tolist() == [3.0, -1.0, 2.25, -2.0]
    assert judged["baseline_gold_utility"].tolist() == [2.25, 2.25, 2.25, -1.0]
    assert judged["outcome"].tolist() == ["win", "loss", "tie", "loss"]
    assert (summary["win_rate"], summary["n"], summary["ties"]) == (0.375, 4, 1)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((0.091899, 0.780573), abs=1e-6)
    # policy A vs policy B: joined on the query, not on the row order (B's rows reversed, one query only in B)
    other = pd.DataFrame({"query": [QUERY.format(title="x", post="y")] + queries[::-1],
                          "response": ["unmatched"] + [r for _, r in rows][::-1], "reference": ["r"] * 5})
    other.to_parquet(tmp_path / "other.parquet")
    versus = judge.main(Args(table=str(tmp_path / "policy.csv"), baseline_table=str(tmp_path / "other.parquet"),
                             judge="gold", output_name="versus"))
    judged = pd.read_parquet(tmp_path / "versus.parquet")
    assert judged["query"].tolist() == queries and judged["baseline_response"].tolist() == [r for _, r in rows]
    assert judged["outcome"].tolist() == ["win", "loss", "tie", "loss"] and versus["baseline"].endswith("other.parquet")


def test_reward_model_judge_scores_like_an_unpadded_forward(tmp_path, pythia_tokenizer):
    """--judge reward_model: a randomly initialised ScalarModel (Pythia tokenizer) scores each `query + " " +
    summary + EOS` in padded batches exactly as a forward pass over that single unpadded sequence does."""
    import torch
    from transformers import GPTNeoXConfig

    from summarize_from_feedback_details.modeling import ScalarModel, ScalarModelConfig
    from summarize_from_feedback_details.tldr_dataset import encode

    torch.manual_seed(0)
    backbone = GPTNeoXConfig(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=256)
    model = ScalarModel(ScalarModelConfig(base_config=backbone.to_dict())).eval()
    model.save_pretrained(tmp_path / "rm")
    pythia_tokenizer.save_pretrained(tmp_path / "rm")
    queries = [QUERY.format(title="short", post="hi."), QUERY.format(title="a much longer title here", post="one.\n\ntwo three four."),
               QUERY.format(title="t", post="p")]
    table = pd.DataFrame({"query": queries, "response": ["a summary", "x", "a longer summary of the post, with more words"],
                          "reference": ["the reference", "another reference here", "r"]})
    table.to_parquet(tmp_path / "t.parquet")
    summary = judge.main(Args(table=str(tmp_path / "t.parquet"), judge="reward_model", reward_model_path=str(tmp_path / "rm"),
                              rm_batch_size=2))
    judged = pd.read_parquet(tmp_path / "t_judged_reward_model.parquet")
    for column, texts in (("policy_rm_score", table["response"]), ("baseline_rm_score", table["reference"])):
        for query, text, score in zip(queries, texts, judged[column], strict=True):
            tokens = encode(pythia_tokenizer, query) + encode(pythia_tokenizer, " " + text + "<|endoftext|>")
            with torch.no_grad():
                expected = model(input_ids=torch.tensor([tokens]))[0, -1].item()
            assert score == pytest.approx(expected, abs=1e-4)
    wins = (judged["policy_rm_score"] > judged["baseline_rm_score"]).tolist()
    assert judged["win"].tolist() == [1.0 if w else 0.0 for w in wins] and summary["n"] == 3


# ----------------------------------------------------------------------------------------------
# The real GPT-4 verdicts (shared/data/tldr)
# ----------------------------------------------------------------------------------------------
def test_real_gpt4_verdicts_reproduce_640_and_the_position_split(shared_data):
    """OpenAI's 1.3B PPO vs the human references, 1,000 real GPT-4 verdicts: the authors' counting gives 640/1000;
    0.716 when the policy was Summary A, 0.558 as B; A picked 58.4% of the time. The 945 rows never judged (NaN
    explanation in the raw file) are not in the denominator."""
    verdicts = [json.loads(line) for line in (shared_data / "tldr" / "oai1b_vs_reference_gpt4_judgments.jsonl").read_text().splitlines()]
    raw = pd.read_csv(shared_data / "tldr" / "oai1b.csv_judged.csv")
    assert len(verdicts) == 1000 and raw["explanation"].notna().sum() == 1000 and len(raw) == 1945
    outcomes, shown_first = [], []
    for verdict in verdicts:
        answer = f"Comparison: {verdict['explanation']}\nPreferred: {verdict['preferred_letter']}"
        outcome = judge.paper_outcome(verdict["shuffled_index"], answer)
        assert outcome["preferred"] == {"policy": "policy", "reference": "baseline"}[verdict["preferred"]]
        assert outcome["preferred"] == {"ours": "policy", "reference": "baseline"}[raw["preferred"][verdict["row"]]]
        assert judge.parse_preference(answer) == verdict["preferred_letter"]
        outcomes.append(outcome["win"])
        shown_first.append(verdict["shuffled_index"] == 0)
    unjudged = [math.nan] * int(raw["explanation"].isna().sum())
    counts = judge.outcome_counts(outcomes + unjudged)
    assert (counts["wins"], counts["n"], counts["not_counted"], counts["win_rate"]) == (640, 1000, 945, 0.64)
    assert (counts["ci_low"], counts["ci_high"]) == pytest.approx((0.609766, 0.669162), abs=1e-6)
    bias = judge.position_bias(shown_first, [o == 1.0 for o in outcomes])
    assert (bias["n_first"], bias["n_second"]) == (518, 482)
    assert bias["policy_win_rate_when_first"] == pytest.approx(371 / 518) and round(371 / 518, 3) == 0.716
    assert bias["policy_win_rate_when_second"] == pytest.approx(269 / 482) and round(269 / 482, 3) == 0.558
    assert bias["first_position_rate"] == pytest.approx(0.584)
