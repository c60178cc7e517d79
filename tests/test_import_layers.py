"""The import graph in layers, as the README's layout section lists them: nothing imports a higher layer.

Read from the source with ``ast`` (no imports run), so a module-level or a function-level import both count.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The library's layers, lowest first (README "Layout"); a module may import its own layer and those before.
LIBRARY = (
    "errors", "logs", "hashing", "db", "config", "manifest", "alt_text", "imaging", "net", "monitoring",
    "metrics", "data", "registry", "models", "http", "serving", "api", "client", "launcher", "backfill",
    "cli",
)  # fmt: skip


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "snap2caption" and len(parts) > 1 and parts[1] in LIBRARY else None


def test_every_library_module_is_in_a_layer() -> None:
    found = {p.stem if p.suffix == ".py" else p.name for p in (ROOT / "snap2caption").iterdir()}
    found -= {"__init__", "__main__", "__pycache__", "py.typed"}
    assert found <= set(LIBRARY), f"not in a layer (add it to LIBRARY and the README): {found - set(LIBRARY)}"


def test_the_library_imports_only_down_and_only_the_cli_imports_services_or_training() -> None:
    wrong: list[str] = []
    for path in sorted((ROOT / "snap2caption").rglob("*.py")):
        rel = path.relative_to(ROOT / "snap2caption")
        mine = rel.parts[0].removesuffix(".py")
        if mine not in LIBRARY:
            continue
        for name in _imports(path):
            if mine != "cli" and name.split(".")[0] in {"services", "training"}:
                wrong.append(f"{rel}: {name}")
            theirs = _layer(name)
            if theirs is not None and LIBRARY.index(theirs) > LIBRARY.index(mine):
                wrong.append(f"{rel}: {name} ({mine} is below {theirs})")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_cli() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}: {name}"
        for top in ("snap2caption", "services", "training", "infra")
        for path in sorted((ROOT / top).rglob("*.py"))
        if "cli" not in path.relative_to(ROOT).parts and path.name != "__main__.py"  # the entry points
        for name in _imports(path)
        if name == "snap2caption.cli" or name.startswith("snap2caption.cli.")
    ]
    assert not wrong, "\n".join(wrong)
