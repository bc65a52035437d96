"""Hostile dataset sources beyond issue 30's list, as a spec: archives Python cannot (or must
not) unpack, a web page served for the archive, sources that are not files, hard links that
multiply an archive, and folders whose layout is wrong. Each is one line, leaves nothing
behind, and never hangs."""

from __future__ import annotations

import os
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.core.common import PipelineError
from pipeline.core.config import parse_params
from pipeline.data.archives import safe_extract
from pipeline.stages.download import download
from pipeline.stages.preprocess import preprocess
from tests.fakes import make_folder
from tests.unit.data.test_archives import (  # noqa: F401 (fixtures)
    drive_params,
    error_of,
    leftovers,
    make_drive_tree,
    serve,
    tar_member,
    tar_members,
    www,
    zip_dir,
)


def patched_zip(archive: Path, local: int, central: int, value: int, fmt: str = "<H") -> Path:
    """One member's zip, with a field of its local header (at offset `local`) and of its
    central directory entry (at `central`) set to `value`: what zipfile will not write."""
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("DRIVE/training/images/21_training.tif", b"payload")
    data = bytearray(archive.read_bytes())
    entry = data.index(b"PK\x01\x02")
    size = struct.calcsize(fmt)
    data[local : local + size] = struct.pack(fmt, value)
    data[entry + central : entry + central + size] = struct.pack(fmt, value)
    archive.write_bytes(bytes(data))
    return archive


def test_an_encrypted_zip_member_is_one_line_not_a_traceback(tmp_path):
    """zipfile raised RuntimeError("... password required") from inside the extraction."""
    archive = patched_zip(tmp_path / "locked.zip", 6, 8, 0x1)  # general purpose flag: encrypted
    target = tmp_path / "out"
    assert error_of(lambda: safe_extract(archive, target)) == (
        f"{archive}: member 'DRIVE/training/images/21_training.tif' is encrypted; unpack the "
        "archive yourself (with its password) and set dataset.source to the folder"
    )
    assert not target.exists()


def test_a_deflate64_zip_member_is_one_line_naming_the_method(tmp_path):
    """Windows' own zipper writes deflate64 for large files; zipfile raised
    NotImplementedError("That compression method is not supported")."""
    archive = patched_zip(tmp_path / "windows.zip", 8, 10, 9)  # method 9: deflate64
    target = tmp_path / "out"
    assert error_of(lambda: safe_extract(archive, target)) == (
        f"{archive}: member 'DRIVE/training/images/21_training.tif' is compressed with "
        "deflate64, which Python's zipfile cannot read; unpack the archive with another tool "
        "and set dataset.source to the folder"
    )
    assert not target.exists()


def test_a_url_serving_an_html_page_for_the_zip_says_so(project, www):  # noqa: F811
    """A login or cookie-consent page served with status 200 where DRIVE.zip was expected."""
    (www.folder / "DRIVE.zip").write_text("<!DOCTYPE html>\n<html><body>Sign in</body></html>\n")
    message = error_of(lambda: download(drive_params(www.url("DRIVE.zip"))))
    saved = project / "data" / "downloads" / "drive" / "DRIVE.zip"
    assert message == (
        f"{saved}: an HTML page, not an archive (a login, consent or error page served instead "
        "of the file?); download it in a browser and set dataset.source to the file"
    )
    assert not (project / "data" / "raw").exists() and leftovers(project) == []


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_source_that_is_a_fifo_or_a_device_is_refused_instead_of_hanging(project, tmp_path, kind):
    """Checksumming a fifo waited forever for a writer; /dev/zero never ends."""
    source = tmp_path / "DRIVE.zip"
    if kind == "fifo":
        os.mkfifo(source)
    else:
        source = Path("/dev/zero")
    message = error_of(lambda: download(drive_params(str(source))))
    assert message == (
        f"dataset.source: {source} is not a regular file or folder (a URL, archive or folder)"
    )


def test_tar_hard_links_count_as_copies_against_max_unpacked_gb(project, tmp_path):
    """One 4 kB member and 50 hard links to it: 200 kB if the links become copies (as DVC's
    cache checks them out), from a 30 kB tar."""
    members = [tar_member("DRIVE/training/images/21_training.tif", os.urandom(4000))]
    members += [
        tar_member(
            f"DRIVE/training/images/copy{i:02d}.tif",
            type=tarfile.LNKTYPE,
            linkname="DRIVE/training/images/21_training.tif",
        )
        for i in range(50)
    ]
    archive = tar_members(tmp_path / "links.tar", members)
    message = error_of(lambda: download(drive_params(str(archive), max_unpacked_gb=1e-4)))
    assert message.startswith(
        f"{archive}: unpacks to more than dataset.max_unpacked_gb (0.0001 GB) by member "
        "'DRIVE/training/images/copy24.tif'"
    )
    assert not (project / "data" / "raw").exists() and leftovers(project) == []


def test_an_archive_inside_the_archive_is_not_unpacked(project, tmp_path):
    """No recursion (so no nested bomb): the layout must be in the outer archive."""
    inner = zip_dir(make_drive_tree(tmp_path / "src"), tmp_path / "inner" / "DRIVE.zip")
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, "download/DRIVE.zip")
    assert error_of(lambda: download(drive_params(str(outer)))) == (
        f"{outer}: no training/images/ folder inside; is it DRIVE (dataset.name, dataset.source)?"
    )
    assert not (project / "data" / "raw").exists() and leftovers(project) == []


def test_an_empty_folder_source_names_the_folder_it_needs(project, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error_of(lambda: download(drive_params(str(empty)))) == (
        f"{empty}: no training/images/ folder inside; is it DRIVE (dataset.name, dataset.source)?"
    )


def test_two_images_of_one_stem_with_different_extensions_are_named(project, tmp_path):
    """img03.png and img03.jpg: which one the label img03.png belongs to is anyone's guess."""
    top = make_folder(tmp_path / "src")
    (top / "images" / "img03.jpg").write_bytes((top / "images" / "img04.png").read_bytes())
    p = parse_params({"dataset": {"name": "folder", "source": str(top)}})
    download(p)
    with pytest.raises(PipelineError) as err:
        preprocess(p)
    images = project / "data" / "raw" / "folder" / "images"
    assert str(err.value).startswith(
        f"{images / 'img03.png'}: two files with the stem 'img03' in {images}"
    )


def test_a_damaged_zip_is_still_called_corrupt_not_a_web_page(tmp_path):
    """The page check looks at the first bytes only: a damaged real zip stays "corrupt"."""
    archive = zip_dir(make_drive_tree(tmp_path / "src"), tmp_path / "DRIVE.zip")
    archive.write_bytes(archive.read_bytes()[:200])
    message = error_of(lambda: safe_extract(archive, tmp_path / "out"))
    assert message.startswith(f"{archive}: truncated or corrupt archive")
