"""Score-FPE residual ops: fpe_residual, fpe_terms, FPETerms, projected_residual,
hutchinson_divergence, laplacian, and the fused ops they are built from.

The log-density FPE of energy networks is log_density_fpe (fpkern.ops.log_density).
The residual methods live in exact, naive, forward_mode (the generic torch.func path) and
the fused ones: jet_pass (the network on Jets, fpkern.jet), fused_laplacian and fused_div.
Each torch.library op has its module beside its reference: fpe_combine, hutchinson_reduce
and laplacian_terms (the laplacian-form FPE terms in one pass). The fused jet-rule ops
(activations, GroupNorm, the whole MLP) are part of fpkern.jet.fused.
"""

from fpkern.ops._common import scalar_fpe_rhs
from fpkern.ops.fpe_combine import fpe_combine, fpe_combine_ref
from fpkern.ops.hutchinson_reduce import hutchinson_reduce, hutchinson_reduce_ref
from fpkern.ops.log_density import LogDensityFPE, log_density_fpe
from fpkern.ops.laplacian_terms import laplacian_terms, laplacian_terms_ref
from fpkern.ops.probes import PROBE_DISTS, draw_probes
from fpkern.ops.residual import (FORMS, METHODS, FPETerms, fpe_residual, fpe_terms,
                                 hutchinson_divergence, laplacian, projected_residual)

__all__ = ["fpe_residual", "fpe_terms", "FPETerms", "projected_residual",
           "hutchinson_divergence", "laplacian", "scalar_fpe_rhs", "fpe_combine",
           "hutchinson_reduce", "laplacian_terms", "fpe_combine_ref", "hutchinson_reduce_ref",
           "laplacian_terms_ref", "draw_probes", "FORMS", "METHODS", "PROBE_DISTS",
           "log_density_fpe", "LogDensityFPE"]
