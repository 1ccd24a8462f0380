"""Sphinx configuration of the API reference.

Build it from the repository root, warnings as errors::

    python -m sphinx -W --keep-going -b html docs/api docs/api/_build/html
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # document this checkout, whatever copy of the package is installed

import uotp_geometric  # noqa: E402

project = "uotp_geometric"
author = "uotp_geometric contributors"
copyright = "2026, uotp_geometric contributors"
release = uotp_geometric.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings' Args sections give the types, as PyG's do
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list = []
