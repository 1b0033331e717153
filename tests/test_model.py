"""models/attention.py and models/kernels.py: attention by every kernel (blocked in causal query
blocks, and plain) equals attention written plainly here, over the whole sequence with one mask,
for both kinds, sequence lengths that do and do not divide into blocks, and windows shorter and
longer than a block; the hand-written backward passes (blocked attention, CPU projections)
equal JAX's autodiff of the same forward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import validate
from models import kernels
from models.attention import KINDS, softmax_weights, windowed_probabilities
from models.dropout import dropout


def plain_attention(p, x, kind, radius):
    """Scores for every query and key, masked, softmaxed: no blocks, no shortcuts."""
    q, k, v = (jnp.einsum("bse,ehk->bshk", x, p[name]) for name in ("q", "k", "v"))
    scores = jnp.einsum("bqhk,bmhk->bhqm", q, k)
    query = jnp.arange(x.shape[1])[:, None]
    key = jnp.arange(x.shape[1])[None, :]
    visible = (key <= query) & ((query - key < radius) if kind == "local" else True)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    attended = jnp.einsum("bhqm,bmhk->bqhk", probs, v)
    return jnp.einsum("bqhk,hke->bqe", attended, p["out"]) + p["out_bias"]


def model_attention(p, x, kind, config):
    """The model's attention of a whole sequence over itself (no cache), as a block applies it."""
    out, _ = KINDS[kind].apply(p, x, jnp.arange(x.shape[1]), None, None, config, None, None)
    return out


