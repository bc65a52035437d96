"""Servers a team runs, for the end-to-end tests: a private PostgreSQL cluster and an S3 API
server (moto; bench.servers starts it, as it starts `mlflow server`). Both skip the calling
test, saying why, where they cannot start (`.ci/run` installs Debian's
PostgreSQL when it can; moto comes with the dev dependencies)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from bench.servers import free_port, s3_server


def postgres_bin() -> Path | None:
    """The folder of initdb / pg_ctl: Debian keeps them in /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def _run(cmd: list, what: str) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        first = (proc.stderr or proc.stdout).strip().splitlines()
        pytest.skip(f"PostgreSQL could not {what}: {first[-1] if first else proc.returncode}")


@contextlib.contextmanager
def postgres(databases: list[str]) -> Iterator[str]:
    """A private cluster on 127.0.0.1:<free port> with `databases`; yields its URI prefix
    postgresql://mlflow@127.0.0.1:<port>/ and removes everything afterwards."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="pg-mlflow-"))  # /tmp: reachable by the postgres user
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the cluster runs as Debian's postgres account
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` account to own the cluster")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    started = False
    try:
        _run([*as_user, bin_dir / "initdb", "-D", data, "-U", "mlflow", "-A", "trust"], "init")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        start = [*as_user, bin_dir / "pg_ctl", "-D", data, "-l", root / "log", "-o", options]
        _run([*start, "-w", "start"], "start")
        started = True
        for db in databases:
            _run([*as_user, bin_dir / "createdb", "-h", root, "-p", port, "-U", "mlflow", db], db)
        yield f"postgresql://mlflow@127.0.0.1:{port}/"
    finally:
        if started:
            stop = [*as_user, bin_dir / "pg_ctl", "-D", data, "-m", "fast", "stop"]
            subprocess.run([str(c) for c in stop], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def s3(buckets: Sequence[str], port: int | None = None) -> Iterator[str]:
    """bench.servers.s3_server, skipping the test (with moto's reason) where it cannot start."""
    with contextlib.ExitStack() as stack:
        try:
            endpoint = stack.enter_context(s3_server(buckets, port))
        except (RuntimeError, TimeoutError, OSError, ImportError) as exc:  # no moto, no boto3
            pytest.skip(f"the S3 API server (moto) could not start: {str(exc).splitlines()[0]}")
        yield endpoint
