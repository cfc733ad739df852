"""Which directory under ``worker.state_dir`` one process keeps its stores in.

Two processes must never open the same RocksDB files, yet a restarted process should
find what it left. Each process therefore claims the first free slot of its consumer
group, ``<state_dir>/<group_id>/0``, ``1``..., by holding an exclusive lock on the
slot's lock file for as long as it runs; the kernel releases the lock when the process
dies, however it dies. One process per host (a pod) always gets slot 0 again.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from urllib.parse import quote

from worker.errors import ConfigError, StoreError

__all__ = ["Claim", "claim"]

# More slots than processes of one group could sensibly share a disk with.
_SLOTS = 64


class Claim:
    """A slot held by this process; ``path`` is its directory."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        """Give the slot up (closing the lock file releases the lock)."""
        os.close(self._fd)


def claim(state_dir: Path, group_id: str) -> Claim:
    """Take the first slot of ``group_id`` under ``state_dir`` that no process holds.

    Raises ``ConfigError`` when the directory cannot be used (not a directory, not
    writable: the setting is wrong), ``StoreError`` when every slot is held.
    """
    name = quote(group_id, safe="")
    if name.startswith("."):  # never ".", "..", or a hidden directory
        name = "%2E" + name[1:]
    group_dir = state_dir / name
    try:
        group_dir.mkdir(parents=True, exist_ok=True)
        for slot in range(_SLOTS):
            path = group_dir / str(slot)
            path.mkdir(exist_ok=True)
            fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return Claim(path, fd)
    except OSError as e:
        raise ConfigError(
            f"worker.state_dir: cannot use {e.filename or group_dir}: {e.strerror}"
        ) from None
    raise StoreError(f"worker.state_dir: all {_SLOTS} slots of {group_dir} are in use")
