"""The independent reference for jet rules: a function's Taylor rows by nested torch.func.jvp."""

import torch
from torch.func import jvp


def nested_jvp_rows(fn, rows, layout):
    """The rows of fn(Jet(rows, layout)) computed by nested jvp, second-order input rows
    included: value fn(x), first order J r_i, pair rows J r_q + D^2 fn[r_a, r_b], collapsed
    J r_z + mean_k D^2 fn[r_k, r_k]."""
    x = rows[0]
    lin = lambda r: jvp(fn, (x,), (r,))[1]                                          # noqa: E731
    hess = lambda a, b: jvp(lambda y: jvp(fn, (y,), (a,))[1], (x,), (b,))[1]        # noqa: E731
    out = [fn(x)] + [lin(rows[i]) for i in range(1, 1 + layout.n1)]
    for j, (a, b) in enumerate(layout.pairs):
        out.append(lin(rows[layout.pair_row(j)]) + hess(rows[a], rows[b]))
    if layout.collapse:
        sq = torch.stack([hess(rows[k], rows[k]) for k in layout.collapse]).mean(0)
        out.append(lin(rows[-1]) + sq)
    return torch.stack(out)
