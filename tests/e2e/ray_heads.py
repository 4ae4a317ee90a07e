"""Throwaway Ray heads for the tests that need a cluster of their own (``ray job submit``, the
autoscaler): their own ports and temp folder, and a teardown that stops only their processes.

``ray stop --force``, the CLI's only stop (and what ``AutoscalingCluster`` calls), would also kill
every other Ray instance on the machine: the suite's own local cluster, or a training run beside it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_port_flags() -> list[str]:
    """``ray start --head`` flags giving the head ports of its own: the defaults (6379, 52365 …)
    are taken by any other Ray on the machine, and a head whose job agent cannot bind answers
    "No available agent to submit job"."""
    return [
        f"--port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def stop_ray_under(temp_dir: Path) -> None:
    """SIGKILL the Ray processes of the head under ``temp_dir``: the daemons name it on their
    command lines; the workers (whose titles Ray rewrites) and the nodes an autoscaler started
    are found as their descendants."""
    parents = {}
    marked = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")"
            parents[int(entry.name)] = int(
                (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            )
        except (OSError, ValueError, IndexError):
            continue
        if str(temp_dir).encode() in cmdline:
            marked.add(int(entry.name))
    while True:
        children = {pid for pid, parent in parents.items() if parent in marked} - marked
        if not children:
            break
        marked |= children
    for pid in marked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
