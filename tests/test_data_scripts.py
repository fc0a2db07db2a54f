"""data_scripts: download + verify + atomic unpack, against a small archive served from 127.0.0.1."""
import functools
import hashlib
import http.server
import io
import socket
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_scripts"))
import _fetch  # noqa: E402


def _tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _sha(path):
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_verifies_unpacks_and_skips_on_rerun(server, tmp_path):
    served, url = server
    archive = _tar_gz(served / "set.tar.gz", {"bottle/train/good/000.png": b"x" * 100})
    target = tmp_path / "data" / "mvtec"
    out = _fetch.fetch(f"{url}/set.tar.gz", _sha(archive), target)
    assert (out / "bottle/train/good/000.png").read_bytes() == b"x" * 100
    assert (out / _fetch.MARKER).is_file()
    archive.unlink()  # a re-run must not need the network
    assert _fetch.fetch(f"{url}/set.tar.gz", "sha256:" + "0" * 64, target) == target
    assert not list(target.parent.glob("*.unpacking")) and not list(target.parent.glob("downloads/*.part"))


def test_force_redoes_but_never_deletes_a_tree_it_cannot_replace(server, tmp_path):
    served, url = server
    archive = _tar_gz(served / "set.tar.gz", {"a.txt": b"old"})
    target = _fetch.fetch(f"{url}/set.tar.gz", _sha(archive), tmp_path / "t")
    bad = served / "bad.tar.gz"
    bad.write_bytes(b"not an archive")
    with pytest.raises(_fetch.FetchError):
        _fetch.fetch(f"{url}/bad.tar.gz", _sha(bad), target, force=True)
    assert (target / "a.txt").read_bytes() == b"old" and (target / _fetch.MARKER).is_file()
    new = _tar_gz(served / "new.tar.gz", {"a.txt": b"new"})
    _fetch.fetch(f"{url}/new.tar.gz", _sha(new), target, force=True)
    assert (target / "a.txt").read_bytes() == b"new"


def test_md5_checksums_are_accepted(server, tmp_path):
    served, url = server
    archive = _tar_gz(served / "c.tar.gz", {"cifar-10-batches-py/test_batch": b"abc"})
    md5 = "md5:" + hashlib.md5(archive.read_bytes()).hexdigest()
    out = _fetch.fetch(f"{url}/c.tar.gz", md5, tmp_path / "cifar10")
    assert (out / "cifar-10-batches-py/test_batch").read_bytes() == b"abc"


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    served, url = server
    _tar_gz(served / "set.tar.gz", {"a.txt": b"a"})
    with pytest.raises(_fetch.FetchError, match="mismatch"):
        _fetch.fetch(f"{url}/set.tar.gz", "sha256:" + "0" * 64, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    assert not any((tmp_path / "downloads").iterdir())


def test_broken_archive_leaves_no_target(server, tmp_path):
    served, url = server
    bad = served / "bad.tar.gz"
    bad.write_bytes(b"this is not an archive")
    with pytest.raises(_fetch.FetchError, match="not a readable archive"):
        _fetch.fetch(f"{url}/bad.tar.gz", _sha(bad), tmp_path / "t")
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob("t.*"))


def test_path_traversal_is_refused(tmp_path):
    archive = _tar_gz(tmp_path / "evil.tar.gz", {"../escaped.txt": b"boo"})
    with pytest.raises(_fetch.FetchError, match="outside"):
        _fetch.unpack(archive, tmp_path / "out" / "t")
    assert not (tmp_path / "out" / "escaped.txt").exists() and not (tmp_path / "out" / "t").exists()


def test_unreachable_server_fails_fast(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    with pytest.raises(_fetch.FetchError, match="could not download"):
        _fetch.download(f"http://127.0.0.1:{port}/x.tar", tmp_path / "x.tar", checksum=None, timeout=3)
    assert time.perf_counter() - t < 5 and not list(tmp_path.iterdir())


def test_bad_checksum_spec():
    with pytest.raises(ValueError, match="sha256"):
        _fetch._parse("crc32:1234")


def test_scripts_parse_their_arguments(tmp_path, monkeypatch):
    import importlib

    monkeypatch.setenv("UADKIT_DATA", str(tmp_path))
    sources = [(importlib.import_module(n).URL, importlib.import_module(n).CHECKSUM) for n in ("mvtec", "visa")]
    sources += list(importlib.import_module("cifar").SOURCES.values())
    for url, checksum in sources:
        algorithm, value = _fetch._parse(checksum)
        assert url.startswith("https://") and len(value) == {"sha256": 64, "md5": 32}[algorithm]
    assert _fetch.parser("x").parse_args([]).root == tmp_path


# --------------------------------------------------------------------------- bad archives, foreign folders, cut downloads

def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as t:
        good = tarfile.TarInfo("train/good/000.png")
        good.size = 3
        t.addfile(good, io.BytesIO(b"png"))
        member.size = len(data) if member.isfile() else 0
        t.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.SYMTYPE])
