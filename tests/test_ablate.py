"""The ablation runner: the commands it plans (baseline chains, a detail's stage and everything downstream of
it, the inversion when the preset already runs the ablation), bad input, and one real two-seed run whose
table must equal the runs' own metrics.json."""

from __future__ import annotations

import ast
import csv
import json
import math
import sys

import pytest

from conftest import REPO, read_metrics
from summarize_from_feedback_details import ablate
from summarize_from_feedback_details.core import UserInputError
from summarize_from_feedback_details.details import Detail

PY = sys.executable
M = "summarize_from_feedback_details"


def _dry_run(capsys, **fields) -> list[str]:
    ablate.main(ablate.Args(dry_run=True, **fields))
    return capsys.readouterr().out.splitlines()


def test_dry_run_inverts_a_preset_ablation_and_reruns_downstream(tmp_path, capsys):
    """Detail 9's registry ablation `--completion_only_loss` is what the embedded SFT preset already runs, so
    the switched SFT takes the paper's `--no-completion_only_loss`; SFT feeds RM, PPO and DPO, which re-run
    on it (the RM on the switched SFT, PPO on both). A PPO detail re-runs PPO only, on the baseline runs."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    lines = _dry_run(capsys, details=("sft_setup", "reward_whitening"), seeds=(3,), out_dir=str(out), dataset=str(data),
                     embedded_dir="E", ppo_args="--kl_coef 0.07")
    base, sft9 = out / "seed3" / "baseline", out / "seed3" / "sft_setup"
    common = f"--dataset {data} --output_dir"
    assert lines == [
        f"{PY} -m {M}.sft embedded --base_model E/models/tiny-pythia-s {common} {base} --run_name sft --seed 3",
        f"{PY} -m {M}.reward embedded --sft_model_path {base}/sft/model {common} {base} --run_name reward --seed 3",
        f"{PY} -m {M}.ppo embedded --sft_model_path {base}/sft/model --reward_model_path {base}/reward/model {common} {base} "
        "--run_name ppo --seed 3 --kl_coef 0.07",
        f"{PY} -m {M}.dpo embedded --sft_model_path {base}/sft/model --reward_model_path {base}/reward/model {common} {base} "
        "--run_name dpo --seed 3",
        f"{PY} -m {M}.sft embedded --base_model E/models/tiny-pythia-s {common} {sft9} --run_name sft --seed 3 --no-completion_only_loss",
        f"{PY} -m {M}.reward embedded --sft_model_path {sft9}/sft/model {common} {sft9} --run_name reward --seed 3",
        f"{PY} -m {M}.ppo embedded --sft_model_path {sft9}/sft/model --reward_model_path {sft9}/reward/model {common} {sft9} "
        "--run_name ppo --seed 3 --kl_coef 0.07",
        f"{PY} -m {M}.dpo embedded --sft_model_path {sft9}/sft/model --reward_model_path {sft9}/reward/model {common} {sft9} "
        "--run_name dpo --seed 3",
        f"{PY} -m {M}.ppo embedded --sft_model_path {base}/sft/model --reward_model_path {base}/reward/model {common} "
        f"{out}/seed3/reward_whitening --run_name ppo --seed 3 --kl_coef 0.07 --whiten_rewards",
    ]


def test_dry_run_data_detail_runs_once_and_downstream_allows_pad_eos(tmp_path, capsys):
    """Detail 3.2: the data stage (no seed) runs once per variant; every stage trained on data padded with EOS
    gets --allow_pad_equals_eos; --stages data sft stops the chains at SFT; a launcher starts the training stages."""
    out = tmp_path / "out"
    lines = _dry_run(capsys, details=("dedicated_pad",), seeds=(1, 2), out_dir=str(out), embedded_dir="E", stages=("data", "sft"),
                     quick=True, launcher="torchrun --standalone --nproc_per_node 2")
    data = f"{PY} -m {M}.tldr_dataset embedded --embedded_dir E --sft_dataset E/data/sft --preference_dataset E/data/preference " \
           "--base_model E/models/tiny-pythia-s --output_dir"
    sft = "torchrun --standalone --nproc_per_node 2 -m summarize_from_feedback_details.sft embedded --base_model E/models/tiny-pythia-s"
    quick = "--total_episodes 64 --max_eval_samples 8 --eval_splits validation"
    assert lines == [
        f"{data} {out}/data/baseline --no-figures",
        f"{sft} --dataset {out}/data/baseline --output_dir {out}/seed1/baseline --run_name sft --seed 1 {quick}",
        f"{data} {out}/data/dedicated_pad --no-figures --pad_token eos",
        f"{sft} --dataset {out}/data/dedicated_pad --output_dir {out}/seed1/dedicated_pad --run_name sft --seed 1 {quick} --allow_pad_equals_eos",
        f"{sft} --dataset {out}/data/baseline --output_dir {out}/seed2/baseline --run_name sft --seed 2 {quick}",
        f"{sft} --dataset {out}/data/dedicated_pad --output_dir {out}/seed2/dedicated_pad --run_name sft --seed 2 {quick} --allow_pad_equals_eos",
    ]


def test_ablation_args_inversion_and_bad_input(tmp_path, capsys):
    """The inversion is generic (parsed with the stage's CLI and presets): a non-boolean field takes the paper
    preset's value; an ablation that changes nothing anywhere, unknown keys and missing inputs are one clear error."""
    every = ablate.select_details(())
    assert {d.stage for d in every} <= set(ablate.STAGES) and {"no_eos_penalty", "dedicated_pad", "sft_setup"} <= {d.key for d in every}
    assert "judge_both_orders" not in {d.key for d in every}
    ablate.main(ablate.Args(list_details=True))
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [d.key for d in every]
    assert listed[[d.key for d in every].index("no_eos_penalty")].split()[1:4] == ["23.3", "ppo", "--no-eos_trick"]
    # The embedded PPO preset evaluates every 5 updates, the paper every update.
    spaced = Detail("eval_spacing", "P-6", "t", "ppo", "--eval_every", ("--eval_every", "5"), None)
    assert ablate.ablation_args(spaced, "embedded", []) == (("--eval_every", "1"), True)
    assert ablate.ablation_args(spaced, "embedded", ["--eval_every", "2"]) == (("--eval_every", "5"), False)
    noop = Detail("noop", "P-4", "t", "ppo", "--cliprange", ("--cliprange", "0.2"), None)  # 0.2 in both presets
    with pytest.raises(UserInputError, match=r"detail 'noop': its ablation arguments .* change nothing"):
        ablate.ablation_args(noop, "embedded", [])
    with pytest.raises(UserInputError, match=r"--details: \['nope'\] are not ablatable"):
        ablate.main(ablate.Args(details=("nope",), dry_run=True, out_dir=str(tmp_path)))
    with pytest.raises(UserInputError, match=r"the ppo stage trains on a reward run: add reward to --stages or pass --reward_run"):
        ablate.main(ablate.Args(details=("reward_whitening",), stages=("data", "sft", "ppo"), dry_run=True, out_dir=str(tmp_path)))
    with pytest.raises(UserInputError, match=r"--sft_run '.*missing' does not exist"):
        ablate.main(ablate.Args(sft_run=str(tmp_path / "missing"), dry_run=True, out_dir=str(tmp_path)))
    with pytest.raises(UserInputError, match=r"--reward_run '.*' has no model/ directory"):
        ablate.main(ablate.Args(reward_run=str(tmp_path), dry_run=True, out_dir=str(tmp_path)))
    with pytest.raises(UserInputError, match=r"does not parse for the ppo stage"):
        ablate.main(ablate.Args(details=("reward_whitening",), ppo_args="--no_such_flag 1", dry_run=True, out_dir=str(tmp_path)))
    # The stop rate sees an EOS that is also the pad: 2 of 4 responses kept fewer tokens than the 33 sampled.
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"response_length": 33, "eval/validation/eos_rate": 0.0}))
    (run / "eval_query_responses_validation.csv").write_text(
        "has_eos,response_token_len,response\nFalse,5,a\nFalse,33,b\nFalse,12,c\nFalse,33,d\n")
    assert ablate.Run("baseline", "sft", 1, run, None).metrics()[ablate.STOP_RATE] == 0.5
    for stage, args in ablate.QUICK_ARGS.items():  # --quick's arguments parse for their stage
        assert ablate.stage_config(stage, "embedded", args) != ablate.stage_config(stage, "embedded", [])


