"""Every module on its floor: imports go down the floors (or along one), never up, and never round in a cycle.

Read from the source with ``ast``, every import statement counts, the ones inside functions (lazy imports) and
under ``if TYPE_CHECKING`` included. A module may import from its own floor or any floor below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import chatlm

PACKAGE = Path(chatlm.__file__).parent

# Lowest first. A name covers its module or package (the longest name that covers a module places it);
# "chatlm", the package's own __init__, covers only itself.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    # Plain records and helpers that import nothing of chatlm. GenerationConfig is here, not with generation:
    # models carry one (``model.generation_config``) and the loader reads generation_config.json, as in
    # transformers.
    ("foundation", ("chatlm.utils", "chatlm.generation.config")),
    ("kernels", ("chatlm.kernels",)),  # native ops, behind functions that fall back to torch
    ("models", ("chatlm.models",)),  # the architectures, their layers, base class and KV cache
    # What changes a built model's layers: quantized layers in place of float ones, tensor-parallel shards.
    ("model transforms", ("chatlm.quantization", "chatlm.gguf_layers", "chatlm.parallel")),
    # Files to a ready model: references, checkpoints, GGUF, the loader (and its Auto front door).
    ("loading", ("chatlm.loading", "chatlm.auto")),
    # Text: tokenizers (read through loading), the streaming detokenizer, chat templates, tool schemas, reply
    # formats, and the chat turn that puts them together.
    (
        "text",
        (
            "chatlm.tokenizer",
            "chatlm.detokenize",
            "chatlm.chat_template",
            "chatlm.tool_schema",
            "chatlm.reply_parsing",
            "chatlm.chat_turn",
        ),
    ),
    ("generation", ("chatlm.generation",)),  # decoding loops that drive a model, streamers
    (
        "applications",
        (
            "chatlm.pipeline",
            "chatlm.serving",
            "chatlm.cli",
            "chatlm.cli_models",
            "chatlm.chat_repl",
            "chatlm.model_store",
            "chatlm.bench",
            "chatlm.quality",
            "chatlm.info",
            "chatlm.doctor",
            "chatlm.__main__",
            "chatlm",
        ),
    ),
]

# (importer, imported): the imports allowed to go up, each inside a function only.
UPWARD_EXCEPTIONS = {
    # A model offers generate(), as transformers' models do; the loop itself lives in generation.
    ("chatlm.models.base", "chatlm.generation.generate"),
}


def _module_name(path: Path) -> str:
    parts = ["chatlm", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(chatlm module imported, whether the import sits inside a function) for each import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    lazy = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from package import module` imports the module; `from module import name`, the module
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names
            ]
        else:
            continue
        found += [(t, id(node) in lazy) for t in targets if t == "chatlm" or t.startswith("chatlm.")]
    return found


def _floor(module: str) -> int:
    best, floor = "", None
    for index, (_, names) in enumerate(FLOORS):
        for n in names:
            covers = module == n or (n != "chatlm" and module.startswith(n + "."))
            if covers and len(n) > len(best):
                best, floor = n, index
    assert floor is not None, f"{module} is on no floor: add it to FLOORS in {__file__}"
    return floor


EDGES = {(name, target, lazy) for name, path in MODULES.items() for target, lazy in _imports(name, path)}


def test_every_module_has_a_floor():
    for name in MODULES:
        _floor(name)


def test_every_import_names_a_module():
    # A relative import left behind by a move names a module that is not there (and places it on a floor).
    missing = sorted(f"{a} imports {b}" for a, b, _ in EDGES if b not in MODULES)
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_no_import_goes_up_a_floor():
    upward = []
    for importer, imported, lazy in sorted(EDGES):
        if _floor(imported) <= _floor(importer):
            continue
        if (importer, imported) in UPWARD_EXCEPTIONS and lazy:
            continue
        upward.append(
            f"{importer} ({FLOORS[_floor(importer)][0]}) imports {imported} ({FLOORS[_floor(imported)][0]})"
            + (" inside a function" if lazy else "")
        )
    assert not upward, "imports from a higher floor:\n" + "\n".join(upward)


def test_the_exceptions_are_still_needed():
    # An exception nobody needs any more is a door left open: close it.
    pairs = {(a, b) for a, b, _ in EDGES}
    assert UPWARD_EXCEPTIONS <= pairs


def test_the_fused_kernel_attaches_from_outside():
    # Layers declare what can be fused; the loader attaches the kernel (`kernels.fused_layer.attach`).
    assert not [a for a, b, _ in EDGES if a.startswith("chatlm.models") and b == "chatlm.kernels.fused_layer"]


def test_no_import_cycles():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for importer, imported, _ in EDGES:
        if imported in graph and imported != importer:
            graph[importer].add(imported)
    cycles = []
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for nxt in sorted(graph[module]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
