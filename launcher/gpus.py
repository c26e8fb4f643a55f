"""GPU discovery (NVML behind one small interface) and the pure free-GPU selection logic.

Everything that talks to the driver lives in :class:`NvmlBackend`. Tests and machines without a GPU use
:class:`RecordedBackend`, which reads a JSON file of GPU states named by ``DTRAIN_NVML_RECORD``; the file is
re-read on every snapshot so a test can change it while ``--wait`` polls. Selection (:func:`classify`,
:func:`plan_selection`) is pure: GPU states + thresholds + known reservations in, an ordered candidate
list or a :class:`LaunchError` out. Locking lives in ``launcher/reserve.py``.

No torch, and neither pynvml nor psutil at module load: ``dtrain --help`` must stay fast.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from dist_train.errors import LaunchError

# Test/simulation hook: path of a JSON file of recorded GPU states that replaces NVML entirely.
# Used by the test suite and to rehearse `dtrain launch` / `dtrain gpus` on a machine without GPUs.
NVML_RECORD_ENV = "DTRAIN_NVML_RECORD"

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"

_MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_mb: int | None  # None: the driver does not report it (e.g. under MIG or in containers)
    user: str = "?"
    command: str = "?"


@dataclass(frozen=True)
class GpuState:
    """One CUDA device as NVML sees it: a physical GPU or one MIG instance (then ``mig_parent_uuid`` is set)."""

    index: int  # physical NVML index (PCI bus order); MIG instances carry their parent's index
    uuid: str  # "GPU-..." or "MIG-..."
    name: str
    memory_used_mb: int
    memory_total_mb: int
    utilization_pct: int | None  # None: not reported (MIG instances)
    processes: tuple[GpuProcess, ...] = ()
    mig_parent_uuid: str | None = None
    mig_enabled: bool = False  # a MIG-enabled parent: CUDA uses its MIG instances, never the parent itself
    mig_index: int | None = None  # position of a MIG instance on its parent
    topology_group: str | None = None  # GPUs sharing an NVLink fabric or a PCIe switch share a group

    @property
    def label(self) -> str:
        """Human name: "GPU 3" or "GPU 3 MIG 1"."""
        return f"GPU {self.index}" if self.mig_index is None else f"GPU {self.index} MIG {self.mig_index}"

    @property
    def is_mig(self) -> bool:
        return self.mig_parent_uuid is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["processes"] = [asdict(p) for p in self.processes]
        return data


def gpu_state_from_dict(data: Mapping[str, Any]) -> GpuState:
    processes = tuple(
        GpuProcess(
            pid=int(p["pid"]),
            used_memory_mb=None if p.get("used_memory_mb") is None else int(p["used_memory_mb"]),
            user=str(p.get("user", "?")),
            command=str(p.get("command", "?")),
        )
        for p in data.get("processes", ())
    )
    util = data.get("utilization_pct")
    return GpuState(
        index=int(data["index"]),
        uuid=str(data["uuid"]),
        name=str(data.get("name", "GPU")),
        memory_used_mb=int(data.get("memory_used_mb", 0)),
        memory_total_mb=int(data.get("memory_total_mb", 0)),
        utilization_pct=None if util is None else int(util),
        processes=processes,
        mig_parent_uuid=data.get("mig_parent_uuid"),
        mig_enabled=bool(data.get("mig_enabled", False)),
        mig_index=None if data.get("mig_index") is None else int(data["mig_index"]),
        topology_group=data.get("topology_group"),
    )


# --------------------------------------------------------------------------------------------- backends


class GpuBackend(Protocol):
    """The only way dtrain learns about GPUs. ``snapshot`` never raises: no GPU / no driver → ``[]``."""

    def snapshot(self) -> list[GpuState]: ...

    def why_empty(self) -> str:
        """Why the last snapshot was empty (driver missing, NVML error, zero devices)."""
        ...


class RecordedBackend:
    """GPU states from a JSON file: ``{"gpus": [...], "error": "..."}`` (or a bare list of GPU dicts).

    Re-read on every snapshot, so tests can rewrite the file (atomically) to simulate GPUs becoming free.
    ``"error"`` simulates an NVML failure.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._reason = ""

    def snapshot(self) -> list[GpuState]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self._reason = f"cannot read recorded GPU state {self.path} ({NVML_RECORD_ENV}): {exc}"
            return []
        entries = raw if isinstance(raw, list) else raw.get("gpus", [])
        if isinstance(raw, dict) and raw.get("error"):
            self._reason = f"NVML error (recorded in {self.path}): {raw['error']}"
            return []
        try:
            gpus = [gpu_state_from_dict(e) for e in entries]
        except (KeyError, TypeError, ValueError) as exc:
            self._reason = f"malformed recorded GPU state {self.path}: {exc!r}"
            return []
        self._reason = "" if gpus else f"the recorded state {self.path} lists no GPUs"
        return gpus

    def why_empty(self) -> str:
        return self._reason


