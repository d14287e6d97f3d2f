"""ppl_em: fit latent-variable models written as plain Pyro programs.

One model file, three ways to fit it: exact EM (:class:`EM`), SVI with ordinary guides,
and amortized (VAE-style) guides. :func:`select` chooses the number of components k by BIC,
AIC or held-out log-likelihood; :mod:`ppl_em.sklearn` (optional, needs scikit-learn) wraps a
mixture model file as a scikit-learn estimator. EM also runs on data that do not fit in memory
(numpy memory maps, DataLoaders: :class:`Rows`, :class:`Batches`), online (stepwise,
:class:`OnlineEM`) and over several processes (``EM(model, distributed=True)``:
:mod:`ppl_em.distributed`).
"""

from .em import EM, NonFiniteParameterError, StalledError
from .online import OnlineEM
from .sources import Batches, Rows
from .distributed import RankError
from .statistics import Statistics
from .posterior import ExactInferenceError, Posterior
from .fit import ConvergenceWarning, fit
from .result import FitResult, load
from .guides import AutoAmortized, AutoCategorical, ExactPosterior
from .svi import NonFiniteLossError, SafeSVI, default_loss
from .model_selection import Selection, select

__all__ = ["EM", "OnlineEM", "Rows", "Batches", "RankError", "Statistics", "ExactInferenceError",
           "NonFiniteParameterError", "StalledError", "Posterior",
           "ConvergenceWarning", "FitResult", "fit", "load",
           "AutoAmortized", "AutoCategorical", "ExactPosterior", "NonFiniteLossError", "SafeSVI", "default_loss",
           "Selection", "select"]
__version__ = "0.1.0"
