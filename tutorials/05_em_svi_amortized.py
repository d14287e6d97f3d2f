# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. One model, three ways to fit it: EM, SVI, and an amortized guide
#
# Tutorial 4 showed that every method here maximises the same ELBO,
#
#     ELBO(x; Q, theta) = E_Q[log p(x, z; theta)] - E_Q[log Q(z)]  <=  log p(x; theta),
#
# and differs only in how it treats Q:
#
# * **EM** sets Q(z) = p(z | x; theta) exactly (E-step), then maximises over theta in closed
#   form (M-step).
# * **SVI** (stochastic variational inference) takes gradient steps on the ELBO in theta
#   *and* in Q's own parameters at once. With `AutoCategorical`, Q is a free categorical
#   q_i(z^(i)) per data point; for a mixture that family contains the exact posterior.
# * **Amortized SVI** computes q(z^(i) | x^(i)) with an encoder network from x^(i)
#   (`AutoAmortized`): the recognition model of a VAE (tutorial 6).
# * As a fourth, in-between point, SVI with the guide `ExactPosterior` uses the exact E-step
#   as Q and a gradient step in theta: gradient EM.
#
# All of them run the **same model file**, `models/gmm.py`, on the standardised Old Faithful
# data, from the same start, and all share one contract: `engine.step(x, k) -> loss`. We judge
# them with one yardstick, the exact log p(x; theta) from the E-step, per iteration and per
# second of compute.

# %%
import time

import matplotlib.pyplot as plt
import torch
import pyro

import ppl_em
from ppl_em import teaching
from ppl_em.datasets import load_old_faithful
from ppl_em.guides import AutoAmortized, AutoCategorical, ExactPosterior
from ppl_em.models import gmm
from ppl_em.svi import SafeSVI, default_loss

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
f64 = torch.float64

# %% [markdown]
# ## The data, the start, the yardstick

# %%
x = load_old_faithful()
x = (x - x.mean(0)) / x.std(0)  # (272, 2), standardised
n, k = len(x), 2
start = gmm.init_params(x, k, seed=0)  # phi uniform, mu two data points, Sigma the data covariance
judge = ppl_em.EM(gmm.model)  # used only for its E-step, which reads theta from the param store


def exact_log_px():
    """(1/n) log p(x; theta) at the model parameters now in the param store."""
    return judge.e_step(x, k, init=start).log_evidence.item() / n


# %% [markdown]
# ## Four engines with one contract
#
# Each entry builds a fresh engine in a fresh param store. EM needs no guide and no optimiser;
# the SVI engines need a guide (the family Q comes from), an optimiser and an ELBO estimator.
# `default_loss` picks `TraceEnum_ELBO`, which sums over the guide's discrete z exactly.

# %%
def svi_engine(make_guide, lr=0.05):
    """SVI on gmm.model with the guide ``make_guide(model)``, Adam, and the exact enumerated ELBO."""
    guide = make_guide(gmm.model)
    return SafeSVI(gmm.model, guide, pyro.optim.Adam({"lr": lr}), default_loss(gmm.model, x, k, init=start))


ENGINES = {
    "EM": lambda: ppl_em.EM(gmm.model),
    "SVI, ExactPosterior (gradient EM)": lambda: svi_engine(ExactPosterior),
    "SVI, AutoCategorical": lambda: svi_engine(AutoCategorical),
    "SVI, AutoAmortized": lambda: svi_engine(lambda model: AutoAmortized(model, hidden=(32,))),
}
STEPS = {"EM": 10 if QUICK else 40}  # EM iterations are few; SVI takes many small steps
SVI_STEPS = 30 if QUICK else 400


def checkpoints(steps, count):
    """About ``count`` iterations, spaced evenly on a log scale, at which to measure log p(x)."""
    grid = torch.logspace(0, torch.log10(torch.tensor(float(steps))), count)
    return sorted({0, steps, *grid.round().long().tolist()})


def warm_up(name):
    """One untimed step of a throwaway engine, in a throwaway param store.

    The first SVI step in a process pays one-off costs (lazy imports, the first autograd graph
    of the enumerated ELBO) of most of a second, far more than a step; they are not the
    method's cost per step, so they are paid before the clock starts.
    """
    with pyro.get_param_store().scope():
        ENGINES[name]().step(x, k, init=start)


