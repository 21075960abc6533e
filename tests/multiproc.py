"""Run a script or module under torchrun on this machine: N processes, gloo, 127.0.0.1, a free port.

    out = torchrun(["-m", "dsv3", "train", ...], nproc=2)       # -> the completed process (stdout, stderr)
    out = torchrun([WORKER, "fsdp", str(tmp_path)], nproc=2)

A failing rank fails the call with every rank's output in the message. Threads: one per process (2 cores)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int, timeout: float = 300, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "--max-restarts=0", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and out.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} exited {out.returncode}\n--- stdout\n{out.stdout[-6000:]}"
                             f"\n--- stderr\n{out.stderr[-8000:]}")
    return out
