"""Label server: people compare two summaries of the same post in a browser; the labels are written in OpenAI's
comparisons schema, so they feed `tldr_dataset.py --preference_dataset`, then `reward.py` and `dpo.py`.

    python -m summarize_from_feedback_details.label_server --db labels.sqlite --add_labeller alice   # prints her token
    python -m summarize_from_feedback_details.label_server --db labels.sqlite \\
        --pairs runs/ppo_embedded/query_responses_validation.csv                    # serve: policy vs reference
    python -m summarize_from_feedback_details.label_server --db labels.sqlite --pairs <ppo table> \\
        --baseline_table <sft table>                                                # policy A vs policy B
    python -m summarize_from_feedback_details.label_server --db labels.sqlite --pairs comparisons/train.jsonl
    python -m summarize_from_feedback_details.label_server --db labels.sqlite --export labelled/   # train/validation.jsonl
    python -m summarize_from_feedback_details.label_server --db labels.sqlite --agreement --judged_table <judge.py csv>

A labeller opens http://127.0.0.1:8000/?token=<token> and labels with the keyboard: 1 / 2 (or A / B) picks a
summary, then a digit 1-9 gives the confidence (OpenAI's scale), Enter submits. The two summaries come in a random
order drawn once per (pair, labeller) and stored; policy names are never shown. Pairs are read the way `judge.py`
pairs them (its `load_pairs`), or from an OpenAI-schema comparisons file (`.jsonl` / `.json`; its choices ignored).

Storage is one SQLite file in WAL mode: the pairs, the labellers (a SHA-256 of each token, never the token), the
order each labeller was shown (`served`) and the labels. A label is committed before the next pair is served, so a
server killed at any moment loses no label it acknowledged; restarting it on the same --db goes on where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from summarize_from_feedback_details.core import (
    CNNDM_BATCHES,
    UserInputError,
    atomic_directory,
    run_main,
    write_json,
    write_text,
)

CONFIDENCE_RANGE = range(1, 10)
"""OpenAI's labellers gave a confidence of 1-9 with each comparison (`extra.confidence`)"""
QUERY_PATTERN = re.compile(r"^SUBREDDIT: r/(?P<subreddit>.*?)\n\nTITLE: (?P<title>.*?)\n\nPOST: (?P<post>.*)\n\nTL;DR:\s*$", re.S)
"""the inverse of tldr_dataset.TLDR_QUERY_FORMAT: a stage table's query back to subreddit, title and (truncated) post"""


@dataclass
class Args:
    db: str = "labels.sqlite"
    """the SQLite file holding pairs, labellers, served orders and labels (created on first use)"""
    pairs: str | None = None
    """serve: a `query_responses_{split}.csv|parquet` table a stage wrote (its responses vs its references, or vs
    --baseline_table), or an OpenAI-schema comparisons file (.jsonl / .json); added to the db, duplicates skipped"""
    baseline_table: str | None = None
    """another policy's table of the same split: its responses replace the references (joined as judge.py joins)"""
    policy_name: str | None = None
    """the policy name recorded for --pairs' responses; None: the name of the table's folder (e.g. `ppo`)"""
    baseline_name: str | None = None
    """the name recorded for the baseline; None: `reference`, or the folder name of --baseline_table"""
    max_pairs: int | None = None
    """add only the first N pairs of --pairs; None: all"""
    labels_per_pair: int = 1
    """how many different labellers are served each pair (>= 2 gives labeller-labeller agreement)"""
    host: str = "127.0.0.1"
    """the address to listen on; 127.0.0.1 serves this machine only"""
    port: int = 8000
    """the port to listen on"""
    seed: int | None = None
    """seeds the order in which the two summaries are shown; None: a fresh random order"""
    add_labeller: str | None = None
    """add a labeller of this name (or give them a new token) and print the token; nothing is served"""
    export: str | None = None
    """write every label to this directory as `train.jsonl` and `validation.jsonl` in OpenAI's comparisons schema
    (what `tldr_dataset.py --preference_dataset` reads); nothing is served"""
    validation_fraction: float = 0.2
    """--export: the share of posts whose labels go to `validation.jsonl` (chosen by a hash of the post, stable)"""
    batch: str = "label_server"
    """--export: the `batch` name of every comparison (not a CNN/DM batch)"""
    agreement: bool = False
    """print and write (`<db>.agreement.json`) the labeller-labeller agreement on shared pairs and, with
    --judged_table, the agreement of the labels with judge.py's verdicts on the same pairs; nothing is served"""
    judged_table: str | None = None
    """--agreement: a judged table judge.py wrote (columns query, response, baseline_response, win)"""


