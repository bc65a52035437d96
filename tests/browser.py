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

Everything runs offline on 127.0.0.1; the servers (bench/servers.py, shared with the
benchmarks) are always terminated with their whole process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from html import unescape
from pathlib import Path

import numpy as np

from bench.servers import OPENER, free_port, mlflow_server, model_server

__all__ = [
    "API",
    "check_png",
    "chromium",
    "free_port",
    "mlflow_server",
    "model_server",
    "page_text",
    "rest",
    "snapshot",
]

API = "api/2.0/mlflow"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


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
        with OPENER.open(request, timeout=timeout) as response:
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
