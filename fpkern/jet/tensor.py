"""Jets: a tensor together with its Taylor coefficients, stacked as rows (collapsed Taylor mode).

A Jet of per-sample shape [B, ...] stores ``rows`` of shape [R, B, ...]:

    row 0                    the value
    rows 1 .. n1             first-order coefficients (one tangent direction each)
    then one row per pair    mixed second-order coefficients d^2/(de_a de_b), pairs (a, b)
    then (optionally) one    the *collapsed* second-order row: the average over the
                             first-order directions in ``collapse`` of d^2/de_k^2

Running a network on Jets (the class is a torch.Tensor subclass intercepting every torch
function) pushes all rows through each layer at once: a linear layer is one call over R * B
samples; a nonlinearity applies its second-order rule to all rows in one expression.
The computations are ordinary torch ops on the rows, so autograd differentiates through
them (parameter gradients, and reverse passes for the div-form residual).

With the input x carrying rows (x, v_1..v_K, 0) and collapse = (1..K), the output carries
(s, J v_1 .. J v_K, 1/K sum_k D^2_{v_k} s): the Hutchinson Laplacian in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Layout", "Jet", "JetUnsupported", "locate"]


class JetUnsupported(NotImplementedError):
    """A torch function without a jet rule was called on a Jet.

    `function` names the call, with the arguments that made it unsupported where a rule
    refuses some ("scaled_dot_product_attention(dropout_p=0.1)"); `module` is the nn.Module
    that called it, as its path in the outermost module running ("down_blocks.1.attentions.0
    (Attention)"), once a jet pass has located it (`locate`). The message starts with both.
    """

    def __init__(self, reason: str, function: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.function = function
        self.module: str | None = None

    def __str__(self) -> str:
        head = ": ".join(p for p in (self.module, self.function) if p)
        return f"{head}: {self.reason}" if head else self.reason


def _modules_on(tb) -> list[torch.nn.Module]:
    """The nn.Modules whose call is on traceback `tb`, outermost first."""
    found: list[torch.nn.Module] = []
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in ("_call_impl", "forward"):
            m = frame.f_locals.get("self")
            if isinstance(m, torch.nn.Module) and not any(m is f for f in found):
                found.append(m)
        tb = tb.tb_next
    return found


def locate(exc: JetUnsupported) -> JetUnsupported:
    """Set exc.module from the traceback of a raised JetUnsupported: the innermost module
    running when the unsupported function was called, named by its path in the outermost
    one (its class name alone when it is the outermost or not a submodule of it). Costs
    nothing until a rule is missing: it reads the frames, no hooks."""
    if exc.module is not None:
        return exc
    modules = _modules_on(exc.__traceback__)
    if modules:
        inner = modules[-1]
        path = next((n for n, m in modules[0].named_modules() if m is inner), "")
        exc.module = f"{path} ({type(inner).__name__})" if path else type(inner).__name__
    return exc


@dataclass(frozen=True)
class Layout:
    """Which rows a Jet has: n1 first-order rows, mixed pairs, an optional collapsed row."""

    n1: int
    pairs: tuple[tuple[int, int], ...] = ()
    collapse: tuple[int, ...] = ()

    def __post_init__(self):
        for a, b in self.pairs:
            if not (1 <= a <= self.n1 and 1 <= b <= self.n1):
                raise ValueError(f"pair {(a, b)} names a first-order row outside 1..{self.n1}")
        if any(not 1 <= k <= self.n1 for k in self.collapse):
            raise ValueError(f"collapse {self.collapse} names a row outside 1..{self.n1}")

    @property
    def rows(self) -> int:
        return 1 + self.n1 + len(self.pairs) + (1 if self.collapse else 0)

    @property
    def first(self) -> slice:
        return slice(1, 1 + self.n1)

    @property
    def second(self) -> slice:
        return slice(1 + self.n1, self.rows)

    def pair_row(self, i: int) -> int:
        return 1 + self.n1 + i

    @property
    def collapse_index(self):
        """The collapsed rows as a slice when contiguous (a view), else a list."""
        k = self.collapse
        if list(k) == list(range(k[0], k[0] + len(k))):
            return slice(k[0], k[0] + len(k))
        return list(k)

    @property
    def collapsed_row(self) -> int | None:
        return self.rows - 1 if self.collapse else None

    @property
    def kernel_spec(self) -> tuple[int, tuple[int, ...], tuple[int, ...], int, int] | None:
        """The layout as fused jet kernels take it: (n1, pair_a, pair_b, c0, nc).

        Rows: 0 value, 1..n1 first order, then one row per pair (pair_a[j], pair_b[j]), then
        (when nc > 0) the collapsed row averaging d^2 over rows c0 .. c0 + nc - 1. None when
        the collapsed rows are not contiguous (kernels then leave the rule to torch).
        """
        if self.collapse and not isinstance(self.collapse_index, slice):
            return None
        a = tuple(p[0] for p in self.pairs)
        b = tuple(p[1] for p in self.pairs)
        c0 = self.collapse[0] if self.collapse else 0
        return self.n1, a, b, c0, len(self.collapse)


class Jet(torch.Tensor):
    """A torch.Tensor subclass whose value is ``rows[0]`` and which carries all its rows.

    The tensor itself is a detached view of the value (it gives shape, dtype and device);
    every computation goes through ``__torch_function__`` and the jet rules in
    fpkern.jet.rules, which read and write ``rows``. A rule may record in ``_source`` how
    it made the rows, for a consumer rule that fuses with it (GroupNorm -> activation).
    """

    _rows: torch.Tensor
    _source: tuple | None = None
    _layout: Layout

    @staticmethod
    def __new__(cls, rows: torch.Tensor, layout: Layout):
        if rows.shape[0] != layout.rows:
            raise ValueError(f"layout has {layout.rows} rows, got a tensor with {rows.shape[0]}")
        shell = torch.Tensor._make_subclass(cls, rows.detach()[0], False)   # no autograd view
        shell._rows = rows
        shell._layout = layout
        return shell

    @property
    def rows(self) -> torch.Tensor:
        return self._rows

    @property
    def layout(self) -> Layout:
        return self._layout

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from fpkern.jet.rules import dispatch
        return dispatch(func, args, kwargs or {})

    def __repr__(self) -> str:
        return f"Jet(shape={tuple(self.shape)}, layout={self._layout})"
