"""The documentation site's generators (``docs/_ext``), without building the site.

The site itself is built by ``.ci/run`` (Sphinx, warnings as errors). Here: every tutorial
becomes a sphinx-gallery script with exactly its own code, its Markdown becomes valid-looking
reStructuredText, the exercises' solutions are folded away, figures (PNG and GIF) are picked
up, and the API reference lists every public name.
"""

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import jupytext  # noqa: E402
from ppl_em_api import escape_bars, public_modules, public_names, write_api  # noqa: E402
from ppl_em_gallery import SOLUTION_CLOSE, SOLUTION_OPEN, SavedFigureScraper, code_cells, gallery_source, \
    markdown_to_rst, tutorial_link_target, write_gallery_sources  # noqa: E402

TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9]*.py"))


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_the_gallery_runs_each_tutorials_own_code(path):
    gallery = ast.parse(gallery_source(path))
    original = ast.parse(path.read_text())
    docstring = gallery.body[0]
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    title = docstring.value.value.strip().splitlines()
    assert title[0].startswith(f"{int(path.name[:2])}. ") and set(title[1]) == {"="} and len(title[1]) >= len(title[0])
    # Markdown cells become the docstring and comments: the statements are the tutorial's, in order.
    assert ast.dump(ast.Module(body=gallery.body[1:], type_ignores=[])) == ast.dump(original)


def test_every_tutorial_is_in_the_gallery(tmp_path):
    written = write_gallery_sources(ROOT / "tutorials", tmp_path)
    assert [p.name for p in written] == [p.name for p in TUTORIALS]
    assert (tmp_path / "GALLERY_HEADER.rst").read_text().startswith("Tutorials\n=========\n")


# sphinx-gallery's own rule: a "# %%" line and the comment lines right after it are a text block.
TEXT_BLOCK = re.compile(r"(?P<header_line>^#{20,}.*|^# ?%%.*)\s(?P<text_content>(?:^#.*\s?)*)", flags=re.M)


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_code_cells_keep_their_comments_as_code(path):
    """The code blocks sphinx-gallery will cut from the script are the code cells, comments included."""
    source = gallery_source(path)
    rest = source[source.index('"""', 4) + 3:]  # after the docstring
    code = "".join(piece for piece in TEXT_BLOCK.split(rest)[::3])  # split keeps the two groups: drop them
    cells = [cell.strip() for cell in code_cells(path)]
    for cell in cells:
        assert cell in code, cell[:80]
    assert re.sub(r"\s", "", code) == re.sub(r"\s", "", "".join(cells))  # nothing else runs


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_solutions_are_folded_away_in_the_gallery(path):
    """Every cell tagged solution sits inside a <details> fold (one per run of consecutive solution cells),
    and nothing else does."""
    source = gallery_source(path)
    runs, previous = [], False
    for cell in jupytext.read(path)["cells"]:
        solution = "solution" in cell["metadata"].get("tags", [])
        if solution and not previous:
            runs.append([])
        if solution:
            runs[-1].append(cell)
        previous = solution
    assert runs and source.count(SOLUTION_OPEN) == source.count(SOLUTION_CLOSE) == len(runs)
    folds = re.findall(re.escape(SOLUTION_OPEN) + "(.*?)" + re.escape(SOLUTION_CLOSE), source, flags=re.S)
    assert len(folds) == len(runs)
    outside = re.sub(re.escape(SOLUTION_OPEN) + ".*?" + re.escape(SOLUTION_CLOSE), "", source, flags=re.S)
    for fold, run in zip(folds, runs):
        for cell in run:
            if cell["cell_type"] == "code":
                assert cell["source"].strip() in fold and cell["source"].strip() not in outside
            else:
                first_line = markdown_to_rst(cell["source"].strip().splitlines()[0]).strip().splitlines()[0]
                assert first_line in fold.replace("# ", "")


