"""models/topic.py against a direct numpy PLSA EM, and topic recovery on a corpus drawn from the model."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

import ppl_em
from ppl_em.models import topic

D = torch.float64


def _numpy_plsa(words, doc, theta, beta, steps):
    """Direct EM for PLSA. Yields (log p(w) before the update, theta, beta after it)."""
    lengths = np.bincount(doc, minlength=len(theta))
    for _ in range(steps):
        log_joint = np.log(theta[doc]) + np.log(beta[:, words].T)  # (N, k)
        log_pw = logsumexp(log_joint, 1)
        w = np.exp(log_joint - log_pw[:, None])  # p(z_{d,m} = j | w_{d,m})
        theta = np.stack([w[doc == d].sum(0) for d in range(len(theta))]) / lengths[:, None]
        beta = np.stack([w[words == v].sum(0) for v in range(beta.shape[1])], 1)  # (k, V)
        beta = beta / beta.sum(1, keepdims=True)
        yield log_pw.sum(), theta, beta


def _corpus(num_docs=40, length=50, seed=0):
    """Three topics, each on its own five of V = 15 words (plus a little of every word)."""
    g = torch.Generator().manual_seed(seed)
    beta = torch.full((3, 15), 0.01, dtype=D)
    for j in range(3):
        beta[j, 5 * j:5 * j + 5] += torch.rand(5, generator=g, dtype=D) + 0.5
    beta = beta / beta.sum(-1, keepdim=True)
    theta = torch.distributions.Dirichlet(torch.full((3,), 0.4, dtype=D)).sample((num_docs,))
    lengths = (length + torch.randint(-10, 11, (num_docs,), generator=g)).tolist()  # ragged
    return theta, beta, *topic.generate(lengths, theta, beta, seed=seed)


def test_em_equals_a_direct_numpy_plsa():
    torch.manual_seed(0)
    _, _, words, doc, _ = _corpus(num_docs=12, length=30)
    init = topic.init_params(12, 3, 15, seed=1)
    em = ppl_em.EM(topic.model)
    oracle = _numpy_plsa(words.numpy(), doc.numpy(), init["theta"].numpy(), init["beta"].numpy(), steps=10)
    for log_pw, theta, beta in oracle:
        loss = em.step(words, doc, 3, init=init)
        np.testing.assert_allclose(-loss, log_pw, rtol=1e-10)
        np.testing.assert_allclose(em.params["theta"].numpy(), theta, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(em.params["beta"].numpy(), beta, rtol=1e-9, atol=1e-14)
    assert em.explain() == {"theta": "closed form: Categorical.probs at site z",
                            "beta": "closed form: Categorical.probs at site w"}


def test_topics_are_recovered_from_a_corpus_drawn_from_the_model():
    torch.manual_seed(1)
    _, beta, words, doc, z = _corpus()
    assert words.shape == doc.shape == z.shape and int(doc.max()) == 39
    em = ppl_em.EM(topic.model)
    for _ in range(40):
        em.step(words, doc, 3, num_docs=40, vocab_size=15)
    got = em.params["beta"]
    tv = 0.5 * (got[:, None, :] - beta[None, :, :]).abs().sum(-1)  # (k, k) total variation
    rows, cols = linear_sum_assignment(tv.numpy())  # match topics up to label switching
    assert tv[rows, cols].max() < 0.1, tv


def test_bad_tokens_are_clear_errors():
    words, doc = torch.tensor([0, 3, 2]), torch.tensor([0, 0, 1])
    em = ppl_em.EM(topic.model)
    with pytest.raises(ValueError, match=r"words must be a long tensor of shape \(N,\).*torch.float32"):
        em.step(words.float(), doc)
    with pytest.raises(ValueError, match=r"same shape \(N,\), got \(3,\) and \(2,\)"):
        em.step(words, doc[:2])
    with pytest.raises(ValueError, match=r"word ids in \[0, 3\).*\[0, 3\].*vocab_size"):
        em.step(words, doc, vocab_size=3)