def run(name):
    """Fit with engine ``name``; record exact log p(x) at the checkpoints and the time spent in step()."""
    warm_up(name)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    engine = ENGINES[name]()
    if name != "EM":
        engine.evaluate_loss(x, k, init=start)  # builds the guide (and its parameters); no update
    steps = STEPS.get(name, SVI_STEPS)
    record = {"iteration": [], "time": [], "log_px": []}
    when, elapsed = checkpoints(steps, 12 if QUICK else 40), 0.0
    for it in range(steps + 1):
        if it in when:  # measuring is not timed
            record["iteration"].append(it)
            record["time"].append(elapsed)
            record["log_px"].append(exact_log_px())
        if it < steps:
            t0 = time.perf_counter()
            engine.step(x, k, init=start)
            elapsed += time.perf_counter() - t0
    if name != "EM":  # the ELBO the guide reached (exact: the guides' z is enumerated)
        record["elbo"] = -engine.evaluate_loss(x, k, init=start) / n
    record["state"] = pyro.get_param_store().get_state()  # this fit's theta (and Q), for later
    return engine, record


engines, records = {}, {}
for name in ENGINES:
    engines[name], records[name] = run(name)
    r = records[name]
    print(f"{name:34s} {r['iteration'][-1]:4d} steps, {r['time'][-1]:6.2f} s: "
          f"(1/n) log p(x) {r['log_px'][0]:.4f} -> {r['log_px'][-1]:.5f}")

# %% [markdown]
# ## What the curves must show
#
# * EM never decreases log p(x); every method improves on the start.
# * EM reaches its optimum in a handful of iterations; SVI climbs there in many small steps.
#   (Every engine starts from the same theta, so they share one labelling of the components.)
# * For the SVI guides, the ELBO they optimise is a lower bound on log p(x): tight for
#   `ExactPosterior`, below it for the others wherever Q differs from the posterior.

# %%
em_curve = torch.tensor(records["EM"]["log_px"])
assert (torch.diff(em_curve) >= -1e-10).all(), "EM decreased log p(x)"
best = em_curve[-1].item()
for name, r in records.items():
    assert r["log_px"][-1] > r["log_px"][0], name
    assert r["log_px"][-1] <= best + 1e-8, name  # EM is at the optimum the others climb towards


def iterations_to_reach(r, within=1e-3):
    """First recorded iteration with (1/n) log p(x) within ``within`` nats of EM's optimum."""
    return next((it for it, v in zip(r["iteration"], r["log_px"]) if v >= best - within), float("inf"))


reach = {name: iterations_to_reach(r) for name, r in records.items()}
print("iterations to come within 1e-3 nats per point of EM's optimum:", reach)
assert reach["EM"] < min(reach[name] for name in reach if name != "EM")
if not QUICK:
    assert all(v < float("inf") for v in reach.values()), "an SVI engine did not get close within its budget"

for name, r in records.items():
    if name == "EM":
        continue
    elbo, log_px = r["elbo"], r["log_px"][-1]
    print(f"{name:34s} ELBO {elbo:.6f} <= log p(x) {log_px:.6f}")
    assert elbo <= log_px + 1e-9
    if "ExactPosterior" in name:
        assert abs(elbo - log_px) < 1e-9  # Q = p(z | x; theta): the bound is tight

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
for name, r in records.items():
    iters = [max(it, 0.8) for it in r["iteration"]]  # iteration 0 drawn just left of 1 on the log axis
    axes[0].plot(iters, r["log_px"], "o-", ms=3, label=name)
    axes[1].plot(r["time"], r["log_px"], "o-", ms=3, label=name)
axes[0].set_xscale("log")
axes[0].set_xlabel("iteration (EM iteration or SVI step)")
axes[1].set_xlabel("seconds spent in step()")
axes[0].set_ylabel("(1/n) log p(x; theta), exact")
lowest = min(min(r["log_px"]) for r in records.values())
for ax in axes:
    ax.axhline(best, color="gray", ls=":", lw=1)
    ax.set_ylim(lowest - 0.05, best + 0.05)
axes[1].legend(fontsize=8, loc="lower right")
fig.suptitle("Old Faithful, GMM with k = 2: the same model file fitted four ways "
             "(the clock starts after each guide is built)")
teaching.savefig(fig, OUT / "05_em_svi_amortized.png")

