"""dvc.yaml cannot drift from the code: each stage's `deps` cover every `pipeline/` module its
command imports, directly or through other modules, at the top or inside a function (a lazy
import runs too). A change to any of them then re-runs the stage; a module missing from `deps`
would leave stale results that `dvc repro` calls up to date."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"


def module_file(name: str) -> Path | None:
    """pipeline.x.y -> its file (a package: its __init__.py), or None outside pipeline/."""
    if name != "pipeline" and not name.startswith("pipeline."):
        return None
    path = ROOT.joinpath(*name.split("."))
    if path.is_dir():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported(path: Path) -> set[Path]:
    """The pipeline/ files `path` imports anywhere in its body."""
    found: set[Path] = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for name in names:
            # every enclosing package's __init__ runs too
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                if (file := module_file(".".join(parts[:i]))) is not None:
                    found.add(file)
    return found


def docstring_only(path: Path) -> bool:
    """A package __init__ holding a docstring at most cannot change what runs."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body
    )


def closure(start: Path) -> set[Path]:
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(imported(path) - seen)
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def command_module(cmd: str) -> Path:
    words = cmd.split()
    assert words[:2] == ["python", "-m"], f"{cmd!r}: stages run `python -m pipeline.<module>`"
    file = module_file(words[2])
    assert file is not None, f"{cmd!r}: {words[2]} is not a pipeline module"
    return file


def covered(file: Path, deps: list[str]) -> bool:
    rel = file.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(stages()))
def test_a_stages_deps_cover_every_module_it_imports(stage):
    spec = stages()[stage]
    deps = [d for d in spec.get("deps", []) if isinstance(d, str)]
    needed = closure(command_module(spec["cmd"]))
    needed = {f for f in needed if not docstring_only(f)}
    missing = sorted(f.relative_to(ROOT).as_posix() for f in needed if not covered(f, deps))
    assert not missing, f"dvc.yaml: stage {stage} imports {missing} but does not list them in deps"


@pytest.mark.parametrize("stage", sorted(stages()))
def test_a_stage_lists_no_code_it_does_not_run(stage):
    """A stale code dep re-runs a stage (hours, on real data) for a change it cannot see."""
    spec = stages()[stage]
    needed = closure(command_module(spec["cmd"]))
    code = [d for d in spec.get("deps", []) if isinstance(d, str) and d.startswith("pipeline/")]
    stale = [
        d
        for d in code
        if not any(f.relative_to(ROOT).as_posix() == d or covered(f, [d]) for f in needed)
    ]
    assert not stale, f"dvc.yaml: stage {stage} lists {stale} in deps but never imports them"


def test_the_import_walk_sees_lazy_and_package_imports(tmp_path):
    """The checker itself: a function-level import and `from pipeline import x` both count."""
    prune = imported(PACKAGE / "prune.py")
    assert PACKAGE / "export.py" in prune  # imported inside export_all only
    assert PACKAGE / "paths.py" in prune  # `from pipeline import paths`
    assert (PACKAGE / "models" / "__init__.py") in closure(PACKAGE / "checkpoint.py")
