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
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && ")
    assert main.endswith("bash scripts/hello_world.sh") and tests.endswith("pytest")
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
