"""The speed layer beneath the algorithm: GEMM log-densities and sufficient statistics, contractions
without broadcast temporaries, a hidden Markov chain's recursions compiled by numba on the CPU
(:mod:`ppl_em.fast.recursions`, :mod:`ppl_em.fast.jit`), the :class:`Workspace` of chunk-sized
tables that a pass hands down (and of the threads that run its blocks of rows side by side), the :class:`Replay` of a model's run at new parameter values
(:mod:`ppl_em.fast.replay`) and the :class:`StepTape` of a whole closed-form EM step (:mod:`ppl_em.fast.tape`). The EM formulas (:mod:`ppl_em.families`) and the chains
(:mod:`ppl_em.chains`) call these; nothing here knows about EM."""

from .gaussian import (FEATURE_ELEMENTS, DiagonalFeatures, GaussianFeatures, centre, diag_features, gaussian_sums,
                       mvn_features, normal_sums, sufficient_stats)
from .logprob import has_gemm_path, log_prob
from .replay import Replay, signature
from .tape import StepTape
from .tensors import broadcast_shape, compact, normalise_exp, normalise_mode, overlap, reduce_product
from .workspace import Workspace, map_blocks, new_table, scratch

__all__ = ["FEATURE_ELEMENTS", "DiagonalFeatures", "GaussianFeatures", "Workspace", "broadcast_shape", "centre", "compact", "diag_features", "gaussian_sums",
           "has_gemm_path", "log_prob", "map_blocks", "mvn_features", "new_table", "normal_sums", "normalise_exp", "normalise_mode", "overlap", "Replay",
           "reduce_product", "scratch", "signature", "StepTape", "sufficient_stats"]
