"""Getting a dataset source onto disk, as a spec: checksums, streamed URL downloads (from a local
HTTP server, no internet), safe archive extraction, and the download stage for URL, archive and
folder sources. Tiny fake datasets built in tmp_path."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from pipeline.core.common import PipelineError, run_cli
from pipeline.core.config import Params, parse_params
from pipeline.data import archives
from pipeline.data.archives import (
    archive_kind,
    fetch_url,
    find_root,
    is_url,
    safe_extract,
    sha256_file,
    url_filename,
    verify_sha256,
)
from pipeline.stages.download import download, main

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
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def drive_params(source: str, sha256: str = "", **dataset) -> Params:
    return parse_params(
        {"dataset": {"name": "drive", "source": source, "sha256": sha256, **dataset}}
    )


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
    return sorted(
        p.name for p in (project / "data").iterdir() if p.name not in {"raw", "downloads"}
    )


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
        # a short poll interval: shutdown() returns at once instead of after 0.5 s
        serve_forever = functools.partial(httpd.serve_forever, poll_interval=0.01)
        threading.Thread(target=serve_forever, daemon=True).start()
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
    """A successful earlier download from a local archive; returns data/raw's snapshot. It
    holds one more file than make_drive_tree's, so a replaced data/raw would show."""
    drive = make_drive_tree(tmp_path / "earlier")
    (drive / "earlier.txt").write_text("from the earlier download\n")
    archive = zip_dir(drive, tmp_path / "earlier" / "DRIVE.zip")
    download(drive_params(str(archive)))
    return snapshot(project / "data" / "raw")


# --- small helpers: URLs, names, checksums --------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("http://host/DRIVE.zip", True),
        ("https://host/DRIVE.zip", True),
        ("ftp://host/DRIVE.zip", False),
        ("/data/DRIVE.zip", False),
        ("inputs/DRIVE.zip", False),
        ("C:\\data\\DRIVE.zip", False),
    ],
)
def test_is_url_means_http_or_https(source, expected):
    assert is_url(source) is expected


def test_url_filename_drops_the_query_and_falls_back_to_download():
    assert url_filename("https://host/records/1/files/DRIVE.zip?download=1") == "DRIVE.zip"
    assert url_filename("https://host/") == "download"


def test_archive_kind_by_name_then_by_content(tmp_path, drive_zip):
    assert archive_kind(Path("x.ZIP")) == "zip"
    for name in ("x.tar", "x.tar.gz", "x.tgz", "x.tar.bz2", "x.tar.xz"):
        assert archive_kind(Path(name)) == "tar"
    blob = tmp_path / "blob"
    blob.write_bytes(drive_zip.read_bytes())
    assert archive_kind(blob) == "zip"
    tar_dir(make_drive_tree(tmp_path / "t"), tmp_path / "t.tar.gz").rename(blob)
    assert archive_kind(blob) == "tar"
    blob.write_text("hello")
    assert archive_kind(blob) is None


