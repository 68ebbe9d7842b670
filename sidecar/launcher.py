"""The `sidecar` console script (the image's ENTRYPOINT): like `python -m sidecar`,
SIGTERM and SIGINT exit 0 from the first moment, before the CLI and its libraries
import. As PID 1 in a container a signal without a handler is ignored, so without
this a SIGTERM in the first tenth of a second would leave Kubernetes waiting for the
whole grace period.
"""

from __future__ import annotations


def main() -> int:
    from sidecar.stopsignals import exit_quietly_until_started  # noqa: PLC0415

    exit_quietly_until_started()
    from sidecar.cli import main as cli_main  # noqa: PLC0415 - after the handlers, on purpose

    return cli_main()
