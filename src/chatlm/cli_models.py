"""``chatlm pull``, ``chatlm list`` and ``chatlm rm``: the models in the Hugging Face cache (`model_store`)."""

from __future__ import annotations

import argparse
import json

from .utils import format_bytes

_REFERENCE_HELP = "ORG/REPO (Hugging Face format) or ORG/REPO:QUANT (one GGUF file, e.g. :Q4_K_M)"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add pull, list and rm to the CLI's subcommands (each sets ``func``, as cli.main dispatches)."""
    pull = sub.add_parser("pull", help="download a model from the Hugging Face Hub into its cache")
    pull.add_argument("reference", metavar="REF", help=_REFERENCE_HELP)
    pull.add_argument(
        "--gguf-file", metavar="NAME", help="the GGUF file to download, by its name in the repo"
    )
    pull.set_defaults(func=cmd_pull)

    list_ = sub.add_parser(
        "list", help="the models on this machine: the bundled one and the Hugging Face cache's"
    )
    list_.add_argument("--json", action="store_true", help="print machine-readable JSON")
    list_.set_defaults(func=cmd_list)

    rm = sub.add_parser("rm", help="delete a model (or one of its GGUF files) from the Hugging Face cache")
    rm.add_argument("reference", metavar="REF", help=_REFERENCE_HELP + ", as chatlm list names it")
    rm.set_defaults(func=cmd_rm)


def cmd_pull(args: argparse.Namespace) -> int:
    from .model_store import pull

    pulled = pull(args.reference, gguf_file=args.gguf_file)
    if pulled.was_cached:
        print(f"{pulled.name} is already here ({format_bytes(pulled.size_bytes)}): {pulled.path}")
        if pulled.note:
            print(f"({pulled.note})")
    else:
        print(f"pulled {pulled.name} ({format_bytes(pulled.size_bytes)}) into {pulled.path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .model_store import list_models

    rows = list_models()
    if args.json:
        print(json.dumps([row.to_dict() for row in rows], indent=2))
        return 0
    print(format_table(rows))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .model_store import remove

    removed = remove(args.reference)
    print(f"deleted {removed.name} ({format_bytes(removed.freed_bytes)} freed)")
    return 0


def format_table(rows) -> str:
    """Aligned columns, as ``ollama list`` prints them."""
    table = [("NAME", "SIZE", "QUANT", "ARCH", "PARAMS")]
    for row in rows:
        params = _count(row.parameters) if row.parameters else "-"
        name = row.name + (" (bundled)" if row.bundled else "")
        table.append(
            (name, format_bytes(row.size_bytes), row.quantization or "-", row.architecture or "-", params)
        )
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in table)


def _count(n: int) -> str:
    """A parameter count as model names write it: 135M, 7.2B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return (f"{value:.0f}" if value >= 10 else f"{value:.1f}".rstrip("0").rstrip(".")) + unit
    return str(n)
