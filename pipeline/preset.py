"""Named parameter presets: `python -m pipeline.preset NAME [--source PATH_OR_URL]`.

A preset is a partial params.yaml in pipeline/presets/<NAME>.yaml (an overlay): every key in it
must already exist in params.yaml, and params.yaml with the overlay merged in must be valid
(pipeline.core.config), both checked before anything runs. Then, by default,

    dvc exp run -n NAME -S key=value -S ...        (one -S per leaf of the overlay)

runs it as a DVC experiment; `--apply` writes the merged params.yaml instead (atomically, with
DVC's own -S code, so its comments stay) for a plain `dvc repro`; `--print` only prints the
command. Arguments after `--` go to `dvc exp run` (e.g. `-- --temp` or `-- --queue`).

    uv run python -m pipeline.preset drive-gpu --source /data/DRIVE.zip
    uv run python -m pipeline.preset camvid-gpu --source https://.../master.zip --apply
    uv run python -m pipeline.preset ci-cpu --print
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from pipeline.core import paths
from pipeline.core.common import PipelineError, run_cli
from pipeline.core.config import flatten, load_params, load_yaml, parse_params

log = logging.getLogger(__name__)

PRESETS = Path(__file__).resolve().parent / "presets"


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_overlay(name: str) -> dict[str, Any]:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise PipelineError(f"unknown preset {name!r}; available: {', '.join(available())}")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise PipelineError(f"{path}: expected a mapping of params.yaml keys")
    return data


def _key(node: Any, part: str) -> Any:
    """The key of mapping `node` spelled `part` (keys may be ints, e.g. a label mapping's), or
    None."""
    if not isinstance(node, dict):
        return None
    return next((k for k in node if str(k) == part), None)


def check_keys(overlay: dict[str, Any], base: dict[str, Any], source: str) -> None:
    """Every leaf of the overlay must name a key that params.yaml already has (`dvc exp run -S`
    only changes existing keys; a typo would otherwise add a key nothing reads)."""
    for key in flatten(overlay):
        node: Any = base
        for part in key.split("."):
            found = _key(node, part)
            if found is None:
                raise PipelineError(f"{source}: {key}: not a key of params.yaml")
            node = node[found]


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with the overlay's leaves set (their keys exist in `base`)."""
    out = copy.deepcopy(base)
    for key, value in flatten(overlay).items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node[_key(node, part)]
        node[_key(node, last)] = copy.deepcopy(value)
    return out


# strings Hydra reads back as the same plain string without quotes
_PLAIN = re.compile(r"[A-Za-z_][\w\-./]*")
_KEYWORDS = {"null", "true", "false", "inf", "nan"}  # Hydra reads these (any case) as values


def hydra_value(value: Any) -> str:
    """A YAML value in Hydra's override grammar, which `dvc exp run -S` parses. Strings are
    quoted unless plain (a name such as resnet34 or val_dice), so "1", "true", "a,b" (a
    sweep) or a URL stay strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _KEYWORDS:
            return value
        return quote(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise PipelineError(f"cannot pass {value!r} ({type(value).__name__}) with dvc exp run -S")


def quote(text: str) -> str:
    """A Hydra quoted string: backslashes are literal except before a quote (or the closing
    one), where they are doubled; quotes and `${` (an interpolation) are escaped."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("${", "\\${") + "'"


# mappings replaced whole, never merged key by key: a label mapping
WHOLE = ("dataset.folder.mapping",)
# what a recipe of its own leaves behind (pipeline.autoconf's time limits and account): reset
# when a preset that does not set them is applied, so they do not outlive their recipe
RECIPE_SECTIONS = ("budget", "autoconf")


def set_args(overlay: dict[str, Any], whole: tuple[str, ...] = WHOLE) -> list[str]:
    """`key=value` for every leaf, as `dvc exp run -S` takes them. The mappings named in
    `whole` (dotted keys) are replaced as one value, `~key` then `+key=value`: a leaf-by-leaf
    override could only change the keys they already have, and would keep the others."""
    out = []
    for key, value in flatten(overlay).items():
        top = next((w for w in whole if key == w or key.startswith(w + ".")), None)
        if top is None:
            out.append(f"{key}={hydra_value(value)}")
        elif f"~{top}" not in out:
            node = overlay
            for part in top.split("."):
                node = node[part]
            out += [f"~{top}", f"+{top}={hydra_value(node)}"]
    return out


def resolve(
    name: str, source: str | None = None, sha256: str = "", params_path: Path | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The preset's overlay (with --source folded in) and params.yaml merged with it, validated.

    Raises PipelineError with one line naming a bad key or value.
    """
    params_path = Path(params_path or paths.PARAMS)
    overlay = load_overlay(name)
    try:
        base = load_yaml(params_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"{params_path}: cannot read ({str(exc).splitlines()[0]})") from None
    label = f"preset {name}"
    check_keys(overlay, base, label)
    defaults = parse_params({}).model_dump()
    for section in RECIPE_SECTIONS:  # an earlier autoconf recipe's limits and account
        if section in base and section not in overlay and base[section] != defaults[section]:
            overlay[section] = defaults[section]
    if source is not None:
        overlay.setdefault("dataset", {}).update(source=source, sha256=sha256)
    dataset = overlay.get("dataset", {}).get("name")
    if dataset and dataset != "synthetic" and source is None:
        current = base.get("dataset", {})
        if current.get("name") != dataset or not current.get("source"):
            raise PipelineError(
                f"{label}: dataset {dataset} needs --source (an http(s) URL, a local archive "
                "or folder)"
            )
    merged = merge(base, overlay)
    params = parse_params(merged, f"params.yaml + {label}")  # raises with one line
    if params.dataset.name != "synthetic":
        check_source(params.dataset.source, "--source" if source is not None else "dataset.source")
    return overlay, merged


def check_source(source: str, what: str = "--source") -> None:
    """A local dataset source must be there now, as a folder or a .zip/tar archive: a typo
    shows here, not when the download stage runs. An http(s) URL is not fetched here."""
    if urlparse(source).scheme in ("http", "https"):
        return
    path = paths.resolve_source(source)
    if path.is_dir():
        return
    kinds = "a local .zip/.tar(.gz) archive or folder, or an http(s) URL"
    if not path.exists():
        raise PipelineError(f"{what}: {path} not found ({kinds})")
    if not path.is_file():
        raise PipelineError(f"{what}: {path} is not a regular file or folder ({kinds})")
    try:
        archive = zipfile.is_zipfile(path) or tarfile.is_tarfile(path)
    except OSError as exc:
        raise PipelineError(f"{what}: cannot read {path} ({exc.strerror or exc})") from None
    if not archive:
        raise PipelineError(f"{what}: {path} is not a .zip or .tar(.gz) archive ({kinds})")


def exp_run_command(name: str, overlay: dict[str, Any], extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "-n", name]
    for arg in set_args(overlay):
        cmd += ["-S", arg]
    return cmd + extra


def shell_join(args: list[str]) -> str:
    """A command line to copy: Hydra's single-quoted values go inside double quotes."""
    quoted = []
    for arg in args:
        if "'" in arg and not any(c in arg for c in '"$`\\!'):
            quoted.append(f'"{arg}"')
        else:
            quoted.append(shlex.quote(arg))
    return " ".join(quoted)


@contextlib.contextmanager
def rendered(
    overlay: dict[str, Any], params_path: Path | None = None, whole: tuple[str, ...] = WHOLE
) -> Iterator[Path]:
    """A temporary copy of params.yaml with the overlay applied by DVC's own `-S` code (its
    comments and key order stay), checked by the stages' loader: what `dvc exp run -S` will
    write is what the stages will read: a value that would fail there fails here, before
    anything runs)."""
    from dvc.utils.hydra import apply_overrides

    target = Path(params_path or paths.PARAMS)
    fd, tmp_name = tempfile.mkstemp(prefix=".params.", suffix=".tmp.yaml", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copyfile(target, tmp)
        apply_overrides(tmp, set_args(overlay, whole))
        try:
            load_params(tmp)
        except PipelineError as exc:
            detail = str(exc).split(": ", 1)[-1]
            raise PipelineError(f"params.yaml as dvc exp run -S writes it: {detail}") from None
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def apply(
    overlay: dict[str, Any], params_path: Path | None = None, whole: tuple[str, ...] = WHOLE
) -> Path:
    """Write params.yaml with the overlay applied, atomically: the checked temporary copy is
    renamed over the original, so a failure leaves params.yaml untouched."""
    target = Path(params_path or paths.PARAMS)
    with rendered(overlay, target, whole) as tmp:
        os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=f"presets: {', '.join(available())}; arguments after -- go to dvc exp run",
    )
    parser.add_argument("name", help="a preset in pipeline/presets/")
    parser.add_argument("--source", help="dataset.source: an http(s) URL, archive or folder")
    parser.add_argument("--sha256", default="", help="dataset.sha256 of --source (optional)")
    parser.add_argument("--exp-name", help="the DVC experiment's name (default: the preset's)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print the command, run nothing")
    mode.add_argument("--apply", action="store_true", help="write params.yaml for dvc repro")
    args = parser.parse_args(argv)

    overlay, _ = resolve(args.name, args.source, args.sha256)
    if args.apply:
        if extra:
            raise PipelineError("arguments after -- are for dvc exp run, not --apply")
        path = apply(overlay)
        log.info("preset %s written to %s; now run: dvc repro", args.name, path)
        return
    with rendered(overlay):  # fails here, not in a stage, if DVC would write a bad value
        pass
    cmd = exp_run_command(args.exp_name or args.name, overlay, extra)
    shown = shell_join(["dvc", *cmd[3:]])
    if args.print:
        sys.stdout.write(shown + "\n")  # the command itself is this mode's output
        return
    log.info("running %s", shown)
    code = subprocess.run(cmd, cwd=paths.ROOT, check=False).returncode
    if code:
        raise PipelineError(f"dvc exp run exited with status {code}")


if __name__ == "__main__":
    run_cli(main)
