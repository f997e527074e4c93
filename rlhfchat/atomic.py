"""Write files and folders so that an interrupted run leaves nothing half-written, and sweep what a kill left.

Everything is written under a temporary name beside its destination and renamed into place at the end: a crash,
a kill or a full disk leaves either the old content or the new, never a mix. What a kill leaves is the temporary
itself; `sweep` (called where each stage, and `delta apply`/`make`, starts) removes those of writers that are gone.

The names, one place for them:

    .<name>.<8 random>.<pid>.tmp   the temporary file or folder of a write to <name>, by process <pid>
    .<name>.<pid>.old              atomic_dir's previous <name>, for the moment between its two renames

Modes: what is written gets the modes an ordinary `open()` or `mkdir` would give it (0666 and 0777 less the umask),
not the owner-only ones tempfile gives its temporaries: a model folder or a delta is for others to read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

# tempfile's random part is 8 characters of [a-z0-9_]; the pid is absent in names made before it was added
_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?:\.(?P<pid>\d+))?\.tmp$")
_OLD = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.old$")


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put straight back (once, at import)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file
DIR_MODE = 0o777 & ~_UMASK  # what mkdir gives a new folder


def _temp_args(path: Path) -> dict[str, Any]:
    return {"prefix": f".{path.name}.", "suffix": f".{os.getpid()}.tmp", "dir": path.parent}


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success fsync and rename it to `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(**_temp_args(path))
    os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would make every file we write private
    os.close(fd)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success replace `path` with it, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(**_temp_args(path)))
    os.chmod(tmp, DIR_MODE)  # mkdtemp's 0700 would hide a model folder or a delta from everyone else
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_temporary(name: str) -> bool:
    """Whether a file name is one this module makes (a temporary, or atomic_dir's previous folder)."""
    return bool(_TEMP.match(name) or _OLD.match(name))


def _writer_gone(pid: str | None) -> bool:
    """The process that made a temporary no longer runs (a name without a pid comes from an older rlhfchat)."""
    if pid is None:
        return True
    if int(pid) == os.getpid():
        return False  # ours: written right now (or by a process whose pid we reuse: kept, the safe side)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process
        return False
    return False


def stale(folder: str | os.PathLike, names: Iterable[str] | None = None, recursive: bool = False) -> list[Path]:
    """The temporaries under `folder` whose writer is gone (only those of writes to `names`, when given)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = set(names) if names is not None else None
    found = []
    for root, dirs, files in os.walk(folder):  # symlinks to folders are not followed
        for name in sorted(dirs + files):
            m = _TEMP.match(name) or _OLD.match(name)
            if m and (wanted is None or m["name"] in wanted) and _writer_gone(m["pid"]):
                found.append(Path(root) / name)
        dirs[:] = [d for d in dirs if recursive and not is_temporary(d)]  # nothing to look for inside a temporary
    return found


def sweep(folder: str | os.PathLike, names: Iterable[str] | None = None, recursive: bool = False) -> list[Path]:
    """Remove what interrupted writes left in `folder` (see `stale`) and return it.

    An atomic_dir killed between its two renames leaves no `<name>` but its previous folder as `.<name>.<pid>.old`:
    that one is put back (it is complete), not removed.
    """
    removed = []
    for p in stale(folder, names, recursive):
        m = _OLD.match(p.name)
        dest = p.with_name(m["name"]) if m else None
        if dest is not None and not os.path.lexists(dest):
            os.replace(p, dest)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left in {folder} by an interrupted run", flush=True)
    return removed
