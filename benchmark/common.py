"""What the benchmark scripts share: model shapes, random-weight models, the machine's load and matmul
ceiling, FLOP counts, peak memory, one subprocess per measured case, medians and the results table.

Nothing here is imported by the pipeline; the scripts in this folder import it as a sibling module.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
EOS_TOKEN_ID = 0
"""GPT-NeoX's `<|endoftext|>` (and the embedded tokenizer's): id 0"""


@dataclass
class MeasureArgs:
    """The options both benchmarks share: where to run, how many timed repeats, the matmul ceiling, and the
    plumbing of the one-process-per-case runs."""

    device: Literal["cpu", "cuda"] = "cpu"
    """where to run"""
    warmup: int = 1
    """untimed repeats first (lazy initialisation, allocator warm-up)"""
    repeats: int = 5
    """timed repeats; the table shows their median"""
    threads: int | None = None
    """torch CPU threads (default: torch's own choice, one per core)"""
    seed: int = 1
    """seed of the weights, the tokens and the sampling"""
    output_dir: str = "benchmark/results"
    """where `{name}.json` and `{name}.md` are written"""
    ceiling_seconds: float = 2.0
    """seconds spent measuring the matmul ceiling, at the start and again at the end of the run"""
    case_timeout: float = 3600.0
    """seconds one case's process may run"""
    case_json: str | None = None
    """internal: run one case in this process (the parent passes it)"""
    case_output: str | None = None
    """internal: where that case writes its JSON result"""


@dataclass(frozen=True)
class Shape:
    """A GPT-NeoX (Pythia-architecture) shape: rotary on 25% of each head, parallel residual, untied head."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    """embedding rows (Pythia: 50,304)"""
    pad_token_id: int
    """the [PAD] id the tokenizer would add (Pythia: 50277, the first id after its 50,277 tokens)"""


def _embedded_tiny() -> Shape:
    from summarize_from_feedback_details.embedded import MODEL_SIZES, VOCAB_SIZE, embedding_rows

    size = MODEL_SIZES[0]  # tiny-pythia-s, the size the stage tests train
    return Shape("tiny", size.hidden_size, size.num_layers, size.num_heads, 4 * size.hidden_size, embedding_rows(VOCAB_SIZE), VOCAB_SIZE)


SHAPES: dict[str, Any] = {
    "tiny": _embedded_tiny,
    "pythia-14m": lambda: Shape("pythia-14m", 128, 6, 4, 512, 50304, 50277),
    "pythia-70m": lambda: Shape("pythia-70m", 512, 6, 8, 2048, 50304, 50277),
    "pythia-160m": lambda: Shape("pythia-160m", 768, 12, 12, 3072, 50304, 50277),
    "pythia-1b": lambda: Shape("pythia-1b", 2048, 16, 8, 8192, 50304, 50277),
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise SystemExit(f"error: unknown --shape {name!r}; choose one of {sorted(SHAPES)}")
    return SHAPES[name]()


def neox_config(shape: Shape) -> Any:
    """The transformers config of `shape`, dropout off (Detail 7), like the embedded and Pythia models."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, intermediate_size=shape.intermediate_size, max_position_embeddings=2048,
        rotary_pct=0.25, use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0,
        tie_word_embeddings=False, bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
    )


def random_queries(shape: Shape, batch_size: int, query_length: int, max_left_padding: int, seed: int) -> list[list[int]]:
    """`batch_size` left-padded queries of `query_length` tokens: random ids (never EOS or [PAD]) after
    0..max_left_padding [PAD]s per row, spread evenly over the rows in a random order, so the batch's padding
    is max_left_padding / 2 on average whatever the seed (0.6 x 512: 30%, like the real TL;DR queries: 32% of
    512 on the 1,945 posts in shared/data). Detail 3.2: left padding."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, shape.pad_token_id, (batch_size, query_length), generator=generator)
    spread = torch.linspace(0, max_left_padding, batch_size).round().long() if batch_size > 1 else torch.tensor([max_left_padding // 2])
    pads = spread[torch.randperm(batch_size, generator=generator)]
    positions = torch.arange(query_length)[None, :]
    return tokens.masked_fill(positions < pads[:, None], shape.pad_token_id).tolist()


def build_on(device: str) -> Any:
    """A context in which models are built directly on `device`: on a GPU, random initialisation there (a 1B model's
    on the CPU takes longer than its PPO update on the GPU); on the CPU nothing changes."""
    import contextlib

    import torch

    return torch.device(device) if device == "cuda" else contextlib.nullcontext()


def setup_torch(threads: int | None, seed: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# FLOPs (matmuls only: embeddings, norms, softmax and the optimizer are not counted)
# ----------------------------------------------------------------------------------------------
def linear_flops_per_token(shape: Shape) -> float:
    """Matmul FLOPs of one position through one layer's linear maps: qkv (3 d^2), dense (d^2), MLP (2 d f)."""
    d, f = shape.hidden_size, shape.intermediate_size
    return 2 * (4 * d * d + 2 * d * f)


def forward_flops(shape: Shape, batch: int, tokens: int, head_positions: int, head_width: int) -> float:
    """Matmul FLOPs of one forward of `batch` sequences of `tokens` through the transformer, plus an output
    head of width `head_width` (the vocabulary, or 1 for a scalar head) on `head_positions` per sequence.
    Attention counts the full `tokens x tokens` score matrix (what the non-flash CPU kernels compute)."""
    d = shape.hidden_size
    per_token_per_layer = linear_flops_per_token(shape) + 2 * 2 * tokens * d  # qkv + dense + mlp, QK^T + AV
    return batch * (shape.num_layers * tokens * per_token_per_layer + 2 * head_positions * d * head_width)


