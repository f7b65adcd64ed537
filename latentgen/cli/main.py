"""`latentgen`: inspection commands (`latentgen plugins`, `latentgen compare <multirun dir>`)."""

from __future__ import annotations

import argparse
import sys

from latentgen import kinds, registry
from latentgen.errors import LatentgenError


def plugins(check: bool) -> int:
    """Print every registered component by kind with its distribution and version; with
    `check`, import each one and report those that fail. Returns the number of failures."""
    failures = 0
    for kind in kinds.KINDS:
        print(f"{kind.plural_name} ({kind.group}):")
        found = registry.entries(kind.name)
        if not found:
            print("  (none)")
        for name, regs in sorted(found.items()):
            for entry in regs:
                status = ""
                if len(regs) > 1:
                    status = "  CONFLICT: registered by several distributions"
                elif check:
                    try:
                        entry.load()
                        status = "  ok"
                    except LatentgenError as exc:
                        failures += 1
                        status = f"  FAILED: {exc.__cause__!r}"
                print(f"  {name:<20} {entry.distribution:<24} {entry.version:<10} {entry.target}{status}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="latentgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("plugins", help="list registered components with their distributions")
    listing.add_argument("--no-check", action="store_true", help="do not import the components to check them")
    listing.add_argument("--markdown", action="store_true", help="print the component catalogue as Markdown "
                                                                 "(kinds, conditioning keys, every component)")
    comparing = commands.add_parser("compare", help="the grids of a latentgen-sample -m sweep side by side, labelled "
                                                    "with each job's overrides")
    comparing.add_argument("sweep_dir", help="the multirun directory, e.g. multirun/sample/<date>_<time>")
    comparing.add_argument("-o", "--output", default=None, help="where to write the sheet (default: <sweep_dir>/compare.png)")
    args = parser.parse_args(argv)
    if args.command == "plugins" and args.markdown:
        from latentgen.cli.catalogue import markdown

        print(markdown(), end="")
        return 0
    if args.command == "plugins":
        failures = plugins(check=not args.no_check)
        return 1 if failures else 0
    if args.command == "compare":
        from latentgen.cli.compare import compare
        from latentgen.cli.errors import reported

        with reported():
            print(compare(args.sweep_dir, args.output))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
