"""Local servers for the tests and the benchmarks: a real `mlflow server` on a store,
`mlflow models serve` of a registered model, and an S3 API server (moto's server mode), each on
a free 127.0.0.1 port in its own process group, yielded once it answers and always terminated
(the whole group) afterwards.

    with mlflow_server(f"sqlite:///{db}", tmp_path / "mlartifacts") as base_url: ...
    with model_server("models:/unet-family-synthetic@champion", tracking_uri) as base_url: ...
    with s3_server(["bucket"]) as endpoint: ...  # http://127.0.0.1:<port>; keys in S3_ENV

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


ADMIN, PASSWORD = "admin", "pipeline-admin-1234"  # basic auth's first admin (auth.ini)


@contextlib.contextmanager
def mlflow_server(
    store_uri: str,
    artifacts: Path | str,
    timeout: float = 90.0,
    env: dict[str, str] | None = None,
    auth_db: str | None = None,
) -> Iterator[str]:
    """Run `mlflow server` on `store_uri` (e.g. sqlite:////abs/mlflow.db); yield its base URL.

    New experiments created through the server store their artifacts under `artifacts`: a
    folder (a file URI, like the pipeline's own experiments), or a URI such as s3://bucket/path
    that clients reach only through the server (`mlflow-artifacts:/`; the server alone needs
    the bucket's credentials, in `env`). With `auth_db` (a database URI for the users) the
    server runs MLflow's basic auth (`--app-name basic-auth`), ADMIN / PASSWORD its first
    admin. The server binds 127.0.0.1 on a free port with one worker; `env` goes into its
    environment. Raises with the server's output if it exits or does not answer GET /health
    within `timeout` seconds.
    """
    root: list[str] = []
    if isinstance(artifacts, Path):
        artifacts.mkdir(parents=True, exist_ok=True)
        artifacts = artifacts.resolve().as_uri()
        root = ["--default-artifact-root", artifacts]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [
        _mlflow_executable(),
        "server",
        "--backend-store-uri",
        store_uri,
        *root,
        "--artifacts-destination",
        artifacts,
        *_local(port),
    ]
    env = dict(env or {})
    with tempfile.TemporaryDirectory(prefix="mlflow-auth-") as config_dir:
        if auth_db is not None:
            config = Path(config_dir) / "auth.ini"
            config.write_text(
                "[mlflow]\n"
                "default_permission = READ\n"
                f"database_uri = {auth_db}\n"
                f"admin_username = {ADMIN}\n"
                f"admin_password = {PASSWORD}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            )
            env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_FLASK_SERVER_SECRET_KEY="test-only"
            )
            cmd += ["--app-name", "basic-auth"]
        with _serving(cmd, f"{base_url}/health", timeout, **env):
            yield base_url


@contextlib.contextmanager
def model_server(
    model_uri: str, tracking_uri: str, timeout: float = 180.0, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run `mlflow models serve -m <model_uri> --env-manager local` against the store at
    `tracking_uri` on a free 127.0.0.1 port; yield its base URL once GET /ping answers.
    `env` goes into its environment (e.g. a server's MLFLOW_TRACKING_USERNAME/PASSWORD)."""
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
    extra = {**(env or {}), "MLFLOW_TRACKING_URI": tracking_uri}
    with _serving(cmd, f"{base_url}/ping", timeout, **extra):
        yield base_url


# moto accepts any key; boto3, DVC's s3fs and MLflow's artifact store read these
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_server(
    buckets: Sequence[str] = (), port: int | None = None, timeout: float = 60.0
) -> Iterator[str]:
    """An S3 API server (moto's `moto_server`, all in memory) on 127.0.0.1:`port` (a free one
    by default) with `buckets` created; yields its endpoint URL. Clients need S3_ENV's keys."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.is_file():
        raise RuntimeError(f"no moto_server next to {sys.executable}: install moto[server]")
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [str(exe), "-H", "127.0.0.1", "-p", str(port)]
    with _serving(cmd, f"{endpoint}/moto-api/data.json", timeout, **S3_ENV):
        for bucket in buckets:
            _s3_client(endpoint).create_bucket(Bucket=bucket)
        yield endpoint


def _s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
    )


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every object key in `bucket` under `prefix` on the server at `endpoint`."""
    pages = _s3_client(endpoint).get_paginator("list_objects_v2")
    return [
        obj["Key"]
        for page in pages.paginate(Bucket=bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
    ]


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
