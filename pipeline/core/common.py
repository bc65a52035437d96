"""Small helpers every stage shares: errors, logging, seeding, atomic writes, the CLI wrapper."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")


class PipelineError(Exception):
    """An expected failure (bad input, bad param): reported as one line, exit code 1."""


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI runner's cancel, `kill`, a scheduler's timeout), raised where the process
    is: `finally` blocks run, so no temporary is left, as with Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a stage's CLI: expected errors become one line on stderr and exit status 1.

    From a real command line (argv None) a successful run ends with its time split: start-up
    (the process's start to here: the interpreter and the imports), tracking (MLflow, see
    `timed`) and work (the rest); `bench/startup.py` reads these lines."""
    setup_logging()
    entered = time.time()
    if argv is None:  # a real command line: this is the process's main thread
        signal.signal(signal.SIGTERM, _terminate)
    try:
        main(argv)
    except PipelineError as exc:
        log.error("%s", exc)
        sys.exit(1)
    except Terminated:
        log.error("terminated (SIGTERM); the outputs of earlier runs are intact")
        sys.exit(143)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
    except Exception as exc:
        if (message := disk_full(exc)) is None:
            raise
        log.error("%s", message)
        sys.exit(1)
    if argv is None:
        log.info("%s", time_split(entered))


_DISK_FULL = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def disk_full(exc: BaseException) -> str | None:
    """One line for an error that a full disk caused anywhere in its chain (an OSError ENOSPC,
    sqlite's "database or disk is full" inside MLflow's own exception), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        errno_ = getattr(exc, "errno", None)
        if errno_ in (28, 122) or any(text in str(exc) for text in _DISK_FULL):  # ENOSPC, EDQUOT
            where = getattr(exc, "filename", None)
            return (
                f"{where or 'the disk'}: no space left on the device"
                f"{'' if where else ' (or the MLflow store)'}; the outputs of earlier runs are "
                "intact: free some space (df -h) and run again"
            )
        exc = exc.__cause__ or exc.__context__
    return None


def _process_start() -> float:
    """When this process started (epoch seconds), from the kernel's record of it."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # no psutil or no /proc: the start-up share then reads 0
        return time.time()


def time_split(entered: float, now: float | None = None) -> str:
    """`<stage> done in 50.3s: start-up 5.1s, tracking 6.2s, work 39.0s` for this process."""
    now = time.time() if now is None else now
    started = min(_process_start(), entered)
    tracking = _spent.get("tracking", 0.0)
    name = os.environ.get("DVC_STAGE") or Path(sys.argv[0]).stem
    return (
        f"{name} done in {now - started:.1f}s: start-up {entered - started:.1f}s, "
        f"tracking {tracking:.1f}s, work {max(now - entered - tracking, 0.0):.1f}s"
    )


_spent: dict[str, float] = {}  # seconds per category of `timed` blocks, this process
_open: dict[str, int] = {}  # nesting depth per category: only the outermost block counts


@contextlib.contextmanager
def timed(category: str) -> Iterator[None]:
    """Count this block's wall time under `category` (e.g. "tracking") in the time split the
    stage logs when it ends; nested blocks of one category count once."""
    _open[category] = _open.get(category, 0) + 1
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _open[category] -= 1
        if not _open[category]:
            _spent[category] = _spent.get(category, 0.0) + time.perf_counter() - t0


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """(H, W) of an image resized by `scale` (preprocess.scale): preprocess and prediction
    round alike, at least 1 px."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def clock(seconds: float) -> str:
    """A duration as 1h02m03s, 2m03s or 3s."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_writable(*folders: Path) -> None:
    """Each folder exists (created if need be) and takes a new file, or one line naming it:
    checked before hours of work whose results would land there."""
    for folder in folders:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise PipelineError(
                f"{folder}: not writable ({exc.strerror or type(exc).__name__}); the results "
                "go there: fix its permissions (or free the disk) before running"
            ) from None


