"""Enumerate packing inputs from directories and zip/tar archives, deterministically.

Order (the record order of the output depends on nothing else):

1. the SRC arguments in the order given;
2. inside a directory SRC, every file by its relative path compared as *bytes*
   (so the order does not depend on the locale, the file system or ``os.walk``);
3. an archive (a SRC, or an archive file met inside a directory) contributes its
   members sorted by member path as bytes, at the archive's own position.

Names are handled as bytes. A name that is not UTF-8 is recorded with
``backslashreplace`` (``caf\\xe9.jpg``), which is valid UTF-8 for the shard's
``source`` array and still shows the original bytes; the file itself is opened
through its original bytes, so such files are packed, not lost.

Directory symlinks are not followed (a link loop cannot hang the walk); file
symlinks are followed, and a dangling one is reported as ``unreadable``. Only
regular files are ever opened: a FIFO named ``x.jpg`` would otherwise block.

Reading an input (file, zip or tar member) is bounded by :func:`read_capped`: the first
64 KiB are read, an input without an accepted image signature stops there (``not_image``),
one whose header declares too many pixels stops there (``too_large_pixels``), and the rest
is read only up to what the declared size could need (``too_large_file`` past it). A zip
"bomb" of zeros named ``.png`` costs one 64 KiB inflate per member, not gigabytes; one
behind a valid 64x64 PNG header costs ~16 MiB.
"""
from __future__ import annotations

import os
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from data_prep.images import (
    HEAD_BYTES, HEADER_SLACK_BYTES, byte_budget, header_size, not_image_detail, signature_format, too_many_pixels,
)

IMAGE_EXTENSIONS: frozenset[bytes] = frozenset(
    {b".jpg", b".jpeg", b".jpe", b".jfif", b".png", b".tif", b".tiff", b".bmp", b".webp", b".gif"}
)
ZIP_EXTENSIONS: tuple[bytes, ...] = (b".zip",)
TAR_EXTENSIONS: tuple[bytes, ...] = (b".tar", b".tar.gz", b".tgz", b".tar.bz2", b".tbz2", b".tar.xz", b".txz")

# A member or file above this many bytes is refused before it is read: the largest
# legitimate inputs (16-bit GeoTIFF scenes under the default pixel limit) stay well below,
# and a zip member that claims more is almost certainly a zip bomb.
MAX_INPUT_BYTES = 2 * 1024 ** 3

KIND_FILE = "file"
KIND_ZIP = "zip"
KIND_TAR = "tar"


@dataclass(frozen=True, slots=True)
class InputItem:
    """One candidate image (or one input already known to be unusable).

    ``reason`` is set when enumeration itself found the input unusable (a broken
    archive, a dangling link, an encrypted member); such items are counted under that
    reason and never opened.
    """

    source: str
    """Provenance recorded in the shard: relative path / archive member, valid UTF-8."""
    kind: str
    """``file``, ``zip`` or ``tar``."""
    path: str
    """File system path of the file or archive (``os.fsdecode`` form, opens the original bytes)."""
    member: str
    """Zip: the member's index in the archive directory, as text; tar: member name; file: empty."""
    size: int
    """Size in bytes (the member's uncompressed size for archives)."""
    mtime_ns: int
    """Modification time of the file or archive; part of the resume fingerprint."""
    reason: str | None = None
    """Skip reason known at enumeration time, else ``None``."""
    detail: str = ""
    """Human-readable cause for ``reason``."""


@dataclass
class Enumeration:
    """All inputs in order plus the number of files ignored for their extension."""

    items: list[InputItem]
    ignored: int


def safe_name(raw: bytes) -> str:
    """Bytes of a path -> UTF-8-safe text (non-UTF-8 bytes shown as ``\\xNN``)."""
    return raw.decode("utf-8", "backslashreplace")


def _suffix_of(name: bytes) -> bytes:
    low = name.lower()
    for ext in TAR_EXTENSIONS:
        if low.endswith(ext):
            return ext
    return os.path.splitext(low)[1]


def is_image_name(name: bytes) -> bool:
    return _suffix_of(name) in IMAGE_EXTENSIONS


