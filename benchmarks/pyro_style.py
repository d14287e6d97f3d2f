"""Models written the way Pyro's own examples and tutorials write them, not the way ppl_em's
model files do: priors as ``pyro.sample`` sites (point-estimated by EM), ``poutine.mask`` around
prior and padded time steps, ``pyro.markov`` loops, ``Vindex``, ``config_enumerate`` or
``infer={"enumerate": "parallel"}``, subsampled plates, a ``DiscreteHMM`` with a size-1 state
dimension, networks inside the model. They follow the structure of Pyro's ``examples/hmm.py``
(models 0-7), the Gaussian mixture tutorial, the enumeration tutorial and the capture-recapture
example, on small synthetic data.
"""

from types import SimpleNamespace

import torch
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from torch import nn
from torch.distributions import constraints

D = torch.float64


def binary_sequences(num_sequences=6, max_length=9, data_dim=4, hidden_dim=3, seed=0):
    """Synthetic piano-roll-like data: (S, T, data_dim) of 0/1 with varying lengths (S,), from a small HMM."""
    g = torch.Generator().manual_seed(seed)
    A = torch.full((hidden_dim, hidden_dim), 0.15 / (hidden_dim - 1), dtype=D).fill_diagonal_(0.85)
    B = torch.rand(hidden_dim, data_dim, generator=g, dtype=D) * 0.8 + 0.1
    lengths = torch.randint(max_length // 2, max_length + 1, (num_sequences,), generator=g)
    lengths[0] = max_length
    seqs = torch.zeros(num_sequences, max_length, data_dim, dtype=D)
    for s in range(num_sequences):
        x = 0
        for t in range(int(lengths[s])):
            x = int(torch.multinomial(A[x], 1, generator=g))
            seqs[s, t] = torch.bernoulli(B[x], generator=g)
    return seqs, lengths


def args(hidden_dim=3, **kw):
    return SimpleNamespace(hidden_dim=hidden_dim, jit=False, nn_dim=8, nn_channels=2, raftery_parameterization=False,
                           **kw)


# -- Pyro's examples/hmm.py, models 0-7 ----------------------------------------------------------
def _priors(hidden, data_dim, include_prior, shape_y=None):
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(hidden, dtype=D) + 0.1).to_event(1))
        shape_y = [hidden, data_dim] if shape_y is None else shape_y
        probs_y = pyro.sample("probs_y", dist.Beta(torch.tensor(0.1, dtype=D), torch.tensor(0.9, dtype=D))
                              .expand(shape_y).to_event(len(shape_y)))
    return probs_x, probs_y


def model_0(sequences, lengths, args, batch_size=None, include_prior=True):
    """A sequential plate over sequences, a Python loop over time."""
    num_sequences, max_length, data_dim = sequences.shape
    probs_x, probs_y = _priors(args.hidden_dim, data_dim, include_prior)
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    for i in pyro.plate("sequences", len(sequences), batch_size):
        length = lengths[i]
        sequence = sequences[i, :length]
        x = 0
        for t in pyro.markov(range(length)):
            x = pyro.sample(f"x_{i}_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
            with tones_plate:
                pyro.sample(f"y_{i}_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequence[t])


def model_1(sequences, lengths, args, batch_size=None, include_prior=True):
    """Vectorised over sequences; padded steps masked."""
    num_sequences, max_length, data_dim = sequences.shape
    probs_x, probs_y = _priors(args.hidden_dim, data_dim, include_prior)
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        x = 0
        for t in pyro.markov(range(int(lengths.max()))):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
                with tones_plate:
                    pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences[batch, t])


def model_2(sequences, lengths, args, batch_size=None, include_prior=True):
    """Autoregressive emissions: y_t depends on x_t and on y_{t-1}."""
    num_sequences, max_length, data_dim = sequences.shape
    probs_x, probs_y = _priors(args.hidden_dim, data_dim, include_prior, [args.hidden_dim, 2, data_dim])
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        x, y = 0, 0
        for t in pyro.markov(range(int(lengths.max()))):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
                with tones_plate as tones:
                    y = pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[x, y, tones]), obs=sequences[batch, t]).long()


def _factorial_priors(hidden, data_dim, include_prior, second_order):
    with poutine.mask(mask=include_prior):
        probs_w = pyro.sample("probs_w", dist.Dirichlet(0.9 * torch.eye(hidden, dtype=D) + 0.1).to_event(1))
        prior_x = dist.Dirichlet(0.9 * torch.eye(hidden, dtype=D) + 0.1)
        probs_x = pyro.sample("probs_x", prior_x.expand_by([hidden]).to_event(2) if second_order else prior_x.to_event(1))
        probs_y = pyro.sample("probs_y", dist.Beta(torch.tensor(0.1, dtype=D), torch.tensor(0.9, dtype=D))
                              .expand([hidden, hidden, data_dim]).to_event(3))
    return probs_w, probs_x, probs_y


