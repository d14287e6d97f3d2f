"""The set-up every tutorial shares, and the tools for its exercises.

A tutorial (``tutorials/NN_name.py``, a jupytext percent script) starts with::

    from ppl_em import teaching
    QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook

and then uses :func:`savefig`, :func:`draw_ellipse` and :func:`log_joint_table` instead of
defining them itself, so a notebook made from a tutorial runs on its own with only the
package installed.

* ``QUICK`` is ``PPL_EM_QUICK=1``: tiny sizes, so the test suite runs every tutorial in seconds.
* ``OUT`` is ``$PPL_EM_TUTORIAL_OUT``, else ``_out/`` beside the tutorial (a notebook runs in
  its own folder).

Exercises. An exercise is three cells: a stub tagged ``exercise`` whose function raises
``NotImplementedError``, a solution tagged ``solution`` (hidden in a notebook by
``jupyter={"source_hidden": true}``) that redefines it, and a check,
``teaching.check_exercise("3.1", ...)``, that asserts what the answer must satisfy. A stub
left as it is is reported as not attempted; a wrong answer fails its assertions. Student copies
are the tutorials without their solution cells::

    python -m ppl_em.teaching strip tutorials/*.py --out students/

References: lecture notes (notation); Bishop, PRML ch. 9 (figures of EM).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["setup", "quick", "output_dir", "in_notebook", "savefig", "draw_ellipse", "log_joint_table",
           "mix_colors", "mixing_legend", "text_color", "contrast_ratio", "best_permutation",
           "check_exercise", "exercise_results", "strip_solutions", "strip_notebook", "strip_file", "main"]

QUICK_ENV = "PPL_EM_QUICK"
OUT_ENV = "PPL_EM_TUTORIAL_OUT"
SOLUTION_TAG = "solution"

# Exercise name -> "passed" or "not attempted", for every check run in this process.
exercise_results: Dict[str, str] = {}


# -- set-up ---------------------------------------------------------------------------------
def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (figures then show inline)."""
    return "ipykernel" in sys.modules


def _keep_figures_open() -> bool:
    """A notebook, or a sphinx-gallery build, shows the figures that are still open."""
    return in_notebook() or "sphinx_gallery" in sys.modules


def quick() -> bool:
    """``PPL_EM_QUICK=1``: tiny data and few iterations (the test suite's mode)."""
    return os.environ.get(QUICK_ENV) == "1"


def output_dir(file: Optional[str] = None) -> Path:
    """``$PPL_EM_TUTORIAL_OUT``, else ``_out/`` beside ``file`` (the current folder if None); created."""
    default = (Path(file).resolve().parent if file else Path.cwd()) / "_out"
    out = Path(os.environ.get(OUT_ENV, default))
    out.mkdir(parents=True, exist_ok=True)
    return out


def setup(file: Optional[str] = None, seed: int = 0) -> Tuple[bool, Path]:
    """The first cell of every tutorial: backend, seed, quick flag and output folder.

    Outside a notebook matplotlib draws with Agg (files, no window). Pyro's, torch's and
    Python's random states are seeded with ``seed``.

    Parameters
    ----------
    file : str, optional
        The tutorial's ``__file__`` (None in a notebook).

    Returns
    -------
    (bool, pathlib.Path)
        ``QUICK`` and ``OUT``.
    """
    import matplotlib
    import pyro

    if not _keep_figures_open():
        matplotlib.use("Agg")
    pyro.set_rng_seed(seed)
    return quick(), output_dir(file)


