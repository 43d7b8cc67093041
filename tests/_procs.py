"""A clean environment for the tests that start ranks (DDP scripts, ``ddp_fork``, FSDP workers).

The variables a launcher (SLURM, torchelastic, Lightning, MPI, ...) leaves would make Lightning or
torch.distributed join *that* job: they are dropped, and the rendezvous is on a fresh local port.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

import pytest

DROP_ENV_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PL_", "LSB_", "OMPI_", "PMI_")
DROP_ENV = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"}


def _dropped(name: str) -> bool:
    return name in DROP_ENV or name.startswith(DROP_ENV_PREFIXES)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports (all bound at once, so none is handed out twice)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(port: Optional[int] = None, **extra: str) -> dict[str, str]:
    """This process's environment for a child process: no launcher's variables, a rendezvous on ``port``
    (a free one by default), one intra-op thread, unbuffered output; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not _dropped(k)}
    port = free_ports(1)[0] if port is None else port
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def fork_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for ``ddp_fork`` run from the test process itself (skips where fork is missing)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():  # pragma: no cover
        pytest.skip("the fork start method is not available on this platform")
    for k in list(os.environ):
        if _dropped(k):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_ports(1)[0]))
