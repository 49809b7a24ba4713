"""What the training stages (sft, reward, ppo, dpo) share: the run (processes, seeding, run directory,
logging, saving), loading the processed data and models, optimizer and schedule, generation evaluation."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from summarize_from_feedback_details import checkpoint, lora
from summarize_from_feedback_details.core import (
    REQUEUE_EXIT_CODE,
    BatchPlan,
    RunArgs,
    RunLogger,
    UserInputError,
    atomic_directory,
    check_pad_token,
    column,
    load_saved_split,
    load_tokenizer,
    looks_like_local_path,
    make_run_name,
    resolve_input,
    run_opened,
    seed_everything,
    write_json,
)
from summarize_from_feedback_details.modeling import (
    TRAINED_DTYPE,
    ScalarModelConfig,
    disable_dropout,
    dropout_free_config,
    generate,
    model_inputs,
    sequence_scores,
    truncate_after_eos,
)


def zero2_plugin(gradient_accumulation_steps: int) -> Any:
    """Detail 8: DeepSpeed ZeRO-2 for the trained models. Detail 20: no gradient clipping (0 disables it in
    DeepSpeed; "auto" would clip). Offload is set explicitly: left unset, accelerate reads it from the launcher's
    environment (e.g. the ZeRO-3 offload yaml meant for PPO's frozen models) and would offload these too."""
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(
        zero_stage=2, gradient_accumulation_steps=gradient_accumulation_steps, gradient_clipping=0.0,
        offload_optimizer_device="none", offload_param_device="none", zero3_init_flag=False,
    )


FROZEN_PARAM_PERSISTENCE_THRESHOLD = 10_000
"""ZeRO-3 frozen engines: parameters with fewer elements stay whole on every process (biases, layer norms) instead
of being gathered on each forward; the authors' value for their 6.9B reference policy and reward model"""


def frozen_models_config(path: str, micro_batch_size: int) -> dict[str, Any]:
    """Detail 8: the DeepSpeed config of the frozen models' inference engines (PPO's reference policy and reward
    model) from an accelerate yaml such as configs/accelerate/deepspeed_zero3_offload.yaml. ZeRO-3 partitions
    their parameters over the processes (offloaded to `offload_param_device`, e.g. CPU, and streamed in for each
    forward); any other stage keeps a whole copy on every process (ZeRO-1/2 only shard optimizer state, which
    frozen models do not have). bf16 as the yaml says, on GPUs only: on CPU the trained models run fp32 too."""
    import torch
    from accelerate.commands.config.config_args import load_config_from_file

    if not Path(path).is_file():
        raise UserInputError(f"--frozen_models_config {path!r} does not exist; pass an accelerate DeepSpeed yaml such as "
                             "configs/accelerate/deepspeed_zero3_offload.yaml")
    try:
        config = load_config_from_file(path)
    except Exception as error:  # noqa: BLE001 - any parse failure is one line naming the file
        raise UserInputError(f"--frozen_models_config {path!r} is not an accelerate config file: {error}") from error
    deepspeed = getattr(config, "deepspeed_config", None) or {}
    if getattr(config, "distributed_type", None) != "DEEPSPEED" or "zero_stage" not in deepspeed:  # a str enum
        raise UserInputError(f"--frozen_models_config {path!r} is not a DeepSpeed config (it needs distributed_type: DEEPSPEED "
                             "and deepspeed_config.zero_stage); see configs/accelerate/deepspeed_zero3_offload.yaml")
    offload = deepspeed.get("offload_param_device") or "none"
    if offload not in ("none", "cpu"):
        raise UserInputError(f"--frozen_models_config {path!r}: offload_param_device {offload!r} is not supported for the "
                             "frozen models; use cpu or none")
    zero: dict[str, Any] = {"stage": 0}
    if int(deepspeed["zero_stage"]) == 3:
        zero = {"stage": 3, "stage3_param_persistence_threshold": FROZEN_PARAM_PERSISTENCE_THRESHOLD}
        if offload == "cpu":
            zero["offload_param"] = {"device": "cpu"}
    bf16 = getattr(config, "mixed_precision", "no") == "bf16" and torch.cuda.is_available()
    return {"train_micro_batch_size_per_gpu": micro_batch_size, "zero_optimization": zero, "bf16": {"enabled": bf16},
            "prescale_gradients": False, "wall_clock_breakdown": False}


def deepspeed_collectives_through_gloo() -> None:
    """DeepSpeed on CPU: its collectives go through torch.distributed's gloo (DeepSpeed's own fallback when the kernel
    below is unavailable). Otherwise DeepSpeed JIT-compiles a shared-memory all-reduce kernel (ninja + g++) in the first process group
    of every fresh environment: 60-85 s of a 2-core machine before the first step, for a speed-up that the tiny CPU
    runs this path serves (tests, the embedded task) never see."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # deepspeed.comm.torch.build_shm_op then returns None


def frozen_engine(model: Any, config: dict[str, Any]) -> Any:
    """A frozen model as its own DeepSpeed inference engine (no optimizer); call it like the model."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None, unlike nn.Module.eval
    return engine


def forwards_in_lockstep(model: Any) -> bool:
    """Whether `model` is a ZeRO-3 engine: each forward gathers its parameters from every process, so every
    process must run the same number of forwards (or the others wait forever)."""
    partitioned = getattr(model, "zero_optimization_partition_weights", None)
    return bool(partitioned and partitioned())


@dataclasses.dataclass
class Stage:
    """One run of a stage on this process: rank, run directory, logger and the accelerator."""

    args: Any
    run_name: str
    run_dir: Path
    rank: int
    world_size: int
    is_main: bool
    state: Any
    logger: RunLogger | None = None
    _accelerator: Any = None
    resume_from: Path | None = None
    """the checkpoint this run continues (`--resume`), chosen by `open_run`"""
    preemption: checkpoint.PreemptionFlag = dataclasses.field(default_factory=checkpoint.PreemptionFlag)

    @classmethod
    def start(cls, args: RunArgs) -> Stage:
        """Initialise the processes and G-2 seeding; `open_run` creates the run directory once inputs are checked."""
        import torch
        from accelerate import PartialState

        cpu = not torch.cuda.is_available()
        # On CPU, torchrun processes must join a gloo group explicitly: a plain Accelerator() silently does
        # not synchronise gradients there (ARCHITECTURE.md). DeepSpeed needs the group before accelerate.
        state = PartialState(cpu=cpu, backend="gloo" if cpu and "WORLD_SIZE" in os.environ else None)
        run_name = make_run_name(args)
        if state.num_processes > 1:  # every rank must use the main process's run name
            from accelerate.utils import broadcast_object_list

            run_name = broadcast_object_list([run_name])[0]
        seed_everything(args.seed, state.process_index)
        run_dir = Path(args.output_dir) / run_name
        return cls(args, run_name, run_dir, state.process_index, state.num_processes, state.is_main_process, state)

    def run_args(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.args), "run_name": self.run_name, "world_size": self.world_size}

    def open_run(self) -> None:
        """Choose the checkpoint to resume (`--resume`; refused when made with other arguments), create the run
        directory with the resolved args, and the logger (after the inputs were checked)."""
        choice: list[Any] = [None, None]
        if self.is_main:
            try:
                choice[0] = checkpoint.choose(self.run_dir, self.args.resume, self.run_args())
            except UserInputError as error:
                choice[1] = str(error)
        if self.world_size > 1:  # every process continues the checkpoint the main process chose
            from accelerate.utils import broadcast_object_list

            choice = broadcast_object_list(choice)
        if choice[1] is not None:
            raise UserInputError(choice[1])
        self.resume_from = choice[0]
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        run_opened(self.run_dir, self.is_main)  # from here on a failure writes FAILED.json into the folder
        if self.is_main:
            write_json(self.run_dir / "args.json", self.run_args())
        purge_step = None if self.resume_from is None else checkpoint.update_of(self.resume_from) + 1
        self.logger = RunLogger(self.run_dir, self.args, self.is_main, purge_step=purge_step)
        self.preemption.install()

    def restore(self, accelerator: Any, scheduler: Any) -> dict[str, Any] | None:
        """After `accelerator.prepare`: load the chosen checkpoint (models, optimizer, RNG states, scheduler) and
        return this process's trainer state (`update`, `seconds`, the stage's own `state`); None on a fresh run.
        Nothing that draws random numbers may run between this and the training loop on a resumed run."""
        if self.resume_from is None:
            return None
        trainer = checkpoint.load(accelerator, self.resume_from, self.rank)
        scheduler.load_state_dict(trainer["scheduler"])
        self.print(f"resume: continuing after update {trainer['update']} ({trainer['seconds']:.1f} s of training so far)")
        return trainer

    def end_update(self, update: int, accelerator: Any, scheduler: Any, seconds: float, state: dict[str, Any]) -> None:
        """At an update boundary: a checkpoint every --save_every updates, or when SIGTERM / SIGUSR1 arrived (on
        any process), then exit with REQUEUE_EXIT_CODE. `state`: what the stage needs to continue (metrics so far,
        shufflers, controllers); the models, optimizer and RNG states come from the accelerator."""
        import torch

        stop = self.preemption.signal is not None
        if self.world_size > 1:  # every process must checkpoint and stop at the same update
            flag = torch.tensor([float(stop)], device=accelerator.device)
            stop = bool(accelerator.reduce(flag, reduction="sum").item())
        if not stop and not (self.args.save_every and update % self.args.save_every == 0):
            return
        trainer = {"update": update, "seconds": seconds, "scheduler": scheduler.state_dict(), "state": state}
        path = checkpoint.save(accelerator, self.run_dir, update, self.run_args(), trainer, self.args.keep_checkpoints,
                               self.is_main, self.rank)
        if stop:
            self.print(f"resume: checkpoint {path} written; exiting with {REQUEUE_EXIT_CODE} (rerun with --resume auto)")
            self.logger.close()
            accelerator.end_training()
            self.close_processes()
            raise SystemExit(REQUEUE_EXIT_CODE)

    def close_processes(self) -> None:
        """End the process group (else ~40% of runs crash at exit)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def accelerator(self, plan: BatchPlan) -> Any:
        """The accelerator for `plan`: gradient accumulation, DeepSpeed ZeRO-2 (Detail 8) when asked."""
        import torch
        from accelerate import Accelerator

        kwargs: dict[str, Any] = {"gradient_accumulation_steps": plan.gradient_accumulation_steps}
        if self.args.deepspeed:
            kwargs["deepspeed_plugin"] = zero2_plugin(plan.gradient_accumulation_steps)
        if torch.cuda.is_available():
            kwargs["mixed_precision"] = self.args.mixed_precision
        elif not self.args.deepspeed:  # cpu=True would silently drop the DeepSpeed plugin
            kwargs["cpu"] = True
        else:
            deepspeed_collectives_through_gloo()
        self._accelerator = Accelerator(**kwargs)
        if self.args.deepspeed:  # no prepared dataloader tells DeepSpeed the micro-batch size
            config = self._accelerator.state.deepspeed_plugin.deepspeed_config
            config["train_micro_batch_size_per_gpu"] = plan.local_micro_batch_size
            config["gradient_clipping"] = 0.0
        if self.args.deepspeed and self._accelerator.state.deepspeed_plugin is None:
            raise RuntimeError("--deepspeed was asked for but accelerate did not enable DeepSpeed")
        if self._accelerator.num_processes != self.world_size:
            raise RuntimeError(f"accelerate sees {self._accelerator.num_processes} processes, torch.distributed {self.world_size}")
        return self._accelerator

    def inputs(self, tokens: Any, pad_token_id: int) -> dict[str, Any]:
        return model_inputs(tokens, pad_token_id)

    def print(self, *values: Any) -> None:
        if self.is_main:
            print(*values, flush=True)

    def progress(self, items: list, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, disable=not self.is_main, mininterval=2.0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log(metrics, step)

    def load_tokenizer(self, dataset: str, base_model: str, allow_pad_equals_eos: bool) -> Any:
        """The tokenizer the data was made with (`{dataset}/tokenizer`), else the base model's with [PAD]."""
        from transformers import AutoTokenizer

        local = Path(dataset) / "tokenizer"
        if local.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(local))
        else:
            tokenizer = load_tokenizer(base_model, "eos" if allow_pad_equals_eos else "[PAD]")
        check_pad_token(tokenizer, allow_pad_equals_eos, flag="--allow_pad_equals_eos")  # Detail 3.2
        return tokenizer

    def save_model(self, accelerator: Any, model: Any, tokenizer: Any, name: str = "model", submodule: str | None = None) -> Path:
        """`save_pretrained` (+ tokenizer) into `{run_dir}/{name}`, atomically: a crash leaves no partial checkpoint.
        A LoRA model saves its adapters there, and with --merge_lora the merged model into `{run_dir}/{name}_merged`.
        `submodule` saves one attribute of a wrapper (PPO saves the policy of its policy-and-critic module)."""
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model)
        path = self.run_dir / name
        if self.is_main:
            target = accelerator.unwrap_model(model)
            if submodule is not None:
                target = getattr(target, submodule)
                prefix = f"{submodule}."
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            with atomic_directory(path) as tmp:
                if lora.has_adapters(target):  # --lora_r: the adapters (+ a scalar head), `lora.py`
                    lora.save(target, tmp)
                else:
                    target.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
                tokenizer.save_pretrained(str(tmp))
            if lora.has_adapters(target) and getattr(self.args, "merge_lora", False):  # also {name}_merged: plain weights
                with atomic_directory(path.with_name(f"{name}_merged")) as tmp:
                    lora.save_merged(target, tmp)
                    tokenizer.save_pretrained(str(tmp))
        accelerator.wait_for_everyone()
        return path

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write metrics.json, remove the run's checkpoints, close the logger, end the process group."""
        summary = {"run_dir": str(self.run_dir), "run_name": self.run_name, "world_size": self.world_size, **metrics}
        if self.is_main:
            write_json(self.run_dir / "metrics.json", summary)
            checkpoint.remove_all(self.run_dir)  # the run is finished: its model is saved
        if self.logger is not None:
            self.logger.close()
        if self._accelerator is not None:
            self._accelerator.end_training()
        self.close_processes()
        return summary


