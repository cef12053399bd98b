"""The sandbox's launcher: run in a fresh process, it isolates one program and executes it.

Started by fusedrl.engine.rewards.sandbox as `python -I -S sandbox_child.py CONFIG_JSON` with stdin,
stdout and stderr connected to the caller and one extra status pipe. It imports only the standard
library (it runs with -S) and never imports fusedrl.

Two modes, chosen by the caller. As root, the launcher creates the namespaces itself and the program
switches to an unprivileged uid of its own. As an ordinary user ("rootless"), it first creates a user
namespace mapping only its own uid (to the sandbox uid inside), which gives it capabilities over the
namespaces it creates and nothing on the host; the program keeps the caller's uid on the host, so the
read-only filesystem view below is what keeps it away from the caller's files.

Process tree, and why each level exists:

    launcher (this file, outside)   unshares user (rootless), net, pid, mount, ipc and uts namespaces;
    |                               builds the program's root: a tmpfs holding read-only binds of the
    |                               system and interpreter directories, four /dev nodes and a writable
    |                               tmpfs at /tmp/work; relays the exit status
    +- init (pid 1 of the new pid ns)     mounts a fresh /proc, pivots into the new root and detaches
       |                                  the host's, reaps orphans; when it exits the kernel kills
       |                                  everything left in the namespace
       +- program (pid 2)   rlimits, (as root) setuid to the sandbox uid, no new privileges, seccomp
                            filter against the kernel keyrings and unmapped memory, exec

The launcher first joins the run's memory cgroup when the caller made one, so all three levels are
inside it.

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
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE = 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 22, 38
WORKDIR = "/tmp/work"
# What the program sees, all read-only: the system directories (a missing one is skipped; a symlink,
# as in merged-/usr distributions, is recreated as the same symlink), the interpreter's own install,
# and the dynamic loader's index, without which libraries under /usr/lib/<multiarch> are not found.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache",)
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
DEVICE_LINKS = {"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
                "/dev/stderr": "/proc/self/fd/2"}  # fmt: skip
# Per architecture: seccomp's AUDIT_ARCH value, pivot_root's syscall number (glibc has no wrapper),
# add_key, request_key, keyctl, and memfd_create, memfd_secret, shmget. Keyrings belong to a uid, not
# to a namespace: in rootless mode the program shares the caller's uid and could read the caller's
# keys (Kerberos tickets, for one). The other three hold memory that no process maps, which only a
# memory cgroup would count; refused in every mode, so a program behaves alike on every host.
ARCHES = {"x86_64": (0xC000003E, 155, (248, 249, 250), (319, 447, 29)),
          "aarch64": (0xC00000B7, 41, (217, 218, 219), (279, 447, 194))}  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    args = [None if arg is None else arg.encode() for arg in (source, target, fstype)]
    result = _libc.mount(*args, ctypes.c_ulong(flags), None if data is None else data.encode())
    _check(result, f"mount {target}")


def _arch() -> tuple:
    machine = os.uname().machine
    if machine not in ARCHES:
        raise OSError(f"unsupported architecture {machine} (supported: {', '.join(ARCHES)})")
    return ARCHES[machine]


def _exit_code(status: int) -> int:
    """Shell convention: the exit code, or 128 + the signal that ended the process."""
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _unshare(cfg: dict) -> None:
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
    if not cfg["rootless"]:
        _check(_libc.unshare(flags), "unshare")
        return
    host_uid, host_gid = os.geteuid(), os.getegid()
    # The user namespace is created first and owns the others, so its capabilities cover them.
    _check(_libc.unshare(CLONE_NEWUSER | flags), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{cfg['uid']} {host_uid} 1"),
                       ("gid_map", f"{cfg['uid']} {host_gid} 1")):  # fmt: skip
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    # This namespace's own limit: the program cannot nest a user namespace (whose capabilities would
    # reach kernel code an unprivileged process cannot), while the view's mounts stay locked anyway.
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")


def _bind_read_only(source: str, target: str) -> None:
    os.makedirs(target if os.path.isdir(source) else os.path.dirname(target), exist_ok=True)
    if not os.path.isdir(source):
        open(target, "w").close()
    _mount(source, target, None, MS_BIND)
    # Read-only takes a remount, which must keep the flags the kernel locks on a mount copied into a
    # user namespace (noexec here; nosuid and nodev are added anyway; atime flags are kept by default).
    noexec = os.statvfs(source).f_flag & os.ST_NOEXEC and MS_NOEXEC
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | noexec)


def _interpreter_dirs(python: str) -> list[str]:
    """The install prefixes of the interpreter (the one running this file) and its own directory."""
    dirs = {os.path.realpath(path) for path in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(python))}
    if "/" in dirs:
        raise OSError(f"the interpreter {python} has / as its prefix; binding it would expose the whole host")
    return sorted(path for path in dirs if os.path.isdir(path))  # parents sort before their children


def _below(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + "/")


def _build_root(cfg: dict, source: bytes) -> None:
    """The program's whole file system, assembled at cfg["root"] (pid 1 pivots into it)."""
    root = cfg["root"]
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    bound = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            _bind_read_only(path, root + path)
            bound.append(path)
    for path in _interpreter_dirs(cfg["python"]):
        # Binds are not recursive (a recursive one would bring writable submounts): a prefix that is a
        # mount of its own, such as /usr/local on some hosts, needs its own bind.
        if not any(_below(path, done) and os.stat(path).st_dev == os.stat(done).st_dev for done in bound):
            _bind_read_only(path, root + path)
            bound.append(path)
    for path in SYSTEM_FILES:
        if os.path.isfile(path):
            _bind_read_only(path, root + path)
    os.mkdir(root + "/dev")
    for path in DEVICES:  # writable, like the host's: writing to /dev/null is ordinary
        open(root + path, "w").close()
        _mount(path, root + path, None, MS_BIND)
    for link, target in DEVICE_LINKS.items():
        os.symlink(target, root + link)
    os.mkdir(root + "/proc")
    os.makedirs(root + WORKDIR)
    uid = cfg["uid"]
    size = f"size={cfg['tmpfs_bytes']},mode=700,uid={uid},gid={uid}"
    _mount("tmpfs", root + WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV, size)
    with open(os.path.join(root + WORKDIR, cfg["program_name"]), "wb") as f:
        f.write(source)
    os.chdir(root)