@pytest.mark.parametrize("length", [100, 129, 300, 1100])
@pytest.mark.parametrize("kind,radius", [("global", 256), ("local", 1), ("local", 37), ("local", 256), ("local", 5000)])
@pytest.mark.parametrize("kernel", ["auto", "plain"])
def test_attention_kernels_equal_plain_attention(length, kind, radius, kernel):
    if kernel == "plain" and length == 1100 and kind == "local" and radius != 37:
        pytest.skip("the plain kernel's long cases are covered by radius 37")
    config = validate({"n_ctx": length, "n_embd": 32, "n_head": 4, "n_layer": 1, "n_vocab": 64,
                       "attention_types": [[[kind], 1]], "local_attention_radius": radius,
                       "attention_kernel": kernel, "cpu_backward": "plain"}, "test")
    weights = softmax_weights(config)
    keys = jax.random.split(jax.random.key(length), len(weights) + 1)
    p = {name: 0.3 * jax.random.normal(key, tuple(config.dim_sizes[d] for d in w.dims))
         for (name, w), key in zip(weights.items(), keys)}
    x = jax.random.normal(keys[-1], (2, length, config.n_embd))
    assert len(kernels.query_blocks(length)) == min(8, -(-length // 128))
    assert ("custom_vjp" in str(jax.make_jaxpr(lambda p, x: model_attention(p, x, kind, config))(p, x))) == \
        (kernel == "auto")  # auto is the blocked kernel on a CPU (its only custom gradient here)

    def blocked(p, x):
        return model_attention(p, x, kind, config)

    def plain(p, x):
        return plain_attention(p, x, kind, radius)

    ours = jax.jit(blocked)(p, x)
    np.testing.assert_allclose(ours, jax.jit(plain)(p, x), rtol=2e-5, atol=2e-5)

    cotangent = jax.random.normal(keys[0], ours.shape)
    grad_ours = jax.jit(jax.grad(lambda p, x: jnp.vdot(blocked(p, x), cotangent), (0, 1)))(p, x)
    grad_plain = jax.jit(jax.grad(lambda p, x: jnp.vdot(plain(p, x), cotangent), (0, 1)))(p, x)
    scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(grad_plain))  # radius 1: q and k get exact zeros
    for a, b in zip(jax.tree.leaves(grad_ours), jax.tree.leaves(grad_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention runs on a GPU only "
                    "(run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("length", [100, 129, 1100])
@pytest.mark.parametrize("kind,radius", [("global", 256), ("local", 1), ("local", 37), ("local", 256)])
def test_fused_gpu_attention_equals_plain_attention(length, kind, radius):
    """bfloat16 training on a GPU takes cuDNN's kernel (odd lengths the blocked path, as cuDNN does
    not train them); either way it must mean what plain attention means."""
    config = validate({"n_ctx": length, "n_embd": 64, "n_head": 4, "n_layer": 1, "n_vocab": 64,
                       "attention_types": [[[kind], 1]], "local_attention_radius": radius,
                       "precision": "bfloat16"}, "test")
    weights = softmax_weights(config)
    keys = jax.random.split(jax.random.key(length), len(weights) + 1)
    p = {name: (0.3 * jax.random.normal(key, tuple(config.dim_sizes[d] for d in w.dims))).astype(jnp.bfloat16)
         for (name, w), key in zip(weights.items(), keys)}
    x = jax.random.normal(keys[-1], (2, length, config.n_embd)).astype(jnp.bfloat16)

    def fused(p, x):
        return model_attention(p, x, kind, config).astype(jnp.float32)

    def plain(p, x):
        as_float32 = jax.tree.map(lambda a: a.astype(jnp.float32), (p, x))
        return plain_attention(*as_float32, kind, radius)

    assert ("cudnn" in jax.jit(fused).lower(p, x).as_text()) == (length % 2 == 0)
    ours = jax.jit(fused)(p, x)
    reference = jax.jit(plain)(p, x)
    np.testing.assert_allclose(ours, reference, rtol=0.05, atol=0.05 * float(jnp.abs(reference).max()))

    cotangent = jax.random.normal(keys[0], ours.shape)
    grad_ours = jax.jit(jax.grad(lambda p, x: jnp.vdot(fused(p, x), cotangent), (0, 1)))(p, x)
    grad_plain = jax.jit(jax.grad(lambda p, x: jnp.vdot(plain(p, x), cotangent), (0, 1)))(p, x)
    # one relative error over all gradients: with radius 1 the q and k gradients are exactly zero
    flat_ours, flat_plain = (np.concatenate([np.asarray(g, np.float32).ravel() for g in jax.tree.leaves(grads)])
                             for grads in (grad_ours, grad_plain))
    assert np.linalg.norm(flat_ours - flat_plain) <= 0.05 * np.linalg.norm(flat_plain)


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("bse,ei->bsi", (2, 5, 6), (6, 20)),  # narrow input: the weight gradient transposes x
    ("bsi,ie->bse", (2, 5, 20), (20, 6)),  # wide input: it transposes g and its result instead
    ("bqhk,hke->bqe", (2, 5, 3, 4), (3, 4, 6)),
    ("bqhk,hke->bqe", (2, 7, 3, 4), (3, 4, 6)),
    ("bse,ehk->bshk", (2, 5, 6), (6, 3, 4)),
    ("bse,ehk->bshk", (2, 9, 24), (24, 2, 3)),
    ("sbe,ev->sbv", (3, 2, 4), (4, 50)),
])
def test_cpu_projection_backward_equals_autodiff(spec, x_shape, w_shape):
    """The CPU projection's written-out backward against JAX differentiating the einsum."""
    keys = jax.random.split(jax.random.key(3), 3)
    x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, w)).shape
    cotangent = jax.random.normal(keys[2], out_shape)
    contracted = (len(x_shape) + len(w_shape) - len(out_shape)) // 2

    def ours(x, w):
        return jnp.vdot(kernels._cpu_projection(x, w, contracted), cotangent)

    def autodiff(x, w):
        return jnp.vdot(jnp.einsum(spec, x, w), cotangent)

    np.testing.assert_allclose(jax.jit(ours)(x, w), autodiff(x, w), rtol=1e-5)
    for name, a, b in zip("xw", jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(autodiff, (0, 1))(x, w)):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_tied_output_projection_gradient_reaches_the_embedding_table():
    """The logits project through the transposed [vocab, embd] table: its gradient comes back in
    the table's own layout, equal to autodiff of the plain einsum."""
    keys = jax.random.split(jax.random.key(4), 3)
    hidden, table = jax.random.normal(keys[0], (2, 5, 8)), jax.random.normal(keys[1], (30, 8))
    cotangent = jax.random.normal(keys[2], (2, 5, 30))
    config = validate({}, "test")
    ours = jax.grad(lambda h, t: jnp.vdot(kernels.project("bse,ev->bsv", h, t.T, config), cotangent), (0, 1))
    plain = jax.grad(lambda h, t: jnp.vdot(jnp.einsum("bse,ve->bsv", h, t), cotangent), (0, 1))
    for a, b in zip(jax.jit(ours)(hidden, table), plain(hidden, table)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["bse,ve->bsv", "bse,eh->bhs", "bs,st->bt,", "bse,fi->bsi"])
