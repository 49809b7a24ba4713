"""The details registry is complete and honest: every implemented detail has its comment, flag and test."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re

from conftest import REPO
from summarize_from_feedback_details.details import DETAILS, DOC_HEADER, STAGE_MODULES, markdown_table

SPEC_NUMBERS = {
    "1", "2.1", "2.2", "2.3", "3.1", "3.2", "4", "5", "G-1", "7", "8", "G-2", "G-3", "9", "10", "11", "12", "13",
    "14", "15", "16", "18", "19", "20", "21", "22", "23.1", "23.2", "23.3", "24", "25",
    "P-1", "P-2", "P-3", "P-4", "P-5", "P-6", "DPO",
}


SHARED_MODULES = ("core", "modeling", "training", "rl")
TRAINING_STAGES = ["sft", "reward", "ppo", "dpo"]  # the stages a detail of stage "all" concerns (those that exist)


def _test_functions(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_registry_covers_every_spec_detail():
    keys = [d.key for d in DETAILS]
    assert len(keys) == len(set(keys))
    assert SPEC_NUMBERS <= {d.number for d in DETAILS}


def test_implemented_details_have_comment_flag_and_test():
    for detail in (d for d in DETAILS if d.status == "implemented"):
        assert detail.test, detail.key
        path, _, function = detail.test.partition("::")
        assert function in _test_functions(path), f"{detail.key}: {detail.test} does not exist"
        modules = TRAINING_STAGES if detail.stage == "all" else [STAGE_MODULES[detail.stage]]
        sources = {m: (REPO / "summarize_from_feedback_details" / f"{m}.py") for m in modules}
        sources = {m: p.read_text() for m, p in sources.items() if p.exists()}
        shared = [(REPO / "summarize_from_feedback_details" / f"{name}.py").read_text() for name in SHARED_MODULES]
        pattern = re.compile(rf"#\s*Detail {re.escape(detail.number)}\b")
        assert any(pattern.search(text) for text in [*sources.values(), *shared]), f"no '# Detail {detail.number}' comment"
        if detail.flag:
            for module in sources:
                fields = {f.name for f in dataclasses.fields(importlib.import_module(f"summarize_from_feedback_details.{module}").Args)}
                assert detail.flag.removeprefix("--") in fields, f"{detail.key}: {detail.flag} is not a field of {module}.Args"
        if detail.ablation:
            assert detail.flag and any(detail.flag.removeprefix("--") in arg for arg in detail.ablation), detail.key


def test_docs_table_is_current():
    assert (REPO / "docs" / "details.md").read_text() == DOC_HEADER + markdown_table()
