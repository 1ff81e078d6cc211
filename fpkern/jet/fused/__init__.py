"""The fused jet-rule ops: one torch.library op each, with its torch reference beside it.

    jet_act          an activation's jet rule                       (fpkern::jet_act)
    group_norm_jet   GroupNorm's jet rule                           (fpkern::group_norm_jet)
    group_norm_act   act(GroupNorm(Jet)) as one autograd node       (composes the two above)
    mlp_jet          the whole MLP of fpkern.models.mlp on jets     (fpkern::mlp_jet)

mlp_jet_cpu is mlp_jet's CPU implementation, mlp_rows the MLP's row formulas and parameter
type, eager the eager-mode call path of the per-layer ops. Nothing is imported here: the
jet rules (fpkern.jet.rules) import each op when it first runs, so importing fpkern.jet
registers no op.
"""
