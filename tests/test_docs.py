"""The docs are true (#20 item 5): every ``blockprune`` command in README.md and docs/index.md parses, each command
named has a --help, and the Python snippets of docs/index.md run (on the toy model) or at least call real API."""

import ast
import inspect
import re
import shlex
from pathlib import Path

import pytest

import blockprune
from blockprune.cli import build_parser, main, named_command

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "index.md"]
NEEDS_WEIGHTS = "black-forest-labs/"  # a snippet that loads real weights: checked, not run


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(encoding="utf-8"), re.DOTALL)


def _commands(path: Path) -> list[str]:
    """The ``blockprune ...`` commands of the page's bash blocks (continuations joined, ``&&`` split, comments cut)."""
    commands = []
    for block in _blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["blockprune"]:
                    commands.append(words[1:])
    return commands


COMMANDS = [(path.name, argv) for path in PAGES for argv in _commands(path)]


def test_the_pages_show_commands_and_the_cli_section_names_calibrate():
    assert {name for name, _ in COMMANDS} == {"README.md", "index.md"}
    assert any(argv[:1] == ["calibrate"] for _, argv in COMMANDS)


@pytest.mark.parametrize(("page", "argv"), COMMANDS, ids=[f"{page}: {' '.join(argv)}" for page, argv in COMMANDS])
def test_every_command_shown_parses(page, argv):
    build_parser(named_command(argv)).parse_args(argv)  # a usage error would exit


@pytest.mark.parametrize("command", sorted({argv[0] for _, argv in COMMANDS if argv}))
def test_every_command_named_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: blockprune {command}")


def _blockprune_calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "blockprune"]


def test_every_snippet_calls_real_api():
    snippets = [code for path in PAGES for code in _blocks(path, "python")]
    assert any(NEEDS_WEIGHTS in code for code in snippets)
    for code in snippets:
        for call in _blockprune_calls(ast.parse(code)):
            function = getattr(blockprune, call.func.attr)
            parameters = inspect.signature(function).parameters
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
                assert {k.arg for k in call.keywords} <= set(parameters), f"blockprune.{call.func.attr}"


def test_the_toy_snippet_of_the_quick_start_runs(tmp_path, monkeypatch):
    snippets = [code for code in _blocks(PAGES[1], "python") if NEEDS_WEIGHTS not in code]
    assert len(snippets) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(snippets[0], "docs/index.md", "exec"), {})  # noqa: S102 - the documentation's own code
    plan = blockprune.plan(blockprune.from_pretrained(tmp_path / "flux-small-compressed"))
    assert len(plan.replaced) == 4 and (tmp_path / "flux-small-calibration.safetensors").is_file()
