"""The output folder: one job at a time writes it, and only the names the job declares, all or nothing.

Every job writes through ``staged_output``: the outputs are written into a hidden staging folder inside the output
folder and moved into place together on success, so a failed run leaves no partial results and never touches
anything else in the folder. One job at a time writes a folder (``output_lock``), and each job first removes the
staging that killed jobs left there (``remove_stale_staging``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from scripts.errors import InputError

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".tcmn-staging."
# a staging folder is named STAGING_PREFIX + "<pid of its job>." + random, so a later job can tell a killed job's
# from a running one's
_STAGING_PID = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)\.")
LOCK_NAME = ".tcmn-lock"
# errors that mean "the results cannot be written here"; any of them ends the job with the folder and the cause
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY}


def _check_names(names: Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, (str, bytes)):
        raise TypeError(f"output names must be a sequence of names, got the single string {names!r}")
    names = tuple(names)
    for name in names:
        if not name or name in (".", "..") or Path(name).name != name:
            raise ValueError(f"output name {name!r} must be a single file or folder name")
    if len(set(names)) != len(names):
        raise ValueError(f"output names {names} repeat")
    return names


OVERWRITE_HINT = "pass overwrite=True (--overwrite true)"  # how a command-line or Python user asks to overwrite


def prepare_output_dir(path: str | Path, names: Iterable[str], overwrite: bool, hint: str = OVERWRITE_HINT) -> Path:
    """Check that ``path`` may receive the outputs ``names``; creates nothing.

    A folder holding other files is fine: only an existing output of the job's own is refused, unless ``overwrite``;
    the refusal tells how to ask for it with ``hint`` (the app's page has a box to tick instead of a flag).
    """
    path, names = Path(path).absolute(), _check_names(names)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: output path exists and is not a directory")
    existing = [name for name in names if os.path.lexists(path / name)]
    if existing and not overwrite:
        raise InputError(
            f"{path}: output directory already holds results ({', '.join(existing)}); choose another or {hint} to "
            "replace exactly those"
        )
    return path


def _size(num_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError


def _cannot_write(exc: OSError, directory: Path, staging: Path, names: tuple[str, ...]) -> InputError | None:
    """The one-line error for an OSError met while writing: the output (or folder) it concerns and the cause."""
    filename = Path(exc.filename) if exc.filename else None
    if filename is not None and staging in filename.parents:  # the output's final name, not the staging one
        name = filename.relative_to(staging).parts[0]
        filename = directory / name if name in names else directory
    elif exc.errno not in _WRITE_ERRNOS:
        return None  # not about the results (an input that cannot be read is named by its reader)
    return InputError(f"{filename or directory}: cannot write the results: {exc.strerror or exc}")


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p`` that returns the folders it created (outermost first), so a failed run can remove them."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    for p in missing:
        p.mkdir()  # mode 0777 less the umask, like any folder the user creates
    return missing


# folders this process holds the lock of (resolved path -> nesting depth): a job's own nested writes, such as the
# batch report inside the batch's folder, must not refuse each other (two flocks of one process would conflict)
_held: dict[Path, int] = {}


def _holder_line() -> str:
    """Who holds a lock, as the refused job will print it: pid, host, start time and command line."""
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    command = " ".join(getattr(sys, "orig_argv", sys.argv))
    command = command if len(command) <= 300 else command[:297] + "..."
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}"


def _acquire(lock_path: Path) -> int:
    """Open and ``flock`` ``lock_path`` without waiting; returns the descriptor, or raises ``InputError`` naming the
    job that holds it.

    A holder removes the file when it ends, so the file this process locked may already be unlinked: the lock then
    protects nothing, and the path is opened again until the locked file is the one the path names.
    """
    while True:
        handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 4096).decode(errors="replace").strip() or "a job that has not said who it is yet"
            os.close(handle)
            raise InputError(
                f"{lock_path.parent}: another job is writing into this folder ({holder}); wait for it to end or "
                "choose another output folder"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(handle)
                raise
            logger.warning(f"{lock_path.parent}: no file locks on this filesystem; a second job here is not stopped")
            return handle
        except BaseException:
            os.close(handle)
            raise
        try:
            same = os.path.samestat(os.fstat(handle), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            return handle
        os.close(handle)  # the previous holder removed it between our open and flock: take the new one


@contextmanager
def output_lock(directory: str | Path) -> Iterator[Path]:
    """Hold the job's lock on ``directory`` (created if missing, removed again if it is left empty) while writing.

    A second job on the same folder is refused at once with one line naming the first (pid, host, start, command),
    so two jobs never write the same outputs. The lock is ``flock`` on a hidden ``.tcmn-lock`` file in the folder:
    the kernel releases it when its holder ends in any way, SIGKILL included, so a killed job never blocks the next
    one (``fcntl.flock`` rather than a pid file, whose staleness would have to be guessed). The file is removed when
    the job ends; one left by a killed job is taken over and removed by the next job there. Nested use by the same
    process (a job's own writes inside its folder) is allowed. Yields the resolved folder.
    """
    directory = Path(directory).absolute()
    try:
        created = _make_dirs(directory)
    except OSError as exc:
        raise InputError(f"{directory}: cannot create the output directory: {exc.strerror or exc}") from exc
    key = directory.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield key
        finally:
            _held[key] -= 1
        return
    lock_path = key / LOCK_NAME
    try:
        handle = _acquire(lock_path)
    except BaseException as exc:
        _remove_dirs(created)
        if isinstance(exc, OSError):
            raise InputError(f"{directory}: cannot write the results: {exc.strerror or exc}") from exc
        raise
    _held[key] = 1
    try:
        try:
            os.ftruncate(handle, 0)
            os.pwrite(handle, (_holder_line() + "\n").encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds without the note, and the job's own writes will report the disk
        yield key
    finally:
        del _held[key]
        try:
            os.unlink(lock_path)  # while still holding it: a job that opened it meanwhile retries on the new file
        except OSError:
            pass  # removed or made read-only meanwhile: nothing of the user's is at stake
        os.close(handle)
        _remove_dirs(created)


def _pid_runs(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine; a zombie (ended, its exit status not yet collected) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc to ask (not Linux): it exists
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def remove_stale_staging(directory: str | Path) -> list[Path]:
    """Remove the staging folders in ``directory`` that jobs which no longer run left behind (a job killed with
    SIGKILL cannot remove its own); returns them. Call it holding ``output_lock(directory)``: no job can then be
    creating one there. Only the bundle's own hidden ``.tcmn-staging.<pid>.*`` folders are touched: one whose pid
    still runs is kept, and one without a pid comes from a version of the bundle that did not record it.

    A job killed during its hand-over may have set earlier results aside (``.replaced/``): each is put back where
    its name is free again, and a folder still holding any is kept, with a warning, so nothing earlier is lost.
    """
    removed = []
    for path in Path(directory).glob(STAGING_PREFIX + "*"):
        match = _STAGING_PID.match(path.name)
        if not path.is_dir() or path.is_symlink() or (match and _pid_runs(int(match.group(1)))):
            continue
        aside = path / ".replaced"
        if aside.is_dir():
            for entry in list(aside.iterdir()):
                if not os.path.lexists(path.parent / entry.name):
                    os.rename(entry, path.parent / entry.name)
            if any(aside.iterdir()):
                logger.warning(f"{aside}: earlier results set aside by a job that was killed; kept, move them back")
                continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextmanager
def staged_output(
    directory: str | Path,
    names: Iterable[str],
    overwrite: bool = False,
    need_bytes: int = 0,
    need_detail: str = "",
) -> Iterator[Path]:
    """Yield a hidden staging folder inside ``directory``; on success the entries ``names`` move from it into
    ``directory``, and nothing else there is touched.

    The body must write exactly ``names`` (files or folders) into the staging folder. Staging inside the output
    folder keeps every move on one filesystem, so it also works when ``directory`` is a mount point. Existing
    outputs of the same names are refused unless ``overwrite``; replaced ones are moved aside into the staging
    folder and deleted only once every new output is in place (put back if a move fails). On any failure nothing
    new remains, and folders created for the outputs are removed. An ``OSError`` while writing (full disk,
    read-only folder, file-size limit) becomes an ``InputError`` naming the path and the cause. ``need_bytes``
    (an estimate of the outputs' size, described by ``need_detail``) is checked against the free space first.
    """
    names = _check_names(names)
    directory = prepare_output_dir(directory, names, overwrite)
    with output_lock(directory):
        remove_stale_staging(directory)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}.", dir=directory))
        except OSError as exc:
            raise InputError(f"{directory}: cannot write the results: {exc.strerror or exc}") from exc
        with _staged(directory, staging, names, overwrite, need_bytes, need_detail):
            yield staging


@contextmanager
def _staged(
    directory: Path, staging: Path, names: tuple[str, ...], overwrite: bool, need_bytes: int, need_detail: str
) -> Iterator[None]:
    """``staged_output`` once the folder is locked and the staging folder made: the checks, the body and the
    hand-over, or the roll-back."""
    aside, set_aside, placed = staging / ".replaced", [], []
    try:
        free = shutil.disk_usage(staging).free
        if need_bytes > free:
            raise InputError(
                f"{directory}: not enough free space: {_size(free)} free, the outputs need about {_size(need_bytes)}"
                + (f" ({need_detail})" if need_detail else "")
            )
        yield
        written = sorted(p.name for p in staging.iterdir())
        if written != sorted(names):
            raise RuntimeError(f"{directory}: the job wrote {written} instead of its declared outputs {sorted(names)}")
        aside.mkdir()
        for name in names:
            if os.path.lexists(directory / name):
                if not overwrite:  # appeared while the job ran
                    raise InputError(f"{directory / name}: appeared while the job ran; not replaced")
                os.rename(directory / name, aside / name)
                set_aside.append(name)
            os.rename(staging / name, directory / name)
            placed.append(name)
    except BaseException as exc:
        kept = _roll_back(directory, staging, aside, placed, set_aside)
        if kept:  # never delete earlier results that could not be put back
            raise InputError(f"{aside}: could not put back the earlier results {kept}; they are kept here") from exc
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            error = _cannot_write(exc, directory, staging, names)
            if error is not None:
                raise error from exc
        raise
    shutil.rmtree(staging, ignore_errors=True)  # the replaced outputs


def _roll_back(directory: Path, staging: Path, aside: Path, placed: list[str], set_aside: list[str]) -> list[str]:
    """Undo the moves of a failed hand-over; returns the earlier outputs that could not be put back."""
    for name in reversed(placed):
        try:
            os.rename(directory / name, staging / name)
        except OSError:
            pass  # it is the new output; the old one below is what matters
    kept = []
    for name in set_aside:
        try:
            os.rename(aside / name, directory / name)
        except OSError:
            kept.append(name)
    return kept


def _remove_dirs(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            break  # something else appeared there meanwhile: not ours to delete