def test_verify_sha256_returns_the_hash_and_ignores_case(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(path) == digest
    assert verify_sha256(path, "") == digest
    assert verify_sha256(path, digest.upper()) == digest


def test_verify_sha256_mismatch_names_the_file_and_both_hashes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    message = error_of(lambda: verify_sha256(path, WRONG_SHA))
    assert str(path) in message and WRONG_SHA in message and sha256_file(path) in message


# --- fetch_url ------------------------------------------------------------------------------


def test_fetch_url_streams_into_dest_and_leaves_no_part_file(tmp_path, www, drive_zip):
    dest = fetch_url(www.url("DRIVE.zip"), tmp_path / "dl", sha256_file(drive_zip))
    assert dest == tmp_path / "dl" / "DRIVE.zip"
    assert dest.read_bytes() == drive_zip.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["DRIVE.zip"]


def test_fetch_url_reuses_a_verified_download_without_the_network(tmp_path, www, drive_zip):
    sha = sha256_file(drive_zip)
    fetch_url(www.url("DRIVE.zip"), tmp_path / "dl", sha)
    www.stop()
    dest = fetch_url(www.url("DRIVE.zip"), tmp_path / "dl", sha, timeout=2)
    assert dest.read_bytes() == drive_zip.read_bytes()


def test_fetch_url_replaces_an_earlier_download_that_does_not_verify(tmp_path, www, drive_zip):
    stale = tmp_path / "dl" / "DRIVE.zip"
    stale.parent.mkdir()
    stale.write_bytes(b"half a zip")
    dest = fetch_url(www.url("DRIVE.zip"), tmp_path / "dl", sha256_file(drive_zip))
    assert dest.read_bytes() == drive_zip.read_bytes()


def test_checksum_mismatch_deletes_the_partial_download_and_names_both_hashes(
    tmp_path, www, drive_zip
):
    url = www.url("DRIVE.zip")
    message = error_of(lambda: fetch_url(url, tmp_path / "dl", WRONG_SHA))
    assert url in message and WRONG_SHA in message and sha256_file(drive_zip) in message
    assert list((tmp_path / "dl").iterdir()) == []


def test_http_404_is_one_line_naming_the_url(tmp_path, www):
    url = www.url("missing.zip")
    message = error_of(lambda: fetch_url(url, tmp_path / "dl", timeout=2))
    assert url in message and "404" in message
    assert list((tmp_path / "dl").iterdir()) == []


def test_unreachable_url_says_how_to_pass_a_local_archive(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/DRIVE.zip"
    message = error_of(lambda: fetch_url(url, tmp_path / "dl", timeout=2))
    assert url in message and "unreachable" in message
    assert "dataset.source=/path/to/DRIVE.zip" in message


def test_a_server_that_never_answers_times_out_as_unreachable(tmp_path):
    with socket.socket() as listener:  # accepts connections (backlog) but never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/DRIVE.zip"
        message = error_of(lambda: fetch_url(url, tmp_path / "dl", timeout=0.3))
    assert url in message and "unreachable" in message
    assert list((tmp_path / "dl").iterdir()) == []


class ShortBody(BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends 10, closes the connection."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)

    def log_message(self, format, *args):
        pass


def test_a_truncated_download_is_refused_and_deleted(tmp_path, serve):
    url = url_of(serve(ShortBody), "DRIVE.zip")
    message = error_of(lambda: fetch_url(url, tmp_path / "dl", timeout=2))
    assert url in message and "truncated (10 of 1000 bytes)" in message
    assert list((tmp_path / "dl").iterdir()) == []


class Trickle(BaseHTTPRequestHandler):
    """A server that sends a byte every 50 ms forever: each read beats the socket timeout."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(10**9))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gives up
            for _ in range(2000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)

    def log_message(self, format, *args):
        pass


def test_a_trickling_download_stops_as_stalled_and_leaves_no_part_file(
    tmp_path, serve, monkeypatch
):
    from pipeline.data import archives

    monkeypatch.setattr(archives, "STALL_SECONDS", 1.0)
    monkeypatch.setattr(archives, "STALL_BYTES", 1000)
    url = url_of(serve(Trickle), "DRIVE.zip")
    start = time.monotonic()
    message = error_of(lambda: fetch_url(url, tmp_path / "dl", timeout=5))
    assert time.monotonic() - start < 10, "the stall rule, not the socket timeout, stops it"
    assert message.startswith(f"{url}: download stalled (") and "dataset.source=" in message
    assert list((tmp_path / "dl").iterdir()) == []


def test_a_download_logs_progress_lines_when_no_terminal_shows_the_bar(
    tmp_path, www, drive_zip, monkeypatch, caplog
):
    from pipeline.data import archives

    monkeypatch.setattr(archives, "PROGRESS_SECONDS", 0.0)  # a line per chunk read
    with caplog.at_level(logging.INFO, logger="pipeline.data.archives"):
        fetch_url(www.url("DRIVE.zip"), tmp_path / "dl")  # pytest's stderr is no terminal
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloaded ")]
    size = drive_zip.stat().st_size / 1e6
    assert any(f"of {size:.1f} MB (" in line and "MB/s)" in line for line in lines), lines


class BrokenChunks(BaseHTTPRequestHandler):
    """A chunked response cut off after its first chunk."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"10\r\n0123456789abcdef\r\n")
        self.close_connection = True

    def log_message(self, format, *args):
        pass


class NotHttp(BaseHTTPRequestHandler):
    """Some other service on the port: answers with a banner, not an HTTP status line."""

    def do_GET(self):
        self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")

    def log_message(self, format, *args):
        pass


@pytest.mark.parametrize("handler", [BrokenChunks, NotHttp], ids=["cut-chunked", "not-http"])
def test_a_broken_http_response_is_one_line_naming_the_url(tmp_path, serve, handler):
    url = url_of(serve(handler), "DRIVE.zip")
    message = error_of(lambda: fetch_url(url, tmp_path / "dl", timeout=2))
    assert url in message
    assert list((tmp_path / "dl").iterdir()) == []


# --- download() from a URL ------------------------------------------------------------------


def test_download_from_a_url_extracts_drive_and_keeps_the_verified_zip(project, www, drive_zip):
    sha = sha256_file(drive_zip)
    url = www.url("DRIVE.zip")
    target = download(drive_params(url, sha))

    raw = project / "data" / "raw" / "drive"
    assert target == raw
    assert (raw / "training" / "images" / "21_training.tif").is_file()
    assert snapshot(raw).keys() == {*DRIVE_FILES, "source.json"}
    downloads = project / "data" / "downloads" / "drive"
    assert sorted(p.name for p in downloads.iterdir()) == ["DRIVE.zip"]  # no .DRIVE.zip.part
    assert (downloads / "DRIVE.zip").read_bytes() == drive_zip.read_bytes()
    source = json.loads((raw / "source.json").read_text())
    assert source == {
        "dataset": "drive",
        "source": url,
        "sha256": sha,
        "root": "DRIVE",  # where the layout sat inside the archive
        "files": len(DRIVE_FILES),
    }
    assert sorted(p.name for p in (project / "data" / "raw").iterdir()) == ["drive"]
    assert leftovers(project) == []


def test_download_again_offline_reuses_the_verified_zip(project, www, drive_zip):
    params = drive_params(www.url("DRIVE.zip"), sha256_file(drive_zip))
    download(params)
    first = snapshot(project / "data" / "raw")
    www.stop()
    download(params)
    assert snapshot(project / "data" / "raw") == first


def test_url_checksum_mismatch_keeps_the_earlier_raw_and_no_download(
    project, www, drive_zip, earlier_raw
):
    url = www.url("DRIVE.zip")
    message = error_of(lambda: download(drive_params(url, WRONG_SHA)))
    assert url in message and WRONG_SHA in message and sha256_file(drive_zip) in message
    assert list((project / "data" / "downloads" / "drive").iterdir()) == []
    assert snapshot(project / "data" / "raw") == earlier_raw
    assert leftovers(project) == []


# --- download() from a local archive --------------------------------------------------------


@pytest.mark.parametrize("name", ["DRIVE.zip", "DRIVE.tar", "DRIVE.tar.gz", "DRIVE.tgz"])
def test_download_from_a_local_archive_records_its_sha256(project, tmp_path, name):
    drive = make_drive_tree(tmp_path / "src")
    pack = zip_dir if name.endswith(".zip") else tar_dir
    archive = pack(drive, tmp_path / "archives" / name)
    download(drive_params(str(archive)))
    raw = project / "data" / "raw" / "drive"
    assert {k: v for k, v in snapshot(raw).items() if k != "source.json"} == snapshot(drive)
    source = json.loads((raw / "source.json").read_text())
    assert source["sha256"] == sha256_file(archive)  # recorded even when none was given
    assert source["source"] == str(archive)


def test_local_archive_checksum_mismatch_names_the_archive_and_keeps_the_earlier_raw(
    project, drive_zip, earlier_raw
):
    message = error_of(lambda: download(drive_params(str(drive_zip), WRONG_SHA)))
    assert str(drive_zip) in message
    assert WRONG_SHA in message and sha256_file(drive_zip) in message
    assert snapshot(project / "data" / "raw") == earlier_raw
    assert leftovers(project) == []


def test_local_archive_checksum_is_accepted_in_upper_case(project, drive_zip):
    download(drive_params(str(drive_zip), sha256_file(drive_zip).upper()))
    assert (project / "data" / "raw" / "drive" / "training" / "images").is_dir()


def truncate(archive: Path) -> Path:
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return archive


def flip_member_byte(archive: Path) -> Path:
    """A stored zip whose member data is damaged (the CRC check must catch it)."""
    zip_members(archive, {"DRIVE/training/images/21_training.tif": b"PAYLOAD" * 50})
    archive.write_bytes(archive.read_bytes().replace(b"PAYLOADPAYLOAD", b"PAYLOADPAYLOAX", 1))
    return archive


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("DRIVE.zip", truncate),
        ("DRIVE.tar.gz", truncate),
        ("DRIVE.tgz", truncate),
        ("DRIVE.zip", flip_member_byte),
    ],
    ids=["zip-half", "tar.gz-half", "tgz-half", "zip-bad-crc"],
)
def test_damaged_archive_is_one_line_and_keeps_the_earlier_raw(
    project, tmp_path, earlier_raw, name, damage
):
    drive = make_drive_tree(tmp_path / "src")
    pack = zip_dir if name.endswith(".zip") else tar_dir
    archive = damage(pack(drive, tmp_path / "damaged" / name))
    message = error_of(lambda: download(drive_params(str(archive))))
    assert message.startswith(f"{archive}: truncated or corrupt archive")
    assert snapshot(project / "data" / "raw") == earlier_raw
    assert leftovers(project) == []


def test_plain_tar_cut_at_a_member_boundary_is_refused_as_truncated(project, tmp_path):
    archive = tar_dir(make_drive_tree(tmp_path / "src"), tmp_path / "DRIVE.tar")
    with tarfile.open(archive) as tf:
        last = tf.getmembers()[-1]
    assert last.isfile()
    archive.write_bytes(archive.read_bytes()[: last.offset])  # drop the last member whole
    message = error_of(lambda: download(drive_params(str(archive))))
    assert "truncated or corrupt archive" in message
    assert not (project / "data" / "raw").exists()


# --- safe_extract: members that would escape the target are refused -------------------------

SYMLINK = dict(type=tarfile.SYMTYPE)
HARDLINK = dict(type=tarfile.LNKTYPE)


@pytest.mark.parametrize(
    ("member", "would_be"),
    [
        ("../evil.txt", "evil.txt"),
        ("DRIVE/../../evil.txt", "evil.txt"),
        ("..\\evil.txt", "evil.txt"),
        ("/abs/evil.txt", "/abs/evil.txt"),
        ("C:/evil.txt", None),
    ],
)
def test_zip_member_outside_the_target_is_refused_before_anything_is_written(
    tmp_path, member, would_be
):
    archive = zip_members(tmp_path / "evil.zip", {"DRIVE/ok.txt": b"ok", member: b"evil"})
    target = tmp_path / "out" / "target"
    message = error_of(lambda: safe_extract(archive, target))
    assert str(archive) in message and repr(member) in message
    assert files_under(target) == []  # every member is checked before the first is written
    if would_be:
        assert not (tmp_path / "out" / would_be).exists()


@pytest.mark.parametrize(
    ("member", "would_be"),
    [
        (tar_member("../evil.txt", b"evil"), "evil.txt"),
        (tar_member("/abs/evil.txt", b"evil"), "/abs/evil.txt"),
        (tar_member("DRIVE/passwd", linkname="/etc/passwd", **SYMLINK), None),
        (tar_member("DRIVE/up", linkname="../../outside", **SYMLINK), "outside"),
        (tar_member("DRIVE/passwd", linkname="/etc/passwd", **HARDLINK), None),
        (tar_member("DRIVE/up", linkname="../outside", **HARDLINK), "outside"),
        (tar_member("DRIVE/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        (tar_member("DRIVE/fifo", type=tarfile.FIFOTYPE), None),
    ],
    ids=[
        "dotdot",
        "absolute",
        "symlink-absolute",
        "symlink-dotdot",
        "hardlink-absolute",
        "hardlink-dotdot",
        "char-device",
        "fifo",
    ],
)
def test_tar_member_outside_the_target_or_special_is_refused(tmp_path, member, would_be):
    archive = tar_members(tmp_path / "evil.tar", [tar_member("DRIVE/ok.txt", b"ok"), member])
    target = tmp_path / "out" / "target"
    message = error_of(lambda: safe_extract(archive, target))
    assert str(archive) in message and repr(member[0].name) in message
    assert files_under(target) == []
    if would_be:
        assert not (tmp_path / "out" / would_be).exists()


def test_zip_symlink_member_pointing_outside_is_refused(tmp_path):
    info = zipfile.ZipInfo("DRIVE/up")
    info.external_attr = 0o120777 << 16  # a symlink; its data is the link's target
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("DRIVE/ok.txt", b"ok")
        zf.writestr(info, "../../outside")
    target = tmp_path / "out" / "target"
    message = error_of(lambda: safe_extract(archive, target))
    assert repr("DRIVE/up") in message and "outside the target" in message
    assert files_under(target) == []


def test_tar_symlink_chain_escaping_only_through_an_earlier_link_is_refused(tmp_path):
    """Each link looks inside on its own (a/l1 -> .., a/l1/l2 -> ..), but through the first
    link the second points above the target: the "data" filter catches what the name checks
    cannot."""
    archive = tar_members(
        tmp_path / "chain.tar",
        [
            tar_member("a", type=tarfile.DIRTYPE),
            tar_member("a/l1", linkname="..", **SYMLINK),
            tar_member("a/l1/l2", linkname="..", **SYMLINK),
            tar_member("a/l1/l2/evil.txt", b"evil"),
        ],
    )
    target = tmp_path / "out" / "target"
    message = error_of(lambda: safe_extract(archive, target))
    assert repr("a/l1/l2") in message and "refusing to extract" in message
    assert not (tmp_path / "out" / "evil.txt").exists()
    assert not (tmp_path / "out" / "l2").exists()


def test_escaping_member_in_a_download_names_it_and_keeps_the_earlier_raw(
    project, tmp_path, earlier_raw
):
    drive = make_drive_tree(tmp_path / "src")
    archive = zip_dir(drive, tmp_path / "evil" / "DRIVE.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("../../../evil.txt", b"evil")
    message = error_of(lambda: download(drive_params(str(archive))))
    assert repr("../../../evil.txt") in message
    assert snapshot(project / "data" / "raw") == earlier_raw
    assert leftovers(project) == []
    assert not (project / "evil.txt").exists() and not (project.parent / "evil.txt").exists()


# --- archive bombs: refused before anything is written -------------------------------------

ZEROS = bytes(10 << 20)  # 10 MB of zeros: deflates ~1000:1, over MAX_RATIO above RATIO_MIN_BYTES


def zeros_archive(archive: Path) -> Path:
    """DRIVE's layout plus 10 MB of zeros, deflated (zip) or gzipped (tar.gz): ~30 kB."""
    drive = make_drive_tree(archive.parent / "src")
    (drive / "zeros.bin").write_bytes(ZEROS)
    if archive.name.endswith(".zip"):
        return zip_dir(drive, archive)
    return tar_dir(drive, archive)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("DRIVE.zip", "member 'DRIVE/zeros.bin' unpacks to 10.5 MB from "),
        ("DRIVE.tar.gz", "unpacks to 10.5 MB (up to member 'DRIVE/zeros.bin') from "),
    ],
    ids=["zip", "tar.gz"],
)
def test_a_highly_compressed_member_is_refused_as_an_archive_bomb_and_raw_stays(
    project, tmp_path, earlier_raw, name, says
):
    """The issue's zip bomb, a thousand times smaller: what it declares is refused up front."""
    archive = zeros_archive(tmp_path / "bomb" / name)
    assert archive.stat().st_size < 100_000
    message = error_of(lambda: download(drive_params(str(archive))))
    assert message.startswith(f"{archive}: {says}")
    assert ":1, over 200:1): an archive bomb? refusing to extract; if it is genuine, " in message
    assert message.endswith("unpack it yourself and set dataset.source to the folder")
    assert snapshot(project / "data" / "raw") == earlier_raw
    assert leftovers(project) == []


@pytest.mark.parametrize("name", ["DRIVE.zip", "DRIVE.tar.gz"])
def test_an_archive_unpacking_past_max_unpacked_gb_names_the_param(project, tmp_path, name):
    drive = make_drive_tree(tmp_path / "src")
    (drive / "noise.bin").write_bytes(os.urandom(3000))  # incompressible: no ratio to blame
    archive = (zip_dir if name.endswith(".zip") else tar_dir)(drive, tmp_path / name)
    p = drive_params(str(archive), max_unpacked_gb=2e-6)  # 2000 bytes
    message = error_of(lambda: download(p))
    assert message == (
        f"{archive}: unpacks to more than dataset.max_unpacked_gb (2e-06 GB) by member "
        "'DRIVE/noise.bin'; refusing to extract (an archive bomb?); raise "
        "dataset.max_unpacked_gb if the archive is genuine"
    )
    assert not (project / "data" / "raw").exists() and leftovers(project) == []
    download(drive_params(str(archive), max_unpacked_gb=1e-5))  # 10 kB: it fits
    assert (project / "data" / "raw" / "drive" / "noise.bin").stat().st_size == 3000


def test_many_small_members_are_refused_by_the_whole_archives_ratio(tmp_path):
    """Each member under RATIO_MIN_BYTES, together 16 MB from a few kB."""
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(16):
            zf.writestr(f"DRIVE/{i}.bin", bytes(1 << 20))
    target = tmp_path / "out"
    message = error_of(lambda: safe_extract(archive, target))
    assert (
        message.startswith(f"{archive}: unpacks to 16.8 MB from ") and "an archive bomb?" in message
    )
    assert not target.exists()


def test_a_header_understating_a_member_stops_at_the_declared_size_and_leaves_nothing(tmp_path):
    """A lying header: it declares 1000 bytes of a member that inflates to 1 MB. At most the
    declared bytes are written, then the member is refused and the extraction removed."""
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("DRIVE/ok.txt", b"ok")
        zf.writestr("DRIVE/liar.bin", bytes(1 << 20))
    data = bytearray(archive.read_bytes())
    size = (1 << 20).to_bytes(4, "little")
    assert data.count(size) == 2  # the local header and the central directory
    archive.write_bytes(bytes(data).replace(size, (1000).to_bytes(4, "little")))
    target = tmp_path / "out" / "target"
    message = error_of(lambda: safe_extract(archive, target))
    assert message.startswith(f"{archive}: truncated or corrupt archive (Bad CRC-32")
    assert not (tmp_path / "out").exists()


def test_written_bytes_are_counted_not_trusted_from_the_header(tmp_path, monkeypatch):
    """Whatever the zip reader hands over past a member's declared size is never written."""
    archive = zip_members(tmp_path / "a.zip", {"DRIVE/a.bin": b"x" * 100, "DRIVE/b.bin": b"y"})

    def endless(self, info, *args, **kwargs):
        return io.BytesIO(b"z" * (info.file_size + archives.CHUNK))

    monkeypatch.setattr(zipfile.ZipFile, "open", endless)
    target = tmp_path / "out"
    message = error_of(lambda: safe_extract(archive, target))
    assert message == (
        f"{archive}: member 'DRIVE/a.bin' unpacks to more than the 100 bytes its header "
        "declares (an archive bomb?); refusing to extract"
    )
    assert not target.exists()


def test_a_failure_halfway_removes_what_was_already_extracted(tmp_path):
    archive = zip_members(
        tmp_path / "half.zip", {"DRIVE/a.txt": b"fine", "DRIVE/b.txt": b"PAYLOAD" * 9}
    )
    archive.write_bytes(archive.read_bytes().replace(b"PAYLOADPAYLOAD", b"PAYLOADPAYLOAX", 1))
    target = tmp_path / "out"
    (target / "earlier").mkdir(parents=True)  # what was there stays
    assert "truncated or corrupt archive" in error_of(lambda: safe_extract(archive, target))
    assert files_under(target) == [] and (target / "earlier").is_dir()
    assert sorted(p.name for p in target.iterdir()) == ["earlier"]


def test_an_archive_larger_than_the_free_disk_is_refused_before_writing(tmp_path, monkeypatch):
    archive = zip_members(tmp_path / "big.zip", {"DRIVE/a.bin": bytes(5000)})
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda p: SimpleNamespace(free=4000))
    target = tmp_path / "out"
    message = error_of(lambda: safe_extract(archive, target))
    assert message == (
        f"{archive}: unpacks to 5000 B but {target} has 4000 B free; free some space and run again"
    )
    assert not target.exists()


# --- safe_extract: what is allowed ----------------------------------------------------------


def test_zip_extracts_nested_folders_byte_for_byte(tmp_path, drive_zip):
    safe_extract(drive_zip, tmp_path / "out")
    assert snapshot(tmp_path / "out" / "DRIVE") == snapshot(tmp_path / "src" / "DRIVE")


def test_tar_links_pointing_inside_are_extracted(tmp_path):
    archive = tar_members(
        tmp_path / "links.tar",
        [
            tar_member("DRIVE/a/b/c.txt", b"deep"),
            tar_member("DRIVE/latest", linkname="a/b", **SYMLINK),
            tar_member("DRIVE/a/b/up.txt", linkname="../../latest/c.txt", **SYMLINK),
            tar_member("DRIVE/copy.txt", linkname="DRIVE/a/b/c.txt", **HARDLINK),
        ],
    )
    target = tmp_path / "out"
    safe_extract(archive, target)
    drive = target / "DRIVE"
    assert (drive / "latest").is_symlink() and os.readlink(drive / "latest") == "a/b"
    assert (drive / "latest" / "c.txt").read_bytes() == b"deep"
    assert (drive / "a" / "b" / "up.txt").read_bytes() == b"deep"
    assert (drive / "copy.txt").read_bytes() == b"deep"
    assert not (drive / "copy.txt").is_symlink()


def test_dataset_folder_also_reachable_through_a_symlink_is_taken_as_real_files(project, tmp_path):
    drive = make_drive_tree(tmp_path / "src")
    archive = tar_dir(drive, tmp_path / "DRIVE.tar")
    with tarfile.open(archive, "a") as tf:
        tf.addfile(tar_member("A-latest", linkname="DRIVE", **SYMLINK)[0])
    download(drive_params(str(archive)))
    raw = project / "data" / "raw" / "drive"
    assert not raw.is_symlink()
    assert {k: v for k, v in snapshot(raw).items() if k != "source.json"} == snapshot(drive)


# --- download() from a local folder ---------------------------------------------------------


def test_folder_source_is_copied_not_linked_and_left_untouched(project, tmp_path):
    drive = make_drive_tree(tmp_path / "src")
    linked = drive / "readme.txt"
    linked.write_bytes(b"linked file")
    (drive / "training" / "notes.txt").symlink_to("../readme.txt")  # a link inside the folder
    before = snapshot(drive)

    download(drive_params(str(drive)))
    raw = project / "data" / "raw" / "drive"
    assert not raw.is_symlink()
    assert not any(p.is_symlink() for p in raw.rglob("*"))  # links are followed
    assert {k: v for k, v in snapshot(raw).items() if k != "source.json"} == before
    assert json.loads((raw / "source.json").read_text())["sha256"] == ""

    (raw / "training" / "images" / "21_training.tif").write_bytes(b"changed")
    (raw / "training" / "notes.txt").write_bytes(b"changed")
    assert snapshot(drive) == before
    assert linked.read_bytes() == b"linked file"


def test_folder_source_holding_the_dataset_deeper_down(project, tmp_path):
    make_drive_tree(tmp_path / "src" / "datasets" / "retina")
    download(drive_params(str(tmp_path / "src")))
    raw = project / "data" / "raw" / "drive"
    assert snapshot(raw).keys() == {*DRIVE_FILES, "source.json"}


def test_sha256_with_a_folder_source_is_an_error_naming_dataset_sha256(project, tmp_path):
    drive = make_drive_tree(tmp_path / "src")
    message = error_of(lambda: download(drive_params(str(drive), WRONG_SHA)))
    assert message.startswith("dataset.sha256:") and str(drive) in message
    assert not (project / "data" / "raw").exists()


# --- download() from a local folder: links that loop or leave it -----------------------------


def test_a_link_to_its_own_parent_is_refused_naming_the_link_before_copying(project, tmp_path):
    """The issue's case: copying followed the loop ~40 levels deep, then one 75,595-character
    ERROR line."""
    drive = make_drive_tree(tmp_path / "src")
    (drive / "training" / "again").symlink_to("..")
    message = error_of(lambda: download(drive_params(str(drive))))
    assert message == (
        f"{drive / 'training' / 'again'}: links to {drive}, a folder it lies in (a loop); "
        "remove the link"
    )
    assert not (project / "data" / "raw").exists() and leftovers(project) == []


@pytest.mark.parametrize(
    ("links", "culprit", "says"),
    [
        ({"training/etc": "/etc"}, "training/etc", "links to /etc, outside dataset.source "),
        ({"training/up": "../../.."}, "training/up", ", outside dataset.source "),
        ({"a": "training", "b": "a"}, "b", ", a folder dataset.source already holds "),
        ({"training/x": "../test", "test/y": "../training"}, "test/y", " already holds "),
        ({"training/gone": "nowhere.png"}, "training/gone", "a broken link (to 'nowhere.png')"),
        ({"me": "me"}, "me", "a broken link (to 'me')"),
    ],
    ids=["absolute-outside", "dotdot-outside", "alias", "two-links-loop", "dangling", "self"],
)
def test_links_leaving_the_folder_aliasing_it_or_broken_are_refused(
    project, tmp_path, links, culprit, says
):
    drive = make_drive_tree(tmp_path / "src")
    for link, to in links.items():
        (drive / link).symlink_to(to)
    message = error_of(lambda: download(drive_params(str(drive))))
    assert message.startswith(f"{drive / culprit}: ") and says in message
    assert len(message) < 300
    assert not (project / "data" / "raw").exists() and leftovers(project) == []


def test_a_fifo_in_the_folder_is_refused_instead_of_blocking_the_copy(project, tmp_path):
    drive = make_drive_tree(tmp_path / "src")
    os.mkfifo(drive / "training" / "pipe")
    message = error_of(lambda: download(drive_params(str(drive))))
    assert message.startswith(f"{drive / 'training' / 'pipe'}: not a regular file")
    assert not (project / "data" / "raw").exists()


# --- relative sources -----------------------------------------------------------------------


def test_relative_source_resolves_against_the_project_root(project, tmp_path, monkeypatch):
    archive = zip_dir(make_drive_tree(tmp_path / "src"), project / "inputs" / "DRIVE.zip")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the working directory
    download(drive_params("inputs/DRIVE.zip"))
    source = json.loads((project / "data" / "raw" / "drive" / "source.json").read_text())
    assert source["source"] == "inputs/DRIVE.zip"
    assert source["sha256"] == sha256_file(archive)


def test_relative_source_resolves_against_dvc_root_in_a_temp_experiment(
    project, tmp_path, monkeypatch
):
    """`dvc exp run --temp` runs the stage in a copy and sets DVC_ROOT to the real repo."""
    real_repo = tmp_path / "real-repo"
    archive = zip_dir(make_drive_tree(tmp_path / "src"), real_repo / "inputs" / "DRIVE.zip")
    monkeypatch.setenv("DVC_ROOT", str(real_repo))
    download(drive_params("inputs/DRIVE.zip"))  # nothing at project/inputs
    source = json.loads((project / "data" / "raw" / "drive" / "source.json").read_text())
    assert source["sha256"] == sha256_file(archive)


def test_url_downloads_are_kept_under_dvc_root(project, tmp_path, www, drive_zip, monkeypatch):
    real_repo = tmp_path / "real-repo"
    real_repo.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(real_repo))
    download(drive_params(www.url("DRIVE.zip"), sha256_file(drive_zip)))
    kept = real_repo / "data" / "downloads" / "drive" / "DRIVE.zip"
    assert kept.read_bytes() == drive_zip.read_bytes()
    assert not (project / "data" / "downloads").exists()
    assert (project / "data" / "raw" / "drive" / "training" / "images").is_dir()


