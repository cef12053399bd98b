"""The sandbox's launcher: run as root in a fresh process, it isolates one program and executes it.

Started by fusedrl.engine.rewards.sandbox as `python -I -S sandbox_child.py CONFIG_JSON` with stdin,
stdout and stderr connected to the caller and one extra status pipe. It imports only the standard
library (it runs with -S) and never imports fusedrl.

Process tree, and why each level exists:

    launcher (this file, root, outside)   unshares net/pid/mount/ipc/uts namespaces, mounts tmpfs
    |                                     over every world-writable directory, relays the exit status
    +- init (pid 1 of the new pid ns)     mounts a fresh /proc, reaps orphans; when it exits the
       |                                  kernel kills everything left in the namespace
       +- program (pid 2, unprivileged)   rlimits, no new privileges, setuid to the sandbox uid, exec

The program writes its status line "READY" to the status pipe just before exec; the pipe is
close-on-exec, so the caller sees READY followed by end-of-file only when every isolation step
succeeded. Any failure writes "ERROR <why>" instead and no user code runs (fail closed). With
"isolate": false (the caller's explicit unsafe mode) only rlimits are applied.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC, MS_PRIVATE = 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# Directories any user may write to on a usual Linux host; each gets its own empty tmpfs, so a
# program's files there disappear with the namespace and the host's files there stay invisible.
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm", "/dev/mqueue")
WORKDIR = "/tmp/work"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    args = [None if arg is None else arg.encode() for arg in (source, target, fstype)]
    result = _libc.mount(*args, ctypes.c_ulong(flags), None if data is None else data.encode())
    _check(result, f"mount {target}")


def _exit_code(status: int) -> int:
    """Shell convention: the exit code, or 128 + the signal that ended the process."""
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _isolate_launcher(cfg: dict, source: bytes) -> None:
    _check(_libc.unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    # Without this, mounts below would propagate back into the host's mount namespace.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    size = f"size={cfg['tmpfs_bytes']},mode=1777"
    for path in WORLD_WRITABLE:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, size)
    os.mkdir(WORKDIR, 0o700)
    os.chown(WORKDIR, cfg["uid"], cfg["uid"])
    with open(os.path.join(WORKDIR, cfg["program_name"]), "wb") as f:
        f.write(source)
    os.chdir(WORKDIR)


def _apply_limits(cfg: dict) -> None:
    limits = {
        resource.RLIMIT_CPU: (cfg["cpu_s"], cfg["cpu_s"] + 1),  # SIGXCPU first, SIGKILL one second on
        resource.RLIMIT_AS: (cfg["memory_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (cfg["file_bytes"],) * 2,
        resource.RLIMIT_NPROC: (cfg["processes"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, value in limits.items():
        resource.setrlimit(which, value)


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    # Set after the uid change, which clears it: the program dies with its namespace's init.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")


def _program(cfg: dict, status_fd: int) -> None:
    """The program's process: final restrictions, READY, exec. Never returns."""
    try:
        _apply_limits(cfg)
        if cfg["isolate"]:
            _drop_privileges(cfg["uid"])
            if os.getppid() != 1:
                raise OSError("namespace init died during setup")
        os.set_inheritable(status_fd, False)
        os.write(status_fd, b"READY\n")
        os.execve(cfg["python"], [cfg["python"], "-I", cfg["program_name"]], cfg["env"])
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the caller as ERROR
        os.write(status_fd, f"ERROR {type(exc).__name__}: {exc}\n".encode())
    os._exit(127)


def _init(cfg: dict, status_fd: int) -> int:
    """Pid 1 of the namespace: start the program, reap everything, return the program's exit code."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    pid = os.fork()
    if pid == 0:
        _program(cfg, status_fd)
    os.close(status_fd)
    while True:  # orphans re-parent to pid 1; reaping them keeps zombies off the process limit
        reaped, status = os.wait()
        if reaped == pid:
            return _exit_code(status)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    try:
        with open(cfg["program_path"], "rb") as f:
            source = f.read()
        if not cfg["isolate"]:
            _program(cfg, status_fd)
        _isolate_launcher(cfg, source)
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(_init(cfg, status_fd))
            except BaseException as exc:  # noqa: BLE001
                os.write(status_fd, f"ERROR {type(exc).__name__}: {exc}\n".encode())
                os._exit(125)
    except BaseException as exc:  # noqa: BLE001
        os.write(status_fd, f"ERROR {type(exc).__name__}: {exc}\n".encode())
        sys.exit(125)
    os.close(status_fd)
    _, status = os.waitpid(pid, 0)
    sys.exit(_exit_code(status))


if __name__ == "__main__":
    main()
