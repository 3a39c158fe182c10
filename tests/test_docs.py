"""The docs cannot drift: README snippets run, docs/cli.md is the real --help, links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI_DOC = REPO / "docs" / "cli.md"
HELP_COMMANDS = [["realtime"], ["batch"], ["demo"], ["status"], ["report"], ["tail"]]

CLI_INTRO = """\
# Command line

Generated from `--help` (regenerate with `python -m tests.test_docs`; `tests/test_docs.py`
fails when this page and the real options disagree). Every option with an underscore also
has a dashed spelling (`--max_trials` / `--max-trials`).

`auto_tune` and `python scripts/auto_tune.py` are `autotune-rt batch`;
`auto_tune_realtime` and `python scripts/auto_tune_realtime.py` are
`autotune-rt realtime`; `python -m autotune_rt` is `autotune-rt`.

Exit codes: the training's own exit code (128+N when it died from signal N); 2 for a usage
error (bad option, missing training script, control file held by another supervisor), with
a one-line message; batch mode exits 0 when at least one trial succeeded, 1 when none did,
130 when interrupted.
"""


def _help(args: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "autotune_rt", *args, "--help"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip()


def render_cli_doc() -> str:
    """docs/cli.md as it should be: the intro and every command's --help."""
    parts = [CLI_INTRO]
    for args in HELP_COMMANDS:
        parts.append(f"## autotune-rt {' '.join(args)}\n\n```text\n{_help(args)}\n```\n")
    return "\n".join(parts)


def test_cli_doc_matches_help() -> None:
    """docs/cli.md shows exactly what `--help` prints for every command."""
    assert CLI_DOC.read_text() == render_cli_doc(), "docs/cli.md is stale: run `python -m tests.test_docs`"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_snippets_run(tmp_path: Path) -> None:
    """Every Python snippet of the README runs against a real control file."""
    blocks = _python_blocks(REPO / "README.md")
    assert blocks, "the README lost its Python snippets"
    config = tmp_path / "control.json"
    config.write_text('{"lambda_dol": 0.6, "lambda_col": 0.4, "version": 1}')
    for block in blocks:
        # The README's snippets are fragments of a train.py: give them an args object and
        # a loop body to run in.
        source = textwrap.dedent(block).replace("...", "pass")
        prelude = textwrap.dedent(
            """
            import argparse, os
            args = argparse.Namespace(epochs=2, model=argparse.Namespace(
                lambda_dol=0.5, lambda_col=0.3, lambda_hier=1.5, lambda_scl=0.2, max_grad_norm=1.0))
            """
        )
        script = tmp_path / "snippet.py"
        script.write_text(prelude + source + "\nprint(args.model.lambda_col)\n")
        env = {**os.environ, "AUTOTUNE_CONFIG_FILE": str(config), "PYTHONPATH": str(REPO)}
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "0.4"


@pytest.mark.parametrize("doc", [*sorted(p.name for p in (REPO / "docs").glob("*.md")), "../README.md"])
def test_relative_links_resolve(doc: str) -> None:
    """Every relative link in the docs points at a file that exists."""
    path = REPO / "docs" / doc
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{doc} links to missing {target}"


def test_readme_opens_with_the_two_commands() -> None:
    """The README's first code block is the two commands for a fresh machine."""
    text = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["scripts/demo", "scripts/test"]
    assert os.access(REPO / "scripts" / "demo", os.X_OK) and os.access(REPO / "scripts" / "test", os.X_OK)


if __name__ == "__main__":
    CLI_DOC.write_text(render_cli_doc())
    print(f"wrote {CLI_DOC}")
