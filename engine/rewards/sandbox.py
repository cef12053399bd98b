"""Run untrusted Python programs in isolated processes, several at a time.

Each program gets its own process tree (see sandbox_child.py for the launcher) with:

- no network: a fresh network namespace whose only interface, loopback, is down;
- a fresh pid namespace: the program cannot see or signal host processes, and when its namespace's
  init exits (the program finished, or the launcher was killed) the kernel kills every process left;
- a minimal, read-only file system: a fresh mount namespace pivoted into a new root that holds
  read-only binds of /usr (and /bin, /lib... where they are directories), the interpreter's install
  prefix and /etc/ld.so.cache, the /dev nodes null, zero, random and urandom, a fresh /proc, and one
  writable, size-capped tmpfs at /tmp/work where the program runs. The host's root is detached: the
  caller's files, /home, /root, the rest of /etc and the repository do not exist for the program,
  and nothing of the host's is writable;
- no new privileges, no capabilities, and a seccomp filter that refuses the kernel keyring calls and
  the ways to hold memory that no process maps (memfd_create, memfd_secret, shmget);
- a memory cgroup per run where one can be had (sandbox_cgroup.py), so the memory limit bounds the
  whole program; and limits on CPU time, each process's address space, file size and process count,
  a clean environment, and a wall-clock timeout after which the caller kills the launcher's whole
  process group and what is left in the run's cgroup;
- stdout and stderr read incrementally and capped: past `max_output_bytes` the run is killed.

Two modes, chosen by who runs it. As root, the program runs as an unprivileged uid of its own
(`first_uid + slot`), so RLIMIT_NPROC (which root ignores) counts exactly its processes. As any other
user ("rootless"), the launcher first creates a user namespace mapping the caller's uid to
`first_uid + slot`, which needs unprivileged user namespaces and Linux 5.14+: since 5.14 the kernel
counts RLIMIT_NPROC per user namespace, and every run has its own, so the process limit binds each
run's processes alone although all of them are the caller's uid on the host. The program cannot
nest another user namespace.

It fails closed: `Sandbox()` runs a probe program and raises SandboxUnavailableError, saying why,
when isolation cannot be set up; a run whose isolation fails is reported as "refused" and no user
code runs. The only way around that is `allow_unisolated_execution_UNSAFE=True`, which keeps the
limits, the clean environment, the timeout and the output cap but runs the program as the caller.
"""

import json
import math
import os
import queue
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from fusedrl.engine.rewards.sandbox_cgroup import find_memory_cgroups

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
_FIRST_UID, _MAX_SLOTS = 2**24, 64  # far above the uids and subuid ranges distributions hand out
_CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/tmp/work"}


def _world_executable(path: str) -> bool:
    """True when any uid may run `path`: the file is o+rx and every directory above it o+x."""
    path = os.path.realpath(path)
    try:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def default_python() -> str:
    """This interpreter if the program's uid can run it, else a system python3.

    Rootless, the program keeps the caller's uid on the host, so it can; as root it runs as another
    uid, which cannot run an interpreter under a 0700 home.
    """
    if os.geteuid() != 0:
        return os.path.realpath(sys.executable)
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if _world_executable(candidate):
            return os.path.realpath(candidate)
    return os.path.realpath(sys.executable)


_NEEDS = {
    False: "As root, isolation needs CAP_SYS_ADMIN and CAP_SETUID (a container may drop them).",
    True: "As a non-root user, isolation needs unprivileged user namespaces (sysctls user.max_user_namespaces "
    "> 0, and where they exist kernel.unprivileged_userns_clone = 1 and "
    "kernel.apparmor_restrict_unprivileged_userns = 0) and Linux 5.14+.",
}


def _rootless_unsupported() -> str:
    """Why this kernel cannot contain a fork bomb in rootless mode; empty when it can."""
    release = os.uname().release
    version = re.match(r"(\d+)\.(\d+)", release)
    if version and (int(version[1]), int(version[2])) >= (5, 14):
        return ""
    return f"Linux {release} counts RLIMIT_NPROC per host uid, not per user namespace as 5.14+ does"


