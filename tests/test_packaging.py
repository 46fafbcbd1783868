"""What a plain `pip install rdsproxy` brings must cover every import of the product
package: a module imported by a code path and left to an extra fails at run time, on
the user's machine (the MySQL engine's RSA key once needed `cryptography` from an extra)."""
from __future__ import annotations

import ast
import pathlib
import re
import sys

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Imports that are optional by design, each behind a documented extra or a fallback.
OPTIONAL = {
    "boto3": "aws", "botocore": "aws",   # aws-secretsmanager: secret references only
    "cython": None,                      # the fast path's twins run without it (compiled: build time)
}
# Import names whose distribution is named otherwise (botocore comes with boto3).
DISTRIBUTION = {"botocore": "boto3"}


def third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / "rdsproxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "rdsproxy":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def declared(requirements) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower() for req in requirements}


def test_every_import_of_the_package_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = declared(project["dependencies"])
    extras = {name: declared(reqs) for name, reqs in project["optional-dependencies"].items()}
    missing = {}
    for module, where in third_party_imports().items():
        distribution = DISTRIBUTION.get(module, module).lower()
        if module in OPTIONAL:
            extra = OPTIONAL[module]
            assert extra is None or distribution in extras[extra], (module, extra)
            continue
        if distribution not in required:
            missing[module] = sorted(where)
    assert not missing, f"imported but not in [project] dependencies: {missing}"
