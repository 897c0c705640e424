"""Code health: the stages stay layered (runtime/ imports no other stage and no torch; engines/, export/
and serve/ build on runtime/, calibration/ on the first two, the CLI on everything), no module imports itself
back through others, and no function is too long to read at once.

Imports are read statically from the source (function-level imports included), so a lazy import
cannot hide a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"runtime": "runtime", "engines": "engines", "export": "export", "calibration": "calibration", "serve": "serve",
          "cli": "cli"}
# stage -> stages it may import
ALLOWED = {
    "runtime": set(),
    "engines": {"runtime"},
    "export": {"runtime"},
    "calibration": {"runtime", "engines", "export"},
    "serve": {"runtime"},
    "cli": {"runtime", "engines", "export", "calibration", "serve"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "ardeploy." + ".".join(parts)


def runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def imports_of(path: Path, annotations: bool = False) -> set[str]:
    """Absolute names of the ardeploy modules a file imports anywhere in it: (module, module.name) pairs for
    `from module import name`, where name may itself be a module. annotations: `if TYPE_CHECKING:` imports
    too (not imported at run time, but a dependency of the design all the same)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in (ast.walk(tree) if annotations else runtime_nodes(tree)):
        if isinstance(node, ast.Import):
            found |= {(a.name, a.name) for a in node.names if a.name.startswith("ardeploy")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ardeploy"):
                found |= {(target, f"{target}.{a.name}") for a in node.names}
    return found


def graph(annotations: bool = False) -> dict[str, set[str]]:
    files = {module_name(p): p for stage in STAGES for p in (ROOT / stage).rglob("*.py")}
    edges = {}
    for name, path in files.items():
        targets = {sub if sub in files else module for module, sub in imports_of(path, annotations)}
        edges[name] = {t for t in targets if t in files and t != name}
    return edges


def stage_of(module: str) -> str:
    return module.split(".")[1]


def test_runtime_imports_no_torch():
    for path in [*(ROOT / "runtime").rglob("*.py"), *(ROOT / "serve").rglob("*.py")]:   # the server neither
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(n == "torch" or n.startswith("torch.") for n in names), path


def test_stages_import_only_the_layers_below():
    wrong = [(a, b) for a, targets in graph().items() for b in targets
             if stage_of(b) != stage_of(a) and stage_of(b) not in ALLOWED[stage_of(a)]]
    assert not wrong, wrong


def test_engines_never_imports_runtime_backends():
    wrong = [(a, b) for a, targets in graph().items() for b in targets
             if stage_of(a) == "engines" and b.startswith("ardeploy.runtime.backends")]
    assert not wrong, wrong


def test_no_import_cycles():
    """Between files, annotation-only imports included: a module handing itself to a helper that types it
    back is a circle too (calibration's quantize -> write -> quantize was one)."""
    edges = graph(annotations=True)
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles[:3]


def test_functions_read_at_once():
    """No function outside tests is longer than 80 lines (split long ones into named steps)."""
    long = []
    for folder in (*STAGES, "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def calls(folders, attribute_names: set[str]):
    """(file, line, receiver source) of every call `receiver.name(...)` with name in attribute_names."""
    found = []
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            source = path.read_text(encoding="utf-8")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                        node.func.attr in attribute_names:
                    found.append((path.relative_to(ROOT).as_posix(), node.lineno,
                                  ast.get_source_segment(source, node.func.value) or ""))
    return found


def test_backends_are_used_through_their_declared_contract():
    """No getattr/hasattr probing of a backend (or of its logits) outside runtime/backends/: what a
    backend can do is declared in runtime/backends/base.py."""
    probes = []
    for folder in (*STAGES, "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.is_relative_to(ROOT / "runtime" / "backends"):
                continue
            source = path.read_text(encoding="utf-8")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                        node.func.id in ("getattr", "hasattr") and node.args:
                    target = ast.get_source_segment(source, node.args[0]) or ""
                    if "backend" in target or "logits" in target.lower():
                        probes.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}({target}, ...)")
    assert not probes, probes


def test_one_decode_primitive_runs_the_model():
    """Generation of every kind (text, chat, speculation, batching, images, verify, benchmarks) runs the
    model only through runtime/decode.py: nothing else calls a backend's step methods."""
    steps = {"step", "step_rows", "prefill_features"}
    outside = [f"{f}:{line} {receiver}" for f, line, receiver in calls((*STAGES, "scripts"), steps)
               if "backend" in receiver and f != "runtime/decode.py" and not f.startswith("runtime/backends/")]
    assert not outside, outside


def test_one_definition_of_each_shared_piece():
    """The CUDA-graph run options and the run-options object are defined once."""
    defs = {}
    for folder in STAGES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    defs.setdefault(node.name, []).append(path.relative_to(ROOT).as_posix())
    assert defs["graph_run_options"] == ["runtime/sessions.py"]
    assert defs["RunOptions"] == ["runtime/run_options.py"]
    assert defs["run_options"] == ["cli/options.py"]


def test_one_reader_and_one_writer_of_the_manifest():
    """manifest.json is parsed by runtime/bundle.read_manifest and written by write_manifest, nowhere else
    (runtime/atomic.py reads only the list of files a record owns)."""
    defs = {}
    for folder in STAGES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef):
                    defs.setdefault(node.name, []).append(path.relative_to(ROOT).as_posix())
    assert defs["read_manifest"] == defs["write_manifest"] == ["runtime/bundle.py"]
    writers = [f"{f}:{line}" for f, line, receiver in calls(STAGES, {"write_text"})
               if "manifest" in receiver.lower() and f != "runtime/bundle.py"]
    assert not writers, writers
