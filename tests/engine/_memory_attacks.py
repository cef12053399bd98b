"""Programs that try to hold more memory than the sandbox allows (test_sandbox*.py)."""

MIB = 2**20
# Holds `total` MiB in memfds written through write(2): none of it is mapped, so RLIMIT_AS never sees
# it. Files of 8 MiB: RLIMIT_FSIZE bounds each file, not their number.
MEMFD = """
import os
chunk, held, fds = b"x" * 2**20, 0, []
for i in range({total} // 8):
    fds.append(os.memfd_create("hold"))
    for _ in range(8):
        held += os.write(fds[-1], chunk)
print("held", held // 2**20)
"""
# The same memory as files in /tmp/work, a tmpfs (its pages, like a memfd's, are shared memory).
TMPFS_FILES = MEMFD.replace('os.memfd_create("hold")', 'os.open(f"/tmp/work/hold{{i}}", os.O_WRONLY | os.O_CREAT)')
# `children` processes each fill `each` MiB, report, and hold it until every child has reported or
# died; those still alive then held theirs at the same time: the program prints their memory.
FORKS = """
import os
done_r, done_w = os.pipe()
release_r, release_w = os.pipe()
for _ in range({children}):
    if os.fork() == 0:
        os.close(done_r)
        os.close(release_w)
        block = b"x" * ({each} * 2**20)
        os.write(done_w, b"1")
        os.close(done_w)
        os.read(release_r, 1)
        os._exit(0)
os.close(done_w)
os.close(release_r)
while os.read(done_r, 64):
    pass
os.close(release_w)
alive = sum(os.wait()[1] == 0 for _ in range({children}))
print("held", alive * {each})
"""
# Each held 384 MiB under a 128 MiB limit before the memory cgroup (commit 07ae710).
MEMORY_ATTACKS = {"memfd": MEMFD.format(total=384), "tmpfs files": TMPFS_FILES.format(total=384),
                  "forks": FORKS.format(children=6, each=64)}
