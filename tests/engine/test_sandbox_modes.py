"""The program's world in both isolation modes: root, and rootless (run here as user nobody).

The same inspection program runs in each mode and the same assertions judge what it saw: a minimal
read-only file system with one writable directory, no capabilities, no keyrings, no host processes,
and ordinary Python still working. Rootless mode additionally must contain a fork bomb although every
run is the same host uid.
"""

import dataclasses
import json
import os
import posix
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
from _memory_attacks import MEMORY_ATTACKS

from fusedrl.engine.rewards import sandbox as sandbox_module
from fusedrl.engine.rewards.sandbox import Limits, Sandbox, SandboxPool, SandboxUnavailableError
from fusedrl.engine.rewards.sandbox_child import ARCHES, DEVICES, SYSTEM_DIRS, WORKDIR

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = "hunter2-in-the-callers-environment"
NOBODY = 65534
# Everything here exists on the host (or may), and none of it may exist for the program.
HIDDEN = ["/work", "/root", "/home", "/etc/shadow", "/etc/passwd", "/etc/hostname", "/var", "/run", "/sys",
          "/opt", "/mnt", "/srv", REPO, __file__, sys.executable]  # fmt: skip
WRITABLE_MOUNTS = {WORKDIR, "/proc", *DEVICES}  # /proc is rw, but nothing in it is writable by the program

VIEW_PROGRAM = """
import collections, ctypes, errno, fractions, glob, heapq, itertools, json, math, os, re, socket, statistics, sys
import tempfile

libc = ctypes.CDLL(None, use_errno=True)


def outcome(result):  # libc leaves errno stale after a success
    return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]


def write(directory):
    try:
        with open(os.path.join(directory, "probe"), "w") as f:
            f.write("x")
        return "written"
    except OSError as exc:
        return errno.errorcode[exc.errno]


def connect(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return "connected"
    except OSError as exc:
        return errno.errorcode[exc.errno]


def environ_leaks():
    found = []
    for path in glob.glob("/proc/*/environ"):
        try:
            found += [path] if SECRET.encode() in open(path, "rb").read() else []
        except OSError:
            pass
    return found


numbers = [int(word) for word in sys.stdin.read().split()]
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
seen = {
    "uid": [os.getuid(), os.getgid()], "groups": os.getgroups(), "pid": os.getpid(), "cwd": os.getcwd(),
    "env": dict(os.environ), "interfaces": socket.if_nameindex(), "connect": connect(PORT),
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "fds": sorted(os.listdir("/proc/self/fd")),  # 3 is the listing's own
    "root": sorted(os.listdir("/")), "tmp": os.listdir("/tmp"),
    "etc": os.listdir("/etc") if os.path.isdir("/etc") else [],
    "visible": [path for path in HIDDEN if os.path.lexists(path)],
    "interpreter": [os.path.realpath(sys.base_prefix), os.path.dirname(os.path.realpath(sys.executable))],
    "mounts": sorted((line.split()[4], line.split()[5].split(",")[0]) for line in open("/proc/self/mountinfo")),
    "writes": {d: write(d) for d in ["/", "/tmp", "/etc", "/dev", "/usr", "/usr/lib", "/proc", "/proc/self",
                                     os.path.dirname(sys.executable), sys.prefix, "/tmp/work"]},
    "remount_root_rw": outcome(libc.mount(None, b"/", None, ctypes.c_ulong(32 | 4096), None)),
    "umount_work": outcome(libc.umount2(b"/tmp/work", 2)),
    "mount_tmpfs": outcome(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", ctypes.c_ulong(0), None)),
    "ptrace_init": outcome(libc.ptrace(16, 1, None, None)),  # PTRACE_ATTACH to pid 1, which holds capabilities
    "keyctl": outcome(libc.syscall(KEYCTL, 0, ctypes.c_long(-3), 0)),  # KEYCTL_GET_KEYRING_ID, session
    "memfd_create": outcome(libc.memfd_create(b"m", 0)), "shmget": outcome(libc.shmget(0, 4096, 0o1600)),
    "capabilities": [int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")],
    "no_new_privs": status["NoNewPrivs"], "environ_leaks": environ_leaks(), "tempdir": tempfile.gettempdir(),
    "ordinary": [sum(numbers), statistics.mean(numbers), str(fractions.Fraction(numbers[0], numbers[-1])),
                 re.findall(r"\\d", "a1b22"), collections.Counter("abca").most_common(1),
                 list(itertools.accumulate(numbers)), heapq.nsmallest(2, numbers), math.comb(10, 3),
                 json.loads('{"k": [1, 2]}')],
}
seen["nested_user_namespace"] = outcome(libc.unshare(0x10000000))  # last: it changes the process
print(json.dumps(seen))
"""
# Forks sleeping children until the process limit refuses, holding them a while so that two runs
# at once overlap; prints how many it got.
FORK_COUNT = """
import os, time
children = 0
while True:
    try:
        pid = os.fork()
    except BlockingIOError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children += 1
time.sleep(0.5)
print(children)
"""
FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"


