"""`python -m sidecar`: the same command line as the `sidecar` script.

SIGTERM and SIGINT exit 0 from the very first moment, even while the modules below
import; `cli.main` keeps that up until the app installs its own handlers.
"""

import signal
from types import FrameType


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


for _sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_sig, _stop)

from sidecar.cli import main  # noqa: E402 - after the handlers, on purpose

raise SystemExit(main())
