"""uadkit.fetch (``python -m uadkit.fetch``, and its wrappers in data_scripts/): download + verify + atomic unpack,
against a small archive served from 127.0.0.1; the command line."""
import functools
import hashlib
import http.server
import importlib
import io
import pkgutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

import uadkit.fetch
from uadkit.fetch import _core

ROOT = Path(__file__).resolve().parents[1]


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
    out = _core.fetch(f"{url}/set.tar.gz", _sha(archive), target)
    assert (out / "bottle/train/good/000.png").read_bytes() == b"x" * 100
    assert (out / _core.MARKER).is_file()
    archive.unlink()  # a re-run must not need the network
    assert _core.fetch(f"{url}/set.tar.gz", "sha256:" + "0" * 64, target) == target
    assert not list(target.parent.glob("*.unpacking")) and not list(target.parent.glob("downloads/*.part"))


def test_force_redoes_but_never_deletes_a_tree_it_cannot_replace(server, tmp_path):
    served, url = server
    archive = _tar_gz(served / "set.tar.gz", {"a.txt": b"old"})
    target = _core.fetch(f"{url}/set.tar.gz", _sha(archive), tmp_path / "t")
    bad = served / "bad.tar.gz"
    bad.write_bytes(b"not an archive")
    with pytest.raises(_core.FetchError):
        _core.fetch(f"{url}/bad.tar.gz", _sha(bad), target, force=True)
    assert (target / "a.txt").read_bytes() == b"old" and (target / _core.MARKER).is_file()
    new = _tar_gz(served / "new.tar.gz", {"a.txt": b"new"})
    _core.fetch(f"{url}/new.tar.gz", _sha(new), target, force=True)
    assert (target / "a.txt").read_bytes() == b"new"


def test_md5_checksums_are_accepted(server, tmp_path):
    served, url = server
    archive = _tar_gz(served / "c.tar.gz", {"cifar-10-batches-py/test_batch": b"abc"})
    md5 = "md5:" + hashlib.md5(archive.read_bytes()).hexdigest()
    out = _core.fetch(f"{url}/c.tar.gz", md5, tmp_path / "cifar10")
    assert (out / "cifar-10-batches-py/test_batch").read_bytes() == b"abc"


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    served, url = server
    _tar_gz(served / "set.tar.gz", {"a.txt": b"a"})
    with pytest.raises(_core.FetchError, match="mismatch"):
        _core.fetch(f"{url}/set.tar.gz", "sha256:" + "0" * 64, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    assert not any((tmp_path / "downloads").iterdir())


def test_broken_archive_leaves_no_target(server, tmp_path):
    served, url = server
    bad = served / "bad.tar.gz"
    bad.write_bytes(b"this is not an archive")
    with pytest.raises(_core.FetchError, match="not a readable archive"):
        _core.fetch(f"{url}/bad.tar.gz", _sha(bad), tmp_path / "t")
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob("t.*"))


def test_path_traversal_is_refused(tmp_path):
    archive = _tar_gz(tmp_path / "evil.tar.gz", {"../escaped.txt": b"boo"})
    with pytest.raises(_core.FetchError, match="outside"):
        _core.unpack(archive, tmp_path / "out" / "t")
    assert not (tmp_path / "out" / "escaped.txt").exists() and not (tmp_path / "out" / "t").exists()