class SandboxUnavailableError(RuntimeError):
    """Isolation cannot be set up on this machine; no program was run."""


@dataclass(frozen=True)
class Limits:
    """Per-program resource limits."""

    timeout_s: float = 2.0
    """Wall-clock limit; the whole process tree is killed when it passes."""
    memory_bytes: int = 512 * 2**20
    """Memory of the whole program (a memory cgroup: every process, shared memory, files in /tmp/work),
    and the address-space limit (RLIMIT_AS) of each process; without a cgroup, the latter only."""
    max_processes: int = 16
    """Processes and threads the program may have at once (RLIMIT_NPROC; rootless, per user namespace)."""
    max_output_bytes: int = 2**20
    """Cap on each of stdout and stderr; a program that writes more is killed."""
    max_file_bytes: int = 16 * 2**20
    """Largest file the program may write (RLIMIT_FSIZE)."""
    tmpfs_bytes: int = 64 * 2**20
    """Size of the program's writable working directory, /tmp/work (a tmpfs)."""

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_bytes", "max_processes", "max_output_bytes", "max_file_bytes", "tmpfs_bytes"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RunResult:
    """What happened to one program run."""

    status: str
    """"exited" (returncode says how), "timed_out", "output_limit" or "refused" (never ran)."""
    returncode: int | None
    """Exit code, or 128 + signal number; None unless status is "exited"."""
    stdout: str
    stderr: str
    wall_s: float
    reason: str
    """Empty for a clean exit; otherwise a short human-readable cause."""


