"""The labelling web app: the real server as a subprocess on a free local port, driven by a real HTTP client
(http.client) and by headless Chromium; its labels, exported in OpenAI's comparisons schema, go through the data
stage and a short reward model run."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from conftest import REPO, run_module, subprocess_env
from summarize_from_feedback_details import label_server
from summarize_from_feedback_details.core import UserInputError

CHROMIUM = Path("/usr/bin/chromium")
QUERY = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def _table(folder: Path, n: int = 6) -> Path:
    """A query_responses table as a stage writes it: n posts, the policy's responses (one with its EOS) and references."""
    import pandas as pd

    posts = [{"subreddit": "relationships", "title": f"Question {k} about my roommate", "post": f"My roommate did thing {k}.\n\nWhat now?"}
             for k in range(n)]
    table = pd.DataFrame({"query": [QUERY.format(**p) for p in posts], "reference": [f"roommate did {k}" for k in range(n)],
                          "response": [f"my roommate did thing {k}, what now?" + ("<|endoftext|>" if k == 0 else "") for k in range(n)]})
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "query_responses_validation.csv", index=False)
    return folder / "query_responses_validation.csv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(db: Path, pairs: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "summarize_from_feedback_details.label_server", "--db", str(db),
                               "--pairs", str(pairs), "--port", str(port), *extra],
                              cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while True:
        try:
            if _call(port, "GET", "/label")[0] == 401:
                return server, port
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise AssertionError(f"the server did not start:\n{server.stdout.read()}") from None
            time.sleep(0.1)


def _stop(server: subprocess.Popen) -> None:
    server.kill()
    server.wait(10)
    server.stdout.close()