def savefig(fig, path: "os.PathLike[str] | str", dpi: int = 100) -> Path:
    """Write ``fig`` to ``path``; close it unless a notebook or a gallery is to show it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if not _keep_figures_open():
        plt.close(fig)
    return Path(path)


# -- the Gaussian mixture, drawn and scored --------------------------------------------------
def log_joint_table(x: torch.Tensor, phi: torch.Tensor, mu: torch.Tensor, Sigma: torch.Tensor) -> torch.Tensor:
    """log p(x^(i), z^(i) = j) = log phi_j + log N(x^(i); mu_j, Sigma_j), shape (n, k).

    Parameters
    ----------
    x : (n, d); phi : (k,); mu : (k, d); Sigma : (k, d, d), or (d, d) shared by every component.

    Its ``logsumexp(-1)`` is log p(x^(i)); its ``softmax(-1)`` the responsibilities w_j^(i).

    >>> x = torch.zeros(1, 2, dtype=torch.float64)
    >>> table = log_joint_table(x, torch.tensor([0.5, 0.5]).double(), torch.zeros(2, 2).double(),
    ...                         torch.eye(2).double())
    >>> table.shape, bool(torch.allclose(table.softmax(-1), torch.tensor([[0.5, 0.5]]).double()))
    (torch.Size([1, 2]), True)
    """
    import pyro.distributions as dist

    Sigma = Sigma.expand(len(mu), *Sigma.shape[-2:])
    components = dist.MultivariateNormal(mu, covariance_matrix=Sigma)  # batch (k,)
    return phi.log() + components.log_prob(x[:, None, :])  # (n, k)


def draw_ellipse(ax, mean: torch.Tensor, cov: torch.Tensor, color, nsig: float = 2.0, **kwargs):
    """The contour (x - mean)^T cov^{-1} (x - mean) = nsig^2 of N(mean, cov) in 2-D; returns the patch."""
    from matplotlib.patches import Ellipse

    evals, evecs = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))
    angle = torch.rad2deg(torch.atan2(evecs[1, -1], evecs[0, -1])).item()
    width, height = (2 * nsig * evals.clamp(min=0).flip(0).sqrt()).tolist()
    style = {"fill": False, "lw": 2, **kwargs}
    return ax.add_patch(Ellipse(torch.as_tensor(mean).tolist(), width, height, angle=angle, color=color, **style))


def mix_colors(w, colors: Sequence) -> np.ndarray:
    """Each point's colour as the w-weighted mix of the component colours: (n, k) -> (n, 3) RGB."""
    from matplotlib.colors import to_rgb

    palette = np.array([to_rgb(c) for c in colors])  # (k, 3)
    w = w.detach().cpu().numpy() if torch.is_tensor(w) else np.asarray(w)
    return np.clip(w @ palette, 0, 1)


def mixing_legend(ax, colors: Sequence, names: Optional[Sequence[str]] = None, **kwargs):
    """A legend that explains colour mixing: one swatch per component, and a 50/50 mix of the first two."""
    from matplotlib.patches import Patch

    names = list(names or [f"w_{j + 1} = 1" for j in range(len(colors))])
    handles = [Patch(color=mix_colors(np.eye(len(colors))[j:j + 1], colors)[0], label=names[j])
               for j in range(len(colors))]
    if len(colors) >= 2:
        half = np.zeros((1, len(colors)))
        half[0, :2] = 0.5
        handles.append(Patch(color=mix_colors(half, colors)[0], label="w_1 = w_2 = 0.5 (shared point)"))
    return ax.legend(handles=handles, **{"fontsize": 7, "loc": "best", **kwargs})


def _luminance(rgb) -> float:
    """Relative luminance of an sRGB colour (WCAG 2)."""
    from matplotlib.colors import to_rgb

    channels = np.array(to_rgb(rgb))
    linear = np.where(channels <= 0.03928, channels / 12.92, ((channels + 0.055) / 1.055) ** 2.4)
    return float(linear @ np.array([0.2126, 0.7152, 0.0722]))


def contrast_ratio(a, b) -> float:
    """WCAG contrast ratio between two colours, from 1 (none) to 21 (black on white)."""
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def text_color(background) -> str:
    """"black" or "white", whichever reads better on ``background`` (e.g. a heat-map cell)."""
    return max(("black", "white"), key=lambda c: contrast_ratio(c, background))


