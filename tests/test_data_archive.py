"""`prepare-data extract`: traversal, absolute paths and links are refused; re-runs skip."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vrwkv_cli.prepare_data import app
from vrwkv_core.data.archive import extract_archive
from vrwkv_core.errors import DataError


def make_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("imgs/a.txt", "alpha")
        zf.writestr("imgs/sub/b.txt", "bravo" * 100)
        zf.writestr("../evil.txt", "x")
        zf.writestr("/abs.txt", "x")
        zf.writestr("imgs/../../evil2.txt", "x")
        zf.writestr("C:\\win.txt", "x")
        link = zipfile.ZipInfo("imgs/link")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")


def make_tar(path: Path, mode: str) -> None:
    def add(tf: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        for k, v in kw.items():
            setattr(info, k, v)
        tf.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(path, mode) as tf:
        add(tf, "imgs/a.txt", b"alpha")
        add(tf, "imgs/sub/b.txt", b"bravo" * 100)
        add(tf, "../evil.txt", b"x")
        add(tf, "/abs.txt", b"x")
        add(tf, "imgs/sym", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tf, "imgs/hard", type=tarfile.LNKTYPE, linkname="../../etc/passwd")
        add(tf, "imgs/dev", type=tarfile.CHRTYPE)
        add(tf, "imgs/fifo", type=tarfile.FIFOTYPE)


def written_outside(root: Path) -> list[Path]:
    """Files that only an unsafe member could have produced (anywhere under root, or at /)."""
    names = {"evil.txt", "evil2.txt", "abs.txt", "win.txt", "C:\\win.txt"}
    return [p for p in root.rglob("*") if p.name in names] + [p for p in (Path("/abs.txt"),) if p.exists()]


def test_zip_refuses_traversal_and_links(tmp_path):
    arc = tmp_path / "a.zip"
    make_zip(arc)
    out = tmp_path / "out"
    report = extract_archive(arc, out)
    assert (out / "imgs/a.txt").read_text() == "alpha"
    assert (out / "imgs/sub/b.txt").read_text() == "bravo" * 100
    refused = dict(report.refused)
    assert set(refused) == {"../evil.txt", "/abs.txt", "imgs/../../evil2.txt", "C:\\win.txt", "imgs/link"}
    assert refused["imgs/link"] == "symlink" and refused["/abs.txt"] == "absolute path"
    assert not written_outside(tmp_path)
    assert not (out / "imgs/link").exists() and not (out / "abs.txt").exists()
    assert (report.extracted, report.skipped) == (2, 0)
    # a re-run skips what is there with the right size, and redoes what is not
    (out / "imgs/sub/b.txt").write_text("short")
    again = extract_archive(arc, out)
    assert (again.extracted, again.skipped) == (1, 1)
    assert (out / "imgs/sub/b.txt").read_text() == "bravo" * 100


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_refuses_traversal_links_and_devices(tmp_path, mode):
    arc = tmp_path / "a.tar"
    make_tar(arc, mode)
    out = tmp_path / "out"
    report = extract_archive(arc, out)
    assert (out / "imgs/a.txt").read_text() == "alpha"
    refused = dict(report.refused)
    assert set(refused) == {"../evil.txt", "/abs.txt", "imgs/sym", "imgs/hard", "imgs/dev", "imgs/fifo"}
    assert refused["imgs/sym"].startswith("symlink") and refused["imgs/hard"].startswith("hardlink")
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.txt", "b.txt"]
    assert not written_outside(tmp_path)
    assert extract_archive(arc, out).skipped == 2


def test_existing_symlink_in_out_dir_cannot_be_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "imgs").symlink_to(outside, target_is_directory=True)
    arc = tmp_path / "a.zip"
    make_zip(arc)
    report = extract_archive(arc, out)
    assert "imgs/a.txt" in dict(report.refused)
    assert not any(outside.iterdir())


def test_not_an_archive(tmp_path):
    (tmp_path / "x.zip").write_text("hello")
    with pytest.raises(DataError, match="not a zip or tar"):
        extract_archive(tmp_path / "x.zip", tmp_path / "out")


def test_cli_reports_refused_members_and_fails(tmp_path):
    arc = tmp_path / "a.tar.gz"
    make_tar(arc, "w:gz")
    result = CliRunner().invoke(app, ["extract", str(arc), "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, DataError) and "6 unsafe members refused" in str(result.exception)
    assert (tmp_path / "out/imgs/a.txt").exists()
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("x/y.txt", "ok")
    result = CliRunner().invoke(app, ["extract", str(good), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 0, result.output
    assert "1 extracted" in result.output