def check_output_file(path: Path, option: str) -> None:
    """A file the user names on the command line (`option`, e.g. --out) can be written:
    not an existing folder (which would be replaced by a file) and in a writable folder;
    checked before the work, one line naming it."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{option} {path}: is a folder; give the path of a file to write")
    check_writable(path.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete what atomic_path writers of `path` that were killed (SIGKILL, power loss) left
    behind: siblings named .<stem>.<pid>.<random>.tmp<suffix> whose process is gone, and the
    .<name>.old a folder swap left (put back if the swap was cut short). Only these names:
    nothing else is touched."""
    suffix = "".join(path.suffixes)
    pattern = re.compile(rf"\.{re.escape(path.stem)}\.(\d+)\.[A-Za-z0-9_]+\.tmp{re.escape(suffix)}")
    stale = [
        p
        for p in path.parent.glob(f".{glob.escape(path.stem)}.*.tmp{glob.escape(suffix)}")
        if (m := pattern.fullmatch(p.name)) and not _alive(int(m.group(1)))
    ]
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():  # killed mid-swap: the old copy is the output
        log.info("restoring %s from %s, left by an interrupted run", path, old.name)
        old.rename(path)
    elif old.is_dir() and path.is_dir():  # the swap finished: the old copy is garbage
        stale.append(old)
    for p in stale:
        log.info("removing %s, left by an interrupted run", p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


_TEMPORARY = re.compile(r"\.(?P<stem>.+)\.\d+\.[A-Za-z0-9_]+\.tmp(?P<suffix>.*)")
_SWAPPED = re.compile(r"\.(?P<name>.+)\.old")


def sweep_stale_temporaries(*folders: Path, shallow: tuple[Path, ...] = ()) -> None:
    """`remove_stale_temporaries` for every output under `folders` (recursively; in `shallow`
    ones, their own entries only: e.g. data/, not the user's dataset in data/raw) that a
    killed writer left a temporary or a half-done folder swap of: a stage that was killed has
    whole outputs, so DVC may never run it again to clean up after itself; every stage sweeps."""
    for folder in (*folders, *shallow):
        for parent, dirs, files in os.walk(folder):
            for name in (*dirs, *files):
                if m := _TEMPORARY.fullmatch(name):  # .<stem>.<pid>.<random>.tmp<suffixes>
                    last = Path(f"x{m['suffix']}").suffix  # "a.tar.gz": stem a.tar, .tar.gz
                    remove_stale_temporaries(Path(parent) / f"{m['stem']}{last}")
                elif (m := _SWAPPED.fullmatch(name)) and name in dirs:
                    remove_stale_temporaries(Path(parent) / m["name"])
            # not into temporaries, nor below a shallow folder
            dirs[:] = [] if folder in shallow else [d for d in dirs if not d.startswith(".")]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block succeeds.

    Works for files and folders, so a failed or killed stage never leaves a half-written output
    and the previous output stays in place until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    remove_stale_temporaries(path)
    # the writer's pid in the name: a later run can tell a killed writer's leftover from a
    # temporary that a running one is still filling
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.stem}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        elif path.is_dir() or (tmp.is_dir() and path.exists()):
            # a folder where a file goes (or the reverse) is someone's data: never removed
            found, wrote = ("a folder", "file") if path.is_dir() else ("a file", "folder")
            raise PipelineError(
                f"{path}: {found} is in the way of the {wrote} to write there; move it away "
                "(or choose another path) and run again"
            )
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def json_safe(obj: Any) -> Any:
    """NaN and infinities become null: strict JSON parsers (and dashboards) reject a bare NaN,
    which is what json.dumps writes for an undefined metric."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def read_json(path: Path, what: str = "file") -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: {what} not found (run the earlier stages first)") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


# a worker process starts (spawned, importing numpy and PIL) in about the time it takes to
# prepare this many images: with fewer per core, extra workers only cost
IMAGES_PER_WORKER = 32


def preprocess_workers(requested: int, jobs: int) -> int:
    """Processes for `jobs` images: `requested`, or (0) one per core this process may run on,
    with at least IMAGES_PER_WORKER images each; never more than the images."""
    if requested:
        return max(1, min(requested, jobs))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, jobs // IMAGES_PER_WORKER))
