"""Sphinx configuration of ppl_em's documentation site.

Build it (warnings are errors) with::

    .venv/bin/pip install -q -c constraints.txt -e ".[docs]"
    .venv/bin/python -m sphinx -W --keep-going -q -b html -d docs/_build/doctrees docs docs/_build/html

Two parts are generated at every build: the API reference (``docs/api/``, one page per module,
from the docstrings, by numpydoc) and the tutorial gallery (``docs/tutorials/``: every
``tutorials/[0-9]*.py`` run by sphinx-gallery in its quick mode, ``PPL_EM_QUICK=1``; set
``PPL_EM_QUICK=0`` for the full-length runs).
"""

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

os.environ.setdefault("PPL_EM_QUICK", "1")
FIGURES = DOCS / "_build" / "tutorial_figures"  # where the tutorials write their PNGs during the build
os.environ["PPL_EM_TUTORIAL_OUT"] = str(FIGURES)
os.environ.setdefault("MPLBACKEND", "Agg")

import ppl_em  # noqa: E402
from ppl_em_api import escape_bars, write_api  # noqa: E402
from ppl_em_gallery import ClearSavedFigures, SavedFigureScraper, restore_original_downloads, \
    write_gallery_sources  # noqa: E402

def write_cli_help(target: Path) -> None:
    """The ``--help`` text of ``ppl-em`` and its commands, for the command-line page."""
    from ppl_em.cli import build_parser

    target.mkdir(parents=True, exist_ok=True)
    parser = build_parser()
    (target / "ppl-em.txt").write_text(parser.format_help())
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        (target / f"ppl-em-{name}.txt").write_text(sub.format_help())


write_api(DOCS / "api")
write_cli_help(DOCS / "_generated")
write_gallery_sources(ROOT / "tutorials", DOCS / "_tutorials", gallery_dir="tutorials")

project = "ppl_em"
author = "the ppl_em authors"
copyright = "the ppl_em authors"
release = version = ppl_em.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]
exclude_patterns = ["_build", "_tutorials", "_generated", "tutorials/*.ipynb", "tutorials/*.py", "tutorials/*.md5",
                    "tutorials/*.codeobj.json", "tutorials/*.zip"]
templates_path = []
default_role = "literal"  # `x` in a docstring reads as code, never as a broken reference

autodoc_typehints = "none"  # the numpydoc sections give types and shapes
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
autosummary_generate = False
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True

_scraper = SavedFigureScraper(FIGURES)
sphinx_gallery_conf = {
    "examples_dirs": str(DOCS / "_tutorials"),
    "gallery_dirs": "tutorials",
    "filename_pattern": r"/[0-9]",  # execute every tutorial
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": (_scraper,),  # the saved files; matplotlib's scraper would show each figure twice
    "reset_modules": (ClearSavedFigures(_scraper), "matplotlib"),
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_signature": False,
    "min_reported_time": 1,
    "write_computation_times": False,  # its page loads scripts from a CDN
    # A page shows what the script prints, nothing more: a cell's last expression (often the
    # path that teaching.savefig returns, in the build's own folder) is not echoed.
    "capture_repr": (),
}

html_theme = "pydata_sphinx_theme"
html_title = f"ppl_em {release}"
html_static_path = []
html_show_sourcelink = False
html_theme_options = {
    "navigation_with_keys": False,
    "show_prev_next": True,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_sidebars = {"index": [], "user_guide": [], "sklearn": [], "cli": []}


_LITERAL = re.compile(r"(``.*?``)")
_SHAPE_STAR = re.compile(r"(?<=[(\[,] )\*(?=\w)|(?<=[(\[])\*(?=\w)")


def _shape_stars(app, what, name, obj, options, lines) -> None:
    """Docstrings write shapes as Python does, ``(n, *event)``; outside literals reStructuredText
    would read that star as the start of emphasis, so it is escaped."""
    for i, line in enumerate(lines):
        parts = _LITERAL.split(line)
        lines[i] = "".join(part if part.startswith("``") else _SHAPE_STAR.sub(r"\\*", part) for part in parts)


def _absolute_bars(app, what, name, obj, options, lines) -> None:
    """Docstrings write absolute values as the lecture notes do, ``log |det J|``: see :func:`escape_bars`."""
    escape_bars(lines)


def _restore_downloads(app) -> None:
    restore_original_downloads(ROOT / "tutorials", DOCS / "tutorials")


def setup(app):
    # after sphinx-gallery's own builder-inited handler has copied its scripts next to the pages
    app.connect("builder-inited", _restore_downloads, priority=900)
    app.connect("autodoc-process-docstring", _shape_stars)
    app.connect("autodoc-process-docstring", _absolute_bars)
