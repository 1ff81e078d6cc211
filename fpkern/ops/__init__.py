"""Score-FPE residual ops and their fused building blocks.

The fused jet rules live in their own modules, each op beside its reference:
fpkern.ops.jet_act (activations), fpkern.ops.group_norm_jet, fpkern.ops.group_norm_act (an
activation after a GroupNorm as one node keeping less), fpkern.ops.mlp_jet (the whole MLP,
Triton) and fpkern.ops.terms (the laplacian-form FPE terms). The div-form residual's
gradient: fpkern.ops.fused_div."""

from fpkern.ops._common import scalar_fpe_rhs
from fpkern.ops.combine import (fpe_combine, fpe_combine_ref, hutchinson_reduce,
                                hutchinson_reduce_ref)
from fpkern.ops.terms import combine_terms, combine_terms_ref
from fpkern.ops.probes import PROBE_DISTS, draw_probes
from fpkern.ops.residual import (FORMS, METHODS, FPETerms, fpe_residual, fpe_terms,
                                 hutchinson_divergence, laplacian, projected_residual)

__all__ = ["fpe_residual", "fpe_terms", "FPETerms", "projected_residual",
           "hutchinson_divergence", "laplacian", "scalar_fpe_rhs", "fpe_combine",
           "hutchinson_reduce", "combine_terms", "fpe_combine_ref", "hutchinson_reduce_ref",
           "combine_terms_ref", "draw_probes", "FORMS", "METHODS", "PROBE_DISTS"]
