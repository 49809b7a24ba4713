"""Time one full PPO update (rollout + 4 epochs of training) of our `ppo.py` code path (and of `rloo.py`'s update,
`--implementations ours ours_rloo`) against TRL 1.12's
PPO trainer (`trl.experimental.ppo`, the benchmark-only `bench` extra) at identical settings, side by side
in one run: the same random-weight GPT-NeoX shapes, batch, left-padded queries, 53 response tokens,
4 PPO epochs, 1 minibatch, temperature 0.7. Each (shape, implementation) runs in its own process, so its
peak RSS is its own; the matmul ceiling of the machine is measured in the same run.

    python benchmark/bench_ppo.py                                   # CPU, fp32: tiny, pythia-14m, pythia-70m
    python benchmark/bench_ppo.py --dtype bf16                      # the same under bf16 autocast
    python benchmark/bench_ppo.py --device cuda --dtype bf16 --shapes pythia-1b
    python benchmark/bench_ppo.py --shapes pythia-14m --implementations ours --profile   # torch.profiler table
    python benchmark/bench_ppo.py --shapes pythia-14m pythia-70m --implementations ours ours_rloo --name rloo_vs_ppo_cpu_fp32

Our update is `ppo.py`'s loop body, factored into `ours_update` below, calling the same functions
(`modeling.sample`, `response_logits`, `sequence_scores`, `per_token_rewards`, GAE, `ppo_losses`, one
AdamW over `PolicyAndValue`, the stage's accelerator). Neither side runs a validation generation in the
timed updates (ours: `--eval_every 0`; TRL: `num_sample_generations=0`).
"""

from __future__ import annotations

import contextlib
import copy
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

IMPLEMENTATIONS = ("ours", "trl")
PROPOSED = "ours_proposed"
RLOO = "ours_rloo"
"""rloo.py's update (k 2, no critic) through the same harness: the same rollouts per update (batch / 2 prompts x 2)"""


@dataclass
class Args(common.MeasureArgs):
    shapes: tuple[str, ...] = ("tiny", "pythia-14m", "pythia-70m")
    """model shapes to time: tiny (the embedded tiny-pythia-s), pythia-14m, pythia-70m, pythia-1b"""
    implementations: tuple[Literal["ours", "trl", "ours_proposed", "ours_rloo"], ...] = IMPLEMENTATIONS
    """which PPO updates to time (trl needs `pip install trl==1.12.0`, the benchmark-only extra); ours_proposed:
    ours with ppo.py's CPU speed-up flags (--sampler inverse_cdf --skip_left_padding); ours_rloo: rloo.py's update (k 2)"""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast around the whole update (rollouts and training) for both implementations"""
    bf16_scope: Literal["update", "training"] = "update"
    """with --dtype bf16: `update` autocasts the whole update (both implementations); `training` only what `ppo.py
    --mixed_precision bf16` autocasts without --deepspeed, the training forward of `PolicyAndValue` (accelerate wraps
    it): the sampler and the rollouts' reference, value and reward forwards stay fp32 (ours only)"""
    batch_size: int = 8
    """rollouts per update (= the one minibatch = the micro-batch: no gradient accumulation)"""
    query_length: int = 512
    """query tokens per rollout, left-padded (SPEC 2.3: 512)"""
    max_left_padding_fraction: float = 0.6
    """the queries start with 0..this share of --query_length [PAD]s, spread evenly over the batch (0.6: 30% padding
    on average, like the real TL;DR queries: 32%, median 350 of 512 tokens)"""
    response_length: int = 53
    """tokens sampled per query (Detail 20)"""
    num_ppo_epochs: int = 4
    """passes over each batch of rollouts (Detail 20)"""
    temperature: float = 0.7
    """sampling temperature (Detail 20)"""
    lr: float = 3e-6
    """AdamW learning rate of both (G-1)"""
    name: str | None = None
    """results file name (default: ppo_{device}_{dtype})"""
    lora_r: int = 0
    """ours: LoRA adapters of this rank on the policy and the critic (`lora.py`; 0: full fine-tuning); the reference
    policy is then the policy with its adapters off, not a copy"""
    gradient_checkpointing: bool = False
    """ours: gradient checkpointing on the policy and the critic (`lora.py`)"""
    profile: bool = False
    """also run one extra update of ours under torch.profiler and save the phases and top operators
    ({name}_profile_{shape}_{implementation}.txt); the profiler's memory counts in that case's peak RSS"""


