"""The rooms of ARCHITECTURE.md import downwards only: every import between two of the
package's rooms is one the table below allows."""

import ast
import pathlib

import pyroflows

PACKAGE = pathlib.Path(pyroflows.__file__).parent
BASE = {"_config", "_memo", "_gaussian", "_random", "_private", "_legacy",
        "_distributed", "_plates", "_checks"}  # below every room
ALLOWED = {
    "_fast": set(),
    "nn": {"_fast"},
    "transforms": {"nn", "_fast"},
    "flows": {"transforms", "nn", "_fast"},
    "distributions": {"flows"},
    "guides": {"distributions", "flows", "transforms"},
    "density": {"distributions", "flows", "transforms"},
    "diagnostics": set(),
    "testing": set(),
    "datasets": set(),
    "cli": {"datasets", "density", "diagnostics", "guides", "__version__"},
    "__main__": {"cli"},
    "__init__": set(),
    **{name: {"_config", "_memo", "_gaussian", "_private", "_distributed"} for name in BASE},
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: pathlib.Path, root: pathlib.Path = PACKAGE.parent) -> set[str]:
    """The pyroflows modules (absolute names) that ``path`` (a file below ``root``) imports."""
    package = path.relative_to(root).parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package)[: len(package) - (node.level - 1)]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:
                found.update(".".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyroflows"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pyroflows"))
    return found


def test_rooms_import_downwards_only():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
        room = _room(".".join(rel))
        assert room in ALLOWED, f"{path}: room {room!r} is not in ARCHITECTURE.md's table"
        for target in _imports(path):
            other = _room(target)
            if other != room and other not in ALLOWED[room] | BASE - {room}:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not wrong, "imports against the rooms' order:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: an import of ``flows`` from ``transforms`` is read as one."""
    probe = tmp_path / "pyroflows" / "transforms" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..flows import build\nfrom . import base\n")
    assert _imports(probe, tmp_path) == {"pyroflows.flows", "pyroflows.transforms.base"}
    assert "flows" not in ALLOWED["transforms"]


def test_every_subpackage_loads_on_first_access_in_a_fresh_process():
    """``import pyroflows as pf; pf.nn.MADE`` and the rest, with nothing imported before."""
    import subprocess
    import sys

    names = list(pyroflows._SUBMODULES)
    code = "import pyroflows as pf\n" + "\n".join(f"pf.{name}" for name in names)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    documented = {path.stem for path in (PACKAGE.parent / "docs" / "api").glob("*.rst")}
    assert documented - {"index"} <= set(names)
