"""The package's import rules (docs/architecture.md), checked on the source: an AST walk of
every module's imports (top-level and function-level alike), and hf/ imported with the package
made unimportable. Each rule is also checked to fail on a planted violation."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_navil"

# What each part of the package may import from the package (besides itself). The house:
# config at the bottom, then ops / parallel, data, models, checkpoint, then what drives them
# (training, inference, conversion, planning) and the entry points on top. hf/ is the remote
# code shipped inside exported checkpoints: it imports nothing of ours. testing/ (tests and
# examples) may import anything; nothing else imports it.
LOWER = {"config", "__init__"}
ALLOWED: dict[str, set[str]] = {
    "config": {"__init__"},
    "ops": LOWER | {"_C", "_C_cuda"},
    "parallel": LOWER,
    "data": LOWER | {"ops"},
    "models": LOWER | {"ops", "parallel"},
    "checkpoint": LOWER | {"ops", "parallel", "models"},
    "planning": LOWER | {"models"},
    "training": LOWER | {"ops", "parallel", "data", "models", "checkpoint", "planning"},
    "inference": LOWER | {"ops", "parallel", "data", "models", "checkpoint"},
    "conversion": LOWER | {"ops", "parallel", "data", "models", "checkpoint", "hf"},
    "hf": set(),
}
ENTRY_POINTS = {"train", "launch", "env", "cli", "__init__", "__main__"}
"""Top-level modules: they may import any part but testing/."""
GROUPS_AS_ARGUMENTS = {"models", "training"}
"""Parts that take their process groups as arguments (``parallel.ParallelGroups``, from
``parallel.initialize()``): they never import megatron-core's global ``parallel_state``."""
PARALLEL_STATE = "megatron.core.parallel_state"


def part_of(path: Path, package: Path = PACKAGE) -> str:
    """``megatron_navil/<part>/...`` -> part; a top-level module -> its name."""
    rel = path.relative_to(package).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def imported_parts(source: str, path: Path, package: Path = PACKAGE) -> set[str]:
    """The package parts ``source`` imports (absolute and relative imports, any depth)."""
    out: set[str] = set()
    here = path.relative_to(package.parent).with_suffix("").parts[:-1]  # the module's package
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names = [module]
            if module == "megatron_navil":  # a submodule, or a name of the package's __init__
                names = [
                    f"megatron_navil.{a.name}"
                    if (package / a.name).is_dir() or (package / f"{a.name}.py").is_file()
                    else "megatron_navil"
                    for a in node.names
                ]
        for name in names:
            parts = name.split(".")
            if parts[0] == "megatron_navil":
                out.add(parts[1] if len(parts) > 1 else "__init__")
    return out


def imports_parallel_state(source: str) -> bool:
    """Whether ``source`` imports megatron-core's ``parallel_state`` (in any spelling)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            if any(a.name == PARALLEL_STATE or a.name.startswith(PARALLEL_STATE + ".")
                   for a in node.names):  # fmt: skip
                return True
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module == PARALLEL_STATE or node.module.startswith(PARALLEL_STATE + "."):
                return True
            full = {f"{node.module}.{a.name}" for a in node.names}
            if PARALLEL_STATE in full:
                return True
    return False


def violations(package: Path = PACKAGE) -> list[str]:
    """Every import that breaks a rule, as ``file: imports part``."""
    out = []
    for path in sorted(package.rglob("*.py")):
        part = part_of(path, package)
        used = imported_parts(path.read_text(), path, package) - {part}
        if part == "testing":
            continue
        if part in ENTRY_POINTS:
            bad = used & {"testing"}
        elif part in ALLOWED:
            bad = used - ALLOWED[part]
        else:
            bad = {f"(no rule for part {part!r}: add it to ALLOWED and docs/architecture.md)"}
        out += [f"{path.relative_to(package.parent)}: imports {b}" for b in sorted(bad)]
        if part in GROUPS_AS_ARGUMENTS and imports_parallel_state(path.read_text()):
            out.append(
                f"{path.relative_to(package.parent)}: imports {PARALLEL_STATE} (take the "
                "groups as an argument: parallel.ParallelGroups)"
            )
    return out


def test_the_package_keeps_its_import_rules():
    assert violations() == []


@pytest.mark.parametrize(
    ("part", "planted"),
    [
        ("models", "from megatron_navil.training import step\n"),
        ("data", "def f():\n    from megatron_navil.models import build\n"),
        ("training", "import megatron_navil.testing.synthetic_corpus\n"),
        ("config", "from ..data import tokenizer\n"),
        ("hf", "from megatron_navil.config import model\n"),
        ("models", "from megatron.core import parallel_state\n"),
        ("models", "def f():\n    from megatron.core.parallel_state import *\n"),
        ("training", "def f():\n    import megatron.core.parallel_state as ps\n"),
    ],
)
def test_a_planted_violation_fails(tmp_path, part, planted):
    """The walk sees a forbidden import wherever it is written (a copy of the package with one
    module added)."""
    import shutil

    copy = tmp_path / "megatron_navil"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (copy / part / "planted_violation.py").write_text(planted)
    found = violations(copy)
    assert [v for v in found if "planted_violation" in v], found


def test_hf_remote_code_imports_without_the_package(tmp_path):
    """What an exported checkpoint ships (megatron_navil/hf/*.py, copied next to config.json
    and imported by transformers as one package) must import with megatron_navil
    unimportable, as on a user's machine without it."""
    import shutil

    remote = tmp_path / "navil_remote"
    remote.mkdir()
    for f in (PACKAGE / "hf").glob("*_navil.py"):
        shutil.copy(f, remote / f.name)
    (remote / "__init__.py").write_text("")
    code = textwrap.dedent(
        f"""
        import importlib.abc, importlib.util, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "megatron_navil" or name.startswith("megatron_navil."):
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(tmp_path)!r})
        for name in ("configuration_navil", "processing_navil", "tokenization_navil",
                     "modeling_navil"):
            __import__(f"navil_remote.{{name}}")
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
