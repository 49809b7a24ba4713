"""The benchmark harness runs end to end at the tiny shape (1 repeat, our side only: CI has no trl) and
writes a well-formed results table; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def _run(script: str, *args: str, out) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(REPO / "benchmark" / script), "--shapes", "tiny", "--warmup", "0", "--repeats", "1",
                             "--threads", "1", "--ceiling_seconds", "0.05", "--output_dir", str(out), "--name", "smoke", *args],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads((out / "smoke.json").read_text())


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert len({len(row) for row in rows}) == 1, "every table row has the header's number of columns"
    assert set(rows[1]) == {"---"}
    return rows


def test_ppo_benchmark_writes_a_table_of_one_tiny_update(tmp_path):
    results = _run("bench_ppo.py", "--implementations", "ours", "--batch_size", "2", "--query_length", "8",
                   "--response_length", "4", "--num_ppo_epochs", "1", out=tmp_path)
    (case,) = results["cases"]
    assert case["shape"] == "tiny" and case["implementation"] == "ours" and len(case["times_s"]) == 1
    assert case["peak_rss_mib"] >= case["rss_after_setup_mib"] > 0
    assert 0 < case["train_median_s"] <= case["median_s"] and case["train_flops"] > 0
    assert results["matmul_ceiling_start"]["flops"] > 0 and "bench_ppo.py" in results["command"]
    rows = _table_rows((tmp_path / "smoke.md").read_text())
    assert rows[0][:2] == ["shape", "ours s/update: wall (CPU)"] and rows[2][0] == "tiny" and len(rows) == 3


def test_steps_benchmark_times_sft_and_reward_steps_into_a_table():
    """The SFT and RM steps of bench_steps.py, run in this process (a subprocess per case costs seconds)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_steps", REPO / "benchmark" / "bench_steps.py")
    bench_steps = importlib.util.module_from_spec(spec)
    sys.modules["bench_steps"] = bench_steps  # dataclasses look their module up there
    spec.loader.exec_module(bench_steps)
    settings = {"device": "cpu", "dtype": "fp32", "batch_size": 2, "sequence_length": 16, "max_right_padding_fraction": 0.25,
                "warmup": 0, "repeats": 1, "threads": None, "seed": 1, "shape": "tiny"}
    cases = []
    for stage in ("sft", "reward"):
        case = bench_steps.run_step_case({**settings, "stage": stage})
        cases.append({**case, "shape": "tiny", "peak_rss_mib": 1.0})
    sft, reward = cases
    assert sft["tokens_per_step"] == 2 * 16 and reward["tokens_per_step"] == 2 * 2 * 16  # RM: chosen + rejected
    assert sft["flops"] > reward["flops"] > 0  # vocabulary logits at every position vs a scalar head
    rows = _table_rows(bench_steps.steps_table(cases, ceiling=1e9, gpu=False))
    assert [row[:2] for row in rows[2:]] == [["tiny", "sft"], ["tiny", "reward"]]


def test_unpadded_row_flops_by_hand_and_equal_to_the_full_row_when_every_position_is_kept():
    """`ours_proposed`'s training FLOPs (--skip_left_padding): d 2, f 4, 2 layers, a row of 3 positions, 1 kept, a
    head of 5. Full layer: 3 x 2 x (4 d^2 + 2 d f = 32) = 192 linear + 2 x 2 x d x (1 + 2 + 3) = 48 causal attention
    = 240; last layer: keys and values 3 x 2 x 2 d^2 = 48, the kept position 2 x (2 d^2 + 2 d f) = 48 and its 3
    scores and values 2 x 2 x d x 3 = 24; head 2 x 1 x d x 5 = 20: 240 + 48 + 72 + 20 = 380."""
    sys.path.insert(0, str(REPO / "benchmark"))
    import common

    shape = common.Shape("hand", hidden_size=2, num_layers=2, num_heads=1, intermediate_size=4, vocab_size=5, pad_token_id=5)
    assert common.unpadded_row_forward_flops(shape, row_tokens=3, kept=1, head_width=5) == 380
    full_layer = 240
    assert common.unpadded_row_forward_flops(shape, row_tokens=3, kept=3, head_width=0) == 2 * full_layer
