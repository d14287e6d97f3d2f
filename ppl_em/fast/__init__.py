"""The speed layer beneath the algorithm: GEMM log-densities and sufficient statistics, contractions
without broadcast temporaries, a hidden Markov chain's recursions compiled by numba on the CPU
(:mod:`ppl_em.fast.recursions`, :mod:`ppl_em.fast.jit`), and the :class:`Workspace` of chunk-sized
tables that a pass hands down. The EM formulas (:mod:`ppl_em.families`) and the chains
(:mod:`ppl_em.chains`) call these; nothing here knows about EM."""

from .gaussian import FEATURE_ELEMENTS, centre, gaussian_sums, normal_sums, sufficient_stats
from .logprob import has_gemm_path, log_prob
from .tensors import broadcast_shape, compact, overlap, reduce_product
from .workspace import Workspace, new_table

__all__ = ["FEATURE_ELEMENTS", "Workspace", "broadcast_shape", "centre", "compact", "gaussian_sums",
           "has_gemm_path", "log_prob", "new_table", "normal_sums", "overlap", "reduce_product", "sufficient_stats"]