def archive_kind(name: bytes) -> str | None:
    suffix = _suffix_of(name)
    if suffix in ZIP_EXTENSIONS:
        return KIND_ZIP
    if suffix in TAR_EXTENSIONS:
        return KIND_TAR
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _zip_member_bytes(info: zipfile.ZipInfo) -> bytes:
    # zipfile decodes names as cp437 unless the UTF-8 flag (bit 11) is set; encoding back
    # with the same codec recovers the bytes stored in the archive exactly.
    if info.flag_bits & 0x800:
        return info.filename.encode("utf-8", "surrogateescape")
    return info.filename.encode("cp437")


def _enumerate_zip(path: str, prefix: str, mtime_ns: int, out: list[InputItem]) -> int:
    ignored = 0
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        out.append(InputItem(prefix or safe_name(os.fsencode(path)), KIND_ZIP, path, "", 0, mtime_ns,
                             "broken_archive", f"{type(e).__name__}: {e}"))
        return 0
    members: list[tuple[bytes, int, zipfile.ZipInfo]] = []
    for index, info in enumerate(infos):
        if info.is_dir():
            continue
        raw = _zip_member_bytes(info)
        if not is_image_name(raw):
            ignored += 1
            continue
        members.append((raw, index, info))
    members.sort(key=lambda m: (m[0], m[1]))
    for raw, index, info in members:
        source = _join(prefix, safe_name(raw))
        reason, detail = None, ""
        if info.flag_bits & 0x1:
            reason, detail = "unreadable", "encrypted zip member"
        elif info.file_size > MAX_INPUT_BYTES:
            reason, detail = "too_large_file", f"{info.file_size} bytes"
        out.append(InputItem(source, KIND_ZIP, path, str(index), info.file_size, mtime_ns, reason, detail))
    return ignored


def _enumerate_tar(path: str, prefix: str, mtime_ns: int, out: list[InputItem]) -> int:
    ignored = 0
    members: list[tuple[bytes, tarfile.TarInfo]] = []
    broken: str | None = None
    try:
        with tarfile.open(path, mode="r:*", encoding="utf-8", errors="surrogateescape") as tf:
            # Iterate by hand: a truncated archive raises part-way, and the members read
            # before the damage are still good inputs.
            while True:
                info = tf.next()
                if info is None:
                    break
                if info.isdir():
                    continue
                raw = info.name.encode("utf-8", "surrogateescape")
                if not is_image_name(raw):
                    ignored += 1
                    continue
                members.append((raw, info))
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
        broken = f"{type(e).__name__}: {e}"
    if broken is not None and not members:
        out.append(InputItem(prefix or safe_name(os.fsencode(path)), KIND_TAR, path, "", 0, mtime_ns,
                             "broken_archive", broken))
        return ignored
    members.sort(key=lambda m: m[0])
    for raw, info in members:
        reason, detail = None, ""
        if not info.isreg():
            reason, detail = "unreadable", "tar member is not a regular file"
        elif info.size > MAX_INPUT_BYTES:
            reason, detail = "too_large_file", f"{info.size} bytes"
        out.append(InputItem(_join(prefix, safe_name(raw)), KIND_TAR, path, info.name, info.size, mtime_ns,
                             reason, detail))
    if broken is not None:
        # The damaged tail is still counted, once, after the members that survived.
        out.append(InputItem(prefix or safe_name(os.fsencode(path)), KIND_TAR, path, "", 0, mtime_ns,
                             "broken_archive", broken))
    return ignored


def _walk_files(root: bytes) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, str]]]:
    """All non-directory entries under ``root`` as (relative path, absolute path) bytes,
    plus directories that could not be listed."""
    files: list[tuple[bytes, bytes]] = []
    errors: list[tuple[bytes, str]] = []
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root, rel_dir) if rel_dir else root
        try:
            with os.scandir(abs_dir) as it:
                entries = list(it)
        except OSError as e:
            errors.append((rel_dir, f"{type(e).__name__}: {e.strerror or e}"))
            continue
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append(rel)
            else:
                files.append((rel, entry.path))
    files.sort()
    errors.sort()
    return files, errors


