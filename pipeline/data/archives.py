"""Getting a dataset source onto disk safely: checksums, streamed URL downloads, and archive
extraction that refuses members escaping the target folder.

Every failure is a PipelineError whose one line names the URL, file or archive member.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from tqdm import tqdm

from pipeline.common import PipelineError, sha256_file

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# a download that brings fewer than STALL_BYTES in STALL_SECONDS has stalled: the socket
# timeout alone never fires on a server that trickles a byte every few seconds
STALL_SECONDS = 60.0
STALL_BYTES = 64 << 10
PROGRESS_SECONDS = 10.0  # a log line this often when no terminal shows the progress bar
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = (".zip", *TAR_SUFFIXES)


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def verify_sha256(path: Path, expected: str, what: str | None = None) -> str:
    """Return the file's sha256; raise naming both hashes if `expected` is given and differs."""
    actual = sha256_file(path)
    if expected and actual != expected.lower():
        raise PipelineError(
            f"{what or path}: sha256 mismatch: expected {expected.lower()}, got {actual}"
        )
    return actual


def url_filename(url: str) -> str:
    name = PurePosixPath(urlparse(url).path).name
    return name or "download"


class _Progress:
    """The stall rule (STALL_BYTES per STALL_SECONDS) and, where no progress bar shows, a log
    line every PROGRESS_SECONDS with the bytes so far and the rate."""

    def __init__(self, url: str, total: int, hint: str):
        self.url, self.total, self.hint = url, total, hint
        self.start = self.window_start = self.last_line = time.monotonic()
        self.size = self.window_bytes = 0

    def update(self, n: int, quiet: bool = False) -> None:
        now = time.monotonic()
        self.size += n
        self.window_bytes += n
        if now - self.window_start >= STALL_SECONDS:
            if self.window_bytes < STALL_BYTES:
                raise PipelineError(
                    f"{self.url}: download stalled ({self.window_bytes} bytes in the last "
                    f"{now - self.window_start:.0f} s, {self.size} in all); {self.hint}"
                )
            self.window_start, self.window_bytes = now, 0
        if not quiet and now - self.last_line >= PROGRESS_SECONDS:
            self.last_line = now
            of = f" of {self.total / 1e6:.1f}" if self.total else ""
            rate = self.size / 1e6 / max(now - self.start, 1e-9)
            log.info("downloaded %.1f%s MB (%.2f MB/s)", self.size / 1e6, of, rate)


def fetch_url(url: str, dest_dir: Path, sha256: str = "", timeout: float = 30.0) -> Path:
    """Stream `url` into dest_dir/<name> with a progress bar.

    The bytes go to a hidden `.part` file that is renamed only once complete and verified, so
    an interrupted or corrupt download never looks like a finished one. A verified earlier
    download of the same name is reused (no network needed)."""
    name = url_filename(url)
    dest = Path(dest_dir) / name
    if dest.is_file() and sha256 and sha256_file(dest) == sha256.lower():
        log.info("using the verified earlier download %s", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{name}.part")
    hint = f"download it by other means and pass the file: -S dataset.source=/path/to/{name}"
    try:
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0)
            watch = _Progress(url, total, hint)
            with tqdm(
                total=total or None, unit="B", unit_scale=True, desc=name, delay=1, disable=None
            ) as bar:
                # read1: whatever has arrived (read(n) would wait for all n bytes)
                while chunk := resp.read1(CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                    watch.update(len(chunk), quiet=not bar.disable)
            size = f.tell()
        if total and size != total:
            raise PipelineError(f"{url}: download truncated ({size} of {total} bytes); {hint}")
        actual = h.hexdigest()
        if sha256 and actual != sha256.lower():
            raise PipelineError(
                f"{url}: sha256 mismatch: expected {sha256.lower()}, got {actual} "
                "(partial download deleted)"
            )
        os.replace(part, dest)
    except urllib.error.HTTPError as exc:
        raise PipelineError(f"{url}: HTTP {exc.code} {exc.reason}; {hint}") from None
    except urllib.error.URLError as exc:
        raise PipelineError(f"{url}: unreachable ({exc.reason}); offline? {hint}") from None
    except (TimeoutError, ConnectionError) as exc:
        raise PipelineError(f"{url}: unreachable ({exc}); offline? {hint}") from None
    except http.client.HTTPException as exc:  # cut-off chunked body, not an HTTP server, ...
        raise PipelineError(f"{url}: broken HTTP response ({exc!r}); {hint}") from None
    finally:
        part.unlink(missing_ok=True)
    log.info("downloaded %s (%.1f MB)", dest, dest.stat().st_size / 1e6)
    return dest


def archive_kind(path: Path) -> str | None:
    """ "zip", "tar" or None (not an archive we read), by name, then by content."""
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError):
        pass
    return None