# ----------------------------------------------------------------------------------------------
# Pairs: from a stage table (paired by judge.py) or from a comparisons file
# ----------------------------------------------------------------------------------------------
def split_query(query: str) -> dict[str, str]:
    """A stage table's query (`SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:`) as OpenAI's `info`."""
    match = QUERY_PATTERN.match(query.strip())
    if match is None:
        raise UserInputError(f"the query {query[:80]!r}... is not a TL;DR query (SUBREDDIT / TITLE / POST / TL;DR:); "
                             "pass a query_responses table of the TL;DR task")
    info = {name: match[name].strip() for name in ("subreddit", "title", "post")}
    return {"id": "q" + hashlib.sha256(query.strip().encode()).hexdigest()[:16], **info}


def pair_key(info: dict[str, Any], text_a: str, text_b: str) -> str:
    """The identity of a pair: the post and both summaries (the same pair added twice is one pair)."""
    return hashlib.sha256(json.dumps([info.get("post"), text_a.strip(), text_b.strip()]).encode()).hexdigest()


def pairs_from_table(args: Args) -> list[dict[str, Any]]:
    from summarize_from_feedback_details import judge

    # judge.py's checks, named as this command's flag; then its pairing (it reads the table again: a small cost)
    judge._require(judge.read_table(args.pairs, "--pairs"), ["query", "response", *([] if args.baseline_table else ["reference"])],
                   f"--pairs {args.pairs}")
    table = judge.load_pairs(judge.Args(table=args.pairs, baseline_table=args.baseline_table, max_rows=args.max_pairs))
    policy = args.policy_name or Path(args.pairs).resolve().parent.name
    baseline = args.baseline_name or (Path(args.baseline_table).resolve().parent.name if args.baseline_table else "reference")
    if policy == baseline:
        raise UserInputError(f"the policy and the baseline are both named {policy!r}; give --policy_name / --baseline_name")
    return [{"info": split_query(row.query), "text_a": judge.clean_summary(row.response), "policy_a": policy,
             "text_b": judge.clean_summary(row.baseline_response), "policy_b": baseline, "query": row.query}
            for row in table.itertuples()]


def pairs_from_comparisons(path: Path, max_pairs: int | None) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"--pairs {path} is not OpenAI-schema comparisons json/jsonl ({error}); fix the file") from None
    pairs = []
    for index, row in enumerate(rows[:max_pairs]):
        try:
            info = {name: row["info"][name] for name in ("id", "subreddit", "title", "post")}
            (a, b) = row["summaries"]
            texts = [str(a["text"]), str(b["text"])]
            pairs.append({"info": info, "text_a": texts[0].strip(), "policy_a": str(a["policy"]), "text_b": texts[1].strip(),
                          "policy_b": str(b["policy"]), "query": None})
        except (KeyError, TypeError, ValueError):
            raise UserInputError(f"--pairs {path} row {index} lacks info.id/subreddit/title/post or two summaries with "
                                 "text and policy (OpenAI's comparisons schema); fix or drop the row") from None
    return pairs


def read_pairs(args: Args) -> list[dict[str, Any]]:
    """The pairs of --pairs, checked before the server starts."""
    path = Path(args.pairs)
    if not path.is_file():
        raise UserInputError(f"--pairs {args.pairs!r} does not exist; pass a query_responses table (.csv/.parquet) or a "
                             "comparisons file (.jsonl/.json)")
    if path.suffix in (".jsonl", ".json"):
        if args.baseline_table:
            raise UserInputError("--baseline_table pairs a query_responses table; a comparisons file already holds two summaries")
        pairs = pairs_from_comparisons(path, args.max_pairs)
    else:
        pairs = pairs_from_table(args)
    # the data stage refuses a comparison with an empty summary: such a pair is never served
    empty = sum(not (p["text_a"] and p["text_b"]) for p in pairs)
    if empty:
        print(f"label_server: {empty} pairs of --pairs have an empty summary; left out")
        pairs = [p for p in pairs if p["text_a"] and p["text_b"]]
    if not pairs:
        raise UserInputError(f"--pairs {args.pairs} holds no pair with two non-empty summaries")
    return pairs


