#!/usr/bin/env python
"""The architecture as the code has it: modules by layer, imports that point back up, the largest functions.

    python scripts/import_graph.py [--dot FILE]

Layers, lowest first (a module may import its own layer and the ones below; tests/test_layout.py defines
and checks them):
  ground      errors and exit statuses, batching, logging, the step-observer interface, process groups: what every part uses and that uses nothing
  methods     contrastive: the objectives and their estimators (never import the trainer)
  parts       flags, data, optimizer, schedule, checkpoint, interop, evaluation, the loop and its observers
  start-up    process set-up and the start-up checks
  entry       training.main
  clients     the benchmark (a client of the trainer)
Imports are read statically (ast, function bodies included), as tests/test_layout.py reads them.
"""
import argparse
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_layout import LAYERS, SRC, import_graph, layer_of, upward_imports  # noqa: E402

def functions(limit: int = 5) -> list[tuple[int, str]]:
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(SRC)}:{node.name}"))
    return sorted(found, reverse=True)[:limit]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dot", help="also write the graph as Graphviz dot")
    args = parser.parse_args(argv)
    graph = import_graph()
    for layer in LAYERS:
        members = sorted(m for m in graph if layer_of(m) == layer)
        print(f"{layer} ({len(members)}): {' '.join(members)}")
    edges = sum(len(t) for t in graph.values())
    print(f"\n{len(graph)} modules, {edges} imports between them")
    up = upward_imports(graph)
    print(f"imports that point back up: {len(up)}")
    for module, target in up:
        print(f"  {module} ({layer_of(module)}) -> {target} ({layer_of(target)})")
    print("largest functions (lines):")
    for lines, name in functions():
        print(f"  {lines:4d}  {name}")
    long_files = sorted((len(p.read_text().splitlines()), str(p.relative_to(SRC))) for p in SRC.rglob("*.py"))
    print("files over 400 lines:", ", ".join(f"{n} ({lines})" for lines, n in long_files if lines > 400) or "none")
    if args.dot:
        with open(args.dot, "w") as f:
            f.write("digraph imports {\n")
            for module, targets in sorted(graph.items()):
                for target in sorted(targets):
                    f.write(f'  "{module}" -> "{target}";\n')
            f.write("}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
