"""Time SFT and reward-model training steps (forward + backward + AdamW step, the stages' inner loop) in
tokens/s, with each case's peak RSS (one process per case) and its achieved FLOP/s as a share of the
matmul ceiling measured in the same run.

    python benchmark/bench_steps.py                                  # CPU fp32: tiny, pythia-14m, pythia-70m
    python benchmark/bench_steps.py --device cuda --dtype bf16 --shapes pythia-1b

The SFT step is `sft.py`'s (`sft_loss` on the logits of `query + reference`, Detail 9); the RM step is
`reward.py`'s (`pair_scores` of chosen and rejected in one forward, `bradley_terry_loss`, Details 10-12);
both through the stage's accelerator and `make_optimizer_and_scheduler`.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from summarize_from_feedback_details.core import write_text  # noqa: E402

STAGES = ("sft", "reward")


@dataclass
class Args(common.MeasureArgs):
    shapes: tuple[str, ...] = ("tiny", "pythia-14m", "pythia-70m")
    """model shapes: tiny (the embedded tiny-pythia-s), pythia-14m, pythia-70m, pythia-1b"""
    stages: tuple[Literal["sft", "reward"], ...] = STAGES
    """which training steps to time"""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast around the step"""
    batch_size: int = 8
    """sequences per SFT step; comparison pairs per RM step (2 x this many sequences)"""
    sequence_length: int = 565
    """tokens per sequence: the 512-token query + 53 response tokens (SPEC 2.3, Detail 4)"""
    max_right_padding_fraction: float = 0.1
    """each sequence ends with 0..this share of --sequence_length [PAD]s (responses shorter than 53 tokens)"""
    name: str | None = None
    """results file name (default: steps_{device}_{dtype})"""


def step_flops(case: dict[str, Any]) -> float:
    """Matmul FLOPs of one step, forward + backward: SFT has vocabulary logits at every position, the RM a
    scalar head over 2 x batch sequences."""
    shape = common.get_shape(case["shape"])
    tokens = case["sequence_length"]
    if case["stage"] == "sft":
        return common.training_flops(common.forward_flops(shape, case["batch_size"], tokens, tokens, shape.vocab_size))
    return common.training_flops(common.forward_flops(shape, 2 * case["batch_size"], tokens, tokens, 1))


