"""Getting a dataset source onto disk, as a spec: checksums, streamed URL downloads (from a local
HTTP server, no internet), safe archive extraction, and the download stage for URL, archive and
folder sources. Tiny fake datasets built in tmp_path."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import socket
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.archives import (
    archive_kind,
    fetch_url,
    find_root,
    is_url,
    safe_extract,
    sha256_file,
    url_filename,
    verify_sha256,
)
from pipeline.common import PipelineError, run_cli
from pipeline.config import Params, parse_params
from pipeline.download import download, main

WRONG_SHA = "0" * 64

# DRIVE's layout, one training and one test image (16x16: only the download is tested here)
DRIVE_FILES = (
    "training/images/21_training.tif",
    "training/1st_manual/21_manual1.gif",
    "training/mask/21_training_mask.gif",
    "test/images/01_test.tif",
    "test/1st_manual/01_manual1.gif",
    "test/2nd_manual/01_manual2.gif",
    "test/mask/01_test_mask.gif",
)


# --- helpers --------------------------------------------------------------------------------


def make_drive_tree(root: Path) -> Path:
    """A tiny DRIVE/ folder under `root`; returns it."""
    drive = root / "DRIVE"
    for i, rel in enumerate(DRIVE_FILES):
        path = drive / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".tif":
            Image.new("RGB", (16, 16), (30 * i, 100, 200)).save(path)
        else:
            Image.new("L", (16, 16), 30 * i).save(path)
    return drive


def zip_dir(folder: Path, archive: Path) -> Path:
    """Zip `folder` with its name as the top-level member folder (DRIVE.zip holds DRIVE/...)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return archive


def tar_dir(folder: Path, archive: Path) -> Path:
    """Like zip_dir; gzip-compressed when the name ends in .gz."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz" if archive.name.endswith(".gz") else "w") as tf:
        tf.add(folder, arcname=folder.name)
    return archive


def zip_members(archive: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return archive


def tar_member(name: str, data: bytes = b"", **attrs) -> tuple[tarfile.TarInfo, bytes]:
    """A crafted tar member: a file by default, e.g. type=tarfile.SYMTYPE, linkname=... ."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def tar_members(archive: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(archive, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return archive


def snapshot(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def drive_params(source: str, sha256: str = "") -> Params:
    return parse_params({"dataset": {"name": "drive", "source": source, "sha256": sha256}})


def error_of(call: Callable[[], object]) -> str:
    """The one-line PipelineError message `call` raises (fails if none is raised)."""
    with pytest.raises(PipelineError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(project: Path) -> list[str]:
    """What lies in data/ besides raw/ and downloads/ (temporary folders, if any)."""
    return sorted(p.name for p in (project / "data").iterdir() if p.name not in {"raw", "downloads"})


# --- fixtures -------------------------------------------------------------------------------


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[..., BaseHTTPRequestHandler]], ThreadingHTTPServer]]:
    """serve(handler) starts an HTTP server on 127.0.0.1 (a daemon thread) and returns it;
    every server is stopped after the test."""
    servers: list[ThreadingHTTPServer] = []

    def start(handler) -> ThreadingHTTPServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return httpd

    yield start
    for httpd in servers:
        httpd.shutdown()  # a no-op for a server already stopped
        httpd.server_close()


def url_of(httpd: ThreadingHTTPServer, path: str = "") -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}/{path}"


@dataclass
class Www:
    folder: Path
    httpd: ThreadingHTTPServer

    def url(self, name: str) -> str:
        return url_of(self.httpd, name)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def www(tmp_path, serve) -> Www:
    """A web server for the files in tmp_path/www."""
    folder = tmp_path / "www"
    folder.mkdir(exist_ok=True)
    return Www(folder, serve(functools.partial(QuietFiles, directory=str(folder))))


@pytest.fixture
def drive_zip(tmp_path) -> Path:
    """tmp_path/www/DRIVE.zip, holding DRIVE/training/... and DRIVE/test/..."""
    return zip_dir(make_drive_tree(tmp_path / "src"), tmp_path / "www" / "DRIVE.zip")


@pytest.fixture
def earlier_raw(project, tmp_path) -> dict[str, bytes]:
    """A successful earlier download from a local archive; returns data/raw's snapshot."""
    archive = zip_dir(make_drive_tree(tmp_path / "earlier"), tmp_path / "earlier" / "DRIVE.zip")
    download(drive_params(str(archive)))
    return snapshot(project / "data" / "raw")
