"""Collapsed Taylor-mode jets: run a score network once on stacked derivative rows."""

from fpkern.jet.rules import composite_rules, kernels_enabled
from fpkern.jet.tensor import Jet, JetUnsupported, Layout

__all__ = ["Jet", "JetUnsupported", "Layout", "composite_rules", "kernels_enabled"]
