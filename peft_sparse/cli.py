"""``peft-sparse`` command line: merge and inspect saved sparse adapters."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .merging import COMBINATION_TYPES, MAJORITY_SIGN_METHODS

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the ``merge`` and ``inspect`` subcommands."""
    parser = argparse.ArgumentParser(prog="peft-sparse", description="Merge and inspect sparse adapters.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser("merge", help="merge several saved sparse adapters into one")
    merge.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="saved adapter directories")
    merge.add_argument("--out", required=True, metavar="DIR", help="output adapter directory")
    merge.add_argument("--method", default="sparse_average", choices=COMBINATION_TYPES, help="how to combine")
    merge.add_argument("--weights", nargs="+", type=float, metavar="W", help="one per adapter (default 1)")
    merge.add_argument("--density", type=float, help="ties/dare/magnitude_prune: kept fraction of the union")
    merge.add_argument("--majority-sign-method", default="total", choices=MAJORITY_SIGN_METHODS)
    merge.add_argument("--drop-zeros", action="store_true", help="drop entries whose merged value is 0")
    merge.add_argument("--seed", type=int, default=0, help="seed for dare's random drops")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    merge.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    inspect = commands.add_parser("inspect", help="densities, mask overlap and sign conflicts of adapters")
    inspect.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="saved adapter directories")
    inspect.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    inspect.add_argument("--plot", metavar="FILE.png", help="also draw the overlap heatmap and densities")
    return parser


def _check_parent(path: str) -> None:
    """Refuse an output file whose directory does not exist (before any work is done)."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise FileNotFoundError(f"directory {parent} for {path} does not exist")


def _merge(args: argparse.Namespace) -> int:
    from .merging import merge_adapters_from_disk

    out = merge_adapters_from_disk(
        args.adapters,
        args.out,
        combination_type=args.method,
        weights=args.weights,
        density=args.density,
        majority_sign_method=args.majority_sign_method,
        drop_zeros=args.drop_zeros,
        seed=args.seed,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"merged {len(args.adapters)} adapters with {args.method} into {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .files import atomic_write_bytes, atomic_write_text
    from .inspection import format_inspection, inspect_adapters, render_inspection_png

    for path in (args.json, args.plot):
        if path:
            _check_parent(path)
    report = inspect_adapters(args.adapters)
    png = render_inspection_png(report) if args.plot else None
    print(format_inspection(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    if png is not None:
        atomic_write_bytes(args.plot, png)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 on errors, with the message on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help and on usage errors
        if exit_.code is None:
            return 0
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    try:
        return _merge(args) if args.command == "merge" else _inspect(args)
    except (ValueError, OSError, ImportError) as error:
        print(f"peft-sparse {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
