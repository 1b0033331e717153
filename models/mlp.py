"""The feed-forward part of a block: embd -> intermediate_expanded -> activation -> embd.

mlp_glu makes it a gated linear unit: GPT-Neo's c_fc projects to twice the width and splits the
result into halves (h, gate) in that order, giving h * activation(gate); activation_function
"silu" makes it SwiGLU. Here the halves are two weights, `fc` (h) and `fc_gate` (gate), each
[embd, intermediate_expanded]: the same function as one doubled projection, and a layout that
splits intermediate_expanded splits both alike.
"""

from __future__ import annotations

from models.activations import ACTIVATIONS
from models.lora import project
from models.params import Weight, bias, projection_std


def mlp_weights(config) -> dict[str, Weight]:
    weights = {
        "fc": Weight(("embd", "intermediate_expanded"), projection_std(config, config.n_embd)),
        "fc_bias": bias(("intermediate_expanded",)),
        "proj": Weight(("intermediate_expanded", "embd"), projection_std(config, config.mlp_width, residual_output=True)),
        "proj_bias": bias(("embd",)),
    }
    if config.mlp_glu:
        weights |= {"fc_gate": Weight(("embd", "intermediate_expanded"), projection_std(config, config.n_embd)),
                    "fc_gate_bias": bias(("intermediate_expanded",))}
    return weights


def mlp(p, x, config, layout):
    """x [batch, sequence, embd] -> [batch, sequence, embd]."""
    activation = ACTIVATIONS[config.activation_function]
    h = project("bse,ei->bsi", x, p, "fc", config, layout) + p["fc_bias"]
    if config.mlp_glu:
        h = h * activation(project("bse,ei->bsi", x, p, "fc_gate", config, layout) + p["fc_gate_bias"])
    else:
        h = activation(h)
    return project("bsi,ie->bse", h, p, "proj", config, layout) + p["proj_bias"]
