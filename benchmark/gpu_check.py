"""The GPU check: what to measure when a GPU machine is lent, in one run that fits in 8 minutes on one H100 or H200.
Run it through `scripts/gpu_check.sh` (which picks the Python and installs carried wheels first):

    bash scripts/gpu_check.sh --out "$OUT"          # GPU: pythia-1b shape, bf16 autocast, cuda
    bash scripts/gpu_check.sh --tiny --out /tmp/gc  # the same steps at the tiny shape on the CPU (about a minute)

Every step is a run of `bench_ppo.py` or `bench_steps.py` (random-weight GPT-NeoX models built from a config, random
token ids: no hub, no data), in this order of priority; a step that fails, or that does not fit in the time left, is
recorded as such and the next one runs:

1. `ppo_bf16`: one PPO update of ours (ppo.py's loop body) under bf16 autocast: seconds per update, peak GPU memory,
   the first minibatch's ratio and approx-KL, and bf16-vs-fp32 log-probs on one batch;
2. `ppo_trl_bf16`: TRL 1.12's PPO trainer at identical settings, when trl 1.12.0 is importable ("not available"
   with the reason otherwise);
3. `ppo_fp32`: ours in fp32, one update: the first minibatch's ratio and approx-KL in fp32;
4. `steps_bf16`: one SFT and one reward-model step (forward, backward, AdamW) in tokens/s, peak GPU memory;
5. `ppo_bf16_training`: ours as `ppo.py --mixed_precision bf16` runs without DeepSpeed (rollouts fp32, only the
   training forward autocast), one update: the first minibatch's ratio and approx-KL.

Each case runs in its own process, so each peak GPU memory (torch.cuda.max_memory_allocated) is that case's alone.
Writes `gpu_check.json` (every field; null where not measured, e.g. GPU memory on the CPU), `gpu_check.md` and
`gpu_check.log` (the full output of every step) to --out. Only the standard library is imported at the top: the
environment check must be able to say what is missing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from summarize_from_feedback_details.core import write_json, write_text  # noqa: E402 (standard library only)

REQUIRED = ("torch", "transformers", "tokenizers", "accelerate", "datasets", "tyro")
"""what bench_ppo.py / bench_steps.py import (the stage modules import only torch and transformers at the top)"""
WHEEL_PACKAGES = ("tyro", "docstring-parser", "typeguard", "datasets", "dill", "multiprocess", "transformers", "tokenizers", "trl")
"""what `gpu_check.sh --prepare_wheels` downloads for the GPU machine: what its image lacks (tyro, datasets and their
dependencies, trl) and the pinned transformers / tokenizers (the image has 5.17.0 / 0.23.2)"""
TRL_VERSION = "1.12.0"


def gpu_settings() -> dict[str, Any]:
    """The pythia-1b shape on the GPU: the CPU benchmarks' settings (batch 8, query 512, 53 response tokens, 4 epochs)."""
    return {"mode": "gpu", "device": "cuda", "shape": "pythia-1b", "batch_size": 8, "query_length": 512, "response_length": 53,
            "num_ppo_epochs": 4, "ppo_warmup": 1, "ppo_repeats": 2, "steps_batch_size": 8, "steps_sequence_length": 565,
            "steps_warmup": 1, "steps_repeats": 3, "threads": None, "ceiling_seconds": 1.0, "budget_s": 430.0, "min_step_s": 40.0}


def tiny_settings() -> dict[str, Any]:
    """The same steps at the tiny shape on the CPU, one thread: about a minute on a shared 2-core machine."""
    return {"mode": "tiny", "device": "cpu", "shape": "tiny", "batch_size": 4, "query_length": 24, "response_length": 8,
            "num_ppo_epochs": 2, "ppo_warmup": 0, "ppo_repeats": 1, "steps_batch_size": 2, "steps_sequence_length": 48,
            "steps_warmup": 0, "steps_repeats": 1, "threads": 1, "ceiling_seconds": 0.05, "budget_s": 240.0, "min_step_s": 5.0}