def view_program(port: int) -> str:
    """The inspection program; `port`: a listener of the test's on the host's loopback."""
    keyctl = ARCHES[os.uname().machine][2][2]
    return f"HIDDEN = {HIDDEN!r}\nSECRET = {SECRET!r}\nKEYCTL = {keyctl}\nPORT = {port}\n{VIEW_PROGRAM}"


@pytest.fixture
def listener():
    """A host loopback listener that no sandboxed program may reach."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock
        with pytest.raises(BlockingIOError):
            sock.accept()


def assert_minimal_world(result: dict, first_uid: int, slot: int, rootless: bool) -> None:
    """What the view program must have seen, in either mode."""
    assert (result["status"], result["returncode"], result["stderr"]) == ("exited", 0, "")
    seen = json.loads(result["stdout"])
    assert seen["uid"] == [first_uid + slot] * 2
    # Rootless, the caller's supplementary groups stay (a user namespace cannot drop them); here, none.
    assert seen["groups"] in ([], [first_uid + slot])
    assert (seen["pid"], seen["pids"]) == (2, [1, 2])  # host processes are invisible
    assert seen["interfaces"] == [[1, "lo"]] and seen["connect"] == "ENETUNREACH"  # its own loopback, down
    assert seen["env"] == {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/tmp/work"}
    assert (seen["cwd"], seen["tmp"], seen["tempdir"]) == (WORKDIR, ["work"], WORKDIR)
    # The interpreter's install is visible, and so are the directories above it (holding nothing else).
    assert [p for p in seen["visible"] if not any(_below(i, p) for i in seen["interpreter"])] == []
    assert seen["environ_leaks"] == [] and seen["fds"] == ["0", "1", "2", "3"]  # no descriptor into the host
    allowed_top = {"dev", "etc", "proc", "tmp"} | {d.strip("/") for d in SYSTEM_DIRS if os.path.lexists(d)}
    assert set(seen["root"]) - allowed_top <= {i.split("/")[1] for i in seen["interpreter"]}, seen["root"]
    assert set(seen["etc"]) <= {"ld.so.cache"}
    mounts = dict(seen["mounts"])
    assert len(mounts) == len(seen["mounts"]) and WRITABLE_MOUNTS <= set(mounts)
    assert {point for point, mode in mounts.items() if mode != "ro"} == WRITABLE_MOUNTS, mounts
    assert [d for d, outcome in seen["writes"].items() if outcome == "written"] == ["/tmp/work"], seen["writes"]
    assert seen["remount_root_rw"] == seen["umount_work"] == seen["mount_tmpfs"] == "EPERM"
    assert seen["keyctl"] == "EPERM"  # the seccomp filter
    assert seen["memfd_create"] == seen["shmget"] == "EPERM"  # memory no process maps: refused in every mode
    assert seen["ptrace_init"] == "EPERM"  # rootless it is the same uid, but holds capabilities the program lacks
    assert seen["capabilities"] == [0, 0, 0, 0] and seen["no_new_privs"] == "1"
    if rootless:  # the namespace's own limit is 0; as root the host's sysctls decide
        assert seen["nested_user_namespace"] == "ENOSPC"
    assert seen["ordinary"] == [12, 4, "3/5", ["1", "2", "2"], [["a", 2]], [3, 7, 12], [3, 4], 120, {"k": [1, 2]}]


def _below(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def test_the_programs_world_is_minimal_and_read_only(work_root, monkeypatch, listener):
    """In this process's mode: root in CI."""
    monkeypatch.setenv("FUSEDRL_TEST_SECRET", SECRET)
    sandbox = Sandbox(Limits(timeout_s=5.0, max_processes=8))
    result = sandbox.run(view_program(listener.getsockname()[1]), "3 4 5\n", slot=2)
    assert_minimal_world(dataclasses.asdict(result), sandbox.first_uid, 2, sandbox.rootless)
    pool = SandboxPool(sandbox, 2)
    try:
        counts = pool.map(lambda run, _: run(FORK_COUNT).stdout, range(2))
    finally:
        pool.close()
    assert counts == ["7\n", "7\n"]  # the program and 7 children: max_processes