# ----------------------------------------------------------------------------------------------
# Shared by both implementations
# ----------------------------------------------------------------------------------------------
def autocast(device: str, dtype: str) -> Any:
    import torch

    if dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_phase_flops(case: dict[str, Any]) -> float:
    """Matmul FLOPs of our training phase per update: each epoch, the policy forward (vocabulary logits for
    the response positions only) and the critic forward, forward + backward. The padded batch (`ours`): every
    position, attention over the full masked square, the critic's head everywhere. `ours_proposed`
    (--skip_left_padding): each row's own positions, causal attention, the last layer pruned to the 53 positions read
    (`common.unpadded_row_forward_flops`): the work done, not the padded batch's."""
    shape = common.get_shape(case["shape"])
    tokens = case["query_length"] + case["response_length"]
    kept = case["response_length"]
    if case["implementation"] == PROPOSED:
        queries = common.random_queries(shape, case["batch_size"], case["query_length"], case["max_left_padding"], case["seed"])
        forward = 0.0
        for query in queries:
            row_tokens = tokens - 1 - sum(token == shape.pad_token_id for token in query)  # cut after the last position read
            forward += common.unpadded_row_forward_flops(shape, row_tokens, kept, shape.vocab_size)
            forward += common.unpadded_row_forward_flops(shape, row_tokens, kept, 1)
    else:
        policy = common.forward_flops(shape, case["batch_size"], tokens, kept, shape.vocab_size)
        critic = common.forward_flops(shape, case["batch_size"], tokens, tokens, 1) if case["implementation"] != RLOO else 0.0
        forward = policy + critic
    return case["num_ppo_epochs"] * common.training_flops(forward)


# ----------------------------------------------------------------------------------------------
# Ours: ppo.py's update
# ----------------------------------------------------------------------------------------------
@dataclass
class OursContext:
    """Everything `ppo.main` holds across updates."""

    args: Any
    plan: Any
    stage: Any
    accelerator: Any
    model: Any
    unwrapped: Any
    ref_policy: Any
    reward_model: Any
    optimizer: Any
    scheduler: Any
    kl_controller: Any
    train: Any
    prompts: Any
    shuffle: Any
    pad: int
    eos: int
    loss_temperature: float | None
    device: Any


def ours_setup(case: dict[str, Any], run_dir: str) -> OursContext:
    """`ppo.main` up to its update loop, with random-weight models in place of the SFT / RM checkpoints
    (Detail 22: policy and reference alike, critic a copy of the reward model)."""
    import datasets
    import numpy as np
    from transformers import GPTNeoXForCausalLM

    from summarize_from_feedback_details import lora, ppo, rl, rloo
    from summarize_from_feedback_details.modeling import (
        ScalarModel,
        ScalarModelConfig,
        disable_dropout,
        dropout_free_config,
    )
    from summarize_from_feedback_details.training import Stage, make_optimizer_and_scheduler

    shape = common.get_shape(case["shape"])
    batch = case["batch_size"]
    is_rloo = case["implementation"] == RLOO
    args = (rloo.Args if is_rloo else ppo.Args)(
        seed=case["seed"], output_dir=run_dir, lr=case["lr"], batch_size=batch, num_mini_batches=1, local_micro_batch_size=batch,
        local_rollout_forward_batch_size=batch, num_ppo_epochs=case["num_ppo_epochs"], response_length=case["response_length"],
        temperature=case["temperature"], total_episodes=batch * case["num_updates"], eval_every=0,
        mixed_precision="bf16" if case["dtype"] == "bf16" else "no",
        sampler="inverse_cdf" if case["implementation"] == PROPOSED else "multinomial",
        skip_left_padding=case["implementation"] == PROPOSED,
    )
    stage = Stage.start(args)
    plan = rl.plan_ppo(args, stage.world_size)
    config = common.neox_config(shape)
    with common.build_on(case["device"]):
        policy = disable_dropout(GPTNeoXForCausalLM(dropout_free_config(config)))
        ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)
        reward_model = disable_dropout(ScalarModel(ScalarModelConfig(base_config=config.to_dict()))).eval()
        critic = copy.deepcopy(reward_model)
    reward_model.requires_grad_(False)
    # --lora_r / --gradient_checkpointing (lora.py): as ppo.py applies them; LoRA's reference is the policy, adapters off
    memory = lora.LoraArgs(lora_r=case.get("lora_r", 0), gradient_checkpointing=case.get("gradient_checkpointing", False))
    policy, critic = lora.prepare_trained(policy, memory, "random"), lora.prepare_trained(critic, memory, "random")
    ref_policy = None if memory.lora_r else ref_policy
    model = rloo.Policy(policy) if is_rloo else ppo.PolicyAndValue(policy, critic)
    optimizer, scheduler = make_optimizer_and_scheduler(model, args.lr, args.eps, args.scheduler, args.warm_up_steps, plan.num_updates)
    accelerator = stage.accelerator(plan.mini)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    if ref_policy is not None:
        ref_policy.to(device)
    reward_model.to(device)
    queries = common.random_queries(shape, batch, case["query_length"], case["max_left_padding"], case["seed"])
    train = datasets.Dataset.from_dict({"query_token": queries})
    return OursContext(
        args=args, plan=plan, stage=stage, accelerator=accelerator, model=model, unwrapped=accelerator.unwrap_model(model),
        ref_policy=ref_policy, reward_model=reward_model, optimizer=optimizer, scheduler=scheduler,
        kl_controller=ppo.FixedKLController(args.kl_coef), train=train,
        prompts=rloo.grouped_prompt_batches(len(train), args.batch_size, args.rloo_k, stage.rank, stage.world_size, args.seed)
        if is_rloo else rl.prompt_batches(len(train), args.batch_size, stage.rank, stage.world_size, args.seed),
        shuffle=np.random.default_rng(args.seed + stage.rank * 100003), pad=shape.pad_token_id, eos=common.EOS_TOKEN_ID,
        loss_temperature=args.temperature if args.scale_logits_by_temperature else None, device=device,
    )