# ----------------------------------------------------------------------------------------------
# The environment: Python, torch and CUDA, the pinned dependencies, trl, the project's .venv
# ----------------------------------------------------------------------------------------------
def pinned_versions() -> dict[str, str]:
    """name -> pinned version from pyproject.toml: the dependencies and the `bench` extra (trl)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["bench"]]:
        name, _, version = requirement.partition("==")
        pins[name.strip()] = version.strip()
    return pins


def wheel_pins() -> list[str]:
    """`name==version` of WHEEL_PACKAGES: pyproject.toml's pins, else the version installed here (the versions
    verified together on the CPU)."""
    pins = pinned_versions()
    versions = {name: pins.get(name) or installed_version(name) for name in WHEEL_PACKAGES}
    missing = [name for name, version in versions.items() if version is None]
    if missing:
        raise SystemExit(f"gpu_check: no pinned or installed version of {', '.join(missing)} here: run with the project's venv python")
    return [f"{name}=={version}" for name, version in versions.items()]


def installed_version(name: str, path: list[str] | None = None) -> str | None:
    """The version of distribution `name` on `path` (default sys.path), or None."""
    from importlib.metadata import distributions

    found = next(iter(distributions(name=name, path=sys.path if path is None else path)), None)
    return None if found is None else found.version


def pinned_dependencies(wheel_site: str | None) -> dict[str, Any]:
    """Each pinned package's installed version (None: absent; torch's local label +cpu, +cu130 is ignored) and, when
    wheels were carried (installed into `wheel_site`, first on the path), what the machine itself has."""
    machine_path = [p for p in sys.path if wheel_site is None or Path(p).resolve() != Path(wheel_site).resolve()]
    packages = {}
    for name, pinned in pinned_versions().items():
        installed = installed_version(name)
        packages[name] = {"pinned": pinned, "installed": installed, "match": installed is not None and installed.split("+")[0] == pinned}
        if wheel_site:
            packages[name]["machine"] = installed_version(name, machine_path)
    return {"all_match": all(p["match"] for p in packages.values()), "packages": packages}


def import_errors(modules: tuple[str, ...]) -> dict[str, str]:
    """module -> why it does not import, for the modules that do not."""
    errors = {}
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # an ImportError, or a broken install that fails while importing
            errors[module] = f"{type(error).__name__}: {error}".splitlines()[0]
    return errors


def gpu_name() -> str | None:
    """The GPU's name and memory from nvidia-smi (this process never initialises CUDA: the cases' memory is theirs)."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def project_venv() -> dict[str, Any]:
    """Whether the project's .venv is here and usable: its torch, and whether that torch sees a GPU (the venv holds
    the CPU wheel and a Python 3.11 that a bare GPU machine lacks)."""
    venv = REPO / ".venv"
    python = venv / "bin" / "python"
    if not venv.exists():
        return {"present": False, "usable": False, "detail": "absent (not carried)"}
    if Path(sys.prefix).resolve() == venv.resolve():
        import torch

        return {"present": True, "usable": True, "in_use": True,
                "detail": f"in use: torch {torch.__version__}, CUDA {torch.cuda.is_available()}"}
    if not python.exists():  # a symbolic link to an interpreter this machine lacks
        return {"present": True, "usable": False, "in_use": False, "detail": f"its interpreter {os.path.realpath(python)} is missing here"}
    try:
        probe = subprocess.run([str(python), "-c", "import torch; print(torch.__version__, torch.cuda.is_available())"],
                               capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        return {"present": True, "usable": False, "in_use": False, "detail": f"does not run: {error}"}
    if probe.returncode != 0:
        return {"present": True, "usable": False, "in_use": False, "detail": f"cannot import torch: {probe.stderr.strip().splitlines()[-1:]}"}
    version, cuda = probe.stdout.split()
    return {"present": True, "usable": cuda == "True", "in_use": False,
            "detail": f"torch {version}, CUDA {cuda}" + ("" if cuda == "True" else " (a CPU wheel: not usable for the GPU check)")}


def environment() -> dict[str, Any]:
    import platform

    import torch

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "python": sys.executable, "python_version": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": cuda, "gpu": gpu_name() if cuda else None,
        "cpus": os.cpu_count(), "bf16_autocast_cpu": torch.amp.is_autocast_available("cpu"),
        "pythonpath": os.environ.get("PYTHONPATH"),
    }
    info["import_errors"] = import_errors(REQUIRED + ("summarize_from_feedback_details.ppo",))
    wheel_site = os.environ.get("SFFD_GPU_CHECK_WHEEL_SITE")
    info["carried_wheels"] = sorted(p.name.removesuffix(".dist-info") for p in Path(wheel_site).glob("*.dist-info")) if wheel_site else None
    info["pinned_deps"] = pinned_dependencies(wheel_site)
    trl = installed_version("trl")
    if trl is None:
        info["trl"] = (f"not available: trl is not installed in {sys.executable} (the GPU machine has no pip index; "
                       "`bash scripts/gpu_check.sh --prepare_wheels` here, then carry .whl)")
    elif trl != TRL_VERSION:
        info["trl"] = f"not available: trl {trl} is installed; the comparison is with trl=={TRL_VERSION} (the last with a PPO trainer)"
    else:
        info["trl"] = "available"
    info["venv"] = project_venv()
    return info


