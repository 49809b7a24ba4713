"""Bad input fails fast (issue 16): stage x bad input -> exit status 2, ONE line naming the input and the fix, in a
few seconds, and no run folder. A run that fails after its folder exists leaves FAILED.json there, which the sweep
and the ablation runner read as not finished. Every numeric field of every stage has an accepted range.

The table runs in ONE subprocess (`python tests/test_bad_inputs.py cases.json result.json`): for each case it calls
the stage's own command line (`core.cli` with the stage's PRESETS and main, what `python -m` runs) with `sys.argv`
set, and records the exit status, stderr, seconds and whether a run folder appeared. Two cases also run as real
`python -m` processes to show the harness sees what a user sees.
"""

from __future__ import annotations

import collections
import json
import shlex
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

PACKAGE = "summarize_from_feedback_details"
STAGES = ("tldr_dataset", "sft", "reward", "ppo", "rloo", "dpo")
SECONDS = 5.0
"""the most a case may take once the stage modules are imported"""
pytestmark = pytest.mark.xdist_group("bad_inputs")  # one worker runs the harness once for every case


# ----------------------------------------------------------------------------------------------
# Inputs: a tiny tokenizer, causal LM and reward model, made in seconds
# ----------------------------------------------------------------------------------------------
def make_inputs(root: Path) -> dict[str, str]:
    """Tiny inputs in `root`: a tokenizer, a GPT-NeoX causal LM (as sft.py saves one), a reward model (as reward.py
    saves one), a directory without config.json, an empty directory, a plain file, split files that exist but are
    empty, and a processed SFT dataset with a truncated (unreadable) base model for a failure after the run folder."""
    import datasets
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from summarize_from_feedback_details.core import set_pad_token
    from summarize_from_feedback_details.modeling import ScalarModel, ScalarModelConfig

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the cat sat on the mat. TL;DR: a cat sat"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = set_pad_token(PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>"))
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64)
    paths = {name: root / name for name in ("tokenizer", "lm", "rm", "no_config", "empty_dir", "truncated_lm", "data")}
    tokenizer.save_pretrained(str(paths["tokenizer"]))
    GPTNeoXForCausalLM(config).save_pretrained(str(paths["lm"]))
    ScalarModel(ScalarModelConfig(base_config=config.to_dict(), base_model="tiny")).save_pretrained(str(paths["rm"]))
    for name in ("no_config", "empty_dir"):
        paths[name].mkdir()
    (paths["no_config"] / "model.safetensors").write_bytes(b"")
    paths["file"] = root / "train.jsonl"
    paths["file"].write_text('{"id": "1"}\n')
    for name, suffix, text in (("empty_splits", "jsonl", ""), ("json_empty_lists", "json", "[]\n"), ("malformed", "jsonl", "{not json\n")):
        paths[name] = root / name
        paths[name].mkdir()
        for split in ("train", "validation", "test"):
            (paths[name] / f"{split}.{suffix}").write_text(text)
    paths["empty_preference"] = root / "empty_preference"  # comparisons have no test split
    paths["empty_preference"].mkdir()
    for split in ("train", "validation"):
        (paths["empty_preference"] / f"{split}.jsonl").write_text("")
    # a failure after the run folder exists: the data and tokenizer are fine, the base model's weights are cut off
    GPTNeoXForCausalLM(config).save_pretrained(str(paths["truncated_lm"]))
    weights = paths["truncated_lm"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    row = {"query_reference_response_token": [5, 6, 7, 0], "query_reference_response_token_response_label": [5, 6, 7, 0],
           "reference_response_token": [7, 0]}
    datasets.DatasetDict(train=datasets.Dataset.from_list([row] * 4)).save_to_disk(str(paths["data"] / "sft"))
    tokenizer.save_pretrained(str(paths["data"] / "tokenizer"))
    return {name: str(path) for name, path in paths.items()}


def bad_input_cases(inputs: dict[str, str]) -> list[dict]:
    """(id, stage, argv, what stderr must say): every case exits 2 with one line and leaves no run folder."""
    lm, rm, data = inputs["lm"], inputs["rm"], inputs["empty_dir"]
    offline = r"no local directory '{0}' \(in .*\), and as a hub {1} id it is not in the local cache and the hub is offline"
    out_of_range = r"^--{0} {1} is out of range: .* must be {2}; pass a value {2}, e\.g\. --{0} {3} \(the default\)$"
    cases = [
        # numbers, each checked before any work
        ("dpo_beta", "dpo", ["embedded", "--beta", "-1"], out_of_range.format("beta", r"-1\.0", "> 0", "0.05")),
        ("sft_lr", "sft", ["embedded", "--lr", "-1"], out_of_range.format("lr", r"-1\.0", "> 0", "3e-06")),
        ("reward_lr", "reward", ["embedded", "--lr", "-1"], out_of_range.format("lr", r"-1\.0", "> 0", "3e-06")),
        ("ppo_lr", "ppo", ["embedded", "--lr", "-1"], out_of_range.format("lr", r"-1\.0", "> 0", "3e-06")),
        ("dpo_lr", "dpo", ["embedded", "--lr", "-1"], out_of_range.format("lr", r"-1\.0", "> 0", "3e-06")),
        ("sft_eps_nan", "sft", ["embedded", "--eps", "nan"], out_of_range.format("eps", "nan", "> 0", "1e-05")),
        ("ppo_temperature", "ppo", ["embedded", "--temperature", "0"], out_of_range.format("temperature", r"0\.0", "> 0", "0.7")),
        ("ppo_eval_temperature", "ppo", ["embedded", "--eval_temperature", "0"],
         out_of_range.format("eval_temperature", r"0\.0", "> 0", "0.01")),
        ("sft_temperature", "sft", ["embedded", "--temperature", "-0.5"], out_of_range.format("temperature", r"-0\.5", "> 0", "0.01")),
        ("ppo_gamma", "ppo", ["embedded", "--gamma", "1.5"], out_of_range.format("gamma", r"1\.5", r"in \[0, 1\]", "1.0")),
        ("ppo_lam", "ppo", ["embedded", "--lam", "-0.1"], out_of_range.format("lam", r"-0\.1", r"in \[0, 1\]", "0.95")),
        ("ppo_cliprange", "ppo", ["embedded", "--cliprange", "0"], out_of_range.format("cliprange", r"0\.0", "> 0", "0.2")),
        ("ppo_vf_coef", "ppo", ["embedded", "--vf_coef", "-0.1"], out_of_range.format("vf_coef", r"-0\.1", ">= 0", "0.1")),
        ("ppo_kl_coef", "ppo", ["embedded", "--kl_coef", "-0.05"], out_of_range.format("kl_coef", r"-0\.05", ">= 0", "0.05")),
        ("ppo_num_ppo_epochs", "ppo", ["embedded", "--num_ppo_epochs", "0"], out_of_range.format("num_ppo_epochs", "0", ">= 1", "4")),
        ("ppo_save_samples_every", "ppo", ["embedded", "--save_samples_every", "-1"],
         out_of_range.format("save_samples_every", "-1", ">= 0", "220")),
        ("dpo_label_smoothing", "dpo", ["embedded", "--label_smoothing", "0.5"],
         out_of_range.format("label_smoothing", r"0\.5", r"in \[0, 0\.5\)", "0.0")),
        ("sft_epochs", "sft", ["embedded", "--num_train_epochs", "0"], out_of_range.format("num_train_epochs", "0", ">= 1", "1")),
        ("sft_batch_size", "sft", ["embedded", "--batch_size", "0"], out_of_range.format("batch_size", "0", ">= 1", "128")),
        ("sft_total_episodes", "sft", ["embedded", "--total_episodes", "0"],
         r"^--total_episodes 0 is out of range: .* must be >= 1; pass a value >= 1, leave it out for the default$"),
        ("reward_total_episodes", "reward", ["embedded", "--total_episodes", "-1"],
         r"^--total_episodes -1 is out of range: .*0: evaluate --reward_model_path.* must be >= 0"),
        ("reward_normalization_samples", "reward", ["embedded", "--normalization_samples", "0"],
         r"^--normalization_samples 0 is out of range: .* must be >= 1; pass a value >= 1, leave it out for the default$"),
        ("data_query_length", "tldr_dataset", ["embedded", "--lengths.query", "-5"],
         out_of_range.format(r"lengths\.query", "-5", ">= 1", "512")),
        ("data_num_proc", "tldr_dataset", ["embedded", "--num_proc", "0"], out_of_range.format("num_proc", "0", ">= 1", "1")),
        # paths that read as a local directory or a hub id: both readings named, no hub wait (offline)
        ("sft_dataset_typo", "sft", ["embedded", "--dataset", "datasets/embeded", "--base_model", lm],
         "^--dataset 'datasets/embeded': " + offline.format("datasets/embeded", "dataset") + ".*; pass a directory written by tldr_dataset"),
        ("ppo_default_sft_model", "ppo", ["embedded", "--dataset", data],
         "^--sft_model_path 'models/sft_model': " + offline.format("models/sft_model", "model") + ".*; pass a causal LM"),
        ("ppo_default_reward_model", "ppo", ["embedded", "--dataset", data, "--sft_model_path", lm],
         "^--reward_model_path 'models/reward_model': " + offline.format("models/reward_model", "model") + ".*; pass the model/ folder"),
        ("reward_default_sft_model", "reward", ["embedded", "--dataset", data],
         "^--sft_model_path 'models/sft_model': " + offline.format("models/sft_model", "model")),
        ("dpo_default_sft_model", "dpo", ["embedded", "--dataset", data],
         "^--sft_model_path 'models/sft_model': " + offline.format("models/sft_model", "model")),
        ("data_base_model_hub_id", "tldr_dataset", ["pythia", "--base_model", "EleutherAI/pythia-1b-deduped-typo"],
         "^--base_model 'EleutherAI/pythia-1b-deduped-typo': " + offline.format("EleutherAI/pythia-1b-deduped-typo", "model")),
        # the wrong kind of checkpoint, read from its config before any weights load
        ("ppo_reward_model_is_causal_lm", "ppo", ["embedded", "--dataset", data, "--sft_model_path", lm, "--reward_model_path", lm],
         r"^--reward_model_path '.*lm': expected a reward model saved by reward\.py \(ScalarModel.*\); got a causal LM "
         r"checkpoint \(e\.g\. from sft\.py\): model_type gpt_neox, GPTNeoXForCausalLM; pass the model/ folder of a reward\.py run"),
        ("dpo_reward_model_is_causal_lm", "dpo", ["embedded", "--dataset", data, "--sft_model_path", lm, "--reward_model_path", lm],
         r"^--reward_model_path '.*lm': expected a reward model saved by reward\.py"),
        ("reward_eval_of_causal_lm", "reward", ["embedded", "--dataset", data, "--total_episodes", "0", "--reward_model_path", lm],
         r"^--reward_model_path '.*lm': expected a reward model saved by reward\.py"),
        ("dpo_sft_model_is_reward_model", "dpo", ["embedded", "--dataset", data, "--sft_model_path", rm],
         r"^--sft_model_path '.*rm': expected a causal LM .*; got a reward model saved by reward\.py \(ScalarModel\)"),
        ("sft_base_model_without_config", "sft", ["embedded", "--dataset", data, "--base_model", inputs["no_config"]],
         r"^--base_model '.*no_config' is not a saved model \(no config\.json there\)"),
        ("sft_base_model_missing", "sft", ["embedded", "--dataset", data, "--base_model", "./missing/model"],
         r"^--base_model './missing/model' is not a saved model \(no such directory\); pass a causal LM"),
        # a file where a directory is expected
        ("sft_dataset_is_a_file", "sft", ["embedded", "--dataset", inputs["file"], "--base_model", lm],
         r"^--dataset '.*train\.jsonl' is a file, not a directory; pass a directory written by tldr_dataset"),
        ("data_sft_dataset_is_a_file", "tldr_dataset", ["pythia", "--base_model", inputs["tokenizer"], "--sft_dataset", inputs["file"]],
         r"^--sft_dataset '.*train\.jsonl' is a file, not a directory; pass a directory of \{train,validation,test\}\.\{jsonl,json,parquet\}"),
        ("data_embedded_dir_is_a_file", "tldr_dataset", ["embedded", "--embedded_dir", inputs["file"]],
         r"^--embedded_dir '.*train\.jsonl' is a file, not a directory"),
        # split files that exist but are empty
        ("data_empty_split_files", "tldr_dataset", ["pythia", "--base_model", inputs["tokenizer"], "--sft_dataset",
                                                     inputs["empty_splits"], "--preference_dataset", inputs["empty_preference"]],
         r"^--sft_dataset '.*empty_splits': SFT split 'train' has no rows; the stages train on it: pass data with train rows$"),
        ("data_json_empty_lists", "tldr_dataset", ["pythia", "--base_model", inputs["tokenizer"], "--sft_dataset",
                                                    inputs["json_empty_lists"], "--preference_dataset", inputs["empty_preference"]],
         r"^--sft_dataset '.*json_empty_lists': SFT split 'train' has no rows"),
        ("data_malformed_jsonl", "tldr_dataset", ["pythia", "--base_model", inputs["tokenizer"], "--sft_dataset",
                                                   inputs["malformed"], "--preference_dataset", inputs["empty_preference"]],
         r"^cannot read .*malformed/train\.jsonl as jsonl \(ArrowInvalid: JSON parse error: .* in row 0\); fix the file "
         r"\(\.jsonl: one JSON object per line"),
    ]
    return [{"id": id_, "stage": stage, "argv": argv, "message": message} for id_, stage, argv, message in cases]


# ----------------------------------------------------------------------------------------------
# The harness: every case through the stage's own command line, in this one process
# ----------------------------------------------------------------------------------------------
def run_cases(cases: list[dict], workdir: Path) -> list[dict]:
    """Each case as `python -m summarize_from_feedback_details.<stage> <argv> --output_dir <its own folder>` would
    run it, in this process: exit status, stderr, seconds, and whether the output folder appeared."""
    import contextlib
    import importlib
    import io
    import os
    import tempfile
    import traceback

    from summarize_from_feedback_details.core import cli

    modules = {stage: importlib.import_module(f"{PACKAGE}.{stage}") for stage in STAGES}  # imports before the clock
    results = []
    for case in cases:
        folder = workdir / case["id"]
        argv = [*case["argv"], *([] if "--output_dir" in case["argv"] else ["--output_dir", str(folder)])]
        module = modules[case["stage"]]
        sys.argv = [f"{PACKAGE}.{case['stage']}", *argv]
        # stderr captured at the file descriptor: libraries' log handlers that hold the original sys.stderr count too
        with tempfile.TemporaryFile("w+") as stderr, contextlib.redirect_stdout(io.StringIO()):
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(stderr.fileno(), 2)
            start = time.perf_counter()
            try:
                cli(module.PRESETS, module.main, description=module.__doc__.splitlines()[0])
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:  # noqa: BLE001 - what the interpreter would print, and status 1
                traceback.print_exc()
                code = 1
            finally:
                seconds = time.perf_counter() - start
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
            stderr.seek(0)
            results.append({"id": case["id"], "code": code, "stderr": stderr.read(), "seconds": seconds,
                            "folder": str(folder), "folder_exists": folder.exists()})
    return results


def harness_env(root: Path) -> dict[str, str]:
    """Offline and with an empty hub cache, whatever this machine has: the hub readings are the same everywhere."""
    return subprocess_env(HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf_home"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    return make_inputs(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture(scope="module")
def outcomes(inputs, tmp_path_factory) -> dict[str, dict]:
    """Every bad-input case (and the failing run, last) through the harness in one subprocess."""
    root = tmp_path_factory.mktemp("bad_input_runs")
    cases = bad_input_cases(inputs) + [failing_run_case(inputs, root)]
    (root / "cases.json").write_text(json.dumps(cases))
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(root / "cases.json"), str(root / "results.json")],
                            cwd=root, env=harness_env(root), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = {r["id"]: r for r in json.loads((root / "results.json").read_text())}
    print("\n".join(f"{r['id']:34s} exit {r['code']}  {r['seconds']:5.2f} s  {r['stderr'].strip()[:160]}" for r in outcomes.values()))
    return outcomes


def failing_run_case(inputs: dict[str, str], root: Path) -> dict:
    """SFT on good data whose base model's weights are cut off: it fails while loading the model, after the run
    folder exists. The folder holds a finished earlier run's metrics.json (a rerun with the same --run_name)."""
    runs = root / "failing" / "runs"
    (runs / "sft").mkdir(parents=True)
    (runs / "sft" / "metrics.json").write_text("{}")
    return {"id": "failing_run", "stage": "sft", "message": None,
            "argv": ["embedded", "--dataset", inputs["data"], "--base_model", inputs["truncated_lm"], "--batch_size", "2",
                     "--local_micro_batch_size", "1", "--output_dir", str(runs), "--run_name", "sft"]}


CASE_IDS = [case["id"] for case in bad_input_cases(collections.defaultdict(str))]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_fails_fast_with_one_line(case_id: str, outcomes: dict[str, dict], inputs: dict[str, str]):
    """Exit status 2, one line `error: ...` naming the flag and the fix, within SECONDS, no run folder."""
    import re

    case = next(case for case in bad_input_cases(inputs) if case["id"] == case_id)
    outcome = outcomes[case_id]
    lines = outcome["stderr"].strip().splitlines()
    assert outcome["code"] == 2, outcome
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome["stderr"]
    assert re.search(case["message"], lines[0].removeprefix("error: ")), (case["message"], lines[0])
    assert outcome["seconds"] < SECONDS, outcome
    assert not outcome["folder_exists"], outcome


@pytest.mark.slow
def test_a_run_that_fails_after_its_folder_exists_is_marked_failed(outcomes: dict[str, dict], tmp_path: Path):
    """The failing SFT run: a traceback (status 1), FAILED.json with the error in its folder, the earlier run's
    metrics.json gone; the run is not finished for core.run_finished, ablate's resume and the sweep's skip."""
    from summarize_from_feedback_details.ablate import Run
    from summarize_from_feedback_details.core import FAILED_FILE, run_finished

    outcome = outcomes["failing_run"]
    run = Path(outcome["folder"]).parent / "failing" / "runs" / "sft"
    assert outcome["code"] == 1 and "Traceback" in outcome["stderr"], outcome
    failed = json.loads((run / FAILED_FILE).read_text())
    assert failed["argv"][-1] == "sft" and failed["traceback"] and failed["message"], failed
    assert (run / "args.json").exists() and not (run / "metrics.json").exists()
    assert not run_finished(run) and not Run("baseline", "sft", 1, run, None).done
    # the sweep skips a finished stage only: metrics.json and no FAILED.json (a failure after metrics.json was
    # written, e.g. in --push_to_hub, leaves both)
    cell = tmp_path / "sweep" / "1b" / "seed1"
    for stage, files in (("sft", ["metrics.json"]), ("reward", ["metrics.json", FAILED_FILE]), ("ppo", [FAILED_FILE])):
        (cell / stage).mkdir(parents=True)
        for name in files:
            (cell / stage / name).write_text("{}")
    dry = subprocess.run(["bash", str(REPO / "scripts" / "sweep.sh"), "--dry_run", "--sizes", "1b", "--seeds", "1", "--stages",
                          "sft reward ppo", "--sweep_dir", str(tmp_path / "sweep")], cwd=REPO, capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert dry.returncode == 0, dry.stderr
    skipped = [line for line in dry.stdout.splitlines() if line.startswith("# skip ")]
    assert len(skipped) == 1 and "/sft " in skipped[0], dry.stdout
    commands = [shlex.split(line) for line in dry.stdout.splitlines() if line.strip() and not line.startswith("#")]
    assert [command[command.index("-m") + 1].rsplit(".", 1)[-1] for command in commands] == ["reward", "ppo"]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["dpo_beta", "ppo_default_sft_model"])
def test_real_process_matches_the_harness(case_id: str, outcomes: dict[str, dict], inputs: dict[str, str], tmp_path: Path):
    """`python -m ...` itself: the same exit status and the same one line as the harness saw; no run folder."""
    case = next(case for case in bad_input_cases(inputs) if case["id"] == case_id)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", f"{PACKAGE}.{case['stage']}", *case["argv"], "--output_dir", str(tmp_path / "runs")],
                            cwd=Path(outcomes[case_id]["folder"]).parent, env=harness_env(tmp_path), capture_output=True, text=True,
                            timeout=300)
    print(f"{case_id}: python -m took {time.perf_counter() - start:.1f} s (imports included)")
    assert result.returncode == 2 and result.stderr.strip() == outcomes[case_id]["stderr"].strip(), (result.returncode, result.stderr)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------
