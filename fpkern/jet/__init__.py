"""Collapsed Taylor-mode jets: run a score network once on stacked derivative rows.

The package stands below the residual ops (fpkern.ops) and the models: it imports neither.
Its fused jet-rule ops live in fpkern.jet.fused and are imported on first use; a layer above
adds a whole-network rule with `register_rule`.
"""

from fpkern.jet.rules import composite_rules, kernels_enabled, register_rule
from fpkern.jet import rules_attention  # noqa: F401,E402  (registers the attention rules)
from fpkern.jet.tensor import Jet, JetUnsupported, Layout, locate

__all__ = ["Jet", "JetUnsupported", "Layout", "composite_rules", "kernels_enabled", "locate",
           "register_rule"]
