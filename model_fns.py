"""Loss, train step and eval step: jit-compiled, sharded by the layout.

The training state is a dict {"step", "params", "opt_state"}. Parameters are sharded by their
dimension names; optimizer-state leaves shaped like a parameter are sharded like it, the rest
(step counts, Adafactor's factored moments) are replicated. When fine-tuning adapters
(models/lora.py), "params" and the optimizer state hold the adapters only, and "base" the frozen
rest of the model, which the step differentiates nothing for and passes through unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from configs import masked_labels
from errors import ConfigError
from inputs import NOT_PREDICTED
from mesh import MeshLayout
from models import gpt2, lora
from models.attention import KINDS
from models.entmax import entmax_loss

BATCH_DIMS = ("batch", "sequence")


def position_losses(logits, labels, config):
    """float32 logits [batch, sequence, vocab], labels [batch, sequence] -> (data loss, z-loss term)
    at every position: the softmax cross-entropy and log(Z)^2, Z softmax's normaliser; with
    entmax_loss, the entmax-1.3 Fenchel-Young loss (models/entmax.py) and 0: entmax has no Z, and
    GPT-Neo's entmax loss ignored z_loss too."""
    if config.entmax_loss:
        return entmax_loss(logits, labels), jnp.zeros((), jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return log_z - label_logits, jnp.square(log_z)


def cross_entropy(hidden, output, labels, config, layout=None):
    """(mean data loss, mean z-loss term) over all positions (position_losses), in float32.

    hidden [batch, sequence, embd], output gpt2.output_weights(...), labels [batch, sequence].
    """
    data, z = position_losses(gpt2.unembed(hidden, output, config, layout), labels, config)
    return jnp.mean(data), jnp.mean(z)


def masked_cross_entropy(hidden, output, labels, config, layout=None):
    """mlm_training, or conversations (configs.masked_labels): (data loss, z-loss term, accuracy),
    each the float32 mean over the scored positions only: those whose label is a token (MLM's
    original, a conversation's assistant token), not inputs.NOT_PREDICTED
    (position_losses gives the first two at every position); z-loss is taken on the same
    positions: the logits elsewhere are never read, so their log(Z) is nothing to regularise. No
    masked position gives 0 (not 0 / 0)."""
    logits = gpt2.unembed(hidden, output, config, layout)
    scored = labels != NOT_PREDICTED
    targets = jnp.where(scored, labels, 0)
    count = jnp.maximum(jnp.sum(scored), 1)

    def masked_mean(x):
        return jnp.sum(jnp.where(scored, x, 0.0)) / count

    data, z = position_losses(logits, targets, config)
    accuracy = masked_mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    return masked_mean(data), masked_mean(z), accuracy


def masked_lm_loss(params, inputs, labels, config, layout, dropout_rng=None):
    """configs.masked_labels: (loss, extras) over the scored positions (masked_cross_entropy);
    extras: cross_entropy, accuracy and the model's metrics (gpt2.forward's aux). The model attends
    both ways with mlm_training, causally otherwise (conversations: Firefly's target-masked loss)."""
    hidden, _, aux = gpt2.forward(params, inputs, config, layout, dropout_rng=dropout_rng)
    ce, z, accuracy = masked_cross_entropy(hidden, gpt2.output_weights(params, config), labels, config, layout)
    loss = ce + config.z_loss * z + sum(aux["losses"].values())
    return loss, {"cross_entropy": ce, "accuracy": accuracy, **aux["metrics"]}


def lm_loss(params, inputs, labels, config, layout, dropout_rng=None):
    """Causal LM loss with GPT-Neo's z-loss and the model's auxiliary losses (the MoE layers'
    load balancing, added once): (loss, extras). extras["cross_entropy"] is the data loss (the
    `cross_entropy` metric, and --eval's loss): the cross-entropy, or with entmax_loss the entmax
    Fenchel-Young loss, to which z_loss does not apply (as in GPT-Neo); the rest are the model's
    metrics. With mlm_training the masked-LM loss: labels hold the original tokens at the masked
    positions and inputs.NOT_PREDICTED elsewhere (inputs.MaskedLM); with a conversations dataset
    the mean over the assistant's tokens, the other labels being inputs.NOT_PREDICTED."""
    if masked_labels(config):
        loss, extras = masked_lm_loss(params, inputs, labels, config, layout, dropout_rng)
        return loss, {name: value for name, value in extras.items() if name != "accuracy"}
    hidden, _, aux = gpt2.forward(params, inputs, config, layout, dropout_rng=dropout_rng)
    ce, z = cross_entropy(hidden, gpt2.output_weights(params, config), labels, config, layout)
    return ce + config.z_loss * z + sum(aux["losses"].values()), {"cross_entropy": ce, **aux["metrics"]}


def microbatch_count(config, layout: MeshLayout) -> int:
    """tokens_per_mb_per_replica -> microbatches per step (GPT-Neo's rule: per batch replica)."""
    if not config.tokens_per_mb_per_replica:
        return 1
    per_replica = config.train_batch_size // layout.batch_axis_size
    tokens = per_replica * config.n_ctx
    count = max(1, tokens // config.tokens_per_mb_per_replica)
    if per_replica % count:
        raise ConfigError(
            f"{config.source}: key 'tokens_per_mb_per_replica' = {config.tokens_per_mb_per_replica}: gives {count} "
            f"microbatches, which do not divide the {per_replica} sequences per batch replica "
            f"(train_batch_size {config.train_batch_size} / batch mesh axis {layout.batch_axis_size})"
        )
    return count


def param_shardings(config, layout: MeshLayout):
    def place(path, weight):
        name = jax.tree_util.keystr(path)
        return layout.parameter_sharding(weight.dims, gpt2.shape_of(weight, config), name=name)

    return jax.tree_util.tree_map_with_path(place, gpt2.weights(config), is_leaf=gpt2.is_weight)


def trained_part(tree, config):
    """The part of a whole-model tree (gpt2.weights' shape) that trains: all of it, or when
    fine-tuning the adapters alone."""
    return lora.split(tree, gpt2.weights(config))[1] if lora.active(config) else tree


def whole_params(state, config):
    """The whole model's parameters of a training state (the adapters joined to their base)."""
    if "base" not in state:
        return state["params"]
    return lora.join(state["base"], state["params"], gpt2.weights(config))


def state_shardings(config, layout: MeshLayout, optimizer):
    params = trained_part(param_shardings(config, layout), config)
    by_path = {path: s for path, s in jax.tree_util.tree_flatten_with_path(params)[0]}
    shapes = trained_part(gpt2.param_shapes(config), config)
    shape_by_path = {path: s.shape for path, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    opt_shapes = jax.eval_shape(optimizer.init, shapes)

    def place(path, leaf):
        for start in range(len(path)):  # the parameter whose path ends this leaf's path
            suffix = tuple(path[start:])
            if suffix in by_path and shape_by_path[suffix] == leaf.shape:
                return by_path[suffix]
        return layout.replicated()

    opt = jax.tree_util.tree_map_with_path(place, opt_shapes)
    shardings = {"step": layout.replicated(), "params": params, "opt_state": opt}
    if lora.active(config):
        shardings["base"] = lora.split(param_shardings(config, layout), gpt2.weights(config))[0]
    return shardings


def init_state(config, layout: MeshLayout, optimizer, shardings):
    """A fresh state, each device creating only its own shards; the same values on every mesh.
    When fine-tuning, the base too is the config's random init (train.py replaces it by the base
    checkpoint's)."""
    whole = param_shardings(config, layout) if lora.active(config) else shardings["params"]
    params = gpt2.init_params(config, jax.random.key(config.seed), whole)
    state = {}
    if lora.active(config):
        state["base"], params = lora.split(params, gpt2.weights(config))
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state, **state}


def make_train_step(config, layout: MeshLayout, optimizer, shardings):
    """(state, inputs, labels) -> (state, metrics); inputs and labels [batch, sequence]. metrics: loss,
    cross_entropy, grad_norm, the model's own (gpt2.forward: per MoE layer its dropped tokens and
    busiest expert), and with log_grads each parameter's gradient norm (grad_norm/<path>)."""
    microbatches = microbatch_count(config, layout)
    batch_sharding = layout.sharding(BATCH_DIMS, (config.train_batch_size, config.n_ctx), name="batch")
    # the step's random key: dropout, and the MoE router (its random second choices, and training's
    # capacity factor: a key marks the forward as training)
    random = max(config.embed_dropout, config.attn_dropout, config.res_dropout) > 0 or bool(config.moe_layers)

    template = gpt2.weights(config)

    def trained_loss(trained, base, *args):
        """lm_loss as a function of what trains: fine-tuning differentiates the adapters alone, the
        frozen base a constant."""
        whole = trained if base is None else lora.join(base, trained, template)
        return lm_loss(whole, *args)

    def grads_of(params, base, inputs, labels, rng):
        (loss, extras), grads = jax.value_and_grad(trained_loss, has_aux=True)(params, base, inputs, labels, config,
                                                                                 layout, rng)
        return loss, extras, grads

    batch_axis = layout.layout.get("batch")
    replicas = layout.batch_axis_size
    # Data parallel, each batch replica computes its gradient as one row of a vmap mapped onto the
    # batch axis: it stays the replica's own (the tied embedding's lookup and output projection
    # contributions already summed) until one reduction after the microbatch loop. Left to the
    # partitioner, each contribution of each microbatch would be all-reduced on its own.
    # A step with random draws (dropout, the MoE router) keeps to one forward over the whole batch:
    # its draws are of the global batch's shape, so they, and the losses, are the same on every mesh.
    per_replica = replicas > 1 and list(layout.layout.values()).count(batch_axis) == 1 and not random
    replica_layout = layout.with_layout({dim: axis for dim, axis in layout.layout.items() if dim != "batch"})
    parts = replicas if per_replica else 1

    def accumulated_grads(params, base, inputs, labels, rng):
        """(loss, extras, gradients) of the batch: per replica, accumulated over its microbatches."""
        # microbatch i takes rows i, i + m, i + 2m, ... of each replica's rows: every device keeps
        # its own rows, and each microbatch holds the same rows in the same order on every mesh
        def split(x):  # [batch, sequence] -> [microbatch, replica, row, sequence]
            x = x.reshape(parts, x.shape[0] // (parts * microbatches), microbatches, *x.shape[1:])
            dims = (None, "batch", None, "sequence") if per_replica else (None, None, "batch", "sequence")
            return layout.constrain(jnp.moveaxis(x, 2, 0), dims)

        # MLM and conversations: each (microbatch, replica) mean over its scored positions, weighted
        # by its share of them, so that the step's loss is the mean over every scored position of the batch
        scored = jnp.maximum(jnp.sum(labels != NOT_PREDICTED), 1) / (microbatches * parts)

        def part_grads(mb_inputs, mb_labels, mb_rng, replica):
            (loss, extras), grads = jax.value_and_grad(trained_loss, has_aux=True)(
                params, base, mb_inputs, mb_labels, config, replica_layout if per_replica else layout, mb_rng)
            if masked_labels(config):
                weight = jnp.sum(mb_labels != NOT_PREDICTED) / scored
                loss, extras, grads = jax.tree.map(lambda x: x * weight, (loss, extras, grads))
            return loss, extras, grads

        every_part = jax.vmap(part_grads, in_axes=(0, 0, None, 0), spmd_axis_name=batch_axis if per_replica else None)

        def microbatch(index, mb_inputs, mb_labels):
            mb_rng = jax.random.fold_in(rng, index) if rng is not None and microbatches > 1 else rng
            return every_part(mb_inputs, mb_labels, mb_rng, jnp.arange(parts))

        mb_inputs, mb_labels = split(inputs), split(labels)
        if microbatches == 1:
            total = microbatch(0, mb_inputs[0], mb_labels[0])
        else:
            def accumulate(carry, micro):
                return jax.tree.map(jnp.add, carry, microbatch(*micro)), None

            shapes = jax.eval_shape(microbatch, 0, mb_inputs[0], mb_labels[0])
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), mb_inputs, mb_labels))
        return jax.tree.map(lambda x: jnp.sum(x, axis=0) / (microbatches * parts), total)

    def step_fn(state, inputs, labels):
        rng = jax.random.fold_in(jax.random.key(config.seed), state["step"]) if random else None
        params = state["params"]
        base = state.get("base")
        if microbatches == 1 and not per_replica:
            loss, extras, grads = grads_of(params, base, inputs, labels, rng)
        else:
            loss, extras, grads = accumulated_grads(params, base, inputs, labels, rng)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = optax.tree.norm(grads)
        # already-reduced scalars: whether the state about to be kept (and maybe saved) is finite
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(new_params))
        if config.skip_nonfinite_steps:
            new_params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                 (new_params, opt_state), (params, state["opt_state"]))
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        if base is not None:
            new_state["base"] = base
        metrics = {"loss": loss, **extras, "grad_norm": grad_norm, "finite": finite}
        if config.log_grads:  # GPT-Neo's per-variable gradient norms, by the parameter's path
            metrics |= {f"grad_norm/{parameter_name(path)}": jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
                        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
        return new_state, metrics

    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding, batch_sharding),
        out_shardings=(shardings, layout.replicated()),
        donate_argnums=0,
    )


