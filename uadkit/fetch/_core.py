"""Download, verify and unpack a dataset archive, safely (the code every ``python -m uadkit.fetch`` command shares).

* ``download``: streams to a temporary file beside the target, checks that it received as many
  bytes as the server announced (``Content-Length``) and its sha256 (or the md5 where that is all
  the publisher gives), then renames it into place; a mismatch or a broken transfer leaves
  nothing behind. One attempt with a timeout: offline it fails at once, it never loops on retries.
* ``unpack``: extracts into a temporary sibling folder, then renames it into place and
  writes a ``.uadkit-complete`` marker; a failure leaves no half-written tree, and a
  completed tree is skipped on the next run. Only regular files and folders inside the target
  are accepted (no links, FIFOs or devices; no setuid bits or world-writable modes). A folder
  these commands did not unpack (no marker) is never deleted: ``--force`` replaces it.
* Temporary files a killed run left behind (``*.part``, ``*.unpacking``) are removed by the next run.
* ``install_excepthook``: a command stopped by a FetchError prints ``error: <message>``, not a traceback.
  Only the command line installs it (``python -m uadkit.fetch``, ``data_scripts/``), never an import.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

MARKER = ".uadkit-complete"


class FetchError(RuntimeError):
    pass


def install_excepthook() -> None:
    """From now on a FetchError that stops the program prints its message, not a traceback (it says what to
    do); any other exception goes to the hook that was there. For command-line entries only."""
    default = sys.excepthook
    if getattr(default, "_uadkit_fetch", False):
        return

    def excepthook(kind, value, tb):
        if issubclass(kind, FetchError):
            print(f"error: {value}", file=sys.stderr)
            return
        default(kind, value, tb)

    excepthook._uadkit_fetch = True
    sys.excepthook = excepthook


def default_root() -> Path:
    return Path(os.environ.get("UADKIT_DATA", "~/uadkit_data")).expanduser()


def digest_of(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _parse(checksum: str | None) -> tuple[str, str | None]:
    """"sha256:<hex>" or "md5:<hex>" (what the publisher gives) → (algorithm, hex)."""
    if checksum is None:
        return "sha256", None
    algorithm, _, value = checksum.partition(":")
    if algorithm not in ("sha256", "md5") or not value:
        raise ValueError(f"checksum must look like 'sha256:<hex>' or 'md5:<hex>', got {checksum!r}")
    return algorithm, value.lower()


def unreachable(host: str, port: int = 443, *, timeout: float = 10) -> str | None:
    """Why ``host:port`` cannot be reached within ``timeout`` seconds, or None when it can. The attempt runs
    in a thread that is abandoned at the deadline: offline, a name lookup alone can take half a minute,
    and no socket timeout covers it."""
    import socket
    import threading

    outcome = {}

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as e:
            outcome["error"] = str(e)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return None if outcome.get("ok") else outcome.get("error", f"no answer within {timeout:g} s")


def download(url: str, dest: Path, *, checksum: str | None, timeout: float = 30) -> Path:
    """Fetch ``url`` to ``dest`` and verify ``checksum`` (skipped if ``dest`` already verifies)."""
    dest = Path(dest)
    algorithm, expected = _parse(checksum)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and expected is not None and digest_of(dest, algorithm) == expected:
        return dest
    parts = urllib.parse.urlsplit(url)
    if parts.hostname and (why := unreachable(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                              timeout=min(timeout, 10))):
        raise FetchError(f"could not download {url}: {parts.hostname} cannot be reached ({why})")
    _remove_leftovers(dest.parent, dest.name + ".*.part")
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            announced = resp.headers.get("Content-Length")
            shutil.copyfileobj(resp, out, 1 << 20)
            received = out.tell()
        if announced is not None and received != int(announced):
            raise FetchError(f"download of {url} cut short: received {received:,} of {int(announced):,} bytes; "
                             "run the command again")
        got = digest_of(tmp, algorithm)
        if expected is None:
            print(f"warning: no checksum known for {url}; downloaded file has sha256 {got}")
        elif got != expected:
            raise FetchError(f"{algorithm} mismatch for {url}: expected {expected}, got {got}")
        os.replace(tmp, dest)
    except OSError as e:
        raise FetchError(f"could not download {url}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _remove_leftovers(folder: Path, pattern: str) -> None:
    """Delete what an interrupted run of these commands left in ``folder`` (their own temporary names only)."""
    for stale in folder.glob(pattern):
        print(f"removing {stale.name}, left behind by an interrupted run")
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _regular_members_only(archive: Path, members) -> None:
    """Refuse links, FIFOs, devices and any other special member: a dataset is files and folders."""
    for m in members:
        if not (m.isfile() or m.isdir()):
            kind = "link" if (m.issym() or m.islnk()) else "special file (FIFO or device)"
            raise FetchError(f"{archive} contains a {kind}, {m.name!r}; refusing to unpack it")


def _safe_members(names, target: Path):
    root = target.resolve()
    for name in names:
        resolved = (root / name).resolve()
        if resolved != root and root not in resolved.parents:
            raise FetchError(f"archive member {name!r} would be written outside {target}")


def unpack(archive: Path, target: Path, *, replace: bool = False) -> Path:
    """Extract ``archive`` (tar, tar.gz, tar.xz, zip) so that its contents end up in ``target``.

    A complete ``target`` is kept unless ``replace``; even then it is swapped out only once the
    new copy is fully extracted, so a failed redo never leaves less than there was.
    """
    target = Path(target)
    if (target / MARKER).is_file() and not replace:
        print(f"{target} is complete; skipping (delete it or pass --force to redo)")
        return target
    _refuse_foreign(target, replace)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target.parent, target.name + ".*.unpacking")
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".", suffix=".unpacking"))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                _safe_members(z.namelist(), work)
                z.extractall(work)
        else:
            try:
                with tarfile.open(archive) as t:
                    _safe_members(t.getnames(), work)
                    _regular_members_only(archive, t.getmembers())
                    # the "data" filter also clears setuid/setgid bits and group/other write permission
                    t.extractall(work, filter="data")
            except tarfile.TarError as e:
                raise FetchError(f"{archive} is not a readable archive: {e}") from e
        (work / MARKER).write_text(str(archive.name))
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _refuse_foreign(target: Path, replace: bool) -> None:
    """A non-empty ``target`` without the marker holds someone's files: never delete them unasked."""
    if target.is_dir() and not (target / MARKER).is_file() and any(target.iterdir()) and not replace:
        raise FetchError(f"{target} exists and was not unpacked by uadkit.fetch (no {MARKER} in it); "
                         "move your files elsewhere, or pass --force to replace the folder")
    if target.exists() and not target.is_dir():
        raise FetchError(f"{target} exists and is not a folder; move it elsewhere first")


def fetch(url: str, checksum: str | None, target: Path, *, force: bool = False, timeout: float = 30) -> Path:
    """Download to ``<target>.download/`` and unpack into ``target``."""
    target = Path(target)
    if (target / MARKER).is_file() and not force:
        print(f"{target} is complete; nothing to do")
        return target
    _refuse_foreign(target, force)  # before the download: say so at once, not after gigabytes
    archive = download(url, target.parent / "downloads" / url.rsplit("/", 1)[-1], checksum=checksum, timeout=timeout)
    return unpack(archive, target, replace=force)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--root", type=Path, default=default_root(), help="datasets folder (default: $UADKIT_DATA or ~/uadkit_data)")
    p.add_argument("--force", action="store_true", help="download and unpack again even if complete")
    return p