class Sandbox:
    """Runs one program at a time per call; thread-safe, so a pool may call `run` concurrently.

    Args:
        limits: the resource limits of every run.
        python: interpreter for the programs (and the launcher); default: `default_python()`. Its
            install prefix is bound read-only into the program's view. Programs run with -I (no
            PYTHON* variables, no user site-packages, not even the script's own directory).
        first_uid: programs run as uid `first_uid + slot` (slot < 64). As root these are host uids,
            which must own no files and run no other processes, since RLIMIT_NPROC counts all
            processes of a uid; the default derives a block of 64 uids from the process id, so two
            trainers on one host (or two test workers) do not share uids. Rootless, it is the uid
            inside each run's user namespace, the caller's uid on the host.
        allow_unisolated_execution_UNSAFE: run programs without namespaces or the uid change when
            isolation is unavailable. Untrusted code then runs with the caller's privileges.

    Attributes `rootless` (the mode: not root, so a user namespace per run), `isolated` (False
    only after the unsafe fallback) and `memory_scope` ("cgroup v1" or "cgroup v2": memory_bytes
    bounds the whole program; "process": it bounds each process's address space) say how programs run.
    """

    def __init__(
        self,
        limits: Limits = Limits(),
        *,
        python: str | None = None,
        first_uid: int | None = None,
        allow_unisolated_execution_UNSAFE: bool = False,
    ):
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a Limits, got {type(limits).__name__}")
        if first_uid is None:
            first_uid = _FIRST_UID + (os.getpid() % 2**20) * _MAX_SLOTS
        if not (isinstance(first_uid, int) and 0 < first_uid < 2**31 - _MAX_SLOTS):
            raise ValueError(f"first_uid must be an int in (0, 2**31 - {_MAX_SLOTS}), got {first_uid!r}")
        self.limits = limits
        self.python = os.path.realpath(python or default_python())
        self.first_uid = first_uid
        self.isolated = True
        self.rootless = os.geteuid() != 0
        self.cgroups = find_memory_cgroups(limits.memory_bytes)
        self.memory_scope = f"cgroup v{self.cgroups.version}" if self.cgroups else "process"
        why = (_rootless_unsupported() if self.rootless else "") or self._probe()
        if why:
            if not allow_unisolated_execution_UNSAFE:
                raise SandboxUnavailableError(
                    f"program isolation is unavailable: {why}. No code was run. {_NEEDS[self.rootless]} "
                    "To run untrusted code WITHOUT isolation anyway, pass allow_unisolated_execution_UNSAFE=True."
                )
            warnings.warn(
                f"UNSAFE: sandbox isolation unavailable ({why}); untrusted programs will run with this "
                "process's privileges, network access and filesystem access.",
                RuntimeWarning,
                stacklevel=2,
            )
            self.isolated = False
            if self._probe():
                raise SandboxUnavailableError(f"even unisolated execution failed: {self._probe()}")

    def _probe(self) -> str:
        """Empty when a trivial program runs to the expected output; else the reason it did not."""
        result = self.run("print(6 * 7)")
        if result.status == "exited" and result.returncode == 0 and result.stdout == "42\n":
            return ""
        return result.reason or f"probe program gave {result.status} {result.returncode} {result.stdout!r}"

    def run(self, source: str, stdin: str = "", *, slot: int = 0) -> RunResult:
        """Run `source` as a Python program fed `stdin`; `slot` picks the uid (one per concurrent run)."""
        if not (isinstance(slot, int) and 0 <= slot < _MAX_SLOTS):
            raise ValueError(f"slot must be an int in [0, {_MAX_SLOTS}), got {slot!r}")
        start = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="fusedrl-sandbox-")
        cgroup = None
        try:
            program = os.path.join(workdir, "main.py")
            with open(program, "w", encoding="utf-8") as f:
                f.write(source)
            try:
                cgroup = self.cgroups.create() if self.cgroups else None
            except OSError as exc:
                return RunResult("refused", None, "", "", time.monotonic() - start, f"isolation failed: cgroup: {exc}")
            result = self._launch(program, workdir, stdin.encode(), self.first_uid + slot, start, cgroup)
            if cgroup and result.status == "exited" and result.returncode and self.cgroups.oom_kills(cgroup):
                result = replace(result, reason=f"memory limit of {self.limits.memory_bytes} bytes exceeded "
                                 f"({result.reason})")
            return result
        finally:
            if cgroup:
                self.cgroups.remove(cgroup)
            shutil.rmtree(workdir, ignore_errors=True)

    def _launch(
        self, program: str, workdir: str, stdin: bytes, uid: int, start: float, cgroup: str | None
    ) -> RunResult:
        status_r, status_w = os.pipe()
        cfg = {
            "isolate": self.isolated,
            "rootless": self.rootless,
            "root": workdir,
            "program_path": program,
            "program_name": os.path.basename(program),
            "python": self.python,
            "uid": uid,
            "env": _CLEAN_ENV if self.isolated else {**_CLEAN_ENV, "HOME": workdir},
            "status_fd": status_w,
            # CPU time only backs up the wall clock, for programs that outlive a stalled caller.
            "cpu_s": math.ceil(self.limits.timeout_s) + 1,
            "memory_bytes": self.limits.memory_bytes,
            "file_bytes": self.limits.max_file_bytes,
            # Rootless, the run's user namespace also holds the launcher and its init at this count.
            "processes": self.limits.max_processes + (2 if self.rootless and self.isolated else 0),
            "tmpfs_bytes": self.limits.tmpfs_bytes,
            "cgroup_procs": cgroup and os.path.join(cgroup, "cgroup.procs"),
        }
        try:
            proc = subprocess.Popen(
                [self.python, "-I", "-S", _CHILD, json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env={},
                pass_fds=(status_w,),
                start_new_session=True,  # its own process group, killed as a whole
            )
        except OSError as exc:
            os.close(status_r)
            os.close(status_w)
            return RunResult("refused", None, "", "", time.monotonic() - start, f"cannot start launcher: {exc}")
        os.close(status_w)
        try:
            return self._supervise(proc, status_r, stdin, start)
        finally:
            os.close(status_r)

    def _supervise(self, proc: subprocess.Popen, status_r: int, stdin: bytes, start: float) -> RunResult:
        """Feed stdin, drain the outputs under their cap, and kill the group on timeout or excess."""
        deadline = start + self.limits.timeout_s
        pidfd = os.pidfd_open(proc.pid)
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        buffers = {out_fd: bytearray(), err_fd: bytearray(), status_r: bytearray()}
        sel = selectors.DefaultSelector()
        for fd in buffers:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        sel.register(pidfd, selectors.EVENT_READ)
        if stdin:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        status, reason, exited, sent = "exited", "", False, 0
        try:
            while not exited or sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    status, reason = "timed_out", f"wall-clock timeout of {self.limits.timeout_s} s"
                    break
                for key, _ in sel.select(remaining):
                    fd = key.fd
                    if fd == pidfd:
                        exited = True
                        sel.unregister(fd)
                    elif key.events & selectors.EVENT_WRITE:
                        sent = self._feed(proc, sel, stdin, sent)
                    else:
                        chunk = os.read(fd, 65536)
                        if not chunk:
                            sel.unregister(fd)
                        buffers[fd] += chunk
                if max(len(buffers[out_fd]), len(buffers[err_fd])) > self.limits.max_output_bytes:
                    status, reason = "output_limit", f"output exceeded {self.limits.max_output_bytes} bytes"
                    break
        finally:
            sel.close()
            # The launcher is the group leader and, until reaped below, its pgid cannot be reused.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            os.close(pidfd)
            buffers[status_r] += _drain(status_r)  # every writer is dead now: this cannot block
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if not stream.closed:
                    stream.close()
        wall = time.monotonic() - start
        out = bytes(buffers[out_fd][: self.limits.max_output_bytes]).decode(errors="replace")
        err = bytes(buffers[err_fd][-4096:]).decode(errors="replace")
        lines = buffers[status_r].decode(errors="replace").splitlines()
        errors = [line[len("ERROR ") :] for line in lines if line.startswith("ERROR ")]
        if errors or "READY" not in lines:
            if errors:
                cause = errors[0]
            elif status == "timed_out":
                cause = f"setup did not finish within the {self.limits.timeout_s} s timeout"
            else:
                cause = f"launcher ended without starting the program (exit {proc.returncode})"
            return RunResult("refused", None, "", "", wall, f"isolation failed: {cause}")
        if status != "exited":
            return RunResult(status, None, out, err, wall, reason)
        code = proc.returncode
        if code > 128:
            reason = f"killed by signal {code - 128} ({signal.strsignal(code - 128)})"
        elif code != 0:
            reason = err.strip().splitlines()[-1] if err.strip() else f"exit code {code}"
        return RunResult("exited", code, out, err, wall, reason)

    @staticmethod
    def _feed(proc: subprocess.Popen, sel: selectors.BaseSelector, stdin: bytes, sent: int) -> int:
        try:
            sent += os.write(proc.stdin.fileno(), stdin[sent : sent + 65536])
        except BrokenPipeError:  # the program stopped reading; its output decides
            sent = len(stdin)
        if sent >= len(stdin):
            sel.unregister(proc.stdin.fileno())
            proc.stdin.close()
        return sent


def _drain(fd: int) -> bytes:
    """Everything left in a pipe whose writers have all exited."""
    os.set_blocking(fd, True)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


class SandboxPool:
    """Runs many programs on `workers` threads, each holding its own sandbox uid while it runs."""

    def __init__(self, sandbox: Sandbox, workers: int):
        if not (isinstance(workers, int) and 1 <= workers <= _MAX_SLOTS):
            raise ValueError(f"workers must be an int in [1, {_MAX_SLOTS}], got {workers!r}")
        self.sandbox = sandbox
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(workers):
            self._slots.put(slot)

    def map(self, fn, items: list) -> list:
        """[fn(run, item) for item in items] on the pool; `run(source, stdin)` runs one program."""

        def call(item):
            slot = self._slots.get()
            try:
                return fn(lambda source, stdin="": self.sandbox.run(source, stdin, slot=slot), item)
            finally:
                self._slots.put(slot)

        return list(self._executor.map(call, items))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
