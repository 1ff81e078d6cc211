"""Jet rules of attention: scaled_dot_product_attention, and the matrix products with an
added term (baddbmm, addmm, addbmm) that attention written out by hand uses.

Attention is composed exactly from the rules of its pieces (docs/MATH.md 8.1), on row
stacks, without a Jet per intermediate:

    S = scale Q K^T + M        matmul of two Jets: the Leibniz rule to second order
    P = softmax(S)             the softmax rule (fpkern.jet.rules.softmax_rows)
    out = P V                  Leibniz again

M is the mask: a boolean attn_mask (False: -inf) or the causal one adds -inf to the value
row only (the derivative rows there meet P = 0); an additive float mask is a constant,
or a Jet like any other summand. A query row with every key masked gives 0, as torch's math
backend does (its value row is replaced before the softmax, so no NaN reaches a gradient).
Dropout inside attention (dropout_p > 0) is refused: its mask is drawn inside the kernel,
where the rows cannot share it.
"""

from __future__ import annotations

import math

import torch

from fpkern.jet.rules import _broadcast_rows, _register, _wrap, layout_of, lift, softmax_rows
from fpkern.jet.tensor import Jet, JetUnsupported, Layout

__all__ = ["matmul_rows"]


def _rows(x, ndim: int):
    """(rows viewed for per-sample rank ndim, True) of a Jet; (x, False) of a constant."""
    if isinstance(x, Jet):
        return _broadcast_rows(x.rows, ndim), True
    return x, False