def unpadded_row_forward_flops(shape: Shape, row_tokens: int, kept: int, head_width: int) -> float:
    """Matmul FLOPs of one row through `ppo.py --skip_left_padding`'s forward (`hidden_without_left_padding`): the
    row's `row_tokens` unpadded positions through every layer but the last with causal attention (the kernel skips
    the upper triangle: T(T+1)/2 scores), the last layer's keys and values everywhere but its queries, dense and
    MLP only at the `kept` positions read, and a head of `head_width` there."""
    d, f, n = shape.hidden_size, shape.intermediate_size, row_tokens
    layer = n * linear_flops_per_token(shape) + 2 * 2 * d * n * (n + 1) / 2
    last_keys_values = n * 2 * (2 * d * d)
    last_kept = kept * 2 * (2 * d * d + 2 * d * f) + 2 * 2 * d * (kept * (n - kept) + kept * (kept + 1) / 2)
    return (shape.num_layers - 1) * layer + last_keys_values + last_kept + 2 * kept * d * head_width


def training_flops(forward: float) -> float:
    """forward + backward (input and weight gradients: 2x the forward)."""
    return 3.0 * forward


def matmul_ceiling(device: str, dtype: str, seconds: float = 2.0) -> dict[str, float]:
    """The measured matmul throughput of this machine: square products, the best of several sizes, each the
    median of repeated timings (after a warm-up) within about `seconds`. `flops`: per wall-clock second;
    `flops_per_cpu_second`: per second of this process's CPU time (on a shared CPU the fair ceiling for work
    also counted in CPU time: what other processes take does not count against either)."""
    import torch

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    sizes = (4096, 8192) if device == "cuda" else (512, 1024, 2048)
    best: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch_dtype)
        b = torch.randn(n, n, device=device, dtype=torch_dtype)
        times: list[float] = []
        cpu_times: list[float] = []
        deadline = time.perf_counter() + seconds / len(sizes)
        torch.matmul(a, b)
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            torch.matmul(a, b)
            synchronize(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        rate = 2 * n**3 / statistics.median(times)
        if rate > best.get("flops", 0.0):
            best = {"flops": rate, "n": n}
        cpu_rate = 2 * n**3 / max(statistics.median(cpu_times), 1e-9)
        if device == "cpu" and cpu_rate > best.get("flops_per_cpu_second", 0.0):
            best["flops_per_cpu_second"] = cpu_rate
    return best


PER_CPU_SECOND = " per CPU-second"
"""on CPU both the ceiling and the achieved rate are per second of the process's CPU time (fair on a shared machine)"""


def best_ceiling(start: dict[str, float], end: dict[str, float], device: str) -> float:
    """The higher of the two ceiling measurements: per CPU-second on CPU, per wall-clock second on GPU."""
    key = "flops_per_cpu_second" if device == "cpu" else "flops"
    return max(start[key], end[key])


def achieved_flops(case: dict[str, Any], flops_key: str, wall_key: str, cpu_key: str) -> float:
    """FLOPs of a case over its median time: CPU time on CPU, wall-clock time on GPU."""
    return case[flops_key] / case[cpu_key if case["device"] == "cpu" else wall_key]


def ceiling_note(ceiling: float, device: str) -> str:
    unit = "GFLOP per CPU-second (this process's, threads as set)" if device == "cpu" else "GFLOP/s"
    return f"\n\nmatmul ceiling (measured in this run): {ceiling / 1e9:.1f} {unit}"


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Memory and machine load
# ----------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_ticks() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as stat:
        return [int(x) for x in stat.readline().split()[1:]]


def machine_load(before: list[int], after: list[int], own_cpu_seconds: float, wall_seconds: float) -> dict[str, float]:
    """How busy the machine was between two /proc/stat readings: the share of all CPU time that was busy,
    stolen by the hypervisor, and used by processes other than ours (`own_cpu_seconds`)."""
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta[:8]) or 1
    idle = delta[3] + delta[4]
    hz = os.sysconf("SC_CLK_TCK")
    cpus = os.cpu_count() or 1
    busy_share = (total - idle) / total
    own_share = own_cpu_seconds / max(wall_seconds * cpus, 1e-9)
    return {
        "busy": round(busy_share, 3),
        "steal": round(delta[7] / total, 3),
        "others": round(max(busy_share - own_share, 0.0), 3),
        "ticks_per_second": hz,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def machine_description() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info: dict[str, Any] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version(), "processor": cpu_model()}
    for package in ("transformers", "accelerate", "trl"):  # versions without importing them (seconds each)
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ----------------------------------------------------------------------------------------------
# Cases in subprocesses (a fresh process per case: its peak RSS is that case's alone)
# ----------------------------------------------------------------------------------------------
def run_case(script: Path, case: dict[str, Any], output: Path, timeout: float) -> dict[str, Any]:
    """Run `script --case_json ... --case_output ...` as a subprocess and return its JSON result, with the
    machine's load while it ran."""
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
               [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])}
    before, start = cpu_ticks(), time.perf_counter()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, str(script), "--case_json", json.dumps(case), "--case_output", str(output)],
                            capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (children.ru_utime - children_before.ru_utime) + (children.ru_stime - children_before.ru_stime)
    if result.returncode != 0:
        raise RuntimeError(f"case {case} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    data = json.loads(output.read_text())
    data["load"] = machine_load(before, cpu_ticks(), own, wall)
    data["process_seconds"] = round(wall, 1)
    return data


def summarize_times(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": [round(t, 4) for t in times]}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def command_line() -> str:
    """The exact command that produced a result, for the README."""
    import shlex

    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