def _stat_regular(path: bytes) -> tuple[os.stat_result | None, str]:
    try:
        st = os.stat(path)
    except OSError as e:
        return None, f"{type(e).__name__}: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    return st, ""


def _enumerate_path(src: bytes, out: list[InputItem]) -> int:
    """Append the inputs of one SRC argument; return how many files were ignored."""
    ignored = 0
    if os.path.isdir(src):
        files, errors = _walk_files(src)
        for rel, err in errors:
            out.append(InputItem(safe_name(rel) or ".", KIND_FILE, os.fsdecode(os.path.join(src, rel)), "", 0, 0,
                                 "unreadable", f"cannot list directory: {err}"))
        for rel, abs_path in files:
            ignored += _enumerate_file(abs_path, safe_name(rel), out, inside_dir=True)
        return ignored
    return _enumerate_file(src, safe_name(os.path.basename(src.rstrip(b"/"))), out, inside_dir=False)


def _enumerate_file(path: bytes, name: str, out: list[InputItem], inside_dir: bool) -> int:
    kind = archive_kind(path)
    image = is_image_name(path)
    if kind is None and not image:
        if inside_dir:
            return 1
        out.append(InputItem(name, KIND_FILE, os.fsdecode(path), "", 0, 0, "not_image",
                             "not a directory, archive or image file name"))
        return 0
    st, err = _stat_regular(path)
    if st is None:
        out.append(InputItem(name, kind or KIND_FILE, os.fsdecode(path), "", 0, 0, "unreadable", err))
        return 0
    if kind == KIND_ZIP:
        # An archive given as SRC contributes bare member paths; one found inside a
        # directory is prefixed with its relative path so the source stays unambiguous.
        return _enumerate_zip(os.fsdecode(path), name if inside_dir else "", st.st_mtime_ns, out)
    if kind == KIND_TAR:
        return _enumerate_tar(os.fsdecode(path), name if inside_dir else "", st.st_mtime_ns, out)
    reason, detail = None, ""
    if st.st_size > MAX_INPUT_BYTES:
        reason, detail = "too_large_file", f"{st.st_size} bytes"
    out.append(InputItem(name, KIND_FILE, os.fsdecode(path), "", st.st_size, st.st_mtime_ns, reason, detail))
    return 0


def enumerate_inputs(sources: list[str | os.PathLike[str]]) -> Enumeration:
    """Every input of ``sources`` in the packing order (see the module docstring)."""
    items: list[InputItem] = []
    ignored = 0
    for src in sources:
        raw = os.fsencode(src)
        if not os.path.exists(raw) and not os.path.islink(raw):
            raise FileNotFoundError(f"input {os.fsdecode(raw)!r} does not exist")
        ignored += _enumerate_path(raw, items)
    return Enumeration(items, ignored)


