"""fpkern: score-based diffusion with the score Fokker-Planck regulariser.

Importing fpkern compiles nothing and needs no GPU; the C++ extension and Triton are
loaded only when an op first runs on them (see fpkern.backend).
"""

from fpkern.sde import SDES, LinearSDE, SubVPSDE, VESDE, VPSDE, get_sde

__version__ = "0.1.0"

__all__ = ["SDES", "LinearSDE", "VESDE", "VPSDE", "SubVPSDE", "get_sde", "__version__"]