def test_findings_verdicts_by_hand():
    """A finding holds (`yes`) when the mean and every seed move the expected way, `mixed` when only the mean does."""
    def row(metric, base, abl):
        return {"detail": "reward_whitening", "stage": "ppo", "metric": metric, "delta": sum(abl) / 2 - sum(base) / 2,
                "baseline_per_seed": " ".join(map(repr, base)), "ablated_per_seed": " ".join(map(repr, abl))}

    rows = [row("eval/validation/response_token_len", [18.0, 18.0], [17.5, 17.0]),  # shorter in both seeds
            row("eval/validation/gold_win_rate", [0.04, 0.03], [0.02, 0.035])]  # lower on average, not in seed 2
    [checked] = ablate.findings(rows)
    assert [(c["metric"], c["agreeing"], c["holds"]) for c in checked["checks"]] == [
        ("eval/validation/response_token_len", "2/2", "yes"), ("eval/validation/gold_win_rate", "1/2", "mixed")]
    assert ablate.findings([row("eval/validation/response_token_len", [18.0, 18.0], [18.0, 18.5])])[0]["checks"][0]["holds"] == "no"


def test_parallel_runs_get_their_share_of_the_cores(tmp_path, monkeypatch):
    """--jobs N: each run gets cores // N threads (at least 1) unless the user set OMP_NUM_THREADS; torch's default of
    a thread per core in every run oversubscribed the machine (2 quick PPO runs at once: 78 s instead of 14 s)."""
    monkeypatch.setattr(ablate.os, "cpu_count", lambda: 8)
    assert [ablate.threads_per_job(jobs) for jobs in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]

    def runs(tag: str) -> list[ablate.Run]:  # real processes that record the thread count they were given
        script = "import os, pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(); (p / 'threads').write_text(os.environ['OMP_NUM_THREADS'])"
        return [ablate.Run(tag, "sft", seed, tmp_path / f"{tag}{seed}", [PY, "-c", script, str(tmp_path / f"{tag}{seed}")]) for seed in (1, 2)]

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ablate.execute(runs("default"), tmp_path, jobs=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    ablate.execute(runs("user"), tmp_path, jobs=2)
    assert {p.parent.name: p.read_text() for p in tmp_path.glob("*/threads")} == {"default1": "4", "default2": "4", "user1": "3", "user2": "3"}


def test_every_ablate_field_has_a_docstring():
    tree = ast.parse((REPO / "summarize_from_feedback_details" / "ablate.py").read_text())
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args")
    for i, node in enumerate(cls.body):
        if isinstance(node, ast.AnnAssign):
            assert isinstance(cls.body[i + 1], ast.Expr), f"Args.{node.target.id} has no docstring"


def test_one_ppo_detail_two_seeds_end_to_end(sft_run, reward_run, embedded_dataset, tmp_path, capsys):
    """Detail 24 switched (--whiten_rewards) on the session's SFT and RM runs, seeds 1 and 2, --quick, two
    runs at a time: the table's values are the runs' metrics.json, delta = ablated - baseline, the flag
    reached the ablated runs only, and a second call resumes without running anything."""
    out = tmp_path / "ablation"
    args = ablate.Args(details=("reward_whitening",), seeds=(1, 2), out_dir=str(out), dataset=str(embedded_dataset),
                       sft_run=str(sft_run), reward_run=str(reward_run), quick=True, jobs=2)
    rows = ablate.main(args)
    assert "4 runs to do" in capsys.readouterr().out
    runs = {(variant, seed): out / f"seed{seed}" / variant / "ppo" for variant in ("baseline", "reward_whitening") for seed in (1, 2)}
    for (variant, seed), run in runs.items():
        run_args = json.loads((run / "args.json").read_text())
        assert (run_args["whiten_rewards"], run_args["seed"], run_args["sft_model_path"]) == (
            variant == "reward_whitening", seed, str(sft_run / "model"))
    with (out / "ablation.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == len(ablate.STAGE_METRICS["ppo"])  # quick PPO writes every PPO metric of the table
    for row in table:
        if row["metric"] == ablate.STOP_RATE:  # derived from the table; with a dedicated [PAD] it is the EOS rate
            row = {**row, "metric": "eval/validation/eos_rate"}
        assert (row["detail"], row["number"], row["args"], row["inverted"], row["stage"], row["seeds"]) == (
            "reward_whitening", "24", "--whiten_rewards", "False", "ppo", "1 2")
        base = [read_metrics(runs["baseline", s])[row["metric"]] for s in (1, 2)]
        abl = [read_metrics(runs["reward_whitening", s])[row["metric"]] for s in (1, 2)]
        assert [float(x) for x in row["baseline_per_seed"].split()] == base
        assert [float(x) for x in row["ablated_per_seed"].split()] == abl
        assert math.isclose(float(row["baseline"]), sum(base) / 2) and math.isclose(float(row["ablated"]), sum(abl) / 2)
        assert math.isclose(float(row["delta"]), sum(abl) / 2 - sum(base) / 2, abs_tol=1e-12)
    value_loss = next(r for r in table if r["metric"] == "last/loss/value_avg")
    assert float(value_loss["delta"]) != 0.0  # whitened rewards change the returns the critic fits
    md = (out / "ablation.md").read_text()
    assert "| reward_whitening | 24 | `--whiten_rewards` | ppo: `eval/validation/response_token_len` |" in md
    assert "| reward whitening shortens responses and lowers the win rate | reward_whitening |" in md
    assert "| PPO beats SFT on win rate (baseline chain) |" in md
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads((out / "timings.json").read_text())) == {f"{v}/ppo/seed{s}" for v, s in runs}

    stamps = {run: (run / "metrics.json").stat().st_mtime_ns for run in runs.values()}
    ablate.main(args)  # resumes: everything is finished, nothing runs again
    assert "0 runs to do, 4 already finished" in capsys.readouterr().out
    assert stamps == {run: (run / "metrics.json").stat().st_mtime_ns for run in runs.values()}
