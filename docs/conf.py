"""Sphinx configuration of the pyroflows documentation.

Build (from the repository root, warnings as errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Document (and run the tutorials against) this checkout, installed or not.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)
# The tutorials' models are small: one thread per kernel is fastest, and on a busy machine
# more threads only wait on each other. (Set OMP_NUM_THREADS yourself to override.)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# tqdm.auto, imported by the package, warns in a kernel without ipywidgets; that warning is
# about the build's kernel, not about the tutorial, so it stays out of the rendered pages.
os.environ["PYTHONWARNINGS"] = ",".join(
    w for w in (os.environ.get("PYTHONWARNINGS", ""), "ignore:IProgress not found") if w
)
# The tutorials' matplotlib figures render inline; no window is ever opened.
os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")

import pyroflows  # noqa: E402

project = "pyroflows"
author = "the pyroflows authors"
copyright = "the pyroflows authors"  # noqa: A001
release = pyroflows.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    # MathJax served from the built site itself, so the pages render math offline too.
    "sphinx-mathjax-offline",
]

exclude_patterns = ["_build", "conf.py", "screenshots", "**/__pycache__", "**/.ipynb_checkpoints"]
templates_path: list[str] = []

# -- Markdown pages and the tutorials ---------------------------------------------------------
# Markdown pages through myst-parser (myst-nb loads it); the tutorials are jupytext percent
# scripts under tutorials/ (docs/tutorials is a link to that folder, so nothing is copied).
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".py": "myst-nb"}
nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Every tutorial runs once per build, at its full settings, in its own folder (tutorials/),
# so its relative paths such as ../benchmarks/data resolve as they do in Jupyter.
nb_execution_mode = "force"
nb_execution_in_temp = False
nb_execution_timeout = 1200
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# -- API reference ----------------------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autoclass_content = "both"
autosummary_generate = False

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- HTML -------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"pyroflows {release}"
html_static_path = ["_static"]
html_css_files = ["pyroflows.css"]
html_theme_options = {"navigation_with_keys": True}


# -- Docstring conventions napoleon does not parse on its own ---------------------------------
_QUALIFIED_SECTION = re.compile(r"^(\s*)(Arguments|Attributes|Returns|Raises) \((.+)\):\s*$")


def _split_qualified_sections(app, what, name, obj, options, lines):
    """Read ``Attributes (after :meth:`fit`):`` as the sentence "After fit:" and a section.

    Napoleon only takes a bare ``Attributes:`` as a section header; with the qualifier it would
    read the entries as plain text (and ``dim_`` as a link target).
    """
    for i, line in enumerate(list(lines)):
        match = _QUALIFIED_SECTION.match(line)
        if match:
            indent, section, qualifier = match.groups()
            lines[i:i + 1] = [f"{indent}{qualifier[0].upper()}{qualifier[1:]}:", "",
                              f"{indent}{section}:"]


def setup(app):
    # Before napoleon (priority 500) turns the sections into fields.
    app.connect("autodoc-process-docstring", _split_qualified_sections, priority=400)
