"""The README's quick start and CI stay true: two one-line commands, CI runs exactly the test one."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO


def _fenced_command(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)\n```", text, re.S)
    assert match, f"README.md has no {marker} block"
    return match.group(1)


def test_quick_start_is_two_one_line_commands():
    main, tests = _fenced_command("main-command"), _fenced_command("test-command")
    for command in (main, tests):
        assert "\n" not in command
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install --no-compile torch==2.13.0 && ")
    assert main.endswith("bash scripts/hello_world.sh") and tests.endswith("pytest -n 2")
    quick_start = (REPO / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    assert quick_start.count("```bash") == 2


def test_ci_runs_exactly_the_readme_test_command():
    script = (REPO / ".ci" / "run").read_text()
    awk = re.search(r"command=\$\((awk .*? README\.md)\)", script).group(1)
    extracted = subprocess.run(["bash", "-c", awk], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == _fenced_command("test-command")
    assert "../shared/data" in script


def test_shell_scripts_parse():
    for path in [REPO / ".ci" / "run", *sorted((REPO / "scripts").glob("*.sh"))]:
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_every_cli_field_has_a_docstring():
    """tyro shows a field's docstring as its `--help` text: every stage argument must have one."""
    import ast

    classes = {"tldr_dataset.py": ("Args", "Lengths"), "sft.py": ("Args",), "reward.py": ("Args",), "ppo.py": ("Args",), "dpo.py": ("Args",), "judge.py": ("Args",), "visualize_tokens.py": ("Args",), "paper_figures.py": ("Args",), "ablate.py": ("Args",),
               "core.py": ("RunArgs", "TrainArgs"), "embedded.py": ("BuildArgs", "BuildConfig")}
    for filename, names in classes.items():
        tree = ast.parse((REPO / "summarize_from_feedback_details" / filename).read_text())
        found = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name in names]
        assert len(found) == len(names), filename
        for cls in found:
            for i, node in enumerate(cls.body):
                if isinstance(node, ast.AnnAssign):
                    nested = isinstance(node.value, ast.Call)  # dataclasses.field(default_factory=...) groups
                    documented = i + 1 < len(cls.body) and isinstance(cls.body[i + 1], ast.Expr)
                    assert documented or nested, f"{filename}: {cls.name}.{node.target.id} has no docstring"


def test_stage_help_parses():
    from conftest import run_module

    for module in ("sft", "reward", "ppo", "dpo"):
        for preset in ("pythia", "embedded"):
            assert "--batch_size" in run_module(module, preset, "--help").stdout
