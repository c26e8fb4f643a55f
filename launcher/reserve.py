"""Race-free GPU reservation with per-GPU ``flock`` locks in a machine-wide lock directory.

One lock file per GPU, named by UUID (indices change with ``CUDA_VISIBLE_DEVICES``; UUIDs do not). A GPU
is ours only once ``flock(LOCK_EX | LOCK_NB)`` on its file succeeds; the launcher keeps the descriptors
open for the job's lifetime and the kernel drops the locks when the process dies, even on SIGKILL, so
there are no stale reservations to clean up.

The directory is shared by every user of the machine (default ``/tmp/dtrain-gpu-locks``, mode 01777),
so everything here assumes other users may plant files: directories and lock files are opened with
``O_NOFOLLOW``, lock files must be regular files with one link, and nothing is ever unlinked or
followed. The holder record (job id, user, pid, run dir) is JSON written into the lock file when we can
write it, else into a sidecar ``<uuid>.holder-<uid>.json``; readers trust a record only while the lock is
actually held.
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from dist_train.errors import LaunchError
from launcher.gpus import (
    GpuBackend,
    GpuState,
    HolderInfo,
    Plan,
    classify,
    get_backend,
    parse_request,
    plan_selection,
    query_visible,
    single_gpu_request,
    status_report,
)

DEFAULT_LOCK_DIR = "/tmp/dtrain-gpu-locks"
# How often --wait re-reads the GPU states, and how often it repeats an unchanged "waiting" line.
WAIT_POLL_S = 2.0
WAIT_REPEAT_S = 30.0
_RECORD_MAX_BYTES = 64 * 1024
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a planted FIFO must not hang us


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class UnsafeLockError(LaunchError):
    """A lock file or directory someone may have planted; waiting will not fix it."""


# --------------------------------------------------------------------------------------------- lock dir


def resolve_lock_dir(lock_dir: str | None) -> str:
    return lock_dir or DEFAULT_LOCK_DIR


def open_lock_dir(lock_dir: str | None, *, create: bool = True) -> int | None:
    """A descriptor on the lock directory (created 01777 if missing); later opens are relative to it.

    Holding the directory by descriptor means a rename of the path after this check cannot redirect us.
    Returns None when ``create`` is false and the directory does not exist.
    """
    path = resolve_lock_dir(lock_dir)
    created = False
    if create:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            os.mkdir(path, 0o700)  # widened with fchmod below; mkdir's mode is cut by the umask
            created = True
        except FileExistsError:
            pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeLockError(
                f"GPU lock directory {path} is a symlink or not a directory; refusing to use it (another user "
                "could redirect the locks). Remove it, or set launch.lock_dir / --lock-dir to a real directory."
            ) from None
        raise
    try:
        if created:
            os.fchmod(fd, 0o1777)  # shared by all users; the sticky bit stops them deleting each other's files
        _check_lock_dir_mode(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_lock_dir_mode(fd: int, path: str) -> None:
    st = os.fstat(fd)
    writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not st.st_mode & stat.S_ISVTX:
        raise UnsafeLockError(
            f"GPU lock directory {path} is writable by other users but lacks the sticky bit (mode "
            f"{stat.S_IMODE(st.st_mode):o}), so they could delete or replace lock files. Fix it with "
            f"'chmod 1777 {path}' (its owner or root), or pick another --lock-dir."
        )


def lock_file_name(uuid: str) -> str:
    # UUIDs are [A-Za-z0-9-]; old MIG names contain '/', which must never become a path separator.
    return "".join(c if c.isalnum() or c == "-" else "_" for c in uuid) + ".lock"


def _sidecar_prefix(uuid: str) -> str:
    return lock_file_name(uuid)[: -len(".lock")] + ".holder-"


# --------------------------------------------------------------------------------------------- lock files


@dataclass
class _HeldLock:
    gpu: GpuState
    fd: int
    writable: bool
    sidecar: str = ""  # name in the lock dir, when the record could not go into the lock file


def _open_lock_file(dir_fd: int, name: str, lock_dir: str) -> tuple[int, bool]:
    """Open (creating if needed) a lock file safely; returns (fd, whether we may write the holder record)."""
    try:
        fd, writable = os.open(name, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o644, dir_fd=dir_fd), True
    except PermissionError:
        # Created by another user: flock works on a read-only descriptor too.
        fd, writable = os.open(name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=dir_fd), False
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _unsafe_lock_file(lock_dir, name, "is a symlink") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else "has several hard links"
        raise _unsafe_lock_file(lock_dir, name, what)
    if writable and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o644:
        os.fchmod(fd, 0o644)  # a strict umask would otherwise lock every other user out of this GPU
    return fd, writable


def _unsafe_lock_file(lock_dir: str, name: str, what: str) -> LaunchError:
    path = os.path.join(lock_dir, name)
    return UnsafeLockError(
        f"GPU lock file {path} {what}; refusing to use it (someone may be trying to redirect dtrain's locks). "
        f"Ask its owner or an administrator to remove it, or use another --lock-dir."
    )


def _try_lock(dir_fd: int, gpu: GpuState, lock_dir: str) -> _HeldLock | None:
    name = lock_file_name(gpu.uuid)
    fd, writable = _open_lock_file(dir_fd, name, lock_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # The name must still lead to the inode we locked; otherwise another file took its place.
    try:
        same = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return _HeldLock(gpu, fd, writable)


def _probe_held(fd: int) -> bool:
    """True if another open file description holds the lock. Takes the lock for an instant when free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


