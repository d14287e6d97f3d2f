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
# # 8. A topic model by EM
#
# The lecture closes its list of latent-variable models with topic models (LDA), where the
# object of interest is P(z | x): which topic produced each word. The maximum-likelihood core
# of LDA (PLSA) is a mixture per word. A corpus has D documents over a vocabulary of V words;
# with k topics,
#
#     z_{d,m} ~ Multinomial(theta_d)                     theta_dj = p(topic j | document d)
#     w_{d,m} | z_{d,m} = j ~ Multinomial(beta_j)        beta_jv  = p(word v | topic j)
#
# The E-step is Bayes' rule for every word token: P(z_{d,m} = j | w_{d,m}) is proportional
# to theta_dj beta_{j, w_{d,m}}, a soft assignment of the word to the topics, just like the
# responsibilities w_j^(i) of the GMM (we write w_j^(d,m)). The M-step counts with those soft
# assignments:
#
#     theta_dj = sum_m w_j^(d,m) / N_d
#     beta_jv  = sum_{(d,m): w_{d,m} = v} w_j^(d,m) / sum_{(d,m)} w_j^(d,m)
#
# We fit `models/topic.py` by EM on a synthetic corpus, check both steps by hand, and see
# whether the topics come back.

# %%
import itertools
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # a script writes PNG files; a notebook shows the figures inline
import matplotlib.pyplot as plt
import torch
import pyro
import pyro.distributions as dist

import ppl_em
from ppl_em.models import topic

QUICK = os.environ.get("PPL_EM_QUICK") == "1"  # tiny sizes, for the test suite
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder
OUT = Path(os.environ.get("PPL_EM_TUTORIAL_OUT", HERE / "_out"))
OUT.mkdir(parents=True, exist_ok=True)


def savefig(fig, name):
    """Write ``fig`` to OUT/name; in a notebook keep it open so that it is displayed."""
    fig.savefig(OUT / name, dpi=100, bbox_inches="tight")
    if "ipykernel" not in sys.modules:
        plt.close(fig)


pyro.set_rng_seed(0)
f64 = torch.float64

# %% [markdown]
# ## A synthetic corpus
#
# Three topics over 24 words. Each topic puts most of its mass on its own block of 8 words
# ("sports", "cooking", "music", if you like) and a little on every other word. Each document
# mixes the topics with proportions theta_d drawn from a sparse Dirichlet, so most documents
# are about one or two topics. Running the model forward writes the corpus.

# %%
k, V = 3, 24
D, N_d = (30, 40) if QUICK else (100, 80)
vocab = [f"{block}{i}" for block in ("sport", "cook", "music") for i in range(8)]
block = torch.arange(V) // 8  # (V,): the topic each word is "about"
beta_true = torch.where(block[None, :] == torch.arange(k)[:, None], 1.0, 0.05).to(f64)
beta_true = beta_true / beta_true.sum(-1, keepdim=True)  # (k, V)
theta_true = dist.Dirichlet(torch.full((k,), 0.5, dtype=f64)).sample((D,))  # (D, k)
words, doc, z_true = topic.generate([N_d] * D, theta_true, beta_true, seed=0)  # (N,) each
N = len(words)
print(f"{D} documents, {N} word tokens; document 0 begins:", " ".join(vocab[v] for v in words[:12]))

# %% [markdown]
# ## One E-step and one M-step, by hand and by the engine

# %%
start = topic.init_params(D, k, V, seed=1)  # uniform theta_d, random beta_j
pyro.clear_param_store()
em = ppl_em.EM(topic.model, reg_covar=0.0)
post = em.e_step(words, doc, k, D, V, init=start)
w = post.marginal("z")  # (N, k): P(z_{d,m} = j | w_{d,m})
joint = start["theta"][doc] * start["beta"][:, words].T  # (N, k): theta_dj beta_{j, w}
assert torch.allclose(w, joint / joint.sum(-1, keepdim=True))

em.m_step(post, words, doc, k, D, V, init=start)
one_hot_doc = torch.nn.functional.one_hot(doc, D).to(f64)  # (N, D)
one_hot_word = torch.nn.functional.one_hot(words, V).to(f64)  # (N, V)
theta_hand = (one_hot_doc.T @ w) / one_hot_doc.sum(0)[:, None]  # (D, k)
beta_hand = (w.T @ one_hot_word) / w.sum(0)[:, None]  # (k, V)
assert torch.allclose(em.params["theta"], theta_hand)
assert torch.allclose(em.params["beta"], beta_hand)
for name, how in em.explain().items():
    print(f"{name:6s} <- {how}")

