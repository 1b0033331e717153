"""MLP activations by the names GPT-Neo configs use in `activation_function`.

GPT-Neo's parametric activations (prelu, parcsinh, psoftplus, proottanh, aria) learned their
parameters; here they use fixed values at those parameters' usual initial points, so a config
naming them runs, with the shape of the function GPT-Neo started from.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def gelu(x):
    # the tanh form: GPT-Neo's and Hugging Face GPTNeo's ("gelu_new")
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _leaky(slope):
    return lambda x: jnp.where(x >= 0, x, slope * x)


def _relax(fn, odd_power):
    def relax(x):
        return sum(fn((2 * i + 1) * x) / (2 * i + 1) ** odd_power * (-1) ** i for i in range(4))

    return relax


ACTIVATIONS = {
    "gelu": gelu,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "selu": jax.nn.selu,
    "elu": jax.nn.elu,
    "abs": jnp.abs,
    "sin": jnp.sin,
    "cos": jnp.cos,
    "sign": jnp.sign,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "lrelu001": _leaky(0.01),
    "lrelu020": _leaky(0.20),
    "id": lambda x: x,
    "triangle_relax": _relax(jnp.sin, 2),
    "square_relax": _relax(jnp.cos, 1),
    "spike": lambda x: 1.0 / (1.0 + x**2),
    "spike2": lambda x: jnp.exp(-(x**2)),
    "tanhshrink": lambda x: x - jnp.tanh(x),
    "softsign": jax.nn.soft_sign,
    "softmax": lambda x: jax.nn.softmax(x, axis=-1),
    "logsoftmax": lambda x: jax.nn.log_softmax(x, axis=-1),
    "bipolarsigmoid": lambda x: 2.0 * jax.nn.sigmoid(x) - 1.0,
    "rrelu": _leaky((1 / 8 + 1 / 3) / 2),  # the expected slope of randomized leaky ReLU
    "elish": lambda x: jnp.where(x >= 0, x, jnp.expm1(x)) * jax.nn.sigmoid(x),
    "arcsinh": jnp.arcsinh,
    "aria": lambda x: x * (1.0 + jnp.exp(-x)) ** -1.5,  # Aria-2 with alpha 1.5, beta 1
    "prelu": _leaky(0.25),
    "parcsinh": jnp.arcsinh,
    "psoftplus": jax.nn.softplus,
    "proottanh": lambda x: (x**2 + 1.0) ** (1.0 / 3.0) * jnp.tanh(x),
    "maxsig": lambda x: jnp.maximum(x, jax.nn.sigmoid(x)),
    "cosid": lambda x: jnp.cos(x) - x,
    "minsin": lambda x: jnp.minimum(x, jnp.sin(x)),
    "maxtanh": lambda x: jnp.maximum(x, jnp.tanh(x)),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "tanhexp": lambda x: x * jnp.tanh(jnp.exp(x)),
    "lisht": lambda x: x * jnp.tanh(x),
    "seagull": lambda x: jnp.log1p(x**2),
    "snake": lambda x: x + jnp.sin(x) ** 2,
    "roottanh": lambda x: (x**2 + 1.0) ** (1.0 / 3.0) * jnp.tanh(x),
    "softplusmone": lambda x: jax.nn.softplus(x) - 1.0,
}