def ours_update(ctx: OursContext) -> dict[str, float]:
    """One update of `ppo.main`'s loop through the stage's own functions (rollouts with rewards and GAE,
    num_ppo_epochs of clipped PPO, the scheduler step, the per-update statistics reduced to floats); returns the
    phase times."""
    import torch
    from torch.profiler import record_function

    from summarize_from_feedback_details import ppo, rloo
    from summarize_from_feedback_details.training import batch_tensor

    args, accelerator = ctx.args, ctx.accelerator
    stage_module = rloo if isinstance(args, rloo.Args) else ppo
    start, cpu_start = time.perf_counter(), time.process_time()
    queries = batch_tensor(ctx.train.select(next(ctx.prompts)), "query_token", ctx.device)
    if stage_module is rloo:  # rloo.py's update: k samples per prompt, leave-one-out advantages, no critic
        batch = rloo.collect_rollouts(ctx.unwrapped.policy, ctx.ref_policy, ctx.reward_model, queries, args, True, ctx.pad,
                                      ctx.eos, args.response_length, ctx.loss_temperature)
    else:
        batch = ppo.collect_rollouts(ctx.unwrapped, ctx.ref_policy, ctx.reward_model, queries, args, ctx.kl_controller.value,
                                     ctx.pad, ctx.eos, args.response_length, ctx.loss_temperature)
    common.synchronize(ctx.device.type)
    rollout_end, rollout_cpu_end = time.perf_counter(), time.process_time()
    if stage_module is rloo:
        stats, ratios = rloo.train_on_rollouts(ctx.model, accelerator, ctx.optimizer, batch, args, ctx.plan, ctx.shuffle,
                                               ctx.pad, ctx.loss_temperature, True)
    else:
        stats, ratios = ppo.train_on_rollouts(ctx.model, accelerator, ctx.optimizer, batch, args, ctx.plan, ctx.shuffle,
                                              ctx.pad, ctx.loss_temperature)
    ctx.scheduler.step()
    common.synchronize(ctx.device.type)
    train_end, train_cpu_end = time.perf_counter(), time.process_time()
    # The per-update statistics: ppo.py logs them; here only reduced to floats, which syncs like the stage.
    with torch.no_grad(), record_function("log/stats"):
        local = stage_module.update_statistics(batch, stats, ratios, ctx.eos)
        names = list(local)
        reduced = accelerator.reduce(torch.stack([local[k].float() for k in names]).to(ctx.device), reduction="mean")
        logged = dict(zip(names, reduced.tolist(), strict=True))
    ctx.kl_controller.update(logged["objective/kl"], args.batch_size)
    end = time.perf_counter()
    return {"update_s": end - start, "update_cpu_s": time.process_time() - cpu_start, "rollout_s": rollout_end - start, "train_s": train_end - rollout_end,
            "train_cpu_s": train_cpu_end - rollout_cpu_end,
            "loss/policy_avg": logged["loss/policy_avg"], "val/eos_rate": logged["val/eos_rate"]}


