"""A topic model (PLSA; LDA without its Dirichlet priors), as a plain Pyro program.

A corpus of D documents over a vocabulary of V words; document d holds the words
w_{d,1}, ..., w_{d,N_d}. With k topics, each word has a latent topic:

    z_{d,m} ~ Multinomial(theta_d)          theta_d = p(topic | document d),  (D, k)
    w_{d,m} | z_{d,m} = j ~ Multinomial(beta_j)     beta_j = p(word | topic j),  (k, V)

p(z | x) here is the posterior over each word's topic. EM gives the PLSA updates: with
w_j^(d,m) = p(z_{d,m} = j | w_{d,m}) propto theta_dj beta_{j, w_{d,m}},

    theta_dj := sum_m w_j^(d,m) / N_d,     beta_jv := sum_{d,m: w_{d,m} = v} w_j^(d,m) / sum_{d,m} w_j^(d,m).

LDA puts Dirichlet priors on theta_d and beta_j and integrates theta_d out; that posterior is
not enumerable, so LDA proper is fitted with SVI. This file is its maximum-likelihood core.

The corpus is passed as a flat list of tokens: ``words`` (N,) long word ids and ``doc`` (N,)
long document ids, N = sum_d N_d, so documents may have any lengths.

Parameters: ``theta`` (D, k) and ``beta`` (k, V), rows on the simplex.

Reference: lecture notes, "topic models (LDA)", P(z | x); Hofmann, "Probabilistic latent
semantic indexing", SIGIR 1999; Blei, Ng & Jordan, "Latent Dirichlet allocation", JMLR 2003.
"""

from functools import cache, partial
from typing import Dict, Optional, Tuple

import torch
import pyro
import pyro.distributions as dist
from torch.distributions import constraints


def init_params(num_docs: int, k: int, vocab_size: int, seed: int = 0,
                dtype: torch.dtype = torch.float64) -> Dict[str, torch.Tensor]:
    """Default initial values: uniform theta_d, random beta_j (rows of uniform [0.5, 1.5] draws, normalised).

    Returns ``theta`` (D, k) and ``beta`` (k, V).
    """
    g = torch.Generator().manual_seed(seed)
    beta = 0.5 + torch.rand(k, vocab_size, generator=g, dtype=dtype)
    return {"theta": torch.full((num_docs, k), 1.0 / k, dtype=dtype), "beta": beta / beta.sum(-1, keepdim=True)}


def _sizes(words: torch.Tensor, doc: torch.Tensor, num_docs: Optional[int], vocab_size: Optional[int]):
    """(D, V), with clear errors for tokens that are not long ids of the right shape or range."""
    for name, t in (("words", words), ("doc", doc)):
        if not torch.is_tensor(t) or t.dim() != 1 or t.dtype != torch.long:
            got = f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{name} must be a long tensor of shape (N,) (one entry per token), got {got}.")
    if words.shape != doc.shape:
        raise ValueError(f"words and doc must have the same shape (N,), "
                         f"got {tuple(words.shape)} and {tuple(doc.shape)}.")
    D = int(doc.max()) + 1 if num_docs is None else num_docs
    V = int(words.max()) + 1 if vocab_size is None else vocab_size
    if doc.min() < 0 or doc.max() >= D or words.min() < 0 or words.max() >= V:
        raise ValueError(f"Token ids out of range: doc ids must lie in [0, {D}) and word ids in [0, {V}); "
                         f"got doc ids in [{int(doc.min())}, {int(doc.max())}] and word ids in "
                         f"[{int(words.min())}, {int(words.max())}]. Pass num_docs / vocab_size to match.")
    return D, V


def _start(name: str, init: Optional[Dict[str, torch.Tensor]], defaults) -> torch.Tensor:
    """Initial value of parameter ``name``: ``init[name]`` if given, else ``defaults()[name]``.

    A fresh copy: the param store must never alias (and later update in place) the caller's tensor.
    Called only when the param store has no value yet; ``defaults`` is cached, made at most once a run.
    """
    value = init[name] if init and name in init else defaults()[name]
    return value.detach().clone()


def model(words: torch.Tensor, doc: torch.Tensor, k: int = 2, num_docs: Optional[int] = None,
          vocab_size: Optional[int] = None, init: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """PLSA on a corpus of N tokens.

    Parameters
    ----------
    words : torch.Tensor
        Long, shape (N,): the word id w_{d,m} of each token, in [0, V).
    doc : torch.Tensor
        Long, shape (N,): the document d of each token, in [0, D).
    k : int
        Number of topics.
    num_docs, vocab_size : int, optional
        D and V; default one more than the largest id seen.
    init : dict, optional
        Initial ``theta`` (D, k) and/or ``beta`` (k, V) (default :func:`init_params`); values
        already in Pyro's param store take precedence.
    """
    D, V = _sizes(words, doc, num_docs, vocab_size)
    defaults = cache(partial(init_params, D, k, V))  # made at most once a run
    theta = pyro.param("theta", lambda: _start("theta", init, defaults), constraint=constraints.simplex)  # (D, k)
    beta = pyro.param("beta", lambda: _start("beta", init, defaults), constraint=constraints.simplex)  # (k, V)
    with pyro.plate("tokens", len(words)):
        z = pyro.sample("z", dist.Categorical(theta[doc]), infer={"enumerate": "parallel"})  # (N,) or (k, 1)
        pyro.sample("w", dist.Categorical(beta[z]), obs=words)


def generate(doc_lengths, theta: torch.Tensor, beta: torch.Tensor,
             seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw a corpus by running :func:`model` forward.

    Parameters
    ----------
    doc_lengths : sequence of int
        N_d for each of the D documents.
    theta, beta : torch.Tensor
        (D, k) and (k, V) distributions.

    Returns
    -------
    words, doc, z : torch.Tensor
        Long, shape (N,) each, N = sum_d N_d: word ids, document ids, topics.
    """
    doc = torch.repeat_interleave(torch.arange(len(doc_lengths)), torch.as_tensor(doc_lengths))
    placeholder = torch.zeros_like(doc)  # fixes N; never observed
    init = {"theta": theta, "beta": beta}
    with pyro.get_param_store().scope(), torch.random.fork_rng():
        torch.manual_seed(seed)
        tr = pyro.poutine.trace(pyro.poutine.uncondition(model)).get_trace(
            placeholder, doc, theta.shape[-1], len(theta), beta.shape[-1], init)
    return tr.nodes["w"]["value"].detach(), doc, tr.nodes["z"]["value"].detach()
