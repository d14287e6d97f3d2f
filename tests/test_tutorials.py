"""The tutorials: each runs as a script in quick mode, asserts what it teaches, writes its figures.

Every ``tutorials/NN_name.py`` checks the facts it teaches with plain ``assert`` statements
(J(c, mu) never rises, the ELBO touches log p(x) after each E-step, the engine's M-step equals
the lecture's formulas, ...), so running it is the test. ``PPL_EM_QUICK=1`` shrinks data and
iteration counts; ``PPL_EM_TUTORIAL_OUT`` points the figures at a temporary folder.

The registry below is explicit: adding a tutorial without listing it here (or listing one
that does not exist) fails :func:`test_every_tutorial_is_registered`.
"""

import runpy
from pathlib import Path

import jupytext
import matplotlib.pyplot as plt
import pytest
import torch

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"

# tutorial file -> the figures it must write
FIGURES = {
    "01_kmeans.py": ["01_distortion.png", "01_euclidean_vs_cosine.png", "01_local_optima.png"],
    "02_gmm_density.py": ["02_old_faithful_density.png", "02_samples.png"],
    "03_em_for_gmm.py": ["03_em_frames.png", "03_log_likelihood.png", "03_soft_vs_hard.png"],
    "04_jensen_elbo.py": ["04_bound_along_mstep.png", "04_elbo_vs_loglik.png", "04_jensen.png"],
    "05_em_svi_amortized.py": ["05_em_svi_amortized.png", "05_encoder_vs_posterior.png"],
    "06_vae.py": ["06_decoder_grid.png", "06_elbo.png", "06_latent_space.png", "06_reconstructions.png"],
    "07_hmm_baum_welch.py": ["07_hmm_counts.png", "07_hmm_posteriors.png"],
    "08_topic_model.py": ["08_log_likelihood.png", "08_topics.png"],
    "09_choosing_k.py": ["09_criteria.png", "09_selection_bic.png"],
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_every_tutorial_is_registered():
    on_disk = sorted(path.name for path in TUTORIALS.glob("*.py"))
    missing, stale = sorted(set(on_disk) - set(FIGURES)), sorted(set(FIGURES) - set(on_disk))
    assert not missing, f"tutorials not registered in tests/test_tutorials.py FIGURES: {missing}"
    assert not stale, f"FIGURES lists tutorials that do not exist: {stale}"


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine they oversubscribe the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    plt.close("all")


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_tutorial_runs_in_quick_mode_and_writes_its_figures(name, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("PPL_EM_QUICK", "1")
    monkeypatch.setenv("PPL_EM_TUTORIAL_OUT", str(tmp_path))
    runpy.run_path(str(TUTORIALS / name), run_name="__main__")  # its asserts are the checks
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == FIGURES[name]
    for figure in written:
        data = (tmp_path / figure).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, f"{figure} is not a real PNG figure"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_tutorial_converts_to_a_notebook(name, tmp_path):
    """What ``jupytext --to notebook tutorials/*.py`` does, through jupytext's Python API."""
    source = (TUTORIALS / name).read_text()
    notebook = jupytext.read(TUTORIALS / name)
    target = tmp_path / name.replace(".py", ".ipynb")
    jupytext.write(notebook, target)
    cells = jupytext.read(target)["cells"]
    markers = [line for line in source.splitlines() if line.startswith("# %%")]
    assert len(cells) == len(markers)
    assert cells[0]["cell_type"] == "markdown" and cells[0]["source"].startswith(f"# {int(name[:2])}.")
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert len(code) == sum(marker == "# %%" for marker in markers)
    assert all(cell["source"].strip() for cell in cells), "empty cell"
    assert notebook.metadata["kernelspec"]["language"] == "python"