def first_minibatch_ratio(ctx: OursContext) -> dict[str, float]:
    """The first minibatch of a PPO update, measured apart from the timed updates with ppo.py's functions: a batch of
    rollouts (`collect_rollouts`: the old log-probs are the sampler's, P-1), then what `train_on_rollouts` runs on its
    first micro-batch before any optimizer step: the training forward of the same weights (gradients on) and
    `ppo_losses`. In exact arithmetic every ratio is 1 and approx-KL 0; what is left is how far the training forward's
    rounding is from the sampler's (its KV-cached steps, bf16 autocast, fp32 rollouts against a bf16 training forward).
    `approxkl`: ppo.py's `policy/approxkl` statistic (0.5 x mean squared log-ratio over all response positions, 0 on
    padding); the ratios over the valid response tokens. No optimizer step; the rollouts' random draws are spent."""
    import torch

    from summarize_from_feedback_details import ppo, rl
    from summarize_from_feedback_details.modeling import gather_logprobs
    from summarize_from_feedback_details.training import batch_tensor

    args, pad = ctx.args, ctx.pad
    queries = batch_tensor(ctx.train.select(range(args.batch_size)), "query_token", ctx.device)
    batch = ppo.collect_rollouts(ctx.unwrapped, ctx.ref_policy, ctx.reward_model, queries, args, ctx.kl_controller.value,
                                 pad, ctx.eos, args.response_length, ctx.loss_temperature)
    idx = torch.arange(args.local_micro_batch_size, device=ctx.device)
    ctx.unwrapped.policy.train()
    logits, new_values = ctx.model(batch["query_responses"][idx], pad, batch["context_length"], ctx.loss_temperature, args.skip_left_padding)
    padding, value_padding = batch["padding_mask"][idx], batch["value_padding_mask"][idx]
    new_logprobs = gather_logprobs(logits, batch["responses"][idx]).masked_fill(padding, rl.INVALID_LOGPROB)
    old_logprobs = batch["logprobs"][idx]
    losses = ppo.ppo_losses(new_logprobs, old_logprobs, batch["advantages"][idx], new_values.masked_fill(value_padding, 0.0),
                            batch["values"][idx], batch["returns"][idx], padding, value_padding, args.cliprange,
                            args.cliprange_value, args.vf_coef)
    with torch.no_grad():
        ratio = (new_logprobs - old_logprobs).exp()[~padding].float()
        deviation = (ratio - 1).abs()
        return {"mean_abs_ratio_minus_1": deviation.mean().item(), "max_abs_ratio_minus_1": deviation.max().item(),
                "ratio_mean": ratio.mean().item(), "approxkl": losses["approxkl"].item(), "tokens": ratio.numel()}


def bf16_tolerance(ctx: OursContext, device_type: str) -> dict[str, float]:
    """How far bf16 autocast moves what the update computes, on one batch of random query-responses: the
    response log-probs (policy) and the values (critic), compared with fp32."""
    import torch

    from summarize_from_feedback_details.modeling import gather_logprobs, response_logits
    from summarize_from_feedback_details.training import batch_tensor

    queries = batch_tensor(ctx.train, "query_token", ctx.device)
    generator = torch.Generator().manual_seed(ctx.args.seed)
    responses = torch.randint(1, ctx.pad, (queries.size(0), ctx.args.response_length), generator=generator).to(ctx.device)
    query_responses = torch.cat([queries, responses], 1)
    context = queries.size(1)
    results = {}
    with torch.no_grad():
        outputs = {}
        for dtype in ("fp32", "bf16"):
            with autocast(device_type, dtype):
                logits = response_logits(ctx.unwrapped.policy, query_responses, ctx.pad, context, ctx.args.temperature)
                outputs[dtype] = (gather_logprobs(logits, responses), ctx.unwrapped.values(query_responses, ctx.pad, context).float())
        for k, name in enumerate(("logprob", "value")):
            diff = (outputs["bf16"][k] - outputs["fp32"][k]).abs()
            results[f"{name}_max_abs_diff"] = diff.max().item()
            results[f"{name}_mean_abs_diff"] = diff.mean().item()
        results["logprob_fp32_mean"] = outputs["fp32"][0].mean().item()
    return results


