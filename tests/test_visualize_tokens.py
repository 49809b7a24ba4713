"""The token view (SPEC "Token visualisation", Detail 13): ranks and classes by hand, then the HTML that the
real CLI writes for the embedded models, checked against an independent computation (a plain forward of the
base model and of the reward model on the query without its left padding)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import run_module
from summarize_from_feedback_details.visualize_tokens import rank_class, token_kinds, token_ranks


def test_token_ranks_and_classes_by_hand():
    # One vocabulary of 5 entries per position; ranks count the entries with a strictly higher logit.
    logits = torch.tensor(
        [
            [3.0, 1.0, 2.0, 2.0, 0.5],  # token 0 is the argmax            -> rank 1
            [3.0, 1.0, 2.0, 2.0, 0.5],  # token 2 ties with 3, below 3.0    -> rank 2
            [0.0, 5.0, 4.0, 3.0, -1.0],  # token 3 under 5.0 and 4.0         -> rank 3 (last marginal)
            [3.0, 1.0, 2.0, 2.0, 0.5],  # token 1 under 3.0, 2.0, 2.0       -> rank 4
            [0.0, 5.0, 4.0, 3.0, -1.0],  # token 4 is the lowest             -> rank 5
        ]
    )
    ranks = token_ranks(logits, torch.tensor([0, 2, 3, 1, 4])).tolist()
    assert ranks == [1, 2, 3, 4, 5]
    assert [rank_class(r) for r in ranks] == ["unshifted", "marginal", "marginal", "shifted", "shifted"]
    assert rank_class(None) is None
    assert token_ranks(logits[None], torch.tensor([[0, 2, 3, 1, 4]])).tolist() == [ranks]  # batched (B, L, V)
    # Only the first EOS (0) is the EOS; what follows is padding (Detail 23.2), also when pad == EOS (3.2).
    kinds = token_kinds([5, 7, 0, 9, 9], eos_token_id=0, pad_token_id=9)
    assert kinds == ["token", "token", "eos", "pad", "pad"]
    assert token_kinds([5, 7, 8], eos_token_id=0, pad_token_id=9) == ["token"] * 3
    assert token_kinds([5, 0, 0, 0], eos_token_id=0, pad_token_id=0) == ["token", "eos", "pad", "pad"]


class TokenViewParser(HTMLParser):
    """The rows of the HTML view: each `<section>`'s attributes and its token spans (attributes and text)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self.rows.append({**attributes, "tokens": []})
        elif tag == "span":
            classes = attributes.get("class", "").split()
            self.stack.append(" ".join(classes))
            if "tok" in classes and self.rows:
                self.rows[-1]["tokens"].append({**attributes, "classes": set(classes), "text": ""})

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.rows and self.stack and self.stack[-1] == "t" and self.rows[-1]["tokens"]:
            self.rows[-1]["tokens"][-1]["text"] += data


def view_cli(*flags: str, check: bool = True, **options: object):
    """Run `python -m summarize_from_feedback_details.visualize_tokens` with `--name value` options."""
    args = [*flags]
    for name, value in options.items():
        args += [f"--{name}", *str(value).split(" ")] if name == "rows" else [f"--{name}", str(value)]
    return run_module("visualize_tokens", *args, check=check)


def parse_view(path: Path) -> dict[str, dict]:
    parser = TokenViewParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return {row["data-row"]: row for row in parser.rows}


@pytest.fixture(scope="module")
def view_inputs(embedded_dir: Path, embedded_sizes_dir: Path, embedded_dataset: Path, tmp_path_factory) -> dict:
    """The embedded dataset, base model (tiny-pythia-s, pre-trained for the full 1,000 steps: its T 0.01 samples
    are its top-1, which a 150-step model's near-ties break) and a reward model: the base model's backbone with a
    freshly initialised scalar head (Detail 11) and a normalisation bias (Detail 15), saved and reloaded like
    reward.py's. The sampled view lets the other sizes (`embedded_sizes_dir`) stand in for the policies."""
    import datasets
    from transformers import AutoTokenizer

    from summarize_from_feedback_details.modeling import ScalarModel

    base = embedded_dir / "models" / "tiny-pythia-s"
    torch.manual_seed(0)
    reward_model = ScalarModel.from_backbone(str(base))
    reward_model.config.bias = 0.25
    path = tmp_path_factory.mktemp("token_view") / "rm"
    reward_model.save_pretrained(str(path))
    validation = datasets.load_from_disk(str(embedded_dataset / "sft"))["validation"]
    models = embedded_sizes_dir / "models"
    pad = AutoTokenizer.from_pretrained(str(embedded_dataset / "tokenizer")).pad_token_id  # [PAD], added by the data stage
    return {"base": base, "dataset": embedded_dataset, "rm": path, "validation": validation, "models": models, "pad": pad}


