"""Size and seconds of one PPO checkpoint (checkpoint.py) at a Pythia shape on this machine: the policy and the
critic (one module, one AdamW with its two moment buffers filled by one step), the scheduler, the trainer state.

    python benchmark/bench_checkpoint.py                       # pythia-160m on the CPU, 3 writes and loads
    python benchmark/bench_checkpoint.py --shape pythia-70m --repeats 1

Writes benchmark/results/checkpoint_{shape}.json and .md. Random weights; the page cache is not dropped between a
write and a load (the load reads from memory, as a resume right after a preemption on the same node often does).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    SHAPES,
    Shape,
    command_line,
    get_shape,
    machine_description,
    markdown_table,
    neox_config,
)

SHAPES.setdefault("pythia-160m", lambda: Shape("pythia-160m", 768, 12, 12, 3072, 50304, 50277))


@dataclasses.dataclass
class Args:
    shape: str = "pythia-160m"
    """model shape (policy and critic of this shape)"""
    repeats: int = 3
    """timed writes and loads; the table shows their median"""
    threads: int | None = None
    """torch CPU threads"""
    output_dir: str = "benchmark/results"


def main(args: Args) -> dict:
    import torch
    from accelerate import Accelerator
    from transformers import GPTNeoXForCausalLM

    from summarize_from_feedback_details import checkpoint
    from summarize_from_feedback_details.modeling import ScalarModel, ScalarModelConfig
    from summarize_from_feedback_details.ppo import PolicyAndValue
    from summarize_from_feedback_details.training import make_optimizer_and_scheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    shape = get_shape(args.shape)
    config = neox_config(shape)
    critic = ScalarModel(ScalarModelConfig(base_config=config.to_dict()))
    model = PolicyAndValue(GPTNeoXForCausalLM(config), critic)
    optimizer, scheduler = make_optimizer_and_scheduler(model, 3e-6, 1e-5, "linear", 0, 100)
    for p in model.parameters():  # one step fills AdamW's exp_avg and exp_avg_sq
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    scheduler.step()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    parameters = sum(p.numel() for p in model.parameters())
    state = {"metrics": {f"last/m{i}": float(i) for i in range(40)}, "kl_coef": 0.05, "shuffle": {"state": 1}}
    writes, loads, sizes = [], [], []
    root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    try:
        for repeat in range(args.repeats):
            run_dir = root / f"run{repeat}"
            trainer = {"update": repeat + 1, "seconds": 1.0, "scheduler": scheduler.state_dict(), "state": state}
            start = time.perf_counter()
            path = checkpoint.save(accelerator, run_dir, repeat + 1, {"seed": 1}, trainer, 2, True, 0)
            writes.append(time.perf_counter() - start)
            sizes.append(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
            start = time.perf_counter()
            assert checkpoint.problem(path) is None
            checkpoint.load(accelerator, path, 0)
            loads.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "shape": dataclasses.asdict(shape), "parameters": parameters, "bytes": sizes[0],
        "bytes_per_parameter": sizes[0] / parameters, "write_seconds": writes, "load_seconds": loads,
        "write_median": statistics.median(writes), "load_median": statistics.median(loads),
        "torch_threads": torch.get_num_threads(), "machine": machine_description(), "command": command_line(),
    }
    out = REPO / args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / f"checkpoint_{args.shape}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(["shape", "parameters (policy + critic)", "checkpoint MB", "bytes / parameter", "write s", "load s"],
                           [[args.shape, f"{parameters:,}", f"{sizes[0] / 1e6:.0f}", f"{sizes[0] / parameters:.1f}",
                             f"{statistics.median(writes):.2f}", f"{statistics.median(loads):.2f}"]])
    (out / f"checkpoint_{args.shape}.md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
