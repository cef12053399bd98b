"""A memory cgroup for each sandboxed run, so that `memory_bytes` bounds the whole program.

RLIMIT_AS bounds the address space of one process: memory that no process maps (a memfd, SysV
shared memory, files in a tmpfs) escapes it, and every fork gets a fresh allowance. A memory cgroup
counts all of it, for every process the run starts: user memory, shared memory and tmpfs pages, and
the kernel memory the kernel charges to the cgroup. The launcher joins its run's cgroup before it
forks anything, so the program, its children and the namespace's init are all inside; the program
cannot leave (no cgroup file system exists in its view, and it has no capabilities to mount one).

Where the cgroup comes from:

- cgroup v1 (a `memory` hierarchy, as on hosts booted with the hybrid layout): a child of this
  process's own memory cgroup, which must be writable (as root it is).
- cgroup v2: a child of the nearest cgroup, from this process's own upward, that has `memory` in its
  cgroup.subtree_control and is writable by the caller. As root on a host that is the root cgroup
  or a systemd slice; rootless it needs a delegated subtree (for instance a trainer started with
  `systemd-run --user --scope -p Delegate=yes`, whose parent slice in user@UID.service is the
  user's). Our own cgroup never qualifies unless it is the root: v2 forbids processes in a cgroup
  whose controllers are enabled for its children.

Swap is closed (memory.swap.max = 0, or memory.memsw.limit_in_bytes = the limit in v1) where the
kernel accounts it. Where neither version offers a writable place, `find_memory_cgroups` returns None
and the sandbox falls back to its per-process limits (see docs/rewards.md for what holds then).
"""

import itertools
import os
import time
import warnings

_V1_FILES = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
_V2_FILES = ("memory.max", "memory.swap.max")


def _mounts(mountinfo: str) -> dict[str, tuple[str, str]]:
    """{"v1" or "v2": (mount point, the hierarchy path mounted there)} for the memory controller."""
    found = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        sep = fields.index("-")
        root, point, fstype, options = fields[3], fields[4], fields[sep + 1], fields[sep + 3]
        if fstype == "cgroup" and "memory" in options.split(","):
            found.setdefault("v1", (point, root))
        elif fstype == "cgroup2":
            found.setdefault("v2", (point, root))
    return found


def _own_paths(self_cgroup: str) -> dict[str, str]:
    """{"v1": path in the memory hierarchy, "v2": path in the unified one} of this process."""
    paths = {}
    for line in self_cgroup.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            paths["v2"] = path
        elif "memory" in controllers.split(","):
            paths["v1"] = path
    return paths


def _directory(point: str, root: str, path: str) -> str | None:
    """Where cgroup `path` appears under a mount of hierarchy path `root` at `point`."""
    if root == "/":
        return os.path.normpath(point + path)
    if path == root or path.startswith(root + "/"):
        return os.path.normpath(point + path[len(root):])
    return None


def _writable(directory: str) -> bool:
    return os.access(directory, os.W_OK | os.X_OK) and os.access(os.path.join(directory, "cgroup.procs"), os.W_OK)


def _parent(mountinfo: str, self_cgroup: str) -> tuple[int, str] | None:
    """(version, the directory that run cgroups are created in), or None where there is none."""
    mounts, paths = _mounts(mountinfo), _own_paths(self_cgroup)
    if "v1" in mounts:  # the memory controller lives on one hierarchy only: then v2 has none
        own = _directory(*mounts["v1"], paths["v1"]) if "v1" in paths else None
        return (1, own) if own and _writable(own) else None
    if "v2" not in mounts or "v2" not in paths:
        return None
    point = mounts["v2"][0]
    candidate = _directory(*mounts["v2"], paths["v2"])
    while candidate and (candidate == point or candidate.startswith(point + "/")):
        try:
            with open(os.path.join(candidate, "cgroup.subtree_control")) as f:
                enabled = "memory" in f.read().split()
        except OSError:
            enabled = False
        if enabled and _writable(candidate):
            return 2, candidate
        if candidate == point:
            break
        candidate = os.path.dirname(candidate)
    return None


class MemoryCgroups:
    """Creates a memory cgroup limited to `limit_bytes` for each run, and removes it afterwards."""

    def __init__(self, version: int, parent: str, limit_bytes: int):
        self.version, self.parent, self.limit_bytes = version, parent, limit_bytes
        self._names = itertools.count()

    def create(self) -> str:
        """A new, empty cgroup with the limit set; its directory."""
        path = os.path.join(self.parent, f"fusedrl-sandbox-{os.getpid()}-{next(self._names)}")
        os.mkdir(path)
        try:
            limit, swap = _V1_FILES if self.version == 1 else _V2_FILES
            _write(os.path.join(path, limit), str(self.limit_bytes))
            # v1 bounds memory plus swap and must be set after the memory limit; v2 bounds swap alone.
            if os.path.exists(os.path.join(path, swap)):
                _write(os.path.join(path, swap), str(self.limit_bytes) if self.version == 1 else "0")
        except BaseException:
            os.rmdir(path)
            raise
        return path

    def oom_kills(self, path: str) -> int:
        """Processes the kernel killed in this cgroup for want of memory."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            with open(os.path.join(path, name)) as f:
                fields = dict(line.split() for line in f if line.strip())
        except OSError:
            return 0
        return int(fields.get("oom_kill", 0))

    def remove(self, path: str, timeout_s: float = 5.0) -> None:
        """Kill what is left (the namespace is already dying), wait until it is empty, remove it."""
        if self.version == 2 and os.path.exists(os.path.join(path, "cgroup.kill")):
            _write(os.path.join(path, "cgroup.kill"), "1")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                os.rmdir(path)
                return
            except OSError as exc:  # EBUSY while a process of the run is still exiting
                if time.monotonic() > deadline:
                    warnings.warn(f"sandbox cgroup {path} could not be removed: {exc}", RuntimeWarning, stacklevel=2)
                    return
            time.sleep(0.002)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def find_memory_cgroups(limit_bytes: int) -> MemoryCgroups | None:
    """Run cgroups for this process, tried once (create, limit, remove); None where none can be had."""
    try:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
        with open("/proc/self/cgroup") as f:
            self_cgroup = f.read()
    except OSError:
        return None
    found = _parent(mountinfo, self_cgroup)
    if found is None:
        return None
    cgroups = MemoryCgroups(*found, limit_bytes)
    try:
        os.rmdir(cgroups.create())
    except OSError:
        return None
    return cgroups