def test_project_refuses_a_spec_that_is_not_a_projection(spec):
    x = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="is not of the form"):
        kernels.project(spec, x, jnp.ones((4, 4)), validate({}, "test"))


@pytest.mark.parametrize("kind,radius", [("global", 256), ("local", 37)])
def test_blocked_attention_backward_equals_autodiff_with_attention_dropout(kind, radius):
    """The hand-written backward, dropout multipliers included, against JAX differentiating the
    same forward computation."""
    length, batch, heads, kv = 300, 2, 4, 8
    keys = jax.random.split(jax.random.key(7), 5)
    q, k, v, cotangent = (jax.random.normal(key, (batch, length, heads, kv)) for key in keys[:4])
    window = radius if kind == "local" else None
    blocks = kernels.attention_blocks(length, window)
    keep = tuple(dropout(jax.random.fold_in(keys[4], index), jnp.ones((batch, heads, stop - start, stop - first)), 0.3)
                 for index, (start, stop, first) in enumerate(blocks))
    probabilities = functools.partial(windowed_probabilities, window=window)
    assert any(float((m == 0).mean()) > 0.2 for m in keep)

    def ours(q, k, v):
        return jnp.vdot(kernels.blocked_attention(q, k, v, keep, blocks, probabilities), cotangent)

    def autodiff(q, k, v):
        return jnp.vdot(kernels._blocked_attention_forward(q, k, v, keep, blocks, probabilities)[0], cotangent)

    grads = jax.jit(jax.grad(ours, (0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(autodiff, (0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", grads, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()), err_msg=name)


def test_the_attention_registry_holds_exactly_the_kinds_the_options_table_calls_implemented():
    from configs import OPTIONS

    implemented = {row.split(": ", 1)[1] for row, option in OPTIONS.items()
                   if row.startswith("attention_types: ") and option.implemented}
    assert implemented == set(KINDS)


# --- GPT-Neo's architecture options against a plainly written model ------------------------------
#
# `reference_loss` is the whole model written out here from GPT-Neo's semantics (the architecture
# reference), without calling models/: every option of a case must give the model's logits, loss
# and gradients. Layers mix global, local and none attention.

OPTION_BASE = {"n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 4, "n_vocab": 64, "local_attention_radius": 5,
               "attention_types": [[["global", "local", "none", "local"], 1]]}


def gelu_tanh(x):
    return 0.5 * x * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


REFERENCE_ACTIVATIONS = {"gelu": gelu_tanh, "silu": lambda x: x / (1 + jnp.exp(-x))}


def rotation_matrices(length, head_dim):
    """[position, kv, kv] float64: dimension i and i + kv/2 turn by position * 10000^(-2i/kv)."""
    half = head_dim // 2
    matrices = np.zeros((length, head_dim, head_dim))
    for position in range(length):
        for i in range(half):
            angle = position * 10000.0 ** (-2 * i / head_dim)
            c, s = np.cos(angle), np.sin(angle)
            # new[i] = old[i] c - old[i + half] s; new[i + half] = old[i + half] c + old[i] s
            matrices[position, i, i], matrices[position, i + half, i] = c, -s
            matrices[position, i + half, i + half], matrices[position, i, i + half] = c, s
    return matrices


def reference_layer_norm(p, x, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def reference_prenorm(p, x, config):
    if config.rezero:
        return x
    if config.scalenorm:  # GPT-Neo's: centred, one scalar gain, epsilon 1e-5, no bias
        mean = x.mean(-1, keepdims=True)
        return p["scale"] * (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    return reference_layer_norm(p, x, config.layer_norm_epsilon)


def reference_attention(p, x, kind, config):
    if kind == "gau":
        return reference_gau(p, x, config)
    n = x.shape[1]
    q, k, v = (jnp.einsum("bse,ehk->bshk", x, p[name]) for name in ("q", "k", "v"))
    if config.rotary_emb:
        turn = jnp.asarray(rotation_matrices(n, config.n_embd // config.n_head), jnp.float32)
        q, k = (jnp.einsum("bshk,skj->bshj", t, turn) for t in (q, k))
    if kind == "linear":
        attended = reference_linear_attention(q, k, v)
    else:
        distance = np.arange(n)[:, None] - np.arange(n)[None, :]
        allowed = (distance >= 0) & ((distance < config.local_attention_radius) if kind == "local" else True)
        if kind == "global" and config.num_mem_kv:  # memory first, seen by every query, never rotated
            k = jnp.concatenate([jnp.broadcast_to(p["mem_k"], (x.shape[0], *p["mem_k"].shape)), k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(p["mem_v"], (x.shape[0], *p["mem_v"].shape)), v], axis=1)
            allowed = np.concatenate([np.ones((n, config.num_mem_kv), bool), allowed], axis=1)
        scores = jnp.einsum("bqhk,bmhk->bhqm", q, k)  # unscaled, as GPT-Neo
        probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
        attended = jnp.einsum("bhqm,bmhk->bqhk", probs, v)
    return jnp.einsum("bqhk,hke->bqe", attended, p["out"]) + p["out_bias"]


def reference_linear_attention(q, k, v):
    """GPT-Neo's causal linear attention as its reference states it, with the [batch, sequence,
    heads, kv, kv] running sum held whole: fine for a test's few positions."""
    phi_q = jax.nn.softmax(q, axis=-1)
    phi_k = jnp.exp(k)
    running_kv = jnp.cumsum(jnp.einsum("bshd,bshe->bshde", phi_k, v), axis=1)
    running_k = jnp.cumsum(phi_k, axis=1) + 1e-6
    return jnp.einsum("bshd,bshde->bshe", phi_q, running_kv) / jnp.einsum("bshd,bshd->bsh", phi_q, running_k)[..., None]


def reference_gau(p, x, config):
    """The GAU formula of models/gau.py's docstring, as written there."""
    n, s = x.shape[1], config.gau_key_size
    q, k, v = (jax.nn.relu(x @ p[name]) for name in ("gau_q", "gau_k", "gau_v"))
    if config.rotary_emb:
        turn = jnp.asarray(rotation_matrices(n, s), jnp.float32)
        q, k = (jnp.einsum("bsk,skj->bsj", t, turn) for t in (q, k))
    u = jax.nn.relu(x @ p["gau_u"])
    causal = np.tril(np.ones((n, n)))
    weights = jax.nn.relu(jnp.einsum("bqg,bmg->bqm", q, k) / np.sqrt(s)) ** 2 * causal / causal.sum(-1, keepdims=True)
    return (((weights @ v) @ p["gau_w"]) * u) @ p["gau_out"] + p["gau_out_bias"]


def reference_mlp(p, x, config):
    act = REFERENCE_ACTIVATIONS[config.activation_function]
    if config.mlp_glu:  # GPT-Neo's c_fc, twice as wide, split into (h, gate) in that order
        c_fc = jnp.concatenate([p["fc"], p["fc_gate"]], axis=1)
        c_fc_bias = jnp.concatenate([p["fc_bias"], p["fc_gate_bias"]])
        h, gate = jnp.split(x @ c_fc + c_fc_bias, 2, axis=-1)
        return (h * act(gate)) @ p["proj"] + p["proj_bias"]
    h = x @ p["fc"] + p["fc_bias"]
    return act(h) @ p["proj"] + p["proj_bias"]


def reference_loss(params, tokens, labels, config):
    """(loss with z-loss, logits) of the whole model, written plainly."""
    n = tokens.shape[1]
    x = params["wte"][tokens]
    if config.rotary_emb:
        pass  # positions enter through q and k only
    elif config.axial_pos_emb:
        rows, columns = params["wpe_rows"], params["wpe_columns"]
        table = ((rows[:, None, :] + columns[None, :, :]) / 2).reshape(-1, config.n_embd)  # row i * a2 + j
        x = x + table[:n]
    else:
        x = x + params["wpe"][:n]
    for layer, kind in enumerate(config.layer_kinds):
        b = params["blocks"][0 if config.share_parameters else layer]
        if config.macaron:  # in every layer, none included: no prenorm, no ReZero gain
            x = x + 0.5 * reference_mlp(b["mlp_macaron"], x, config)
        if kind != "none":
            a = reference_attention(b["attn"], reference_prenorm(b.get("ln_1"), x, config), kind, config)
            x = x + (b["rezero_1"] * a if config.rezero else a)
        m = reference_mlp(b["mlp"], reference_prenorm(b.get("ln_2"), x, config), config)
        if config.macaron:
            m = 0.5 * m
        x = x + (b["rezero_2"] * m if config.rezero else m)
    x = reference_layer_norm(params["ln_f"], x, config.layer_norm_epsilon)
    if config.no_weight_tie:
        logits = x @ params["lm_head"]["w"].T + params["lm_head"]["bias"]
    else:
        logits = x @ params["wte"].T
    log_z = jax.nn.logsumexp(logits, axis=-1)
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jnp.mean(log_z - label_logits) + config.z_loss * jnp.mean(log_z**2), logits


def perturbed(params, seed=1, scale=0.1):
    """Every leaf moved off its init, so that gains are not ones and scalars not zeros."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + scale * jax.random.normal(key, x.shape) for x, key in zip(leaves, keys)])


OPTION_CASES = {  # every option in a few combinations (each case costs a compile of both models)
    "rezero over scalenorm": {"rezero": True, "scalenorm": True},
    "macaron, rezero, glu": {"macaron": True, "rezero": True, "mlp_glu": True},
    "together": {"share_parameters": True, "rotary_emb": True, "scalenorm": True, "mlp_glu": True,
                 "activation_function": "silu", "no_weight_tie": True, "macaron": True,
                 "layer_norm_epsilon": 1e-3},  # ln_f's epsilon, not scalenorm's
    "every kind, rotary, mem-kv": {"attention_types": [[["global", "linear", "gau", "local"], 1]], "rotary_emb": True,
                                   "num_mem_kv": 2, "gau_key_size": 8, "gau_expanded_size": 40},
    "every kind, shared": {"attention_types": [[["global", "linear", "gau", "none"], 1]], "share_parameters": True,
                           "num_mem_kv": 2, "gau_key_size": 8, "rezero": True},
    "together, axial": {"share_parameters": True, "axial_pos_emb": [2, 8], "rezero": True, "mlp_glu": True,
                        "no_weight_tie": True},
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_model_with_architecture_options_equals_the_plain_reference_in_logits_loss_and_gradients(case):
    import model_fns
    from models import gpt2

    config = validate({**OPTION_BASE, **OPTION_CASES[case]}, "test")
    params = perturbed(gpt2.init_params(config, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(2), (2, config.n_ctx), 0, config.n_vocab)
    labels = jnp.roll(tokens, -1, axis=1)

    np.testing.assert_allclose(jax.jit(lambda p: gpt2.logits(p, tokens, config))(params),
                               jax.jit(lambda p: reference_loss(p, tokens, labels, config)[1])(params),
                               rtol=2e-4, atol=2e-4)

    def ours(p):
        return model_fns.lm_loss(p, tokens, labels, config, None)[0]

    def reference(p):
        return reference_loss(p, tokens, labels, config)[0]

    loss, grads = jax.jit(jax.value_and_grad(ours))(params)
    expected_loss, expected_grads = jax.jit(jax.value_and_grad(reference))(params)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * max(float(jnp.abs(b).max()), 1.0),
                                   err_msg=jax.tree_util.keystr(path))


def test_an_untied_model_has_a_biased_lm_head_and_keeps_ln_f():
    from models import gpt2

    config = validate({**OPTION_BASE, "no_weight_tie": True}, "test")
    tree = gpt2.weights(config)
    assert "ln_f" in tree and tree["lm_head"]["w"].dims == ("vocab", "embd") and tree["lm_head"]["bias"].dims == ("vocab",)
    tied = validate(OPTION_BASE, "test")
    # untied, the token embedding is a lookup and lm_head the matmul: the same count as tied plus nothing
    assert gpt2.parameter_count(config, matmul_only=True) == gpt2.parameter_count(tied, matmul_only=True)
    assert gpt2.parameter_count(config) == gpt2.parameter_count(tied) + config.n_vocab * (config.n_embd + 1)


def test_shared_parameters_are_one_block_serving_every_layer_kind():
    from models import gpt2

    shared = validate({**OPTION_BASE, "share_parameters": True}, "test")
    separate = validate(OPTION_BASE, "test")
    tree = gpt2.weights(shared)
    assert len(tree["blocks"]) == 1 and {"ln_1", "attn", "ln_2", "mlp"} <= set(tree["blocks"][0])
    only_mlp = validate({**OPTION_BASE, "share_parameters": True, "attention_types": [[["none"], 4]]}, "test")
    assert set(gpt2.weights(only_mlp)["blocks"][0]) == {"ln_2", "mlp"}
    # a token still meets every layer's multiplies: the FLOPs of the separate model
    assert gpt2.parameter_count(shared, matmul_only=True) == gpt2.parameter_count(separate, matmul_only=True)
    block = sum(int(np.prod(w.shape)) for w in jax.tree.leaves(gpt2.param_shapes(shared)["blocks"][0]))
    assert gpt2.parameter_count(shared) == gpt2.parameter_count(separate) - sum(
        int(np.prod(w.shape)) for w in jax.tree.leaves(gpt2.param_shapes(separate)["blocks"])) + block


def test_rotary_emb_true_replaces_the_position_table_and_false_keeps_it():
    from models import gpt2

    assert "wpe" not in gpt2.weights(validate({**OPTION_BASE, "rotary_emb": True}, "test"))
    off = validate({**OPTION_BASE, "rotary_emb": False}, "test")
    assert not off.rotary_emb and "wpe" in gpt2.weights(off)


@pytest.mark.parametrize("axial,message", [
    ([4, 8], "a1 \\* a2 = 32 but n_ctx = 16"),
    ([16], "two positive integers"),
    ([4, 0], "two positive integers"),
    ([4, "4"], "two positive integers"),
])
def test_axial_pos_emb_must_be_two_sizes_whose_product_is_n_ctx(axial, message):
    from errors import ConfigError

    with pytest.raises(ConfigError, match=f"key 'axial_pos_emb' = .*{message}"):
        validate({**OPTION_BASE, "axial_pos_emb": axial}, "test")


def test_axial_tables_have_their_own_dimensions_and_rotary_replaces_them():
    from configs import unused_key_notes
    from models import gpt2

    config = validate({**OPTION_BASE, "axial_pos_emb": [2, 8]}, "test")
    tree = gpt2.weights(config)
    assert "wpe" not in tree and tree["wpe_rows"].dims == ("axial_rows", "embd")
    assert tree["wpe_columns"].dims == ("axial_columns", "embd")
    assert gpt2.param_shapes(config)["wpe_rows"].shape == (2, 32) and gpt2.param_shapes(config)["wpe_columns"].shape == (8, 32)
    both = validate({**OPTION_BASE, "axial_pos_emb": [2, 8], "rotary_emb": True}, "test")
    assert not {"wpe", "wpe_rows", "wpe_columns"} & set(gpt2.weights(both))
    assert any("'axial_pos_emb'" in note and "rotary_emb" in note for note in unused_key_notes({}, both))


def test_a_fresh_rezero_model_is_the_identity_on_the_residual_stream():
    """Every gain starts at 0: the hidden states are ln_f of the embeddings, whatever the blocks hold."""
    from models import gpt2

    config = validate({**OPTION_BASE, "rezero": True}, "test")
    params = gpt2.init_params(config, jax.random.key(0))
    assert all("ln_1" not in b and "ln_2" not in b for b in params["blocks"])
    assert [("rezero_1" in b) for b in params["blocks"]] == [kind != "none" for kind in config.layer_kinds]
    tokens = jax.random.randint(jax.random.key(1), (2, config.n_ctx), 0, config.n_vocab)
    hidden, _, _ = gpt2.forward(params, tokens, config)
    embedded = params["wte"][tokens] + params["wpe"][: config.n_ctx]
    np.testing.assert_allclose(hidden, reference_layer_norm(params["ln_f"], embedded, config.layer_norm_epsilon),
                               rtol=1e-5, atol=1e-5)
    from models.params import decay_mask

    assert not any(decay_mask(gpt2.weights(config))["blocks"][0][name] for name in ("rezero_1", "rezero_2"))


def test_rotary_angles_are_exact_far_past_256_under_bfloat16_compute():
    """bfloat16 holds integers exactly only to 256: the rotation of late positions must still be
    the float64 rotation, rounded once to bfloat16."""
    from models.positions import rotate

    length, head_dim = 2048, 16
    x = jax.random.normal(jax.random.key(0), (1, length, 2, head_dim))
    positions = jnp.arange(length)[None, :]
    ours = np.asarray(rotate(x.astype(jnp.bfloat16), positions).astype(jnp.float32))
    turn = rotation_matrices(length, head_dim)
    exact = np.einsum("bshk,skj->bshj", np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64), turn)
    late = slice(257, None)
    np.testing.assert_allclose(ours[:, late], exact[:, late], rtol=0, atol=2.0**-7 * np.abs(exact).max())
    # the same rotation with angles taken in bfloat16 would be far off: the test can tell
    rounded = np.asarray(jnp.asarray(np.arange(length), jnp.bfloat16).astype(jnp.float32))
    assert np.abs(rounded[late] - np.arange(length)[late]).max() >= 4


# --- linear attention's arithmetic ------------------------------------------------------------------


def float64_linear_attention(q, k, v):
    """GPT-Neo's causal formula in float64 numpy, position by position: exp(k) does not overflow
    there for the keys below."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    phi_q = np.exp(q - q.max(-1, keepdims=True))
    phi_q /= phi_q.sum(-1, keepdims=True)
    phi_k = np.exp(k)
    out = np.zeros_like(v)
    for t in range(q.shape[1]):
        kv = np.einsum("bshd,bshe->bhde", phi_k[:, : t + 1], v[:, : t + 1])
        z = phi_k[:, : t + 1].sum(1) + 1e-6
        out[:, t] = np.einsum("bhd,bhde->bhe", phi_q[:, t], kv) / np.einsum("bhd,bhd->bh", phi_q[:, t], z)[..., None]
    return out


@pytest.mark.parametrize("length,key_scale", [(150, 1.0), (150, 12.0), (7, 30.0)])
def test_causal_linear_attention_equals_gpt_neo_formula_over_chunks_and_for_keys_exp_would_overflow(length, key_scale):
    """150 positions: three chunks, the last padded. Keys up to ~50 (scale 12) and ~100 (scale 30):
    GPT-Neo's float32 exp(k) is inf past 88; the formula itself is finite."""
    from models.linear_attention import causal_linear_attention

    q, k, v = (jax.random.normal(jax.random.key(i), (2, length, 3, 8)) for i in range(3))
    k = k * key_scale
    ours, _ = jax.jit(causal_linear_attention)(q, k, v)
    np.testing.assert_allclose(ours, float64_linear_attention(q, k, v), rtol=2e-4, atol=2e-5)


def test_causal_linear_attention_gradients_equal_autodiff_of_the_plain_formula():
    from models.linear_attention import causal_linear_attention

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 100, 2, 8)) for i in range(3))
    cotangent = jax.random.normal(jax.random.key(5), (2, 100, 2, 8))
    ours = jax.grad(lambda *a: jnp.sum(causal_linear_attention(*a)[0] * cotangent), (0, 1, 2))(q, k, v)
    plain = jax.grad(lambda *a: jnp.sum(reference_linear_attention(*a) * cotangent), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()), err_msg=name)


def test_linear_attention_from_a_running_state_equals_one_pass_and_the_state_does_not_grow():
    """A prompt of 70 positions, then one position at a time, with a padded first key in row 0:
    the state carries everything, and it is the same size at every position."""
    from models.linear_attention import causal_linear_attention

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 90, 2, 8)) * 3 for i in range(3))
    valid = np.ones((2, 90), bool)
    valid[0, 0] = False
    whole, _ = causal_linear_attention(q, k, v, None, jnp.asarray(valid))
    parts, state = [], None
    step = jax.jit(causal_linear_attention)
    for start, stop in [(0, 70)] + [(t, t + 1) for t in range(70, 90)]:
        out, new_state = step(q[:, start:stop], k[:, start:stop], v[:, start:stop], state, jnp.asarray(valid[:, start:stop]))
        if state is not None:
            assert jax.tree.map(jnp.shape, new_state) == jax.tree.map(jnp.shape, state)
        parts.append(out)
        state = new_state
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), whole, rtol=1e-4, atol=1e-5)
    assert state["S"].shape == (2, 2, 8, 8)


