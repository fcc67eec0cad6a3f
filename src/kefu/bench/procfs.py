"""What the bench reads from /proc: a process's memory and CPU time, the machine."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PROC = Path("/proc")

#: The server processes a meter watches: one pid, several (a cluster's nodes), or none.
Pids = int | Sequence[int] | None


def pid_list(pids: Pids) -> list[int]:
    """``pids`` as a list (empty for None)."""
    if pids is None:
        return []
    return [pids] if isinstance(pids, int) else list(pids)


def cpu_seconds_of(pids: Pids) -> float | None:
    """CPU time of every pid in ``pids`` (see :func:`cpu_seconds`), summed; None when
    there is no pid or one of them cannot be read."""
    total = 0.0
    listed = pid_list(pids)
    for pid in listed:
        used = cpu_seconds(pid)
        if used is None:
            return None
        total += used
    return total if listed else None


def parse_vmrss_kb(status: str) -> int | None:
    """The ``VmRSS`` of a /proc/PID/status text, in KiB."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            fields = line.split()
            return int(fields[1]) if len(fields) >= 2 and fields[1].isdigit() else None
    return None


def rss_kb(pid: int) -> int | None:
    """Resident memory of ``pid`` in KiB, or None if it cannot be read."""
    try:
        return parse_vmrss_kb((PROC / str(pid) / "status").read_text())
    except OSError:
        return None


def parse_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from a /proc/PID/stat line; the command name may hold
    spaces and parentheses, so fields are counted after its last ``)``."""
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def parse_ppid(stat: str) -> int:
    """The parent pid (field 4) from a /proc/PID/stat line."""
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) ``pid`` and its live child processes have
    used, in seconds: a node's SQLite writer runs in a child process."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    ticks = parse_cpu_ticks(stat)
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or entry.name == str(pid):
            continue
        try:
            child = (entry / "stat").read_text()
        except OSError:
            continue
        if parse_ppid(child) == pid:
            ticks += parse_cpu_ticks(child)
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        for line in (PROC / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: The speed probe's work: this many additions in a Python loop (about 0.1 s).
SPEED_LOOP = 2_000_000

#: The key of :func:`machine`'s speed figure.
SPEED = "python loop (s)"


def python_speed(rounds: int = 5) -> float:
    """Seconds a fixed single-threaded Python loop takes, the median of ``rounds``: how
    fast this host runs Python now. On a shared machine it moves from minute to minute,
    so figures of two runs compare only at a similar probe."""
    times = []
    for _ in range(rounds):
        started, total = time.perf_counter(), 0
        for i in range(SPEED_LOOP):
            total += i
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def machine() -> dict[str, str]:
    """A short description of the machine the figures come from, with its speed now."""
    try:
        mem_kb = parse_meminfo_total((PROC / "meminfo").read_text())
        memory = f"{mem_kb / 1024 / 1024:.1f} GiB"
    except OSError:
        memory = "unknown"
    return {
        "cpus (nproc)": str(len(os.sched_getaffinity(0))),
        "cpu model": cpu_model(),
        "memory": memory,
        "kernel": platform.release(),
        "python": sys.version.split()[0] + f" ({platform.python_implementation()})",
        SPEED: f"{python_speed():.3f}",
    }


def parse_meminfo_total(meminfo: str, field: str = "MemTotal") -> int:
    """A ``/proc/meminfo`` field in KiB (0 when absent)."""
    for line in meminfo.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def mem_available_kb() -> int | None:
    """The machine's MemAvailable in KiB, or None if it cannot be read."""
    try:
        return parse_meminfo_total((PROC / "meminfo").read_text(), "MemAvailable") or None
    except OSError:
        return None


def parse_machine_busy(stat: str) -> tuple[int, int]:
    """(busy, steal) clock ticks of all CPUs from the ``cpu`` line of /proc/stat."""
    for line in stat.splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            v += [0] * (8 - len(v))
            user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
            return user + nice + system + irq + softirq, steal
    return 0, 0


def machine_busy_seconds() -> tuple[float, float]:
    """CPU-seconds all CPUs have spent busy, and stolen by the hypervisor, since boot."""
    try:
        busy, steal = parse_machine_busy((PROC / "stat").read_text())
    except OSError:
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, steal / tick


class CpuMeter:
    """CPU used over an interval by the server, the client workers and the whole machine,
    each as cores busy on average (1.0 = one core all the time)."""

    def __init__(self, server: Pids, clients: list[int]) -> None:
        self.server = pid_list(server)
        self.clients = clients
        self.started = time.monotonic()
        self._server0 = cpu_seconds_of(self.server)
        self._clients0 = self._clients()
        self._machine0 = machine_busy_seconds()

    def _clients(self) -> float:
        return sum(cpu_seconds(pid) or 0.0 for pid in self.clients)

    def read(self) -> tuple[float, float, float, float]:
        """(server, clients, everything else on the machine, stolen), in cores."""
        wall = max(1e-6, time.monotonic() - self.started)
        nan = float("nan")
        server = nan
        if self.server and self._server0 is not None:
            now = cpu_seconds_of(self.server)
            server = nan if now is None else (now - self._server0) / wall
        clients = (self._clients() - self._clients0) / wall
        busy, steal = machine_busy_seconds()
        machine = (busy - self._machine0[0]) / wall
        other = machine - clients - (0.0 if server != server else server)
        return server, clients, max(0.0, other), (steal - self._machine0[1]) / wall


def wait_quiet(pid: Pids, *, below: float = 0.25, timeout: float = 60.0) -> float:
    """Wait until ``pid`` (summed over several) uses less than ``below`` cores over half
    a second (a server working off a backlog), at most ``timeout`` seconds; return the
    seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = cpu_seconds_of(pid)
        time.sleep(0.5)
        after = cpu_seconds_of(pid)
        if before is None or after is None or (after - before) / 0.5 < below:
            break
    return time.monotonic() - started
