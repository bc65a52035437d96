"""Getting a dataset source onto disk safely: checksums, streamed URL downloads, archive
extraction that refuses members escaping the target folder and archive bombs, and folder copies
that refuse link loops and links leaving the folder.

Every failure is a PipelineError whose one line names the URL, file, link or archive member,
and leaves nothing behind.
"""

from __future__ import annotations

import collections
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

from pipeline.core.common import PipelineError, sha256_file

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# a download that brings fewer than STALL_BYTES in STALL_SECONDS has stalled: the socket
# timeout alone never fires on a server that trickles a byte every few seconds
STALL_SECONDS = 60.0
STALL_BYTES = 64 << 10
PROGRESS_SECONDS = 10.0  # a log line this often when no terminal shows the progress bar
# Archive bombs (a 2 MB zip of 2 GB of zeros) are refused from the members' declared sizes,
# before anything is written, and again on the bytes actually written (a header can lie):
# - dataset.max_unpacked_gb (a param, passed in as `max_bytes`): the whole archive unpacked;
# - MAX_RATIO: a member (zip) or a whole archive (tar) of more than RATIO_MIN_BYTES that unpacks
#   to over MAX_RATIO times its packed size. Images barely compress (PNG, JPEG ~1:1, raw TIFF a
#   few :1); zeros deflate ~1000:1. A genuine archive refused by it can be unpacked by hand and
#   passed as a folder.
DEFAULT_MAX_UNPACKED_BYTES = 20 * 10**9
MAX_RATIO = 200
RATIO_MIN_BYTES = 8 << 20
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = (".zip", *TAR_SUFFIXES)
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


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


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n:.0f} B"


class _Budget:
    """The unpacked bytes an archive may come to (dataset.max_unpacked_gb), counted first on
    the members' declared sizes, then on the bytes written."""

    def __init__(self, archive: Path, max_bytes: int):
        self.archive, self.max_bytes, self.used = archive, max_bytes, 0

    def take(self, name: str, n: int) -> None:
        self.used += n
        if self.used > self.max_bytes:
            raise PipelineError(
                f"{self.archive}: unpacks to more than dataset.max_unpacked_gb "
                f"({self.max_bytes / 1e9:g} GB) by member {name!r}; refusing to extract (an "
                "archive bomb?); raise dataset.max_unpacked_gb if the archive is genuine"
            )


def _check_ratio(archive: Path, what: str, unpacked: int, packed: int, where: str = "") -> None:
    """Refuse `unpacked` bytes from `packed` at over MAX_RATIO:1 once above RATIO_MIN_BYTES;
    `what` says what unpacks ("member 'x' unpacks", "unpacks"), `where` how far in."""
    if unpacked > RATIO_MIN_BYTES and unpacked > MAX_RATIO * max(packed, 1):
        raise PipelineError(
            f"{archive}: {what} to {_size(unpacked)}{where} from {_size(packed)} "
            f"({unpacked / max(packed, 1):.0f}:1, over {MAX_RATIO}:1): an archive bomb? "
            "refusing to extract; if it is genuine, unpack it yourself and set dataset.source "
            "to the folder"
        )


def _check_space(archive: Path, target: Path, needed: int) -> None:
    folder = target
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise PipelineError(
            f"{archive}: unpacks to {_size(needed)} but {folder} has {_size(free)} free; "
            "free some space and run again"
        )


def _write(src, dest: Path, archive: Path, name: str, declared: int, budget: _Budget) -> None:
    """Stream one member into `dest`, counting what is written against its declared size and
    the budget (a lying header stops at the first byte too many)."""
    if dest.is_symlink():  # an earlier member of the same name: never write through it
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > declared:
                raise PipelineError(
                    f"{archive}: member {name!r} unpacks to more than the {declared} bytes "
                    "its header declares (an archive bomb?); refusing to extract"
                )
            budget.take(name, len(chunk))
            out.write(chunk)