# Units: the range table, its messages, the hub lookup
# ----------------------------------------------------------------------------------------------
def numeric_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the int / float fields of the dataclass `cls` (Optional ones too), nested dataclasses included."""
    import dataclasses

    names = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            names += numeric_fields(hint, f"{prefix}{field.name}.")
        elif {int, float} & set(typing.get_args(hint) or (hint,)):
            names.append(f"{prefix}{field.name}")
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_every_numeric_field_has_a_range(stage: str):
    import importlib

    from summarize_from_feedback_details.core import NUMBER_RANGES

    fields = numeric_fields(importlib.import_module(f"{PACKAGE}.{stage}").Args)
    assert len(fields) >= 3
    missing = [name for name in fields if name not in NUMBER_RANGES and name.split(".")[0] not in NUMBER_RANGES]
    assert not missing, f"{stage}: numeric fields without an accepted range in core.NUMBER_RANGES: {missing}"


def test_ranges_and_their_messages():
    from dataclasses import dataclass, field

    from summarize_from_feedback_details.core import Range, UserInputError, validate_numbers

    unit, half_open = Range("x", low=0, high=1), Range("x", low=0, high=0.5, open_high=True)
    assert [unit.accepts(v) for v in (-0.01, 0, 1, 1.01, float("nan"), float("inf"))] == [False, True, True, False, False, False]
    assert [half_open.accepts(v) for v in (0, 0.49, 0.5)] == [True, True, False]
    assert Range("x", low=0, open_low=True).describe() == "> 0" and half_open.describe() == "in [0, 0.5)"
    assert Range("x").accepts(-1e9) and not Range("x").accepts(float("-inf")) and Range("x").describe() == "a finite number"

    @dataclass
    class Inner:
        query: int = 512

    @dataclass
    class Args:
        lr: float = 3e-6
        total_episodes: int | None = None
        lengths: Inner = field(default_factory=Inner)  # nested, as tldr_dataset's Lengths
        unknown: float = -1.0  # a field without a range is not checked

    validate_numbers(Args())
    with pytest.raises(UserInputError, match=r"^--lr 0\.0 is out of range: the learning rate must be > 0; pass a value > 0, "
                                             r"e\.g\. --lr 3e-06 \(the default\)$"):
        validate_numbers(Args(lr=0.0))
    with pytest.raises(UserInputError, match=r"^--lengths\.query 0 is out of range: a token length must be >= 1"):
        validate_numbers(Args(lengths=Inner(query=0)))
    with pytest.raises(UserInputError, match=r"leave it out for the default$"):
        validate_numbers(Args(total_episodes=0))
    validate_numbers(Args(total_episodes=0), {"total_episodes": Range("evaluation only", low=0)})  # a stage's own range


def test_hub_lookup_reports_why_and_never_waits_long(monkeypatch, tmp_path: Path):
    """Not cached and not offline: the one hub lookup says not reachable, no such repository, or no answer in time."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    from summarize_from_feedback_details import core

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))

    def answer(outcome):
        def repo_info(self, repo_id, **kwargs):
            if isinstance(outcome, float):
                time.sleep(outcome)
            elif isinstance(outcome, Exception):
                raise outcome
            return {"id": repo_id}
        return repo_info

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", answer(None))
    assert core.hub_problem("org/name", "model") is None
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", answer(ConnectionError("[Errno -2] Name or service not known")))
    assert core.hub_problem("org/name", "model") == "the hub is not reachable (ConnectionError: [Errno -2] Name or service not known)"
    not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
    Exception.__init__(not_found, "404 Client Error: Repository Not Found")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", answer(not_found))
    assert core.hub_problem("org/name", "dataset").startswith("the hub has no such dataset")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", answer(3.0))
    start = time.perf_counter()
    assert core.hub_problem("org/name", "model", timeout=0.2) == "the hub did not answer within 0.2 s (offline?)"
    assert time.perf_counter() - start < 1.0
    (tmp_path / "hub" / "models--org--name").mkdir(parents=True)  # in the local cache: no lookup at all
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert core.hub_problem("org/name", "model") is None and core.hub_problem("org/other", "model").endswith("(HF_HUB_OFFLINE is set)")


if __name__ == "__main__":  # the harness: python tests/test_bad_inputs.py cases.json results.json (cwd: a scratch folder)
    cases_path, results_path = map(Path, sys.argv[1:3])
    Path(results_path).write_text(json.dumps(run_cases(json.loads(cases_path.read_text()), Path.cwd())))