def test_noncausal_linear_attention_equals_its_formula_in_outputs_and_gradients():
    from models.linear_attention import noncausal_linear_attention

    def plain(q, k, v):  # every query sees every position; phi_k is a softmax over the sequence
        phi_q = jax.nn.softmax(q, axis=-1)
        phi_k = jax.nn.softmax(k, axis=1)
        return jnp.einsum("bshd,bhde->bshe", phi_q, jnp.einsum("bshd,bshe->bhde", phi_k, v))

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 40, 2, 8)) for i in range(3))
    np.testing.assert_allclose(noncausal_linear_attention(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
    # the first position sees the last: not causal
    changed = v.at[:, -1].add(1.0)
    assert not np.allclose(noncausal_linear_attention(q, k, changed)[:, 0], noncausal_linear_attention(q, k, v)[:, 0])
    ours = jax.grad(lambda *a: jnp.sum(noncausal_linear_attention(*a) ** 2), (0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: jnp.sum(plain(*a) ** 2), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_attention_weights_start_where_gpt_neo_started():
    """mesh-tensorflow's init: q (embd * kv)^-1/2, k and v embd^-1/2, out (heads * kv)^-1/2; memory
    key/values 1/sqrt(kv). Measured on a fresh model wide enough for the sample deviation to tell."""
    from models import gpt2

    config = validate({**OPTION_BASE, "n_embd": 256, "n_head": 4, "num_mem_kv": 64, "scale_by_in": True,
                       "attention_types": [[["global"], 4]]}, "test")
    attn = gpt2.init_params(config, jax.random.key(0))["blocks"][0]["attn"]
    embd, kv, heads = 256, 64, 4
    expected = {"q": (embd * kv) ** -0.5, "k": embd ** -0.5, "v": embd ** -0.5, "out": (heads * kv) ** -0.5,
                "mem_k": kv ** -0.5, "mem_v": kv ** -0.5}
    for name, std in expected.items():
        assert float(jnp.std(attn[name])) == pytest.approx(std, rel=0.03), name
    assert float(jnp.abs(attn["out_bias"]).max()) == 0.0


def test_memory_key_values_take_only_plain_attention():
    from errors import ConfigError
    from models import gpt2

    config = validate({**OPTION_BASE, "num_mem_kv": 2, "attention_kernel": "blocked"}, "test")
    params = gpt2.init_params(config, jax.random.key(0))
    with pytest.raises(ConfigError, match="'attention_kernel' = 'blocked' does not take the memory key/values"):
        gpt2.logits(params, jnp.zeros((1, config.n_ctx), jnp.int32), config)
