"""The tutorials as a sphinx-gallery: every ``tutorials/[0-9]*.py`` run as it is, text rendered, figures shown.

The tutorials are jupytext *percent* scripts: ``# %% [markdown]`` cells in Markdown, ``# %%``
code cells. sphinx-gallery runs ``# %%`` scripts but wants a module docstring as the title
block and reStructuredText in its text blocks. So each tutorial is written out again for the
gallery (:func:`gallery_source`): the first Markdown cell becomes the docstring, the others
comment blocks, every cell converted from Markdown to reStructuredText (:func:`markdown_to_rst`);
the code cells are copied verbatim and in order, so the gallery executes exactly the
tutorial's code. The solutions of the exercises (cells tagged ``solution``, hidden in a
notebook) run too, but each is folded away behind a "Solution" toggle (an HTML ``<details>``
element) so that the page does not give the answer away. After the gallery is generated, the
downloads next to each page are replaced by the original tutorial and its jupytext notebook.

The tutorials write their figures to files, ``teaching.savefig(fig, OUT / name)`` (``OUT`` from
``PPL_EM_TUTORIAL_OUT``), and some are drawn on figures that pyplot does not know of
(``ppl_em.plot``) or are animations. So the page shows the files: :class:`SavedFigureScraper`
picks up the PNG and GIF files (tutorial 12's animation) a code block wrote to that folder and
shows them under the block. It is the only scraper: ``teaching.savefig`` leaves a figure open
under sphinx-gallery, as in a notebook, and matplotlib's scraper would show it a second time.
The scraper closes such figures after each block instead, as matplotlib's does.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import jupytext
from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

TUTORIAL_GLOB = "[0-9]*.py"
SOLUTION_TAG = "solution"  # the tag of ppl_em.teaching's solution cells
FIGURE_SUFFIXES = (".png", ".gif")
# A solution folded away on the page; the two halves sit in the text blocks around it.
SOLUTION_OPEN = ('<details class="ppl-em-solution"><summary><strong>Solution</strong> '
                 "(try the exercise first; click to show)</summary>")
SOLUTION_CLOSE = "</details>"
UNDERLINES = {1: "=", 2: "-", 3: "~", 4: "^", 5: '"', 6: "'"}
# Characters with a meaning in reStructuredText inline text; a backslash makes each literal.
_SPECIAL = re.compile(r"([\\`*_|<>\[\]])")
# A paragraph whose first line looks like a list item or an enumerator would become one.
_LIST_LIKE = re.compile(r"^([-+*]|\d+[.)]|\(?[A-Za-z#]{1,3}[.)])(\s|$)")


# -- Markdown -> reStructuredText -----------------------------------------------------------
def markdown_to_rst(text: str, link_target=None) -> str:
    """reStructuredText for the Markdown ``text``: headings, paragraphs, emphasis, code, links,
    lists, block quotes, code fences and pipe tables.

    ``link_target(href)`` may return a Sphinx label for a link (a tutorial linking another one);
    other links stay external.
    """
    md = MarkdownIt("commonmark").enable("table")
    tree = SyntaxTreeNode(md.parse(text))
    return "\n".join(_blocks(tree.children, link_target)).strip() + "\n"


def _blocks(nodes, link_target) -> List[str]:
    lines: List[str] = []
    for node in nodes:
        block = _block(node, link_target)
        if block:
            lines.extend(block + [""])
    return lines


def _block(node, link_target) -> List[str]:
    kind = node.type
    if kind == "heading":
        title = _inline(node.children[0], link_target)
        return [title, UNDERLINES[int(node.tag[1])] * max(len(title), 4)]
    if kind == "paragraph":
        text = _inline(node.children[0], link_target)
        if _LIST_LIKE.match(text):
            text = "\\" + text
        return text.splitlines()
    if kind in ("bullet_list", "ordered_list"):
        return _list(node, link_target)
    if kind in ("fence", "code_block"):
        language = (node.info or "").strip().split(" ")[0] if kind == "fence" else ""
        body = node.content.rstrip("\n").splitlines()
        return [f".. code-block:: {language or 'text'}", ""] + ["   " + line if line else "" for line in body]
    if kind == "blockquote":
        return ["   " + line if line else "" for line in _blocks(node.children, link_target)]
    if kind == "table":
        return _table(node, link_target)
    if kind == "html_block":
        return [_escape(line) for line in node.content.strip().splitlines()]
    return []  # thematic breaks: no reStructuredText counterpart inside a section


def _list(node, link_target) -> List[str]:
    lines = []
    start = int(node.attrs.get("start", 1)) if node.type == "ordered_list" else None
    for i, item in enumerate(node.children):
        marker = "* " if start is None else f"{start + i}. "
        body = _blocks(item.children, link_target)
        while body and not body[-1]:
            body.pop()
        if not body:
            body = [""]
        lines.append(marker + body[0])
        lines.extend(" " * len(marker) + line if line else "" for line in body[1:])
    return lines


def _table(node, link_target) -> List[str]:
    rows = []
    for section in node.children:  # thead, tbody
        for tr in section.children:
            rows.append([_inline(cell.children[0], link_target) if cell.children else "" for cell in tr.children])
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
        lines.append("   * - " + (row[0] or "\\ "))
        lines.extend("     - " + (cell or "\\ ") for cell in row[1:])
    return lines


def _inline(node, link_target) -> str:
    """The inline children of ``node`` as one reStructuredText string (lines joined by newlines)."""
    pieces: List[Tuple[str, str]] = []  # (kind, text): kind "text" or "markup"
    for child in node.children:
        pieces.extend(_inline_piece(child, link_target))
    out = ""
    for i, (kind, text) in enumerate(pieces):
        if kind == "markup":
            # Inline markup must be set off by whitespace or punctuation; "\ " joins it to a neighbour.
            if out and not out[-1].isspace() and out[-1] not in "([{<'\"-/:":
                out += "\\ "
            out += text
            following = pieces[i + 1][1] if i + 1 < len(pieces) else ""
            if following and not following[0].isspace() and following[0] not in ")]}>'\"-/:.,;!?\\":
                out += "\\ "
        else:
            out += text
    return out.replace("::", ":\\:")


def _inline_piece(node, link_target) -> List[Tuple[str, str]]:
    kind = node.type
    if kind == "text":
        return [("text", _escape(node.content))]
    if kind in ("softbreak", "hardbreak"):
        return [("text", "\n")]
    if kind == "code_inline":
        return [("markup", f"``{node.content.strip()}``")] if node.content.strip() else []
    if kind in ("strong", "em"):
        inner = _plain(node).strip()
        mark = "**" if kind == "strong" else "*"
        return [("markup", f"{mark}{_escape(inner)}{mark}")] if inner else []
    if kind == "link":
        label, href = _plain(node).strip() or node.attrs.get("href", ""), str(node.attrs.get("href", ""))
        target = link_target(href) if link_target else None
        if target:
            return [("markup", f":ref:`{_escape(label)} <{target}>`")]
        return [("markup", f"`{_escape(label)} <{href}>`__")]
    if kind == "image":
        return [("text", _escape(_plain(node)))]
    return [("text", _escape(node.content or _plain(node)))]


def _plain(node) -> str:
    """The text of ``node`` and its children without markup (reStructuredText does not nest it)."""
    if node.type in ("text", "code_inline", "html_inline"):
        return node.content
    if node.type in ("softbreak", "hardbreak"):
        return " "
    return "".join(_plain(child) for child in node.children)


def _escape(text: str) -> str:
    return _SPECIAL.sub(r"\\\1", text)


# -- tutorials -> sphinx-gallery sources ----------------------------------------------------
def tutorial_link_target(gallery_dir: str):
    """Links between tutorials (``[text](03_em_for_gmm.py)``) become references to their gallery pages."""
    def target(href: str):
        match = re.fullmatch(r"(?:\./)?(\d\d?_\w+)\.py", href)
        return f"sphx_glr_{gallery_dir}_{match.group(1)}.py" if match else None
    return target


def _raw_html(html: str) -> str:
    return f".. raw:: html\n\n   {html}\n"


def _text_block(rst: str) -> str:
    """A sphinx-gallery text block: ``# %%`` and the reStructuredText as comment lines."""
    return "# %%\n" + "".join(f"# {line}".rstrip() + "\n" for line in rst.splitlines()) + "\n"


