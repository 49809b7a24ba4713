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

    classes = {"tldr_dataset.py": ("Args", "Lengths"), "sft.py": ("Args",), "reward.py": ("Args",), "ppo.py": ("Args",), "rloo.py": ("Args",), "rl.py": ("RLArgs",), "dpo.py": ("Args",), "judge.py": ("Args",), "visualize_tokens.py": ("Args",), "paper_figures.py": ("Args",), "ablate.py": ("Args",),
               "label_server.py": ("Args",),
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


# `python -m summarize_from_feedback_details.<stage> <preset> --help` for every stage and preset, each run as
# `python -m` runs it (runpy, run_name "__main__"), in ONE interpreter: torch and transformers are imported once.
HELP_SCRIPT = """
import contextlib, io, json, runpy, sys
out = {}
for module in ("sft", "reward", "ppo", "rloo", "dpo"):
    for preset in ("pythia", "embedded"):
        sys.argv, text = [module, preset, "--help"], io.StringIO()
        with contextlib.redirect_stdout(text):
            try:
                runpy.run_module(f"summarize_from_feedback_details.{module}", run_name="__main__", alter_sys=True)
                code = None
            except SystemExit as error:
                code = error.code
        out[f"{module} {preset}"] = [code, text.getvalue()]
print(json.dumps(out))
"""


def test_stage_help_parses():
    import json
    import sys

    result = subprocess.run([sys.executable, "-c", HELP_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    helps = json.loads(result.stdout.splitlines()[-1])
    assert len(helps) == 10
    for name, (code, text) in helps.items():
        assert code == 0 and "--batch_size" in text and "--seed" in text, (name, code, text[-500:])