def independent_ranks_and_rm(
    inputs: dict, query: list[int], response: list[int], pad: int
) -> tuple[list, list]:
    """Per response token: the bounds of its rank under the base model (1 + the entries whose logit beats the
    token's by more than 1e-4, 1 + those within -1e-4) and the RM output, both from a plain forward on the
    query WITHOUT its left padding (rotary positions are relative, G-3: equal up to float noise)."""
    from transformers import AutoModelForCausalLM

    from summarize_from_feedback_details.modeling import ScalarModel

    query = [t for t in query if t != pad]
    tokens = torch.tensor([query + response])
    base = AutoModelForCausalLM.from_pretrained(str(inputs["base"])).eval()
    with torch.no_grad():
        logits = base(tokens).logits[0, len(query) - 1 : -1]
        rm = ScalarModel.from_pretrained(str(inputs["rm"])).eval()(tokens)[0, len(query) :]
    chosen = logits.gather(-1, torch.tensor(response)[:, None])
    low, high = 1 + (logits > chosen + 1e-4).sum(-1), 1 + (logits > chosen - 1e-4).sum(-1)
    return list(zip(low.tolist(), high.tolist(), strict=True)), rm.tolist()


def check_row_against_plain_forward(inputs: dict, row: dict, query_tokens: list[int], pad: int) -> None:
    shown = [t for t in row["tokens"] if "more" not in t["classes"]]
    real = [t for t in shown if "pad" not in t["classes"]]
    bounds, rm = independent_ranks_and_rm(inputs, query_tokens, [int(t["data-id"]) for t in real], pad)
    for token, (low, high), value in zip(real, bounds, rm, strict=True):
        rank = int(token["data-rank"])
        assert low <= rank <= high, (row["data-row"], token)
        expected = "unshifted" if rank == 1 else "marginal" if rank <= 3 else "shifted"  # SPEC: top-1 / top-3
        assert token["classes"] & {"unshifted", "marginal", "shifted"} == {expected}
        assert float(token["data-rm"]) == pytest.approx(value, abs=1e-4)
    scored = [t for t in shown if "scored" in t["classes"]]
    assert scored == [real[-1]]  # Detail 12: the reward is the output at the last non-pad token
    assert float(row["data-score"]) == pytest.approx(float(real[-1]["data-rm"]), abs=1e-6)
    for token in shown[len(real) :]:
        assert token["text"] == "[PAD]" and "data-rank" not in token and "data-rm" in token
    eos = [t for t in shown if "eos" in t["classes"]]
    if eos:
        assert eos == [real[-1]] and eos[0]["text"] == "[EOS]" and eos[0]["data-id"] == "0"
        assert row["data-eos"] == "True" and int(row["data-tokens"]) == len(real)


def test_sampled_token_view_html(view_inputs: dict, tmp_path: Path):
    """Base / SFT / PPO / DPO sampled now: the other embedded sizes stand in for the SFT and PPO policies
    (different models, so their tokens leave the base model's top-1) and the base model itself for DPO."""
    models, out = view_inputs["models"], tmp_path / "view.html"
    result = view_cli(
        source="sample", dataset=view_inputs["dataset"], base_model=view_inputs["base"],
        sft_run=models / "tiny-pythia-m", ppo_run=models / "tiny-pythia-l", dpo_run=view_inputs["base"],
        reward_model=view_inputs["rm"], response_length=24, pads_shown=2, html=out,
    )  # fmt: skip
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text
    external = ("<script", "<link", "src=", "http://", "https://", "url(")
    assert not any(s in text for s in external), "the HTML must be self-contained"
    rows = parse_view(out)
    assert list(rows) == ["reference", "base", "sft", "ppo", "dpo"]
    labels = [
        "reference (human)",
        "base model",
        "SFT",
        "PPO",
        "DPO",
        "[EOS]",
        "[PAD]",
        "unshifted",
        "marginal",
    ]
    assert all(label in result.stdout for label in labels), result.stdout

    example = view_inputs["validation"][0]
    query, reference = example["query_token"], example["reference_response_token"]
    pad = view_inputs["pad"]
    assert query[0] == pad and pad != 0  # the dataset's own [PAD] left-pads the query (Details 2.3, 3.2)
    # Reference row: the dataset's exact tokens through the EOS, 2 pads shown, the remaining pads counted.
    ref = rows["reference"]["tokens"]
    length = reference.index(0) + 1
    assert [int(t["data-id"]) for t in ref[: length + 2]] == reference[: length + 2]
    assert "more" in ref[-1]["classes"] and int(ref[-1]["data-count"]) == len(reference) - length - 2
    # The base model's own T 0.01 sample is its own top-1 at every token; DPO here is the same model and seed.
    assert {t["data-rank"] for t in rows["base"]["tokens"] if "data-rank" in t} == {"1"}
    assert [t.get("data-id") for t in rows["dpo"]["tokens"]] == [t.get("data-id") for t in rows["base"]["tokens"]]
    # Other models' tokens are not all the base model's top-1.
    assert any(t.get("data-rank") not in (None, "1") for name in ("sft", "ppo") for t in rows[name]["tokens"])
    for name, row in rows.items():
        check_row_against_plain_forward(view_inputs, row, query, pad)
        if name != "reference":  # 24 sampled tokens: cut after the first EOS (Detail 23.2) or 24 without one
            shown = sum(int(t.get("data-count", 1)) for t in row["tokens"])
            assert shown == 24, name