def run_ours(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    common.setup_torch(case["threads"], case["seed"])
    with tempfile.TemporaryDirectory() as run_dir:
        ctx = ours_setup(case, run_dir)
        result: dict[str, Any] = {"rss_after_setup_mib": common.current_rss_mib(),
                                  "trained_parameters": sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)}
        if case["dtype"] == "bf16" and case["implementation"] != RLOO:  # (it compares the critic too)
            result["bf16_tolerance"] = bf16_tolerance(ctx, ctx.device.type)
        updates = []
        # bf16_scope "training": only the training forward is autocast (by accelerate, as in ppo.py), not the rollouts
        with autocast(ctx.device.type, case["dtype"] if case.get("bf16_scope", "update") == "update" else "fp32"):
            if case["implementation"] != RLOO:  # ppo.py's losses (rloo.py's: tests/test_rloo.py)
                result["first_minibatch"] = first_minibatch_ratio(ctx)
            for _ in range(case["num_updates"]):
                updates.append(ours_update(ctx))
            if case.get("profile"):
                result["profile"] = profile_update(ctx)
    timed = updates[case["warmup"]:]
    result.update(
        implementation=case["implementation"], **common.summarize_times([u["update_s"] for u in timed]),
        cpu_median_s=statistics.median(u["update_cpu_s"] for u in timed),
        rollout_median_s=statistics.median(u["rollout_s"] for u in timed), train_median_s=statistics.median(u["train_s"] for u in timed),
        train_cpu_median_s=statistics.median(u["train_cpu_s"] for u in timed),
        train_flops=training_phase_flops(case), last_policy_loss=updates[-1]["loss/policy_avg"],
        eos_rate=statistics.mean(u["val/eos_rate"] for u in updates),
    )
    if torch.cuda.is_available() and case["device"] == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return result


def profile_update(ctx: OursContext) -> dict[str, str]:
    """One more update under torch.profiler: the operators by self time, and our labelled phases."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        ours_update(ctx)
    sort = "self_cuda_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    phases = [e for e in events if e.key.startswith(("rollout/", "train/", "log/"))]
    phase_lines = [f"{e.key:28s} {e.cpu_time_total / 1e3:10.1f} ms" for e in sorted(phases, key=lambda e: e.key)]
    return {"operators": events.table(sort_by=sort, row_limit=30), "phases": "\n".join(phase_lines)}


# ----------------------------------------------------------------------------------------------
# TRL 1.12's PPO trainer, driven programmatically (no download: random weights, an in-memory dataset)
# ----------------------------------------------------------------------------------------------
def minimal_tokenizer(shape: common.Shape) -> Any:
    """A tokenizer that only knows EOS (id 0) and [PAD]: TRL needs one for its collator and the special ids;
    the queries are token ids already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<|endoftext|>": common.EOS_TOKEN_ID, "[PAD]": shape.pad_token_id}, unk_token="<|endoftext|>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="[PAD]")