def _extract_zip(archive: Path, target: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        declared = _Budget(archive, max_bytes)
        for info in infos:
            dest = _member_path(archive, info.filename, target)
            if info.flag_bits & 0x1:
                raise PipelineError(
                    f"{archive}: member {info.filename!r} is encrypted; unpack the archive "
                    "yourself (with its password) and set dataset.source to the folder"
                )
            if stat.S_ISLNK(info.external_attr >> 16):
                link = zf.read(info).decode("utf-8", "replace")
                _check_link(archive, info.filename, link, dest.parent, target)
            if info.compress_type not in ZIP_METHODS:
                method = zipfile.compressor_names.get(info.compress_type, info.compress_type)
                raise PipelineError(
                    f"{archive}: member {info.filename!r} is compressed with {method}, which "
                    "Python's zipfile cannot read; unpack the archive with another tool and "
                    "set dataset.source to the folder"
                )
            what = f"member {info.filename!r} unpacks"
            _check_ratio(archive, what, info.file_size, info.compress_size)
            declared.take(info.filename, info.file_size)
        _check_ratio(archive, "unpacks", declared.used, archive.stat().st_size)
        _check_space(archive, target, declared.used)
        written = _Budget(archive, max_bytes)
        for info in tqdm(infos, desc=archive.name, unit="file", delay=2, disable=None):
            dest = _member_path(archive, info.filename, target)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            # a zip "symlink" is written as the file holding its target, as zipfile does
            with zf.open(info) as src:  # CRC-checked: a damaged member raises BadZipFile
                _write(src, dest, archive, info.filename, info.file_size, written)


def _tar_bytes(m: tarfile.TarInfo) -> int:
    """What member `m` takes in the tar stream: its header block and its data, padded."""
    return tarfile.BLOCKSIZE + -(-max(m.size, 0) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _extract_tar(archive: Path, target: Path, max_bytes: int) -> None:
    with tarfile.open(archive) as tf:
        links: set[PurePosixPath] = set()
        sizes: dict[str, int] = {}
        members = []
        declared = _Budget(archive, max_bytes)
        packed, stream = archive.stat().st_size, 0
        # header by header: a member declaring too much is refused before its data is even
        # decompressed (getmembers() would inflate the whole archive first); reading to the
        # end also finds a truncated archive
        for m in tf:
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
            # a hard link may be written as a copy of its target: it counts as one
            size = sizes.get(m.linkname, 0) if m.islnk() else m.size if m.isfile() else 0
            sizes[m.name] = size
            declared.take(m.name, size)
            stream += _tar_bytes(m)
            _check_ratio(archive, "unpacks", stream, packed, f" (up to member {m.name!r})")
            members.append(m)
        _check_end_of_archive(tf)
        _check_space(archive, target, declared.used)
        written = _Budget(archive, max_bytes)
        for m in tqdm(members, desc=archive.name, unit="file", delay=2, disable=None):
            try:
                # the "data" filter re-checks every member against what is on disk by now (a
                # link through an earlier link, permissions) as a second guard
                if m.isfile():
                    tarfile.data_filter(m, str(target))
                    src = tf.extractfile(m)
                    assert src is not None  # a regular file
                    with src:
                        dest = _member_path(archive, m.name, target)
                        _write(src, dest, archive, m.name, m.size, written)
                else:
                    if m.islnk():
                        written.take(m.name, sizes[m.name])
                    tf.extract(m, target, set_attrs=False, filter="data")
            except tarfile.FilterError as exc:
                name = exc.tarinfo.name if exc.tarinfo is not None else m.name
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


def safe_extract(archive: Path, target: Path, max_bytes: int = DEFAULT_MAX_UNPACKED_BYTES) -> None:
    """Extract a .zip or tar archive into `target` (created), refusing any member that would
    land outside it and archive bombs (over `max_bytes` unpacked, or over MAX_RATIO:1), and
    turning truncated or corrupt archives into one clear line. A failure leaves nothing of
    the extraction behind."""
    archive = Path(archive)
    kind = archive_kind(archive)
    if kind is None:
        raise PipelineError(_not_an_archive(archive))
    top = target  # the first folder this call creates: removed whole on failure
    while not top.parent.exists():
        top = top.parent
    existed = target.is_dir()
    before = set(target.iterdir()) if existed else set()
    target.mkdir(parents=True, exist_ok=True)
    try:
        try:
            (_extract_zip if kind == "zip" else _extract_tar)(archive, target, max_bytes)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, ValueError) as exc:
            if _looks_like_html(archive):
                raise PipelineError(_not_an_archive(archive)) from None
            raise PipelineError(f"{archive}: truncated or corrupt archive ({exc})") from None
        except OSError as exc:
            raise PipelineError(f"{archive}: cannot extract ({exc})") from None
    except BaseException:
        if not existed:
            shutil.rmtree(top, ignore_errors=True)
        else:
            for path in set(target.iterdir()) - before:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def _looks_like_html(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(512).lstrip().lower()
    except OSError:
        return False
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def _not_an_archive(path: Path) -> str:
    if _looks_like_html(path):
        return (
            f"{path}: an HTML page, not an archive (a login, consent or error page served "
            "instead of the file?); download it in a browser and set dataset.source to the file"
        )
    return (
        f"{path}: not a .zip or .tar(.gz) archive (dataset.source takes a URL, an archive or a "
        "folder)"
    )


def check_folder(source: Path) -> None:
    """Refuse, before anything is copied, a dataset folder holding a link that leaves it, points
    nowhere, or leads into a folder the copy already holds: back into one it lies in (a loop,
    copied forever) or into another (an alias, copied twice; aliases of aliases double the
    copy at each level). Special files (fifos, devices) are refused too: reading one blocks."""
    root = source.resolve()
    seen = {root}
    todo = collections.deque([source])
    while todo:
        folder = todo.popleft()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise PipelineError(f"{folder}: cannot read the dataset folder ({exc})") from None
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                try:
                    real = path.resolve(strict=True)
                except (OSError, RuntimeError):  # dangling, or links that loop among themselves
                    raise PipelineError(
                        f"{path}: a broken link (to {os.readlink(path)!r}) in dataset.source; "
                        "remove it"
                    ) from None
                if not _inside(real, root):
                    raise PipelineError(
                        f"{path}: links to {real}, outside dataset.source {source}; copy the "
                        "real files into the folder instead"
                    )
            if entry.is_dir():  # through a link too
                real = path.resolve()
                if real in seen:
                    link = path if entry.is_symlink() else _first_link(path, source)
                    why = (
                        "a folder it lies in (a loop)"
                        if _inside(path.parent.resolve(), real)
                        else "a folder dataset.source already holds (it would be copied twice)"
                    )
                    raise PipelineError(f"{link}: links to {real}, {why}; remove the link")
                seen.add(real)
                todo.append(path)
            elif not entry.is_file():
                raise PipelineError(
                    f"{path}: not a regular file (a fifo, socket or device) in dataset.source; "
                    "remove it"
                )


def _first_link(path: Path, source: Path) -> Path:
    """The link `path` was reached through (the folder it aliases was seen first by a link)."""
    for parent in [path, *path.parents]:
        if parent.is_symlink() or parent == source:
            return parent
    return path


def copy_folder(source: Path, target: Path) -> None:
    """Copy a local dataset folder (links, checked by check_folder, are followed: the copy
    holds real files)."""
    check_folder(source)
    try:
        shutil.copytree(source, target, symlinks=False)
    except shutil.Error as exc:  # a list of (source, target, why), one per file that failed
        errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else [("", "", exc)]
        path, _, why = errors[0]
        more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
        raise PipelineError(f"{path or source}: cannot copy ({why}){more}") from None
    except OSError as exc:
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
