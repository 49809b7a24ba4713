"""Label throughput of the labelling web app with the keyboard: a scripted headless Chromium labels N pairs with
the keys a person uses (a pick 1 / 2, a confidence digit, Enter) against the real server on a free local port,
and reports pairs per minute, overall and per pair (the server's page round trip included).

    python benchmark/bench_label_server.py --pairs 200                  # the app's ceiling (no reading time)
    python benchmark/bench_label_server.py --pairs 50 --think_ms 4000   # with 4 s of reading per pair

A person reads the post and both summaries first: their rate is 60 / (reading seconds + the seconds per pair
measured here). Needs Debian's `chromium` (/usr/bin/chromium) and playwright (the dev extra). Writes
benchmark/results/label_server.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUERY = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def write_table(path: Path, n: int) -> None:
    """n TL;DR-shaped pairs (a post of ~180 words, two one-sentence summaries), as a stage's query_responses table."""
    import pandas as pd

    post = " ".join(["I have known my roommate for years and we usually get along, but last week something changed."] * 10)
    posts = [{"subreddit": "relationships", "title": f"My roommate and I, question {k}", "post": post} for k in range(n)]
    pd.DataFrame({"query": [QUERY.format(**p) for p in posts],
                  "reference": [f"roommate changed last week ({k}), what do I do?" for k in range(n)],
                  "response": [f"my roommate and i got along for years until last week, question {k}" for k in range(n)],
                  }).to_csv(path, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200, help="pairs to label")
    parser.add_argument("--think_ms", type=int, default=0, help="milliseconds of 'reading' before the keys of each pair")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default=str(REPO / "benchmark" / "results" / "label_server.json"))
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    load_before = os.getloadavg()  # 1, 5, 15-minute load: the machine is shared
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ppo"
        folder.mkdir()
        write_table(folder / "query_responses_validation.csv", args.pairs)
        db = Path(tmp) / "labels.sqlite"
        module = [sys.executable, "-m", "summarize_from_feedback_details.label_server", "--db", str(db)]
        out = subprocess.run([*module, "--add_labeller", "bench"], capture_output=True, text=True, check=True, cwd=REPO).stdout
        token = out.split("token ")[1].split()[0]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([*module, "--pairs", str(folder / "query_responses_validation.csv"), "--port", str(port)],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            rng = random.Random(1)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, headless=True)
                page = browser.new_page()
                for _ in range(100):  # the server starts
                    try:
                        page.goto(f"http://127.0.0.1:{port}/?token={token}")
                        break
                    except Exception:  # noqa: BLE001 - connection refused until it listens
                        time.sleep(0.1)
                per_pair = []
                start = time.perf_counter()
                for k in range(args.pairs):
                    t = time.perf_counter()
                    if args.think_ms:
                        page.wait_for_timeout(args.think_ms)
                    for key in (rng.choice("12"), str(rng.randint(1, 9)), "Enter"):
                        page.keyboard.press(key)
                    page.wait_for_selector(f"text={k + 1} labelled")
                    per_pair.append(time.perf_counter() - t)
                total = time.perf_counter() - start
                browser.close()
        finally:
            server.kill()
            server.wait()
        import sqlite3

        with sqlite3.connect(db) as connection:
            stored = connection.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
    result = {"pairs": args.pairs, "labels_stored": stored, "think_ms": args.think_ms, "seconds": round(total, 3),
              "pairs_per_minute": round(60 * args.pairs / total, 1),
              "median_seconds_per_pair": round(statistics.median(per_pair), 4),
              "p95_seconds_per_pair": round(sorted(per_pair)[int(0.95 * (len(per_pair) - 1))], 4),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": load_before,
                          "load_after": os.getloadavg()},
              "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    assert stored == args.pairs, f"{stored} labels stored for {args.pairs} pairs"


if __name__ == "__main__":
    main()