# --- sources that are not a dataset ---------------------------------------------------------


def test_source_that_is_not_an_archive_says_so(project, tmp_path):
    text = tmp_path / "DRIVE.txt"
    text.write_text("not an archive\n")
    message = error_of(lambda: download(drive_params(str(text))))
    assert message.startswith(f"{text}: not a .zip or .tar")


def test_missing_source_names_the_path(project, tmp_path):
    missing = tmp_path / "nowhere" / "DRIVE.zip"
    message = error_of(lambda: download(drive_params(str(missing))))
    assert str(missing) in message and "not found" in message


def test_archive_without_the_dataset_layout_names_the_missing_folder(project, tmp_path):
    archive = zip_members(tmp_path / "photos.zip", {"photos/a.jpg": b"a", "readme.txt": b"r"})
    message = error_of(lambda: download(drive_params(str(archive))))
    assert message == (
        f"{archive}: no training/images/ folder inside; is it DRIVE (dataset.name, dataset.source)?"
    )
    assert leftovers(project) == []


def test_macos_resource_folders_are_not_taken_for_the_dataset(tmp_path):
    (tmp_path / "__MACOSX" / "training" / "images").mkdir(parents=True)
    with pytest.raises(PipelineError, match="no training/images/ folder"):
        find_root(tmp_path, "training/images", "DRIVE.zip")


