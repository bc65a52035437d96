"""Local servers for the tests and the benchmarks: a real `mlflow server` on a store, and
`mlflow models serve` of a registered model, each on a free 127.0.0.1 port in its own process
group, yielded once it answers and always terminated (the whole group) afterwards.

    with mlflow_server(f"sqlite:///{db}", tmp_path / "mlartifacts") as base_url: ...
    with model_server("models:/unet-family-synthetic@champion", tracking_uri) as base_url: ...

Failures raise with the server's command and the tail of its output. Used by tests/browser.py
(the UI and REST tests) and bench/serve_latency.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

# the servers are on 127.0.0.1: never send their requests through an HTTP(S)_PROXY from the env
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mlflow_executable() -> str:
    exe = Path(sys.executable).parent / "mlflow"
    if exe.is_file():
        return str(exe)
    found = shutil.which("mlflow")
    if found is None:
        raise RuntimeError(f"no mlflow executable next to {sys.executable} or on PATH")
    return found


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def _server_env() -> dict[str, str]:
    # No MLFLOW_* from the caller (a tracking URI there would be irrelevant or confusing),
    # no telemetry (offline), and no job-execution runner (a second process tree and a temp
    # dir under /dev/shm that the UI tests do not need). The venv's bin/ first on PATH: the
    # CLI execs `uvicorn` by name, which a venv python run without activation would not find.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)]),
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole process group (mlflow CLI + uvicorn), SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    # uvicorn workers may outlive the CLI process that led the group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def mlflow_server(
    store_uri: str,
    artifacts_dir: Path,
    timeout: float = 90.0,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run `mlflow server` on `store_uri` (e.g. sqlite:////abs/mlflow.db); yield its base URL.

    New experiments created through the server store their artifacts under `artifacts_dir`
    (a file URI, like the pipeline's own experiments); proxied `mlflow-artifacts:/` URIs
    resolve there too. The server binds 127.0.0.1 on a free port with one worker;
    `extra_args` go to `mlflow server` as they are, `env` into its environment. Raises with
    the server's output if it exits or does not answer GET /health within `timeout` seconds.
    """
    artifacts_dir = Path(artifacts_dir).resolve()
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [
        _mlflow_executable(),
        "server",
        "--backend-store-uri",
        store_uri,
        "--default-artifact-root",
        artifacts_dir.as_uri(),
        "--artifacts-destination",
        artifacts_dir.as_uri(),
        *_local(port),
        *extra_args,
    ]
    with _serving(cmd, f"{base_url}/health", timeout, **(env or {})):
        yield base_url


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, timeout: float = 180.0) -> Iterator[str]:
    """Run `mlflow models serve -m <model_uri> --env-manager local` against the store at
    `tracking_uri` on a free 127.0.0.1 port; yield its base URL once GET /ping answers."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [
        _mlflow_executable(),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        *_local(port),
    ]
    with _serving(cmd, f"{base_url}/ping", timeout, MLFLOW_TRACKING_URI=tracking_uri):
        yield base_url


def _local(port: int) -> list[str]:
    """Bind 127.0.0.1 only, on `port`, with one worker."""
    return ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


@contextlib.contextmanager
def _serving(cmd: list[str], ready_url: str, timeout: float, **env: str) -> Iterator[None]:
    """Start `cmd` in its own process group, wait until `ready_url` answers 200, stop it after.
    Raises with the server's output if it exits or does not answer within `timeout` s."""
    with tempfile.TemporaryDirectory(prefix="mlflow-server-") as logs:
        log = Path(logs) / "server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_server_env() | env,
                cwd=logs,  # nothing (./mlruns, ./mlartifacts) lands in the caller's cwd
                start_new_session=True,  # its own process group, killed as a whole
            )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{' '.join(cmd[1:3])} exited with {proc.returncode} before "
                        f"answering:\n{' '.join(cmd)}\n{_tail(log)}"
                    )
                try:
                    with OPENER.open(ready_url, timeout=2) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{ready_url} did not answer within {timeout:.0f} s:"
                        f"\n{' '.join(cmd)}\n{_tail(log)}"
                    )
                time.sleep(0.25)
            yield
        finally:
            _stop(proc)
