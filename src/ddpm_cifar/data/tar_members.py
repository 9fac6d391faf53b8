"""Reading a tar archive's members in place, never extracting them, and refusing unsafe ones.

The fetch stage reads images and pickles straight out of a ``.tar``/``.tar.gz``; nothing from an
archive is ever written to disk. Every member is still checked before anything is read, by the
rules that keep an extraction inside its folder: no absolute names, no ``..``, no path through a
link member, no symlink or hard link whose target lies outside the archive, no device or fifo.
So an archive is accepted or refused the same way however it is consumed, and "cannot escape
its folder" holds for every archive the pipeline takes.

Errors (unreadable, truncated or corrupt archives, unsafe members) are one-line
:class:`~ddpm_cifar.runtime.errors.UserError` messages.
"""

from __future__ import annotations

import contextlib
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

from ..runtime.errors import UserError

# A path inside an archive or image folder, as components relative to its root.
Parts = tuple[str, ...]

# Errors that a truncated or corrupt (compressed) tar raises while being read.
TAR_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def one_line(exc: BaseException) -> str:
    """``str(exc)`` on one line (tarfile's "could not be opened" message spans several)."""
    return " ".join(str(exc).splitlines())


def member_parts(member: tarfile.TarInfo) -> Parts:
    """``member``'s name as path components, without empty and ``.`` components."""
    return tuple(p for p in member.name.split("/") if p not in ("", "."))


def _walk_inside(parts: Iterable[str], links: set[Parts]) -> Parts | None:
    """Resolve ``parts`` lexically from the archive root.

    Returns the normalised path, or None when it climbs above the root or continues *below*
    a link member: where such a path lands on disk depends on the link's target, which a
    lexical check cannot follow (``b -> .`` then ``b/../x`` escapes although it looks inside).
    """
    stack: list[str] = []
    for comp in parts:
        if comp in ("", "."):
            continue
        if stack and tuple(stack) in links:
            return None
        if comp == "..":
            if not stack:
                return None
            stack.pop()
        else:
            stack.append(comp)
    return tuple(stack)


def _member_problem(member: tarfile.TarInfo, links: set[Parts]) -> str | None:
    """Why ``member`` could reach outside the archive's folder, or None if it is safe."""
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return "device, fifo or other special file"
    name = member.name
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute():
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "path contains '..'"
    where = _walk_inside(parts, links)
    if where is None:
        return "path goes through a link inside the archive"
    if not where and not member.isdir():
        return "empty name"
    if member.issym():
        if member.linkname.startswith("/"):
            return f"symlink to absolute path {member.linkname!r}"
        # A symlink target is relative to the folder that holds the link.
        if _walk_inside([*where[:-1], *member.linkname.split("/")], links) is None:
            return f"symlink target {member.linkname!r} leaves the archive or goes through a link"
    if member.islnk():
        if member.linkname.startswith("/"):
            return f"hard link to absolute path {member.linkname!r}"
        # A hard link target is relative to the archive root.
        if _walk_inside(member.linkname.split("/"), links) is None:
            return f"hard link target {member.linkname!r} leaves the archive or goes through a link"
    return None


def check_members(members: Sequence[tarfile.TarInfo], label: str) -> None:
    """Raise :class:`UserError` for the first member that could reach outside the archive."""
    links = {member_parts(m) for m in members if m.issym() or m.islnk()}
    for member in members:
        problem = _member_problem(member, links)
        if problem is not None:
            raise UserError(f"{label}: refusing unsafe archive member {member.name!r}: {problem}")


@contextlib.contextmanager
def open_checked(path: Path) -> Iterator[tuple[tarfile.TarFile, list[tarfile.TarInfo]]]:
    """Open the tar at ``path`` (any compression) and list its members, all of them checked."""
    label = str(path)
    try:
        tar = tarfile.open(path, "r:*")
    except TAR_READ_ERRORS as exc:
        raise UserError(f"{label}: not a readable .tar/.tar.gz archive: {one_line(exc)}") from exc
    with tar:
        try:
            members = tar.getmembers()
        except TAR_READ_ERRORS as exc:
            raise UserError(f"{label}: cannot read the archive: {one_line(exc)}") from exc
        check_members(members, label)
        yield tar, members


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> bytes:
    """The bytes of ``member`` (a link is read as its target inside the archive).

    ``name`` is how messages call the member. Read errors of the archive itself are left to the
    caller, which knows whether the whole archive is at fault.
    """
    try:
        fh = tar.extractfile(member)
    except KeyError as exc:  # a link to a member the archive does not hold
        raise UserError(f"{name}: cannot read it: {exc.args[0] if exc.args else exc}") from exc
    if fh is None:
        raise UserError(f"{name} is not a regular file")
    with fh:
        return fh.read()
