"""`python -m sidecar`: the same command line as the `sidecar` script.

SIGTERM and SIGINT exit 0 from the very first moment, even while the modules below
import; `cli.main` keeps that up until the app installs its own handlers.
"""

from sidecar.stopsignals import exit_quietly_until_started

exit_quietly_until_started()

from sidecar.cli import main  # noqa: E402 - after the handlers, on purpose

raise SystemExit(main())