# ----------------------------------------------------------------------------------------------
# Storage: SQLite in WAL mode
# ----------------------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, info TEXT NOT NULL, query TEXT,
    text_a TEXT NOT NULL, policy_a TEXT NOT NULL, text_b TEXT NOT NULL, policy_b TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labellers (name TEXT PRIMARY KEY, token_sha256 TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS served (id INTEGER PRIMARY KEY, pair_id INTEGER NOT NULL REFERENCES pairs(id),
    labeller TEXT NOT NULL REFERENCES labellers(name), b_first INTEGER NOT NULL, served_at REAL NOT NULL,
    UNIQUE (pair_id, labeller));
CREATE TABLE IF NOT EXISTS labels (served_id INTEGER PRIMARY KEY REFERENCES served(id), chose_a INTEGER NOT NULL,
    confidence INTEGER NOT NULL CHECK (confidence BETWEEN 1 AND 9), note TEXT NOT NULL, labelled_at REAL NOT NULL);
"""


def connect(db: str | Path) -> sqlite3.Connection:
    connection = sqlite3.connect(db, timeout=30, isolation_level=None)  # explicit BEGIN / COMMIT below
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")  # a committed label survives a power cut too, not only a kill
    connection.execute("PRAGMA foreign_keys=ON")
    return connection


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT: one writer at a time, so two labellers never take the same last pair."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def open_db(db: str | Path) -> sqlite3.Connection:
    path = Path(db)
    if not path.parent.is_dir():
        raise UserInputError(f"--db {db}: the folder {path.parent} does not exist; create it or pass another path")
    connection = connect(path)
    connection.executescript(SCHEMA)
    return connection


def add_pairs(connection: sqlite3.Connection, pairs: list[dict[str, Any]]) -> int:
    """Insert the pairs the db does not hold yet; returns how many were new."""
    with transaction(connection):
        before = connection.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
        connection.executemany(
            "INSERT OR IGNORE INTO pairs (key, info, query, text_a, policy_a, text_b, policy_b) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(pair_key(p["info"], p["text_a"], p["text_b"]), json.dumps(p["info"]), p["query"], p["text_a"], p["policy_a"],
              p["text_b"], p["policy_b"]) for p in pairs])
        return connection.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] - before


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_labeller(connection: sqlite3.Connection, name: str) -> str:
    """A new token for `name` (a new labeller, or a lost token replaced); only its hash is stored."""
    if not re.fullmatch(r"[\w.@-]{1,64}", name):
        raise UserInputError(f"--add_labeller {name!r}: use 1-64 letters, digits, '_', '-', '.' or '@'")
    token = secrets.token_urlsafe(24)
    with transaction(connection):
        connection.execute("INSERT INTO labellers (name, token_sha256) VALUES (?, ?) "
                           "ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256", (name, token_hash(token)))
    return token


def labeller_of(connection: sqlite3.Connection, token: str | None) -> str | None:
    if not token:
        return None
    row = connection.execute("SELECT name FROM labellers WHERE token_sha256 = ?", (token_hash(token),)).fetchone()
    return row["name"] if row else None


def next_pair(connection: sqlite3.Connection, labeller: str, labels_per_pair: int, rng: random.Random) -> sqlite3.Row | None:
    """The pair this labeller sees next: the one served to them and not labelled yet, else the first pair served to
    fewer than --labels_per_pair labellers and never to them, in a random order drawn now and stored."""
    open_served = ("SELECT served.id FROM served LEFT JOIN labels ON labels.served_id = served.id "
                   "WHERE served.labeller = ? AND labels.served_id IS NULL ORDER BY served.id LIMIT 1")
    with transaction(connection):
        row = connection.execute(open_served, (labeller,)).fetchone()
        if row is None:
            pair = connection.execute(
                "SELECT pairs.id FROM pairs LEFT JOIN served ON served.pair_id = pairs.id GROUP BY pairs.id "
                "HAVING COUNT(served.id) < ? AND SUM(served.labeller = ?) IS NOT 1 ORDER BY pairs.id LIMIT 1",
                (labels_per_pair, labeller)).fetchone()
            if pair is None:
                return None
            connection.execute("INSERT INTO served (pair_id, labeller, b_first, served_at) VALUES (?, ?, ?, ?)",
                               (pair["id"], labeller, rng.random() < 0.5, time.time()))
            row = connection.execute(open_served, (labeller,)).fetchone()
    return connection.execute("SELECT served.id AS served_id, served.b_first, pairs.* FROM served JOIN pairs "
                              "ON pairs.id = served.pair_id WHERE served.id = ?", (row["id"],)).fetchone()


def progress(connection: sqlite3.Connection, labeller: str, labels_per_pair: int) -> dict[str, int]:
    done = connection.execute("SELECT COUNT(*) FROM labels JOIN served ON served.id = labels.served_id "
                              "WHERE served.labeller = ?", (labeller,)).fetchone()[0]
    left = connection.execute(
        "SELECT COUNT(*) FROM (SELECT pairs.id FROM pairs LEFT JOIN served ON served.pair_id = pairs.id GROUP BY pairs.id "
        "HAVING COUNT(served.id) < ? AND SUM(served.labeller = ?) IS NOT 1)", (labels_per_pair, labeller)).fetchone()[0]
    return {"done": done, "left": left}


class LabelRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_label(form: dict[str, str]) -> tuple[int, int, int, str]:
    """(served id, shown position 1/2, confidence, note) of a submitted form; 400 when a field is malformed."""
    try:
        served_id = int(form.get("served", ""))
    except ValueError:
        raise LabelRefused(400, "'served' must be the id of the pair you were served") from None
    if form.get("choice") not in ("1", "2"):
        raise LabelRefused(400, "'choice' must be 1 or 2 (the summary you prefer)")
    confidence = form.get("confidence", "")
    if not (confidence.isdigit() and int(confidence) in CONFIDENCE_RANGE):
        raise LabelRefused(400, f"'confidence' must be an integer 1-9, got {confidence!r}")
    note = form.get("note", "")
    if len(note) > 2000:
        raise LabelRefused(400, "'note' is longer than 2000 characters")
    return served_id, int(form["choice"]), int(confidence), note.strip()


def save_label(connection: sqlite3.Connection, labeller: str, form: dict[str, str]) -> None:
    """Commit one label, or refuse it (LabelRefused) without changing anything."""
    served_id, shown, confidence, note = parse_label(form)
    with transaction(connection):
        served = connection.execute("SELECT b_first FROM served WHERE id = ? AND labeller = ?", (served_id, labeller)).fetchone()
        if served is None:
            raise LabelRefused(404, f"no pair {served_id} was served to you")
        if connection.execute("SELECT 1 FROM labels WHERE served_id = ?", (served_id,)).fetchone():
            raise LabelRefused(409, f"pair {served_id} is already labelled")
        chose_a = (shown == 1) != bool(served["b_first"])  # shown first is A unless B was drawn first
        connection.execute("INSERT INTO labels (served_id, chose_a, confidence, note, labelled_at) VALUES (?, ?, ?, ?, ?)",
                           (served_id, chose_a, confidence, note, time.time()))


# ----------------------------------------------------------------------------------------------
# The web app
# ----------------------------------------------------------------------------------------------
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Which summary is better?</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
header { display: flex; justify-content: space-between; color: #555; }
.post { white-space: pre-wrap; background: #f6f6f6; padding: .8rem 1rem; border-radius: 6px; line-height: 1.45; }
.summaries { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin: 1rem 0; }
label.summary { display: block; border: 2px solid #ccc; border-radius: 6px; padding: .8rem 1rem; cursor: pointer; }
label.summary:has(input:checked) { border-color: #1a7f37; background: #eefbf1; }
.confidence label { margin-right: .6rem; }
.keys { color: #666; font-size: .9rem; }
button { font-size: 1rem; padding: .4rem 1.4rem; }
</style></head><body>
<header><span>Labeller <b>{{ labeller }}</b></span><span id="progress">{{ done }} labelled, {{ left }} to go</span></header>
{% if pair is none %}
<h2>All done: no pair left for you. Thank you!</h2>
{% else %}
<h3>r/{{ info.subreddit }}: {{ info.title }}</h3>
<div class="post">{{ info.post }}</div>
<form method="post" action="/label" id="label">
<input type="hidden" name="served" value="{{ pair.served_id }}">
<div class="summaries">
{% for text in shown %}
<label class="summary"><input type="radio" name="choice" value="{{ loop.index }}" required>
<b>Summary {{ loop.index }}</b> <span class="keys">(key {{ loop.index }} or {{ "AB"[loop.index0] }})</span>
<p>{{ text }}</p></label>
{% endfor %}
</div>
<div class="confidence">Confidence that it is better (1 = a guess, 9 = certain):
{% for c in range(1, 10) %}<label><input type="radio" name="confidence" value="{{ c }}" required>{{ c }}</label>{% endfor %}
</div>
<p><input type="text" name="note" placeholder="optional note" size="60" maxlength="2000"> <button type="submit">Submit (Enter)</button></p>
<p class="keys">Keys: 1 / 2 or A / B pick a summary, then 1-9 the confidence, Enter submits; Esc leaves the note field.</p>
</form>
<script>
const form = document.getElementById("label");
document.addEventListener("keydown", (event) => {
  if (event.target.name === "note") { if (event.key === "Escape") event.target.blur(); return; }
  const key = event.key.toUpperCase(), picked = form.querySelector("input[name=choice]:checked");
  const pick = {"A": "1", "B": "2"}[key] || (!picked && (key === "1" || key === "2") ? key : null);
  if (pick) { form.querySelector(`input[name=choice][value="${pick}"]`).checked = true; }
  else if (picked && /^[1-9]$/.test(key)) { form.querySelector(`input[name=confidence][value="${key}"]`).checked = true; }
  else if (key === "ENTER") { event.preventDefault(); form.requestSubmit(); }
  else return;
  event.preventDefault();
});
</script>
{% endif %}
</body></html>
"""


def make_app(db: str | Path, labels_per_pair: int, seed: int | None = None) -> Any:
    from flask import Flask, abort, g, redirect, render_template_string, request

    app = Flask(__name__)
    rng = random.Random(seed)

    def database() -> sqlite3.Connection:
        if "db" not in g:
            g.db = connect(db)
        return g.db

    @app.teardown_appcontext
    def close(_: Any) -> None:
        if "db" in g:
            g.db.close()

    def labeller() -> str:
        token = request.form.get("token") or request.args.get("token") or request.cookies.get("token")
        name = labeller_of(database(), token)
        if name is None:
            abort(401 if not token else 403, description="a valid labeller token is needed: open /?token=<your token>")
        return name

    @app.get("/")
    def index() -> Any:
        labeller()
        response = redirect("/label", 303)
        if "token" in request.args:  # the link a labeller got: remember the token for the pages that follow
            response.set_cookie("token", request.args["token"], httponly=True, samesite="Strict")
        return response

    @app.get("/label")
    def show() -> Any:
        name = labeller()
        pair = next_pair(database(), name, labels_per_pair, rng)
        context: dict[str, Any] = {"labeller": name, "pair": pair, **progress(database(), name, labels_per_pair)}
        if pair is not None:
            context["info"] = json.loads(pair["info"])
            context["shown"] = [pair["text_b"], pair["text_a"]] if pair["b_first"] else [pair["text_a"], pair["text_b"]]
            context["left"] += 1  # the pair on the page
        return render_template_string(PAGE, **context)

    @app.post("/label")
    def submit() -> Any:
        name = labeller()
        try:
            save_label(database(), name, request.form.to_dict())
        except LabelRefused as refused:
            return {"error": str(refused)}, refused.status
        return redirect("/label", 303)

    @app.get("/progress")
    def progress_json() -> Any:
        name = labeller()
        return {"labeller": name, **progress(database(), name, labels_per_pair)}

    return app


# ----------------------------------------------------------------------------------------------
# Export and agreement
# ----------------------------------------------------------------------------------------------
def labelled_rows(connection: sqlite3.Connection) -> list[sqlite3.Row]:
    return connection.execute(
        "SELECT labels.*, served.labeller, served.b_first, served.pair_id, pairs.info, pairs.query, pairs.text_a, pairs.policy_a, "
        "pairs.text_b, pairs.policy_b FROM labels JOIN served ON served.id = labels.served_id JOIN pairs ON pairs.id = served.pair_id "
        "ORDER BY labels.labelled_at, labels.served_id").fetchall()


def comparison(row: sqlite3.Row, split: str, batch: str) -> dict[str, Any]:
    """One label in OpenAI's comparisons schema: the summaries in the order the labeller saw them, `choice` the
    index of the preferred one, each text with OpenAI's leading space."""
    shown = [("b", row["text_b"], row["policy_b"]), ("a", row["text_a"], row["policy_a"])]
    if not row["b_first"]:
        shown.reverse()
    chosen = "a" if row["chose_a"] else "b"
    return {"info": {**json.loads(row["info"]), "site": None, "article": None},
            "summaries": [{"text": " " + text, "policy": policy, "note": None} for _, text, policy in shown],
            "choice": [name for name, _, _ in shown].index(chosen), "worker": row["labeller"], "batch": batch,
            "split": split, "extra": {"confidence": row["confidence"], "note": row["note"] or None}}


def validation_post(post_id: str, fraction: float) -> bool:
    """Whether a post's labels go to validation: a stable hash of its id (all labels of a post in one split)."""
    return int(hashlib.sha256(post_id.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def export(connection: sqlite3.Connection, out_dir: str | Path, fraction: float, batch: str) -> dict[str, int]:
    rows = labelled_rows(connection)
    if not rows:
        raise UserInputError("--export: the db holds no label yet; label some pairs first")
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for row in rows:
        split = "validation" if validation_post(json.loads(row["info"])["id"], fraction) else "train"
        splits[split].append(json.dumps(comparison(row, split, batch)) + "\n")
    if not splits["train"]:
        raise UserInputError(f"--export: all {len(rows)} labels fell in validation (--validation_fraction {fraction}); "
                             "lower it or label more posts: the stages train on `train`")
    with atomic_directory(out_dir) as tmp:
        for split, lines in splits.items():
            write_text(tmp / f"{split}.jsonl", "".join(lines))
    return {split: len(lines) for split, lines in splits.items()}


def labeller_agreement(picks: dict[int, dict[str, bool]]) -> dict[str, Any]:
    """Over the pairs labelled by two or more labellers: the share of labeller pairs that picked the same summary,
    overall and for each two labellers. `picks`: pair id -> labeller -> chose A."""
    same: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for by_labeller in picks.values():
        for (one, a), (two, b) in combinations(sorted(by_labeller.items()), 2):
            for key in ("all", f"{one} vs {two}"):
                total[key] += 1
                same[key] += a == b
    return {key: {"agreement": same[key] / total[key], "n": total[key]} for key in total}


def judge_agreement(rows: list[sqlite3.Row], judged: Any) -> dict[str, Any]:
    """Labels vs judge.py verdicts on the same pairs (query, policy summary, baseline summary); the judge's ties
    (win 0.5) and unparsed verdicts are left out. Agreement: the label picked the policy (A) iff the judge did (win 1)."""
    from summarize_from_feedback_details.judge import clean_summary

    verdicts = {}
    for row in judged.itertuples():
        if row.win in (0.0, 1.0):
            verdicts[(str(row.query).strip(), clean_summary(row.response), clean_summary(row.baseline_response))] = row.win == 1.0
    matched = [(bool(r["chose_a"]), verdicts[k]) for r in rows
               if (k := (str(r["query"]).strip(), r["text_a"], r["text_b"])) in verdicts]
    if not matched:
        return {"n": 0, "agreement": None}
    return {"n": len(matched), "agreement": sum(a == b for a, b in matched) / len(matched),
            "label_picks_policy": sum(a for a, _ in matched) / len(matched),
            "judge_picks_policy": sum(b for _, b in matched) / len(matched)}


def agreement_report(connection: sqlite3.Connection, judged_table: str | None) -> dict[str, Any]:
    rows = labelled_rows(connection)
    picks: dict[int, dict[str, bool]] = defaultdict(dict)
    for row in rows:
        picks[row["pair_id"]][row["labeller"]] = bool(row["chose_a"])
    report: dict[str, Any] = {"labels": len(rows), "pairs_labelled": len(picks),
                              "labels_per_labeller": dict(Counter(row["labeller"] for row in rows)),
                              "labeller_agreement": labeller_agreement(picks)}
    if judged_table:
        from summarize_from_feedback_details.judge import read_table

        judged = read_table(judged_table, "--judged_table")
        missing = [c for c in ("query", "response", "baseline_response", "win") if c not in judged.columns]
        if missing:
            raise UserInputError(f"--judged_table {judged_table} lacks the column(s) {missing}; pass a judged table judge.py wrote")
        report["judge_agreement"] = {"table": judged_table, **judge_agreement(rows, judged)}
    return report


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def check_args(args: Args) -> None:
    actions = [name for name in ("add_labeller", "export") if getattr(args, name)] + (["agreement"] if args.agreement else [])
    if len(actions) > 1:
        raise UserInputError(f"give one of --add_labeller, --export, --agreement at a time, not {actions}")
    if not actions and not args.pairs:
        raise UserInputError("nothing to do: pass --pairs <table or comparisons file> to serve, or --add_labeller / --export / "
                             "--agreement")
    if args.labels_per_pair < 1:
        raise UserInputError(f"--labels_per_pair must be >= 1, got {args.labels_per_pair}")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise UserInputError(f"--max_pairs must be >= 1, got {args.max_pairs}")
    if not 0 <= args.validation_fraction < 1:
        raise UserInputError(f"--validation_fraction must be in [0, 1), got {args.validation_fraction}")
    if "cnndm" in args.batch or args.batch in CNNDM_BATCHES:
        raise UserInputError(f"--batch {args.batch!r} names a CNN/DM batch; the labels are TL;DR posts: pick another name")
    if not 0 < args.port < 65536:
        raise UserInputError(f"--port must be 1-65535, got {args.port}")
    if args.judged_table and not args.agreement:
        raise UserInputError("--judged_table is read by --agreement; add --agreement")
    if (args.export or args.agreement) and not Path(args.db).is_file():
        raise UserInputError(f"--db {args.db} does not exist; serve and label first (or fix the path)")


def main(args: Args) -> dict[str, Any]:
    check_args(args)
    pairs = read_pairs(args) if args.pairs and not (args.add_labeller or args.export or args.agreement) else None
    connection = open_db(args.db)
    if args.add_labeller:
        token = add_labeller(connection, args.add_labeller)
        print(f"labeller {args.add_labeller}: token {token}")
        print(f"  open http://{args.host}:{args.port}/?token={token} (only the token's hash is stored; keep it)")
        return {"labeller": args.add_labeller, "token": token}
    if args.export:
        counts = export(connection, args.export, args.validation_fraction, args.batch)
        print(f"label_server: exported {counts['train']} train and {counts['validation']} validation comparisons to {args.export}")
        return counts
    if args.agreement:
        report = agreement_report(connection, args.judged_table)
        write_json(Path(args.db).with_suffix(".agreement.json"), report)
        print(json.dumps(report, indent=2))
        return report
    assert pairs is not None
    added = add_pairs(connection, pairs)
    total = connection.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
    labellers = connection.execute("SELECT COUNT(*) FROM labellers").fetchone()[0]
    connection.close()
    if not labellers:
        print("label_server: no labeller yet: add one with --add_labeller NAME (the server reads them on each request)")
    from werkzeug.serving import run_simple

    print(f"label_server: {added} new pairs ({total} in {args.db}); serving http://{args.host}:{args.port}/?token=<token>",
          flush=True)
    run_simple(args.host, args.port, make_app(args.db, args.labels_per_pair, args.seed), threaded=True)
    return {"pairs": total}


if __name__ == "__main__":
    import tyro

    run_main(main, tyro.cli(Args, description=__doc__.split("\n\n")[0], use_underscores=True))
