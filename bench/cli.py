"""The kpbench command line (placeholder until the subcommands land)."""
import sys


def main(argv=None) -> int:
    print("kpbench: no subcommands yet", file=sys.stderr)
    return 2