# %% [markdown]
# ## The encoder as an amortized E-step
#
# `AutoAmortized` keeps its network in `guide.encoder["z"]`: from a point x it outputs the
# logits of q(z | x). EM's E-step computes p(z | x; theta) for each point separately; the
# encoder learns one function that approximates it everywhere. Compare the two on a grid of
# new points, at the amortized fit's theta, and on the data themselves. Where there are data
# the two agree; away from the data the encoder was never trained, and nothing forces it to.

# %%
pyro.get_param_store().set_state(records["SVI, AutoAmortized"]["state"])  # its theta and encoder
guide = engines["SVI, AutoAmortized"].guide
with torch.no_grad():
    q_data = guide.encoder["z"](x).softmax(-1)  # (n, k)
w_data = judge.e_step(x, k).marginal("z")  # (n, k): exact p(z | x; theta)
gap = (q_data - w_data).abs().max(-1).values
print(f"encoder vs exact posterior on the data: mean |q - w| = {gap.mean():.4f}, max {gap.max():.4f}")
if not QUICK:
    assert gap.mean() < 0.05

g = torch.linspace(-2.5, 2.5, 60, dtype=f64)
grid = torch.cartesian_prod(g, g)  # (3600, 2)
with torch.no_grad():
    q_grid = guide.encoder["z"](grid).softmax(-1)[:, 1]
w_grid = judge.e_step(grid, k).marginal("z")[:, 1]  # the same theta, new points
fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True, sharey=True)
for ax, values, title in zip(axes, (w_grid, q_grid), ("exact p(z = 2 | x; theta)", "encoder q(z = 2 | x)")):
    image = ax.contourf(g, g, values.reshape(len(g), len(g)).T, levels=11, cmap="coolwarm", vmin=0, vmax=1)
    ax.scatter(x[:, 0], x[:, 1], s=4, color="k")
    ax.set_title(title)
    ax.set_xlabel("eruption (standardised)")
axes[0].set_ylabel("waiting (standardised)")
fig.colorbar(image, ax=axes, label="probability of component 2")
teaching.savefig(fig, OUT / "05_encoder_vs_posterior.png")

# %% [markdown]
# ### Exercise 5.1: what amortization saves
#
# `AutoCategorical` stores one vector of k logits per data point; the encoder stores the
# weights of one network, x (d) -> hidden layer (32, ReLU) -> k logits. Write
# `guide_sizes(n, d, k, hidden)` returning the number of values each guide keeps in the param
# store, (mean-field, encoder). Which one grows with n? The check counts the stored tensors.

# %% tags=["exercise"]
def guide_sizes(n, d, k, hidden):
    """(numbers stored by AutoCategorical, numbers stored by a one-hidden-layer encoder)."""
    raise NotImplementedError("Exercise 5.1")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def guide_sizes(n, d, k, hidden):
    mean_field = n * k  # one logit vector per point: grows with the data
    encoder = (d * hidden + hidden) + (hidden * k + k)  # two weight matrices and biases: fixed
    return mean_field, encoder


# %%
def stored(name, prefix):
    """Numbers in the param store of fit ``name`` under names starting with ``prefix``."""
    params = records[name]["state"]["params"]
    return sum(v.numel() for key, v in params.items() if key.startswith(prefix))


def check_guide_sizes():
    mean_field, encoder = guide_sizes(n, 2, k, 32)
    assert mean_field == stored("SVI, AutoCategorical", "AutoCategorical")
    assert encoder == stored("SVI, AutoAmortized", "AutoAmortized")
    assert guide_sizes(10 * n, 2, k, 32)[1] == encoder  # the encoder does not grow with n


teaching.check_exercise("5.1", check_guide_sizes)

# %% [markdown]
# ## The one-liner
#
# `ppl_em.fit` wraps these loops (restarts, k-means++ initialisation, a convergence test, a
# history, an exact final E-step). Its EM fit lands on the same optimum:

# %%
result = ppl_em.fit(gmm.model, x, k, method="em", progress=False)
print(f"ppl_em.fit: (1/n) log p(x) = {result.log_likelihood:.6f} after {result.n_iter} iterations")
assert abs(result.log_likelihood - best) < 1e-5

# %% [markdown]
# **Summary.** When the exact E-step is available (discrete latents, here 2 values per
# point), EM is hard to beat: a few closed-form iterations. SVI reaches the same optimum by
# gradient steps and needs no closed form, and the amortized guide learns the E-step as a
# function of x, which is what makes it work when p(z | x) cannot be computed: continuous z,
# as in the VAE of the next tutorial.
