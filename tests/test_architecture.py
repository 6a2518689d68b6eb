"""The architecture of docs/architecture.md, enforced: which package may import which, where Ray, DeepSpeed and
torch may appear, no import cycles, short functions, and no config key that nothing reads. Pure AST reads of the
source tree: no module is imported, so a rule breaks here before it breaks a run."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from distill.config.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"errors", "io", "batch"}
# package -> the distill packages it may import (besides the leaves). Lower layers first; see docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "io": set(),
    "batch": set(),
    "config": set(),
    "losses": set(),
    "curriculum": set(),
    "tracking": set(),
    "data": set(),
    "cache": set(),
    "models": {"config", "data"},
    "teacher": {"models"},
    "xtok": {"data", "models", "teacher"},
    "eval": {"data", "losses", "xtok", "tracking", "curriculum"},
    "training": {"config", "losses", "curriculum", "data", "eval", "models", "teacher"},
    "student": {"config", "curriculum", "models", "training"},
    "cluster": {
        "cache",
        "config",
        "models",
        "student",
        "teacher",
        "training",
        "xtok",
        "tracking",
        "data",
        "eval",
    },
    "export": {"models", "tracking"},
    "run": {
        "config",
        "export",
        "losses",
        "curriculum",
        "data",
        "cache",
        "models",
        "teacher",
        "xtok",
        "eval",
        "training",
        "tracking",
    },
}
# Third-party packages only these packages may import (the one seam each).
ONLY_IN = {"ray": {"cluster"}, "deepspeed": {"student"}}
# distill/config is pure: the standard library, hydra and omegaconf (and the errors leaf).
CONFIG_THIRD_PARTY = {"hydra", "omegaconf"}
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    files = sorted((ROOT / "distill").rglob("*.py"))
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(), filename=str(p)) for p in files}


def _package(path: str) -> str:
    """distill/teacher/engine.py -> teacher; distill/batch.py -> batch."""
    parts = Path(path).with_suffix("").parts
    return parts[1]


def _imports(tree: ast.Module) -> list[tuple[str, int]]:
    """Every absolute import in the module, lazy ones inside functions included: (module name, line)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


def layer_violations(modules: dict[str, ast.Module]) -> list[str]:
    problems = []
    for path, tree in modules.items():
        pkg = _package(path)
        for name, line in _imports(tree):
            top, *rest = name.split(".")
            if top == "distill" and rest and rest[0] != pkg:
                target = rest[0]
                if target not in LEAVES and target not in ALLOWED[pkg]:
                    problems.append(f"{path}:{line}: distill.{pkg} may not import distill.{target}")
            elif top in ONLY_IN and pkg not in ONLY_IN[top]:
                problems.append(
                    f"{path}:{line}: {top} may only be imported in distill/{'|'.join(ONLY_IN[top])}"
                )
            elif top == "launch":
                problems.append(f"{path}:{line}: the library may not import launch/ (entry points only)")
            elif pkg == "config" and top != "distill" and top not in CONFIG_THIRD_PARTY and not _stdlib(top):
                problems.append(
                    f"{path}:{line}: distill/config is pure (stdlib, hydra, omegaconf); imports {top}"
                )
    return problems


def _stdlib(name: str) -> bool:
    import sys

    return name in sys.stdlib_module_names or name == "__future__"


def package_cycles(modules: dict[str, ast.Module]) -> list[list[str]]:
    """Cycles in the package import graph (depth-first search)."""
    graph: dict[str, set[str]] = {}
    for path, tree in modules.items():
        pkg = _package(path)
        for name, _ in _imports(tree):
            parts = name.split(".")
            if parts[0] == "distill" and len(parts) > 1 and parts[1] != pkg:
                graph.setdefault(pkg, set()).add(parts[1])
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_packages_import_only_the_layers_below_them():
    assert layer_violations(_modules()) == []


def test_no_import_cycles_between_packages():
    assert package_cycles(_modules()) == []