class NvmlBackend:
    """Live GPU states from the NVIDIA driver through ``pynvml`` (package ``nvidia-ml-py``)."""

    def __init__(self) -> None:
        self._reason = ""

    def snapshot(self) -> list[GpuState]:
        try:
            import pynvml
        except ImportError:
            self._reason = "the pynvml module (package nvidia-ml-py) is not installed"
            return []
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self._reason = f"NVML is not available: {exc} (no NVIDIA driver on this machine?)"
            return []
        try:
            gpus = _nvml_query_all(pynvml)
        except pynvml.NVMLError as exc:
            self._reason = f"NVML error while listing GPUs: {exc}"
            return []
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass
        self._reason = "" if gpus else "the NVIDIA driver reports 0 devices"
        return gpus

    def why_empty(self) -> str:
        return self._reason


def get_backend(environ: Mapping[str, str] | None = None) -> GpuBackend:
    """The recorded backend if ``DTRAIN_NVML_RECORD`` is set, else live NVML (empty when there is no driver)."""
    env = os.environ if environ is None else environ
    record = env.get(NVML_RECORD_ENV, "")
    return RecordedBackend(record) if record else NvmlBackend()


# --------------------------------------------------------------------------------------------- NVML


def _nvml_text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nvml_optional(pynvml: Any, call: Any, *args: Any, default: Any = None) -> Any:
    """Optional NVML facts (utilisation, MIG, topology) are unsupported on some GPUs; missing ≠ fatal."""
    try:
        return call(*args)
    except pynvml.NVMLError:
        return default


def _nvml_query_all(pynvml: Any) -> list[GpuState]:
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    groups = _nvml_topology_groups(pynvml, handles)
    gpus: list[GpuState] = []
    for index, handle in enumerate(handles):
        parent = _nvml_device_state(pynvml, handle, index, topology_group=groups[index])
        mig_children = _nvml_mig_children(pynvml, handle, parent)
        gpus.append(replace(parent, mig_enabled=bool(mig_children)) if mig_children else parent)
        gpus.extend(mig_children)
    return gpus


