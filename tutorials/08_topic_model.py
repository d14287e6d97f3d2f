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
# the observed data are the word tokens x^(d,m), the m-th word of document d. With k topics,
# in the notes' notation (phi for mixing proportions, as in the GMM):
#
#     z^(d,m) ~ Multinomial(phi_d)                      phi_dj  = p(topic j | document d)
#     x^(d,m) | z^(d,m) = j ~ Multinomial(beta_j)       beta_jv = p(word v | topic j)
#
# so theta = (phi, beta) are the parameters. The E-step is Bayes' rule for every token: the
# responsibility w_j^(d,m) = P(z^(d,m) = j | x^(d,m)) is proportional to phi_dj beta_{j, x^(d,m)},
# a soft assignment of the word to the topics, just like the w_j^(i) of the GMM. The M-step
# counts with those soft assignments (N_d words in document d):
#
#     phi_dj  = sum_m w_j^(d,m) / N_d
#     beta_jv = sum_{(d,m): x^(d,m) = v} w_j^(d,m) / sum_{(d,m)} w_j^(d,m)
#
# We fit `models/topic.py` by EM on a synthetic corpus, check both steps by hand, and see
# whether the topics come back. (The model file stores phi under the parameter name `theta`
# and calls the word site `w`; below, `params["theta"]` is phi.)

# %%
import matplotlib.pyplot as plt
import torch
import pyro
import pyro.distributions as dist

import ppl_em
from ppl_em import teaching
from ppl_em.models import topic

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
f64 = torch.float64

# %% [markdown]
# ## A synthetic corpus
#
# Three topics over 26 words. Each topic puts most of its mass on its own block of 8 words
# ("sport", "cook", "music", if you like) and a little on every other word. Two more words
# are **ambiguous**: "play" belongs to sport and to music, "heat" to sport and to cooking.
# Each document mixes the topics with proportions phi_d drawn from a sparse Dirichlet, so most
# documents are about one or two topics. Running the model forward writes the corpus.