def test_special_members_are_refused(tmp_path, kind):
    """A FIFO named like an image would make ds[i] block forever; devices and links have no place in a dataset."""
    member = tarfile.TarInfo("train/good/003.png")
    member.type = kind
    if kind == tarfile.SYMTYPE:
        member.linkname = "000.png"
    archive = _tar_with(tmp_path / "evil.tar.gz", member)
    with pytest.raises(_fetch.FetchError, match="003.png"):
        _fetch.unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_setuid_and_world_writable_modes_are_dropped(tmp_path):
    member = tarfile.TarInfo("train/good/001.png")
    member.mode = 0o6777
    out = _fetch.unpack(_tar_with(tmp_path / "modes.tar.gz", member, b"data"), tmp_path / "out")
    mode = (out / "train/good/001.png").stat().st_mode
    assert not mode & 0o6000 and not mode & 0o002  # no setuid/setgid, not world-writable


def test_a_folder_the_scripts_did_not_unpack_is_never_deleted(server, tmp_path):
    served, url = server
    archive = _tar_gz(served / "set.tar.gz", {"a.txt": b"dataset"})
    target = tmp_path / "mvtec"
    target.mkdir()
    (target / "my_notes.txt").write_text("mine")
    with pytest.raises(_fetch.FetchError, match="--force"):
        _fetch.fetch(f"{url}/set.tar.gz", _sha(archive), target)
    with pytest.raises(_fetch.FetchError, match="--force"):
        _fetch.unpack(archive, target)
    assert (target / "my_notes.txt").read_text() == "mine"
    _fetch.fetch(f"{url}/set.tar.gz", _sha(archive), target, force=True)  # asked for: replaced
    assert (target / "a.txt").read_bytes() == b"dataset" and not (target / "my_notes.txt").exists()


@pytest.fixture
def short_server():
    """Announces 2,000 bytes and sends 1,011, then closes: a transfer cut off midway."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2000")
            self.end_headers()
            self.wfile.write(b"r" * 1011)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_download_cut_short_is_refused_even_without_a_checksum(short_server, tmp_path):
    dest = tmp_path / "split.csv"
    with pytest.raises(_fetch.FetchError, match="1,011 of 2,000"):
        _fetch.download(f"{short_server}/split.csv", dest, checksum=None, timeout=5)
    assert not dest.exists() and not list(tmp_path.glob("*.part"))


def test_leftovers_of_a_killed_run_are_removed(server, tmp_path):
    served, url = server
    archive = _tar_gz(served / "set.tar.gz", {"a.txt": b"a"})
    (tmp_path / "downloads").mkdir()
    stale_part = tmp_path / "downloads" / "set.tar.gz.abc123.part"
    stale_part.write_bytes(b"half")
    stale_dir = tmp_path / "t.xyz789.unpacking"
    stale_dir.mkdir()
    (stale_dir / "half.png").write_bytes(b"x")
    _fetch.fetch(f"{url}/set.tar.gz", _sha(archive), tmp_path / "t")
    assert not stale_part.exists() and not stale_dir.exists()
    assert (tmp_path / "t" / "a.txt").read_bytes() == b"a"


def test_an_unresolvable_host_fails_within_the_timeout(tmp_path):
    """Offline, a name lookup alone can take half a minute; the scripts give up at their deadline."""
    t = time.perf_counter()
    with pytest.raises(_fetch.FetchError, match="cannot be reached"):
        _fetch.download("https://uadkit-unreachable.invalid/set.tar.gz", tmp_path / "x.tar.gz", checksum=None, timeout=2)
    assert time.perf_counter() - t < 4