def _nvml_device_state(pynvml: Any, handle: Any, index: int, **extra: Any) -> GpuState:
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    util = _nvml_optional(pynvml, pynvml.nvmlDeviceGetUtilizationRates, handle)
    raw_procs = _nvml_optional(pynvml, pynvml.nvmlDeviceGetComputeRunningProcesses, handle, default=[])
    return GpuState(
        index=index,
        uuid=_nvml_text(pynvml.nvmlDeviceGetUUID(handle)),
        name=_nvml_text(pynvml.nvmlDeviceGetName(handle)),
        memory_used_mb=int(memory.used // _MIB),
        memory_total_mb=int(memory.total // _MIB),
        utilization_pct=None if util is None else int(util.gpu),
        processes=tuple(describe_process(p.pid, p.usedGpuMemory) for p in raw_procs or ()),
        **extra,
    )


def _nvml_mig_children(pynvml: Any, handle: Any, parent: GpuState) -> list[GpuState]:
    mode = _nvml_optional(pynvml, pynvml.nvmlDeviceGetMigMode, handle)
    if not mode or mode[0] != pynvml.NVML_DEVICE_MIG_ENABLE:
        return []
    children: list[GpuState] = []
    for slot in range(_nvml_optional(pynvml, pynvml.nvmlDeviceGetMaxMigDeviceCount, handle, default=0)):
        mig = _nvml_optional(pynvml, pynvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot)
        if mig is None:  # empty slot
            continue
        child = _nvml_device_state(
            pynvml, mig, parent.index, mig_parent_uuid=parent.uuid, mig_index=slot, topology_group=parent.topology_group
        )
        children.append(replace(child, utilization_pct=None))  # NVML reports no per-instance utilisation
    return children


def _nvml_topology_groups(pynvml: Any, handles: Sequence[Any]) -> list[str | None]:
    """Union GPUs joined by NVLink (directly or through NVSwitch) or sharing a PCIe switch.

    Collectives between GPUs of one group avoid the CPU's host bridge, so when choosing N of many the
    selection prefers to take all N from one group.
    """
    n = len(handles)
    parent = list(range(n + 1))  # slot n is a virtual node for "an NVSwitch fabric"

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    bus_ids = [_nvml_bus_id(pynvml, h) for h in handles]
    by_bus = {bus: i for i, bus in enumerate(bus_ids) if bus}
    linked: set[int] = set()
    for i, handle in enumerate(handles):
        for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 0)):
            state = _nvml_optional(pynvml, pynvml.nvmlDeviceGetNvLinkState, handle, link)
            if state is None:
                break  # no (more) NVLinks on this GPU
            if not state:
                continue
            remote = _nvml_optional(pynvml, pynvml.nvmlDeviceGetNvLinkRemotePciInfo, handle, link)
            remote_bus = _nvml_text(remote.busId).lower() if remote is not None else ""
            union(i, by_bus.get(remote_bus, n))  # a remote that is not one of our GPUs is an NVSwitch
            linked.add(i)
    for i in range(n):
        for j in range(i + 1, n):
            level = _nvml_optional(pynvml, pynvml.nvmlDeviceGetTopologyCommonAncestor, handles[i], handles[j])
            if level is not None and level <= pynvml.NVML_TOPOLOGY_MULTIPLE:
                union(i, j)
    if not linked and all(find(i) == i for i in range(n)):
        return [None] * n  # no topology information at all: every GPU is equally good
    return [f"group-{find(i)}" for i in range(n)]


def _nvml_bus_id(pynvml: Any, handle: Any) -> str:
    info = _nvml_optional(pynvml, pynvml.nvmlDeviceGetPciInfo, handle)
    return _nvml_text(info.busId).lower() if info is not None else ""