# %% [markdown]
# ## EM: log p(x) never decreases
#
# Like k-means, the likelihood has local optima; we run a few random starts and keep the one
# with the highest log p(x) (`ppl_em.fit(..., n_init=...)` does the same).

# %%
n_iter = 25 if QUICK else 150
curves, fits = {}, {}
for seed in range(2 if QUICK else 4):
    pyro.clear_param_store()
    em = ppl_em.EM(topic.model)
    init = topic.init_params(D, k, V, seed=seed)
    curves[seed] = [-em.step(words, doc, k, D, V, init=init) for _ in range(n_iter)]
    assert all(b >= a - 1e-8 for a, b in zip(curves[seed], curves[seed][1:])), "EM decreased log p(x)"
    fits[seed] = (em.params, em.e_step(words, doc, k, D, V).marginal("z"))
best = max(curves, key=lambda s: curves[s][-1])
(params, w) = fits[best]
print("final log p(x) per start:", {s: round(c[-1], 2) for s, c in curves.items()}, "kept:", best)

# %% [markdown]
# ## Are the topics recovered?
#
# Topics come back in an arbitrary order. We match fitted to true topics by the permutation
# with the smallest total variation distance, TV(p, q) = (1/2) sum_v |p_v - q_v|.

# %%
def tv(p, q):
    return 0.5 * (p - q).abs().sum(-1)


def mismatch(order):
    """Total TV distance when fitted topic order[j] is matched with true topic j."""
    return tv(params["beta"][list(order)], beta_true).sum().item()


perm = list(min(itertools.permutations(range(k)), key=mismatch))
beta_fit, theta_fit, w_fit = params["beta"][perm], params["theta"][:, perm], w[:, perm]
distances = tv(beta_fit, beta_true)
print("TV(fitted topic, true topic):", [round(v, 3) for v in distances.tolist()])
top = beta_fit.topk(5, dim=-1).indices
for j in range(k):
    print(f"topic {j + 1}: " + ", ".join(vocab[v] for v in top[j]))
assert (distances < (0.3 if QUICK else 0.15)).all()
word_accuracy = (w_fit.argmax(-1) == z_true).double().mean().item()
print(f"most probable topic = true topic for {word_accuracy:.0%} of the word tokens")
assert word_accuracy > 1 / k + 0.2  # far better than guessing

# %% [markdown]
# ## P(z | x) for the words of one document
#
# The same word can be explained by different topics in different documents: the posterior
# combines what the word says (beta) with what the document is about (theta_d).

# %%
d = int(theta_true[:, 0].sub(0.5).abs().argmin())  # a document that mixes topic 1 with others
tokens = (doc == d).nonzero()[:, 0][:20]
fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1, 1, 1.4]})
for ax, matrix, title in ((axes[0], beta_true, "true beta (topics x words)"),
                          (axes[1], beta_fit, "fitted beta, topics matched")):
    ax.imshow(matrix.numpy(), aspect="auto", cmap="Greens")
    ax.set_title(title)
    ax.set_xlabel("word v")
    ax.set_yticks(range(k), [f"topic {j + 1}" for j in range(k)])
axes[2].imshow(w_fit[tokens].T.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1)
axes[2].set_xticks(range(len(tokens)), [vocab[v] for v in words[tokens]], rotation=90)
axes[2].set_yticks(range(k), [f"topic {j + 1}" for j in range(k)])
axes[2].set_title(f"P(z | x) for the first words of document {d}")
savefig(fig, "08_topics.png")

fig, ax = plt.subplots(figsize=(5, 3.5))
for seed, curve in curves.items():
    ax.plot(curve, label=f"start {seed}")
ax.set_xlabel("iteration")
ax.set_ylabel("log p(x; theta, beta)")
ax.set_title("EM on the topic model")
ax.legend()
savefig(fig, "08_log_likelihood.png")

# %% [markdown]
# **From PLSA to LDA.** LDA puts Dirichlet priors on theta_d and beta_j and integrates theta_d
# out. Its posterior over the continuous theta_d is no longer a finite sum, so the exact
# E-step is gone; that is where SVI with a guide for theta_d (tutorial 5), or the collapsed
# Gibbs sampler, take over. The quantity we read, P(z | x) per word, is the same.
