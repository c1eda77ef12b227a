"""The project stands alone: nothing in it points at files a user of the repository does not have, and
no test file leans on another (what tests share is in ``helpers.py``, fixtures in ``conftest.py``)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

#: Background notes that live outside the repository, and any path climbing out of it to them.
#: (Spelt in pieces so that this file does not match itself.)
OUTSIDE = re.compile(
    "|".join([r"\bSPEC" r"(\.md|\s*§|'s)", r"\bSTYLE" r"(\.md|:)", r"\bSTACK" r"\.md", r"\.\./" "shared"])
)
ROOTS = ("README.md", "docs", "profiles", "pipeline", "stages", "benchmarks", "tests", "infra", "params.yaml",
         "dvc.yaml", "pyproject.toml", "run")  # fmt: skip


def test_no_file_cites_notes_from_outside_the_repository(root: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", *ROOTS],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "README.md" in files and "docs/models.md" in files
    found = []
    for name in files:
        path = root / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [
            f"{name}:{i}: {line.strip()}"
            for i, line in enumerate(text.splitlines(), 1)
            if OUTSIDE.search(line)
        ]
    assert not found, "cite the papers and the authors' repositories instead:\n" + "\n".join(found)


def test_the_check_catches_a_citation() -> None:
    assert OUTSIDE.search("transcribed from " + "SPEC" + ".md section 2")
    assert OUTSIDE.search("see " + "../" + "shared/official-checkpoints")
    assert OUTSIDE.search("the recipe (" + "SPEC" + " §2)") and OUTSIDE.search("(" + "STYLE" + ": one layer)")
    assert not OUTSIDE.search("_CLUSTER_SPEC = {}") and not OUTSIDE.search("FAMILY_STYLE[fam]")


def test_no_test_file_imports_another(root: Path) -> None:
    found = []
    for path in sorted((root / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [
                f"tests/{path.name}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest"
            ]
    assert not found, "move what test files share into tests/helpers.py:\n" + "\n".join(found)


def test_no_library_module_exceeds_500_lines(root: Path) -> None:
    """One job per module: a file of the library that grows past 500 lines is split by concern."""
    long = {
        str(p.relative_to(root)): n
        for p in sorted((root / "pipeline").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, f"split these modules by concern: {long}"