def _call(port: int, method: str, path: str, form: dict | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if form is not None else {}
        connection.request(method, path, body=urlencode(form) if form is not None else None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _served(page: str) -> str:
    return re.search(r'name="served" value="(\d+)"', page).group(1)


def _labels(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT served.labeller, served.pair_id, served.b_first, labels.chose_a, labels.confidence, "
                                  "labels.note FROM labels JOIN served ON served.id = labels.served_id ORDER BY 1, 2").fetchall()


def _label_all(port: int, token: str, position: str = "1", confidence: str = "7") -> int:
    """Label every pair served to this token, always picking the summary shown at `position`."""
    count = 0
    while True:
        status, page = _call(port, "GET", f"/label?token={token}")
        assert status == 200, page
        if 'name="served"' not in page:
            assert "no pair left" in page
            return count
        status, body = _call(port, "POST", "/label", {"token": token, "served": _served(page), "choice": position,
                                                      "confidence": confidence, "note": f"note {count}"})
        assert status == 303, body
        count += 1


def _tokens(db: Path, *names: str) -> list[str]:
    connection = label_server.open_db(db)
    try:
        return [label_server.add_labeller(connection, name) for name in names]
    finally:
        connection.close()


# ----------------------------------------------------------------------------------------------
# Units: hand-computed
# ----------------------------------------------------------------------------------------------
def test_query_split_comparison_and_agreement_by_hand(tmp_path):
    info = label_server.split_query(QUERY.format(subreddit="tifu", title="I broke it", post="Line one.\n\nLine two."))
    assert {k: info[k] for k in ("subreddit", "title", "post")} == {"subreddit": "tifu", "title": "I broke it",
                                                                   "post": "Line one.\n\nLine two."}
    with pytest.raises(UserInputError, match="not a TL;DR query"):
        label_server.split_query("Article:\nsome news\n\nTL;DR:\n")
    # B was shown first and the labeller picked A: A is the second summary shown, so choice 1
    row = {"info": json.dumps(info), "text_a": "policy says", "policy_a": "ppo", "text_b": "reference says",
           "policy_b": "reference", "b_first": 1, "chose_a": 1, "labeller": "alice", "confidence": 8, "note": ""}
    assert label_server.comparison(row, "train", "mine") == {
        "info": {**info, "site": None, "article": None},
        "summaries": [{"text": " reference says", "policy": "reference", "note": None},
                      {"text": " policy says", "policy": "ppo", "note": None}],
        "choice": 1, "worker": "alice", "batch": "mine", "split": "train", "extra": {"confidence": 8, "note": None}}
    assert label_server.comparison({**row, "b_first": 0}, "train", "mine")["choice"] == 0
    # a comparisons file is read back as pairs (its choice ignored), in the order of its summaries
    (tmp_path / "c.jsonl").write_text(json.dumps(label_server.comparison(row, "train", "mine")) + "\n")
    (pair,) = label_server.read_pairs(label_server.Args(pairs=str(tmp_path / "c.jsonl")))
    assert (pair["text_a"], pair["policy_a"], pair["text_b"], pair["policy_b"]) == ("reference says", "reference", "policy says", "ppo")
    assert pair["info"] == {k: info[k] for k in ("id", "subreddit", "title", "post")}
    # pair 1: a and b agree, c not (1 of 3 labeller pairs); pair 2: a and b agree; pair 3 has one label only
    picks = {1: {"a": True, "b": True, "c": False}, 2: {"a": False, "b": False}, 3: {"a": True}}
    assert label_server.labeller_agreement(picks) == {"all": {"agreement": 0.5, "n": 4}, "a vs b": {"agreement": 1.0, "n": 2},
                                                      "a vs c": {"agreement": 0.0, "n": 1}, "b vs c": {"agreement": 0.0, "n": 1}}


def test_agreement_with_judge_verdicts_by_hand(tmp_path):
    """Labels A, A, B on three pairs; judge.py's verdicts: policy wins, loses, ties. The tie is left out: 1 of 2
    agree; the labels picked the policy 2 of 2 times, the judge 1 of 2."""
    import pandas as pd

    db, table = tmp_path / "labels.sqlite", _table(tmp_path / "ppo", n=3)
    label_server.main(label_server.Args(db=str(db), add_labeller="alice"))
    connection = label_server.open_db(db)
    label_server.add_pairs(connection, label_server.read_pairs(label_server.Args(pairs=str(table))))
    for want_a in (True, True, False):
        pair = label_server.next_pair(connection, "alice", 1, __import__("random").Random(0))
        choice = "1" if want_a != bool(pair["b_first"]) else "2"
        label_server.save_label(connection, "alice", {"served": str(pair["served_id"]), "choice": choice, "confidence": "5"})
    connection.close()
    judged = pd.read_csv(table, keep_default_na=False).rename(columns={"reference": "baseline_response"})
    judged.assign(win=[1.0, 0.0, 0.5]).to_csv(tmp_path / "judged.csv", index=False)
    report = label_server.main(label_server.Args(db=str(db), agreement=True, judged_table=str(tmp_path / "judged.csv")))
    assert report["judge_agreement"] == {"table": str(tmp_path / "judged.csv"), "n": 2, "agreement": 0.5,
                                         "label_picks_policy": 1.0, "judge_picks_policy": 0.5}
    assert json.loads((tmp_path / "labels.agreement.json").read_text()) == report


def test_bad_cli_input_is_one_error(tmp_path):
    table = _table(tmp_path / "ppo")
    db = str(tmp_path / "labels.sqlite")
    cases = [
        (dict(pairs=str(tmp_path / "missing.csv")), "does not exist"),
        (dict(pairs=str(table), labels_per_pair=0), "--labels_per_pair must be >= 1"),
        (dict(export=str(tmp_path / "out")), "does not exist; serve and label first"),
        (dict(pairs=str(table), batch="cnndm0"), "CNN/DM batch"),
    ]
    import pandas as pd

    pd.DataFrame({"query": ["q"], "summary": ["s"]}).to_csv(tmp_path / "wrong.csv", index=False)
    cases.append((dict(pairs=str(tmp_path / "wrong.csv")), r"--pairs .*wrong.csv lacks the column\(s\) \['response', 'reference'\]"))
    empty = tmp_path / "empty" / "query_responses_validation.csv"  # the only response is an EOS: an empty summary
    empty.parent.mkdir()
    pd.DataFrame({"query": [QUERY.format(subreddit="a", title="b", post="c")], "reference": ["r"],
                  "response": ["<|endoftext|>"]}).to_csv(empty, index=False)
    cases.append((dict(pairs=str(empty)), "no pair with two non-empty summaries"))
    for fields, message in cases:
        with pytest.raises(UserInputError, match=message):
            label_server.main(label_server.Args(db=db, **fields))
    result = run_module("label_server", "--db", db, "--pairs", str(tmp_path / "wrong.csv"), check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "lacks the column(s)" in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------------
# The real server
# ----------------------------------------------------------------------------------------------
def test_two_labellers_at_once_every_label_stored(tmp_path):
    """alice and bob label at the same time, each pair for both (--labels_per_pair 2): 12 labels, each the summary
    shown first, i.e. A exactly when A was drawn first; then the agreement report sees 6 shared pairs."""
    db = tmp_path / "labels.sqlite"
    tokens = _tokens(db, "alice", "bob")
    server, port = _start(db, _table(tmp_path / "ppo"), "--labels_per_pair", "2")
    try:
        counts = [0, 0]

        def work(k: int) -> None:
            counts[k] = _label_all(port, tokens[k])

        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert counts == [6, 6]
        assert json.loads(_call(port, "GET", f"/progress?token={tokens[0]}")[1]) == {"labeller": "alice", "done": 6, "left": 0}
    finally:
        _stop(server)
    labels = _labels(db)
    assert [(name, pair) for name, pair, *_ in labels] == [(name, pair) for name in ("alice", "bob") for pair in range(1, 7)]
    assert all(chose_a == (not b_first) and confidence == 7 for _, _, b_first, chose_a, confidence, _ in labels)
    report = label_server.main(label_server.Args(db=str(db), agreement=True))
    assert report["labels"] == 12 and report["labeller_agreement"]["alice vs bob"]["n"] == 6


def test_bad_requests_get_4xx_and_change_nothing(tmp_path):
    db = tmp_path / "labels.sqlite"
    alice, bob = _tokens(db, "alice", "bob")
    server, port = _start(db, _table(tmp_path / "ppo", n=3))
    try:
        served = _served(_call(port, "GET", f"/label?token={alice}")[1])
        bobs = _served(_call(port, "GET", f"/label?token={bob}")[1])
        good = {"token": alice, "served": served, "choice": "2", "confidence": "9", "note": ""}
        assert _call(port, "POST", "/label", good)[0] == 303
        before = _labels(db)
        assert len(before) == 1
        refused = [
            ({**good, "token": ""}, 401),                       # no token
            ({**good, "token": "not-a-token"}, 403),            # unknown token
            ({**good, "served": bobs}, 404),                    # a pair served to someone else
            ({**good, "served": "999"}, 404),                   # a pair never served
            ({**good, "served": "1; DROP TABLE labels"}, 400),  # not an id
            ({**good, "choice": "3"}, 400),
            ({**good, "confidence": "0"}, 400),
            ({**good, "confidence": "10"}, 400),
            (good, 409),                                        # the same served pair submitted twice
        ]
        for form, status in refused:
            assert _call(port, "POST", "/label", form)[0] == status, form
        assert _call(port, "GET", "/label?token=not-a-token")[0] == 403
        assert _labels(db) == before
    finally:
        _stop(server)


def test_sigkill_loses_no_committed_label(tmp_path):
    """Three labels acknowledged, a fourth pair on screen, then SIGKILL: after a restart on the same db the three
    labels are there and the fourth pair comes back in the order it was first shown."""
    db, table = tmp_path / "labels.sqlite", _table(tmp_path / "ppo")
    (token,) = _tokens(db, "alice")
    server, port = _start(db, table, "--seed", "3")
    for k in range(3):
        page = _call(port, "GET", f"/label?token={token}")[1]
        form = {"token": token, "served": _served(page), "choice": "1", "confidence": str(k + 1)}
        assert _call(port, "POST", "/label", form)[0] == 303
    shown = _call(port, "GET", f"/label?token={token}")[1]
    os.kill(server.pid, signal.SIGKILL)
    server.wait(10)
    server.stdout.close()
    assert [confidence for *_, confidence, _ in _labels(db)] == [1, 2, 3]
    server, port = _start(db, table)  # the same table again adds no pair
    try:
        again = _call(port, "GET", f"/label?token={token}")[1]
        assert again == shown and "3 labelled, 3 to go" in again
    finally:
        _stop(server)
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 6


def test_browser_keyboard_labelling_and_screenshot(tmp_path):
    """Headless Chromium labels with the keyboard only (B, 8, Enter; then 1, 3, Enter) and takes a screenshot."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: .ci/run installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    db = tmp_path / "labels.sqlite"
    (token,) = _tokens(db, "alice")
    server, port = _start(db, _table(tmp_path / "ppo", n=3))
    screenshot = tmp_path / "label_server.png"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(f"http://127.0.0.1:{port}/?token={token}")
            assert "ppo" not in page.content() and "reference" not in page.content()  # no policy name shown
            page.keyboard.press("b")
            page.keyboard.press("8")
            page.screenshot(path=str(screenshot))
            page.keyboard.press("Enter")
            page.wait_for_selector("text=1 labelled, 2 to go")
            for key in ("1", "3", "Enter"):
                page.keyboard.press(key)
            page.wait_for_selector("text=2 labelled, 1 to go")
            browser.close()
    finally:
        _stop(server)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    labels = _labels(db)  # key B picks the summary shown second: A exactly when B was drawn first
    assert [(chose_a == bool(b_first), confidence) for _, _, b_first, chose_a, confidence, _ in labels] == [(True, 8), (False, 3)]


# ----------------------------------------------------------------------------------------------
# Export: the labels feed the data stage and the reward model
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_round_trips_through_data_stage_and_reward(sft_run, embedded_dir, tmp_path):
    """SFT samples vs references of the SFT run, labelled through the app's own functions (always the shorter
    summary, confidence 1-9 in turn), exported, processed by `tldr_dataset.py --preference_dataset` unchanged, and
    a reward model trained on them for 2 updates."""
    import datasets

    db = tmp_path / "labels.sqlite"
    table = sft_run / "eval_query_responses_validation.csv"
    label_server.main(label_server.Args(db=str(db), add_labeller="alice"))
    connection = label_server.open_db(db)
    assert label_server.add_pairs(connection, label_server.read_pairs(label_server.Args(pairs=str(table)))) >= 64
    rng = __import__("random").Random(0)
    labelled = 0
    while (pair := label_server.next_pair(connection, "alice", 1, rng)) is not None:
        shown = [pair["text_b"], pair["text_a"]] if pair["b_first"] else [pair["text_a"], pair["text_b"]]
        choice = "1" if len(shown[0]) <= len(shown[1]) else "2"
        label_server.save_label(connection, "alice", {"served": str(pair["served_id"]), "choice": choice,
                                                     "confidence": str(labelled % 9 + 1)})
        labelled += 1
    connection.close()
    export = tmp_path / "comparisons"
    counts = label_server.main(label_server.Args(db=str(db), export=str(export)))
    assert counts["train"] + counts["validation"] == labelled and counts["validation"] > 0
    rows = [json.loads(line) for line in (export / "train.jsonl").read_text().splitlines()]
    assert {row["worker"] for row in rows} == {"alice"} and {row["summaries"][0]["policy"] for row in rows} == {"sft", "reference"}
    chosen = [row["summaries"][row["choice"]]["text"] for row in rows]
    assert all(len(c) <= len(row["summaries"][1 - row["choice"]]["text"]) for c, row in zip(chosen, rows, strict=True))

    sft_dir = tmp_path / "sft_data"  # a small SFT dataset from the same posts: the data stage needs one
    sft_rows = [{"id": row["info"]["id"], "subreddit": row["info"]["subreddit"], "title": row["info"]["title"],
                 "post": row["info"]["post"], "summary": row["summaries"][0]["text"].strip()} for row in rows]
    sft_dir.mkdir()
    for split, part in (("train", sft_rows[:-4]), ("validation", sft_rows[-4:]), ("test", [])):
        (sft_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    data = tmp_path / "data"
    run_module("tldr_dataset", "embedded", "--embedded_dir", str(embedded_dir), "--sft_dataset", str(sft_dir),
               "--preference_dataset", str(export), "--output_dir", str(data), "--no-figures",
               "--no-check_length_correctness")  # Detail 4 measures maxima: a few own labels are shorter
    processed = datasets.load_from_disk(str(data / "preference"))["train"]
    assert len(processed) == counts["train"]
    assert processed[0]["extra"]["confidence"] == rows[0]["extra"]["confidence"]
    run_module("reward", "embedded", "--sft_model_path", str(sft_run / "model"), "--dataset", str(data),
               "--output_dir", str(tmp_path / "runs"), "--run_name", "rm_own_labels", "--total_episodes", "64",
               "--normalization_samples", "32", "--max_eval_samples", "32")
    metrics = json.loads((tmp_path / "runs" / "rm_own_labels" / "metrics.json").read_text())
    assert metrics["num_updates"] == 2 and 0 <= metrics["eval/accuracy/batch/label_server"] <= 1
    assert {key for key in metrics if key.startswith("eval/accuracy/confidence/")}  # the labellers' confidence came through