def right_padded_tokens(shape: common.Shape, rows: int, length: int, max_padding: int, seed: int) -> Any:
    """Random token ids (never [PAD]) with an EOS and then 0..max_padding [PAD]s at the end of each row."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, shape.pad_token_id, (rows, length), generator=generator)
    ends = length - torch.randint(0, max_padding + 1, (rows,), generator=generator)  # first pad position
    positions = torch.arange(length)[None, :]
    tokens = tokens.masked_fill(positions == (ends[:, None] - 1), common.EOS_TOKEN_ID)
    return tokens.masked_fill(positions >= ends[:, None], shape.pad_token_id)


def run_step_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import GPTNeoXForCausalLM

    from summarize_from_feedback_details import reward, sft
    from summarize_from_feedback_details.core import plan_batches
    from summarize_from_feedback_details.modeling import (
        ScalarModel,
        ScalarModelConfig,
        disable_dropout,
        dropout_free_config,
    )
    from summarize_from_feedback_details.training import Stage, make_optimizer_and_scheduler

    common.setup_torch(case["threads"], case["seed"])
    shape = common.get_shape(case["shape"])
    batch, steps = case["batch_size"], case["warmup"] + case["repeats"]
    config = dropout_free_config(common.neox_config(shape))
    pad = shape.pad_token_id
    max_padding = int(case["max_right_padding_fraction"] * case["sequence_length"])
    with tempfile.TemporaryDirectory() as run_dir:
        stage_module = sft if case["stage"] == "sft" else reward
        args = stage_module.Args(seed=case["seed"], output_dir=run_dir, batch_size=batch, local_micro_batch_size=batch,
                                 total_episodes=batch * steps, mixed_precision="bf16" if case["dtype"] == "bf16" else "no")
        stage = Stage.start(args)
        with common.build_on(case["device"]):
            if case["stage"] == "sft":
                model = disable_dropout(GPTNeoXForCausalLM(config))
            else:  # Detail 10/11: an SFT backbone + a fresh scalar head
                model = disable_dropout(ScalarModel(ScalarModelConfig(base_config=config.to_dict())))
        optimizer, _ = make_optimizer_and_scheduler(model, args.lr, args.eps, args.scheduler, args.warm_up_steps, steps)
        plan = plan_batches(batch, batch, stage.world_size, batch * steps, case["stage"])
        accelerator = stage.accelerator(plan)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        device = accelerator.device
        rows = batch if case["stage"] == "sft" else 2 * batch
        tokens = right_padded_tokens(shape, rows, case["sequence_length"], max_padding, case["seed"]).to(device)
        result: dict[str, Any] = {"rss_after_setup_mib": common.current_rss_mib()}
        times, cpu_times = [], []
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if case["dtype"] == "bf16" else contextlib.nullcontext()
        with autocast:
            for _ in range(steps):
                common.synchronize(device.type)
                start, cpu_start = time.perf_counter(), time.process_time()
                with accelerator.accumulate(model):
                    if case["stage"] == "sft":  # sft.py's inner loop (Detail 9: loss on query + reference)
                        logits = model(**stage.inputs(tokens, pad)).logits
                        loss = sft.sft_loss(logits, tokens, pad)
                    else:  # reward.py's inner loop (Detail 12: the reward at the EOS of each sequence)
                        chosen, rejected = reward.pair_scores(model, tokens[:batch], tokens[batch:], pad)
                        loss = reward.bradley_terry_loss(chosen, rejected)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                loss.item()  # the stages read the loss (the logged statistics)
                common.synchronize(device.type)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    timed = times[case["warmup"]:]
    summary = common.summarize_times(timed)
    summary["cpu_median_s"] = statistics.median(cpu_times[case["warmup"]:])
    result.update(summary, stage=case["stage"], device=case["device"], tokens_per_step=rows * case["sequence_length"],
                  non_pad_tokens_per_step=int((tokens != pad).sum()), flops=step_flops(case),
                  tokens_per_s=rows * case["sequence_length"] / summary["median_s"])
    if case["device"] == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return result


def steps_table(cases: list[dict[str, Any]], ceiling: float, gpu: bool) -> str:
    """One row per (shape, step): median s/step, tokens/s, peak RSS (and GPU memory), achieved FLOP/s as a
    share of the measured matmul ceiling, how busy the machine was."""
    header = ["shape", "step", "s/step: wall (CPU)", "tokens/s: wall (CPU)", "peak RSS MiB",
              "GFLOP/s (share of ceiling)" + ("" if gpu else common.PER_CPU_SECOND), "machine busy / steal"]
    if gpu:
        header.insert(5, "peak GPU MiB")
    rows = []
    for case in cases:
        achieved = common.achieved_flops(case, "flops", "median_s", "cpu_median_s")
        load = case.get("load", {})
        row = [case["shape"], case["stage"], f"{case['median_s']:.3f} ({case['cpu_median_s']:.3f})", f"{case['tokens_per_s']:.0f} ({case['tokens_per_step'] / case['cpu_median_s']:.0f})",
               f"{case['peak_rss_mib']:.0f}", f"{achieved / 1e9:.1f} ({achieved / ceiling:.1%})",
               f"{load.get('busy', float('nan')):.0%} / {load.get('steal', float('nan')):.0%}"]
        if gpu:
            row.insert(5, f"{case.get('cuda_peak_mib', 0):.0f}")
        rows.append(row)
    return common.markdown_table(header, rows) + common.ceiling_note(ceiling, "cuda" if gpu else "cpu")


def main(args: Args) -> dict[str, Any]:
    from summarize_from_feedback_details.core import write_json

    for shape in args.shapes:
        common.get_shape(shape)
    if args.warmup < 0 or args.repeats < 1:
        raise SystemExit("error: --warmup must be >= 0 and --repeats >= 1")
    name = args.name or f"steps_{args.device}_{args.dtype}"
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    common.setup_torch(args.threads, args.seed)
    results: dict[str, Any] = {"command": common.command_line(), "args": asdict(args), "machine": common.machine_description(), "cases": []}
    results["matmul_ceiling_start"] = common.matmul_ceiling(args.device, args.dtype, args.ceiling_seconds)
    settings = {k: getattr(args, k) for k in ("device", "dtype", "batch_size", "sequence_length", "max_right_padding_fraction",
                                              "warmup", "repeats", "threads", "seed")}
    for shape in args.shapes:
        for stage in args.stages:
            case = {**settings, "shape": shape, "stage": stage}
            print(f"{shape} {stage} ...", flush=True)
            result = common.run_case(Path(__file__), case, out / f".{name}_case.json", args.case_timeout)
            (out / f".{name}_case.json").unlink(missing_ok=True)
            results["cases"].append({"shape": shape, **result})
            print(f"  {result['tokens_per_s']:.0f} tokens/s, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    results["matmul_ceiling_end"] = common.matmul_ceiling(args.device, args.dtype, args.ceiling_seconds)
    ceiling = common.best_ceiling(results["matmul_ceiling_start"], results["matmul_ceiling_end"], args.device)
    results["table"] = steps_table(results["cases"], ceiling, args.device == "cuda")
    write_json(out / f"{name}.json", results)
    write_text(out / f"{name}.md", f"`{results['command']}`\n\n{results['table']}\n")
    print(results["table"])
    return results


if __name__ == "__main__":
    import tyro

    cli_args = tyro.cli(Args, description=__doc__.splitlines()[0], use_underscores=True)
    if cli_args.case_json is not None:
        from summarize_from_feedback_details.core import write_json

        output = run_step_case(json.loads(cli_args.case_json))
        output["peak_rss_mib"] = common.peak_rss_mib()
        write_json(cli_args.case_output, output)
    else:
        main(cli_args)