def test_the_scraper_shows_png_and_gif_figures(tmp_path):
    import matplotlib.pyplot as plt

    figures, images = tmp_path / "figures", tmp_path / "images"
    figures.mkdir()
    images.mkdir()
    (figures / "a.png").write_bytes(b"\x89PNG")
    (figures / "b.gif").write_bytes(b"GIF89a")
    (figures / "notes.txt").write_text("not a figure")
    scraper = SavedFigureScraper(figures)
    paths = (str(images / f"sphx_glr_x_{i:03d}.png") for i in range(1, 10))
    plt.figure()  # left open by teaching.savefig under sphinx-gallery: closed, not shown again
    rst = scraper(None, {"image_path_iterator": paths}, {"src_dir": str(tmp_path)})
    assert plt.get_fignums() == []
    assert sorted(p.name for p in images.iterdir()) == ["sphx_glr_x_001.png", "sphx_glr_x_002.gif"]
    assert "sphx_glr_x_002.gif" in rst and "notes" not in rst
    assert scraper(None, {"image_path_iterator": paths}, {"src_dir": str(tmp_path)}) == ""  # nothing new


@pytest.mark.parametrize("line, escaped", [
    ("log |det d theta / d u|: the objective", "log \\|det d theta / d u\\|: the objective"),
    ("|after| <= eps (1 + |before|)", "\\|after\\| <= eps (1 + \\|before\\|)"),
    ("``bic|aic|heldout`` and |x|", "``bic|aic|heldout`` and \\|x\\|"),
    (">>> p(x_t | w_t) |z|", ">>> p(x_t | w_t) |z|"),  # a doctest line
    ("(..., T|1, K) and ||x - mu_j||^2", "(..., T|1, K) and ||x - mu_j||^2"),  # single bars, norms
    ("\\|already\\|", "\\|already\\|"),
])
def test_escape_bars(line, escaped):
    assert escape_bars([line]) == [escaped]


def test_escape_bars_leaves_literal_blocks_alone():
    lines = ["Run::", "", "    a |b| c", "", "then |y|"]
    assert escape_bars(lines) == ["Run::", "", "    a |b| c", "", "then \\|y\\|"]


@pytest.mark.parametrize("markdown, rst", [
    ("# 1. Title\n\ntext", "1. Title\n========\n\ntext\n"),
    ("## Section", "Section\n-------\n"),
    ("w_j^(i) and ||x - mu_j||^2", "w\\_j^(i) and \\|\\|x - mu\\_j\\|\\|^2\n"),
    ("the **distortion** J", "the **distortion** J\n"),
    ("**w_j^(i)**'s sum", "**w\\_j^(i)**'s sum\n"),
    ("x**2**y", "x\\ **2**\\ y\n"),
    ("call `ppl_em.fit`, then", "call ``ppl_em.fit``, then\n"),
    ("*hard EM* on", "*hard EM* on\n"),
    ("**bold `code`**", "**bold code**\n"),
    ("* a\n* b", "* a\n* b\n"),
    ("1. one\n2. two\n   * nested", "1. one\n2. two\n\n   * nested\n"),
    ("text\n\n      phi_j = 1", "text\n\n.. code-block:: text\n\n     phi_j = 1\n"),  # literal: no escapes
    ("ends with::", "ends with:\\:\n"),
    ("[the GMM](02_gmm_density.py)", ":ref:`the GMM <sphx_glr_tutorials_02_gmm_density.py>`\n"),
    ("[pyro](https://pyro.ai)", "`pyro <https://pyro.ai>`__\n"),
    ("| a | b |\n| --- | --- |\n| 1 | 2 |", ".. list-table::\n   :header-rows: 1\n\n   * - a\n     - b\n   * - 1\n     - 2\n"),
])
def test_markdown_to_rst(markdown, rst):
    assert markdown_to_rst(markdown, tutorial_link_target("tutorials")) == rst


def test_a_paragraph_that_looks_like_an_enumerator_stays_a_paragraph():
    assert markdown_to_rst("I. e. not a list").startswith("\\I. e.")


def test_the_api_reference_lists_every_public_name(tmp_path):
    import ppl_em

    pages = write_api(tmp_path)
    text = "\n".join(page.read_text() for page in pages)
    modules = public_modules()
    assert {"ppl_em.fit", "ppl_em.sklearn", "ppl_em.model_selection", "ppl_em.models", "ppl_em.models.gmm"} <= set(modules)
    for name in ppl_em.__all__:
        assert f":: ppl_em.{name}\n" in text, name
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in public_names(module):
            value = getattr(module, name)
            home = getattr(value, "__module__", module_name) if callable(value) else module_name
            assert f".{name}\n" in text, f"{module_name}.{name} (defined in {home})"
    index = (tmp_path / "index.rst").read_text()
    assert all(f"   {m}" in index for m in modules)
