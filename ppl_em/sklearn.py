"""scikit-learn estimators: ppl_em's mixture models in ``Pipeline``, ``GridSearchCV`` and ``clone``.

:class:`MixtureEstimator` wraps any Pyro model called as ``model(x, k, **model_kwargs)`` whose
data x are rows x^(1), ..., x^(n) (an array of shape (n_samples, n_features)) and whose one
discrete latent z^(i) per row picks the component: the Gaussian mixture ``"gmm"``,
``"kmeans"``, ``"bernoulli_mixture"``, ``"poisson_mixture"`` of :mod:`ppl_em.models`, or a
model of your own. It fits theta by :func:`ppl_em.fit` (EM by default) and answers in
scikit-learn's vocabulary, with the names of :class:`sklearn.mixture.GaussianMixture` where
they mean the same:

============================  =================================================================
``predict_proba(X)``          the responsibilities w_j^(i) = p(z^(i) = j | x^(i); theta), (n, k)
``predict(X)``                argmax_j w_j^(i), (n,)
``score_samples(X)``          log p(x^(i); theta) = log sum_j p(x^(i), z^(i) = j; theta), (n,)
``score(X)``                  (1/n) sum_i log p(x^(i); theta), the mean log-likelihood
``bic(X)``, ``aic(X)``        -2 l(theta) + p log n, -2 l(theta) + 2 p (lower is better)
``sample(n_samples)``         (X, y): rows x and their components z drawn from the fitted model
============================  =================================================================

Because ``score`` is the mean log-likelihood, ``GridSearchCV(MixtureEstimator(), {"n_components":
...})`` chooses k by held-out (cross-validated) log-likelihood; pass ``scoring=bic_scorer`` to
choose by the BIC of each held-out fold (at the parameters fitted on the other folds), as in
scikit-learn's own GMM selection example.

scikit-learn is an optional dependency: ``pip install ppl_em[sklearn]``.

References: scikit-learn's ``sklearn.mixture.GaussianMixture`` and its developer guide
("Developing scikit-learn estimators"); lecture notes, "Gaussian Mixture Model", "EM algorithm".
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

try:
    from sklearn.base import BaseEstimator, DensityMixin
    from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as e:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError("ppl_em.sklearn needs scikit-learn >= 1.6, which is not installed: "
                      "pip install 'ppl_em[sklearn]' (or pip install scikit-learn).") from e

import numpy as np
import pyro
import pyro.poutine as poutine
import pyro.util
import torch
from pyro.distributions import constraints
from pyro.poutine.util import prune_subsample_sites

from .fit import ConvergenceWarning as _PplConvergenceWarning
from .fit import fit as _fit
from .em import EM
from .result import FitResult

__all__ = ["MixtureEstimator", "ConvergenceWarning", "bic_scorer", "aic_scorer", "ROW_MODELS", "INIT_PARAMS"]

# Models of ppl_em.models.REGISTRY called as model(x, k) on rows x of shape (n, d).
ROW_MODELS = ("gmm", "kmeans", "bernoulli_mixture", "poisson_mixture")
# scikit-learn's names for the initialisations that mean the same as ppl_em.fit's, plus ppl_em's "prior".
INIT_PARAMS = {"k-means++": "kmeans++", "random_from_data": "random", "prior": "prior"}


class ConvergenceWarning(_PplConvergenceWarning, _SklearnConvergenceWarning):
    """The fit stopped at ``max_iter`` before the mean log-likelihood settled to within ``tol``.

    Both :class:`ppl_em.ConvergenceWarning` and :class:`sklearn.exceptions.ConvergenceWarning`,
    so a filter on either one catches it.
    """


def bic_scorer(estimator: Any, X: Any, y: Any = None) -> float:
    """-BIC of a fitted estimator on X: a ``scoring`` for ``GridSearchCV`` (higher is better).

    Works for any estimator with a ``bic(X)`` method, :class:`sklearn.mixture.GaussianMixture`
    included, so both search the same criterion, and for a ``Pipeline`` that ends in one: X
    then goes through the earlier steps first. (The BIC of transformed data differs from that
    of X by the log-Jacobian of the transformation, the same for every k, so the chosen k
    does not depend on it.)
    """
    estimator, X = _final_step(estimator, X)
    return -float(estimator.bic(X))


def aic_scorer(estimator: Any, X: Any, y: Any = None) -> float:
    """-AIC of a fitted estimator on X: a ``scoring`` for ``GridSearchCV`` (higher is better); see :func:`bic_scorer`."""
    estimator, X = _final_step(estimator, X)
    return -float(estimator.aic(X))


def _final_step(estimator: Any, X: Any) -> Tuple[Any, Any]:
    """The last step of a Pipeline and X transformed by the steps before it (the estimator itself otherwise)."""
    if hasattr(estimator, "steps") and len(estimator.steps) > 1:
        return estimator[-1], estimator[:-1].transform(X)
    return estimator, X


class MixtureEstimator(DensityMixin, BaseEstimator):
    """A mixture model written in Pyro, as a scikit-learn density estimator.

    The model is a plain Pyro program called as ``model(x, k, **model_kwargs)`` with the data x
    of shape (n, d) and one discrete latent z^(i) in {0, ..., k - 1} per row; for the Gaussian
    mixture, z^(i) ~ Multinomial(phi) and x^(i) | z^(i) = j ~ N(mu_j, Sigma_j). ``fit`` runs
    :func:`ppl_em.fit`, by exact EM unless ``method`` says otherwise.

    Parameters
    ----------
    model : str or callable, default="gmm"
        A name of :data:`ROW_MODELS` (``"gmm"``, ``"kmeans"``, ``"bernoulli_mixture"``,
        ``"poisson_mixture"``, from :mod:`ppl_em.models`) or a Pyro model called as
        ``model(x, k, **model_kwargs)``.
    n_components : int, default=1
        k, the number of mixture components.
    method : {"em", "hard_em", "svi", "vae"}, default="em"
        How theta is fitted (:func:`ppl_em.fit`). Predictions and scores always use the exact
        posterior and log-likelihood at the fitted theta.
    covariance_type : {"full", "diag", "spherical", "tied"}, default=None
        For the Gaussian mixture: the structure of Sigma_j, as in ``GaussianMixture``; None
        keeps the model's default ("full" for ``"gmm"``). Only for models with a
        ``covariance_type`` argument.
    n_init : int, default=1
        Restarts; the one with the highest log-likelihood is kept.
    init_params : {"k-means++", "random_from_data", "prior"}, default="k-means++"
        How the component locations start: k rows of X chosen by k-means++ seeding or
        uniformly at random (``GaussianMixture``'s "k-means++" and "random_from_data"), or
        the model's own initial values ("prior").
    max_iter : int, default=100
        Iterations per restart.
    tol : float, default=1e-3
        Convergence threshold on the change of the mean log-likelihood per sample (the mean
        loss per observation for SVI), as in ``GaussianMixture``.
    reg_covar : float, default=1e-6
        Added to the diagonal of every covariance estimate (EM and hard EM).
    random_state : int, RandomState instance or None, default=None
        Seed of the initialisation, the restarts and :meth:`sample`. An int makes ``fit``
        deterministic; None draws a seed from NumPy's global random state.
    model_kwargs : dict, default=None
        Further keyword arguments of the model, e.g. ``{"metric": "cosine"}`` for k-means.

    Attributes
    ----------
    params_ : dict of str to ndarray
        Every fitted parameter of the model, constrained, e.g. ``phi`` (k,), ``mu`` (k, d),
        ``Sigma`` (layout of ``covariance_type``) for the GMM.
    weights_ : ndarray of shape (n_components,)
        The mixture weights phi_j (for the models of :data:`ROW_MODELS`; k-means' are 1/k).
    means_ : ndarray of shape (n_components, n_features)
        The component means mu_j (Gaussian models: ``"gmm"``, ``"kmeans"``).
    covariances_ : ndarray
        Sigma_j in ``GaussianMixture``'s layout (Gaussian models): (k, d, d) for "full",
        (k, d) for "diag", (k,) for "spherical", (d, d) for "tied"; k-means' fixed
        sigma^2 I in the spherical layout (k,).
    converged_ : bool
        Whether the kept restart converged within ``max_iter``.
    n_iter_ : int
        Iterations of the kept restart.
    lower_bound_ : float
        The exact mean log-likelihood (1/n) log p(x; theta) of the training data at the fitted
        theta (for EM it is where the ELBO touches log p(x)).
    n_features_in_ : int
        d, the number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names, when X is a DataFrame with string column names.
    result_ : FitResult
        The fit itself (:class:`ppl_em.FitResult`), without the training data and the guide.

    Notes
    -----
    The estimator passes scikit-learn's ``check_estimator``: the test suite runs all of its
    checks (41 with scikit-learn 1.9) for several configurations, none skipped; the NumPy
    array-API check, which scikit-learn skips unless ``SCIPY_ARRAY_API=1``, runs with it set.
    The checks that do not apply are those scikit-learn yields only for other estimators:

    * classifier, regressor, transformer, clusterer and outlier-detector checks: a mixture is
      a density estimator, like ``GaussianMixture`` (not a ``ClusterMixin``: there is no
      ``labels_``; :meth:`fit_predict` is a convenience);
    * the ``sample_weight`` checks: ``fit`` takes no ``sample_weight``;
    * ``check_requires_y_none``: ``fit`` needs no y;
    * ``check_fit_non_negative``: only for estimators tagged ``positive_only`` (the Poisson
      and Bernoulli models check their own data and say what they expected);
    * the array-API checks beyond NumPy input: the estimator does not declare array-API
      support (it converts X to a float64 tensor).

    Fitting uses Pyro's global param store inside a private scope and leaves it as it was; two
    estimators do not share parameters. Parallel searches (``GridSearchCV(n_jobs=...)``) must
    use processes (the default ``loky`` backend), not threads, because the store is global.

    Examples
    --------
    >>> import numpy as np
    >>> from ppl_em.sklearn import MixtureEstimator
    >>> rng = np.random.RandomState(0)
    >>> X = np.vstack([rng.normal(-4, 1, (60, 2)), rng.normal(4, 1, (60, 2))])   # (120, 2)
    >>> gm = MixtureEstimator(n_components=2, random_state=0).fit(X)
    >>> gm.means_.round(0) + 0.0
    array([[-4., -4.],
           [ 4.,  4.]])
    >>> gm.predict_proba(X).shape, gm.converged_
    ((120, 2), True)
    """

    def __init__(self, model: Any = "gmm", n_components: int = 1, *, method: str = "em",
                 covariance_type: Optional[str] = None, n_init: int = 1, init_params: str = "k-means++",
                 max_iter: int = 100, tol: float = 1e-3, reg_covar: float = 1e-6, random_state: Any = None,
                 model_kwargs: Optional[Dict[str, Any]] = None) -> None:
        self.model = model
        self.n_components = n_components
        self.method = method
        self.covariance_type = covariance_type
        self.n_init = n_init
        self.init_params = init_params
        self.max_iter = max_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self.random_state = random_state
        self.model_kwargs = model_kwargs

    # -- fitting --------------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None) -> "MixtureEstimator":
        """Fit theta to the rows of X by ``method`` (exact EM by default).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The data x^(1), ..., x^(n).
        y : Ignored
            Not used, present for API consistency by convention.

        Returns
        -------
        self : MixtureEstimator
            The fitted estimator.

        Warns
        -----
        ConvergenceWarning
            If the kept restart stopped at ``max_iter`` before the change of the mean
            log-likelihood fell below ``tol``.
        """
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        model, kwargs = self._model_and_kwargs()
        k = self._check_n_components(X.shape[0])
        if self.init_params not in INIT_PARAMS:
            raise ValueError(f"init_params must be one of {tuple(INIT_PARAMS)}, got {self.init_params!r}.")
        x = torch.tensor(X, dtype=torch.float64)
        result = self._fit_result(model, x, k, kwargs)
        self._set_fitted(result, model, x, k, kwargs)
        if not result.converged:
            stopped = result.restarts[result.best].get("stopped")
            why = f"it stopped: {stopped}" if stopped else f"it reached max_iter={self.max_iter}"
            warnings.warn(f"{type(self).__name__} did not converge ({why}; tol={self.tol} on the change of the "
                          "mean log-likelihood per sample). Increase max_iter, loosen tol, or try more "
                          "initialisations (n_init).", ConvergenceWarning, stacklevel=2)
        return self

    def _fit_result(self, model: Callable, x: torch.Tensor, k: int, kwargs: dict) -> FitResult:
        """:func:`ppl_em.fit` with this estimator's options, in a param store of its own."""
        em_options = {"reg_covar": self.reg_covar} if self.method in ("em", "hard_em") else None
        with pyro.get_param_store().scope(), warnings.catch_warnings():  # the user's store is left as it was
            warnings.simplefilter("ignore", _PplConvergenceWarning)  # fit() warns instead, as scikit-learn does
            return _fit(model, x, k, method=self.method, max_iter=self.max_iter, tol=self.tol, n_init=self.n_init,
                        init=INIT_PARAMS[self.init_params], seed=self._seed(), progress=False,
                        em_options=em_options, **kwargs)

    def _set_fitted(self, result: FitResult, model: Callable, x: torch.Tensor, k: int, kwargs: dict) -> None:
        """The fitted attributes (ending in ``_``), the result kept without the training data."""
        self.result_ = dataclasses.replace(result, args=(), kwargs={}, guide=None)
        self._model_, self._model_kwargs_, self._k_ = model, kwargs, k
        self._latent_site_, self._observed_site_ = _sites(model, x, k, kwargs, result.state)
        names = _model_params(model, x, k, kwargs, result.state)
        self.params_ = {name: result.params[name].cpu().numpy() for name in names}
        for name, value in _named_attributes(model, self.params_, k, kwargs).items():
            setattr(self, name, value)
        self.converged_, self.n_iter_ = bool(result.converged), int(result.n_iter)
        self.lower_bound_ = float(result.log_likelihood)

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """Fit, then label each row of X by its most probable component: ``fit(X).predict(X)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        return self.fit(X, y).predict(X)

    # -- posterior and likelihood ---------------------------------------------------------
    def predict_proba(self, X: Any) -> np.ndarray:
        """The responsibilities w_j^(i) = p(z^(i) = j | x^(i); theta), by one exact E-step.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        resp : ndarray of shape (n_samples, n_components)
            Each row sums to one.
        """
        x = self._validated(X)
        resp = self.result_.predict_proba(x, self._k_, site=self._latent_site_, **self._model_kwargs_)
        return resp.detach().cpu().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """The most probable component of each row, argmax_j w_j^(i).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        return self.predict_proba(X).argmax(axis=1)

    def score_samples(self, X: Any) -> np.ndarray:
        """log p(x^(i); theta) = log sum_j p(x^(i), z^(i) = j; theta) for every row of X.

        Each column j of log p(x^(i), z^(i) = j; theta) comes from one run of the model with
        z conditioned on j; the rows are then summed out with a log-sum-exp. This is computed
        independently of the E-step that :meth:`score` uses.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        log_prob : ndarray of shape (n_samples,)
        """
        x = self._validated(X)
        log_joint = _log_joint_by_component(self._model_, x, self._k_, self._model_kwargs_,
                                            self._latent_site_, self.result_.state)  # (n, k)
        return torch.logsumexp(log_joint, dim=-1).cpu().numpy()

    def score(self, X: Any, y: Any = None) -> float:
        """The mean log-likelihood (1/n) sum_i log p(x^(i); theta) of the rows of X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        log_likelihood : float
            Higher is better, which is what ``GridSearchCV`` maximises by default.
        """
        x = self._validated(X)
        return float(self.result_.score(x, self._k_, **self._model_kwargs_))

    def bic(self, X: Any) -> float:
        """Bayesian information criterion -2 log p(x; theta) + p log n on X (lower is better).

        p is the number of free parameters of the model (for the full-covariance GMM,
        k - 1 + k d + k d (d + 1) / 2, the count ``GaussianMixture`` uses).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        bic : float
        """
        x = self._validated(X)
        return float(self.result_.bic(x, self._k_, **self._model_kwargs_))

    def aic(self, X: Any) -> float:
        """Akaike information criterion -2 log p(x; theta) + 2 p on X (lower is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        aic : float
        """
        x = self._validated(X)
        return float(self.result_.aic(x, self._k_, **self._model_kwargs_))

    def sample(self, n_samples: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        """Draw rows from the fitted model: z^(i) ~ Multinomial(phi), then x^(i) | z^(i).

        Parameters
        ----------
        n_samples : int, default=1

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
            The drawn rows x^(i).
        y : ndarray of shape (n_samples,)
            Their components z^(i). Unlike ``GaussianMixture.sample``, not sorted.
        """
        check_is_fitted(self)
        if not (isinstance(n_samples, numbers.Integral) and n_samples >= 1):
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}.")
        if self._observed_site_ is None:
            raise ValueError("sample() needs a model with one observed site, the rows x; this model has several.")
        placeholder = torch.ones((1, self.n_features_in_), dtype=torch.float64)
        seed = None if self.random_state is None else self._seed()
        rng = pyro.util.get_rng_state()  # a seeded draw must not move the caller's random streams
        try:
            draws = self.result_.sample(int(n_samples), placeholder, self._k_, seed=seed,
                                        **self._model_kwargs_)
        finally:
            if seed is not None:
                pyro.util.set_rng_state(rng)
        X = draws[self._observed_site_].reshape(n_samples, -1).cpu().numpy()
        return X, draws[self._latent_site_].reshape(n_samples).cpu().numpy()

    # -- helpers --------------------------------------------------------------------------
    def _validated(self, X: Any) -> torch.Tensor:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return torch.tensor(X, dtype=torch.float64)

    def _seed(self) -> int:
        if isinstance(self.random_state, numbers.Integral):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _check_n_components(self, n_samples: int) -> int:
        k = self.n_components
        if not (isinstance(k, numbers.Integral) and k >= 1):
            raise ValueError(f"n_components must be an integer >= 1, got {k!r}.")
        if k > n_samples:
            raise ValueError(f"Expected n_samples >= n_components but got n_components = {k}, "
                             f"n_samples = {n_samples}. Use fewer components or more data.")
        return int(k)

    def _model_and_kwargs(self) -> Tuple[Callable, Dict[str, Any]]:
        """The model function and its keyword arguments beyond (x, k)."""
        model = resolve_model(self.model)
        kwargs = dict(self.model_kwargs or {})
        for reserved in ("k", "x", "covariance_type"):
            if reserved in kwargs:
                raise ValueError(f"model_kwargs must not contain {reserved!r}: the estimator passes it "
                                 f"(use n_components for k, the covariance_type parameter, X for x).")
        if self.covariance_type is not None:
            if "covariance_type" not in inspect.signature(model).parameters:
                raise ValueError(f"covariance_type={self.covariance_type!r} was given, but the model "
                                 f"{_name(model)} has no covariance_type argument. Leave covariance_type=None "
                                 "for models other than the Gaussian mixture ('gmm').")
            kwargs["covariance_type"] = self.covariance_type
        return model, kwargs

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Unpickle; constraints come back as fresh objects and are mapped to Pyro's own."""
        super().__setstate__(state)
        result = self.__dict__.get("result_")
        if isinstance(result, FitResult) and result.state:
            result.state["constraints"] = {n: _canonical(c) for n, c in result.state["constraints"].items()}


# -- models ---------------------------------------------------------------------------------
def resolve_model(model: Any) -> Callable:
    """The model function for ``MixtureEstimator(model=...)``: a name of :data:`ROW_MODELS` or a callable."""
    from .models import REGISTRY

    if callable(model):
        return model
    if isinstance(model, str) and model in ROW_MODELS:
        return REGISTRY[model]["model"]
    if isinstance(model, str) and model in REGISTRY:
        raise ValueError(f"model {model!r} does not take rows x of shape (n, d) with one latent per row, which "
                         f"MixtureEstimator needs; models that do: {', '.join(ROW_MODELS)}. Fit {model!r} with "
                         "ppl_em.fit, and choose its k with ppl_em.select.")
    raise ValueError(f"model must be one of {ROW_MODELS} or a Pyro model called as model(x, k, ...), "
                     f"got {model!r}.")


def _name(model: Callable) -> str:
    return f"{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', repr(model))}"


def _state_copy(state: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """A store state to scope into (``scope`` writes back into the dict it is given)."""
    return {"params": {n: v.detach().clone() for n, v in state["params"].items()},
            "constraints": dict(state["constraints"])}


def _trace(model: Callable, x: torch.Tensor, k: int, kwargs: dict, state: dict, data: Optional[dict] = None):
    """One run of the model at the fitted theta, with the sites in ``data`` conditioned."""
    conditioned = poutine.condition(model, data=data) if data else model
    with pyro.get_param_store().scope(_state_copy(state)), poutine.block(), torch.no_grad():
        return prune_subsample_sites(poutine.trace(conditioned).get_trace(x, k, **kwargs))


def _model_params(model: Callable, x: torch.Tensor, k: int, kwargs: dict, state: dict):
    tr = _trace(model, x, k, kwargs, state)
    return [name for name, site in tr.nodes.items() if site["type"] == "param" and name in state["params"]]


def _sites(model: Callable, x: torch.Tensor, k: int, kwargs: dict, state: dict) -> Tuple[str, Optional[str]]:
    """(the one discrete latent site z, the one observed site x or None), checked to fit the estimator."""
    with pyro.get_param_store().scope(_state_copy(state)), poutine.block():
        post = EM(model).e_step(x, k, **kwargs)
    latents = post.enumerated_sites
    if len(latents) != 1 or tuple(post.marginal(latents[0]).shape) != (x.shape[0], k):
        shapes = {name: tuple(post.marginal(name).shape) for name in latents}
        raise ValueError(f"MixtureEstimator needs a model with one discrete latent z^(i) per row, whose posterior "
                         f"has shape (n_samples, n_components) = {(x.shape[0], k)}; {_name(model)} has {shapes}. "
                         "Fit other models with ppl_em.fit.")
    observed = [n for n, s in prune_subsample_sites(post.trace).nodes.items()
                if s["type"] == "sample" and s["is_observed"]]
    return latents[0], observed[0] if len(observed) == 1 else None


def _log_joint_by_component(model: Callable, x: torch.Tensor, k: int, kwargs: dict, site: str,
                            state: dict) -> torch.Tensor:
    """log p(x^(i), z^(i) = j; theta), shape (n, k): the model run once per j with z conditioned."""
    n = x.shape[0]
    columns = []
    for j in range(k):
        tr = _trace(model, x, k, kwargs, state, data={site: torch.full((n,), j, dtype=torch.long)})
        tr.compute_log_prob()
        terms = {name: s["log_prob"] for name, s in tr.nodes.items() if s["type"] == "sample"}
        wrong = {name: tuple(t.shape) for name, t in terms.items() if tuple(t.shape) != (n,)}
        if wrong:
            raise ValueError(f"score_samples needs every sample site of the model inside one data plate of size "
                             f"n_samples = {n} (a log-probability per row); got shapes {wrong}. Use score() for the "
                             "mean log-likelihood of such a model.")
        columns.append(sum(terms.values()))
    return torch.stack(columns, dim=-1)  # (n, k)


def _named_attributes(model: Callable, params: Dict[str, np.ndarray], k: int, kwargs: dict) -> Dict[str, Any]:
    """``GaussianMixture``'s attribute names for the models of :data:`ROW_MODELS`."""
    from .models import bernoulli_mixture, gmm, kmeans, poisson_mixture

    if model is gmm.model:
        return {"weights_": params["phi"], "means_": params["mu"], "covariances_": params["Sigma"]}
    if model is kmeans.model:
        scale = float(kwargs.get("scale", 1.0))
        return {"weights_": np.full(k, 1.0 / k), "means_": params["mu"], "covariances_": np.full(k, scale ** 2)}
    if model is bernoulli_mixture.model or model is poisson_mixture.model:
        return {"weights_": params["phi"]}
    return {}


def _canonical(c: constraints.Constraint) -> constraints.Constraint:
    """The module-level constraint object equal to ``c`` (unpickling makes copies; some code compares by identity)."""
    if isinstance(c, constraints.independent):
        return constraints.independent(_canonical(c.base_constraint), c.reinterpreted_batch_ndims)
    for name in dir(constraints):
        value = getattr(constraints, name)
        if isinstance(value, constraints.Constraint) and type(value) is type(c) and vars(value).keys() == vars(c).keys():
            try:
                same = all(bool(np.all(vars(value)[a] == vars(c)[a])) for a in vars(c))
            except (TypeError, RuntimeError, ValueError):
                same = False
            if same:
                return value
    return c
