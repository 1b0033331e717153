"""optax chains for GPT-Neo's optimizer keys: adam with decoupled weight decay, or adafactor;
GPT-Neo's learning-rate schedule; global-norm clipping."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from models import gpt2, lora
from models.params import decay_mask


def learning_rate(config):
    """lr x linear warmup over warmup_steps x decay (cosine or linear to 0.1 * lr at lr_decay_end).

    As in GPT-Neo the decay runs from step 0 and is multiplied by the warmup, not started after it.
    """
    decay_end = max(config.lr_decay_end or config.train_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.minimum(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        progress = jnp.minimum(step, decay_end) / decay_end
        if config.lr_decay == "cosine":
            decay = 0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif config.lr_decay == "linear":
            decay = 1.0 - 0.9 * progress
        else:
            decay = 1.0
        return config.lr * warmup * decay

    return schedule


def make_optimizer(config) -> optax.GradientTransformation:
    """Weight decay applies where the model's Weight says so (norms and biases are not decayed).
    When fine-tuning, the optimizer sees the adapters alone (models/lora.py), so that its state
    holds nothing for the frozen base."""
    schedule = learning_rate(config)
    weights = gpt2.weights(config)
    if lora.active(config):
        weights = lora.split(weights, weights)[1]
    weight_decay_mask = decay_mask(weights)
    if config.opt_name == "adam":
        update = optax.adamw(
            schedule, b1=config.beta1, b2=config.beta2, eps=config.epsilon,
            weight_decay=config.weight_decay, mask=weight_decay_mask,
        )
    else:
        # optax's Adafactor pieces, chained here so that ada_epsilon2 reaches the parameter-scale
        # floor; weight decay joins before the learning rate, so it is scaled by it as in adam
        update = optax.chain(
            optax.scale_by_factored_rms(epsilon=config.ada_epsilon1),
            optax.clip_by_block_rms(1.0),
            optax.scale_by_param_block_rms(min_scale=config.ada_epsilon2),
            optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    if config.gradient_clipping > 0:
        return optax.chain(optax.clip_by_global_norm(config.gradient_clipping), update)
    return update