def _member_path(archive: Path, name: str, target: Path) -> Path:
    """Where member `name` would land; refuse absolute paths, drive letters and `..`."""
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in posix.parts:
        raise PipelineError(
            f"{archive}: member {name!r} would be written outside the target folder; "
            "refusing to extract"
        )
    return target.joinpath(*posix.parts)


def _inside(path: Path, target: Path) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(target)]) == str(
        os.path.abspath(target)
    )


def _check_link(archive: Path, name: str, link: str, base: Path, target: Path) -> None:
    """A link member must point inside the target folder."""
    dest = base.joinpath(*PurePosixPath(link.replace("\\", "/")).parts)
    if PurePosixPath(link).is_absolute() or not _inside(os.path.normpath(dest), target):
        raise PipelineError(
            f"{archive}: member {name!r} links to {link!r}, outside the target folder; "
            "refusing to extract"
        )


def _extract_zip(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            dest = _member_path(archive, info.filename, target)
            if stat.S_ISLNK(info.external_attr >> 16):
                link = zf.read(info).decode("utf-8", "replace")
                _check_link(archive, info.filename, link, dest.parent, target)
        for info in tqdm(infos, desc=archive.name, unit="file", delay=2, disable=None):
            zf.extract(info, target)  # CRC-checked: a damaged member raises BadZipFile


def _extract_tar(archive: Path, target: Path) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()  # reads the whole archive: a truncated one fails here
        _check_end_of_archive(tf)
        links: set[PurePosixPath] = set()
        for m in members:
            dest = _member_path(archive, m.name, target)
            # a member under an earlier link member would be written wherever that link points
            parts = PurePosixPath(m.name.replace("\\", "/")).parts
            if any(PurePosixPath(*parts[:i]) in links for i in range(1, len(parts))):
                raise PipelineError(
                    f"{archive}: member {m.name!r} lies under a link member; refusing to extract"
                )
            if m.issym() or m.islnk():
                links.add(PurePosixPath(*parts))
            if m.issym():
                _check_link(archive, m.name, m.linkname, dest.parent, target)
            elif m.islnk():
                _check_link(archive, m.name, m.linkname, target, target)
            elif not (m.isfile() or m.isdir()):
                raise PipelineError(
                    f"{archive}: member {m.name!r} is a device or fifo; refusing to extract"
                )
        try:
            # the "data" filter re-checks every member (links, permissions) as a second guard
            tf.extractall(target, members=members, filter="data")
        except tarfile.FilterError as exc:
            name = exc.tarinfo.name if exc.tarinfo is not None else "?"
            raise PipelineError(
                f"{archive}: member {name!r} refused ({exc}); refusing to extract"
            ) from None


def _check_end_of_archive(tf: tarfile.TarFile) -> None:
    """tarfile takes end-of-file as the end of the archive, so a plain .tar cut at a member
    boundary would read as a shorter, complete one: require the zero end-of-archive block."""
    if tf.fileobj is None or not hasattr(tf.fileobj, "seek"):
        return
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError("no end-of-archive marker")


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a .zip or tar archive into `target` (created), refusing any member that would
    land outside it, and turning truncated or corrupt archives into one clear line."""
    archive = Path(archive)
    kind = archive_kind(archive)
    if kind is None:
        raise PipelineError(
            f"{archive}: not a .zip or .tar(.gz) archive (dataset.source takes a URL, an "
            "archive or a folder)"
        )
    target.mkdir(parents=True, exist_ok=True)
    try:
        (_extract_zip if kind == "zip" else _extract_tar)(archive, target)
    except PipelineError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, ValueError) as exc:
        raise PipelineError(f"{archive}: truncated or corrupt archive ({exc})") from None
    except OSError as exc:
        raise PipelineError(f"{archive}: cannot extract ({exc})") from None


def copy_folder(source: Path, target: Path) -> None:
    """Copy a local dataset folder (links are followed: the copy holds real files)."""
    try:
        shutil.copytree(source, target, symlinks=False)
    except (shutil.Error, OSError) as exc:
        raise PipelineError(f"{source}: cannot copy the dataset folder ({exc})") from None


def find_root(top: Path, marker: str, source: str, hint: str = "is it the right dataset?") -> Path:
    """The shallowest folder under `top` (itself included) holding the folder `marker`, e.g.
    the DRIVE/ inside DRIVE.zip, or CamVid/ inside the SegNet tutorial's archive. `hint` ends
    the error when there is none (e.g. the param that names the folder)."""
    level = [top]
    while level:
        for folder in level:
            if (folder / marker).is_dir():
                return folder
        level = [
            child
            for folder in level
            for child in sorted(folder.iterdir())
            # real folders only: a symlinked alias would be moved as a link and dangle
            if child.is_dir() and not child.is_symlink() and child.name != "__MACOSX"
        ]
    raise PipelineError(f"{source}: no {marker}/ folder inside; {hint}")