def describe_process(pid: int, used_memory_bytes: int | None) -> GpuProcess:
    """Resolve the owner and command line of a GPU process (it may have exited or be in another PID namespace)."""
    import shlex

    import psutil

    used_mb = None if used_memory_bytes is None else int(used_memory_bytes // _MIB)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            user = proc.username()
            command = shlex.join(proc.cmdline()) or proc.name()
    except psutil.NoSuchProcess:
        user, command = "?", "(process not visible from here)"
    except psutil.AccessDenied:
        user, command = "?", "(access denied)"
    except (KeyError, OSError):  # uid without a passwd entry (containers)
        user, command = "?", "?"
    return GpuProcess(pid=pid, used_memory_mb=used_mb, user=user, command=command)


# --------------------------------------------------------------------------------------------- visibility


def parse_cuda_visible_devices(value: str) -> list[str]:
    """Entries as CUDA reads them: comma separated, stopping at the first invalid one ("-1", "NoDevFiles")."""
    entries: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        entries.append(entry)
    return entries


def _matches_entry(gpu: GpuState, entry: str) -> bool:
    if entry.isdigit():
        # CUDA indices here assume PCI bus order (CUDA_DEVICE_ORDER=PCI_BUS_ID), which is NVML's order and
        # what SLURM and most schedulers write.
        return gpu.index == int(entry)
    # CUDA accepts any unique UUID prefix.
    return gpu.uuid.startswith(entry)


def restrict_to_visible(gpus: Sequence[GpuState], cuda_visible: str | None) -> list[GpuState]:
    """Only the GPUs an existing ``CUDA_VISIBLE_DEVICES`` (e.g. set by SLURM) lets us use, in NVML order.

    Naming a MIG-enabled GPU makes its MIG instances visible too; naming a MIG instance shows only it.
    """
    if cuda_visible is None:
        return list(gpus)
    entries = parse_cuda_visible_devices(cuda_visible)
    named = {g.uuid for g in gpus if any(_matches_entry(g, e) for e in entries if not (e.isdigit() and g.is_mig))}
    return [g for g in gpus if g.uuid in named or (g.mig_parent_uuid in named)]


def query_visible(backend: GpuBackend, environ: Mapping[str, str] | None = None) -> tuple[list[GpuState], str]:
    """Visible GPUs and, when there are none, the reason ("no GPUs found (<reason>)")."""
    env = os.environ if environ is None else environ
    all_gpus = backend.snapshot()
    if not all_gpus:
        return [], backend.why_empty() or "no GPUs reported"
    cuda_visible = env.get(CUDA_VISIBLE_DEVICES)
    visible = restrict_to_visible(all_gpus, cuda_visible)
    if not visible:
        return [], f"{CUDA_VISIBLE_DEVICES}={cuda_visible!r} hides all {len(all_gpus)} GPU(s) of this machine"
    return visible, ""


def visible_gpus(backend: GpuBackend, environ: Mapping[str, str] | None = None) -> list[GpuState]:
    """The GPUs this job may use: the backend's snapshot restricted by ``CUDA_VISIBLE_DEVICES``."""
    return query_visible(backend, environ)[0]


# --------------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class GpuRequest:
    kind: Literal["auto", "count", "explicit", "cpu"]
    count: int = 0
    ids: tuple[str, ...] = ()  # explicit: physical indices as strings, or UUIDs / UUID prefixes
    single: bool = False  # one process (``--debug``): ``auto`` takes one free GPU, not all of them

    def describe(self) -> str:
        if self.kind == "auto" and self.single:
            return "one free GPU"
        if self.kind == "count":
            return f"{self.count} free GPU{'s' if self.count != 1 else ''}"
        if self.kind == "explicit":
            return f"GPU(s) {','.join(self.ids)}"
        return "all free GPUs" if self.kind == "auto" else "the CPU"


_UUID_RE = re.compile(r"^(GPU|MIG)-[0-9A-Za-z/_-]+$")


def parse_request(request: str) -> GpuRequest:
    """``auto`` | ``cpu`` | ``N`` (any N free GPUs) | ``0,3`` or ``3,`` (exactly these physical indices / UUIDs)."""
    text = request.strip()
    lowered = text.lower()
    if lowered in ("auto", "cpu"):
        return GpuRequest(kind=lowered)  # type: ignore[arg-type]
    if text.isdigit():
        if int(text) < 1:
            raise LaunchError(
                f"--gpus {request!r}: a bare number is how many GPUs to take, and 0 GPUs is no request. To name "
                f"GPU {int(text)} write '--gpus {int(text)},' (a list of one); for no GPU use '--gpus cpu'."
            )
        return GpuRequest(kind="count", count=int(text))
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [p for p in ids if not (p.isdigit() or _UUID_RE.match(p))]
    if not ids or bad:
        raise LaunchError(
            f"--gpus {request!r} is not a GPU request. Use 'auto' (all free GPUs), 'cpu', a count such as '2', "
            "or a comma-separated list of physical GPU indices or UUIDs such as '0,3' (a single index: '3,')."
        )
    if len(set(ids)) != len(ids):
        raise LaunchError(f"--gpus {request!r} names a GPU twice.")
    return GpuRequest(kind="explicit", ids=ids)


def single_gpu_request(request: str) -> GpuRequest:
    """``request`` for one process (``--debug``): auto, cpu, 1 or one named GPU; more is a LaunchError."""
    parsed = parse_request(request)
    wanted = parsed.count if parsed.kind == "count" else len(parsed.ids)
    if wanted > 1:
        raise LaunchError(
            f"--gpus {request!r} asks for {wanted} GPUs, but --debug runs one process (no torchrun, no process "
            "group). Use --gpus auto or 1 for one free GPU, --gpus 3, for GPU 3, or --gpus cpu; to try several "
            "GPUs, launch without --debug and a small train.max_steps_per_epoch."
        )
    return replace(parsed, single=True)


def one_gpu_of(request: str) -> str:
    """The one-GPU form of a configured ``launch.gpus`` for ``--debug``: a count becomes 1, a list its first GPU.

    A config describes the full job; ``--debug`` runs the same config as one process without making
    the user edit it. (A ``--gpus`` flag asking for more than one is an error instead, see above.)
    """
    parsed = parse_request(request)
    if parsed.kind == "count":
        return "1"
    if parsed.kind == "explicit":
        return f"{parsed.ids[0]},"
    return request


@dataclass(frozen=True)
class HolderInfo:
    """Who holds a dtrain GPU reservation (written by the holder; trusted only while its lock is held)."""

    uuid: str
    job_id: str
    user: str
    pid: int
    run_dir: str
    started_at: float  # epoch seconds of the reservation
    pid_create_time: float = 0.0  # psutil create_time of ``pid``: tells a live holder from a reused pid
    hostname: str = ""

    def describe(self) -> str:
        if self.pid == 0:
            return "reserved by a dtrain job (its holder record is not readable)"
        return f"reserved by dtrain job {self.job_id} (user {self.user}, pid {self.pid}, run dir {self.run_dir})"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HolderInfo:
        return cls(
            uuid=str(data["uuid"]),
            job_id=str(data.get("job_id", "?")),
            user=str(data.get("user", "?")),
            pid=int(data.get("pid", 0)),
            run_dir=str(data.get("run_dir", "?")),
            started_at=float(data.get("started_at", 0.0)),
            pid_create_time=float(data.get("pid_create_time", 0.0)),
            hostname=str(data.get("hostname", "")),
        )


@dataclass(frozen=True)
class GpuStatus:
    gpu: GpuState
    reasons: tuple[str, ...] = ()  # why the driver says it is busy (empty: free by the thresholds)
    holder: HolderInfo | None = None  # another dtrain job's reservation

    @property
    def free(self) -> bool:
        return not self.reasons and self.holder is None and not self.gpu.mig_enabled

    def describe(self) -> str:
        if self.gpu.mig_enabled:
            return "MIG enabled: use its MIG instances"
        parts = ([self.holder.describe()] if self.holder else []) + list(self.reasons)
        return "free" if not parts else "busy: " + "; ".join(parts)


def _process_text(proc: GpuProcess) -> str:
    mem = "" if proc.used_memory_mb is None else f", {proc.used_memory_mb} MiB"
    return f"pid {proc.pid} (user {proc.user}{mem}: {proc.command})"


def busy_reasons(gpu: GpuState, *, free_memory_mb: int, free_util_pct: int) -> tuple[str, ...]:
    """Why the driver-reported state makes this GPU busy; empty when it is free by the thresholds."""
    reasons: list[str] = []
    if gpu.processes:
        reasons.append("compute processes " + ", ".join(_process_text(p) for p in gpu.processes))
    if gpu.memory_used_mb >= free_memory_mb:
        reasons.append(f"{gpu.memory_used_mb} MiB memory used (free means < {free_memory_mb} MiB)")
    if gpu.utilization_pct is not None and gpu.utilization_pct >= free_util_pct:
        reasons.append(f"{gpu.utilization_pct}% utilisation (free means < {free_util_pct}%)")
    return tuple(reasons)


def classify(
    gpus: Iterable[GpuState],
    *,
    free_memory_mb: int,
    free_util_pct: int,
    holders: Mapping[str, HolderInfo] | None = None,
) -> list[GpuStatus]:
    holders = holders or {}
    return [
        GpuStatus(g, busy_reasons(g, free_memory_mb=free_memory_mb, free_util_pct=free_util_pct), holders.get(g.uuid))
        for g in gpus
    ]


def order_by_topology(candidates: Sequence[GpuState], n: int) -> list[GpuState]:
    """Preference order for taking ``n`` GPUs: one topology group if any can hold all ``n``.

    Best fit (the smallest group that still holds ``n``) keeps large groups whole for larger jobs;
    when no group is big enough, the largest groups come first so the job spans as few as possible.
    Within a group, and between equal groups, physical index order keeps the choice predictable.
    """
    groups: dict[str, list[GpuState]] = {}
    for gpu in candidates:
        groups.setdefault(gpu.topology_group or f"solo-{gpu.uuid}", []).append(gpu)
    members = list(groups.values())
    if not any(g.topology_group for g in candidates):
        return sorted(candidates, key=_index_key)
    fitting = sorted((m for m in members if len(m) >= n), key=lambda m: (len(m), _index_key(m[0])))
    rest = sorted((m for m in members if len(m) < n), key=lambda m: (-len(m), _index_key(m[0])))
    return [gpu for m in fitting + rest for gpu in sorted(m, key=_index_key)]


def _index_key(gpu: GpuState) -> tuple[int, int]:
    return (gpu.index, -1 if gpu.mig_index is None else gpu.mig_index)


def status_report(statuses: Iterable[GpuStatus]) -> str:
    return "; ".join(f"{s.gpu.label} ({short_uuid(s.gpu.uuid)}): {s.describe()}" for s in statuses)


def short_uuid(uuid: str) -> str:
    prefix, _, rest = uuid.partition("-")
    return f"{prefix}-{rest[:8]}" if rest else uuid


@dataclass(frozen=True)
class Plan:
    """Candidates to try-lock in order, and how many locks make the request satisfied."""

    candidates: list[GpuState]
    needed: int  # auto: 1 (take every candidate that locks)
    take_all: bool = False  # auto: keep locking after ``needed``
    statuses: list[GpuStatus] = field(default_factory=list)


def plan_selection(request: GpuRequest, statuses: Sequence[GpuStatus], *, force: bool = False) -> Plan:
    """Pure selection: which GPUs to try, in which order, or a LaunchError explaining each busy GPU.

    ``force`` only overrides the driver-reported busy state of explicitly named GPUs; it never takes a
    GPU reserved by another dtrain job (that job's lock would refuse us anyway).
    """
    if request.kind == "explicit":
        return _plan_explicit(request, statuses, force)
    usable = [s for s in statuses if not s.gpu.mig_enabled]
    free = [s.gpu for s in usable if s.free]
    needed = 1 if request.kind == "auto" else request.count
    if len(free) < needed:
        raise LaunchError(
            f"Not enough free GPUs: asked for {request.describe()}, {len(free)} of {len(usable)} visible GPU(s) "
            f"free. {status_report(statuses)}. Wait for them with --wait [--timeout SECONDS], change the "
            "thresholds (--free-memory-mb, --free-util-pct), name GPUs explicitly with --force, or use --gpus cpu."
        )
    take_all = request.kind == "auto" and not request.single
    return Plan(order_by_topology(free, needed), needed, take_all=take_all, statuses=list(statuses))


def _plan_explicit(request: GpuRequest, statuses: Sequence[GpuStatus], force: bool) -> Plan:
    chosen: list[GpuStatus] = []
    for ident in request.ids:
        matches = [s for s in statuses if _matches_request_id(s.gpu, ident)]
        if len(matches) != 1:
            what = "matches no visible GPU" if not matches else f"matches {len(matches)} GPUs"
            visible = ", ".join(f"{s.gpu.label}={s.gpu.uuid}" for s in statuses) or "none"
            raise LaunchError(
                f"--gpus {','.join(request.ids)}: {ident!r} {what}. Visible GPUs (after {CUDA_VISIBLE_DEVICES}): "
                f"{visible}. Name MIG instances by UUID; run 'dtrain gpus' to see indices and UUIDs."
            )
        chosen.append(matches[0])
    refused = [s for s in chosen if s.gpu.mig_enabled or s.holder is not None or (s.reasons and not force)]
    if refused:
        hint = "" if force else " Use --force to use GPUs the driver reports busy, or --wait to wait for them."
        raise LaunchError(f"Requested GPU(s) not available: {status_report(refused)}.{hint}")
    return Plan([s.gpu for s in chosen], len(chosen), statuses=list(statuses))


def _matches_request_id(gpu: GpuState, ident: str) -> bool:
    if ident.isdigit():
        return not gpu.is_mig and gpu.index == int(ident)
    return gpu.uuid.startswith(ident)
