"""Paper figures from a small REAL sweep directory of the embedded default, and the notebooks executed on it.

The sweep has 2 sizes x 2 seeds. Training them all takes ~20 minutes on 2 cores, so only the cell
(tiny-pythia-s, seed 1) is real stage runs (the session's SFT, RM, PPO and DPO runs); the three other cells
are copies of its files (symlinks) whose headline metrics get hand-set offsets, so the per-seed points, the
means and the size ordering the figures compute are checked against hand-computed values. Their judge
verdicts are real: judge.py runs on each cell (gold utility and the RM as a "gold RM") over a different
number of rows, so the win rates differ for real. The tiny-pythia-m cells carry that size's config.json,
so the sizes are ordered by real parameter counts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, build_once, run_module, shared_root
from summarize_from_feedback_details import paper_figures as pf
from summarize_from_feedback_details.core import UserInputError

# Offsets added to the copies' metrics (the real cell keeps its own values).
CELLS = {("tiny-pythia-s", 1): 0.0, ("tiny-pythia-s", 2): -0.02, ("tiny-pythia-m", 1): 0.05, ("tiny-pythia-m", 2): 0.07}
# judge.py --max_rows per cell: different subsets of the same real tables give different real win rates.
JUDGE_ROWS = {("tiny-pythia-s", 1): None, ("tiny-pythia-s", 2): 80, ("tiny-pythia-m", 1): 60, ("tiny-pythia-m", 2): 40}
OFFSET_KEYS = {
    "sft": ("eval/validation/rougeL", "eval/test/rougeL", "base/validation/rougeL"),
    "reward": ("eval/accuracy/split/validation", "eval/accuracy/split/validation_cnndm",
               *(f"eval/accuracy/confidence/{c}" for c in range(1, 10))),
    "dpo": ("eval/accuracy/split/validation", "eval/accuracy/split/validation_cnndm"),
}
STAGES = ("sft", "reward", "ppo", "dpo")


def _link_run(source: Path, target: Path, offset: float, stage: str) -> None:
    """`target` as a directory of symlinks to `source`'s entries; metrics.json copied with `offset` added to the
    headline metrics of `stage`."""
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "metrics.json":
            (target / entry.name).symlink_to(entry.resolve())
    metrics = json.loads((source / "metrics.json").read_text())
    for key in OFFSET_KEYS.get(stage, ()):
        if key in metrics:
            metrics[key] += offset
    (target / "metrics.json").write_text(json.dumps(metrics))


def _size_model(source_model: Path, size_config: Path, target: Path) -> None:
    """A model directory of another size for the parameter count: that size's config.json and the shared
    tokenizer files (no weights: no figure reads them)."""
    target.mkdir()
    shutil.copy(size_config, target / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).symlink_to((source_model / name).resolve())


def build_sweep(root: Path, runs: dict[str, Path], models_dir: Path) -> Path:
    """The sweep layout {root}/{size}/seed{seed}/{sft,reward,ppo,dpo,judge}/ from one real cell (see the module
    docstring), with judge.py run for real in every cell."""
    from summarize_from_feedback_details import judge

    for (size, seed), offset in CELLS.items():
        cell = root / size / f"seed{seed}"
        for stage in STAGES:
            _link_run(runs[stage], cell / stage, offset, stage)
            if size != "tiny-pythia-s" and stage in ("sft", "ppo", "dpo"):
                (cell / stage / "model").unlink()
                _size_model(runs[stage] / "model", models_dir / size / "config.json", cell / stage / "model")
        if (size, seed) == ("tiny-pythia-s", 1):
            # A relabelled copy of the PPO run: checks that any extra stage directory is one more policy, named
            # from its args.json; its numbers are PPO's.
            _link_run(runs["ppo"], cell / "ppo_whiten_rewards", 0.0, "ppo")
            args_path = cell / "ppo_whiten_rewards" / "args.json"
            args = json.loads(args_path.read_text())
            args_path.unlink()
            args_path.write_text(json.dumps({**args, "whiten_rewards": True}))
        tables = {"sft": cell / "sft" / "eval_query_responses_validation.parquet",
                  "ppo": cell / "ppo" / "query_responses_validation.parquet",
                  "dpo": cell / "dpo" / "query_responses_validation.parquet"}
        if (cell / "ppo_whiten_rewards").exists():
            tables["ppo_whiten_rewards"] = cell / "ppo_whiten_rewards" / "query_responses_validation.parquet"
        for stage, table in tables.items():
            common = dict(table=str(table), output_dir=str(cell / "judge" / stage), max_rows=JUDGE_ROWS[(size, seed)])
            judge.main(judge.Args(judge="gold", **common))
            judge.main(judge.Args(judge="reward_model", reward_model_path=str(runs["reward"] / "model"), **common))
    return root


@pytest.fixture(scope="module")
def sweep_dir(sft_run, reward_run, ppo_run, dpo_run, embedded_sizes_dir, tmp_path_factory) -> Path:
    runs = {"sft": sft_run, "reward": reward_run, "ppo": ppo_run, "dpo": dpo_run}
    return build_once(tmp_path_factory, "figures_sweep",  # one build for every xdist worker
                      lambda: build_sweep(shared_root(tmp_path_factory) / "figures_sweep", runs, embedded_sizes_dir / "models"))


@pytest.fixture(scope="module")
def sweep(sweep_dir):
    return pf.load_sweep(sweep_dir)


def _png_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = path.with_suffix(".pdf")
    assert pdf.is_file() and pdf.read_bytes()[:5] == b"%PDF-"


def _metric(run: Path, key: str) -> float:
    return json.loads((run / "metrics.json").read_text())[key]


# ----------------------------------------------------------------------------------------------
# Pure helpers, hand-computed
# ----------------------------------------------------------------------------------------------
def test_size_dir_name_and_pythia_keys():
    assert pf.size_dir_name("EleutherAI/pythia-1b-deduped") == "pythia-1b-deduped"
    assert pf.size_dir_name("assets/embedded/models/tiny-pythia-s/") == "tiny-pythia-s"
    assert [pf.Size(n, 1).pythia_key for n in ("1b", "pythia-2.8b", "pythia-6.9b-deduped", "tiny-pythia-s")] == ["1b", "2.8b", "6.9b", None]
    assert pf._params_from_name("pythia-2.8b-deduped") == 2_800_000_000 and pf._params_from_name("pythia-410m") == 410_000_000
    assert pf._params_from_name("tiny-pythia-s") is None
    with pytest.raises(UserInputError, match="has no name"):
        pf.size_dir_name("/")


def test_calibration_and_agreement_by_hand():
    # margins 0.2, -0.4, 0.7, 1.2, 5.0 with the label on the first item: agreement 1, 0, 1, 1, 1
    agreed = pf.agreement([0.2, -0.4, 0.7, 1.2, 5.0, 0.0], [1, 1, 1, 1, 1, 0])
    assert list(agreed) == [1.0, 0.0, 1.0, 1.0, 1.0, 0.5]
    bins = pf.calibration_bins([0.2, -0.4, 0.7, 1.2, 5.0], agreed[:5], width=0.5, max_margin=1.0)
    # bins [0, 0.5): 0.2, 0.4 -> accuracy 1/2; [0.5, 1): 0.7; last open bin (>= 1.0): 1.2, 5.0
    assert list(bins["bin"]) == [0, 1, 2] and list(bins["n"]) == [2, 1, 2]
    assert list(bins["accuracy"]) == [0.5, 1.0, 1.0]
    assert bins["margin"].tolist() == pytest.approx([0.3, 0.7, 3.1])
    assert bins["predicted"].iloc[0] == pytest.approx((pf.sigmoid(0.2) + pf.sigmoid(0.4)) / 2)


def test_length_bins_by_hand():
    from summarize_from_feedback_details.judge import wilson_interval

    # log ratios -1 (bin 0: < -0.5), -0.1 and 0.1 (bin 1 and 2 around 0), 2 (bin 3: >= 0.5); NaN verdict dropped
    data = pf.length_bins([-1.0, -0.1, 0.1, 0.2, 2.0, 0.3], [0.0, 1.0, 0.5, 1.0, 1.0, float("nan")], edges=(-0.5, 0.0, 0.5))
    assert list(data["bin"]) == [0, 1, 2, 3] and list(data["n"]) == [1, 1, 2, 1]
    assert list(data["win_rate"]) == [0.0, 1.0, 0.75, 1.0]
    assert data["log_ratio"].tolist() == pytest.approx([-1.0, -0.1, 0.15, 2.0])
    assert (data["ci_low"].iloc[2], data["ci_high"].iloc[2]) == pytest.approx(wilson_interval(0.75, 2))
    assert data["bin_low"].iloc[0] == -math.inf and data["bin_high"].iloc[3] == math.inf
    with pytest.raises(UserInputError, match="strictly increasing"):
        pf.length_bins([0.0], [1.0], edges=(0.5, 0.0))


def test_bad_sweep_dirs_are_one_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        pf.load_sweep(tmp_path / "nowhere")
    with pytest.raises(UserInputError, match=r"no \{size\}/seed\{seed\}/ directories"):
        pf.load_sweep(tmp_path)
    (tmp_path / "mystery" / "seed1").mkdir(parents=True)
    with pytest.raises(UserInputError, match="cannot tell the size of 'mystery'"):
        pf.load_sweep(tmp_path)
    with pytest.raises(UserInputError, match="--sweep_dir is required"):
        pf.main(pf.Args(figure=("rm_accuracy",)))


# ----------------------------------------------------------------------------------------------
# The figures, from the sweep
# ----------------------------------------------------------------------------------------------
def test_sweep_is_read_in_size_order(sweep, embedded_sizes_dir):
    assert [s.name for s in sweep.sizes] == ["tiny-pythia-s", "tiny-pythia-m"]
    params = {s.name: s.params for s in sweep.sizes}
    assert params["tiny-pythia-s"] < params["tiny-pythia-m"]
    # the weights' safetensors headers (the s cells) and the meta-device model of a config alone (the m cells) agree
    assert params["tiny-pythia-m"] == pf.count_parameters(embedded_sizes_dir / "models" / "tiny-pythia-m")
    assert pf.count_parameters(sweep.cells[-1].stage("sft") / "model") == params["tiny-pythia-m"]
    assert not (sweep.cells[-1].stage("sft") / "model" / "model.safetensors").exists()
    assert sweep.seeds == [1, 2] and len(sweep.cells) == 4
    assert set(pf.policy_tables(sweep.cells[0], "validation")) == {"sft", "ppo", "dpo", "ppo_whiten_rewards"}


def test_metric_figures_plot_the_seeds_and_their_means(sweep, sft_run, reward_run, dpo_run, tmp_path):
    rouge = pf.rouge_vs_size(sweep, tmp_path)
    _png_ok(rouge.paths[0])
    seeds = rouge.data["seeds"]
    real = _metric(sft_run, "eval/validation/rougeL")
    got = seeds[seeds["series"] == "SFT, validation"].set_index(["size", "seed"])["value"]
    for (size, seed), offset in CELLS.items():
        assert got[(size, seed)] == pytest.approx(real + offset)
    means = rouge.data["means"].set_index(["series", "params"])
    m_params = {s.name: s.params for s in sweep.sizes}
    assert means.loc[("SFT, validation", m_params["tiny-pythia-m"]), "mean"] == pytest.approx(real + 0.06)
    assert means.loc[("SFT, validation", m_params["tiny-pythia-s"]), "mean"] == pytest.approx(real - 0.01)

    accuracy = pf.rm_accuracy(sweep, tmp_path)
    _png_ok(accuracy.paths[0])
    real_tldr = _metric(reward_run, "eval/accuracy/split/validation")
    means = accuracy.data["means"].set_index(["series", "params"])
    assert means.loc[("TL;DR", m_params["tiny-pythia-m"]), "mean"] == pytest.approx(real_tldr + 0.06)
    assert means.loc[("TL;DR", m_params["tiny-pythia-m"]), "std"] == pytest.approx(0.01)
    assert set(accuracy.data["seeds"]["series"]) == {"TL;DR", "CNN/DM"}
    confidence = accuracy.data["confidence"]
    assert sorted(set(confidence["confidence"])) == list(range(1, 10)) and len(confidence) == 4 * 9
    row = confidence[(confidence["size"] == "tiny-pythia-m") & (confidence["seed"] == 2) & (confidence["confidence"] == 9)]
    assert row["value"].item() == pytest.approx(_metric(reward_run, "eval/accuracy/confidence/9") + 0.07)

    versus = pf.rm_vs_dpo_accuracy(sweep, tmp_path)
    _png_ok(versus.paths[0])
    means = versus.data["means"].set_index(["series", "params"])
    real_dpo = _metric(dpo_run, "eval/accuracy/split/validation")
    assert means.loc[("DPO implicit reward, TL;DR", m_params["tiny-pythia-s"]), "mean"] == pytest.approx(real_dpo - 0.01)
    assert means.loc[("RM, TL;DR", m_params["tiny-pythia-s"]), "mean"] == pytest.approx(real_tldr - 0.01)


def test_win_rate_figures_use_the_judge_outputs(sweep, sweep_dir, tmp_path):
    result = pf.win_rate_vs_size(sweep, tmp_path, judge="reward_model")
    _png_ok(result.paths[0])
    data = result.data
    assert set(data["policy"]) == {"sft", "ppo", "dpo", "ppo_whiten_rewards"} and len(data) == 3 * 4 + 1
    # every plotted point is the win rate of the judge's summary json of that cell and policy
    for row in data.itertuples():
        summary_files = list((sweep_dir / row.size / f"seed{row.seed}" / "judge" / row.policy).glob("*reward_model.summary.json"))
        summary = json.loads(summary_files[0].read_text())
        assert row.win_rate == summary["win_rate"] and row.n == summary["n"]
        assert row.n == (JUDGE_ROWS[(row.size, row.seed)] or 100)
    ppo = data[data["policy"] == "ppo"].set_index(["size", "seed"])["win_rate"]
    assert ppo.nunique() > 1  # real verdicts on different rows differ
    labels = dict(zip(data["policy"], data["label"], strict=True))
    assert labels["ppo_whiten_rewards"] == "PPO + reward whitening" and labels["ppo"] == "PPO"
    assert "OpenAI" not in " ".join(result.notes)  # no star with an offline judge

    # the table judge: the stages' own gold_win column, equal to judge.py --judge gold on the same rows
    gold = pf.win_rate_vs_size(sweep, tmp_path / "gold", judge="gold").data.set_index(["size", "seed", "policy"])
    table = pf.win_rate_vs_size(sweep, tmp_path / "table", judge="table").data.set_index(["size", "seed", "policy"])
    assert table.loc[("tiny-pythia-s", 1, "ppo"), "win_rate"] == gold.loc[("tiny-pythia-s", 1, "ppo"), "win_rate"]
    assert (table["n"] == 100).all()

    length = pf.win_rate_vs_length(sweep, tmp_path, judge="reward_model")
    _png_ok(length.paths[0])
    ppo_table = pd.read_parquet(sweep_dir / "tiny-pythia-m" / "seed2" / "ppo" / "query_responses_validation.parquet")
    row = length.data.set_index(["size", "seed", "policy"]).loc[("tiny-pythia-m", 2, "ppo")]
    assert row["response_token_len"] == pytest.approx(ppo_table["response_token_len"].iloc[:40].mean())


def test_calibration_agreement_and_length_control(sweep, sweep_dir, reward_run, tmp_path):
    calibration = pf.rm_calibration(sweep, tmp_path, judge="gold")
    _png_ok(calibration.paths[0])
    data = calibration.data
    comparisons = pd.read_csv(reward_run / "eval_comparisons.csv")
    tldr = comparisons[comparisons["split"] == "validation"]
    s_dataset = data[(data["panel"] == "dataset") & (data["size"] == "tiny-pythia-s")]
    assert s_dataset["n"].sum() == 2 * len(tldr)  # two seeds pooled
    margin = tldr["chosen_score"] - tldr["rejected_score"]
    first = margin[margin.abs() < 0.5]
    # an exact tie (identical chosen and rejected texts: ~5% of the embedded pairs) counts 1/2, not as an error
    by_hand = ((first > 0).sum() + 0.5 * (first == 0).sum()) / len(first)
    assert s_dataset.set_index("bin").loc[0, "accuracy"] == pytest.approx(by_hand)

    # panel (b) and figure 7: the cell's RM against the gold utility on PPO vs reference pairs
    judged = pd.read_parquet(next((sweep_dir / "tiny-pythia-s" / "seed1" / "judge" / "ppo").glob("*_judged_gold.parquet")))
    counted = judged[judged["win"].isin([0.0, 1.0])]
    expected = ((counted["score"] > counted["reference_score"]) == (counted["win"] == 1.0)).mean()
    agreement = pf.rm_judge_agreement(sweep, tmp_path, judge="gold")
    _png_ok(agreement.paths[0])
    seeds = agreement.data["seeds"].set_index(["size", "seed"])
    assert seeds.loc[("tiny-pythia-s", 1), "value"] == pytest.approx(expected)
    assert seeds.loc[("tiny-pythia-m", 2), "n"] <= 40
    assert data[data["panel"] == "judge"]["n"].sum() == seeds["n"].sum()

    length = pf.length_controlled_win_rate(sweep, tmp_path, judge="reward_model", edges=(-0.25, 0.0, 0.25))
    _png_ok(length.paths[0])
    assert "length unit: tokens" in length.notes
    bins = length.data
    assert set(bins["policy"]) == {"sft", "ppo", "dpo", "ppo_whiten_rewards"}
    # pooled over the seeds of a size: every judged pair lands in one bin
    ppo_m = bins[(bins["size"] == "tiny-pythia-m") & (bins["policy"] == "ppo")]
    assert ppo_m["n"].sum() == 60 + 40 and ((ppo_m["win_rate"] >= 0) & (ppo_m["win_rate"] <= 1)).all()
    # by hand for the real cell's reward-whitening copy (one seed): bin of each row from token lengths
    from summarize_from_feedback_details.core import load_tokenizer
    from summarize_from_feedback_details.tldr_dataset import encode

    judged = pd.read_parquet(next((sweep_dir / "tiny-pythia-s" / "seed1" / "judge" / "ppo_whiten_rewards").glob("*reward_model.parquet")))
    tokenizer = load_tokenizer(str(sweep_dir / "tiny-pythia-s" / "seed1" / "sft" / "model"))
    ratio = [math.log(n / (len(encode(tokenizer, " " + r)) + 1)) for n, r in zip(judged["response_token_len"], judged["reference"], strict=True)]
    above = [w for x, w in zip(ratio, judged["win"], strict=True) if x >= 0.25]
    got = bins[(bins["size"] == "tiny-pythia-s") & (bins["policy"] == "ppo_whiten_rewards") & (bins["bin"] == 3)]
    if above:
        assert got["n"].item() == len(above) and got["win_rate"].item() == pytest.approx(sum(above) / len(above))
    else:
        assert got.empty


def test_ppo_curves_and_dataset_figures(sweep, ppo_run, embedded_dataset, tmp_path):
    curves = pf.ppo_training_curves(sweep, tmp_path)
    _png_ok(curves.paths[0])
    data = curves.data
    assert set(data["tag"]) == {tag for tag, _ in pf.PPO_CURVES}
    kl = data[(data["tag"] == "objective/kl") & (data["size"] == "tiny-pythia-m") & (data["seed"] == 1)]
    # 24 updates logged every 4: the TensorBoard steps 4..24, at 32 episodes per update
    assert list(kl["step"]) == [4, 8, 12, 16, 20, 24] and list(kl["episode"]) == [128, 256, 384, 512, 640, 768]
    assert data.groupby(["size", "seed"]).ngroups == 4

    figures = pf.dataset(embedded_dataset, tmp_path / "dataset")
    for name in ("sft_token_lengths", "preference_token_lengths", "confidence_distribution", "policy_distribution",
                 "policy_pair_distribution"):
        _png_ok(tmp_path / "dataset" / f"{name}.png")
    assert not [p for p in (tmp_path / "dataset").iterdir() if p.name.startswith(".")]  # no temporary files left
    assert len(figures.paths) >= 10


def concise_judge(body: dict, attempt: int) -> tuple[int, str, float]:
    """An LLM judge that prefers the summary with fewer words (A on equal counts: a tie over both orders)."""
    from test_judge import summaries

    a, b = summaries(body["messages"][-1]["content"])
    letter = "B" if len(b.split()) < len(a.split()) else "A"
    return 200, f"Comparison: Summary {letter} is more concise.\nPreferred: {letter}", 0.0


def test_llm_judge_on_a_pythia_named_sweep(sweep_dir, tmp_path, monkeypatch):
    """Sizes named like Pythia without model files are sized from their names, and get the paper's values; an LLM
    judge served by a real local OpenAI-compatible server is picked by `auto`, draws the OpenAI 1.3B star, and two
    LLM judges in one sweep need --judge_model."""
    from test_judge import JudgeServer

    from summarize_from_feedback_details import judge

    root = tmp_path / "pythia"
    for source, name in (("tiny-pythia-s", "pythia-1b-deduped"), ("tiny-pythia-m", "2.8b")):
        for seed in (1, 2):
            cell = root / name / f"seed{seed}"
            for stage in ("sft", "reward", "ppo"):
                target = cell / stage
                target.mkdir(parents=True)
                for entry in (sweep_dir / source / f"seed{seed}" / stage).iterdir():
                    if entry.name not in ("model", "args.json"):
                        (target / entry.name).symlink_to(entry.resolve())
                (target / "args.json").write_text(json.dumps({"base_model": f"EleutherAI/{name}"}))
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key
    with JudgeServer(concise_judge) as server:
        for cell in sorted(root.glob("*/seed*")):
            for stage, stem in (("ppo", "query_responses_validation"), ("sft", "eval_query_responses_validation")):
                judge.main(judge.Args(table=str(cell / stage / f"{stem}.parquet"), base_url=server.url, max_rows=30,
                                      output_dir=str(cell / "judge" / f"{stage}_llm")))
    sweep = pf.load_sweep(root)
    assert [(s.name, s.params) for s in sweep.sizes] == [("pythia-1b-deduped", 10**9), ("2.8b", 2_800_000_000)]

    result = pf.win_rate_vs_size(sweep, tmp_path / "out")  # auto: the LLM judge comes first
    _png_ok(result.paths[0])
    assert "with the OpenAI 1.3B star" in result.notes and "gpt-3.5-turbo-0125 (both-orders)" in result.notes[0]
    table = pd.read_parquet(root / "2.8b" / "seed2" / "ppo" / "query_responses_validation.parquet").iloc[:30]
    by_hand = [1.0 if len(p.split()) < len(r.split()) else 0.0 if len(p.split()) > len(r.split()) else 0.5
               for p, r in zip(table["response"].str.strip(), table["reference"].str.strip(), strict=True)]
    row = result.data.set_index(["size", "seed", "policy"]).loc[("2.8b", 2, "ppo")]
    assert row["win_rate"] == pytest.approx(sum(by_hand) / 30) and row["n"] == 30
    assert "with the paper's values" in pf.rm_accuracy(sweep, tmp_path / "out").notes
    assert "with the paper's values" in pf.rm_judge_agreement(sweep, tmp_path / "out").notes

    with JudgeServer(concise_judge) as server:
        cell = root / "2.8b" / "seed1"
        judge.main(judge.Args(table=str(cell / "ppo" / "query_responses_validation.parquet"), base_url=server.url,
                              max_rows=5, model="gpt-4-0125-preview", output_dir=str(cell / "judge" / "ppo_gpt4")))
    with pytest.raises(UserInputError, match="several llm judges"):
        pf.win_rate_vs_size(sweep, tmp_path / "out")
    only = pf.win_rate_vs_size(sweep, tmp_path / "out", judge_model="gpt-4-0125-preview").data
    assert list(only["n"]) == [5]


def test_cli_draws_every_figure_and_reproduce_script(sweep_dir, embedded_dataset, tmp_path):
    """The script regenerates every figure from the sweep directory (the real CLI, as a subprocess)."""
    out = tmp_path / "figures"
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHON": sys.executable}  # this interpreter, venv or not
    result = subprocess.run(["bash", "scripts/reproduce_figures.sh", str(sweep_dir), str(out), "--judge", "reward_model",
                             "--dataset_dir", str(embedded_dataset)], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("win_rate_vs_size", "win_rate_vs_length", "rouge_vs_size", "rm_accuracy", "rm_vs_dpo_accuracy",
                 "rm_calibration", "rm_judge_agreement", "length_controlled_win_rate", "ppo_training_curves",
                 "sft_token_lengths", "confidence_distribution"):
        _png_ok(out / f"{name}.png")
    assert "skipped" not in result.stdout
    # a figure asked for by name whose inputs are missing is one clear error
    empty = tmp_path / "empty_sweep" / "tiny-pythia-s" / "seed1"
    shutil.copytree(sweep_dir / "tiny-pythia-s" / "seed1" / "sft", empty / "sft", symlinks=True)
    failed = run_module("paper_figures", "--sweep_dir", str(tmp_path / "empty_sweep"), "--figure", "rm_accuracy", check=False)
    assert failed.returncode == 2 and "run the reward stage" in failed.stderr
    assert "Traceback" not in failed.stderr


# ----------------------------------------------------------------------------------------------
# Notebooks, executed on the embedded default
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["explore_datasets", "analyse_sweep"])
def test_notebook_runs_without_errors(name, sweep_dir, embedded_dataset, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed: pip install -e '.[notebooks]'")
    import nbformat

    path = REPO / "notebooks" / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    monkeypatch.setenv("SFFD_DATASET_DIR", str(embedded_dataset))
    monkeypatch.setenv("SFFD_SWEEP_DIR", str(sweep_dir))
    monkeypatch.setenv("SFFD_JUDGE", "reward_model")
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stderr")
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
