"""Helper of slurm/distill.sbatch: the parts of bootstrapping Ray on a Slurm allocation that are long in shell.

    python slurm/ray_cluster.py ports JOB_ID         -> shell assignments of this job's Ray ports
    python slurm/ray_cluster.py head-ip NODE         -> the IPv4 address of a Slurm node (its NodeAddr)
    python slurm/ray_cluster.py node-ports JOB_ID I  -> `ray start` port flags of the job's node I (0 = head)
    python slurm/ray_cluster.py wait ADDRESS N SECS [PID...] -> poll `ray status` until N nodes are alive

Standard library only: it runs in the job's environment before anything is imported from the project.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

# Ports of one Ray node, as offsets from the job's base port. Jobs that share a host (and the two "nodes" of a
# one-machine test Slurm) must not collide, so every port is fixed per job and per node rather than Ray's
# defaults (6379, 10001, 52365, ...), which a second head or worker on the same host would find taken.
# The blocks lie between Ray's worker ports (10002-19999) and Linux's ephemeral range (32768 and up by default):
# a fixed port inside the ephemeral range can be held by any process's outgoing connection, and a raylet that
# cannot bind its port never registers ("The current node timed out during startup", on every retry; seen in CI
# with job 150's block at 35000).
GCS, CLIENT, DASHBOARD = 0, 1, 2
PER_NODE = 4  # node i: node manager, object manager, agent http, agent grpc at base + 8 + 4 i + 0..3
BASE_LOW, BASE_SPAN, BASE_STEP = 20000, 127, 100  # blocks up to 32699: below 32768


def job_ports(job_id: int) -> dict[str, int]:
    """Base port of a job: a 100-port block in [20000, 32700) picked by the job id."""
    base = BASE_LOW + (job_id % BASE_SPAN) * BASE_STEP
    return {"RAY_PORT": base + GCS, "RAY_CLIENT_PORT": base + CLIENT, "RAY_DASHBOARD_PORT": base + DASHBOARD}


def node_ports(job_id: int, node_index: int) -> list[str]:
    """`ray start` port flags of node `node_index` (0 = head) of job `job_id`."""
    first = BASE_LOW + (job_id % BASE_SPAN) * BASE_STEP + 8 + PER_NODE * node_index
    names = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
    )
    return [f"--{name}={first + i}" for i, name in enumerate(names)]


def head_ip(node: str) -> str:
    """A node's NodeAddr from `scontrol show node`, resolved to IPv4 (hostnames resolve on the node itself)."""
    out = subprocess.run(
        ["scontrol", "show", "node", node], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"NodeAddr=(\S+)", out)
    addr = match.group(1) if match else node
    return socket.gethostbyname(addr)


def alive_nodes(status: str) -> int:
    """Alive nodes in `ray status` output: the lines under "Active:" up to "Pending:"."""
    block = re.search(r"Active:\n(.*?)\n\s*Pending:", status, re.S)
    if block is None:
        return 0
    return sum(int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+node_\w+", block.group(1), re.M))


def wait_for_nodes(address: str, nodes: int, timeout: float, pids: list[int]) -> int:
    """Poll `ray status` until `nodes` nodes are alive; exits non-zero with the last status after `timeout`, or
    at once when one of `pids` (the srun steps running `ray start`) has exited."""
    deadline, status = time.monotonic() + timeout, ""
    while True:
        gone = [pid for pid in pids if not _running(pid)]
        if gone:
            sys.exit(
                f"ray_cluster: the `ray start` step(s) {gone} exited before {nodes} nodes joined {address}"
            )
        proc = subprocess.run(["ray", "status", f"--address={address}"], capture_output=True, text=True)
        status = proc.stdout + proc.stderr
        seen = alive_nodes(status) if proc.returncode == 0 else 0
        if seen >= nodes:
            return seen
        if time.monotonic() > deadline:
            sys.exit(
                f"ray_cluster: {seen} of {nodes} Ray nodes after {timeout:.0f} s; last `ray status`:\n{status}"
            )
        time.sleep(1.0)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "ports":
        for key, value in job_ports(int(args[0])).items():
            print(f"{key}={value}")
    elif command == "node-ports":
        print(" ".join(node_ports(int(args[0]), int(args[1]))))
    elif command == "head-ip":
        print(head_ip(args[0]))
    elif command == "wait":
        address, nodes, timeout, pids = args[0], int(args[1]), float(args[2]), [int(p) for p in args[3:]]
        start = time.monotonic()
        seen = wait_for_nodes(address, nodes, timeout, pids)
        print(f"ray_cluster: {seen} Ray nodes alive after {time.monotonic() - start:.1f} s", file=sys.stderr)
    else:
        sys.exit(f"ray_cluster: unknown command {command!r}; use ports, node-ports, head-ip or wait")


if __name__ == "__main__":
    main(sys.argv[1:])
