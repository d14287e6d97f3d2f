"""The tutorials: each runs as a script in quick mode, asserts what it teaches, writes its figures.

Every ``tutorials/NN_name.py`` checks the facts it teaches with plain ``assert`` statements
(J(c, mu) never rises, the ELBO touches log p(x) after each E-step, the engine's M-step equals
the lecture's formulas, ...), so running it is the test. ``PPL_EM_QUICK=1`` shrinks data and
iteration counts; ``PPL_EM_TUTORIAL_OUT`` points the figures at a temporary folder.

Each tutorial also has exercises: a stub cell tagged ``exercise``, a hidden solution tagged
``solution`` and a check (``teaching.check_exercise``). Running the tutorial runs the solutions
through their checks; the student copy (``python -m ppl_em.teaching strip``) has no solution
cells and still runs, reporting its exercises as not attempted.

The registry below is explicit: adding a tutorial without listing it here (or listing one
that does not exist) fails :func:`test_every_tutorial_is_registered`.
"""

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import jupytext
import matplotlib.pyplot as plt
import pytest
import torch

from ppl_em import teaching

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"

# tutorial file -> the figures it must write, in the order the README lists the tutorials
FIGURES = {
    "01_kmeans.py": ["01_distortion.png", "01_euclidean_vs_cosine.png", "01_local_optima.png"],
    "02_gmm_density.py": ["02_gda_vs_qda.png", "02_old_faithful_density.png", "02_samples.png"],
    "03_em_for_gmm.py": ["03_em_frames.png", "03_log_likelihood.png", "03_soft_vs_hard.png"],
    "04_jensen_elbo.py": ["04_bound_along_mstep.png", "04_elbo_vs_loglik.png", "04_jensen.png"],
    "05_em_svi_amortized.py": ["05_em_svi_amortized.png", "05_encoder_vs_posterior.png"],
    "06_vae.py": ["06_decoder_grid.png", "06_elbo.png", "06_latent_space.png", "06_reconstructions.png"],
    "07_hmm_baum_welch.py": ["07_hmm_counts.png", "07_hmm_posteriors.png"],
    "08_topic_model.py": ["08_log_likelihood.png", "08_topics.png"],
    "09_kmeans_vs_gmm.py": ["09_kmeans_toggle.png", "09_kmeans_vs_gmm.png"],
    "10_failure_modes.py": ["10_hard_em_collapse.png", "10_label_switching.png", "10_local_optima.png",
                            "10_singular_collapse.png"],
    "11_choosing_k.py": ["11_choosing_k.png", "11_pdata_vs_pmodel.png"],
    "12_em_as_a_picture.py": ["12_elbo_curves.png", "12_em_old_faithful.gif"],
    "13_gans_and_diffusion.py": ["13_diffusion.png", "13_gan_vs_vae.png"],
    "14_selecting_k_in_practice.py": ["14_criteria.png", "14_selection_bic.png"],
}
SIGNATURES = {".png": b"\x89PNG\r\n\x1a\n", ".gif": b"GIF89a"}
CHECK = re.compile(r'teaching\.check_exercise\("([0-9.]+)"')
# The student copy that the suite runs end to end (one of the quickest tutorials).
STUDENT_RUN = "04_jensen_elbo.py"


def tags(cell):
    return cell["metadata"].get("tags", [])


def test_every_tutorial_is_registered():
    on_disk = sorted(path.name for path in TUTORIALS.glob("*.py"))
    missing, stale = sorted(set(on_disk) - set(FIGURES)), sorted(set(FIGURES) - set(on_disk))
    assert not missing, f"tutorials not registered in tests/test_tutorials.py FIGURES: {missing}"
    assert not stale, f"FIGURES lists tutorials that do not exist: {stale}"


def test_the_readmes_list_every_tutorial_in_order():
    for readme in (TUTORIALS / "README.md", TUTORIALS.parent / "README.md"):
        text = readme.read_text()
        positions = [text.find(f"{name})") for name in FIGURES]
        assert all(p >= 0 for p in positions), f"{readme.name} does not link every tutorial"
        assert positions == sorted(positions), f"{readme.name} lists the tutorials out of order"


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine they oversubscribe the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    plt.close("all")


