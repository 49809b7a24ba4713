"""Sweeps over sizes x seeds: the local sweep script run for real on the embedded default (2 sizes x 2 seeds at
reduced lengths, every expected output checked), the judge and figures steps on its output, the slurm files
(bash -n, directives, the dependency chain, array task -> cell), every argument list the scripts produce parsed
by the stage CLIs themselves (with the per-size batch plans of the paper), and the accelerate configs read by
accelerate."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, build_once, shared_root, subprocess_env

SWEEP = REPO / "scripts" / "sweep.sh"
SLURM = REPO / "scripts" / "slurm"
CONFIGS = REPO / "configs" / "accelerate"
PACKAGE = "summarize_from_feedback_details"
SIZES = ("tiny-pythia-s", "tiny-pythia-m")
SEEDS = (1, 2)
STAGES = ("sft", "reward", "ppo", "dpo")
ENV = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
# The paper's PPO settings per size on 8 GPUs: (rollout forward batch, gradient accumulation, micro-batch).
PPO_PER_SIZE = {"1b": (64, 4, 16), "2.8b": (32, 16, 4), "6.9b": (4, 64, 1)}
PAPER_PPO_UPDATES = 1_000_000 // 512  # 1,953 updates of 512 rollouts (SPEC Detail 20)


def bash(*args: Any, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            env={**subprocess_env(), **ENV, **(env or {})}, timeout=3600)
    if check:
        assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def commands(dry_run_output: str) -> list[list[str]]:
    """The commands a --dry_run printed (one shell-quoted command per line; comments start with #)."""
    return [shlex.split(line) for line in dry_run_output.splitlines() if line.strip() and not line.startswith("#")]


def parse_stage(module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The stage's Args exactly as its command line makes them: the stage's own CLI (`core.cli` with its
    presets, or tyro on its Args), with `main` replaced by a function that keeps the parsed arguments."""
    import importlib

    from summarize_from_feedback_details.core import cli

    stage = importlib.import_module(f"{PACKAGE}.{module}")
    monkeypatch.setattr(sys, "argv", [module, *argv])
    if hasattr(stage, "PRESETS"):
        parsed: list[Any] = []
        cli(stage.PRESETS, parsed.append, module)
        return parsed[0]
    import tyro

    return tyro.cli(stage.Args, use_underscores=True)


def split_launch(argv: list[str]) -> tuple[Any, str, list[str]]:
    """(accelerate's parsed launch arguments or None, stage module, stage arguments) of one sweep command."""
    if argv[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        launch = launch_command_parser().parse_args(argv[2:])
        assert launch.module, argv
        return launch, launch.training_script, launch.training_script_args
    assert argv[1] == "-m", argv
    return None, argv[2], argv[3:]


# ----------------------------------------------------------------------------------------------
# The local sweep, for real, on the embedded default
# ----------------------------------------------------------------------------------------------
# The four tests on the shared sweep run in any order, on any worker: the judge and figures steps add judge/ and
# figures/ to it, so what the training chain alone wrote is listed when it ends (`chain_listing`).
def _listing(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for pattern in ("*", "*/*", "*/*/*") for path in root.glob(pattern))


@pytest.fixture(scope="module")
def embedded_sweep(embedded_sizes_dir: Path, embedded_dataset: Path, tmp_path_factory) -> Path:
    """2 sizes x 2 seeds x (SFT, RM, PPO, DPO) at reduced lengths, two cells at a time."""
    def build() -> Path:
        sweep_dir = shared_root(tmp_path_factory) / "sweep" / "embedded"
        start = time.time()
        bash(SWEEP, "--embedded", "--embedded_dir", embedded_sizes_dir, "--dataset", embedded_dataset, "--sweep_dir", sweep_dir,
             "--sizes", " ".join(SIZES), "--seeds", " ".join(map(str, SEEDS)), "--reduced", "--jobs", "2")
        print(f"embedded sweep, {len(SIZES)} sizes x {len(SEEDS)} seeds x {len(STAGES)} stages: {time.time() - start:.0f} s")
        (sweep_dir.parent / "chain_listing.json").write_text(json.dumps(_listing(sweep_dir)))
        return sweep_dir

    return build_once(tmp_path_factory, "embedded_sweep", build)  # one build for every xdist worker


def test_local_sweep_writes_every_cell(embedded_sweep: Path, embedded_sizes_dir: Path, embedded_dataset: Path):
    """Every (size, seed) cell holds the four run directories with their models, tables and metrics; each
    stage ran on its own cell's size, seed and upstream models, at the reduced lengths."""
    import pandas as pd
    from safetensors.torch import load_file

    from summarize_from_feedback_details.embedded import MODEL_SIZES

    hidden = {size.name: size.hidden_size for size in MODEL_SIZES}
    chain_listing = json.loads((embedded_sweep.parent / "chain_listing.json").read_text())  # before judge / figures
    assert [entry for entry in chain_listing if "/" not in entry] == sorted([*SIZES, "logs"])
    expected = {
        "sft": ["metrics.json", "args.json", "model/config.json", "model/model.safetensors", "model/tokenizer.json",
                "eval_query_responses_validation.csv", "eval_query_responses_test.parquet", "base_query_responses_validation.csv"],
        "reward": ["metrics.json", "args.json", "model/config.json", "model/model.safetensors", "eval_comparisons.csv"],
        "ppo": ["metrics.json", "args.json", "model/config.json", "model/model.safetensors", "query_responses_validation.csv",
                "query_responses_test.csv", "query_responses_validation.parquet", "sft_query_responses_validation.csv"],
        "dpo": ["metrics.json", "args.json", "model/config.json", "model/model.safetensors", "query_responses_validation.csv",
                "query_responses_test.csv", "eval_comparisons.csv"],
    }
    # --reduced: 32 examples per stage = 2 updates of 16 (PPO: 1 update of 16 rollouts); 8 eval samples.
    updates = {"sft": 2, "reward": 2, "ppo": 1, "dpo": 2}
    for size in SIZES:
        for seed in SEEDS:
            cell = embedded_sweep / size / f"seed{seed}"
            assert [e.split("/")[2] for e in chain_listing if e.startswith(f"{size}/seed{seed}/")] == sorted(STAGES)
            for stage, files in expected.items():
                missing = [f for f in files if not (cell / stage / f).exists()]
                assert not missing, f"{cell / stage} lacks {missing}"
                args = json.loads((cell / stage / "args.json").read_text())
                metrics = json.loads((cell / stage / "metrics.json").read_text())
                assert args["seed"] == seed and args["dataset"] == str(embedded_dataset)
                assert metrics["num_updates"] == updates[stage] and metrics["world_size"] == 1
                if stage != "sft":
                    assert args["sft_model_path"] == str(cell / "sft" / "model")
                if stage in ("ppo", "dpo"):
                    assert args["reward_model_path"] == str(cell / "reward" / "model")
            assert json.loads((cell / "sft" / "args.json").read_text())["base_model"] == str(embedded_sizes_dir / "models" / size)
            assert json.loads((cell / "sft" / "model" / "config.json").read_text())["hidden_size"] == hidden[size]
            for table in ("ppo/query_responses_validation.csv", "dpo/query_responses_test.csv", "sft/eval_query_responses_validation.csv"):
                assert len(pd.read_csv(cell / table)) == 8
        # the seed is the run's: the two seeds' SFT models differ (their data order differs)
        weights = [load_file(str(embedded_sweep / size / f"seed{seed}" / "sft" / "model" / "model.safetensors")) for seed in SEEDS]
        assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) > 1e-4
    timings = [line.split("\t") for line in (embedded_sweep / "logs" / "timings.tsv").read_text().splitlines()]
    stage_rows = [row for row in timings if row[0].endswith(STAGES)]
    assert len(stage_rows) == len(SIZES) * len(SEEDS) * len(STAGES) and all(row[2] == "0" for row in timings)
    print("stage seconds:", {row[0]: int(row[1]) for row in timings})


def test_rerun_skips_finished_stages(embedded_sweep: Path, embedded_sizes_dir: Path, embedded_dataset: Path):
    """A resumed sweep skips every stage whose metrics.json exists; --force reruns them (dry run: nothing runs)."""
    common = [SWEEP, "--embedded", "--embedded_dir", embedded_sizes_dir, "--dataset", embedded_dataset, "--sweep_dir", embedded_sweep,
              "--sizes", ",".join(SIZES), "--seeds", ",".join(map(str, SEEDS)), "--reduced", "--dry_run"]
    resumed = bash(*common).stdout
    assert [c[2] for c in commands(resumed)] == [f"{PACKAGE}.embedded"]  # only the (reusing) asset check
    assert resumed.count("# skip ") == len(SIZES) * len(SEEDS) * len(STAGES)
    forced = commands(bash(*common, "--force").stdout)
    assert [c[2] for c in forced[1:]] == [f"{PACKAGE}.{stage}" for _ in SIZES for _ in SEEDS for stage in STAGES]


def test_judge_step_on_the_sweep(embedded_sweep: Path, embedded_sizes_dir: Path, embedded_dataset: Path):
    """The step after the training chain, on the sweep's own outputs: the gold judge of each cell's SFT, PPO and
    DPO validation tables, each into {cell}/judge/{policy}/."""
    bash(SWEEP, "--embedded", "--embedded_dir", embedded_sizes_dir, "--dataset", embedded_dataset, "--sweep_dir", embedded_sweep,
         "--sizes", ",".join(SIZES), "--seeds", ",".join(map(str, SEEDS)), "--stages", "judge")
    for size in SIZES:
        for seed in SEEDS:
            for policy in ("sft", "ppo", "dpo"):
                summaries = list((embedded_sweep / size / f"seed{seed}" / "judge" / policy).glob("*.summary.json"))
                assert len(summaries) == 1, summaries
                summary = json.loads(summaries[0].read_text())
                assert summary["judge"] == "gold" and summary["rows"] == 8 and f"/{policy}/" in summary["table"]


def test_figures_step_on_the_sweep(embedded_sweep: Path, embedded_sizes_dir: Path, embedded_dataset: Path):
    """The last step: the sweep's figures, drawn from its cells into {sweep_dir}/figures."""
    _require_module("paper_figures")
    bash(SWEEP, "--embedded", "--embedded_dir", embedded_sizes_dir, "--dataset", embedded_dataset, "--sweep_dir", embedded_sweep,
         "--sizes", ",".join(SIZES), "--seeds", ",".join(map(str, SEEDS)), "--stages", "figures")
    assert list((embedded_sweep / "figures").glob("*.png"))


def _require_module(name: str) -> None:
    import importlib.util

    if importlib.util.find_spec(f"{PACKAGE}.{name}") is None:
        pytest.skip(f"{PACKAGE}/{name}.py does not exist yet (being written); the sweep's step calls "
                    f"`python -m {PACKAGE}.{name}` with the arguments scripts/sweep.sh --dry_run prints")


def test_sweep_rejects_bad_input(tmp_path: Path):
    """One clear error naming the input, exit status 2, before anything is written."""
    cases = {
        ("--sizes", "1b 3b"): "unknown size '3b'",
        ("--seeds", "1 x"): "seed 'x'",
        ("--stages", "sft rlhf"): "unknown stage 'rlhf'",
        ("--jobs", "2"): "--jobs 2 needs --embedded",
        ("--bogus",): "unknown argument '--bogus'",
        ("--sizes",): "--sizes needs a value",
        ("--embedded", "--sizes", "1b"): "unknown size '1b' for the embedded sweep",
        ("--dataset", str(tmp_path / "nowhere")): "build it with 'python -m summarize_from_feedback_details.tldr_dataset pythia",
    }
    for args, message in cases.items():
        result = bash(SWEEP, "--sweep_dir", tmp_path / "sweep", *args, check=False)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert not (tmp_path / "sweep").exists()


# ----------------------------------------------------------------------------------------------
# Every argument list of the sweep, parsed by the stage CLIs
# ----------------------------------------------------------------------------------------------
def test_pythia_sweep_commands_are_accepted_by_the_stage_clis(monkeypatch):
    """The default Pythia sweep: accelerate accepts the launch arguments and reads the config; each stage's own
    CLI accepts its arguments; the per-size settings give the paper's global batches and, for PPO, the authors'
    rollout / accumulation / micro-batch per size on 8 GPUs."""
    from accelerate.commands.config.config_args import load_config_from_file

    from summarize_from_feedback_details.core import plan_batches
    from summarize_from_feedback_details.rl import plan_ppo

    lines = commands(bash(SWEEP, "--dry_run", "--seeds", "44413", "--stages", "sft reward ppo rloo dpo judge figures").stdout)
    seen = set()
    for argv in lines:
        launch, module, stage_argv = split_launch(argv)
        name = module.rsplit(".", 1)[1]
        if name in ("judge", "paper_figures"):
            continue  # parsed in test_judge_and_figures_commands_are_accepted
        size = re.search(r"pythia/([^/]+)/seed", " ".join(stage_argv)).group(1)
        assert launch.config_file == "configs/accelerate/deepspeed_zero2_bf16.yaml" and launch.num_processes is None
        assert load_config_from_file(str(REPO / launch.config_file)).num_processes == 8
        args = parse_stage(name, stage_argv, monkeypatch)
        assert args.deepspeed and args.mixed_precision == "bf16" and args.lr == 3e-6 and args.seed == 44413
        assert args.output_dir == f"sweeps/pythia/{size}/seed44413" and args.run_name == name
        if name == "sft":
            assert args.base_model == f"EleutherAI/pythia-{size}-deduped"
            assert plan_batches(args.batch_size, args.local_micro_batch_size, 8, 116_722, "sft").gradient_accumulation_steps == 16
        elif name in ("reward", "dpo"):
            assert args.batch_size == 64 and args.local_micro_batch_size == 1
            assert plan_batches(args.batch_size, args.local_micro_batch_size, 8, 92_858, name).gradient_accumulation_steps == 8
        else:
            plan = plan_ppo(args, world_size=8)
            got = (args.local_rollout_forward_batch_size, plan.mini.gradient_accumulation_steps, args.local_micro_batch_size)
            assert got == PPO_PER_SIZE[size] and plan.num_updates == PAPER_PPO_UPDATES and args.batch_size == 512
            assert args.frozen_models_config == ("configs/accelerate/deepspeed_zero3_offload.yaml" if size == "6.9b" else None)
        seen.add((size, name))
    assert seen == {(size, stage) for size in PPO_PER_SIZE for stage in (*STAGES, "rloo")}  # RLOO: PPO's per-size settings


def test_reduced_and_resized_commands_are_accepted(monkeypatch):
    """--reduced makes every Pythia stage one update of its paper batch; --num_processes reaches accelerate and
    the PPO accumulation follows (batch 512 kept); the embedded sweep's commands parse with the embedded presets."""
    from summarize_from_feedback_details.core import plan_batches
    from summarize_from_feedback_details.rl import plan_ppo

    for argv in commands(bash(SWEEP, "--dry_run", "--seeds", "1", "--reduced", "--num_processes", "4").stdout):
        launch, module, stage_argv = split_launch(argv)
        name = module.rsplit(".", 1)[1]
        assert launch.num_processes == 4
        args = parse_stage(name, stage_argv, monkeypatch)
        assert args.max_eval_samples == 64
        if name == "ppo":
            plan = plan_ppo(args, world_size=4)
            assert plan.num_updates == 1 and plan.mini.gradient_accumulation_steps == 512 // (args.local_micro_batch_size * 4)
        else:
            assert plan_batches(args.batch_size, args.local_micro_batch_size, 4, args.total_episodes, name).num_updates == 1
    embedded = commands(bash(SWEEP, "--embedded", "--dry_run", "--seeds", "1", "--sweep_dir", "s", "--embedded_dir", "a",
                             "--dataset", "d").stdout)
    assert [c[2] for c in embedded[:2]] == [f"{PACKAGE}.embedded", f"{PACKAGE}.tldr_dataset"]
    assert embedded[0][-4:] == ["--sizes", "tiny-pythia-s", "tiny-pythia-m", "tiny-pythia-l"]
    for argv in embedded[2:]:
        launch, module, stage_argv = split_launch(argv)
        args = parse_stage(module.rsplit(".", 1)[1], stage_argv, monkeypatch)
        assert launch is None and not args.deepspeed and args.dataset == "d" and args.output_dir.startswith("s/tiny-pythia-")
        if module.endswith(".sft"):
            assert args.base_model == f"a/models/{args.output_dir.split('/')[1]}"


def test_lora_and_checkpointing_reach_every_trained_stage(monkeypatch):
    """--lora_r / --lora_lr / --gradient_checkpointing (README "Fewer GPUs") reach every training command, parsed by
    the stage's own CLI, and through slurm's --sweep_args; without them the stages train every weight; bad values are
    one line before anything runs."""
    stages = "sft reward ppo rloo dpo"
    lora = commands(bash(SWEEP, "--dry_run", "--sizes", "1b", "--seeds", "1", "--stages", stages, "--lora_r", "16",
                         "--lora_lr", "5e-3", "--gradient_checkpointing").stdout)
    assert [split_launch(argv)[1].rsplit(".", 1)[1] for argv in lora] == stages.split()
    for argv in lora:
        _, module, stage_argv = split_launch(argv)
        args = parse_stage(module.rsplit(".", 1)[1], stage_argv, monkeypatch)
        assert (args.lora_r, args.lr, args.gradient_checkpointing) == (16, 5e-3, True), module
    for argv in commands(bash(SWEEP, "--dry_run", "--sizes", "1b", "--seeds", "1", "--stages", stages).stdout):
        _, module, stage_argv = split_launch(argv)
        args = parse_stage(module.rsplit(".", 1)[1], stage_argv, monkeypatch)
        assert args.lora_r == 0 and not args.gradient_checkpointing and args.lr == 3e-6, module
    for bad, message in ((["--lora_r", "0"], "--lora_r '0' is not a positive integer"),
                         (["--lora_lr", "1e-3"], "--lora_lr needs --lora_r"),
                         (["--lora_r", "8", "--lora_lr", "fast"], "--lora_lr 'fast' is not a positive number")):
        result = bash(SWEEP, "--dry_run", *bad, check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith(f"sweep.sh: {message}"), result.stderr
    submitted = bash(SLURM / "submit.sh", "--dry_run", "--sizes", "1b", "--seeds", "1",
                     "--sweep_args", "--lora_r 16 --gradient_checkpointing").stdout
    assert submitted.count(r"SWEEP_ARGS=--lora_r\ 16\ --gradient_checkpointing\ ") == 6, submitted  # every step
    [ppo] = commands(bash(SLURM / "ppo.sbatch", env={"SLURM_ARRAY_TASK_ID": "0",
                                                     "SWEEP_ARGS": "--sizes 1b --seeds 1 --dry_run --lora_r 16 --gradient_checkpointing"}).stdout)
    args = parse_stage("ppo", split_launch(ppo)[2], monkeypatch)
    assert (args.lora_r, args.gradient_checkpointing, args.lr) == (16, True, 3e-6)


def test_judge_and_figures_commands_are_accepted(monkeypatch):
    """The judge step (per cell: SFT, PPO and DPO validation tables, each into {cell}/judge/{policy}) and the
    figures step parse with judge.py's and paper_figures.py's CLIs, for Pythia (LLM judge) and embedded (gold)."""
    for extra, judge in (([], "llm"), (["--embedded"], "gold")):
        lines = commands(bash(SWEEP, *extra, "--dry_run", "--sizes", "1b" if not extra else "tiny-pythia-s", "--seeds", "7",
                              "--stages", "judge figures", "--sweep_dir", "sw").stdout)
        judged = [parse_stage("judge", argv[3:], monkeypatch) for argv in lines if argv[2] == f"{PACKAGE}.judge"]
        cell = f"sw/{'1b' if not extra else 'tiny-pythia-s'}/seed7"
        assert [(a.table, a.output_dir, a.judge) for a in judged] == [
            (f"{cell}/sft/eval_query_responses_validation.csv", f"{cell}/judge/sft", judge),
            (f"{cell}/ppo/query_responses_validation.csv", f"{cell}/judge/ppo", judge),
            (f"{cell}/dpo/query_responses_validation.csv", f"{cell}/judge/dpo", judge)]
        assert [argv[2:] for argv in lines if argv[2] != f"{PACKAGE}.judge"] == [  # no asset step: nothing trains
            [f"{PACKAGE}.paper_figures", "--sweep_dir", "sw", "--out_dir", "sw/figures"]]
    _require_module("paper_figures")  # then its CLI must accept them
    figures = parse_stage("paper_figures", ["--sweep_dir", "sw", "--out_dir", "sw/figures"], monkeypatch)
    assert (figures.sweep_dir, figures.out_dir) == ("sw", "sw/figures")


def test_frozen_models_config_of_the_6_9b_ppo(monkeypatch):
    """SPEC Detail 8: the 6.9B PPO runs its frozen reference and reward model as ZeRO-3 engines with CPU
    offload, configured by configs/accelerate/deepspeed_zero3_offload.yaml; the ZeRO-2 yaml gives whole copies."""
    from summarize_from_feedback_details.training import (
        FROZEN_PARAM_PERSISTENCE_THRESHOLD,
        frozen_models_config,
    )

    args = parse_stage("ppo", ["pythia", "--frozen_models_config", "configs/accelerate/deepspeed_zero3_offload.yaml"], monkeypatch)
    config = frozen_models_config(str(REPO / args.frozen_models_config), micro_batch_size=4)
    assert config["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": FROZEN_PARAM_PERSISTENCE_THRESHOLD,
                                           "offload_param": {"device": "cpu"}}
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["bf16"]["enabled"] == torch.cuda.is_available()  # the yaml says bf16; CPU runs stay fp32
    whole = frozen_models_config(str(REPO / "configs/accelerate/deepspeed_zero2_bf16.yaml"), micro_batch_size=4)
    assert whole["zero_optimization"] == {"stage": 0}


def test_frozen_models_config_bad_input(tmp_path):
    from summarize_from_feedback_details.core import UserInputError
    from summarize_from_feedback_details.training import frozen_models_config

    with pytest.raises(UserInputError, match=r"--frozen_models_config '.*nothing.yaml' does not exist"):
        frozen_models_config(str(tmp_path / "nothing.yaml"), 1)
    multi_gpu = tmp_path / "multi_gpu.yaml"
    multi_gpu.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 8\n")
    with pytest.raises(UserInputError, match=r"is not a DeepSpeed config"):
        frozen_models_config(str(multi_gpu), 1)
    leftover = tmp_path / "leftover_deepspeed_section.yaml"  # a zero_stage, but not launched with DeepSpeed
    leftover.write_text((CONFIGS / "deepspeed_zero3_offload.yaml").read_text().replace("distributed_type: DEEPSPEED", "distributed_type: MULTI_GPU"))
    with pytest.raises(UserInputError, match=r"is not a DeepSpeed config"):
        frozen_models_config(str(leftover), 1)
    nvme = tmp_path / "nvme.yaml"
    nvme.write_text((CONFIGS / "deepspeed_zero3_offload.yaml").read_text().replace("offload_param_device: cpu", "offload_param_device: nvme"))
    with pytest.raises(UserInputError, match=r"offload_param_device 'nvme' is not supported"):
        frozen_models_config(str(nvme), 1)


# ----------------------------------------------------------------------------------------------
# accelerate configs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "stage", "offload"), [("deepspeed_zero2_bf16", 2, "none"), ("deepspeed_zero3_offload", 3, "cpu")])
def test_accelerate_configs(name: str, stage: int, offload: str, monkeypatch):
    """accelerate reads each config (no unknown key), every DeepSpeed key is one `accelerate launch` knows, and the
    environment the launcher derives from it makes accelerate's DeepSpeed plugin the ZeRO stage and offload meant."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    path = str(CONFIGS / f"{name}.yaml")
    config = load_config_from_file(path)
    assert config.distributed_type == "DEEPSPEED" and config.mixed_precision == "bf16" and config.num_processes == 8
    assert config.deepspeed_config["zero_stage"] == stage and config.deepspeed_config["offload_param_device"] == offload
    assert config.deepspeed_config["offload_optimizer_device"] == "none" and not config.deepspeed_config["zero3_init_flag"]
    known = {action.dest for action in launch_command_parser()._actions}
    assert set(config.deepspeed_config) <= known
    launch = launch_command_parser().parse_args(["--config_file", path, "-m", f"{PACKAGE}.ppo", "pythia"])
    launch, defaults, _ = _validate_launch_command(launch)
    launch.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(launch)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    zero = DeepSpeedPlugin().deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage and zero["offload_param"]["device"] == offload and zero["offload_optimizer"]["device"] == "none"


# ----------------------------------------------------------------------------------------------
# slurm
# ----------------------------------------------------------------------------------------------
def test_slurm_files_parse():
    """bash -n on every script; sbatch reads #SBATCH lines only before the first command, so they come first;
    the GPU steps ask for the 8 GPUs the ZeRO-2 config launches processes for."""
    from accelerate.commands.config.config_args import load_config_from_file

    processes = load_config_from_file(str(CONFIGS / "deepspeed_zero2_bf16.yaml")).num_processes
    files = sorted(SLURM.iterdir())
    assert {p.name for p in files} == {"submit.sh", "array_task.sh", *(f"{s}.sbatch" for s in (*STAGES, "rloo", "judge", "figures"))}
    for path in [SWEEP, *files]:
        subprocess.run(["bash", "-n", str(path)], check=True)
    for path in SLURM.glob("*.sbatch"):
        lines = path.read_text().splitlines()
        first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
        directives = [line for line in lines if line.startswith("#SBATCH")]
        assert directives and all(lines.index(d) < first_command for d in directives), path.name
        assert f"#SBATCH --job-name=sffd-{path.stem}" in directives
        gpus = [d for d in directives if d.startswith("#SBATCH --gpus-per-task=")]
        if path.stem in (*STAGES, "rloo"):
            assert gpus == [f"#SBATCH --gpus-per-task={processes}"], path.name
        else:
            assert gpus == [], path.name


def _sbatch_lines(*args: str) -> list[list[str]]:
    output = bash(SLURM / "submit.sh", "--dry_run", *args).stdout
    lines = [shlex.split(line.split("  # -> job ")[0]) for line in output.splitlines() if not line.startswith("#")]
    assert all(line[1] == "sbatch" and line[0].startswith("SWEEP_ARGS=") for line in lines)
    return [line[1:] for line in lines]


def _option(line: list[str], name: str) -> str | None:
    for i, word in enumerate(line):
        if word == name:
            return line[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def test_slurm_submit_chains_the_steps():
    """Six submissions: five arrays over the 2 x 2 cells and the figures job, chained sft -> reward -> ppo, dpo ->
    judge -> figures with afterok (or aftercorr per task); a partial submission chains to the nearest submitted step."""
    lines = _sbatch_lines("--sizes", "1b 2.8b", "--seeds", "1 2")
    steps = [Path(line[-1]).stem for line in lines]
    assert steps == ["sft", "reward", "ppo", "dpo", "judge", "figures"]
    ids = {step: str(1001 + i) for i, step in enumerate(steps)}  # the dry run's made-up job ids, in order
    deps = {step: _option(line, "--dependency") for step, line in zip(steps, lines, strict=True)}
    assert deps == {"sft": None, "reward": f"afterok:{ids['sft']}", "ppo": f"afterok:{ids['reward']}",
                    "dpo": f"afterok:{ids['reward']}", "judge": f"afterok:{ids['ppo']}:{ids['dpo']}",
                    "figures": f"afterok:{ids['judge']}"}
    assert [_option(line, "--array") for line in lines] == ["0-3"] * 5 + [None]
    assert all(_option(line, "--export") == "ALL" for line in lines)
    per_task = _sbatch_lines("--sizes", "1b", "--seeds", "1 2 3", "--dependency", "aftercorr", "--stages", "ppo judge figures")
    assert [(Path(line[-1]).stem, _option(line, "--array"), _option(line, "--dependency")) for line in per_task] == [
        ("ppo", "0-2", None), ("judge", "0-2", "aftercorr:1001"), ("figures", None, "afterok:1002")]
    with_rloo = _sbatch_lines("--sizes", "1b", "--seeds", "1", "--stages", "reward ppo rloo dpo judge")  # RLOO beside PPO
    assert [(Path(line[-1]).stem, _option(line, "--dependency")) for line in with_rloo] == [
        ("reward", None), ("ppo", "afterok:1001"), ("rloo", "afterok:1001"), ("dpo", "afterok:1001"),
        ("judge", "afterok:1002:1003:1004")]
    bad = bash(SLURM / "submit.sh", "--dry_run", "--sizes", "1b 13b", check=False)
    assert bad.returncode == 2 and "unknown size '13b'" in bad.stderr


def test_slurm_array_tasks_run_the_cells_commands():
    """Run each .sbatch file's body as slurm would, for every array index: task i runs the i-th cell of
    `sweep.sh --list_cells` (sizes outer, seeds inner) with exactly the local sweep's commands."""
    sweep_args = "--sizes 1b,2.8b --seeds 1,2 --dry_run"
    cells = [("1b", "1"), ("1b", "2"), ("2.8b", "1"), ("2.8b", "2")]
    assert bash(SWEEP, *sweep_args.split()[:-1], "--list_cells").stdout.split("\n")[:4] == [" ".join(c) for c in cells]
    for stage in (*STAGES, "rloo", "judge"):
        for task, (size, seed) in enumerate(cells):
            got = bash(SLURM / f"{stage}.sbatch", env={"SLURM_ARRAY_TASK_ID": str(task), "SWEEP_ARGS": sweep_args})
            local = bash(SWEEP, "--sizes", size, "--seeds", seed, "--stages", stage, "--dry_run")
            assert commands(got.stdout) == commands(local.stdout) and commands(got.stdout)
            assert f"array task {task}: size {size}, seed {seed}, stage {stage}" in got.stderr
    figures = bash(SLURM / "figures.sbatch", env={"SWEEP_ARGS": sweep_args})
    assert [c[2] for c in commands(figures.stdout)] == [f"{PACKAGE}.paper_figures"]
    outside = bash(SLURM / "ppo.sbatch", env={"SLURM_ARRAY_TASK_ID": "4", "SWEEP_ARGS": sweep_args}, check=False)
    assert outside.returncode == 2 and "array task 4 has no cell" in outside.stderr