def model_3(sequences, lengths, args, batch_size=None, include_prior=True):
    """A factorial HMM: two independent chains w and x emit y together."""
    num_sequences, max_length, data_dim = sequences.shape
    hidden = int(args.hidden_dim ** 0.5)
    probs_w, probs_x, probs_y = _factorial_priors(hidden, data_dim, include_prior, second_order=False)
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        w, x = 0, 0
        for t in pyro.markov(range(int(lengths.max()))):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                w = pyro.sample(f"w_{t}", dist.Categorical(probs_w[w]), infer={"enumerate": "parallel"})
                x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
                with tones_plate as tones:
                    pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[w, x, tones]), obs=sequences[batch, t])


def model_4(sequences, lengths, args, batch_size=None, include_prior=True):
    """Like model 3, but x_t depends on w_t too (Vindex)."""
    num_sequences, max_length, data_dim = sequences.shape
    hidden = int(args.hidden_dim ** 0.5)
    probs_w, probs_x, probs_y = _factorial_priors(hidden, data_dim, include_prior, second_order=True)
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        w = x = torch.tensor(0, dtype=torch.long)
        for t in pyro.markov(range(int(lengths.max()))):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                w = pyro.sample(f"w_{t}", dist.Categorical(probs_w[w]), infer={"enumerate": "parallel"})
                x = pyro.sample(f"x_{t}", dist.Categorical(Vindex(probs_x)[w, x]), infer={"enumerate": "parallel"})
                with tones_plate as tones:
                    pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[w, x, tones]), obs=sequences[batch, t])


class TonesGenerator(nn.Module):
    """A small network for p(y_t | x_t, y_{t-1}): logits from the one-hot state and a convolution of y."""

    def __init__(self, args, data_dim):
        super().__init__()
        self.args, self.data_dim = args, data_dim
        self.x_to_hidden = nn.Linear(args.hidden_dim, args.nn_dim).double()
        self.y_to_hidden = nn.Linear(args.nn_channels * data_dim, args.nn_dim).double()
        self.conv = nn.Conv1d(1, args.nn_channels, 3, padding=1).double()
        self.hidden_to_logits = nn.Linear(args.nn_dim, data_dim).double()

    def forward(self, x, y):
        x_onehot = y.new_zeros(x.shape[:-1] + (self.args.hidden_dim,)).scatter_(-1, x, 1)
        y_conv = torch.relu(self.conv(y.reshape(-1, 1, self.data_dim))).reshape(y.shape[:-1] + (-1,))
        h = torch.relu(self.x_to_hidden(x_onehot) + self.y_to_hidden(y_conv))
        return self.hidden_to_logits(h)


def model_5(sequences, lengths, args, batch_size=None, include_prior=True, net=None):
    """A neural network emits y_t from x_t and y_{t-1}: its weights get the gradient M-step."""
    num_sequences, max_length, data_dim = sequences.shape
    pyro.module("tones_generator", net)
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(args.hidden_dim, dtype=D) + 0.1).to_event(1))
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        x = 0
        y = torch.zeros(data_dim, dtype=D)
        for t in pyro.markov(range(int(lengths.max()))):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"})
                with pyro.plate(f"tones_{t}", data_dim, dim=-1):
                    y = pyro.sample(f"y_{t}", dist.Bernoulli(logits=net(x, y)), obs=sequences[batch, t])


def model_6(sequences, lengths, args, batch_size=None, include_prior=False):
    """A second-order chain, x_t depending on x_{t-1} and x_{t-2}, with pyro.params (no priors)."""
    num_sequences, max_length, data_dim = sequences.shape
    hidden = args.hidden_dim
    g = torch.Generator().manual_seed(0)
    probs_x = pyro.param("probs_x", lambda: torch.rand(hidden, hidden, hidden, generator=g, dtype=D),
                         constraint=constraints.simplex)
    probs_y = pyro.param("probs_y", lambda: torch.rand(hidden, data_dim, generator=g, dtype=D),
                         constraint=constraints.unit_interval)
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        x_curr, x_prev = torch.tensor(0), torch.tensor(0)
        for t in pyro.markov(range(int(lengths.max())), history=2):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                probs_x_t = Vindex(probs_x)[x_prev, x_curr]
                x_prev, x_curr = x_curr, pyro.sample(f"x_{t}", dist.Categorical(probs_x_t),
                                                     infer={"enumerate": "parallel"})
                with tones_plate:
                    pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[x_curr.squeeze(-1)]), obs=sequences[batch, t])