# %%
k = 3
vocab = [f"{block}{i}" for block in ("sport", "cook", "music") for i in range(8)] + ["play", "heat"]
V = len(vocab)
PLAY, HEAT = vocab.index("play"), vocab.index("heat")
D, N_d = (40, 40) if QUICK else (100, 80)
block = torch.cat([torch.arange(24) // 8, torch.tensor([-1, -1])])  # (V,): the topic each word is about
beta_true = torch.where(block[None, :] == torch.arange(k)[:, None], 1.0, 0.05).to(f64)  # (k, V)
beta_true[[0, 2], PLAY] = 1.0  # "play": sport and music
beta_true[[0, 1], HEAT] = 1.0  # "heat": sport and cooking
beta_true = beta_true / beta_true.sum(-1, keepdim=True)
phi_true = dist.Dirichlet(torch.full((k,), 0.5, dtype=f64)).sample((D,))  # (D, k)
x_tok, doc, z_true = topic.generate([N_d] * D, phi_true, beta_true, seed=0)  # (N,) each
N = len(x_tok)
print(f"{D} documents, {N} word tokens; document 1 begins:", " ".join(vocab[v] for v in x_tok[:12]))

# %% [markdown]
# ## One E-step and one M-step, by hand and by the engine

# %%
start = topic.init_params(D, k, V, seed=1)  # uniform phi_d, random beta_j
pyro.clear_param_store()
em = ppl_em.EM(topic.model, reg_covar=0.0)
post = em.e_step(x_tok, doc, k, D, V, init=start)
w = post.marginal("z")  # (N, k): w_j^(d,m) = P(z^(d,m) = j | x^(d,m))
joint = start["theta"][doc] * start["beta"][:, x_tok].T  # (N, k): phi_dj beta_{j, x^(d,m)}
assert torch.allclose(w, joint / joint.sum(-1, keepdim=True))

em.m_step(post, x_tok, doc, k, D, V, init=start)
one_hot_doc = torch.nn.functional.one_hot(doc, D).to(f64)  # (N, D)
one_hot_word = torch.nn.functional.one_hot(x_tok, V).to(f64)  # (N, V)
phi_hand = (one_hot_doc.T @ w) / one_hot_doc.sum(0)[:, None]  # (D, k)
beta_hand = (w.T @ one_hot_word) / w.sum(0)[:, None]  # (k, V)
assert torch.allclose(em.params["theta"], phi_hand)
assert torch.allclose(em.params["beta"], beta_hand)
for name, how in em.explain().items():
    print(f"{name:6s} <- {how}")
engine_after_one_step = {"phi": em.params["theta"], "beta": em.params["beta"]}

# %% [markdown]
# ### Exercise 8.1: EM on the document-word counts
#
# The responsibility of a token depends only on its document d and its word v, so EM never
# needs the tokens one by one: the counts n_dv (how often word v occurs in document d) are
# enough. Write one EM iteration in that form, `plsa_step(counts, phi, beta)`: the E-step
# w_dvj propto phi_dj beta_jv, then phi_dj propto sum_v n_dv w_dvj and
# beta_jv propto sum_d n_dv w_dvj. The check compares it with the engine's step on the tokens.

# %% tags=["exercise"]
def plsa_step(counts, phi, beta):
    """One EM iteration from counts (D, V), phi (D, k), beta (k, V); returns the new (phi, beta)."""
    raise NotImplementedError("Exercise 8.1")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def plsa_step(counts, phi, beta):
    joint = phi[:, None, :] * beta.T[None, :, :]  # (D, V, k): phi_dj beta_jv
    w = joint / joint.sum(-1, keepdim=True)  # responsibilities per (document, word)
    soft = counts[:, :, None] * w  # (D, V, k): expected counts of (d, v, topic j)
    phi_new = soft.sum(1) / soft.sum((1, 2))[:, None]  # (D, k)
    beta_new = soft.sum(0).T / soft.sum((0, 1))[:, None]  # (k, V)
    return phi_new, beta_new


# %%
counts = (one_hot_doc.T @ one_hot_word)  # (D, V): n_dv


def check_plsa_step():
    phi_new, beta_new = plsa_step(counts, start["theta"], start["beta"])
    assert torch.allclose(phi_new, engine_after_one_step["phi"])
    assert torch.allclose(beta_new, engine_after_one_step["beta"])


teaching.check_exercise("8.1", check_plsa_step)

# %% [markdown]
# ## EM: log p(x) never decreases
#
# Like k-means, the likelihood has local optima; we run a few random starts and keep the one
# with the highest log p(x) (`ppl_em.fit(..., n_init=...)` does the same).

# %%
n_iter = 40 if QUICK else 150
curves, fits = {}, {}
for seed in range(3 if QUICK else 4):
    pyro.clear_param_store()
    em = ppl_em.EM(topic.model)
    init = topic.init_params(D, k, V, seed=seed)
    curves[seed] = [-em.step(x_tok, doc, k, D, V, init=init) for _ in range(n_iter)]
    assert all(b >= a - 1e-8 for a, b in zip(curves[seed], curves[seed][1:])), "EM decreased log p(x)"
    fits[seed] = (em.params, em.e_step(x_tok, doc, k, D, V).marginal("z"))
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


cost = tv(params["beta"][None, :, :], beta_true[:, None, :])  # (true j, fitted l)
perm = teaching.best_permutation(cost)  # fitted topic perm[j] is true topic j
beta_fit, phi_fit, w_fit = params["beta"][perm], params["theta"][:, perm], w[:, perm]
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
# ## P(z | x) for the same word in different documents
#
# The posterior combines what the word says (beta_{j, v}) with what the document is about
# (phi_dj). For a word of one topic, beta decides almost alone. For the ambiguous "play" it
# cannot: P(z = sport | "play", d) = phi_d,sport beta_sport,play / sum_j phi_dj beta_j,play
# follows the document's balance between sport and music. In PLSA every occurrence of a word
# in one document gets the same posterior; across documents it moves from music to sport.

# %%
is_play = x_tok == PLAY
play_docs = doc[is_play]  # the document of every "play" token
p_sport = w_fit[is_play, 0]  # P(z = sport | "play", d) per token
for d in play_docs.unique():  # one value per (document, word)
    same = p_sport[play_docs == d]
    assert torch.allclose(same, same[0].expand_as(same))
balance = (phi_fit[:, 0] / (phi_fit[:, 0] + phi_fit[:, 2]))[play_docs]  # sport / (sport + music) in d
spread = (p_sport.max() - p_sport.min()).item()
correlation = torch.corrcoef(torch.stack([balance, p_sport]))[0, 1].item()
print(f'"play" occurs in {len(play_docs.unique())} documents: P(z = sport | "play") ranges over '
      f"{spread:.2f}; its correlation with the document's sport/(sport + music) balance is {correlation:.2f}")
assert spread > 0.5 and correlation > 0.9
single = x_tok == vocab.index("cook3")  # an unambiguous word: the cooking topic nearly everywhere
assert w_fit[single, 1].median() > 0.8

# %%
d = int(phi_true[:, 0].sub(0.5).abs().argmin())  # a document that mixes sport with other topics
tokens = (doc == d).nonzero()[:, 0][:20]
fig, axes = plt.subplots(2, 2, figsize=(14, 8.5), layout="constrained")
for ax, matrix, title in ((axes[0, 0], beta_true, "true beta (topics x words)"),
                          (axes[0, 1], beta_fit, "fitted beta, topics matched")):
    image = ax.imshow(matrix.numpy(), aspect="auto", cmap="Greens")
    ax.set_title(title)
    ax.set_xticks(range(V), vocab, rotation=90, fontsize=7)
    ax.set_yticks(range(k), ["sport", "cook", "music"])
fig.colorbar(image, ax=axes[0], label="beta_jv = p(word v | topic j)")
image = axes[1, 0].imshow(w_fit[tokens].T.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1)
axes[1, 0].set_xticks(range(len(tokens)), [vocab[v] for v in x_tok[tokens]], rotation=90)
axes[1, 0].set_yticks(range(k), ["sport", "cook", "music"])
axes[1, 0].set_title(f"w_j^(d,m) = P(z | x) for the first words of document {d + 1}")
fig.colorbar(image, ax=axes[1, 0], label="P(z = j | x^(d,m))")
axes[1, 1].scatter(balance, p_sport, s=14, color="tab:purple")
axes[1, 1].set_xlabel("document's phi_d,sport / (phi_d,sport + phi_d,music), fitted")
axes[1, 1].set_ylabel('P(z = sport | "play", d)')
axes[1, 1].set_title('the ambiguous word "play" in every document that uses it')
teaching.savefig(fig, OUT / "08_topics.png")

fig, ax = plt.subplots(figsize=(5, 3.5))
for seed, curve in curves.items():
    ax.plot(curve, label=f"start {seed}")
ax.set_xlabel("iteration")
ax.set_ylabel("log p(x; phi, beta)")
ax.set_title("EM on the topic model")
ax.legend()
teaching.savefig(fig, OUT / "08_log_likelihood.png")

# %% [markdown]
# **From PLSA to LDA.** LDA puts Dirichlet priors on phi_d and beta_j and integrates phi_d
# out. Its posterior over the continuous phi_d is no longer a finite sum, so the exact
# E-step is gone; that is where SVI with a guide for phi_d (tutorial 5), or the collapsed
# Gibbs sampler, take over. The quantity we read, P(z | x) per word, is the same.