def _cross(A: torch.Tensor, B: torch.Tensor, L: Layout) -> torch.Tensor:
    """The second-order cross terms of A @ B for row stacks A, B, one per second-order row:
    A_a B_b + A_b B_a for each pair (a, b), then 2 mean_k A_k B_k over the collapsed rows."""
    parts = []
    if L.pairs:
        a = [i for i, _ in L.pairs]
        b = [j for _, j in L.pairs]
        parts.append(A[a] @ B[b] + A[b] @ B[a])
    if L.collapse:
        k = L.collapse_index
        parts.append(2 * (A[k] @ B[k]).mean(0, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def matmul_rows(p, q, L: Layout) -> torch.Tensor:
    """Rows of p @ q (operands of rank >= 2, batch dims broadcasting), each a Jet or a
    constant: linear in a single Jet, the Leibniz rule when both are."""
    nd = max(p.dim(), q.dim())
    P, p_jet = _rows(p, nd)
    Q, q_jet = _rows(q, nd)
    if not (p_jet and q_jet):
        return P @ Q                                  # the row axis broadcasts
    pq0 = P @ Q[0]                                    # P_r Q_0, every row r
    p0q = P[0] @ Q[1:]                                # P_0 Q_r, r >= 1
    rows = torch.cat([pq0[:1], pq0[1:] + p0q])
    if not (L.pairs or L.collapse):
        return rows
    second = rows[L.second] + _cross(P, Q, L)
    return torch.cat([rows[:L.second.start], second])


def _attention_args(args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
             "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    got = dict(zip(names, defaults))
    got.update(zip(names, args))
    unknown = set(kwargs) - set(names)
    if unknown:
        raise JetUnsupported(f"unknown arguments {sorted(unknown)}",
                             function="scaled_dot_product_attention")
    got.update(kwargs)
    return got


def _grouped(k, v, q, enable_gqa: bool):
    """Key and value heads repeated to the query's (grouped-query attention)."""
    if not enable_gqa or k.shape[-3] == q.shape[-3]:
        return k, v
    n = q.shape[-3] // k.shape[-3]
    return k.repeat_interleave(n, dim=-3), v.repeat_interleave(n, dim=-3)


def _transposed(x):
    """x^T over its last two dims; a Jet's rows in one view (no per-row map)."""
    if isinstance(x, Jet):
        return _wrap(x.rows.transpose(-2, -1), x.layout)
    return x.transpose(-2, -1)


def _scores(q, k, mask, is_causal: bool, scale, L: Layout):
    """Rows of S = scale q k^T + mask, and the bool of fully masked query rows (or None)."""
    S = matmul_rows(q * scale, _transposed(k), L)
    if not (isinstance(q, Jet) or isinstance(k, Jet)):  # constant scores, a Jet mask or value
        S = lift(S, L, S)
    if is_causal:
        Lq, Lk = S.shape[-2], S.shape[-1]
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=S.device).tril()
    if mask is None:
        return S, None
    if isinstance(mask, Jet):                         # an additive mask depending on x, t
        S = S + _broadcast_rows(mask.rows, S.dim() - 1)
    else:                                             # a constant: the value row only
        S0 = S[0].masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else S[0] + mask
        S = torch.cat([S0[None], S[1:].expand((S.shape[0] - 1,) + tuple(S0.shape))])
    full = torch.isneginf(S[0]).all(-1, keepdim=True)
    return S, full


def _check_dropout(p) -> None:
    if p != 0:
        raise JetUnsupported(
            "dropout inside attention draws its mask in the kernel, which the derivative "
            "rows cannot share; evaluate with dropout_p=0 (the module in eval mode)",
            function=f"scaled_dot_product_attention(dropout_p={p})")


@_register(["scaled_dot_product_attention"], modules=(torch.nn.functional,))
def _sdpa(func, args, kwargs):
    """softmax(scale Q K^T + M) V on Jets (module docstring), exact to second order."""
    a = _attention_args(args, kwargs)
    _check_dropout(a["dropout_p"])
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if a["is_causal"] and mask is not None:
        raise ValueError("scaled_dot_product_attention: attn_mask and is_causal=True are "
                         "exclusive (torch refuses both)")
    if min(q.dim(), k.dim(), v.dim()) < 2:
        raise JetUnsupported("query, key and value of rank < 2",
                             function="scaled_dot_product_attention")
    L = layout_of([o for o in (q, k, v, mask) if isinstance(o, Jet)])
    scale = a["scale"] if a["scale"] is not None else 1 / math.sqrt(q.shape[-1])
    k, v = _grouped(k, v, q, a["enable_gqa"])
    S, full = _scores(q, k, mask, a["is_causal"], scale, L)
    y = None
    if full is not None and bool(full.any()):
        y = torch.softmax(S[0].masked_fill(full, 0.0), dim=-1).masked_fill(full, 0.0)
    P = softmax_rows(S, L, -1, y)
    return _wrap(matmul_rows(_wrap(P, L), v, L), L)


def _mm_plus(func, kwargs, inp, m1, m2, *, reduce_batch: bool):
    """beta inp + alpha m1 @ m2 (summed over the batch for addbmm); inp is ignored when
    beta is 0, as torch ignores it (baddbmm on torch.empty in attention scores)."""
    beta, alpha = kwargs.pop("beta", 1), kwargs.pop("alpha", 1)
    if kwargs:
        raise JetUnsupported(f"arguments {sorted(kwargs)}", function=func.__name__)
    L = layout_of([o for o in (inp, m1, m2) if isinstance(o, Jet)])
    if isinstance(m1, Jet) or isinstance(m2, Jet):
        rows = alpha * matmul_rows(m1, m2, L)
        if reduce_batch:
            rows = rows.sum(1)
        out = _wrap(rows, L)
    else:
        out = alpha * (m1 @ m2).sum(0) if reduce_batch else alpha * (m1 @ m2)
    return out if beta == 0 else out + beta * inp


_OPERANDS = {"baddbmm": ("input", "batch1", "batch2"), "addbmm": ("input", "batch1", "batch2"),
             "addmm": ("input", "mat1", "mat2")}


@_register(list(_OPERANDS), modules=(torch, torch.Tensor))
def _baddbmm(func, args, kwargs):
    kwargs = dict(kwargs)
    names = _OPERANDS[func.__name__]
    ops = list(args[:3]) + [kwargs.pop(n) for n in names[len(args[:3]):] if n in kwargs]
    if len(ops) != 3:
        raise TypeError(f"{func.__name__} needs {', '.join(names)}")
    for name, value in zip(("beta", "alpha"), args[3:5]):    # old positional beta, alpha
        kwargs.setdefault(name, value)
    return _mm_plus(func, kwargs, *ops, reduce_batch=func.__name__ == "addbmm")