# --------------------------------------------------------------------------------------------- holder records


def _current_holder(uuid: str, job_id: str, run_dir: str) -> HolderInfo:
    import psutil

    return HolderInfo(
        uuid=uuid,
        job_id=job_id,
        user=getpass.getuser(),
        pid=os.getpid(),
        run_dir=os.path.abspath(run_dir) if run_dir else "",
        started_at=time.time(),
        pid_create_time=psutil.Process().create_time(),
        hostname=socket.gethostname(),
    )


def _write_record(dir_fd: int, held: _HeldLock, holder: HolderInfo) -> None:
    data = json.dumps(asdict(holder)).encode()
    if held.writable:
        os.ftruncate(held.fd, 0)
        os.pwrite(held.fd, data, 0)
        return
    # Sidecar in our own name; O_EXCL after removing our own old one means we never write through a planted file.
    sidecar = f"{_sidecar_prefix(held.gpu.uuid)}{os.geteuid()}.json"
    try:
        _unlink_own(dir_fd, sidecar)
        fd = os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o644, dir_fd=dir_fd)
    except OSError:
        return  # the record is informational; the lock alone is the reservation
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    held.sidecar = sidecar


def _write_records(reservation: Reservation, job_id: str, run_dir: str) -> None:
    assert reservation._dir_fd is not None
    for held in reservation._locks:
        try:
            _write_record(reservation._dir_fd, held, _current_holder(held.gpu.uuid, job_id, run_dir))
        except OSError:
            pass  # informational only (disk full, read-only /tmp): the lock is the reservation