def run_trl(case: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    common.setup_torch(case["threads"], case["seed"])
    shape = common.get_shape(case["shape"])
    config = common.neox_config(shape)
    config.pad_token_id = shape.pad_token_id
    value_config = copy.deepcopy(config)
    value_config.num_labels = 1
    with common.build_on(case["device"]):
        policy = GPTNeoXForCausalLM(config)
        ref_policy = copy.deepcopy(policy)
        value_model = GPTNeoXForSequenceClassification(value_config)
        reward_model = copy.deepcopy(value_model)
    queries = common.random_queries(shape, case["batch_size"], case["query_length"], case["max_left_padding"], case["seed"])
    train = datasets.Dataset.from_dict({"input_ids": queries})
    batch = case["batch_size"]

    class Clock(TrainerCallback):
        """Time stamps at the start of training and at the end of every update (one PPO batch)."""

        def __init__(self) -> None:
            self.stamps: list[tuple[float, float]] = []

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            common.synchronize(case["device"])
            self.stamps.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            common.synchronize(case["device"])
            self.stamps.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as output_dir:
        ppo_config = PPOConfig(
            output_dir=output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=1,
            local_rollout_forward_batch_size=batch, per_device_eval_batch_size=batch, num_ppo_epochs=case["num_ppo_epochs"],
            response_length=case["response_length"], temperature=case["temperature"], total_episodes=batch * case["num_updates"],
            num_sample_generations=0, stop_token_id=common.EOS_TOKEN_ID, missing_eos_penalty=1.0, kl_coef=0.05,
            learning_rate=case["lr"], adam_epsilon=1e-5, weight_decay=0.01, lr_scheduler_type="linear", report_to="none",
            save_strategy="no", disable_tqdm=True, logging_steps=1, seed=case["seed"], bf16=case["dtype"] == "bf16",
            use_cpu=case["device"] == "cpu", dataloader_num_workers=0,
        )
        clock = Clock()
        trainer = PPOTrainer(args=ppo_config, processing_class=minimal_tokenizer(shape), model=policy, ref_model=ref_policy,
                             reward_model=reward_model, train_dataset=train, value_model=value_model, eval_dataset=train,
                             callbacks=[clock])
        result: dict[str, Any] = {"rss_after_setup_mib": common.current_rss_mib(), "optimizer": type(trainer.optimizer).__name__,
                                  "fused": bool(trainer.optimizer.defaults.get("fused"))}
        with autocast(case["device"], case["dtype"]):
            trainer.train()
    times = [b[0] - a[0] for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
    cpu_times = [b[1] - a[1] for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
    if len(times) != case["num_updates"]:
        raise RuntimeError(f"TRL ran {len(times)} updates, expected {case['num_updates']}")
    result.update(implementation="trl", **common.summarize_times(times[case["warmup"]:]),
                  cpu_median_s=statistics.median(cpu_times[case["warmup"]:]))
    if torch.cuda.is_available() and case["device"] == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return result


# ----------------------------------------------------------------------------------------------
# The run: one process per case, the ceiling, the table
# ----------------------------------------------------------------------------------------------
def run_one_case(case_json: str, case_output: str) -> None:
    from summarize_from_feedback_details.core import write_json

    case = json.loads(case_json)
    result = run_trl(case) if case["implementation"] == "trl" else run_ours(case)
    result["peak_rss_mib"] = common.peak_rss_mib()
    result["device"] = case["device"]
    write_json(case_output, result)


def check_args(args: Args) -> None:
    for shape in args.shapes:
        common.get_shape(shape)
    if args.warmup < 0 or args.repeats < 1:
        raise SystemExit("error: --warmup must be >= 0 and --repeats >= 1")
    if not 0 <= args.max_left_padding_fraction < 1:
        raise SystemExit(f"error: --max_left_padding_fraction {args.max_left_padding_fraction} must be in [0, 1)")
    if args.bf16_scope == "training" and (args.dtype != "bf16" or "trl" in args.implementations):
        raise SystemExit("error: --bf16_scope training (ppo.py's autocast of the training forward only) needs --dtype bf16 "
                         "and our implementations only (not trl)")
    if "trl" in args.implementations:
        try:
            import trl
        except ImportError:
            raise SystemExit("error: trl is not installed; `pip install trl==1.12.0` (the benchmark-only extra) or pass --implementations ours") from None
        if trl.__version__ != "1.12.0":
            raise SystemExit(f"error: trl {trl.__version__} is installed; the comparison is with trl==1.12.0 (the last with a PPO trainer)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no GPU; use --device cpu")


def main(args: Args) -> dict[str, Any]:
    from summarize_from_feedback_details.core import write_json

    check_args(args)
    name = args.name or f"ppo_{args.device}_{args.dtype}"
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    common.setup_torch(args.threads, args.seed)
    results: dict[str, Any] = {"command": common.command_line(), "args": asdict(args), "machine": common.machine_description(), "cases": []}
    results["matmul_ceiling_start"] = common.matmul_ceiling(args.device, args.dtype, args.ceiling_seconds)
    settings = {k: getattr(args, k) for k in ("device", "dtype", "bf16_scope", "batch_size", "query_length", "response_length",
                                              "num_ppo_epochs", "temperature", "lr", "warmup", "threads", "seed",
                                              "lora_r", "gradient_checkpointing")}
    settings["max_left_padding"] = int(args.max_left_padding_fraction * args.query_length)
    for shape in args.shapes:
        for implementation in args.implementations:
            case = {**settings, "shape": shape, "implementation": implementation, "num_updates": args.warmup + args.repeats,
                    "profile": args.profile and implementation != "trl"}
            print(f"{shape} {implementation} ...", flush=True)
            result = common.run_case(Path(__file__), case, out / f".{name}_case.json", args.case_timeout)
            (out / f".{name}_case.json").unlink(missing_ok=True)
            profile = result.pop("profile", None)
            if profile:
                write_text(out / f"{name}_profile_{shape}_{implementation}.txt", profile["phases"] + "\n\n" + profile["operators"] + "\n")
            results["cases"].append({"shape": shape, **result})
            print(f"  median {result['median_s']:.3f} s/update, peak RSS {result['peak_rss_mib']:.0f} MiB, load {result['load']}", flush=True)
    results["matmul_ceiling_end"] = common.matmul_ceiling(args.device, args.dtype, args.ceiling_seconds)
    ceiling = common.best_ceiling(results["matmul_ceiling_start"], results["matmul_ceiling_end"], args.device)
    results["table"] = results_table(results["cases"], ceiling, args.shapes)
    write_json(out / f"{name}.json", results)
    write_text(out / f"{name}.md", f"`{results['command']}`\n\n{results['table']}\n")
    print(results["table"])
    return results


def results_table(cases: list[dict[str, Any]], ceiling: float, shapes: tuple[str, ...]) -> str:
    """One row per shape: median s/update of each implementation, the ratios to TRL, peak RSS, ours' phases and
    its training phase's achieved FLOP/s as a share of the measured matmul ceiling, the machine's load."""
    present = [i for i in (*IMPLEMENTATIONS, PROPOSED, RLOO) if any(c["implementation"] == i for c in cases)]
    ours_like = [i for i in present if i != "trl"]
    header = ["shape", *[f"{i} s/update: wall (CPU)" for i in present]]
    if "trl" in present:
        header += [f"{i}/TRL: wall (CPU)" for i in ours_like]
    header += [f"{i} peak RSS MiB" for i in present]
    if any(c.get("cuda_peak_mib") for c in cases):
        header += [f"{i} peak GPU MiB" for i in present]
    header += [f"{i} rollout / train s" for i in ours_like]
    header += [f"{i} train GFLOP/s (share of ceiling){common.PER_CPU_SECOND if cases[0]['device'] == 'cpu' else ''}" for i in ours_like] + ["machine busy / steal while running"]
    rows = []
    for shape in shapes:
        by = {c["implementation"]: c for c in cases if c["shape"] == shape}
        row = [shape, *[f"{by[i]['median_s']:.3f} ({by[i]['cpu_median_s']:.3f})" if i in by else "–" for i in present]]
        if "trl" in present:
            for i in ours_like:
                if i in by and "trl" in by:
                    wall, cpu = (by[i][k] / by["trl"][k] for k in ("median_s", "cpu_median_s"))
                    row.append(f"{wall:.3f} = {1 / wall:.2f}x ({cpu:.3f} = {1 / cpu:.2f}x)")
                else:
                    row.append("–")
        row += [common.fmt(by[i]["peak_rss_mib"], 0) if i in by else "–" for i in present]
        if any(c.get("cuda_peak_mib") for c in cases):
            row += [common.fmt(by[i].get("cuda_peak_mib"), 0) if i in by else "–" for i in present]
        row += [f"{by[i]['rollout_median_s']:.3f} / {by[i]['train_median_s']:.3f}" if i in by else "–" for i in ours_like]
        for i in ours_like:
            achieved = common.achieved_flops(by[i], "train_flops", "train_median_s", "train_cpu_median_s") if i in by else None
            row.append(f"{achieved / 1e9:.1f} ({achieved / ceiling:.1%})" if achieved else "–")
        row.append("; ".join(f"{c['implementation']} {c['load']['busy']:.0%} / {c['load']['steal']:.0%}" for c in by.values()))
        rows.append(row)
    return common.markdown_table(header, rows) + common.ceiling_note(ceiling, cases[0]["device"])


if __name__ == "__main__":
    import tyro

    cli_args = tyro.cli(Args, description=__doc__.splitlines()[0], use_underscores=True)
    if cli_args.case_json is not None:
        run_one_case(cli_args.case_json, cli_args.case_output)
    else:
        main(cli_args)
