"""dvc.yaml cannot drift from the code: each stage's `deps` cover every `pipeline/` module its
command imports, directly or through other modules, at the top or inside a function (a lazy
import runs too). A change to any of them then re-runs the stage; a module missing from `deps`
would leave stale results that `dvc repro` calls up to date."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
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
    prune = imported(PACKAGE / "stages" / "prune.py")
    assert PACKAGE / "export.py" in prune  # imported inside export_all only
    assert PACKAGE / "core" / "paths.py" in prune  # `from pipeline.core import paths`
    assert PACKAGE / "engine" / "__init__.py" in prune  # an imported module's package runs too
    assert (PACKAGE / "models" / "__init__.py") in closure(PACKAGE / "engine" / "checkpoint.py")


# --- params: every key a stage reads is one dvc.yaml lists for it ----------------------------

# read by every stage but never part of its results: where the runs are logged
NOT_RESULTS = ("mlflow",)


class Reads:
    """A params object (or section) that records the dotted key of everything read from it:
    a leaf by name, a whole section when one of its methods runs."""

    def __init__(self, obj, path: str, seen: set[str]):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name: str):
        from pydantic import BaseModel

        value = getattr(self._obj, name)
        key = f"{self._path}.{name}" if self._path else name
        if isinstance(value, BaseModel):
            return Reads(value, key, self._seen)
        if name == "model":  # params.model(arch): that architecture's section
            return lambda arch: Reads(value(arch), arch, self._seen)
        if name == "model_dump":  # what a stage logs to MLflow and fingerprints, not reads:
            return value  # a section a stage builds from is listed whole (unet, train, ...)
        if callable(value):  # other methods (size_multiple(), ...) read the whole section
            self._seen.add(self._path)
            return value
        self._seen.add(key)
        return value


def listed(stage: str) -> list[str]:
    out = []
    for p in stages()[stage].get("params", []):
        out += [""] if isinstance(p, dict) else [p]  # `- params.yaml:` lists every key
    return out


def uncovered(stage: str, seen: set[str]) -> list[str]:
    keys = listed(stage)
    return sorted(
        k
        for k in seen
        if not k.startswith(NOT_RESULTS)
        and not any(p == "" or k == p or k.startswith(p + ".") for p in keys)
    )


@pytest.mark.slow
def test_a_stages_params_cover_every_key_it_reads(project):
    """Run each stage in-process on tiny synthetic data with params that record what is read:
    a key missing from a stage's `params:` would not re-run it when changed."""
    from pipeline.core.config import parse_params
    from pipeline.stages.download import download
    from pipeline.stages.preprocess import preprocess
    from pipeline.stages.prune import prune
    from pipeline.stages.report import report
    from pipeline.stages.train import train
    from tests.fakes import tiny_params

    params = parse_params(
        tiny_params(
            dataset={"num_images": 6, "image_size": 32, "val_count": 1, "test_count": 1},
            preprocess={"crop_size": 16, "crop_stride": 16},
            report={"panels": 1},
        )
    )
    runs = {
        "download": download,
        "preprocess": preprocess,
        "train_unet": lambda p: train("unet", p),
        "train_unetpp": lambda p: train("unetpp", p),
        "prune": prune,
        "report": report,
    }
    assert sorted(runs) == sorted(stages())
    for stage, run in runs.items():
        if listed(stage) == [""]:  # report: every key (its table shows each one that differs)
            run(params)
            continue
        seen: set[str] = set()
        run(Reads(params, "", seen))
        assert seen, f"{stage}: the recorder saw nothing"
        missing = uncovered(stage, seen)
        assert not missing, f"dvc.yaml: stage {stage} reads {missing} but does not list them"


def test_the_params_check_reads_sections_and_leaves():
    from pipeline.core.config import parse_params

    seen: set[str] = set()
    p = Reads(parse_params({}), "", seen)
    assert p.train.amp == "auto" and p.model("unetpp").depth == 4
    p.unet.size_multiple()
    p.inference.model_dump()  # logged, not read
    assert seen == {"train.amp", "unetpp.depth", "unet"}
    assert uncovered("prune", {"pruning.onnx", "train.amp", "mlflow.enabled"}) == []
    assert uncovered("prune", {"lr", "train.lr_scale"}) == ["lr", "train.lr_scale"]
