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
# # 7. The hidden Markov model by EM (Baum-Welch)
#
# EM works for any p(x, z) whose posterior we can compute. In a hidden Markov model (HMM) the
# latent states are chained in time:
#
#     z_0 ~ Multinomial(pi)                        pi_j = p(z_0 = j)
#     z_t | z_{t-1} = i ~ Multinomial(A_i)         A_ij = p(z_t = j | z_{t-1} = i)
#     x_t | z_t = j ~ N(mu_j, diag(sigma_j^2))
#
# Each z_t is like the z^(i) of a mixture, but they are not independent, so the E-step needs
# the posterior of neighbouring pairs, p(z_{t-1}, z_t | x). Summed over t, these are the
# **expected transition counts**, and the M-step for A is "count and normalise" with soft
# counts, exactly like phi_j in the GMM. Classically the E-step is the forward-backward
# algorithm and the whole method is Baum-Welch.
#
# `models/hmm.py` writes the model as a plain `pyro.markov` loop. ppl_em's E-step enumerates
# the states (variable elimination along the chain: forward-backward, derived automatically)
# and reads the pairwise posteriors off one backward pass. We check them against a
# forward-backward written by hand and against brute-force enumeration of every path.

# %%
import matplotlib.pyplot as plt
import torch
import pyro
import pyro.distributions as dist

import ppl_em
from ppl_em import teaching
from ppl_em.models import hmm

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
f64 = torch.float64

# %% [markdown]
# ## A sticky two-state chain
#
# The chain stays in its state with probability 0.9 (state 1) or 0.85 (state 2); the two
# states emit around -1 and +1.5. Running the model forward gives the series and its states.

# %%
k = 2
T = 25 if QUICK else 150
truth = {
    "pi": torch.tensor([0.5, 0.5], dtype=f64),
    "A": torch.tensor([[0.9, 0.1], [0.15, 0.85]], dtype=f64),
    "mu": torch.tensor([[-1.0], [1.5]], dtype=f64),
    "sigma": torch.tensor([[0.8], [0.8]], dtype=f64),
}
xs, zs = hmm.generate(T, **truth, seed=0)  # (1, T, 1), (1, T): one sequence
x, z_true = xs[0], zs[0]  # (T, 1), (T,)
start = {
    "pi": torch.tensor([0.5, 0.5], dtype=f64),
    "A": torch.tensor([[0.6, 0.4], [0.4, 0.6]], dtype=f64),
    "mu": torch.tensor([[-0.3], [0.3]], dtype=f64),
    "sigma": x.std(0).expand(k, 1).clone(),
}

# %% [markdown]
# ## Forward-backward by hand
#
# With b_j(x_t) = p(x_t | z_t = j), the forward messages alpha_t(j) = p(x_0..x_t, z_t = j)
# and backward messages beta_t(i) = p(x_{t+1}..x_{T-1} | z_t = i) give, in log space,
#
#     p(z_t = j | x)              = alpha_t(j) beta_t(j) / p(x)
#     p(z_{t-1} = i, z_t = j | x) = alpha_{t-1}(i) A_ij b_j(x_t) beta_t(j) / p(x)

# %%
def forward_backward(x, pi, A, mu, sigma):
    """log p(x), gamma (T, k) = p(z_t | x) and xi (T-1, k, k) = p(z_{t-1}, z_t | x)."""
    log_b = dist.Normal(mu, sigma).log_prob(x[:, None, :]).sum(-1)  # (T, k)
    log_A = A.log()
    alpha = [pi.log() + log_b[0]]
    for t in range(1, len(x)):
        alpha.append((alpha[-1][:, None] + log_A).logsumexp(0) + log_b[t])
    beta = [torch.zeros(len(pi), dtype=x.dtype)]
    for t in range(len(x) - 1, 0, -1):
        beta.insert(0, (log_A + log_b[t] + beta[0]).logsumexp(-1))
    alpha, beta = torch.stack(alpha), torch.stack(beta)  # (T, k) each
    log_px = alpha[-1].logsumexp(0)
    gamma = (alpha + beta - log_px).exp()
    xi = (alpha[:-1, :, None] + log_A + (log_b[1:] + beta[1:])[:, None, :] - log_px).exp()
    return log_px, gamma, xi


pyro.clear_param_store()
em = ppl_em.EM(hmm.model, reg_covar=0.0)
post = em.e_step(x, k, init=start)
log_px, gamma, xi = forward_backward(x, **start)
assert torch.allclose(post.log_evidence, log_px)

# The engine's pairwise posterior at site z_t is p(z_{t-1}, z_t | x), shape (sequences, k, k).
pairwise = []
for t in range(1, T):
    probs, names = post.joint(f"z_{t}")
    assert names == [f"z_{t - 1}", f"z_{t}"]
    pairwise.append(probs[0])