def _unlink_own(dir_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if st.st_uid == os.geteuid():
        os.unlink(name, dir_fd=dir_fd)


def _read_small(dir_fd: int, name: str) -> dict[str, Any] | None:
    try:
        fd = os.open(name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.pread(fd, _RECORD_MAX_BYTES, 0)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None  # empty (released) or being rewritten
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int, create_time: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 1.0
    except (psutil.Error, ValueError):
        return False


def _records_for(dir_fd: int, names: list[str], lock_name: str) -> list[HolderInfo]:
    prefix = lock_name[: -len(".lock")] + ".holder-"
    records: list[HolderInfo] = []
    for name in [lock_name] + [n for n in names if n.startswith(prefix)]:
        data = _read_small(dir_fd, name)
        if data is None:
            continue
        try:
            records.append(HolderInfo.from_dict(data))
        except (KeyError, TypeError, ValueError):
            continue
    return records


def _best_record(records: list[HolderInfo]) -> HolderInfo | None:
    """The newest record whose process is still alive (older ones are from earlier holders)."""
    alive = [r for r in records if _pid_alive(r.pid, r.pid_create_time)]
    pool = alive or records
    return max(pool, key=lambda r: r.started_at) if pool else None


def list_holders(lock_dir: str | None, *, probe: bool = True) -> dict[str, HolderInfo]:
    """The dtrain jobs holding GPUs, by UUID. Never creates the lock directory.

    ``probe=True`` (``dtrain gpus``) confirms each lock with a non-blocking flock probe. The chooser
    passes ``probe=False``: a probe holds the lock for an instant and could make a concurrent launch
    fail its try-lock, so there a record counts only if its process is alive (pid + start time); the
    try-lock itself stays the authority either way.
    """
    try:
        dir_fd = open_lock_dir(lock_dir, create=False)
    except LaunchError:
        return {}
    if dir_fd is None:
        return {}
    try:
        names = os.listdir(dir_fd)
        holders: dict[str, HolderInfo] = {}
        for lock_name in (n for n in names if n.endswith(".lock")):
            holder = _holder_of(dir_fd, lock_name, names, probe)
            if holder is not None:
                holders[holder.uuid] = holder
        return holders
    finally:
        os.close(dir_fd)


def _holder_of(dir_fd: int, lock_name: str, names: list[str], probe: bool) -> HolderInfo | None:
    records = _records_for(dir_fd, names, lock_name)
    if probe:
        try:
            fd = os.open(lock_name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=dir_fd)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or not _probe_held(fd):
                return None
        finally:
            os.close(fd)
        best = _best_record(records)
        if best is None:  # held, but the record is not written yet (or was unwritable)
            uuid = lock_name[: -len(".lock")]
            return HolderInfo(uuid=uuid, job_id="?", user="?", pid=0, run_dir="?", started_at=0.0)
        return best
    alive = [r for r in records if _pid_alive(r.pid, r.pid_create_time)]
    return max(alive, key=lambda r: r.started_at) if alive else None


# --------------------------------------------------------------------------------------------- reservation


@dataclass
class Reservation:
    """GPUs locked for this job. Keep it alive (and open) for the job's whole lifetime."""

    gpus: list[GpuState]
    cpu_fallback: bool  # True: --gpus auto found no GPU at all, the job runs on the CPU
    notice: str  # one line for the user when falling back ("" otherwise)
    lock_dir: str = ""
    _locks: list[_HeldLock] = field(default_factory=list, repr=False)
    _dir_fd: int | None = field(default=None, repr=False)

    @property
    def on_cpu(self) -> bool:
        return not self.gpus

    def cuda_visible_devices(self) -> str:
        """Value for the workers' ``CUDA_VISIBLE_DEVICES``.

        UUIDs, not indices: CUDA numbers devices fastest-first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, and an
        inherited CUDA_VISIBLE_DEVICES renumbers them again, so an index could name a different GPU than
        the one we locked. A UUID names exactly the locked device, MIG instances included. "" on CPU.
        """
        return ",".join(g.uuid for g in self.gpus)

    def physical_indices(self) -> list[int]:
        return [g.index for g in self.gpus]

    def release(self) -> None:
        """Clear our holder records and drop the locks (idempotent). Process exit does the same."""
        for held in self._locks:
            try:
                if held.writable:
                    os.ftruncate(held.fd, 0)  # still locked: nobody reads a half-cleared record as valid
                if held.sidecar and self._dir_fd is not None:
                    _unlink_own(self._dir_fd, held.sidecar)
            except OSError:
                pass
            os.close(held.fd)
        self._locks.clear()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_plan(dir_fd: int, plan: Plan, lock_dir: str) -> tuple[list[_HeldLock], list[GpuState]]:
    """Try-lock candidates in preference order; returns (held, lost-to-another-job)."""
    held: list[_HeldLock] = []
    try:
        return _lock_candidates(dir_fd, plan, lock_dir, held)
    except BaseException:
        _release_all(held)  # e.g. a planted symlink for the third GPU: do not keep the first two
        raise


def _lock_candidates(
    dir_fd: int, plan: Plan, lock_dir: str, held: list[_HeldLock]
) -> tuple[list[_HeldLock], list[GpuState]]:
    lost: list[GpuState] = []
    for gpu in plan.candidates:
        if len(held) >= plan.needed and not plan.take_all:
            break
        lock = _try_lock(dir_fd, gpu, lock_dir)
        (held.append(lock) if lock else lost.append(gpu))
    if len(held) < plan.needed and lost:
        # A `dtrain gpus` probe holds a free lock for microseconds; one quick second pass absorbs that.
        time.sleep(0.05)
        retry, lost = lost, []
        for gpu in retry:
            if len(held) >= plan.needed and not plan.take_all:
                break
            lock = _try_lock(dir_fd, gpu, lock_dir)
            (held.append(lock) if lock else lost.append(gpu))
    return held, lost


def _release_all(held: list[_HeldLock]) -> None:
    for lock in held:
        os.close(lock.fd)


def choose_and_reserve(
    request: str,
    *,
    free_memory_mb: int,
    free_util_pct: int,
    lock_dir: str | None,
    force: bool,
    wait: bool,
    timeout: float | None,
    job_id: str,
    run_dir: str,
    environ: Mapping[str, str] | None = None,
    backend: GpuBackend | None = None,
    log: Callable[[str], None] = print_to_stderr,
    poll_interval: float = WAIT_POLL_S,
    single: bool = False,
) -> Reservation:
    """Pick GPUs for ``request`` (auto | N | 0,3 | cpu) and lock them; raise LaunchError if that is impossible.

    With ``wait`` the GPU states are polled until the request can be met (or ``timeout`` seconds pass).
    No GPU at all with ``auto`` gives a CPU reservation with ``cpu_fallback`` and a one-line ``notice``.
    ``single`` (one process, ``--debug``): ``auto`` locks one free GPU, and asking for more is an error.
    """
    parsed = single_gpu_request(request) if single else parse_request(request)
    if parsed.kind == "cpu":
        return Reservation(gpus=[], cpu_fallback=False, notice="")
    env = os.environ if environ is None else environ
    backend = backend or get_backend(env)
    path = resolve_lock_dir(lock_dir)
    deadline = None if timeout is None else time.monotonic() + timeout
    waiter = _WaitReporter(log)
    dir_fd: int | None = None
    try:
        while True:
            gpus, why_none = query_visible(backend, env)
            if not gpus:
                if parsed.kind == "auto":
                    notice = f"dtrain: no GPUs found ({why_none}); running on the CPU."
                    return Reservation(gpus=[], cpu_fallback=True, notice=notice)
                raise LaunchError(f"--gpus {request}: no GPUs found ({why_none}). Use --gpus cpu or auto.")
            if dir_fd is None:
                dir_fd = open_lock_dir(path)
            statuses = classify(
                gpus,
                free_memory_mb=free_memory_mb,
                free_util_pct=free_util_pct,
                holders=list_holders(path, probe=False),
            )
            try:
                plan = plan_selection(parsed, statuses, force=force)
                assert dir_fd is not None  # opened above; handed to a reservation only after this
                held, lost = _lock_plan(dir_fd, plan, path)
                if len(held) >= plan.needed:
                    reservation = Reservation([h.gpu for h in held], False, "", path, held, dir_fd)
                    dir_fd = None  # owned by the reservation now
                    _write_records(reservation, job_id, run_dir)
                    return reservation
                _release_all(held)
                raise _lost_race_error(parsed.describe(), plan, lost, path)
            except UnsafeLockError:
                raise
            except LaunchError as exc:
                if not wait:
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise LaunchError(f"Timed out after {timeout:g} s waiting for GPUs. {exc}") from None
                waiter.report(f"dtrain: waiting for {parsed.describe()}: {status_report(statuses)}")
            time.sleep(poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - time.monotonic())))
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _lost_race_error(wanted: str, plan: Plan, lost: list[GpuState], lock_dir: str) -> LaunchError:
    holders = list_holders(lock_dir, probe=False)
    detail = "; ".join(
        f"{g.label} ({g.uuid}): "
        + (holders[g.uuid].describe() if g.uuid in holders else "reserved by another dtrain job")
        for g in lost
    )
    return LaunchError(
        f"No free GPU: asked for {wanted}, but other dtrain jobs reserved them first: {detail}. "
        "Retry later, or use --wait [--timeout SECONDS]."
    )


class _WaitReporter:
    """Prints what --wait is waiting for when it changes, and otherwise every WAIT_REPEAT_S seconds."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log
        self._last = ""
        self._last_at = 0.0

    def report(self, message: str) -> None:
        now = time.monotonic()
        if message != self._last or now - self._last_at >= WAIT_REPEAT_S:
            self._log(message)
            self._last, self._last_at = message, now


@contextmanager
def reserved(request: str, **kwargs: Any) -> Iterator[Reservation]:
    """``with reserved("2", ...) as r:`` — choose_and_reserve with guaranteed release."""
    reservation = choose_and_reserve(request, **kwargs)
    try:
        yield reservation
    finally:
        reservation.release()