def parameter_name(path) -> str:
    """A parameter's path in the tree as export.py's MAPPING writes it, e.g. blocks.0.attn.q."""
    return ".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def make_eval_step(config, layout: MeshLayout, shardings, batch_size: int):
    """(params, inputs, labels) -> (loss, cross_entropy), no dropout; with configs.masked_labels (loss,
    cross_entropy, accuracy, scored positions), the means over the scored positions. params: the
    whole model's (when fine-tuning, `whole_params` of the state)."""
    batch_sharding = layout.sharding(BATCH_DIMS, (batch_size, config.n_ctx), name="eval batch")

    def eval_fn(params, inputs, labels):
        if masked_labels(config):
            loss, extras = masked_lm_loss(params, inputs, labels, config, layout)
            return loss, extras["cross_entropy"], extras["accuracy"], jnp.sum(labels != NOT_PREDICTED)
        loss, extras = lm_loss(params, inputs, labels, config, layout)
        return loss, extras["cross_entropy"]

    whole = param_shardings(config, layout) if lora.active(config) else shardings["params"]
    return jax.jit(eval_fn, in_shardings=(whole, batch_sharding, batch_sharding))


def flops_per_token(config) -> float:
    """Useful training FLOPs per token: 6 per matmul weight (forward and backward; the position
    table is a lookup, the tied token embedding a matmul at the output) plus what each layer's
    attention computes beyond its projections (models/attention.py: for softmax attention the q.k
    and probs.v products over the positions its mask lets a query see, on average)."""
    matmul_weights = gpt2.parameter_count(config, matmul_only=True)
    return 6 * matmul_weights + sum(KINDS[kind].flops(config) for kind in config.layer_kinds)
