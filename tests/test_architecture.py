"""The package's shape: no import circle among rlhfchat's modules, no module over 600 lines, and the PPO loop
free of CPU machinery (that lives behind the runtime's one door, train/runtime.py -> train/cpu.py).

Imports are read from the source (ast), wherever they are written: an import inside a function closes a circle as
surely as one at the top, it only hides it until the function runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600
CPU_MODULES = ("rlhfchat.train.cpu", "deepspeed", "kernels", "intel_extension_for_pytorch")
"""What ppo.py may not import: the CPU door, and device- or engine-specific machinery."""
CPU_NAMES_ELSEWHERE = {"adapters_merged", "merged_lora_weight", "GradNorms", "clip_and_step", "fused_supported"}
"""CPU speed-ups that live outside train/cpu.py (lora.py, train/optim.py) and that only the runtime switches on."""


def module_name(root: Path, path: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def _target(root: Path, module: str, name: str | None) -> str:
    """The rlhfchat module an import reaches: `from a.b import c` is a.b.c when that is a module, else a.b."""
    if name is not None:
        candidate = f"{module}.{name}"
        path = root / candidate.replace(".", "/")
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return candidate
    return module


def imports_of(root: Path, path: Path) -> list[tuple[str, str | None, int]]:
    """Every import in a file, at any depth: (module, imported name or None, line)."""
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's own package
                base = module_name(root, path).split(".")
                base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out += [(module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
    return out


def import_graph(root: Path, package: str = "rlhfchat") -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        mod = module_name(root, path)
        graph.setdefault(mod, set())
        for module, name, _ in imports_of(root, path):
            if module == package or module.startswith(package + "."):
                target = _target(root, module, name)
                if target != mod:
                    graph[mod].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


def long_files(root: Path, package: str = "rlhfchat", limit: int = MAX_LINES) -> list[str]:
    return [f"{p.relative_to(root)}: {n} lines" for p in sorted((root / package).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > limit]


def cpu_imports(root: Path, path: Path) -> list[str]:
    """Imports of CPU machinery in one file: a CPU module, or a name that train/cpu.py (or CPU_NAMES_ELSEWHERE)
    defines."""
    cpu = root / "rlhfchat" / "train" / "cpu.py"
    names = set(CPU_NAMES_ELSEWHERE)
    if cpu.is_file():
        names |= {n.name for n in ast.parse(cpu.read_text()).body
                  if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}
    bad = []
    for module, name, line in imports_of(root, path):
        target = _target(root, module, name) if module.startswith("rlhfchat") else module
        if any(target == m or target.startswith(m + ".") for m in CPU_MODULES) or name in names:
            bad.append(f"{path.name}:{line}: {module}{'.' + name if name else ''}")
    return bad


def test_no_import_circle_among_rlhfchat_modules():
    assert import_cycles(import_graph(ROOT)) == []


def test_no_module_over_600_lines():
    assert long_files(ROOT) == []


def test_the_ppo_loop_imports_nothing_cpu_specific():
    assert cpu_imports(ROOT, ROOT / "rlhfchat" / "train" / "ppo.py") == []


def test_the_checks_catch_a_violation(tmp_path):
    """Each check fails on a planted violation: a circle through a function-level import, a long file, and ppo.py
    importing the CPU door or one of its names."""
    pkg = tmp_path / "rlhfchat"
    (pkg / "train").mkdir(parents=True)
    for f in ("__init__.py", "train/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "a.py").write_text("from rlhfchat.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from rlhfchat import a\n    return a\n")
    (pkg / "c.py").write_text("import rlhfchat.a\n")
    (pkg / "train" / "cpu.py").write_text("def fuse_norms(model):\n    return 0\n")
    assert import_cycles(import_graph(tmp_path)) == [["rlhfchat.a", "rlhfchat.b"]]
    (pkg / "b.py").write_text("def thing():\n    return 1\n")
    assert import_cycles(import_graph(tmp_path)) == []

    (pkg / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_files(tmp_path) == [f"rlhfchat/long.py: {MAX_LINES + 1} lines"]

    ppo = pkg / "train" / "ppo.py"
    ppo.write_text("import torch\nfrom rlhfchat.train.runtime import Runtime\n")
    assert cpu_imports(tmp_path, ppo) == []
    ppo.write_text("def step():\n    from rlhfchat.train import cpu\n")
    assert cpu_imports(tmp_path, ppo) == ["ppo.py:2: rlhfchat.train.cpu"]
    ppo.write_text("from rlhfchat.train.cpu import fuse_norms\nfrom rlhfchat.lora import adapters_merged\n"
                   "import deepspeed.ops\n")
    assert cpu_imports(tmp_path, ppo) == ["ppo.py:1: rlhfchat.train.cpu.fuse_norms",
                                          "ppo.py:2: rlhfchat.lora.adapters_merged", "ppo.py:3: deepspeed.ops"]
