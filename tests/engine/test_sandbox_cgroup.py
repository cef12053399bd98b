"""Where the sandbox makes its run cgroups, on fake cgroup trees (the kernel side: test_sandbox*.py)."""

import os

from fusedrl.engine.rewards import sandbox_cgroup
from fusedrl.engine.rewards.sandbox_cgroup import _parent


def mountinfo(*mounts: tuple[str, str, str, str]) -> str:
    """Lines of /proc/self/mountinfo for (hierarchy root, mount point, fstype, super options)."""
    return "".join(f"{30 + i} 20 0:{40 + i} {root} {point} rw,relatime - {fstype} {fstype} {options}\n"
                   for i, (root, point, fstype, options) in enumerate(mounts))


def tree(base, subtree_control: dict[str, str]) -> None:
    for path, enabled in subtree_control.items():
        os.makedirs(base / path.strip("/"), exist_ok=True)
        (base / path.strip("/") / "cgroup.subtree_control").write_text(enabled)
        (base / path.strip("/") / "cgroup.procs").write_text("")


def test_v2_uses_the_nearest_ancestor_that_enables_memory(tmp_path):
    tree(tmp_path, {"/": "cpu memory pids", "/a": "memory", "/a/b": "", "/a/b/leaf": ""})
    mounts = mountinfo(("/", str(tmp_path), "cgroup2", "rw,nsdelegate"))
    assert _parent(mounts, "0::/a/b/leaf\n") == (2, str(tmp_path / "a"))
    assert _parent(mounts, "0::/\n") == (2, str(tmp_path))  # the root cgroup may hold processes and enable memory
    tree(tmp_path, {"/a": "cpu"})
    assert _parent(mounts, "0::/a/b/leaf\n") == (2, str(tmp_path))


def test_v2_skips_what_the_caller_cannot_write_and_stops_at_the_mount(tmp_path, monkeypatch):
    tree(tmp_path, {"/": "memory", "/user": "memory", "/user/me": "", "/user/me/session": ""})
    mounts = mountinfo(("/", str(tmp_path), "cgroup2", "rw"))
    monkeypatch.setattr(sandbox_cgroup, "_writable", lambda directory: directory.startswith(str(tmp_path / "user/me")))
    assert _parent(mounts, "0::/user/me/session\n") is None  # /user and / enable memory but are not ours
    tree(tmp_path, {"/user/me": "memory"})  # a delegated subtree
    assert _parent(mounts, "0::/user/me/session\n") == (2, str(tmp_path / "user/me"))


def test_v1_uses_the_own_memory_cgroup_and_wins_over_v2(tmp_path):
    tree(tmp_path, {"/memory/job/7": "", "/unified": "memory", "/unified/job": ""})
    mounts = mountinfo(("/", str(tmp_path / "cpu"), "cgroup", "rw,cpu"), ("/", str(tmp_path / "memory"), "cgroup",
                       "rw,memory"), ("/", str(tmp_path / "unified"), "cgroup2", "rw"))
    own = "4:memory:/job/7\n1:cpu:/job\n0::/job\n"
    assert _parent(mounts, own) == (1, str(tmp_path / "memory/job/7"))
    # Not in the memory hierarchy: v2 offers no memory controller while v1 holds it (whatever its files say).
    assert _parent(mounts, "1:cpu:/job\n0::/job\n") is None


def test_a_mount_of_a_subtree_maps_paths_below_its_root(tmp_path):
    """In a container the mount's root is the container's cgroup; /proc/self/cgroup still names host paths."""
    tree(tmp_path, {"/": "memory", "/app": ""})
    mounts = mountinfo(("/kubepods/pod1", str(tmp_path), "cgroup2", "rw"))
    assert _parent(mounts, "0::/kubepods/pod1/app\n") == (2, str(tmp_path))
    assert _parent(mounts, "0::/elsewhere\n") is None
    assert _parent("", "0::/\n") is None  # no cgroup file system mounted at all