pairwise = torch.stack(pairwise)  # (T-1, k, k)
marginals = torch.stack([post.marginal(f"z_{t}")[0] for t in range(T)])  # (T, k)
assert torch.allclose(pairwise, xi)
assert torch.allclose(marginals, gamma)
# Consistency: summing a pair over z_t gives p(z_{t-1} | x); all pairs together hold T - 1 transitions.
assert torch.allclose(pairwise.sum(-1), marginals[:-1])
assert torch.allclose(pairwise.sum(), torch.tensor(T - 1.0, dtype=f64))
expected_counts = pairwise.sum(0)  # (k, k): sum_t p(z_{t-1} = i, z_t = j | x)
print("expected transition counts at the start:\n", expected_counts)

# %% [markdown]
# ## Brute force on a short prefix
#
# log p(x) = log sum over all k^T paths of p(x, z). For the first 8 steps that is 256 paths:
# few enough to list, and the engine's enumeration must agree.

# %%
m = 8
paths = torch.cartesian_prod(*[torch.arange(k)] * m)  # (k^m, m)
log_b = dist.Normal(start["mu"], start["sigma"]).log_prob(x[:m, None, :]).sum(-1)  # (m, k)
log_joint = (start["pi"].log()[paths[:, 0]] + start["A"].log()[paths[:, :-1], paths[:, 1:]].sum(-1)
             + log_b[torch.arange(m), paths].sum(-1))  # (k^m,): log p(x_{0:m}, z_{0:m}) per path
pyro.clear_param_store()
short = ppl_em.EM(hmm.model).e_step(x[:m], k, init=start)
assert torch.allclose(log_joint.logsumexp(0), short.log_evidence)
print(f"{len(paths)} paths: log p(x_0..x_{m - 1}) = {short.log_evidence.item():.4f}")

# %% [markdown]
# ### Exercise 7.1: the most probable path (Viterbi)
#
# Hard EM needs the single most probable path argmax_z p(z | x), not the marginals. Replace
# the forward recursion's log-sum-exp by a max (and remember which i achieved it) to get
# delta_t(j) = max over paths ending in j of log p(x_0..x_t, z_0..z_t), then trace the argmax
# back from the end. Write `viterbi(x, pi, A, mu, sigma)` returning the path (T,) and its
# log p(x, z). The check compares it with the 256 paths above and with the engine's hard
# E-step (`posterior="hard"`), which gets the same path by running its enumeration with max
# in place of sum.

# %% tags=["exercise"]
def viterbi(x, pi, A, mu, sigma):
    """argmax_z p(x, z) as a long tensor (T,), and max_z log p(x, z)."""
    raise NotImplementedError("Exercise 7.1")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def viterbi(x, pi, A, mu, sigma):
    log_b = dist.Normal(mu, sigma).log_prob(x[:, None, :]).sum(-1)  # (T, k)
    delta, back = pi.log() + log_b[0], []
    for t in range(1, len(x)):
        scores = delta[:, None] + A.log()  # (k, k): from i to j
        back.append(scores.argmax(0))  # (k,): the best predecessor of each j
        delta = scores.max(0).values + log_b[t]
    path = [int(delta.argmax())]
    for best in reversed(back):
        path.insert(0, int(best[path[0]]))
    return torch.tensor(path), delta.max()


# %%
def check_viterbi():
    path, best = viterbi(x[:m], **start)
    assert torch.allclose(best, log_joint.max())  # the best of the 256 paths ...
    assert torch.equal(path, paths[log_joint.argmax()])  # ... and which one it is
    pyro.clear_param_store()
    hard = ppl_em.EM(hmm.model, posterior="hard").e_step(x, k, init=start)
    mode = torch.stack([hard.marginal(f"z_{t}")[0].argmax(-1) for t in range(T)])  # (T,)
    assert torch.equal(viterbi(x, **start)[0], mode)


teaching.check_exercise("7.1", check_viterbi)

# %% [markdown]
# ## The M-step: soft counts, normalised
#
# Baum-Welch's updates are the GMM's with chained responsibilities:
#
#     pi_j      = p(z_0 = j | x)
#     A_ij      = sum_t p(z_{t-1} = i, z_t = j | x) / sum_t p(z_{t-1} = i | x)
#     mu_j      = sum_t p(z_t = j | x) x_t / sum_t p(z_t = j | x)
#     sigma_j^2 = sum_t p(z_t = j | x) (x_t - mu_j)^2 / sum_t p(z_t = j | x)
#
# The engine derives them from the model (no HMM-specific code): check them.