def gallery_source(path: Path, gallery_dir: str = "tutorials") -> str:
    """The sphinx-gallery script of one tutorial: its first Markdown cell as the docstring, the
    other Markdown cells as ``# %%`` comment blocks, its code cells verbatim and in order.

    The cells tagged ``solution`` are wrapped in an HTML ``<details>`` element: folded on the
    page, one click away. The element opens and closes in text blocks (a Markdown solution's own,
    or one of its own before and after a code solution); consecutive solution cells share one.
    """
    notebook = jupytext.read(path)
    cells = notebook["cells"]
    if not cells or cells[0]["cell_type"] != "markdown":
        raise ValueError(f"{path}: a tutorial must open with a Markdown cell holding its '# N. title'; "
                         f"got a {cells[0]['cell_type'] if cells else 'empty'} first cell.")
    link = tutorial_link_target(gallery_dir)
    head = markdown_to_rst(cells[0]["source"], link).replace('"""', '\\"\\"\\"')
    parts = [f'r"""\n{head}"""\n']
    previous = "markdown"
    rest = cells[1:]
    solutions = [SOLUTION_TAG in cell["metadata"].get("tags", []) for cell in rest]
    for i, cell in enumerate(rest):
        # Consecutive solution cells (a derivation, then its code) share one fold.
        opens = solutions[i] and not (i > 0 and solutions[i - 1])
        closes = solutions[i] and not (i + 1 < len(rest) and solutions[i + 1])
        if cell["cell_type"] == "markdown":
            text = markdown_to_rst(cell["source"], link)
            if opens:
                text = f"{_raw_html(SOLUTION_OPEN)}\n{text}"
            if closes:
                text = f"{text}\n{_raw_html(SOLUTION_CLOSE)}"
            parts.append(_text_block(text))
        elif cell["cell_type"] == "code":
            if opens:
                parts.append(_text_block(_raw_html(SOLUTION_OPEN)))
                previous = "markdown"
            # After a text block the code follows its blank line; after code, an empty "# %%" starts a new block
            # (the blank line after it keeps a comment at the top of the cell out of the text).
            parts.append(("" if previous == "markdown" else "# %%\n\n") + cell["source"].rstrip("\n") + "\n\n")
            if closes:  # the code's printed output, if any, stays inside the fold
                parts.append(_text_block(_raw_html(SOLUTION_CLOSE)))
                previous = "markdown"
                continue
        previous = cell["cell_type"]
    return "".join(parts)


