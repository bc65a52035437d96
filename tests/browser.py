"""Browser-level test support: a real `mlflow server`, its REST API, and headless Chromium.

Used by tests/e2e/test_browser.py and by end-to-end tests that look at a real pipeline store:

    with mlflow_server(f"sqlite:///{db}", tmp_path / "mlartifacts") as base_url:
        experiment = rest(base_url, "experiments/get-by-name", {"experiment_name": "x"})
        if chromium():
            ui = f"{base_url}/#/experiments/{eid}/runs?workflowType=machine_learning"
            dom = snapshot(ui, png, 1280, 800)  # the DOM at the moment of the shot
            pixels = check_png(png, 1280, 800)
            assert "3 matching runs" in page_text(dom)

MLflow 3.17 UI routes: /#/experiments/<id> opens the GenAI "Overview" tab; the runs table
is /#/experiments/<id>/runs, one run /#/experiments/<id>/runs/<run_id>; the query
?workflowType=machine_learning picks the "Model training" navigation instead of "GenAI".

Everything runs offline on 127.0.0.1; the server's process group is always terminated.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from html import unescape
from pathlib import Path

import numpy as np

API = "api/2.0/mlflow"
# the server is on 127.0.0.1: never send its requests through an HTTP(S)_PROXY from the env
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


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
    # dir under /dev/shm that the UI tests do not need).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
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
                    with _OPENER.open(ready_url, timeout=2) as response:
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


def rest(
    base_url: str,
    endpoint: str,
    payload: dict | None = None,
    method: str | None = None,
    timeout: float = 30.0,
):
    """Call MLflow's REST API under /api/2.0/mlflow/ and return the decoded JSON.

    Without `method`: GET (payload as query string) for endpoints whose last part starts with
    get/list (experiments/get-by-name, runs/get, metrics/get-history, artifacts/list) or with
    no payload, else POST the payload as JSON (runs/search, experiments/search). An HTTP
    error raises AssertionError with MLflow's error body.

    rest(url, "experiments/get-by-name", {"experiment_name": "unet-pipeline"})
    rest(url, "runs/search", {"experiment_ids": ["1"], "max_results": 100})
    """
    url = f"{base_url.rstrip('/')}/{API}/{endpoint.lstrip('/')}"
    name = endpoint.rstrip("/").rsplit("/", 1)[-1]
    if method is None:
        method = "GET" if payload is None or name.startswith(("get", "list")) else "POST"
    get = method.upper() == "GET"
    if get:
        if payload:
            url = f"{url}?{urllib.parse.urlencode(payload, doseq=True)}"
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
    else:
        request = urllib.request.Request(
            url,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            method=method.upper(),
        )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        raise AssertionError(f"{request.method} {url} -> HTTP {err.code}: {body}") from err


def chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium_cmd(
    url_or_path: str | Path, width: int, height: int, wait_ms: int
) -> tuple[list[str], str]:
    exe = chromium()
    if exe is None:
        raise RuntimeError("Chromium not installed (apt-get install chromium)")
    target = str(url_or_path)
    if "://" not in target:
        target = Path(target).resolve().as_uri()
    return [
        exe,
        "--headless",
        "--no-sandbox",  # root in containers/CI
        "--disable-gpu",
        "--no-proxy-server",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--mute-audio",
        "--force-device-scale-factor=1",
        "--run-all-compositor-stages-before-draw",
        f"--window-size={width},{height}",
        f"--virtual-time-budget={wait_ms}",
    ], target


def _run_chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = subprocess.Popen(
            [*args[:1], f"--user-data-dir={profile}", *args[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise TimeoutError(
                f"Chromium ran past {timeout:.0f} s:\n{stderr.decode(errors='replace')[-4000:]}"
            ) from None
        finally:
            with contextlib.suppress(ProcessLookupError):  # renderer/GPU helpers
                os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _capture(
    url_or_path: str | Path,
    out_png: Path | None,
    width: int,
    height: int,
    wait_ms: int,
    timeout: float,
) -> str:
    """One Chromium run: the screenshot (if `out_png`) and the DOM, both after `wait_ms`."""
    cmd, target = _chromium_cmd(url_or_path, width, height, wait_ms)
    if out_png is not None:
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.unlink(missing_ok=True)
        cmd.append(f"--screenshot={out_png}")
    proc = _run_chromium([*cmd, "--dump-dom", target], timeout)
    html = proc.stdout.decode(errors="replace")
    shot_ok = out_png is None or (out_png.is_file() and out_png.stat().st_size > 0)
    if proc.returncode != 0 or not shot_ok or not html.strip():
        raise RuntimeError(
            f"Chromium on {target} failed (exit {proc.returncode}"
            f"{'' if shot_ok else ', no screenshot'}{'' if html.strip() else ', no DOM'}):\n"
            f"{proc.stderr.decode(errors='replace')[-4000:]}"
        )
    return html


def snapshot(
    url_or_path: str | Path,
    out_png: str | Path,
    width: int = 1280,
    height: int = 800,
    wait_ms: int = 15_000,
    timeout: float = 120.0,
) -> str:
    """Screenshot a URL or local HTML file with headless Chromium and return its DOM.

    `wait_ms` is Chromium's virtual time budget: the page's timers and network requests run
    until that much virtual time has passed (it advances only while no request is pending,
    and faster than the wall clock when the page is idle), so a React app such as MLflow's UI
    has fetched its data and rendered before the shot. The returned HTML is the DOM at the
    same moment (`--dump-dom`), for asserting what the picture shows.
    """
    return _capture(url_or_path, Path(out_png).resolve(), width, height, wait_ms, timeout)


def page_text(html: str) -> str:
    """The visible-ish text of an HTML dump: tags, scripts and styles dropped, spaces squeezed."""
    html = re.sub(r"(?is)<(script|style|svg)\b.*?</\1>", " ", html)
    text = re.sub(r"<[^>]+>", " ", html)
    return re.sub(r"\s+", " ", unescape(text)).strip()


def check_png(
    path: str | Path, width: int, height: int, min_colors: int = 16, min_std: float = 5.0
) -> np.ndarray:
    """Assert `path` is a `width` x `height` PNG that is not blank; return it as HxWx3 uint8.

    Not blank: at least `min_colors` distinct colours and a pixel standard deviation of at
    least `min_std` (a white page with one line of text passes; a spinner on white does not
    necessarily fail, so callers assert more where they can, e.g. with dump_dom).
    """
    from PIL import Image

    path = Path(path)
    assert path.is_file(), f"no screenshot at {path}"
    with Image.open(path) as image:
        assert image.format == "PNG", f"{path} is {image.format}, not PNG"
        assert image.size == (width, height), f"{path} is {image.size}, not {(width, height)}"
        pixels = np.asarray(image.convert("RGB"))
    colors = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colors) >= min_colors, f"{path} has only {len(colors)} colours: blank?"
    std = float(pixels.std())
    assert std >= min_std, f"{path} pixel std {std:.2f} < {min_std}: blank?"
    return pixels
