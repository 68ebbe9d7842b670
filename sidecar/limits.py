"""The process's open-file limit, raised at start to what the system allows.

A request in flight holds two descriptors (the app's connection and an upstream
one; three while its body streams), so the soft `RLIMIT_NOFILE` caps the requests in
flight at about half of it. Container runtimes and systemd commonly hand a process a
soft limit of 1024 under a far higher hard one (1024 exists for programs that use
`select()`; the event loop uses epoll). Past the limit, libuv accepts each new app
connection and closes it at once, and nothing is logged.
So the sidecar raises the soft limit to the hard one at start, as Go's runtime does
(HAProxy sets its own from `maxconn`), and warns when even that is low.
"""

from __future__ import annotations

import resource
from pathlib import Path

#: Below this many open files (after raising), the start logs a warning.
LOW_OPEN_FILES = 4096
#: The kernel caps RLIMIT_NOFILE at fs.nr_open; its default, when that cannot be read.
NR_OPEN_DEFAULT = 1 << 20
#: The most the soft limit is raised to: half a million app connections. An unlimited
#: hard limit can mean fs.nr_open = 2**30 (systemd sets it so), and a soft limit that
#: high makes whatever sizes itself by the limit slow or large.
MAX_OPEN_FILES = 1 << 20


def _nr_open(path: Path = Path("/proc/sys/fs/nr_open")) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return NR_OPEN_DEFAULT


def open_file_limit() -> int:
    """The soft open-file limit now."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one, at most MAX_OPEN_FILES; return
    (before, now).

    An unlimited hard limit means fs.nr_open, the most the kernel allows. When the
    kernel refuses (a sandbox, say), the limit stays as it was.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(_nr_open() if hard == resource.RLIM_INFINITY else hard, MAX_OPEN_FILES)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, target