# %%
pyro.clear_param_store()
em = ppl_em.EM(hmm.model, reg_covar=0.0)
post = em.e_step(x, k, init=start)
em.m_step(post, x, k, init=start)
nj = gamma.sum(0)  # (k,)
mu_new = (gamma.T @ x) / nj[:, None]  # (k, 1)
by_hand = {
    "pi": gamma[0],
    "A": xi.sum(0) / xi.sum((0, 2))[:, None],
    "mu": mu_new,
    "sigma": ((gamma.T @ x ** 2) / nj[:, None] - mu_new ** 2).sqrt(),
}
for name, value in by_hand.items():
    assert torch.allclose(em.params[name], value), name
for name, how in em.explain().items():
    print(f"{name:6s} <- {how}")

# %% [markdown]
# ## Baum-Welch: log p(x) never decreases

# %%
n_iter = 4 if QUICK else 30
pyro.clear_param_store()
em = ppl_em.EM(hmm.model)
log_lik = [-em.step(x, k, init=start) for _ in range(n_iter)]
assert all(b >= a - 1e-8 for a, b in zip(log_lik, log_lik[1:])), "EM decreased log p(x)"
print("log p(x):", [round(v, 2) for v in log_lik])
post = em.e_step(x, k)
fitted = em.params
state_probs = torch.stack([post.marginal(f"z_{t}")[0] for t in range(T)])  # (T, k)
counts = sum(post.joint(f"z_{t}")[0][0] for t in range(1, T))  # (k, k) expected transition counts
print("fitted A:\n", fitted["A"], "\nfitted mu:", fitted["mu"].flatten().tolist())

# %% [markdown]
# The states are only defined up to relabelling; ordering them by their means, the fitted
# emission means should sit near -1 and 1.5 once EM has had enough iterations, and the most
# probable state at each time should mostly match the true one.

# %%
order = fitted["mu"][:, 0].argsort()
accuracy = (state_probs[:, order].argmax(-1) == z_true).double().mean().item()
print(f"most probable state = true state at {accuracy:.0%} of the time steps")
if not QUICK:
    assert torch.allclose(fitted["mu"][order, 0], truth["mu"][:, 0], atol=0.5)
    assert accuracy > 0.8

# %%
fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1, 1]})
axes[0].plot(x[:, 0], "k.-", lw=0.6, ms=3)
axes[0].fill_between(range(T), x.min().item(), x.max().item(), where=(z_true == 1).numpy(),
                     color="tab:orange", alpha=0.2, label="true state 2")
axes[0].set_ylabel("x_t")
axes[0].legend(loc="upper right")
axes[1].plot(state_probs[:, order[1]], color="tab:orange")
axes[1].set_ylabel("p(z_t = 2 | x)")
axes[2].plot(range(1, T), [post.joint(f"z_{t}")[0][0][order[0], order[1]].item() for t in range(1, T)])
axes[2].set_ylabel("p(z_{t-1}=1, z_t=2 | x)")
axes[2].set_xlabel("t")
fig.suptitle("Baum-Welch by enumeration: state and transition posteriors")
teaching.savefig(fig, OUT / "07_hmm_posteriors.png")

fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), constrained_layout=True)
axes[0].plot(log_lik, "o-", ms=3)
axes[0].set_xlabel("iteration")
axes[0].set_ylabel("log p(x; theta)")
axes[0].set_title("log p(x) never decreases")
panels = [(counts[order][:, order], "expected transition counts"),
          (fitted["A"][order][:, order], "fitted A (counts, normalised)"), (truth["A"], "true A")]
contrasts = []
for ax, (matrix, title) in zip(axes[1:], panels):
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    for (i, j), v in zip(torch.cartesian_prod(torch.arange(k), torch.arange(k)).tolist(), matrix.flatten()):
        cell = image.cmap(image.norm(v.item()))  # the colour actually drawn under the number
        ink = teaching.text_color(cell)
        contrasts.append(teaching.contrast_ratio(ink, cell))
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=ink)
    ax.set_xticks(range(k), [f"z_t={j + 1}" for j in range(k)])
    ax.set_yticks(range(k), [f"z_(t-1)={i + 1}" for i in range(k)])
    ax.set_title(title)
# Every number is legible: black or white, whichever contrasts more with its cell (WCAG: >= 4.5).
assert min(contrasts) >= 4.5, min(contrasts)
teaching.savefig(fig, OUT / "07_hmm_counts.png")

# %% [markdown]
# **Summary.** Nothing in ppl_em knows what an HMM is. The model file says which variables
# depend on which; enumeration turns that into forward-backward; the posterior of each
# factor gives p(z_{t-1}, z_t | x), the expected transition counts; and the same
# family-level closed forms that fit the GMM give Baum-Welch's M-step. log p(x) never
# decreases, as the ELBO argument of tutorial 4 promises for any model.
