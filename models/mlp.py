"""The feed-forward part of a block: embd -> intermediate_expanded -> activation -> embd."""

from __future__ import annotations

from models.activations import ACTIVATIONS
from models.kernels import project
from models.params import Weight, bias, projection_std


def mlp_weights(config) -> dict[str, Weight]:
    return {
        "fc": Weight(("embd", "intermediate_expanded"), projection_std(config, config.n_embd)),
        "fc_bias": bias(("intermediate_expanded",)),
        "proj": Weight(("intermediate_expanded", "embd"), projection_std(config, config.mlp_width, residual_output=True)),
        "proj_bias": bias(("embd",)),
    }


def mlp(p, x, config, layout):
    """x [batch, sequence, embd] -> [batch, sequence, embd]."""
    h = project("bse,ei->bsi", x, p["fc"], config, layout) + p["fc_bias"]
    h = ACTIVATIONS[config.activation_function](h)
    return project("bsi,ie->bse", h, p["proj"], config, layout) + p["proj_bias"]
