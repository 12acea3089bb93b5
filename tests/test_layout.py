"""The folder tree is the architecture: these tests keep it so.

Imports are read statically (ast), including the ones inside functions, since a lazy import that closes a
circle is still a circle in the design."""
import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"


def project_modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def imported_modules(name: str, path: pathlib.Path, mods: dict) -> set[str]:
    """The project modules `name` imports: `from a.b import c` counts as a.b.c when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def nearest(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [nearest(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else nearest(base) for a in node.names]
        else:
            continue
        found.update(t for t in targets if t and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imported_modules(name, path, mods) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


# The layers, lowest first; a module imports its own layer and the ones below (scripts/import_graph.py prints
# them): ground (errors and exit statuses, the global batch, logging, the step-observer interface, process
# groups: used by everything, using nothing), methods (contrastive), parts (flags, data, optimizer, schedule,
# checkpoint, interop, evaluation, the loop and its observers), start-up (process set-up and its checks),
# entry (training.main), clients (the benchmark).
LAYERS = ("ground", "methods", "parts", "start-up", "entry", "clients")
GROUND = ("training.errors", "training.batching", "training.logger", "training.observers", "training.distributed",
          "training.elastic", "training.startup.threads", "training.startup.quiet")


def layer_of(module: str) -> str:
    if module == "training" or module.startswith(GROUND):
        return "ground"
    if module.split(".")[0] == "contrastive":
        return "methods"
    if module.startswith("training.bench"):
        return "clients"
    if module == "training.main":
        return "entry"
    if module.startswith("training.startup"):
        return "start-up"
    return "parts"


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if rank[layer_of(t)] > rank[layer_of(m)])


def test_no_import_circles():
    """Catches two modules that import each other (even lazily, inside a function): a seam in the wrong
    place, e.g. a CLI imported by its own library or a shared type living in one of its two users."""
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_planted_circle():
    """Catches a cycle detector that never reports anything (which would make the test above vacuous)."""
    graph = import_graph()
    graph["training.loop"] = graph["training.loop"] | {"training.main"}
    assert any({"training.loop", "training.main"} <= set(c) for c in cycles(graph))


def test_methods_never_import_the_trainer():
    """Catches `contrastive` (the methods) depending on `training` (the trainer, data, eval, bench): the
    methods must stay usable in another training script."""
    offenders = {m: sorted(t for t in targets if t.split(".")[0] == "training")
                 for m, targets in import_graph().items() if m.split(".")[0] == "contrastive"}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_trainer_core_does_not_import_the_benchmark():
    """Catches the trainer (main, loop, checkpoint, data, eval) importing the benchmark, which is a client
    of the trainer, not a part of it."""
    offenders = {m: sorted(t for t in targets if t.startswith("training.bench"))
                 for m, targets in import_graph().items()
                 if m.startswith("training") and not m.startswith("training.bench")}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_imports_point_down_the_layers():
    """Catches a module importing a layer above its own (LAYERS): e.g. the checkpoint code importing a start-up
    module, the ground floor (errors, logging) importing a part of the trainer, or a trainer part importing
    the entry point. Such an import is how circles start, and it makes the lower module untestable alone."""
    assert upward_imports(import_graph()) == []


def test_layer_check_finds_a_planted_upward_import():
    """Catches a layer check that never reports anything (which would make the test above vacuous)."""
    graph = import_graph()
    graph["training.errors"] = graph["training.errors"] | {"training.main"}
    assert ("training.errors", "training.main") in upward_imports(graph)