def test_unreachable_server_fails_fast(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    with pytest.raises(_core.FetchError, match="could not download"):
        _core.download(f"http://127.0.0.1:{port}/x.tar", tmp_path / "x.tar", checksum=None, timeout=3)
    assert time.perf_counter() - t < 5 and not list(tmp_path.iterdir())


def test_bad_checksum_spec():
    with pytest.raises(ValueError, match="sha256"):
        _core._parse("crc32:1234")


def test_scripts_parse_their_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("UADKIT_DATA", str(tmp_path))
    sources = [(importlib.import_module(f"uadkit.fetch.{n}").URL, importlib.import_module(f"uadkit.fetch.{n}").CHECKSUM)
               for n in ("mvtec", "visa")]
    sources += list(importlib.import_module("uadkit.fetch.cifar").SOURCES.values())
    for url, checksum in sources:
        algorithm, value = _core._parse(checksum)
        assert url.startswith("https://") and len(value) == {"sha256": 64, "md5": 32}[algorithm]
    assert _core.parser("x").parse_args([]).root == tmp_path


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
    with pytest.raises(_core.FetchError, match="003.png"):
        _core.unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_setuid_and_world_writable_modes_are_dropped(tmp_path):
    member = tarfile.TarInfo("train/good/001.png")
    member.mode = 0o6777
    out = _core.unpack(_tar_with(tmp_path / "modes.tar.gz", member, b"data"), tmp_path / "out")
    mode = (out / "train/good/001.png").stat().st_mode
    assert not mode & 0o6000 and not mode & 0o002  # no setuid/setgid, not world-writable


def test_a_folder_the_scripts_did_not_unpack_is_never_deleted(server, tmp_path):
    served, url = server
    archive = _tar_gz(served / "set.tar.gz", {"a.txt": b"dataset"})
    target = tmp_path / "mvtec"
    target.mkdir()
    (target / "my_notes.txt").write_text("mine")
    with pytest.raises(_core.FetchError, match="--force"):
        _core.fetch(f"{url}/set.tar.gz", _sha(archive), target)
    with pytest.raises(_core.FetchError, match="--force"):
        _core.unpack(archive, target)
    assert (target / "my_notes.txt").read_text() == "mine"
    _core.fetch(f"{url}/set.tar.gz", _sha(archive), target, force=True)  # asked for: replaced
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
    with pytest.raises(_core.FetchError, match="1,011 of 2,000"):
        _core.download(f"{short_server}/split.csv", dest, checksum=None, timeout=5)
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
    _core.fetch(f"{url}/set.tar.gz", _sha(archive), tmp_path / "t")
    assert not stale_part.exists() and not stale_dir.exists()
    assert (tmp_path / "t" / "a.txt").read_bytes() == b"a"


def test_an_unresolvable_host_fails_within_the_timeout(tmp_path):
    """Offline, a name lookup alone can take half a minute; the scripts give up at their deadline."""
    t = time.perf_counter()
    with pytest.raises(_core.FetchError, match="cannot be reached"):
        _core.download("https://uadkit-unreachable.invalid/set.tar.gz", tmp_path / "x.tar.gz", checksum=None, timeout=2)
    assert time.perf_counter() - t < 4


# --------------------------------------------------------------------------- the command line: python -m uadkit.fetch

COMMANDS = sorted(m.name for m in pkgutil.iter_modules(uadkit.fetch.__path__) if not m.name.startswith("_"))
WRAPPERS = {"fetch_weights" if n == "weights" else n: n for n in COMMANDS}  # data_scripts/<script>.py -> command


def _python(*args, cwd=ROOT, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command_one_line_each():
    assert len(COMMANDS) == 8 and sorted(uadkit.fetch.COMMANDS) == COMMANDS  # the table names every module
    out = _python("-m", "uadkit.fetch", "--help")
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert sorted(listed) == COMMANDS
    wrong = _python("-m", "uadkit.fetch", "mvtc")
    assert wrong.returncode == 2 and "unknown name 'mvtc'" in wrong.stderr and "Traceback" not in wrong.stderr


def test_a_download_that_fails_prints_one_error_line_and_no_traceback(tmp_path):
    """``python -m uadkit.fetch mvtec`` offline. Its URL points at a closed local port (set in the child, before
    ``__main__`` runs), so the test is the same with or without a network and never starts a 5 GB download."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import runpy, sys; import uadkit.fetch.mvtec as m; "
            f"m.URL = 'http://127.0.0.1:{port}/mvtec_anomaly_detection.tar.xz'; "
            f"sys.argv = ['-m', 'mvtec', '--root', {str(tmp_path / 'data')!r}]; "
            "runpy.run_module('uadkit.fetch', run_name='__main__', alter_sys=True)")
    t = time.perf_counter()
    out = _python("-c", code, timeout=60)
    assert time.perf_counter() - t < 10
    lines = out.stderr.splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: could not download http://127.0.0.1:{port}/") and "Traceback" not in out.stderr
    assert not (tmp_path / "data" / "mvtec").exists() and not any((tmp_path / "data" / "downloads").iterdir())


def test_importing_uadkit_fetch_leaves_the_excepthook_alone():
    """The notebooks import uadkit: only the command line may replace sys.excepthook."""
    modules = ", ".join(["uadkit.fetch", "uadkit.fetch._core", "uadkit.fetch.__main__", "uadkit.data.fake"]
                        + [f"uadkit.fetch.{n}" for n in COMMANDS])
    out = _python("-c", f"import sys; hook = sys.excepthook; import {modules}; assert sys.excepthook is hook")
    assert out.returncode == 0, out.stderr


def test_the_command_line_hook_prints_a_fetch_error_and_passes_the_rest_on(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(kind))
    _core.install_excepthook()
    _core.install_excepthook()  # a second call adds no second layer
    sys.excepthook(_core.FetchError, _core.FetchError("no network"), None)
    sys.excepthook(KeyError, KeyError("x"), None)
    assert capsys.readouterr().err == "error: no network\n" and seen == [KeyError]


def test_data_scripts_holds_one_wrapper_per_command():
    assert sorted(p.stem for p in (ROOT / "data_scripts").glob("*.py")) == sorted(WRAPPERS)


@pytest.mark.parametrize("script", sorted(WRAPPERS))
def test_each_wrapper_still_runs(script, tmp_path):
    out = _python(str(ROOT / "data_scripts" / f"{script}.py"), "--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: {script}.py"), out.stderr
    assert f"python -m uadkit.fetch {WRAPPERS[script]}" in " ".join(out.stdout.split())  # the command's own docstring


def test_a_wrapper_prints_a_fetch_error_as_one_line(tmp_path):
    (tmp_path / "cub200").write_text("not a folder")  # refused before any download
    for args in ([str(ROOT / "data_scripts" / "cub.py")], ["-m", "uadkit.fetch", "cub"]):
        out = _python(*args, "--root", str(tmp_path), cwd=tmp_path)
        assert out.returncode == 1 and out.stderr.splitlines() == [
            f"error: {tmp_path / 'cub200'} exists and is not a folder; move it elsewhere first"], out.stderr