def model_7(sequences, lengths, args, batch_size=None, include_prior=True, net=None):
    """The chain as one DiscreteHMM site (its state dimension broadcasts from size 1), emissions by a network."""
    num_sequences, max_length, data_dim = sequences.shape
    pyro.module("tones_generator", net)
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(args.hidden_dim, dtype=D) + 0.1).to_event(1))
    with pyro.plate("sequences", num_sequences, batch_size, dim=-1) as batch:
        lengths = lengths[batch]
        y = sequences[batch, :int(lengths.max())]
        x = torch.arange(args.hidden_dim)
        t = torch.arange(y.size(1))
        init_logits = torch.full((args.hidden_dim,), -float("inf"), dtype=D)
        init_logits[0] = 0
        trans_logits = probs_x.log()
        obs_dist = dist.Bernoulli(logits=net(x, y.unsqueeze(-2))).to_event(1)
        obs_dist = obs_dist.mask((t < lengths.unsqueeze(-1)).unsqueeze(-1))
        pyro.sample("y", dist.DiscreteHMM(init_logits, trans_logits, obs_dist), obs=y)


HMM_MODELS = {0: model_0, 1: model_1, 2: model_2, 3: model_3, 4: model_4, 5: model_5, 6: model_6, 7: model_7}


# -- Pyro's Gaussian mixture tutorial and enumeration tutorial ---------------------------------------
@config_enumerate
def tutorial_gmm(data, K=2):
    """Dirichlet weights, a LogNormal scale shared by the components, Normal locations (all point-estimated)."""
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K, dtype=D)))
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=D), 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(torch.tensor(0.0, dtype=D), 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


@config_enumerate
def feature_plate_model(x, K=4, C=3):
    """A Dirichlet per (feature, component) inside a feature plate that the data share: a global, not a local."""
    data_plate = pyro.plate("data_plate", x.shape[-1], dim=-1)
    feature_plate = pyro.plate("feature_plate", x.shape[-2], dim=-2)
    component_plate = pyro.plate("component_plate", K, dim=-1)
    with feature_plate, component_plate:
        p = pyro.sample("p", dist.Dirichlet(2.0 * torch.ones(C, dtype=D)))
    with data_plate:
        c = pyro.sample("c", dist.Categorical(torch.ones(K, dtype=D) / K))
        with feature_plate as vdx:
            pc = Vindex(p)[vdx[..., None], c, :]
            pyro.sample("x", dist.Categorical(pc), obs=x)


def tutorial_hmm(data, data_dim, hidden_dim=3):
    """The enumeration tutorial's HMM: Dirichlet rows inside a hidden_state plate, a markov loop without a data plate."""
    with pyro.plate("hidden_state", hidden_dim):
        transition = pyro.sample("transition", dist.Dirichlet(2.0 * torch.ones(hidden_dim, dtype=D)))
        emission = pyro.sample("emission", dist.Dirichlet(2.0 * torch.ones(data_dim, dtype=D)))
    x = 0
    for t, y in pyro.markov(enumerate(data)):
        x = pyro.sample(f"x_{t}", dist.Categorical(transition[x]), infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Categorical(emission[x]), obs=y)


# -- Pyro's capture-recapture example (Cormack-Jolly-Seber), its first model ------------------------
def cjs_model_1(capture_history, sex):
    """phi and rho with flat priors; z_t alive or dead, masked before the first capture."""
    N, T = capture_history.shape
    phi = pyro.sample("phi", dist.Uniform(torch.tensor(0.0, dtype=D), 1.0))
    rho = pyro.sample("rho", dist.Uniform(torch.tensor(0.0, dtype=D), 1.0))
    with pyro.plate("animals", N, dim=-1):
        z = torch.ones(N, dtype=D)
        first_capture_mask = torch.zeros(N).bool()
        for t in pyro.markov(range(T)):
            with poutine.mask(mask=first_capture_mask):
                mu_z_t = first_capture_mask.to(D) * phi * z + (1 - first_capture_mask.to(D))
                z = pyro.sample(f"z_{t}", dist.Bernoulli(mu_z_t), infer={"enumerate": "parallel"})
                mu_y_t = rho * z
                pyro.sample(f"y_{t}", dist.Bernoulli(mu_y_t), obs=capture_history[:, t])
            first_capture_mask |= capture_history[:, t].bool()


def capture_histories(N=40, T=6, phi=0.7, rho=0.6, seed=0):
    """Synthetic capture histories (N, T) of 0/1 floats: each animal first caught at a random time."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, T - 1, (N,), generator=g)
    out = torch.zeros(N, T, dtype=D)
    for i in range(N):
        alive = True
        out[i, first[i]] = 1.0
        for t in range(int(first[i]) + 1, T):
            alive = alive and bool(torch.rand((), generator=g) < phi)
            out[i, t] = float(alive and bool(torch.rand((), generator=g) < rho))
    return out
