"""``peft-sparse`` command line: merge and inspect saved sparse adapters, manage an expert library, cluster it."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .merging import COMBINATION_TYPES, MAJORITY_SIGN_METHODS

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the ``merge``, ``inspect``, ``library`` and ``cluster`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="peft-sparse", description="Merge, inspect, collect and cluster sparse adapters."
    )
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

    library = commands.add_parser("library", help="manage an expert library (a directory of sparse experts)")
    actions = library.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a saved adapter directory to a library (created if absent)")
    add.add_argument("library", metavar="LIB", help="library directory")
    add.add_argument("source", metavar="SRC", help="saved sparse adapter directory")
    add.add_argument("--name", required=True, help="expert name (letters, digits, '.', '_', '-')")
    add.add_argument("--task", help="task description")
    add.add_argument("--metrics", metavar="JSON", help='free-form metrics, a JSON object, e.g. \'{"acc": 0.71}\'')
    add.add_argument("--base-model", help="record this base model id instead of the adapter config's")
    add.add_argument("--overwrite", action="store_true", help="replace an existing expert of that name")
    listing = actions.add_parser("list", help="list the experts of a library")
    listing.add_argument("library", metavar="LIB", help="library directory")
    listing.add_argument("--json", action="store_true", help="print the manifest records as JSON")
    remove = actions.add_parser("remove", help="remove an expert from a library")
    remove.add_argument("library", metavar="LIB", help="library directory")
    remove.add_argument("name", metavar="NAME", help="expert name")

    cluster = commands.add_parser("cluster", help="MBC: cluster a library's experts and merge each cluster")
    cluster.add_argument("library", metavar="LIB", help="library directory")
    cluster.add_argument("--k", type=int, required=True, help="number of clusters")
    cluster.add_argument("--out", required=True, metavar="DIR", help="output directory (one adapter per cluster)")
    cluster.add_argument("--names", nargs="+", metavar="NAME", help="cluster only these experts")
    cluster.add_argument("--plot", metavar="FILE.png", help="similarity matrix ordered by cluster")
    cluster.add_argument("--combination-type", default="sparse_average", choices=COMBINATION_TYPES)
    cluster.add_argument("--density", type=float, help="ties/dare/magnitude_prune: kept fraction of the union")
    cluster.add_argument("--majority-sign-method", default="total", choices=MAJORITY_SIGN_METHODS)
    cluster.add_argument("--drop-zeros", action="store_true", help="drop entries whose merged value is 0")
    cluster.add_argument("--sparsify-top", type=float, metavar="F", help="similarity on each expert's top F |delta|")
    cluster.add_argument("--seed", type=int, default=0, help="k-means random_state (and dare's drops)")
    cluster.add_argument("--add-to-library", action="store_true", help="also add the cluster experts to LIB")
    cluster.add_argument("--overwrite", action="store_true", help="replace a non-empty --out / existing experts")
    cluster.add_argument("--no-progress", action="store_true", help="hide progress bars")
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


def _library(args: argparse.Namespace) -> int:
    from .library import ExpertLibrary, LibraryError

    if args.action == "add":
        metrics = None
        if args.metrics is not None:
            try:
                metrics = json.loads(args.metrics)
            except json.JSONDecodeError as error:
                raise LibraryError(f"--metrics is not valid JSON ({error})") from error
        root = Path(args.library)
        created = not root.exists()
        library = ExpertLibrary(root, create=True)
        try:
            library.add(
                args.source,
                args.name,
                task=args.task,
                metrics=metrics,
                overwrite=args.overwrite,
                base_model=args.base_model,
            )
        except BaseException:
            if created:  # a failed first add leaves no empty library behind
                shutil.rmtree(root, ignore_errors=True)
            raise
        print(f"added {args.name!r} to {args.library} ({len(library)} experts)")
        return 0
    library = ExpertLibrary(args.library)
    if args.action == "remove":
        library.remove(args.name)
        print(f"removed {args.name!r} from {args.library} ({len(library)} experts)")
        return 0
    if args.json:
        print(json.dumps([library.entry(n) for n in library.names()], indent=2))
        return 0
    print(f"{args.library}: {len(library)} experts, base model {library.base_model!r}")
    if len(library):
        print(f"targets: {len(library.targets or {})} layers")
    for name in library.names():
        entry = library.entry(name)
        block = "entries" if entry["block_size"] is None else f"{entry['block_size']}x{entry['block_size']} blocks"
        metrics = json.dumps(entry["metrics"]) if entry["metrics"] else ""
        print(f"  {name}\t{entry['task'] or '-'}\t{entry['stored_rows']} {block}\t{metrics}")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from .clustering import cluster_experts, similarity_summary
    from .library import ExpertLibrary

    library = ExpertLibrary(args.library)
    merge_options = {"majority_sign_method": args.majority_sign_method, "drop_zeros": args.drop_zeros}
    if args.density is not None:
        merge_options["density"] = args.density
    result = cluster_experts(
        library,
        args.k,
        names=args.names,
        sparsify_top=args.sparsify_top,
        combination_type=args.combination_type,
        out_dir=args.out,
        overwrite=args.overwrite,
        add_to=library if args.add_to_library else None,
        seed=args.seed,
        plot=args.plot,
        progress=not args.no_progress,
        **merge_options,
    )
    print(similarity_summary(result))
    print(f"wrote {result.num_clusters} merged cluster experts to {args.out}")
    return 0


COMMANDS = {"merge": _merge, "inspect": _inspect, "library": _library, "cluster": _cluster}


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
        return COMMANDS[args.command](args)
    except (ValueError, OSError, ImportError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"peft-sparse {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
