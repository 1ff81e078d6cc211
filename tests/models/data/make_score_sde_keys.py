"""Regenerate score_sde_keys.json: Score SDE's state_dict keys and shapes for the CIFAR-10
presets the issue names, buffers included (the ``sigmas`` buffer, with its dtype), from the
independent enumeration in tests/models/score_sde_spec.py (not from fpkern's networks).
Run from the repository root:

    python tests/models/data/make_score_sde_keys.py
"""

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from score_sde_spec import BUFFER_DTYPES, score_sde_spec  # noqa: E402

# The Score SDE configs (configs/<name>.py over default_cifar10_configs), architecture part
# (num_scales: the length of the sigmas buffer, default_cifar10_configs' model.num_scales).
_COMMON = dict(nf=128, ch_mult=[1, 2, 2, 2], num_res_blocks=4, attn_resolutions=[16],
               num_scales=1000, resamp_with_conv=True, conditional=True, resblock_type="biggan",
               progressive="none", progressive_combine="sum")
CONFIGS = {
    "ve/cifar10_ncsnpp_continuous": dict(
        name="ncsnpp", fir=True, progressive_input="residual", embedding_type="fourier", **_COMMON),
    "vp/cifar10_ddpmpp_continuous": dict(
        name="ncsnpp", fir=False, progressive_input="none", embedding_type="positional", **_COMMON),
}
DATA = {"image_size": 32, "num_channels": 3}


def build() -> dict:
    out = {}
    for name, model in CONFIGS.items():
        spec = score_sde_spec({"model": model, "data": DATA})
        out[name] = {
            "num_parameters": sum(_numel(s) for _, s, kind in spec if kind != "buffer"),
            "keys": [[k, list(s)] for k, s, _ in spec],
            "frozen": [k for k, _, kind in spec if kind == "frozen"],
            "buffers": [[k, BUFFER_DTYPES[k]] for k, _, kind in spec if kind == "buffer"],
        }
    return out


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    (HERE / "score_sde_keys.json").write_text(json.dumps(build(), separators=(",", ":")) + "\n")