def test_the_rules_catch_a_broken_layer():
    """A Ray import in the losses and a cycle losses <-> training are both reported (the checks can fail)."""
    modules = _modules()
    modules["distill/losses/bad.py"] = ast.parse(
        "import ray\nfrom distill.training.objective import Objective\n"
    )
    problems = layer_violations(modules)
    assert "distill/losses/bad.py:1: ray may only be imported in distill/cluster" in problems
    assert "distill/losses/bad.py:2: distill.losses may not import distill.training" in problems
    assert any({"losses", "training"} <= set(cycle) for cycle in package_cycles(modules))
    modules = {"distill/config/bad.py": ast.parse("import torch\n")}
    assert layer_violations(modules) == [
        "distill/config/bad.py:1: distill/config is pure (stdlib, hydra, omegaconf); imports torch"
    ]


def long_functions(paths: list[Path]) -> list[str]:
    out = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    return out


def test_no_function_over_60_lines():
    paths = [*(ROOT / "distill").rglob("*.py"), *(ROOT / "launch").glob("*.py")]
    assert long_functions(paths) == []


# ---- every config key does something ------------------------------------------------------------------------
def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of the schema's leaf fields (`train.eval_every`, ...)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def unread_keys(keys: list[str]) -> list[str]:
    """Keys whose field name no code outside the schema reads (as `.name`, `"name"` or `name=`)."""
    sources = [
        p.read_text()
        for p in [
            *(ROOT / "distill").rglob("*.py"),
            *(ROOT / "launch").glob("*.py"),
            *(ROOT / "slurm").glob("*"),
        ]
        if p.is_file() and p.name != "schema.py"
    ]
    unread = []
    for key in keys:
        name = key.rsplit(".", 1)[-1]
        pattern = re.compile(rf"\.{name}\b|[\"']{name}[\"']|\b{name}=")
        if not any(pattern.search(text) for text in sources):
            unread.append(key)
    return unread


def test_every_config_key_is_read_by_some_code():
    keys = schema_keys(RunConfig)
    assert "train.eval_every" in keys and "cluster.buffer_capacity_bytes" in keys
    assert unread_keys(keys) == []
    assert unread_keys(["train.a_key_nothing_reads"]) == ["train.a_key_nothing_reads"]


@pytest.mark.parametrize("doc", ["docs/architecture.md", "README.md"])
def test_the_docs_name_every_package(doc):
    text = (ROOT / doc).read_text()
    missing = [pkg for pkg in ALLOWED if pkg not in LEAVES and f"distill/{pkg}" not in text]
    assert missing == []


# ---- no unsafe deserialisation ----------------------------------------------------------------------------------
def unsafe_loads(modules: dict[str, ast.Module]) -> list[str]:
    """pickle / marshal loads, torch.load without weights_only=True, and trust_remote_code=True, by place."""
    problems = []
    for path, tree in modules.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            if name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "dill.load"):
                problems.append(f"{path}:{node.lineno}: {name} (use safetensors or json)")
            elif name == "torch.load" and not _is_true(kwargs.get("weights_only")):
                problems.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
            elif _is_true(kwargs.get("trust_remote_code")):
                problems.append(f"{path}:{node.lineno}: trust_remote_code=True (let the config decide)")
    return problems


def _is_true(value: ast.expr | None) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def test_no_pickle_or_unsafe_torch_load_in_the_package():
    modules = _modules() | {
        str(p.relative_to(ROOT)): ast.parse(p.read_text()) for p in (ROOT / "launch").glob("*.py")
    }
    assert unsafe_loads(modules) == []
    bad = ast.parse(
        "import pickle, torch\npickle.loads(b'')\ntorch.load('x.pt')\ntorch.load('y.pt', weights_only=True)\n"
        "AutoModel.from_pretrained('p', trust_remote_code=True)\n"
    )
    assert unsafe_loads({"distill/bad.py": bad}) == [
        "distill/bad.py:2: pickle.loads (use safetensors or json)",
        "distill/bad.py:3: torch.load without weights_only=True",
        "distill/bad.py:5: trust_remote_code=True (let the config decide)",
    ]
