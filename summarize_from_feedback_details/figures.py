"""Figures, one function per figure of SPEC.md, reading the stages' outputs; each writes PNG and PDF.

Figure 10 (the dataset) is drawn by the data stage itself:
    python -m summarize_from_feedback_details.figures dataset datasets/embedded
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from summarize_from_feedback_details.core import column, load_saved_split, saved_split_names


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out_dir: Path, name: str) -> list[Path]:
    """Save `fig` as `name`.png and `name`.pdf in `out_dir`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    _pyplot().close(fig)
    return paths


def _histograms(plt: Any, panels: Sequence[tuple[str, dict[str, Sequence[int]], int | None]], title: str) -> Any:
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (label, by_split, limit) in zip(axes[0], panels, strict=True):
        for split, values in by_split.items():
            if len(values):
                ax.hist(values, bins=40, alpha=0.45, histtype="stepfilled", label=f"{split} (n={len(values)})", density=True)
        if limit is not None:
            ax.axvline(limit, color="black", linestyle="--", linewidth=1, label=f"configured {limit}")
        ax.set_xlabel(f"{label} (tokens)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def dataset_figures(sft: Any, preference: Any, out_dir: str | Path, lengths: Any = None) -> list[Path]:
    """Figure 10: token-length histograms per split, confidence distribution, policies and policy pairs. Splits
    without rows (no CNN/DM rows in bring-your-own comparisons) are left out, each with one line."""
    sft, preference = _with_rows(sft, "sft"), _with_rows(preference, "preference")
    plt = _pyplot()
    out = Path(out_dir)
    paths: list[Path] = []
    limit = (lambda name: getattr(lengths, name)) if lengths is not None else (lambda name: None)

    fig = _histograms(plt, [
        ("query", {s: column(ds, "query_token_len") for s, ds in sft.items()}, limit("query")),
        ("reference response", {s: column(ds, "reference_response_token_len") for s, ds in sft.items()}, limit("sft_response")),
        ("query + reference", {s: column(ds, "query_reference_response_token_len") for s, ds in sft.items()}, limit("sft_query_response")),
    ], "SFT dataset: token lengths per split")
    paths += save_figure(fig, out, "sft_token_lengths")

    def both(ds: Any, suffix: str) -> list[int]:
        return column(ds, f"chosen{suffix}") + column(ds, f"rejected{suffix}")

    def both_query(ds: Any) -> list[int]:
        return column(ds, "query_chosen_token_len") + column(ds, "query_rejected_token_len")

    tldr = {s: ds for s, ds in preference.items() if s != "validation_cnndm"}
    fig = _histograms(plt, [
        ("query", {s: column(ds, "query_token_len") for s, ds in tldr.items()}, limit("query")),
        ("chosen/rejected response", {s: both(ds, "_token_len") for s, ds in tldr.items()}, limit("rm_response")),
        ("query + response", {s: both_query(ds) for s, ds in tldr.items()}, limit("rm_query_response")),
    ], "Preference dataset (TL;DR): token lengths per split")
    paths += save_figure(fig, out, "preference_token_lengths")

    if "validation_cnndm" in preference and len(preference["validation_cnndm"]):
        ds = preference["validation_cnndm"]
        fig = _histograms(plt, [
            ("query", {"validation_cnndm": column(ds, "query_token_len")}, limit("cnndm_query")),
            ("chosen/rejected response", {"validation_cnndm": both(ds, "_token_len")}, limit("cnndm_response")),
            ("query + response", {"validation_cnndm": both_query(ds)}, limit("cnndm_query_response")),
        ], "Preference dataset (CNN/DM): token lengths")
        paths += save_figure(fig, out, "cnndm_token_lengths")

    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / max(1, len(preference))
    for k, (split, ds) in enumerate(preference.items()):
        counts = collections.Counter((extra or {}).get("confidence") for extra in column(ds, "extra"))
        levels = list(range(1, 10))
        total = max(1, sum(counts.values()))
        ax.bar([lv + (k - (len(preference) - 1) / 2) * width for lv in levels], [counts.get(lv, 0) / total for lv in levels],
               width=width, label=f"{split} (n={len(ds)}, null={counts.get(None, 0)})")
    ax.set_xlabel("labeller confidence (extra.confidence)")
    ax.set_ylabel("share of comparisons")
    ax.set_xticks(range(1, 10))
    ax.legend(fontsize=7)
    ax.set_title("Confidence distribution")
    paths += save_figure(fig, out, "confidence_distribution")

    for key, name, title in (("policy", "policy_distribution", "Summaries per policy"),
                                ("policies", "policy_pair_distribution", "Comparisons per policy pair")):
        counts: collections.Counter[str] = collections.Counter()
        per_split = {}
        for split, ds in preference.items():
            values = column(ds, "chosen_policy") + column(ds, "rejected_policy") if key == "policy" else column(ds, "policies")
            per_split[split] = collections.Counter(values)
            counts.update(values)
        top = [label for label, _ in counts.most_common(25)]
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(top) + 1.5))
        left = [0] * len(top)
        for split, split_counts in per_split.items():
            values = [split_counts.get(label, 0) for label in top]
            ax.barh(top, values, left=left, label=split)
            left = [a + b for a, b in zip(left, values, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("count")
        ax.set_title(title + (f" (top 25 of {len(counts)})" if len(counts) > 25 else ""))
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=7)
        paths += save_figure(fig, out, name)
    return paths


def _with_rows(splits: Any, name: str) -> dict[str, Any]:
    """The splits that hold rows (None: a split that could not be read, see `dataset_figures_from_disk`)."""
    kept = {split: ds for split, ds in splits.items() if ds is not None and len(ds)}
    for split in [split for split in splits if split not in kept]:
        print(f"figures: skipping {name}/{split}: no rows")
    return kept


def dataset_figures_from_disk(dataset_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Redraw figure 10 from a directory written by `tldr_dataset`. Splits are read one at a time: one saved
    without rows (by a data stage before empty splits were left out) cannot be read and is skipped."""
    import json

    from summarize_from_feedback_details.tldr_dataset import Lengths

    root = Path(dataset_dir)
    args = json.loads((root / "args.json").read_text())
    sft, preference = ({split: load_saved_split(root / name, split) for split in saved_split_names(root / name)}
                       for name in ("sft", "preference"))
    return dataset_figures(sft, preference, out_dir or root / "figures", Lengths(**args["lengths"]))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "dataset":
        print("usage: python -m summarize_from_feedback_details.figures dataset DATASET_DIR [OUT_DIR]", file=sys.stderr)
        raise SystemExit(2)
    for path in dataset_figures_from_disk(*sys.argv[2:]):
        print(path)