def _enter_root(root: str) -> None:
    """Pivot into the new root and detach the host's, so no path (not even `..`) leads back to it."""
    os.chdir(root)
    _check(_libc.syscall(_arch()[1], b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount the host root")
    os.chdir("/")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
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


def _deny_syscalls() -> None:
    """Seccomp filter: the keyring and unmapped-memory calls, and every call of another ABI, fail with EPERM."""
    audit_arch, _, keyrings, unmapped_memory = _arch()
    denied = keyrings + unmapped_memory
    ld_word, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    # seccomp_data: the syscall number at offset 0, the arch at 4. Numbers from 0x40000000 are x32's.
    code = [(ld_word, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, deny), (ld_word, 0, 0, 0)]
    tests = [(jge, 0x40000000), *((jeq, number) for number in denied)]
    for i, (op, k) in enumerate(tests):
        code.append((op, len(tests) - i, 0, k))  # true: jump over the rest and the allow, to deny
    code += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    program = (_SockFilter * len(code))(*(_SockFilter(*ins) for ins in code))
    fprog = _SockFprog(len(code), program)
    _check(_libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0), "seccomp")  # SECCOMP_MODE_FILTER


def _restrict(cfg: dict) -> None:
    if not cfg["rootless"]:  # rootless, the namespace maps one uid and the caller's groups stay
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    # Also what drops every capability at exec in rootless mode: the uid is not 0 in the namespace.
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    # Set after the uid change, which clears it: the program dies with its namespace's init.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    _deny_syscalls()


def _program(cfg: dict, status_fd: int) -> None:
    """The program's process: final restrictions, READY, exec. Never returns."""
    try:
        # The first the kernel kills when memory runs out, in the run's cgroup or on the host: never the
        # launcher or init first (whose death would read as a failed setup), never the trainer first.
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        _apply_limits(cfg)
        if cfg["isolate"]:
            _restrict(cfg)
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
    # Before the pivot: in a user namespace the kernel mounts a proc only while a full one is visible.
    _mount("proc", cfg["root"] + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _enter_root(cfg["root"])
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
        if cfg["cgroup_procs"]:  # first: every process forked from here on is in the run's cgroup
            with open(cfg["cgroup_procs"], "w") as f:
                f.write(str(os.getpid()))
        with open(cfg["program_path"], "rb") as f:
            source = f.read()
        if not cfg["isolate"]:
            _program(cfg, status_fd)
        os.umask(0o022)  # the view's directories and the program file must be readable by the program
        _unshare(cfg)
        # Without this, mounts below would propagate back into the host's mount namespace.
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _build_root(cfg, source)
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
