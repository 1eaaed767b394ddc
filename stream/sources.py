"""Where envelopes come from, apart from Kafka: archived files and memory.

A *source* yields lists of :class:`~stream.alert.Envelope` (micro-batches) from
``batches()``, is told with ``done(batch)`` once the batch's outputs are durable, and
is closed with ``close()``. File sources have nothing to acknowledge.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from stream.alert import Envelope

AVRO_SUFFIXES = (".avro", ".bin", ".msg", ".confluent")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def _is_tar(p: Path) -> bool:
    return p.name.endswith(TAR_SUFFIXES)


def _name(text) -> str:
    """A file or archive member's name as text every output can hold.

    A name that is not UTF-8 (a Latin-1 tar member, a file from an old system) arrives with
    lone surrogates, which no UTF-8 encoder takes: written into an annotation's source it
    had stopped the replay and lost the batch. Its undecodable bytes are written as ``\\xNN``.
    """
    text = str(text)
    if text.isascii():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _dir_key(p: Path):
    """A directory's identity (device, inode), or None if it cannot be looked at."""
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


#: Where ``vigil simulate`` writes its alerts before renaming them ``alerts``: in a walked directory
#: it is skipped (a killed run's alerts, without their truth tables).
PARTIAL_DIR = ".alerts.partial"


def expand_paths(paths, skipped: list | None = None) -> list[Path]:
    """Files to read, in a stable order: directories are walked, archives kept whole.

    In a walked directory only alert files (:data:`AVRO_SUFFIXES`) and archives are read;
    the others, and a :data:`PARTIAL_DIR` directory, are appended to ``skipped`` when it is
    given. A file named on its own is always read.
    """
    out = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            # A subdirectory that cannot be listed is kept as an entry: reading it fails, and it
            # is rejected as unreadable rather than silently missing from the count.
            # Linked subdirectories are followed (a night linked into an archive tree had been left out
            # without a word), each directory once: a link back up the tree does not loop.
            seen = {_dir_key(p)}
            for root, dirs, files in os.walk(p, onerror=lambda e: out.append(Path(e.filename)), followlinks=True):
                keep = []
                for d in sorted(dirs):
                    if d == PARTIAL_DIR:  # what a killed `vigil simulate` left: alerts without truth tables
                        if skipped is not None:
                            skipped.append(Path(root) / d)
                        continue
                    key = _dir_key(Path(root) / d)
                    if key is None or key not in seen:
                        keep.append(d)
                        seen.add(key)
                dirs[:] = keep
                for f in sorted(files):
                    q = Path(root) / f
                    if q.name.endswith(AVRO_SUFFIXES) or _is_tar(q):
                        out.append(q)
                    elif skipped is not None:
                        skipped.append(q)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    return out


def iter_envelopes(paths, expanded: bool = False):
    """Yield one envelope per file, or per member of a tar archive.

    Archives are read as a stream (``r|*``), so a nightly ZTF tarball of several GB
    never sits in memory whole. A file or archive that cannot be read (permission, a
    broken link, a damaged or truncated archive) yields an envelope marked
    ``unreadable`` with the reason, after any members read before the damage: it is
    rejected like any bad input and the replay goes on. So does an archive member that is
    a link or a special file (links are not followed); directory members are skipped.
    """
    for p in (paths if expanded else expand_paths(paths)):  # expanded: a list from expand_paths, not walked again
        if _is_tar(p):
            yield from _tar_envelopes(p)
            continue
        if p.is_dir():  # only a subdirectory os.walk could not list comes here
            yield Envelope(b"", _name(p), unreadable="a directory that cannot be listed (permission?)")
            continue
        try:
            ts = int(p.stat().st_mtime * 1000)
            yield Envelope(p.read_bytes(), _name(p), timestamp_ms=ts)
        except OSError as e:
            yield Envelope(b"", _name(p), unreadable=f"{type(e).__name__}: {e.strerror or e}")


def _tar_envelopes(p: Path):
    name, last = _name(p), "its start"
    try:
        with tarfile.open(p, "r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                if not member.isfile():  # said, not skipped: an alert stored as a link is not read
                    what = "a link" if member.issym() or member.islnk() else "not a regular file"
                    yield Envelope(b"", _name(f"{p}!{member.name}"),
                                   unreadable=f"archive: member is {what} (not followed)")
                    continue
                name = _name(f"{p}!{member.name}")
                fh = tar.extractfile(member)
                yield Envelope(fh.read(), name, timestamp_ms=int(member.mtime * 1000))
                name, last = _name(p), _name(member.name)
            # A streamed tar stops quietly at a damaged or missing header: it must end in
            # zero blocks (its end marker, then padding), or members were lost.
            damage = _tar_tail(tar.fileobj)
            if damage:
                yield Envelope(b"", name, unreadable=f"archive: {damage} after {last}")
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:  # zlib/bz2/lzma errors are OSError or EOFError
        yield Envelope(b"", name, unreadable=f"archive: {type(e).__name__}: {e}")


def _tar_tail(stream) -> str | None:
    """What is wrong with the bytes after a streamed tar's last header, or None."""
    seen = 0
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            return None if seen else "ends without its end-of-archive marker (cut short?)"
        if chunk.strip(b"\0"):
            return "a damaged header (more data follows that is not read)"
        seen += len(chunk)


def count_files(files) -> int | None:
    """Envelopes :func:`iter_envelopes` will yield for ``files`` (:func:`expand_paths`' list); None for archives."""
    return None if any(_is_tar(p) for p in files) else len(files)


def batched(iterable, size: int):
    """Group an iterable into lists of at most ``size``."""
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class FileSource:
    """Archived alerts (files, directories, tarballs) as micro-batches."""

    def __init__(self, paths, batch_size: int = 500, expanded: bool = False):
        self.paths = list(paths)
        self.expanded = expanded  # paths is already expand_paths' list (directories walked)
        self.batch_size = batch_size

    def batches(self):
        yield from batched(iter_envelopes(self.paths, self.expanded), self.batch_size)

    def done(self, batch) -> None:  # files have no offsets
        pass

    def close(self) -> None:
        pass


class MemorySource:
    """Envelopes (or raw bytes) held in memory; for tests and notebooks."""

    def __init__(self, items, batch_size: int = 500):
        self.items = [i if isinstance(i, Envelope) else Envelope(bytes(i), "memory", offset=k)
                      for k, i in enumerate(items)]
        self.batch_size = batch_size
        self.acked: list[int] = []

    def batches(self):
        yield from batched(self.items, self.batch_size)

    def done(self, batch) -> None:
        self.acked.extend(e.offset for e in batch)

    def close(self) -> None:
        pass
