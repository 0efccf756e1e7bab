"""The package's import graph: no cycles, and no module importing from a layer above its own.
Every `import posttrain...` counts, at the top of a file or inside a function (a lazy import
hides a cycle from Python, not from a reader). The layers, lowest first; a module may import
its own layer and the layers below it:"""

import ast
from pathlib import Path

from tests.helpers import REPO

LAYERS = [
    # the foundation: no posttrain imports but each other
    ("foundation", ["errors", "ranges", "seeds", "progress", "stats", "paper_numbers", "data.examples", "data.problems",
                    "data.templates", "generation.spec"]),
    ("objectives", ["losses"]),  # the registry, the head engine, one file per objective
    ("recipes", ["config"]),  # the schema and loader (objective params come from the registry)
    ("data and process", ["data", "runtime", "trackers", "memory", "optim"]),
    ("models and folders", ["models", "scale", "runfolder", "eval_record"]),
    ("model passes", ["generation", "scoring", "policy"]),
    ("evaluation and checks", ["eval", "preflight", "rft", "pref_data"]),
    ("teacher cache", ["teacher_cache", "teacher_cache_reader"]),  # teacher-cache writes it, train reads it
    ("loop parts", ["signals", "rl_checks", "rl_metrics", "rl_shaping", "rollouts", "loop", "preference", "critic"]),
    ("commands", ["rl", "train", "report", "report_rows", "report_cells", "report_plots", "claims", "recipes"]),
    ("cli", ["cli"]),
]


def _modules() -> dict[str, Path]:
    root = REPO / "posttrain"
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("posttrain") and not node.level:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("posttrain")}
    return found - {name}


def _layer(module: str) -> int:
    """The layer of the longest listed name that `module` is (or is inside)."""
    relative = module.removeprefix("posttrain").removeprefix(".")
    best, length = None, -1
    for index, (_, names) in enumerate(LAYERS):
        for listed in names:
            if (relative == listed or relative.startswith(listed + ".")) and len(listed) > length:
                best, length = index, len(listed)
    assert best is not None or relative == "", f"{module} is in no layer: add it to LAYERS"
    return best if best is not None else 0


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_import_goes_down_or_sideways():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
              for m, deps in _graph().items() for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)
