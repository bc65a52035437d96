"""The package layout is the architecture: each sub-package of pipeline/ imports only the
layers below it, and no two modules import each other, directly or in a ring (a lazy import
inside a function counts: it runs too)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.repo.test_dvc_yaml import PACKAGE, ROOT, docstring_only, imported

# a unit (sub-package, or top-level module) -> the units it may import. Tools (predict, export,
# plan, preset, baseline) sit on top with the stages; the models know nothing of params or data.
# what running a stage (and a training stage's run) stands on
RUN = {"common", "paths", "config", "data", "models", "engine", "inference", "tracking", "report",
       "pyfunc"}  # fmt: skip

ALLOWED = {
    "common": set(),
    "paths": set(),
    "encoders": set(),
    "config": {"common", "paths", "encoders"},
    "models": {"common", "encoders"},
    "data": {"common", "paths", "config"},
    "report": {"common", "paths", "config", "data", "engine", "inference", "tracking"},
    "tracking": {"common", "paths", "config"},
    "engine": {"common", "config", "data", "models"},
    "inference": {"common", "config", "engine"},
    "export": {"common", "engine", "models"},
    "segmenter": {"common", "config", "data", "engine", "inference", "models"},
    "pyfunc": {"common", "report", "segmenter"},
    "predict": {"common", "inference", "report", "segmenter"},
    "preset": {"common", "paths", "config"},
    "baseline": {"common", "paths", "config", "preset"},
    "plan": {"common", "paths", "config", "data", "engine", "inference", "models"},
    # one training stage's run: built from the engine, scored by inference, logged by tracking
    "training": RUN,
    # a tool on top: it reads the raw data as the download stage fetches it, and times with plan
    "autoconf": {"common", "paths", "config", "data", "plan", "preset", "stages"},
    "stages": RUN | {"training", "export"},
}


# packages whose modules are layered one by one (core's config sits on its paths and common)
BY_MODULE = {"core", "serving"}


def unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[1] if parts[0] in BY_MODULE and len(parts) > 1 else parts[0]


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if not docstring_only(p) or p.stem != "__init__")


def test_every_unit_is_placed():
    units = {unit(p) for p in modules()} - {"__init__"}
    assert units <= set(ALLOWED), f"place {sorted(units - set(ALLOWED))} in ALLOWED"


def violations(imports=imported) -> list[str]:
    wrong = []
    for path in modules():
        src = unit(path)
        for dep in imports(path):
            dst = unit(dep)
            if dst in (src, "__init__") or docstring_only(dep):
                continue
            if dst not in ALLOWED.get(src, set()):
                wrong.append(f"{path.relative_to(ROOT)} imports {dep.relative_to(ROOT)}")
    return wrong


def test_each_package_imports_only_the_layers_below_it():
    wrong = violations()
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def find_cycle(graph: dict[Path, set[Path]]) -> list[Path] | None:
    """A ring of imports in `graph`, or None. A module's own package __init__ runs before it
    by Python's rules (models/__init__ importing models/unet is not a ring)."""
    state: dict[Path, int] = {}  # 1 on the stack, 2 done
    stack: list[Path] = []

    def visit(node: Path) -> list[Path] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.name == "__init__.py" and node.parent == nxt.parent:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (ring := visit(nxt)):
                return ring
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (ring := visit(node)):
            return ring
    return None


def test_no_import_cycle():
    graph = {p: {d for d in imported(p) if not docstring_only(d)} - {p} for p in modules()}
    ring = find_cycle(graph)
    assert ring is None, "import cycle: " + " -> ".join(
        p.relative_to(ROOT).as_posix() for p in ring
    )


def test_the_cycle_check_sees_a_ring():
    """The ring this layout removed: evaluation used tiling, tiling used evaluation's forward."""
    evaluate, tiling = PACKAGE / "inference" / "evaluate.py", PACKAGE / "inference" / "tiling.py"
    assert find_cycle({evaluate: {tiling}, tiling: {evaluate}}) == [evaluate, tiling, evaluate]
    assert find_cycle({evaluate: {tiling}, tiling: set()}) is None


def test_the_layering_check_sees_a_wrong_import():
    """The checker itself: a model importing the params would be reported."""
    unet = PACKAGE / "models" / "unet.py"

    def with_config(path: Path) -> set[Path]:
        return imported(path) | ({PACKAGE / "core" / "config.py"} if path == unet else set())

    assert violations(with_config) == ["pipeline/models/unet.py imports pipeline/core/config.py"]


MAX_FUNCTION = 80  # lines, decorators and docstring included
MAX_STAGE = 300  # lines of a module in pipeline/stages/: a stage wires, its packages hold logic


def long_functions(source: str, name: str, limit: int = MAX_FUNCTION) -> list[str]:
    """'name:line function (n lines)' for each function of `source` over `limit` lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            size = node.end_lineno - first + 1
            if size > limit:
                found.append(f"{name}:{first} {node.name} ({size} lines)")
    return found


def test_no_function_is_longer_than_a_screen():
    long = [
        line
        for path in modules()
        for line in long_functions(path.read_text(), path.relative_to(ROOT).as_posix())
    ]
    assert not long, f"split these (over {MAX_FUNCTION} lines):\n" + "\n".join(long)


def test_stage_modules_only_wire():
    big = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in sorted((PACKAGE / "stages").glob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_STAGE
    ]
    assert not big, f"move logic out of (over {MAX_STAGE} lines): " + ", ".join(big)


def test_the_size_check_sees_a_long_function():
    """The checker itself: 80 lines pass, a decorator line makes 81."""
    body = "".join(f"    x{i} = {i}\n" for i in range(79))
    assert long_functions(f"def f():\n{body}", "m.py") == []
    assert long_functions(f"@cache\ndef f():\n{body}", "m.py") == ["m.py:1 f (81 lines)"]


def test_the_top_of_the_package_holds_only_commands():
    """pipeline/<name>.py is a command users type (`python -m pipeline.<name>`); the rest lives
    in a package whose name says what it is (core, serving, stages, ...)."""
    top = [p for p in sorted(PACKAGE.glob("*.py")) if p.name != "__init__.py"]
    not_commands = [p.name for p in top if 'if __name__ == "__main__"' not in p.read_text()]
    assert top and not not_commands, f"move {not_commands} into a package"