def code_cells(path: Path) -> List[str]:
    """The source of every code cell of a tutorial, as jupytext reads it."""
    return [cell["source"] for cell in jupytext.read(path)["cells"] if cell["cell_type"] == "code"]


def write_gallery_sources(tutorials: Path, target: Path, gallery_dir: str = "tutorials") -> List[Path]:
    """Write the gallery script of every ``tutorials/[0-9]*.py``, and the gallery's header, into ``target``."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    header = ["Tutorials", "=========", "",
              "The tutorials teach the lecture notes with ppl_em, in order. Each is a script of ``# %%`` cells "
              "(jupytext percent format) that asserts what it teaches; here each was run in its quick mode "
              "(``PPL_EM_QUICK=1``), and its printed output and figures are shown under the code that made them. "
              "Download a tutorial as a script or as a notebook at the bottom of its page.", ""]
    (target / "GALLERY_HEADER.rst").write_text("\n".join(header))
    written = []
    for path in sorted(tutorials.glob(TUTORIAL_GLOB)):
        out = target / path.name
        out.write_text(gallery_source(path, gallery_dir))
        written.append(out)
    return written


def restore_original_downloads(tutorials: Path, gallery: Path) -> None:
    """Offer the original tutorials for download: the script itself, and the notebook that
    ``jupytext --to notebook`` makes of it, where sphinx-gallery left its own versions."""
    for path in sorted(tutorials.glob(TUTORIAL_GLOB)):
        if (gallery / path.name).exists():
            shutil.copyfile(path, gallery / path.name)
        notebook = gallery / path.with_suffix(".ipynb").name
        if notebook.exists():
            jupytext.write(jupytext.read(path), notebook)


# -- figures ----------------------------------------------------------------------------------
def _saved_figures(folder: Path) -> List[Path]:
    return [p for p in folder.glob("*") if p.suffix in FIGURE_SUFFIXES and p.is_file()]


class SavedFigureScraper:
    """A sphinx-gallery image scraper for figures written to a folder rather than left open.

    After each code block, every PNG or GIF in ``folder`` that is new or rewritten since the last
    look is copied to the gallery's next image path (a GIF keeps its suffix, so that it animates),
    and shown under the block; the pyplot figures left open are closed.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.seen: Dict[str, Tuple[int, int]] = {}

    def __repr__(self) -> str:  # sphinx-gallery folds the configuration into a cache key
        return f"SavedFigureScraper({str(self.folder)!r})"

    def __call__(self, block, block_vars, gallery_conf) -> str:
        from sphinx_gallery.scrapers import figure_rst

        images = []
        for figure in sorted(_saved_figures(self.folder), key=lambda p: (p.stat().st_mtime_ns, p.name)):
            stamp = (figure.stat().st_mtime_ns, figure.stat().st_size)
            if self.seen.get(figure.name) == stamp:
                continue
            self.seen[figure.name] = stamp
            destination = Path(next(block_vars["image_path_iterator"])).with_suffix(figure.suffix)
            shutil.copyfile(figure, destination)
            images.append(str(destination))
        import matplotlib.pyplot as plt

        plt.close("all")  # shown from their files, not again from memory
        return figure_rst(images, gallery_conf["src_dir"])


class ClearSavedFigures:
    """A sphinx-gallery ``reset_modules`` entry: no saved figure left from the previous tutorial."""

    def __init__(self, scraper: SavedFigureScraper) -> None:
        self.scraper = scraper

    def __repr__(self) -> str:
        return f"ClearSavedFigures({self.scraper!r})"

    def __call__(self, gallery_conf, fname, when=None) -> None:
        self.scraper.folder.mkdir(parents=True, exist_ok=True)
        for figure in _saved_figures(self.scraper.folder):
            figure.unlink()
        self.scraper.seen.clear()