def failure_line(env: dict[str, Any], tiny: bool) -> str | None:
    """One line saying why the check cannot run here, or None."""
    where = f"{env['python']} (Python {env['python_version']}, torch {env['torch']})"
    if env["import_errors"]:
        missing = ", ".join(f"{m} ({e})" for m, e in env["import_errors"].items())
        return (f"{where} cannot import {missing}; the project's .venv is {env['venv']['detail']}: carry the missing "
                "packages as wheels (`bash scripts/gpu_check.sh --prepare_wheels` where pip reaches an index, then carry .whl)")
    if not tiny and not env["cuda_available"]:
        return (f"{where} sees no GPU (torch.cuda.is_available() is False; a CPU wheel?): run with the GPU machine's own "
                "python3 (PYTHON=...), or --tiny for the CPU check")
    return None


# ----------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------
def plan_steps(settings: dict[str, Any], env: dict[str, Any]) -> list[dict[str, Any]]:
    """(name, script, arguments) of each step, in order of priority, with the seconds it may take at most."""
    s = settings
    common = ["--device", s["device"], "--shapes", s["shape"], "--ceiling_seconds", str(s["ceiling_seconds"]),
              *(["--threads", str(s["threads"])] if s["threads"] else [])]
    ppo = [*common, "--batch_size", str(s["batch_size"]), "--query_length", str(s["query_length"]),
           "--response_length", str(s["response_length"]), "--num_ppo_epochs", str(s["num_ppo_epochs"])]
    timed = ["--warmup", str(s["ppo_warmup"]), "--repeats", str(s["ppo_repeats"])]
    once = ["--warmup", "0", "--repeats", "1"]
    steps = [
        {"name": "ppo_bf16", "script": "bench_ppo.py", "args": [*ppo, *timed, "--dtype", "bf16", "--implementations", "ours"], "cap_s": 170},
        {"name": "ppo_trl_bf16", "script": "bench_ppo.py", "args": [*ppo, *timed, "--dtype", "bf16", "--implementations", "trl"], "cap_s": 170,
         "skip": None if env["trl"] == "available" else env["trl"]},
        {"name": "ppo_fp32", "script": "bench_ppo.py", "args": [*ppo, *once, "--dtype", "fp32", "--implementations", "ours"], "cap_s": 120},
        {"name": "steps_bf16", "script": "bench_steps.py", "cap_s": 120,
         "args": [*common, "--dtype", "bf16", "--batch_size", str(s["steps_batch_size"]), "--sequence_length", str(s["steps_sequence_length"]),
                  "--warmup", str(s["steps_warmup"]), "--repeats", str(s["steps_repeats"])]},
        {"name": "ppo_bf16_training", "script": "bench_ppo.py", "cap_s": 100,
         "args": [*ppo, *once, "--dtype", "bf16", "--bf16_scope", "training", "--implementations", "ours"]},
    ]
    if s["device"] == "cpu" and not env["bf16_autocast_cpu"]:
        for step in steps:
            if "bf16" in step["args"]:
                step["skip"] = "not measured: this torch has no bf16 autocast on the CPU"
    return steps


def run_step(step: dict[str, Any], work: Path, log: Any, timeout: float) -> dict[str, Any]:
    """Run one step's benchmark in its own process group (killed whole on timeout); its output goes to the log."""
    command = [sys.executable, str(REPO / "benchmark" / step["script"]), *step["args"], "--output_dir", str(work),
               "--name", step["name"], "--case_timeout", str(int(timeout))]
    shown = shlex.join(["python", f"benchmark/{step['script']}", *step["args"]])
    log.write(f"\n==== {step['name']}: {shown}\n")
    log.flush()
    offset = log.tell()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    record: dict[str, Any] = {"command": shown}
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the benchmark and its case process
        process.wait()
        returncode = None
    record["seconds"] = round(time.perf_counter() - start, 1)
    log.flush()
    if returncode == 0:
        record.update(status="ok", results=json.loads((work / f"{step['name']}.json").read_text()))
    else:
        with open(log.name, encoding="utf-8", errors="replace") as read:
            read.seek(offset)
            tail = [line for line in read.read().splitlines() if line.strip()][-12:]
        record.update(status="timed out" if returncode is None else "failed",
                      error=(f"timed out after {timeout:.0f} s" if returncode is None else f"exit status {returncode}"),
                      log_tail=tail)
    return record