def test_token_view_from_tables(view_inputs: dict, tmp_path: Path):
    """--source tables re-tokenizes the stages' response text: a table response equal to the reference text
    gives the reference's tokens, ranks and RM outputs; a response without EOS gets no EOS marker."""
    validation = view_inputs["validation"]
    queries = validation.select(range(2))["query"]
    reference_text = validation[0]["reference_response"].replace("<|endoftext|>", "").strip()
    (tmp_path / "sft").mkdir()
    (tmp_path / "ppo").mkdir()
    pd.DataFrame(
        {
            "query": queries,
            "response": [reference_text, "x"],
            "has_eos": [True, True],
            "response_token_len": [validation[0]["reference_response_token"].index(0) + 1, 2],
        }
    ).to_parquet(tmp_path / "sft" / "eval_query_responses_validation.parquet")
    pd.DataFrame(
        {
            "query": queries,
            "response": ["my landlord posted my photos", "y"],
            "has_eos": [False, True],
            "score": [0.5, 0.1],
        }
    ).to_csv(tmp_path / "ppo" / "query_responses_validation.csv", index=False)
    out = tmp_path / "view.html"
    result = view_cli(
        "--no_terminal", rows="reference sft ppo", dataset=view_inputs["dataset"],
        base_model=view_inputs["base"], sft_run=tmp_path / "sft", ppo_run=tmp_path / "ppo",
        reward_model=view_inputs["rm"], response_length=40, html=out,
    )  # fmt: skip
    assert "[EOS]" not in result.stdout
    rows = parse_view(out)
    assert list(rows) == ["reference", "sft", "ppo"]
    reference, sft, ppo = (rows[name]["tokens"] for name in ("reference", "sft", "ppo"))
    length = int(rows["reference"]["data-tokens"])
    for ref_token, sft_token in zip(reference[:length], sft[:length], strict=True):
        assert (ref_token["data-id"], ref_token["data-rank"]) == (
            sft_token["data-id"],
            sft_token["data-rank"],
        )
        assert float(ref_token["data-rm"]) == pytest.approx(float(sft_token["data-rm"]), abs=1e-5)
    # Padded to --response_length; 3 pads are shown by default, the marker counts the rest.
    assert int(sft[-1]["data-count"]) == 40 - length - 3
    text = out.read_text()
    assert "re-tokenized" not in text  # the table's token count matched
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(view_inputs["dataset"] / "tokenizer"))
    ids = tokenizer(" my landlord posted my photos", add_special_tokens=False).input_ids
    assert [int(t["data-id"]) for t in ppo[: len(ids)]] == ids and rows["ppo"]["data-eos"] == "False"
    assert not any("eos" in t["classes"] for t in ppo) and "scored" in ppo[len(ids) - 1]["classes"]
    assert "table&#x27;s RM score 0.500" in text and "no EOS: PPO would score it -1" in text
    for name in ("sft", "ppo"):
        check_row_against_plain_forward(view_inputs, rows[name], validation[0]["query_token"], view_inputs["pad"])


def test_token_view_bad_input_is_one_clear_error(view_inputs: dict, tmp_path: Path):
    """Bad input stops before any model is loaded, naming the input and the fix; the CLI: one line, exit 2."""
    from summarize_from_feedback_details.core import UserInputError
    from summarize_from_feedback_details.visualize_tokens import Args, main

    assert "--query_index" in run_module("visualize_tokens", "--help").stdout
    (tmp_path / "other").mkdir()
    other = {
        "query": ["SUBREDDIT: r/other\n\nTITLE: t\n\nPOST: p\n\nTL;DR:"],
        "response": ["r"],
        "has_eos": [True],
    }
    pd.DataFrame(other).to_parquet(tmp_path / "other" / "query_responses_validation.parquet")
    common = {
        "dataset": str(view_inputs["dataset"]),
        "base_model": str(tmp_path / "no_model"),
        "terminal": False,
    }
    for kwargs, message in (
        ({"rows": ("ppo",), "ppo_run": str(tmp_path / "other")}, "is for another query"),
        (
            {"rows": ("ppo",), "ppo_run": str(tmp_path / "other"), "query_index": 1},
            "has 1 rows, so --query_index 1",
        ),
        ({"rows": ("ppo",), "ppo_run": str(tmp_path)}, "no query_responses_validation.parquet or .csv"),
        ({"rows": ("sft",), "sft_run": None}, "the sft row needs --sft_run"),
        ({"rows": ("sft",), "source": "sample", "sft_run": str(tmp_path)}, "is not a saved model"),
        ({"rows": ("reference",)}, "--base_model"),  # a missing base model is named before anything loads
        ({"rows": ("reference",), "temperature": 0.0}, "--temperature must be > 0"),
    ):
        with pytest.raises(UserInputError, match=message):
            main(Args(**common, **kwargs))
    result = view_cli(dataset=view_inputs["dataset"], query_index=100000, check=False)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        == "error: --query_index 100000 is out of range: the validation split has 500 rows"
    )