def best_permutation(cost: torch.Tensor) -> List[int]:
    """perm minimising sum_j cost[j, perm[j]] by trying all k! orders (small k): matches labels.

    >>> best_permutation(torch.tensor([[5.0, 0.0], [0.0, 5.0]]))
    [1, 0]
    """
    k = cost.shape[0]
    return list(min(itertools.permutations(range(k)), key=lambda p: float(cost[range(k), list(p)].sum())))


# -- exercises ------------------------------------------------------------------------------
def check_exercise(name: str, check: Callable[[], object]) -> bool:
    """Run the checks of exercise ``name``.

    ``check`` calls the reader's function and asserts what its answer must satisfy. A stub
    that still raises ``NotImplementedError`` is reported as not attempted (the tutorial
    goes on); a wrong answer fails its assertion. The outcome is recorded in
    :data:`exercise_results`.

    Returns
    -------
    bool
        True if the checks passed.
    """
    try:
        check()
    except NotImplementedError:
        exercise_results[name] = "not attempted"
        print(f"Exercise {name}: not attempted yet (fill in the cell above and run this one again)")
        return False
    exercise_results[name] = "passed"
    print(f"Exercise {name}: passed")
    return True


_HEADER = re.compile(r"^# %%(.*)$")


def _cell_tags(header: str) -> List[str]:
    """The tags of a percent-format cell header such as ``# %% [markdown] tags=["solution"]``."""
    match = re.search(r"tags=(\[[^\]]*\])", header)
    return json.loads(match.group(1)) if match else []


def strip_solutions(source: str) -> str:
    """A percent script without its cells tagged ``solution`` (a cell runs to the next ``# %%``).

    >>> text = '# %%\\nx = 1\\n\\n# %% tags=["solution"]\\nx = 2\\n\\n# %%\\nprint(x)\\n'
    >>> print(strip_solutions(text), end="")
    # %%
    x = 1
    <BLANKLINE>
    # %%
    print(x)
    """
    kept, dropping = [], False
    for line in source.splitlines(keepends=True):
        header = _HEADER.match(line)
        if header:
            dropping = SOLUTION_TAG in _cell_tags(header.group(1))
        if not dropping:
            kept.append(line)
    return "".join(kept)


def strip_notebook(notebook: dict) -> dict:
    """A notebook (nbformat 4, as a dict) without its cells tagged ``solution``."""
    cells = [c for c in notebook.get("cells", []) if SOLUTION_TAG not in c.get("metadata", {}).get("tags", [])]
    return {**notebook, "cells": cells}


def strip_file(path: "os.PathLike[str] | str", out_dir: "os.PathLike[str] | str") -> Path:
    """Write the student copy of a tutorial (``.py`` or ``.ipynb``) to ``out_dir``; returns its path."""
    path, out_dir = Path(path), Path(out_dir)
    if path.resolve().parent == out_dir.resolve():
        raise ValueError(f"--out {out_dir} is the folder of {path.name}: the student copy would overwrite it. "
                         "Choose another folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / path.name
    if path.suffix == ".ipynb":
        target.write_text(json.dumps(strip_notebook(json.loads(path.read_text())), indent=1) + "\n")
    elif path.suffix == ".py":
        target.write_text(strip_solutions(path.read_text()))
    else:
        raise ValueError(f"Can strip .py (percent scripts) and .ipynb files, got {path.name}.")
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ppl_em.teaching strip FILE... --out DIR``: student copies without solutions."""
    parser = argparse.ArgumentParser(prog="python -m ppl_em.teaching",
                                     description="Tools for teaching with the ppl_em tutorials.")
    commands = parser.add_subparsers(dest="command", required=True)
    strip = commands.add_parser("strip", help="write copies of tutorials without their solution cells")
    strip.add_argument("files", nargs="+", help="tutorial .py (percent format) or .ipynb files")
    strip.add_argument("--out", required=True, help="folder for the student copies")
    args = parser.parse_args(argv)
    for file in args.files:
        try:
            print(strip_file(file, args.out))
        except (OSError, ValueError) as error:
            print(f"python -m ppl_em.teaching: error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