# ----------------------------------------------------------------------------------------------
# The summary: flat fields, null where not measured
# ----------------------------------------------------------------------------------------------
def case_of(runs: dict[str, Any], name: str, **match: str) -> dict[str, Any] | None:
    run = runs.get(name, {})
    for case in run.get("results", {}).get("cases", []) if run.get("status") == "ok" else []:
        if all(case.get(k) == v for k, v in match.items()):
            return case
    return None


def step_status(runs: dict[str, Any], name: str) -> str:
    """"measured", or why not: "not available: ..." (trl absent), "failed: ...", "timed out: ...", "out of time: ..."."""
    run = runs[name]
    return "measured" if run["status"] == "ok" else run["reason"] if run["status"] == "skipped" else f"{run['status']}: {run['error']}"


def summarize(runs: dict[str, Any]) -> dict[str, Any]:
    ours, trl = case_of(runs, "ppo_bf16", implementation="ours"), case_of(runs, "ppo_trl_bf16", implementation="trl")
    fp32, training = case_of(runs, "ppo_fp32", implementation="ours"), case_of(runs, "ppo_bf16_training", implementation="ours")
    sft, reward = case_of(runs, "steps_bf16", stage="sft"), case_of(runs, "steps_bf16", stage="reward")

    def get(case: dict[str, Any] | None, key: str) -> Any:
        return None if case is None else case.get(key)

    def first(case: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if case is None else case["first_minibatch"]

    ratio = None if ours is None or trl is None else ours["median_s"] / trl["median_s"]
    return {
        "ppo": {
            "ours_bf16_s": get(ours, "median_s"), "ours_bf16_cpu_s": get(ours, "cpu_median_s"),
            "ours_bf16_rollout_s": get(ours, "rollout_median_s"), "ours_bf16_train_s": get(ours, "train_median_s"),
            "trl_bf16_s": get(trl, "median_s"), "trl_bf16_cpu_s": get(trl, "cpu_median_s"), "trl": step_status(runs, "ppo_trl_bf16"),
            "ours_over_trl": ratio, "speedup_vs_trl": None if ratio is None else 1 / ratio,
            "ours_fp32_s": get(fp32, "median_s"), "ours_bf16_training_s": get(training, "median_s"),
        },
        "first_minibatch": {"fp32": first(fp32), "bf16": first(ours), "bf16_training_only": first(training)},
        "bf16_vs_fp32_logprobs": get(ours, "bf16_tolerance"),
        "steps": {"sft_tokens_per_s": get(sft, "tokens_per_s"), "reward_tokens_per_s": get(reward, "tokens_per_s"),
                  "sft_s_per_step": get(sft, "median_s"), "reward_s_per_step": get(reward, "median_s")},
        # per case process, so each is its own: max_memory_allocated (and _reserved) since that process started
        "peak_gpu_mib": {"ppo_ours_bf16": get(ours, "cuda_peak_mib"), "ppo_trl_bf16": get(trl, "cuda_peak_mib"),
                         "ppo_ours_fp32": get(fp32, "cuda_peak_mib"), "ppo_ours_bf16_training": get(training, "cuda_peak_mib"),
                         "sft_step": get(sft, "cuda_peak_mib"), "reward_step": get(reward, "cuda_peak_mib")},
        "peak_gpu_reserved_mib": {"ppo_ours_bf16": get(ours, "cuda_peak_reserved_mib"), "ppo_trl_bf16": get(trl, "cuda_peak_reserved_mib"),
                                  "ppo_ours_fp32": get(fp32, "cuda_peak_reserved_mib"),
                                  "ppo_ours_bf16_training": get(training, "cuda_peak_reserved_mib"),
                                  "sft_step": get(sft, "cuda_peak_reserved_mib"), "reward_step": get(reward, "cuda_peak_reserved_mib")},
        "peak_rss_mib": {"ppo_ours_bf16": get(ours, "peak_rss_mib"), "ppo_trl_bf16": get(trl, "peak_rss_mib"),
                         "ppo_ours_fp32": get(fp32, "peak_rss_mib"), "ppo_ours_bf16_training": get(training, "peak_rss_mib"),
                         "sft_step": get(sft, "peak_rss_mib"), "reward_step": get(reward, "peak_rss_mib")},
    }


def num(value: float | None, digits: int = 3) -> str:
    """`digits` decimals; small non-zero values (ratios off 1 by 1e-7 in fp32) in scientific notation."""
    if value is None:
        return "–"
    return f"{value:.2e}" if value != 0 and abs(value) < 10**-digits else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    env, s = result["environment"], result["settings"]
    lines = [f"# GPU check, {result['date']} ({s['mode']}: {s['shape']} on {s['device']})", "",
             f"`{result['command']}`: {result['status']}, {result['seconds']:.0f} s", "",
             f"* machine: {env.get('gpu') or 'no GPU'}; {env.get('cpus')} CPUs; Python {env['python_version']} ({env['python']})",
             f"* torch {env['torch']} (CUDA {env['torch_cuda']}, available: {env['cuda_available']}); the project's .venv: {env['venv']['detail']}",
             "* pinned dependencies: " + ("all as pinned" if env["pinned_deps"]["all_match"] else "differ: " + ", ".join(
                 f"{n} {p['installed'] or 'absent'} (pinned {p['pinned']})" for n, p in env["pinned_deps"]["packages"].items() if not p["match"])),
             "* carried wheels: " + (", ".join(env["carried_wheels"]) + "; without them: " + (", ".join(
                 f"{n} {p['machine'] or 'absent'}" for n, p in env["pinned_deps"]["packages"].items() if p["machine"] != p["installed"])
                 or "the same versions") if env["carried_wheels"] else "none")]
    if "error" in result:
        return "\n".join([*lines, "", f"**Not run:** {result['error']}", ""])
    ppo, first, steps, peak = result["ppo"], result["first_minibatch"], result["steps"], result["peak_gpu_mib"]
    lines += ["", f"## PPO update: {s['shape']}, batch {s['batch_size']}, query {s['query_length']}, {s['response_length']} response tokens, "
              f"{s['num_ppo_epochs']} epochs (median of {s['ppo_repeats']} after {s['ppo_warmup']} warm-up)", "",
              "| implementation | s/update (wall) | CPU s | peak GPU MiB (allocated / reserved) |", "|---|---|---|---|"]
    reserved = result["peak_gpu_reserved_mib"]
    for label, key, peak_key, cpu_key in (("ours, bf16 autocast", "ours_bf16_s", "ppo_ours_bf16", "ours_bf16_cpu_s"),
                                          ("TRL 1.12, bf16 autocast", "trl_bf16_s", "ppo_trl_bf16", "trl_bf16_cpu_s"),
                                          ("ours, fp32 (1 update)", "ours_fp32_s", "ppo_ours_fp32", None),
                                          ("ours, bf16 training forward only (1 update)", "ours_bf16_training_s", "ppo_ours_bf16_training", None)):
        lines.append(f"| {label} | {num(ppo[key])} | {num(ppo[cpu_key]) if cpu_key else '–'} | {num(peak[peak_key], 0)} / {num(reserved[peak_key], 0)} |")
    speedup = f"{ppo['speedup_vs_trl']:.2f}x" if ppo["speedup_vs_trl"] else "–"
    lines += ["", f"ours / TRL: {num(ppo['ours_over_trl'])} (speed-up {speedup}); TRL: {ppo['trl']}", "",
              "## First minibatch of an update (same weights: the ratio is 1 up to rounding)", "",
              "| precision | mean abs(ratio - 1) | max abs(ratio - 1) | approx-KL | tokens |", "|---|---|---|---|---|"]
    training_only = "bf16 autocast, training forward only (ppo.py --mixed_precision bf16, no DeepSpeed)"
    if s["device"] == "cpu":
        training_only += "; on the CPU ppo.py autocasts nothing: fp32"
    for label, key in (("fp32", "fp32"), ("bf16 autocast, rollouts and training", "bf16"), (training_only, "bf16_training_only")):
        row = first[key] or {}
        lines.append(f"| {label} | {num(row.get('mean_abs_ratio_minus_1'))} | {num(row.get('max_abs_ratio_minus_1'))} | "
                     f"{num(row.get('approxkl'))} | {row.get('tokens', '–')} |")
    tolerance = result["bf16_vs_fp32_logprobs"]
    if tolerance:
        lines += ["", f"bf16 vs fp32 on one batch of random responses: log-probs differ by {num(tolerance['logprob_max_abs_diff'])} "
                  f"nats at most ({num(tolerance['logprob_mean_abs_diff'])} on average), values by {num(tolerance['value_max_abs_diff'])}"]
    lines += ["", f"## SFT and RM steps, bf16 autocast, batch {s['steps_batch_size']} x {s['steps_sequence_length']} tokens "
              f"(RM: pairs)", "", "| step | tokens/s | s/step | peak GPU MiB (allocated / reserved) |", "|---|---|---|---|"]
    for label, key, peak_key in (("SFT", "sft", "sft_step"), ("reward model", "reward", "reward_step")):
        lines.append(f"| {label} | {num(steps[f'{key}_tokens_per_s'], 0)} | {num(steps[f'{key}_s_per_step'])} | "
                     f"{num(peak[peak_key], 0)} / {num(reserved[peak_key], 0)} |")
    lines += ["", "## Steps", "", "| step | status | seconds | command |", "|---|---|---|---|"]
    for name, run in result["runs"].items():
        status = run["status"] + (f" ({run.get('error') or run['reason']})" if run["status"] != "ok" else "")
        lines.append(f"| {name} | {status} | {run.get('seconds', '–')} | `{run.get('command', '')}` |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md, gpu_check.log")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU (about a minute)")
    parser.add_argument("--budget_s", type=float, help="seconds all steps may take together (default: 430 GPU, 240 tiny)")
    parser.add_argument("--command", default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    start = time.perf_counter()
    settings = tiny_settings() if cli.tiny else gpu_settings()
    if cli.budget_s is not None:
        settings["budget_s"] = cli.budget_s
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"schema": "gpu_check/1", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "command": cli.command or shlex.join(["python", *sys.argv]), "settings": settings}
    with open(out / "gpu_check.log", "a", encoding="utf-8") as log:
        def say(message: str) -> None:
            print(message, flush=True)
            log.write(message + "\n")
            log.flush()

        env = result["environment"] = environment()
        say(f"gpu_check: {env['python']} Python {env['python_version']}, torch {env['torch']}, CUDA available {env['cuda_available']}"
            f" ({env['gpu'] or 'no GPU'}); pinned deps {'all as pinned' if env['pinned_deps']['all_match'] else 'differ'}; "
            f"trl: {env['trl']}; .venv: {env['venv']['detail']}")
        problem = failure_line(env, cli.tiny)
        if problem:
            result.update(status="failed", error=problem, seconds=round(time.perf_counter() - start, 1))
            write_json(out / "gpu_check.json", result)
            write_text(out / "gpu_check.md", markdown(result))
            log.write(f"gpu_check: {problem}\n")
            print(f"gpu_check: {problem}", file=sys.stderr)
            return 2
        runs: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            for step in plan_steps(settings, env):
                left = settings["budget_s"] - (time.perf_counter() - start)
                if step.get("skip"):
                    runs[step["name"]] = {"status": "skipped", "reason": step["skip"]}
                    say(f"gpu_check: {step['name']}: {step['skip']}")
                    continue
                if left < settings["min_step_s"]:
                    runs[step["name"]] = {"status": "out of time", "error": f"{left:.0f} s of the {settings['budget_s']:.0f} s budget left"}
                    say(f"gpu_check: {step['name']}: out of time ({runs[step['name']]['error']})")
                    continue
                say(f"gpu_check: {step['name']} (at most {min(step['cap_s'], left):.0f} s) ...")
                runs[step["name"]] = run_step(step, Path(work), log, min(step["cap_s"], left))
                run = runs[step["name"]]
                say(f"gpu_check: {step['name']}: {run['status']} in {run['seconds']} s" + (f": {run['error']}" if run["status"] != "ok" else ""))
                for line in run.get("log_tail", []):
                    say(f"    {line}")
        result.update(summarize(runs), runs=runs)
        failed = [n for n, r in runs.items() if r["status"] not in ("ok", "skipped")]
        result["status"] = "ok" if not failed else "partial: " + ", ".join(failed)
        result["seconds"] = round(time.perf_counter() - start, 1)
        write_json(out / "gpu_check.json", result)
        write_text(out / "gpu_check.md", markdown(result))
        say(markdown(result))
        say(f"gpu_check: {result['status']} in {result['seconds']:.0f} s; wrote {out}/gpu_check.json, gpu_check.md, gpu_check.log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