# ----------------------------------------------------------------------------------------------
# Data and models
# ----------------------------------------------------------------------------------------------
def load_processed_split(dataset: str, name: str, split: str) -> Any:
    """Split `split` of the processed `name` dataset ("sft" or "preference"): `{dataset}/{name}` written by
    `tldr_dataset`, or a hub id of a processed dataset. A split the stage needs (train) must hold rows."""
    loaded = _processed_split(dataset, name, split)
    if loaded is None:
        raise UserInputError(f"the processed dataset {dataset!r} has no rows in {name}/{split} (absent or empty); "
                             f"rerun tldr_dataset with {split} data, or pass a dataset that has it")
    return loaded


def load_optional_splits(dataset: str, name: str, splits: Sequence[str], say: Callable[[str], Any] = print) -> dict[str, Any]:
    """The evaluation splits among `splits` that hold rows; each absent or empty one is skipped with one line said
    by `say`. Bring-your-own data: comparisons without CNN/DM rows have no `validation_cnndm`, whatever the
    stage's default `--eval_splits`."""
    loaded = {}
    for split in splits:
        data = _processed_split(dataset, name, split)
        if data is None:
            say(f"skipping {name}/{split}: the processed dataset {dataset!r} has no rows there (absent or empty split)")
        else:
            loaded[split] = data
    return loaded


