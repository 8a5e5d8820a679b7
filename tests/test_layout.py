"""The layout rules of the code base: small modules and functions, private names kept private, documented hooks,
extension points reachable from the public package."""

import ast
import inspect
from pathlib import Path

import pytest

import blockprune
from blockprune import hookspecs

ROOT = Path(__file__).resolve().parents[1]
CORE = [ROOT / "blockprune", ROOT / "adapters"]
CALLERS = [*CORE, ROOT / "benchmarks", ROOT / "examples", ROOT / "plugins"]


def _sources(folders):
    return [path for folder in folders for path in sorted(folder.rglob("*.py")) if "build" not in path.parts]


def test_no_module_over_300_lines_and_no_function_over_60():
    too_long = []
    for path in _sources(CORE):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 300:
            too_long.append(f"{path.relative_to(ROOT)} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert too_long == []


def test_no_private_name_is_imported_from_another_module():
    imported = []
    for path in _sources(CALLERS):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "blockprune"):
                imported += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names
                             if a.name.startswith("_") and a.name != "__version__"]
    assert imported == []


def test_adapters_use_only_the_public_package():
    allowed = {"blockprune", "blockprune.adapter", "blockprune.errors"}
    used = set()
    for path in _sources([ROOT / "adapters", ROOT / "plugins"]):
        if "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("blockprune."):
                used.add(node.module)
    assert used <= allowed


@pytest.mark.parametrize("name", [n for n in dir(hookspecs) if n.startswith("blockprune_register_")])
def test_every_hook_documents_each_argument(name):
    hook = getattr(hookspecs, name)
    for parameter in inspect.signature(hook).parameters:
        assert f":param {parameter}:" in hook.__doc__


def test_the_extension_authors_types_are_public():
    for name in ("Adapter", "BlockSpec", "Block", "Metric", "ScoringContext", "Trace", "CallRecord", "BlockInfo",
                 "SurrogateKind", "LinearSurrogate", "SandwichDivergedError", "CompressionInterrupted",
                 "CompressConfig", "ScoringConfig", "SandwichConfig", "StreamReport"):
        assert name in blockprune.__all__ and hasattr(blockprune, name)
    assert issubclass(blockprune.SandwichDivergedError, blockprune.BlockpruneError)
    assert issubclass(blockprune.CompressionInterrupted, KeyboardInterrupt)


def test_the_trained_small_models_are_listed():
    from blockprune.toy.small_models import SMALL_MODELS

    assert {"flux-random", "flux-small", "sd3-small"} <= set(SMALL_MODELS)
