"""The ``cvpipe`` executable: a stage command goes to the project's preload process
(:mod:`cvpipe.preload`) when it can, else the command line runs here as usual."""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    from cvpipe import preload

    if preload.wanted(argv):
        rc = preload.run(argv)
        if rc is not None:
            sys.exit(rc)
    from cvpipe.cli import app

    try:
        app(prog_name="cvpipe")
    except SystemExit as ex:
        preload.finish(preload.exit_code(ex))
