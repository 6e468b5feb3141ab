"""The package's parts import only what the code map of docs/how-it-works.md says they may, and ``fit`` no extra."""

import ast
import re
from collections.abc import Iterator
from importlib.metadata import packages_distributions, requires

import pytest

from conftest import ROOT
from tiny_audio_pl.modeling import CODE

PACKAGE = ROOT / "tiny_audio_pl"
MODEL_PART = {name.removesuffix(".py") for name in CODE}  # copied into exports
DATA_PART = {"data", "clips", "stream", "network", "hub"}
TRAINING_PART = {"training", "alignment", "checkpoint", "runs", "cluster", "lightning_private"}


def import_statements(name: str, at_load: bool = False) -> Iterator[ast.Import | ast.ImportFrom]:
    """Module ``name``'s import statements: all of them, or (``at_load``) those its import runs, its top-level ones
    (into ``if`` and ``try`` blocks, but for ``if TYPE_CHECKING``), not those inside functions."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())

    def top_level(statements: list[ast.stmt]) -> Iterator[ast.stmt]:
        for node in statements:
            yield node
            if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from top_level(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                handlers = [statement for handler in node.handlers for statement in handler.body]
                yield from top_level(node.body + node.orelse + node.finalbody + handlers)

    nodes = top_level(tree.body) if at_load else ast.walk(tree)
    return (node for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom)))


def package_imports(name: str) -> tuple[set[str], set[str]]:
    """The package modules ``name`` imports: (by absolute ``tiny_audio_pl.x``, by relative ``.x``)."""
    absolute, relative = set(), set()
    for node in import_statements(name):
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


def imported_at_load(name: str) -> set[str]:
    """The modules importing module ``name`` imports at once, by full name (``.x`` as ``tiny_audio_pl.x``)."""
    found: set[str] = set()
    for node in import_statements(name, at_load=True):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        module = "tiny_audio_pl" + (f".{node.module}" if node.module else "") if node.level else node.module
        found.add(module)
        if module == "tiny_audio_pl":  # from the package import a module of it
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_fit_imports_no_optional_extra_until_it_is_used():
    """The demo, trackers, LoRA and plots are extras, imported inside the code that uses them: what ``tiny-audio
    fit`` loads to start (cli.py, then lightning_cli.py and what they import at load) imports none of them, and not
    the demo's module. Read from the code, where a lazy import is visibly inside a function; the packages the
    libraries themselves load are theirs (torchmetrics loads matplotlib when it is installed)."""
    extras = [r for r in requires("tiny-audio-pl") if "extra ==" in r and 'extra == "dev"' not in r]
    wanted = {re.split(r"[<>=;\[ ]", requirement)[0].lower() for requirement in extras}
    optional = {module for module, dists in packages_distributions().items() if {d.lower() for d in dists} & wanted}
    assert {"gradio", "peft", "wandb", "mlflow", "matplotlib"} <= optional  # each extra's import name was found
    loaded, todo = set(), ["tiny_audio_pl", "tiny_audio_pl.cli", "tiny_audio_pl.lightning_cli"]
    while todo:
        module = todo.pop()
        if module in loaded:
            continue
        loaded.add(module)
        file = PACKAGE / f"{module.removeprefix('tiny_audio_pl').removeprefix('.') or '__init__'}.py"
        if module.split(".")[0] == "tiny_audio_pl" and file.exists():
            todo += imported_at_load(file.stem)
    assert "tiny_audio_pl.demo" not in loaded
    extras_loaded = {module.split(".")[0] for module in loaded} & optional
    assert not extras_loaded, f"tiny-audio fit imports {sorted(extras_loaded)} as it starts"