LOAD_SANDBOX = """
for name in ("sandbox_cgroup", "sandbox"):  # standalone copies: the package may be unreadable to this user
    spec = importlib.util.spec_from_file_location(name, os.path.join({dir}, name + ".py"))
    sandbox = importlib.util.module_from_spec(spec)
    sys.modules["fusedrl.engine.rewards." + name] = sandbox
    spec.loader.exec_module(sandbox)
"""
ROOTLESS_SCRIPT = """
import ctypes, dataclasses, importlib.util, json, os, sys, time
params = json.loads(sys.argv[1])
pid = os.fork()
if pid == 0:  # can this user create a user namespace at all?
    os._exit(0 if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0 else ctypes.get_errno())
errno_ = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
if errno_:
    print(json.dumps({"no_user_namespaces": os.strerror(errno_)}))
    sys.exit()


def mine():
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{entry}").st_uid == os.getuid():
                found.add(int(entry))
        except OSError:
            pass
    return found - {os.getpid()}


before = mine()
""" + LOAD_SANDBOX.format(dir='os.path.dirname(params["module"])') + """
box = sandbox.Sandbox(sandbox.Limits(timeout_s=1.5, max_processes=8))
view = box.run(params["view"], "3 4 5\\n", slot=2)
pool = sandbox.SandboxPool(box, 2)
counts = pool.map(lambda run, _: run(params["fork_count"]).stdout, range(2))
pool.close()
bomb = box.run(params["fork_bomb"])
deadline = time.monotonic() + 5
while mine() - before and time.monotonic() < deadline:  # the last namespace may still be dying
    time.sleep(0.05)
print(json.dumps({"rootless": box.rootless, "first_uid": box.first_uid, "python": box.python,
                  "view": dataclasses.asdict(view), "counts": counts, "bomb": bomb.status,
                  "left": sorted(mine() - before)}))
"""


@pytest.fixture
def shared_dir():
    """A directory user nobody can read, holding copies of the sandbox modules (the repo may be private)."""
    path = tempfile.mkdtemp(prefix="fusedrl-rootless-", dir="/tmp")
    os.chmod(path, 0o755)
    for name in ("sandbox.py", "sandbox_child.py", "sandbox_cgroup.py"):
        shutil.copy(os.path.join(os.path.dirname(sandbox_module.__file__), name), os.path.join(path, name))
    os.mkdir(os.path.join(path, "tmp"), 0o777)
    os.chmod(os.path.join(path, "tmp"), 0o777)
    yield path
    shutil.rmtree(path)


# Run as root: move into a cgroup (only root may move a process out of a cgroup it does not own,
# in v2), then become user nobody and run the script.
JOIN_AS_NOBODY = f"""
import os, sys
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
os.setgroups([])
os.setresgid({NOBODY}, {NOBODY}, {NOBODY})
os.setresuid({NOBODY}, {NOBODY}, {NOBODY})
os.execv(sys.executable, [sys.executable, "-I", "-c", *sys.argv[2:]])
"""


