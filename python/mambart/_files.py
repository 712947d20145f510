"""Every file mambart reads or writes from Python goes through here (issue 23, "hostile
inputs"); the C++ readers use cpp/regular_file.h, and state files are read and written in C++
(cpp/state_file.h) for Python and the C API alike.

open_regular(path, what, error): opens for reading without blocking (O_NONBLOCK), then refuses
    anything that is not a regular file (a FIFO, socket, device such as /dev/zero, directory)
    before a byte is read; a FIFO with no writer can therefore never hang the process.
read_bounded(path, limit, what, error): the whole of a small file (a config, index or
    tokenizer JSON...), refused before reading when it is larger than `limit`;
    at most `limit` bytes are ever read, even from a file that grows meanwhile.
check_size(n, limit, path, what, error): the one size check, for sizes known before a read
    (a zip member's declared size, a header length).
write_atomic(path, write, error): writes through a unique temporary file in the destination's
    directory (tempfile.mkstemp), flushes, fsyncs and renames it over `path`; concurrent
    writers each rename a whole file, and a failure removes the temporary file and raises
    naming `path`.

`error` is the exception class the caller's API raises (ModelLoadError, ConversionError...);
every message starts with the user's path.
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Callable, Type

# The limits. MAX_JSON_BYTES is the C++ config reader's limit (cpp/config.h, kMaxConfigBytes);
# tokenizer.json files of large vocabularies reach tens of MB.
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_TOKENIZER_BYTES = 256 * 1024 * 1024

# Written files get the mode a plain open() gives (0666 less the umask), not mkstemp's 0600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def open_regular(path, what: str = "file", error: Type[Exception] = ValueError):
    """A binary file object for `path`, which must be a regular file (symlinks followed)."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{p}: cannot read the {what}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{p}: the {what} is not a regular file ({_kind(st.st_mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_size(n: int, limit: int, path, what: str = "file",
               error: Type[Exception] = ValueError) -> None:
    if n > limit:
        raise error(f"{os.fspath(path)}: the {what} is {n} bytes, more than the limit of "
                    f"{limit} bytes")


def read_bounded(path, limit: int, what: str = "file",
                 error: Type[Exception] = ValueError) -> bytes:
    """The bytes of regular file `path`, refused unread when larger than `limit`."""
    with open_regular(path, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        check_size(size, limit, path, what, error)
        try:
            # Sized by fstat (a read(limit) would allocate the whole limit up front); a file
            # that grew since is read on in pieces, never past the limit.
            data = f.read(size + 1)
            while len(data) > size and len(data) <= limit:
                more = f.read(min(1 << 20, limit + 1 - len(data)))
                if not more:
                    break
                data += more
        except OSError as e:
            raise error(f"{os.fspath(path)}: cannot read the {what}: {e.strerror or e}") from None
    check_size(len(data), limit, path, what, error)  # it grew after the fstat
    return data


def read_bounded_text(path, limit: int, what: str = "file",
                      error: Type[Exception] = ValueError) -> str:
    data = read_bounded(path, limit, what, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{os.fspath(path)}: the {what} is not UTF-8 text") from None


def write_atomic(path, write: Callable, what: str = "file",
                 error: Type[Exception] = OSError) -> None:
    """Calls write(binary file object) on a unique temporary file next to `path`, then makes
    it `path` in one rename. Readers see the old file or the whole new one, never a mix; of
    concurrent writers, the last rename wins with a whole file."""
    p = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(p))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise error(f"{p}: cannot write the {what}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise error(f"{p}: cannot write the {what}: {e.strerror or e}") from None
        raise
    try:  # the rename itself survives a crash once the directory is synced
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def check_not_nested(src, dst, error: Type[Exception] = ValueError) -> None:
    """Refuses an output directory `dst` that is `src`, contains it, or lies inside it
    (symlinks resolved): replacing such a dst (convert(..., overwrite=True), --force) would
    delete the source, and writing inside the source changes what is being read."""
    s = os.path.realpath(os.fspath(src))
    d = os.path.realpath(os.fspath(dst))
    if s == d:
        raise error(f"{os.fspath(dst)}: the destination is the source directory")
    if os.path.commonpath([s, d]) == d:
        raise error(f"{os.fspath(dst)}: the destination contains the source directory "
                    f"{os.fspath(src)} (replacing it would delete the source)")
    if os.path.commonpath([s, d]) == s:
        raise error(f"{os.fspath(dst)}: the destination is inside the source directory "
                    f"{os.fspath(src)}")
