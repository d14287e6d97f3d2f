"""The API reference, written from the code: one page per module of ppl_em, every public name on it.

A module's public names are its ``__all__`` (or, for a model file without one, the functions
it defines whose names do not start with an underscore). A name that ``ppl_em`` itself
re-exports is documented under that short name (``ppl_em.fit``, ``ppl_em.EM``), as users call
it; every other under its module (``ppl_em.result.free_parameters``). Each object appears
once. The pages are generated at every build, so a new module or name appears without edits.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Dict, List

# The order of the reference; modules not listed here follow, alphabetically.
ORDER = [
    "ppl_em.fit", "ppl_em.result", "ppl_em.em", "ppl_em.posterior", "ppl_em.guides", "ppl_em.svi",
    "ppl_em.model_selection", "ppl_em.sklearn", "ppl_em.plot", "ppl_em.datasets", "ppl_em.cli",
    "ppl_em.families", "ppl_em.chains", "ppl_em.models",
]
SKIP = {"ppl_em.data"}  # a folder of data files


def public_modules() -> List[str]:
    """Every importable module of the package, in the reference's order."""
    import ppl_em

    import ppl_em.models  # installed from models/ (package-dir), so not found under ppl_em.__path__

    infos = list(pkgutil.walk_packages(ppl_em.__path__, "ppl_em.")) + \
        list(pkgutil.walk_packages(ppl_em.models.__path__, "ppl_em.models."))
    found = {info.name for info in infos if not any(part.startswith("_") for part in info.name.split("."))}
    found = (found | {"ppl_em.models"}) - SKIP
    ordered = [name for name in ORDER if name in found]
    models = sorted(name for name in found if name.startswith("ppl_em.models."))
    rest = sorted(found - set(ordered) - set(models))
    return ordered + rest + models


def public_names(module) -> List[str]:
    """``__all__``, or the functions and classes the module defines itself."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
            and getattr(value, "__module__", None) == module.__name__]


def _directive(value) -> str:
    if inspect.isclass(value) and issubclass(value, BaseException):
        return "autoexception"
    if inspect.isclass(value):
        return "autoclass"
    if callable(value):
        return "autofunction"
    return "autodata"


def documented_name(module_name: str, attr: str, value, exported: Dict[int, str]):
    """The name ``value`` is documented under on ``module_name``'s page, or None if its home page has it."""
    home = getattr(value, "__module__", None) if (inspect.isclass(value) or callable(value)) else None
    if home is None or home == module_name:
        return exported.get(id(value), f"{module_name}.{attr}") if home else f"{module_name}.{attr}"
    try:
        listed_at_home = attr in public_names(importlib.import_module(home))
    except ImportError:
        listed_at_home = False
    return None if listed_at_home else f"{module_name}.{attr}"


def module_page(name: str, exported: Dict[int, str]) -> str:
    """The reStructuredText of one module's page."""
    import ppl_em

    module = importlib.import_module(name)
    names = public_names(module)
    names += [n for n in ppl_em.__all__ if getattr(getattr(ppl_em, n), "__module__", None) == name and n not in names]
    lines = [name, "=" * len(name), "", f".. automodule:: {name}", "   :no-members:"]
    if name in exported.values():  # ppl_em.fit is both a module and the function users call: index the function
        lines.append("   :no-index:")
    lines.append("")
    for attr in names:
        value = getattr(module, attr)
        qualified = documented_name(name, attr, value, exported)
        if qualified is None:
            continue
        directive = _directive(value)
        lines.append(f".. {directive}:: {qualified}")
        if directive in ("autoclass", "autoexception"):
            lines.append("   :members:")
        if directive == "autodata" and len(repr(value)) > 70:
            lines.append("   :no-value:")
        lines.append("")
    return "\n".join(lines)


def _summary_table(title: str, names: List[str]) -> List[str]:
    lines = [title, "-" * len(title), "", ".. autosummary::", ""]
    lines += [f"   {name}" for name in names]
    return lines + [""]


def write_api(target: Path) -> List[Path]:
    """Write ``index.rst`` and one page per module into ``target``; returns the pages."""
    import ppl_em

    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.rst"):
        old.unlink()
    exported = {id(getattr(ppl_em, name)): f"ppl_em.{name}" for name in ppl_em.__all__}
    modules = public_modules()
    pages = []
    for name in modules:
        path = target / f"{name}.rst"
        path.write_text(module_page(name, exported))
        pages.append(path)
    index = ["API reference", "=============", "",
             "Every public name of ppl_em, from its docstring. The names most programs need are those of the "
             "flat API, importable as ``ppl_em.<name>``; the pages below hold each module's own.", ""]
    index += _summary_table("The flat API: ``import ppl_em``", [f"ppl_em.{n}" for n in ppl_em.__all__])
    from ppl_em import sklearn as sk

    index += _summary_table("scikit-learn: ``ppl_em.sklearn``", [f"ppl_em.sklearn.{n}" for n in sk.__all__
                                                                 if callable(getattr(sk, n))])
    index += ["Modules", "-------", "", ".. toctree::", "   :maxdepth: 1", ""]
    index += [f"   {name}" for name in modules]
    (target / "index.rst").write_text("\n".join(index) + "\n")
    return pages


# -- docstrings --------------------------------------------------------------------------------
_LITERAL = re.compile(r"(``.*?``)")
# A pair of bars around text, |x|, that reStructuredText would read as a substitution reference.
_BARS = re.compile(r"(?<![\\\w|])\|(?=\S)([^|`]*?\S)\|(?![\w|])")


def escape_bars(lines: List[str]) -> List[str]:
    """Escape the bars of plain-text absolute values and determinants, ``|det J|``, in place.

    Docstrings write mathematics in the lecture notes' plain notation; reStructuredText would
    read ``|det J|`` as a reference to a substitution that the site never defines. Inline
    literals, doctest lines and ``::`` literal blocks are left as they are, and so are single
    bars (``T|1``) and norms (``||x||``).

    >>> escape_bars(["log |det J| and ``a|b|c``", ">>> abs(x) |y|"])
    ['log \\\\|det J\\\\| and ``a|b|c``', '>>> abs(x) |y|']
    """
    literal_indent = None  # the indentation of the line that opened a ``::`` block
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if literal_indent is not None:
            if not line.strip() or indent > literal_indent:
                continue
            literal_indent = None
        if line.rstrip().endswith("::"):
            literal_indent = indent
        if line.lstrip().startswith((">>>", "... ")):
            continue
        parts = _LITERAL.split(line)
        lines[i] = "".join(part if part.startswith("``") else _BARS.sub(r"\\|\1\\|", part) for part in parts)
    return lines