def _as_nobody(script: str, shared_dir: str, *args: str, env: dict | None = None, cgroup_procs: str = "") -> dict:
    python = sandbox_module.default_python()
    if os.geteuid() != 0:
        pytest.skip("switching to user nobody needs root; as this user the other tests run rootless already")
    if not sandbox_module._world_executable(python):
        pytest.skip(f"no interpreter that user nobody may run (found {python})")
    if cgroup_procs:
        command, become = [python, "-I", "-c", JOIN_AS_NOBODY, cgroup_procs, script, *args], {}
    else:
        command, become = [python, "-I", "-c", script, *args], {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    out = subprocess.run(
        command, **become, cwd=shared_dir,
        env={"PATH": "/usr/bin:/bin", "TMPDIR": os.path.join(shared_dir, "tmp"), **(env or {})},
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_rootless_mode_as_an_unprivileged_user(shared_dir, listener):
    """As user nobody: a user namespace replaces root, with the same world and a contained fork bomb."""
    view = view_program(listener.getsockname()[1])
    params = {"module": os.path.join(shared_dir, "sandbox.py"), "view": view,
              "fork_count": FORK_COUNT, "fork_bomb": FORK_BOMB}  # fmt: skip
    report = _as_nobody(ROOTLESS_SCRIPT, shared_dir, json.dumps(params), env={"FUSEDRL_TEST_SECRET": SECRET})
    if "no_user_namespaces" in report:
        pytest.skip(f"unprivileged user namespaces are unavailable here: unshare gave {report['no_user_namespaces']}")
    assert report["rootless"] is True
    assert_minimal_world(report["view"], report["first_uid"], 2, rootless=True)
    # Both runs are uid nobody on the host, at once, yet each got exactly its own 8 processes: the
    # limit counts per user namespace, and the launcher and init are allowed for.
    assert report["counts"] == ["7\n", "7\n"]
    assert report["bomb"] == "timed_out" and report["left"] == []
    assert os.listdir(os.path.join(shared_dir, "tmp")) == []  # no host working directory left behind


REFUSAL_SCRIPT = """
import ctypes, importlib.util, json, os, sys, warnings
# Take user namespaces away from this process, as a host that forbids them would: enter one in which
# nobody is uid 1000 and whose limit on nested user namespaces is 0. Where that fails, the host
# forbids them already.
if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0:
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "1000 65534 1"),
                       ("/proc/self/gid_map", "1000 65534 1"), ("/proc/sys/user/max_user_namespaces", "0")):
        with open(path, "w") as f:
            f.write(text)
""" + LOAD_SANDBOX.format(dir='os.path.dirname(sys.argv[1])') + """
try:
    sandbox.Sandbox()
    refused = ""
except sandbox.SandboxUnavailableError as exc:
    refused = str(exc)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    unsafe = sandbox.Sandbox(allow_unisolated_execution_UNSAFE=True)
result = unsafe.run("import os; print(os.getuid())")
print(json.dumps({"refused": refused, "warned": [str(w.message) for w in caught], "stdout": result.stdout,
                  "uid": os.getuid(), "isolated": unsafe.isolated}))
"""


def test_without_user_namespaces_nothing_runs_unless_unsafe_is_named(shared_dir):
    """Neither root nor user namespaces: the constructor refuses and says why."""
    report = _as_nobody(REFUSAL_SCRIPT, shared_dir, os.path.join(shared_dir, "sandbox.py"))
    assert "isolation failed: " in report["refused"] and "unshare" in report["refused"]
    assert "unprivileged user namespaces" in report["refused"]
    assert "allow_unisolated_execution_UNSAFE=True" in report["refused"]
    assert len(report["warned"]) == 1 and report["warned"][0].startswith("UNSAFE")
    assert (report["stdout"], report["isolated"]) == (f"{report['uid']}\n", False)


def test_rootless_mode_refuses_kernels_that_count_processes_per_host_uid(monkeypatch):
    """Before Linux 5.14 RLIMIT_NPROC counted every process of the host uid: no fork-bomb containment."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "uname", lambda: posix.uname_result(("Linux", "h", "5.10.0-28-amd64", "#1", "x86_64")))
    with pytest.raises(SandboxUnavailableError, match=r"Linux 5\.10\.0-28-amd64 counts RLIMIT_NPROC per host uid"):
        Sandbox(python=sys.executable)
    monkeypatch.setattr(os, "uname", lambda: posix.uname_result(("Linux", "h", "5.14.0-rc1", "#1", "x86_64")))
    assert sandbox_module._rootless_unsupported() == ""


MEMORY_SCRIPT = """
import dataclasses, importlib.util, json, os, sys
params = json.loads(sys.argv[1])
""" + LOAD_SANDBOX.format(dir='os.path.dirname(params["module"])') + """
box = sandbox.Sandbox(sandbox.Limits(memory_bytes=128 * 2**20, tmpfs_bytes=512 * 2**20, timeout_s=10.0))
runs = {name: box.run(source) for name, source in params["attacks"].items()}
print(json.dumps({"rootless": box.rootless, "scope": box.memory_scope, "parent": box.cgroups and box.cgroups.parent,
                  "runs": {name: [r.returncode, r.stdout, r.reason] for name, r in runs.items()}}))
"""


@pytest.fixture
def delegated_cgroup():
    """A memory cgroup owned by user nobody, as systemd delegates one (Delegate=yes); its cgroup.procs to join."""
    cgroups = sandbox_module.find_memory_cgroups(2**30)
    if os.geteuid() != 0 or cgroups is None:
        pytest.skip("delegating a memory cgroup needs root and a memory cgroup")
    top = os.path.join(cgroups.parent, f"fusedrl-delegated-{os.getpid()}")
    os.mkdir(top)
    # v2: processes may not sit in a cgroup that enables controllers for its children, so nobody
    # lives in a leaf and the sandbox creates its run cgroups beside it.
    leaf = top if cgroups.version == 1 else os.path.join(top, "trainer")
    if cgroups.version == 2:
        with open(os.path.join(top, "cgroup.subtree_control"), "w") as f:
            f.write("+memory")
        os.mkdir(leaf)
    for directory in {top, leaf}:
        for name in [".", *os.listdir(directory)]:
            os.chown(os.path.join(directory, name), NOBODY, NOBODY)
    yield os.path.join(leaf, "cgroup.procs")
    for directory in sorted({top, leaf}, reverse=True):
        for name in os.listdir(directory):
            if os.path.isdir(os.path.join(directory, name)):
                os.rmdir(os.path.join(directory, name))
        if os.path.isdir(directory):
            os.rmdir(directory)


def test_rootless_mode_bounds_memory_in_a_delegated_cgroup(shared_dir, delegated_cgroup):
    """As user nobody in a cgroup of its own: the same memory attacks as in test_sandbox.py are bounded."""
    params = {"module": os.path.join(shared_dir, "sandbox.py"), "attacks": MEMORY_ATTACKS}
    report = _as_nobody(MEMORY_SCRIPT, shared_dir, json.dumps(params), cgroup_procs=delegated_cgroup)
    if "no_user_namespaces" in report:
        pytest.skip("unprivileged user namespaces are unavailable here")
    assert report["rootless"] is True and report["scope"].startswith("cgroup v")
    # v1: the run cgroups go under nobody's own cgroup; v2: beside its leaf, in the delegated one.
    assert report["parent"] == os.path.dirname(delegated_cgroup).removesuffix("/trainer")
    runs = report["runs"]
    assert runs["memfd"] == [1, "", "PermissionError: [Errno 1] Operation not permitted"]
    assert runs["tmpfs files"][0] == 137 and runs["tmpfs files"][2].startswith("memory limit of 134217728 bytes")
    assert runs["forks"][0] == 0 and 0 < int(runs["forks"][1].split()[1]) <= 128, runs["forks"]
