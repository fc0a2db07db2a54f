"""``python -m uadkit.fetch <name> [args]`` runs ``uadkit.fetch.<name>.main(args)``; ``--help`` lists the names."""
from __future__ import annotations

import importlib
import sys

from . import COMMANDS
from ._core import install_excepthook

PROG = "python -m uadkit.fetch"


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join([f"usage: {PROG} <name> [options]      ({PROG} <name> --help: its options)", "",
                      "Download, verify and unpack a dataset of the paper profile (or check a manual download),",
                      "or the backbone weights. --root defaults to $UADKIT_DATA (or ~/uadkit_data).", "", "names:",
                      *(f"  {name:{width}s}  {what}" for name, what in COMMANDS.items())])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown name {argv[0]!r}" if argv else "no name given"
        print(f"{usage()}\n\nerror: {what}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)  # as argparse does for a usage error
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(f"{__package__}.{name}")
    saved = sys.argv[:1]
    sys.argv[:1] = [f"{PROG} {name}"]  # argparse names the program after sys.argv[0]: usage shows this command
    try:
        module.main(rest)
    finally:
        sys.argv[:1] = saved


if __name__ == "__main__":
    install_excepthook()
    main()
