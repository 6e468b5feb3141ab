"""The package's parts import only what the code map of docs/how-it-works.md says they may."""

import ast

import pytest

from conftest import ROOT
from tiny_audio_pl.modeling import CODE

PACKAGE = ROOT / "tiny_audio_pl"
MODEL_PART = {name.removesuffix(".py") for name in CODE}  # copied into exports
DATA_PART = {"data", "clips", "stream", "network", "hub"}
TRAINING_PART = {"training", "alignment", "checkpoint", "runs", "cluster", "lightning_private"}


def package_imports(name: str) -> tuple[set[str], set[str]]:
    """The package modules ``name`` imports: (by absolute ``tiny_audio_pl.x``, by relative ``.x``)."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            relative.add(node.module)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tiny_audio_pl"):
            absolute.add(node.module.removeprefix("tiny_audio_pl.").removeprefix("tiny_audio_pl"))
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            absolute |= {n.removeprefix("tiny_audio_pl.") for n in names if n.startswith("tiny_audio_pl")}
    return absolute, relative


@pytest.mark.parametrize("name", sorted(MODEL_PART))
def test_the_model_part_imports_only_its_own_files_relatively(name):
    """These files are copied into exported folders, where no tiny_audio_pl is installed."""
    absolute, relative = package_imports(name)
    assert not absolute and relative <= MODEL_PART


def test_data_and_model_code_do_not_reach_into_each_other():
    for name in DATA_PART:
        absolute, _ = package_imports(name)
        assert absolute <= DATA_PART | {"processing", "errors"}, name  # the model's processor, nothing else of it
    for name in MODEL_PART | TRAINING_PART:
        absolute, relative = package_imports(name)
        assert not (absolute | relative) & DATA_PART, name


def test_no_two_modules_import_each_other_however_indirectly():
    """A circle makes a module half-initialised when the other imports it, and the code's layers unreadable."""
    names = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    edges = {name: {n for n in set.union(*package_imports(name)) if n in names} for name in names}
    done: set[str] = set()

    def circle_from(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        for other in sorted(edges[name]):
            found = circle_from(other, [*path, name])
            if found:
                return found
        done.add(name)
        return None

    circles = [c for c in (circle_from(name, []) for name in sorted(names)) if c]
    assert not circles, f"import circle: {' -> '.join(circles[0])}"