def _processed_split(dataset: str, name: str, split: str) -> Any | None:
    """Split `split` of the processed `name` dataset, or None when it is absent or has no rows. Local splits are
    read one at a time (`core.load_saved_split`): an empty split saved next to them must not break the others."""
    import datasets

    if looks_like_local_path(dataset):
        path = Path(dataset) / name
        if not path.is_dir():
            raise UserInputError(
                f"{path} does not exist: --dataset must be a directory written by tldr_dataset (run "
                "`python -m summarize_from_feedback_details.tldr_dataset embedded` first) or a hub id"
            )
        return load_saved_split(path, split)
    try:
        if split not in datasets.get_dataset_split_names(dataset):
            return None
        loaded = datasets.load_dataset(dataset, split=split)
    except Exception as error:  # noqa: BLE001 - any hub failure is reported as one line
        raise UserInputError(f"cannot load split {split!r} of the dataset {dataset!r}: {error}") from error
    return loaded if len(loaded) else None


def require_columns(dataset: Any, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise UserInputError(f"{what} lacks the column(s) {missing}; process it with tldr_dataset (Detail 5)")


def check_model_path(path: str, what: str) -> None:
    """A local model is a saved model (config.json) or a LoRA run's adapters (adapter_config.json, `lora.py`)."""
    if looks_like_local_path(path) and not (Path(path) / "config.json").exists() and not lora.is_adapter_folder(path):
        raise UserInputError(f"{what} {path!r} is not a saved model (no config.json there); check the path or run the stage "
                             "that makes it (a LoRA run's model/ holds adapter_config.json instead)")


DATASET_EXPECTED = ("a directory written by tldr_dataset (run `python -m summarize_from_feedback_details.tldr_dataset embedded` "
                    "first) or a hub id of such a dataset")
CAUSAL_LM_EXPECTED = "a causal LM saved with save_pretrained (an sft.py run's model/, or a base model) or a hub model id"
REWARD_MODEL_EXPECTED = "the model/ folder of a reward.py run (<run>/model)"
SCALAR_MODEL_TYPE = ScalarModelConfig.model_type
"""`model_type` in the config.json of a reward model saved by reward.py"""


def check_input_paths(args: Any, datasets: Sequence[str] = (), causal_lms: Sequence[str] = (), reward_models: Sequence[str] = ()) -> None:
    """Before any work: each named field of `args` that is set must be an input that exists (`core.resolve_input`:
    a local directory, or a hub id in the cache or on the reachable hub); a local model must be a checkpoint of the
    kind the field expects (a causal LM, or a reward model saved by reward.py)."""
    for name in datasets:
        if getattr(args, name) is not None:
            resolve_input(getattr(args, name), f"--{name}", DATASET_EXPECTED, "dataset")
    for names, kind in ((causal_lms, "causal_lm"), (reward_models, "reward_model")):
        for name in names:
            path = getattr(args, name)
            expected = CAUSAL_LM_EXPECTED if kind == "causal_lm" else REWARD_MODEL_EXPECTED
            if path is not None and resolve_input(path, f"--{name}", expected, "model"):
                check_checkpoint_kind(path, f"--{name}", kind)


def check_checkpoint_kind(path: str, flag: str, kind: str) -> None:
    """The local checkpoint at `path` has a config.json and is a reward model saved by reward.py (`kind`
    "reward_model": ScalarModel) or a causal LM ("causal_lm"), read from its config before any weights load."""
    import json

    check_model_path(path, flag)
    if not (Path(path) / "config.json").exists():  # a LoRA causal LM's adapters (a reward model's keep their config.json)
        config = {"model_type": f"LoRA adapters on {lora.adapter_base(path)}", "architectures": ["CausalLM adapters"]}
    else:
        config = json.loads((Path(path) / "config.json").read_text())
    model_type, architectures = config.get("model_type"), ", ".join(config.get("architectures") or []) or "no architectures"
    if kind == "reward_model" and model_type != SCALAR_MODEL_TYPE:
        causal = " a causal LM checkpoint (e.g. from sft.py):" if "CausalLM" in architectures or "LMHead" in architectures else ""
        raise UserInputError(f"{flag} {path!r}: expected a reward model saved by reward.py (ScalarModel, model_type "
                             f"{SCALAR_MODEL_TYPE}); got{causal} model_type {model_type}, {architectures}; pass {REWARD_MODEL_EXPECTED}")
    if kind == "causal_lm" and model_type == SCALAR_MODEL_TYPE:
        raise UserInputError(f"{flag} {path!r}: expected a causal LM (e.g. an sft.py run's model/); got a reward model saved "
                             "by reward.py (ScalarModel), which has no language-model head; pass the SFT run's model/")


def load_causal_lm(path: str, tokenizer: Any, dtype: Any = TRAINED_DTYPE) -> Any:
    """A causal LM with dropout off (Detail 7) whose embedding holds the tokenizer's [PAD] id, in `dtype` (fp32 for
    a trained model; frozen ones pass FROZEN_DTYPE), never the dtype its config records (Pythia's says float16)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_path(path, "model")
    if lora.is_adapter_folder(path):  # a LoRA run's model/: its base (itself possibly adapters) with the adapters merged in
        model = lora.load_merged(path, lambda base: load_causal_lm(base, tokenizer, dtype))
        check_vocabulary(model.config, tokenizer, path)
        return disable_dropout(model)
    config = dropout_free_config(AutoConfig.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    check_vocabulary(model.config, tokenizer, path)
    return disable_dropout(model)


def check_vocabulary(config: Any, tokenizer: Any, path: str) -> None:
    rows = getattr(config, "vocab_size", None) or config.backbone_config.vocab_size
    if max(tokenizer.pad_token_id, len(tokenizer) - 1) >= rows:
        raise UserInputError(
            f"the model {path!r} has {rows} embedding rows but the tokenizer uses id {max(tokenizer.pad_token_id, len(tokenizer) - 1)}; "
            "use the tokenizer the model was trained with"
        )


def make_optimizer_and_scheduler(model: Any, lr: float, eps: float, scheduler: str, warm_up_steps: int, num_updates: int) -> tuple[Any, Any]:
    """G-1: AdamW with one learning rate and eps 1e-5, and its schedule over `num_updates`. The fused AdamW (one
    kernel over all parameters) computes the same update as the per-tensor loop, 8x faster on CPU at Pythia-14m
    (benchmark/README.md); a test checks the two agree."""
    import torch
    from transformers import get_scheduler

    # Only the parameters that train (all of them but with LoRA, `lora.py`): frozen ones need no optimizer state.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=eps, fused=True)
    return optimizer, get_scheduler(scheduler, optimizer, num_warmup_steps=warm_up_steps, num_training_steps=num_updates)


def batch_tensor(rows: Any, name: str, device: Any) -> Any:
    import torch

    return torch.tensor(column(rows, name), device=device)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous evaluation shard of `n` items for `rank` (the shards concatenate to range(n))."""
    per = -(-n // world_size)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


# ----------------------------------------------------------------------------------------------
# Evaluation by sampling (SFT; PPO and DPO reuse it)
# ----------------------------------------------------------------------------------------------
def response_texts(tokenizer: Any, responses: Any) -> tuple[list[str], list[int], list[bool]]:
    """Decode responses already truncated after EOS: text without EOS/PAD, token length up to and including
    the EOS, whether an EOS was produced."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    texts, lengths, has_eos = [], [], []
    for row in responses.tolist():
        # The first EOS ends the response; read it before dropping pads, which may be EOS too (Detail 3.2 ablated).
        ended = eos in row
        kept = [t for t in (row[: row.index(eos)] if ended else row) if t != pad]
        lengths.append(len(kept) + 1 if ended else len(kept))
        has_eos.append(ended)
        texts.append(tokenizer.decode(kept, skip_special_tokens=False))
    return texts, lengths, has_eos


def rouge_scores(references: list[str], predictions: list[str], use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over the pairs with `rouge-score`'s `RougeScorer` and its default tokenizer
    (lower-cased runs of [a-z0-9]). Porter stemming only with `use_stemmer` (`--rouge_stemmer`)."""
    from rouge_score import rouge_scorer

    # Detail 9: the authors scored with the `evaluate` package's `rouge`, which builds this same scorer with
    # `use_stemmer=False` unless told otherwise. Stemming adds ~0.01 to ROUGE-L (OpenAI's 1.3B PPO samples vs the
    # references: 0.2477 -> 0.2573). evaluate reports the median of bootstrap-resampled means; we report the mean.
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for reference, prediction in zip(references, predictions, strict=True):
        for key, score in scorer.score(reference, prediction).items():
            totals[key] += score.fmeasure
    return {key: value / max(1, len(references)) for key, value in totals.items()}


def evaluate_generations(
    stage: Stage, model: Any, eval_data: dict[str, Any], tokenizer: Any, response_length: int, args: Any,
    prefix: str, temperature: float, loss_fn: Any = None, reward_model: Any = None, gold: bool = False,
    table_name: str | None = None, loss_labels: str = "query_reference_response_token",
) -> dict[str, float]:
    """Sample `response_length` tokens at `temperature` for each query (EOS does not stop sampling, Detail
    23.1), truncate after the first EOS (23.2), score ROUGE against the reference; optionally the teacher-
    forced loss, the reward model's score of response and reference (both as `left-padded query + response`,
    the layout PPO scores), and the embedded task's gold utility (win rate against the reference).
    Saves `{table_name or prefix + '_query_responses'}_{split}.csv` (and .parquet). Sharded over processes."""
    import pandas as pd
    import torch
    from accelerate.utils import gather_object

    accelerator = stage._accelerator
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    metrics: dict[str, float] = {}
    for split, dataset in eval_data.items():
        n = len(dataset) if args.max_eval_samples is None else min(args.max_eval_samples, len(dataset))
        shard = dataset.select(shard_range(n, stage.rank, stage.world_size))
        rows: list[dict[str, Any]] = []
        loss_sum, loss_count = 0.0, 0
        for start in range(0, len(shard), args.local_eval_batch_size):
            batch = shard.select(range(start, min(start + args.local_eval_batch_size, len(shard))))
            queries = batch_tensor(batch, "query_token", accelerator.device)
            with torch.no_grad():
                responses = generate(unwrapped, queries, pad, response_length, temperature)
                responses = truncate_after_eos(responses, eos, pad)
                if loss_fn is not None:
                    tokens = batch_tensor(batch, "query_reference_response_token", accelerator.device)
                    labels = batch_tensor(batch, loss_labels, accelerator.device)  # the training objective's labels
                    logits = unwrapped(**model_inputs(tokens, pad)).logits
                    count = int((labels[:, 1:] != pad).sum())
                    loss_sum += loss_fn(logits, labels, pad).item() * count
                    loss_count += count
                if reward_model is not None:
                    references = batch_tensor(batch, "reference_response_token", accelerator.device)
                    scores = sequence_scores(reward_model, torch.cat([queries, responses], 1), pad, queries.size(1)).tolist()
                    reference_scores = sequence_scores(reward_model, torch.cat([queries, references], 1), pad, queries.size(1)).tolist()
            texts, lengths, has_eos = response_texts(tokenizer, responses)
            for k, (query, reference, text) in enumerate(zip(column(batch, "query"), column(batch, "reference_response"), texts, strict=True)):
                row = {"query": query, "reference": reference.replace(tokenizer.eos_token, "").strip(),
                       "response": text.strip(), "response_token_len": lengths[k], "has_eos": has_eos[k]}
                if reward_model is not None:
                    row.update(score=scores[k], reference_score=reference_scores[k])
                if gold:
                    row.update(gold_utility(query, row["response"], row["reference"]))
                rows.append(row)
        if reward_model is not None and forwards_in_lockstep(reward_model):
            # A ZeRO-3 reward model (Detail 8) gathers its weights from every process in each forward: a process
            # with fewer batches in its shard scores a placeholder as often as the others still score batches.
            batches = [-(-len(shard_range(n, r, stage.world_size)) // args.local_eval_batch_size) for r in range(stage.world_size)]
            placeholder = torch.full((1, 2), eos, device=accelerator.device)
            with torch.no_grad():
                for _ in range(2 * (max(batches) - batches[stage.rank])):  # responses and references
                    sequence_scores(reward_model, placeholder, pad)
        gathered = gather_object(rows)
        losses = gather_object([(loss_sum, loss_count)])
        if stage.is_main:
            table = pd.DataFrame(gathered)
            path = stage.run_dir / f"{table_name or prefix + '_query_responses'}_{split}"
            table.to_csv(path.with_suffix(".csv"), index=False)
            table.to_parquet(path.with_suffix(".parquet"), index=False)
            metrics.update({f"{prefix}/{split}/{k}": v for k, v in generation_metrics(table, args.rouge_stemmer).items()})
            if loss_fn is not None:
                metrics[f"{prefix}/{split}/loss"] = sum(s for s, _ in losses) / max(1, sum(c for _, c in losses))
    metrics = gather_object([metrics])[0] if stage.world_size > 1 else metrics
    if was_training:
        unwrapped.train()
    return metrics


def gold_utility(query: str, response: str, reference: str) -> dict[str, float]:
    """The embedded task's gold utility of response and reference, and the response's win (ties count 1/2)."""
    from summarize_from_feedback_details.embedded import gold_utility as utility

    response_utility, reference_utility = utility(query, response), utility(query, reference)
    win = 1.0 if response_utility > reference_utility else 0.5 if response_utility == reference_utility else 0.0
    return {"gold_utility": response_utility, "reference_gold_utility": reference_utility, "gold_win": win}


def generation_metrics(table: Any, rouge_stemmer: bool = False) -> dict[str, float]:
    """Means over a query-response table: ROUGE (stemmed with `rouge_stemmer`), length, EOS rate, RM scores and
    gold utility when present."""
    metrics = rouge_scores(list(table["reference"]), list(table["response"]), use_stemmer=rouge_stemmer)
    metrics["response_token_len"] = float(table["response_token_len"].mean())
    metrics["eos_rate"] = float(table["has_eos"].mean())
    for name in ("score", "reference_score", "gold_utility", "reference_gold_utility"):
        if name in table:
            metrics[name] = float(table[name].mean())
    if "gold_win" in table:
        metrics["gold_win_rate"] = float(table["gold_win"].mean())
    return metrics


# ----------------------------------------------------------------------------------------------
# Comparisons: reward-model and DPO implicit-reward accuracy (Details 16, 19)
# ----------------------------------------------------------------------------------------------
COMPARISON_COLUMNS = ["split", "batch", "confidence", "policies", "chosen_policy", "rejected_policy", "chosen_score", "rejected_score"]
"""the columns of `eval_comparisons.csv` (before `correct` and `margin`)"""


def comparison_rows(batch: Any, split: str, chosen: list[float], rejected: list[float]) -> list[dict[str, Any]]:
    """One row per comparison of `batch` with its labels and the two scores (the calibration figure reads these).
    `confidence` is None where the comparison has none (`extra` or `extra.confidence` null)."""
    rows = []
    for k, (extra, batch_name) in enumerate(zip(column(batch, "extra"), column(batch, "batch"), strict=True)):
        rows.append({
            "split": split, "batch": batch_name, "confidence": (extra or {}).get("confidence"),
            "policies": column(batch, "policies")[k], "chosen_policy": column(batch, "chosen_policy")[k],
            "rejected_policy": column(batch, "rejected_policy")[k], "chosen_score": chosen[k], "rejected_score": rejected[k],
        })
    return rows


def evaluate_comparisons(stage: Stage, comparisons: dict[str, Any], score_pairs: Any, max_samples: int | None, batch_size: int) -> dict[str, float]:
    """Score every comparison of each split with `score_pairs(batch) -> (chosen, rejected)` (sharded over the
    processes), save `eval_comparisons.csv` with every pair's scores and labels, and return the accuracy
    overall / per split / batch / confidence (Details 16, 19)."""
    import pandas as pd
    from accelerate.utils import gather_object

    rows: list[dict[str, Any]] = []
    for split, dataset in comparisons.items():
        n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
        shard = shard_range(n, stage.rank, stage.world_size)
        for start in range(shard.start, shard.stop, batch_size):
            batch = dataset.select(range(start, min(start + batch_size, shard.stop)))
            chosen, rejected = score_pairs(batch)
            rows.extend(comparison_rows(batch, split, chosen.tolist(), rejected.tolist()))
    gathered = gather_object(rows)
    metrics: dict[str, float] = {}
    if stage.is_main:
        table = pd.DataFrame(gathered, columns=COMPARISON_COLUMNS)  # the columns even when no split had rows
        table["correct"] = table["chosen_score"] > table["rejected_score"]
        table["margin"] = table["chosen_score"] - table["rejected_score"]
        table.to_csv(stage.run_dir / "eval_comparisons.csv", index=False)
        metrics = accuracy_breakdown(table)
    return gather_object([metrics])[0] if stage.world_size > 1 else metrics


def accuracy_breakdown(table: Any) -> dict[str, float]:
    """Details 16/19: accuracy overall, per split, per labelling batch and per confidence level (1-9). Pairs without
    a confidence (null in some real batches and in bring-your-own data) count overall, per split and per batch only;
    no pairs at all (every evaluation split skipped): no metrics."""
    if table.empty:
        return {}
    # Detail 16: labelling batches and confidence levels differ in how learnable they are.
    metrics = {"eval/accuracy": float(table["correct"].mean())}
    for key in ("split", "batch"):
        for value, group in table.groupby(key, dropna=False):
            metrics[f"eval/accuracy/{key}/{value}"] = float(group["correct"].mean())
    rated = table.dropna(subset=["confidence"])  # a null among the levels makes them floats: 7.0, not 7
    for value, group in rated.groupby(rated["confidence"].astype(int)):
        metrics[f"eval/accuracy/confidence/{value}"] = float(group["correct"].mean())
    return metrics