def run_quick(path, out, monkeypatch):
    """Run a tutorial as a script in quick mode, figures to ``out``; returns the exercise outcomes."""
    monkeypatch.setenv("PPL_EM_QUICK", "1")
    monkeypatch.setenv("PPL_EM_TUTORIAL_OUT", str(out))
    teaching.exercise_results.clear()
    runpy.run_path(str(path), run_name="__main__")  # its asserts are the checks
    return dict(teaching.exercise_results)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_tutorial_runs_in_quick_mode_and_writes_its_figures(name, tmp_path, monkeypatch, one_thread):
    outcomes = run_quick(TUTORIALS / name, tmp_path, monkeypatch)
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == FIGURES[name]
    for figure in written:
        data = (tmp_path / figure).read_bytes()
        assert data.startswith(SIGNATURES[Path(figure).suffix]) and len(data) > 5000, f"{figure} is not a real figure"
    # Every exercise's solution ran and passed its check.
    exercises = CHECK.findall((TUTORIALS / name).read_text())
    assert exercises and outcomes == {e: "passed" for e in exercises}


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
    assert len(code) == sum("[markdown]" not in marker for marker in markers)
    assert all(cell["source"].strip() for cell in cells), "empty cell"
    assert notebook.metadata["kernelspec"]["language"] == "python"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_tutorial_has_exercises_with_hidden_solutions(name):
    cells = jupytext.read(TUTORIALS / name)["cells"]
    stubs = [c for c in cells if "exercise" in tags(c)]
    solutions = [c for c in cells if teaching.SOLUTION_TAG in tags(c)]
    assert stubs and len(solutions) >= len(stubs)
    assert all(c["cell_type"] == "code" and "raise NotImplementedError" in c["source"] for c in stubs)
    assert all(c["metadata"].get("jupyter", {}).get("source_hidden") is True for c in solutions), \
        "a solution cell is not hidden in the notebook (jupyter={\"source_hidden\": true})"
    exercises = CHECK.findall((TUTORIALS / name).read_text())
    assert len(set(exercises)) == len(exercises) >= len(stubs) // 2
    assert all(e.split(".")[0] == str(int(name[:2])) for e in exercises), "exercises are numbered N.m in tutorial N"


def test_strip_command_writes_student_copies(tmp_path):
    sources = sorted(TUTORIALS.glob("[0-9]*.py"))
    done = subprocess.run([sys.executable, "-m", "ppl_em.teaching", "strip", *map(str, sources), "--out", str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert not done.stderr
    for source in sources:
        full, student = jupytext.read(source)["cells"], jupytext.read(tmp_path / source.name)["cells"]
        kept = [c for c in full if teaching.SOLUTION_TAG not in tags(c)]
        assert [(c["cell_type"], c["source"], tags(c)) for c in kept] == \
            [(c["cell_type"], c["source"], tags(c)) for c in student]
        assert not any(teaching.SOLUTION_TAG in tags(c) for c in student)
        assert any("exercise" in tags(c) for c in student)
        assert "jupyter" in (tmp_path / source.name).read_text().split("# %%")[0]  # the header is kept


def test_strip_refuses_to_overwrite_the_tutorials():
    done = subprocess.run([sys.executable, "-m", "ppl_em.teaching", "strip", str(TUTORIALS / STUDENT_RUN),
                           "--out", str(TUTORIALS)], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert re.search(r"error: .*would overwrite it", done.stderr)


def test_strip_a_notebook(tmp_path):
    notebook = tmp_path / "in" / STUDENT_RUN.replace(".py", ".ipynb")
    notebook.parent.mkdir()
    jupytext.write(jupytext.read(TUTORIALS / STUDENT_RUN), notebook)
    student = teaching.strip_file(notebook, tmp_path / "out")
    cells = json.loads(student.read_text())["cells"]
    assert cells and not any(teaching.SOLUTION_TAG in c["metadata"].get("tags", []) for c in cells)
    assert len(cells) < len(json.loads(notebook.read_text())["cells"])
    with pytest.raises(ValueError, match=r"Can strip \.py .* and \.ipynb"):
        teaching.strip_file(tmp_path / "notes.txt", tmp_path / "out")


def test_student_copy_runs_and_reports_its_exercises(tmp_path, monkeypatch, one_thread):
    student = teaching.strip_file(TUTORIALS / STUDENT_RUN, tmp_path / "student")
    outcomes = run_quick(student, tmp_path / "figures", monkeypatch)
    exercises = CHECK.findall(student.read_text())
    assert exercises and outcomes == {e: "not attempted" for e in exercises}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == FIGURES[STUDENT_RUN]


def test_a_wrong_answer_fails_its_check():
    teaching.exercise_results.clear()

    def wrong():
        assert 1 + 1 == 3, "the answer's check"

    with pytest.raises(AssertionError, match="the answer's check"):
        teaching.check_exercise("0.1", wrong)
    assert "0.1" not in teaching.exercise_results
