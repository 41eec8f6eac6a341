"""The repository needs nothing beside it: the tests, tutorials, benchmarks, examples and the
package read only files inside the repository (``.ci/run`` also runs the suite from a copy of
the repository in an empty folder)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A path that leaves the repository for the project folder beside it (the parent's folder of
# shared material, written as one path or joined from parts, or its benchmark subfolder).
OUTSIDE = re.compile(r"\.\./shared|shared[/\\]bench|\"\.\.\",\s*\"shared\"|'\.\.',\s*'shared'")


def test_no_file_reads_the_project_folder_beside_the_repository():
    files = [p for folder in ("pyroflows", "tests", "tutorials", "benchmarks", "examples", "docs")
             for pattern in ("*.py", "*.md") for p in (ROOT / folder).rglob(pattern)
             if "_build" not in p.parts]
    files += [ROOT / ".ci" / "run", ROOT / "README.md"]
    files = [p for p in files if p != pathlib.Path(__file__)]
    assert len(files) > 50
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files if p.exists()
                 for i, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not offenders, f"these lines read outside the repository: {offenders}"


def test_the_benchmark_data_folder_holds_every_file_its_readme_names():
    data = ROOT / "benchmarks" / "data"
    readme = (data / "README.md").read_text()
    names = set(re.findall(r"`([\w./<>-]+\.(?:npz|json|gz))`", readme))
    assert names, "the README names no files"
    for name in names:
        pattern = name.replace("<posterior>", "*")
        assert list(data.rglob(pattern)), f"benchmarks/data/README.md names {name}, not found"