class InputReadError(Exception):
    """Reading an input's bytes failed; ``reason`` is the skip reason to count."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def read_capped(f: BinaryIO, max_pixels: int) -> bytes:
    """The bytes of one input, read no further than an image of its declared size needs.

    Reads 64 KiB first; more only while the header (the image size) has not parsed, in
    doubling windows. Raises :class:`InputReadError`, without reading the rest, with
    ``not_image`` (no accepted signature), ``too_large_pixels`` (the header declares more
    than ``max_pixels``), ``corrupt`` (no header within 16 MiB; TIFF excepted, whose
    directory may lie anywhere) or ``too_large_file`` (more bytes than the declared size can
    need: :func:`data_prep.images.byte_budget`; without a header, that of ``max_pixels``,
    and never more than ``MAX_INPUT_BYTES``).
    """
    head = f.read(HEAD_BYTES)
    if not head:
        return head
    fmt = signature_format(head)
    if fmt is None:
        raise InputReadError("not_image", not_image_detail(head))
    cap = min(MAX_INPUT_BYTES, byte_budget(max_pixels, 1))
    if len(head) < HEAD_BYTES:
        return head  # the whole input; the decoder checks everything else
    while (size := header_size(head)) is None:
        if fmt != "TIFF" and len(head) >= HEADER_SLACK_BYTES:
            raise InputReadError("corrupt", f"{fmt} signature but no image header in the first {len(head)} bytes")
        if len(head) > cap:
            raise InputReadError("too_large_file", f"more than {cap} bytes without a parsable {fmt} header; "
                                                   "not read further")
        more = f.read(min(len(head), cap + 1 - len(head)))
        head += more
        if not more:
            return head  # the whole input; the decoder reports the damaged header
    too_large = too_many_pixels(size[0], size[1], max_pixels)
    if too_large is not None:
        raise InputReadError("too_large_pixels", too_large)
    limit = min(cap, byte_budget(*size))
    data = head + f.read(max(0, limit + 1 - len(head)))
    if len(data) > limit:
        raise InputReadError("too_large_file", f"more than {limit} bytes, more than a {size[0]}x{size[1]} image "
                                               "needs (a decompression bomb?); not read further")
    return data


class ZipCache:
    """Open zip archives of one process, reused across the members of a batch."""

    def __init__(self) -> None:
        self._open: dict[str, zipfile.ZipFile] = {}

    def get(self, path: str) -> zipfile.ZipFile:
        zf = self._open.get(path)
        if zf is None:
            zf = self._open[path] = zipfile.ZipFile(path)
        return zf

    def close(self) -> None:
        for zf in self._open.values():
            zf.close()
        self._open.clear()


class TarReader:
    """Reads tar members in the main process (tar has no cheap random access when
    compressed, so members are read once, in order, and handed to the workers)."""

    def __init__(self, max_pixels: int) -> None:
        self._max_pixels = max_pixels
        self._path: str | None = None
        self._tf: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}

    def read(self, item: InputItem) -> bytes:
        try:
            if self._path != item.path:
                self.close()
                self._tf = tarfile.open(item.path, mode="r:*", encoding="utf-8", errors="surrogateescape")
                self._path = item.path
                self._members = {}
                # getmembers() would raise on a truncated archive; enumeration kept the
                # members before the damage, so collect those by hand and stop there.
                while True:
                    try:
                        info = self._tf.next()
                    except (tarfile.TarError, OSError, EOFError, zlib.error):
                        break
                    if info is None:
                        break
                    self._members[info.name] = info
            assert self._tf is not None
            info = self._members.get(item.member)
            if info is None:
                raise InputReadError("broken_archive", "member vanished from the archive")
            f = self._tf.extractfile(info)
            if f is None:
                raise InputReadError("unreadable", "tar member is not a regular file")
            data = read_capped(f, self._max_pixels)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            self.close()
            raise InputReadError("broken_archive", f"{type(e).__name__}: {e}") from e
        if len(data) != item.size:
            raise InputReadError("broken_archive", f"member is truncated ({len(data)} of {item.size} bytes)")
        return data

    def close(self) -> None:
        if self._tf is not None:
            self._tf.close()
        self._tf = None
        self._path = None
        self._members = {}


def read_item(item: InputItem, zips: ZipCache, max_pixels: int) -> bytes:
    """Bytes of a file or zip member, through :func:`read_capped` (tar members come from
    :class:`TarReader`)."""
    if item.kind == KIND_FILE:
        try:
            with open(item.path, "rb") as f:
                return read_capped(f, max_pixels)
        except OSError as e:
            raise InputReadError("unreadable", f"{type(e).__name__}: {e.strerror or e}") from e
    if item.kind == KIND_ZIP:
        try:
            zf = zips.get(item.path)
            info = zf.infolist()[int(item.member)]
            with zf.open(info) as f:
                return read_capped(f, max_pixels)
        except RuntimeError as e:  # zipfile raises RuntimeError for encrypted members
            raise InputReadError("unreadable", f"{e}") from e
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, IndexError, ValueError) as e:
            raise InputReadError("broken_archive", f"{type(e).__name__}: {e}") from e
    raise ValueError(f"read_item cannot read {item.kind} inputs")


def describe_sources(sources: list[str | os.PathLike[str]]) -> list[str]:
    """Absolute SRC paths as text, for the fingerprint and the manifest."""
    return [safe_name(os.fsencode(Path(s).resolve())) for s in sources]

