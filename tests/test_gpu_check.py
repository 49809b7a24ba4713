"""scripts/gpu_check.sh, the one command for a lent GPU machine: its --tiny run on the CPU writes every field of the
JSON (null where a CPU cannot measure it) and the markdown summary; it fails fast, with one line, where it cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmark"))
import gpu_check  # noqa: E402


def _gpu_check(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "SFFD_WHEELS": str(tmp_path / "no_wheels"), **env}
    environment.pop("OUT", None)
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True, cwd=REPO,
                          env=environment, timeout=600)


@pytest.mark.slow
def test_tiny_gpu_check_writes_every_field_and_the_summary(tmp_path):
    out = tmp_path / "out"
    result = _gpu_check(tmp_path, "--tiny", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["status"] == "ok" and report["settings"]["mode"] == "tiny"
    env = report["environment"]
    assert env["cuda_available"] is False and env["import_errors"] == {}
    assert env["pinned_deps"]["packages"]["torch"]["pinned"] == "2.13.0" and "detail" in env["venv"]

    ppo = report["ppo"]
    assert ppo["ours_bf16_s"] > 0 and ppo["ours_fp32_s"] > 0 and ppo["ours_bf16_training_s"] > 0
    if ppo["trl"] == "measured":  # trl 1.12.0 installed (the bench extra)
        assert ppo["trl_bf16_s"] > 0 and ppo["speedup_vs_trl"] == pytest.approx(ppo["trl_bf16_s"] / ppo["ours_bf16_s"])
    else:  # CI has no trl: the reason, and the rest still ran
        assert ppo["trl"].startswith("not available: trl is not installed") and ppo["trl_bf16_s"] is None and ppo["ours_over_trl"] is None

    first = report["first_minibatch"]
    for precision in ("fp32", "bf16", "bf16_training_only"):
        row = first[precision]
        assert row["tokens"] > 0 and 0 <= row["mean_abs_ratio_minus_1"] <= row["max_abs_ratio_minus_1"] and row["approxkl"] >= 0
    # fp32: the training forward recomputes the sampler's log-probs to rounding; bf16 autocast moves them visibly
    assert first["fp32"]["max_abs_ratio_minus_1"] < 1e-4 and first["fp32"]["approxkl"] < 1e-8
    assert first["bf16"]["mean_abs_ratio_minus_1"] > 10 * first["fp32"]["mean_abs_ratio_minus_1"]
    assert report["bf16_vs_fp32_logprobs"]["logprob_max_abs_diff"] > 0

    steps = report["steps"]
    assert steps["sft_tokens_per_s"] > 0 and steps["reward_tokens_per_s"] > 0
    measurements = {"ppo_ours_bf16", "ppo_trl_bf16", "ppo_ours_fp32", "ppo_ours_bf16_training", "sft_step", "reward_step"}
    for key in ("peak_gpu_mib", "peak_gpu_reserved_mib"):
        assert report[key] == dict.fromkeys(measurements)  # every field present, null on the CPU
    assert report["peak_rss_mib"]["ppo_ours_bf16"] > 0 and report["peak_rss_mib"]["sft_step"] > 0

    summary = (out / "gpu_check.md").read_text()
    for heading in ("## PPO update", "## First minibatch", "## SFT and RM steps", "## Steps"):
        assert heading in summary
    log = (out / "gpu_check.log").read_text()
    assert "==== ppo_bf16: python benchmark/bench_ppo.py" in log and "==== steps_bf16" in log


def test_gpu_check_fails_fast_with_one_line_without_torch(tmp_path):
    """A Python without torch (here: the same one with its site-packages off) stops the check at once."""
    python = tmp_path / "python_without_site"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    result = _gpu_check(tmp_path, "--out", str(tmp_path / "out"), PYTHON=str(python))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("gpu_check: ") and "cannot import torch and transformers" in line and "PYTHON" in line


def test_failure_line_names_what_is_missing_and_the_fix():
    env = {"python": "/opt/torch/.venv/bin/python3", "python_version": "3.12.3", "torch": "2.11.0+cu130", "cuda_available": True,
           "import_errors": {}, "venv": {"detail": "absent (not carried)"}}
    assert gpu_check.failure_line(env, tiny=False) is None
    assert "sees no GPU" in gpu_check.failure_line({**env, "cuda_available": False}, tiny=False)
    assert gpu_check.failure_line({**env, "cuda_available": False}, tiny=True) is None
    errors = gpu_check.import_errors(("json", "no_such_module_sffd"))
    assert list(errors) == ["no_such_module_sffd"]
    line = gpu_check.failure_line({**env, "import_errors": errors}, tiny=False)
    assert "cannot import no_such_module_sffd (ModuleNotFoundError" in line
    assert "--prepare_wheels" in line and "absent (not carried)" in line


def test_wheel_pins_are_the_project_pins():
    pins = dict(pin.split("==") for pin in gpu_check.wheel_pins())
    assert set(pins) == set(gpu_check.WHEEL_PACKAGES)
    assert pins["trl"] == "1.12.0" and pins["tyro"] == gpu_check.pinned_versions()["tyro"]
    assert pins["datasets"] == gpu_check.pinned_versions()["datasets"] and pins["dill"]  # not pinned: the installed version