@pytest.mark.parametrize(
    ("dataset", "layout"),
    [
        ({"name": "camvid"}, ("CamVid/train/0001.png", "CamVid/trainannot/0001.png")),
        (
            {"name": "folder", "folder": {"images": "imgs", "labels": "masks"}},
            ("mine/imgs/a.png", "mine/masks/a.png"),
        ),
    ],
    ids=["camvid", "folder"],
)
def test_each_dataset_is_found_by_its_marker_folder(project, tmp_path, dataset, layout):
    archive = zip_members(tmp_path / "data.zip", {name: b"x" for name in layout})
    download(parse_params({"dataset": {**dataset, "source": str(archive)}}))
    raw = project / "data" / "raw" / dataset["name"]
    assert snapshot(raw).keys() == {*(n.split("/", 1)[1] for n in layout), "source.json"}


# --- the CLI --------------------------------------------------------------------------------


def write_params(project: Path, dataset: dict) -> None:
    """A complete params.yaml (as the stages require), the defaults but for `dataset`."""
    full = Params().model_dump()
    full["dataset"] |= dataset
    (project / "params.yaml").write_text(yaml.safe_dump(full))


def test_cli_failure_exits_1_with_one_error_line(project, tmp_path, caplog):
    missing = tmp_path / "missing.zip"
    write_params(project, {"name": "drive", "source": str(missing)})
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [])
    assert exit_info.value.code == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].name == "pipeline"
    message = errors[0].getMessage()
    assert "\n" not in message and str(missing) in message and "not found" in message


def test_cli_success_writes_the_raw_data(project, drive_zip, caplog):
    write_params(project, {"name": "drive", "source": str(drive_zip)})
    run_cli(main, [])
    assert (project / "data" / "raw" / "drive" / "training" / "images").is_dir()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
