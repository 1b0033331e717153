"""models/entmax.py, entmax_loss and --entmax_sampling against an exact entmax written plainly
here in float64: sort the logits, then try each support size k = 1, 2, ... until the threshold
that makes the k largest sum to 1 leaves exactly those k above it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_fns
from configs import validate
from mesh import build_mesh_layout
from models import gpt2
from models.entmax import entmax as entmax_eager
from models.entmax import entmax_loss
from optimizers import make_optimizer
from sample import SamplingSettings, apply_top_k, choose_tokens

ALPHA = 1.3
entmax = jax.jit(entmax_eager, static_argnames="alpha")


def reference_entmax_row(z, alpha=ALPHA):
    """Exact α-entmax of one row, float64: p_i = ((α-1) z_i - τ)_+^(1/(α-1)), Σ p = 1."""
    s = (alpha - 1) * np.asarray(z, np.float64)
    order = np.argsort(-s)
    top = s[order]
    power = 1 / (alpha - 1)
    for k in range(1, len(top) + 1):
        low, high = top[0] - 1.0, top[k - 1]  # Σ_{i<=k} (top_i - τ)^power: >= 1 at low, falls as τ rises
        if np.sum((top[:k] - high) ** power) > 1.0:
            continue  # even τ = top_k gives the k largest too much mass: the support is smaller
        for _ in range(200):
            middle = (low + high) / 2
            low, high = (middle, high) if np.sum((top[:k] - middle) ** power) >= 1.0 else (low, middle)
        tau = (low + high) / 2
        if k == len(top) or top[k] <= tau:  # the (k+1)-th largest falls at or below τ: support found
            p = np.zeros_like(s)
            p[order[:k]] = (top[:k] - tau) ** power
            return p / p.sum()
    raise AssertionError("no support size fits")


def reference_entmax(z, alpha=ALPHA):
    z = np.asarray(z, np.float64)
    return np.stack([reference_entmax_row(row, alpha) for row in z.reshape(-1, z.shape[-1])]).reshape(z.shape)


def reference_loss(z, y, alpha=ALPHA):
    """The Fenchel–Young loss (p* - e_y)·z + (1 - Σ p*^α) / (α(α-1)), float64."""
    z = np.asarray(z, np.float64)
    p = reference_entmax(z, alpha)
    e_y = np.zeros_like(z)
    np.put_along_axis(e_y, np.asarray(y)[..., None], 1.0, axis=-1)
    return np.sum((p - e_y) * z, -1) + (1 - np.sum(p**alpha, -1)) / (alpha * (alpha - 1))


def crafted_logits(rows, vocab, scale, seed=0):
    return (scale * np.random.default_rng(seed).standard_normal((rows, vocab))).astype(np.float32)


@pytest.mark.parametrize("vocab,scale", [(7, 1.0), (300, 3.0), (50257, 2.0), (50257, 12.0)])
def test_entmax_equals_the_exact_float64_entmax_sums_to_one_and_has_exact_zeros(vocab, scale):
    z = crafted_logits(3, vocab, scale, seed=vocab)
    ours = np.asarray(entmax(jnp.asarray(z)))
    expected = reference_entmax(z)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=3e-7)
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-6)
    assert np.all(ours >= 0)
    # the same support, but for tokens whose exact probability is below what float32 resolves
    assert np.all(((ours > 0) == (expected > 0)) | (np.maximum(ours, expected) < 1e-12))
    if vocab > 7:
        assert np.all((ours == 0).sum(-1) > 0)  # sparse: exact zeros, unlike softmax


def test_entmax_with_alpha_2_is_sparsemax_and_with_a_large_gap_is_one_hot():
    z = crafted_logits(4, 40, 1.5, seed=2)
    # sparsemax in closed form: the k largest that satisfy 1 + k z_(k) > Σ_{i<=k} z_(i), τ = (Σ - 1) / k
    top = -np.sort(-z.astype(np.float64), -1)
    k = np.arange(1, 41)
    support = np.sum(1 + k * top > np.cumsum(top, -1), -1)
    tau = (np.take_along_axis(np.cumsum(top, -1), support[:, None] - 1, -1) - 1) / support[:, None]
    np.testing.assert_allclose(entmax(jnp.asarray(z), alpha=2.0), np.maximum(z - tau, 0), atol=1e-6)

    gap = np.array([[0.0, -1.0, 9.0, -3.0, 2.0, 5.6]], np.float32)  # 9 leads by 3.4 > 1 / (α-1): one-hot
    np.testing.assert_array_equal(entmax(jnp.asarray(gap)), [[0, 0, 1, 0, 0, 0]])
    assert float(entmax_loss(jnp.asarray(gap), jnp.asarray([2]))[0]) == 0.0  # p* = e_y: no loss
    # ... and just inside 1 / (α-1) the runner-up keeps some probability
    assert 0 < float(entmax(jnp.asarray([[9.0, 5.8]]))[0, 1]) < 1e-3
    # moving every logit by the same amount changes nothing
    np.testing.assert_allclose(entmax(jnp.asarray(z + 100.0)), entmax(jnp.asarray(z)), atol=2e-6)


def test_fenchel_young_loss_equals_the_formula_is_nonnegative_and_entmax_maximises_its_objective():
    z = crafted_logits(6, 50, 2.5, seed=3)
    labels = np.array([0, 5, 17, 33, 49, int(np.argmax(z[5]))])
    ours = np.asarray(jax.jit(entmax_loss)(jnp.asarray(z), jnp.asarray(labels)))
    np.testing.assert_allclose(ours, reference_loss(z, labels), rtol=1e-5, atol=1e-6)
    assert np.all(ours > 0)  # no row is one-hot here
    # the loss's two conventions, checked from the definition: p* maximises p·z + H_α(p) over the
    # simplex, and H_α of a one-hot p is 0, so L(z, y) = max_p [p·z + H_α(p)] - z_y >= 0
    p_star = reference_entmax(z)
    objective = lambda p: np.sum(p * z, -1) + (1 - np.sum(p**ALPHA, -1)) / (ALPHA * (ALPHA - 1))  # noqa: E731
    others = np.random.default_rng(4).dirichlet(np.ones(50) * 0.3, size=(200, 6))
    assert np.all(objective(others) <= objective(p_star) + 1e-9)
    np.testing.assert_allclose(ours, objective(p_star) - z[np.arange(6), labels], rtol=1e-5, atol=1e-6)


def test_fenchel_young_loss_is_finite_where_the_target_has_zero_probability_and_its_gradient_is_p_minus_e_y():
    z = crafted_logits(2, 50257, 3.0, seed=5)
    labels = np.argmin(z, -1)  # far outside the support
    expected_p = reference_entmax(z)
    assert np.all(expected_p[np.arange(2), labels] == 0)
    loss, grad = jax.jit(jax.value_and_grad(lambda z, y: entmax_loss(z, y).sum()))(jnp.asarray(z), jnp.asarray(labels))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(float(loss), reference_loss(z, labels).sum(), rtol=1e-5)
    one_hot = np.zeros_like(expected_p)
    one_hot[np.arange(2), labels] = 1.0
    np.testing.assert_allclose(grad, expected_p - one_hot, atol=3e-7)
    assert np.all(np.asarray(grad)[np.arange(2), labels] == -1.0)


def test_fenchel_young_gradient_matches_central_finite_differences():
    """In float32: directional derivatives along random directions, step 1e-2 (the loss is smooth:
    its gradient p* - e_y is continuous, also where the support changes)."""
    z = jnp.asarray(crafted_logits(3, 12, 1.5, seed=6))
    labels = jnp.asarray([1, 4, 11])
    weights = jnp.asarray([0.5, 1.0, 2.0])  # a different cotangent per row

    def total(z):
        return jnp.sum(weights * entmax_loss(z, labels))

    grad = jax.grad(total)(z)
    total = jax.jit(total)
    np.testing.assert_allclose(grad, weights[:, None] * (reference_entmax(z) - np.eye(12)[labels]), atol=1e-6)
    step = 1e-2
    for direction in jax.random.normal(jax.random.key(0), (6, *z.shape)):
        numerical = (total(z + step * direction) - total(z - step * direction)) / (2 * step)
        assert float(numerical) == pytest.approx(float(jnp.vdot(grad, direction)), abs=2e-3, rel=2e-3)


TINY = {"n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 1, "n_vocab": 64, "train_batch_size": 4, "lr": 3e-3,
        "warmup_steps": 0, "train_steps": 10, "mesh_shape": "", "layout": "", "entmax_loss": True}


def test_a_tiny_entmax_model_trains_and_its_eval_loss_is_the_mean_fenchel_young_loss_without_z_loss():
    config = validate(TINY, "test")
    assert config.z_loss > 0  # the default: entmax_loss leaves it out
    layout = build_mesh_layout(config, jax.devices()[:1])
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = model_fns.init_state(config, layout, optimizer, shardings)
    batch = np.random.default_rng(0).integers(0, 64, (4, 17), dtype=np.int32)
    inputs, labels = jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:])

    params = jax.device_get(state["params"])
    eval_loss, eval_data_loss = model_fns.make_eval_step(config, layout, shardings, 4)(state["params"], inputs, labels)
    logits = np.asarray(jax.jit(lambda p, tokens: gpt2.logits(p, tokens, config))(params, inputs))
    expected = reference_loss(logits.reshape(-1, 64), batch[:, 1:].reshape(-1)).mean()
    assert float(eval_loss) == float(eval_data_loss) == pytest.approx(expected, rel=1e-5)

    step = model_fns.make_train_step(config, layout, optimizer, shardings)
    losses = []
    for _ in range(6):
        state, metrics = step(state, inputs, labels)
        losses.append(float(metrics["loss"]))
        assert float(metrics["cross_entropy"]) == losses[-1]
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.8 * losses[0], losses


def test_entmax_sampling_draws_only_tokens_with_nonzero_entmax_probability_at_their_frequencies():
    logits = np.array([[4.0, 3.5, 3.0, 1.0, 0.0, -2.0, 3.9, 2.2],
                       [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]], np.float32)
    draws = 4000
    keys = jax.random.split(jax.random.key(11), draws)
    seen = jnp.zeros(logits.shape, bool)

    def sample(settings):
        one = lambda key: choose_tokens(jnp.asarray(logits), seen, key, settings)  # noqa: E731
        return np.asarray(jax.jit(jax.vmap(one))(keys))  # [draws, rows]

    for temperature in (1.0, 0.5):
        probs = reference_entmax(logits / temperature)
        tokens = sample(SamplingSettings(temperature=temperature, entmax=True))
        for row in range(2):
            assert np.all(probs[row, tokens[:, row]] > 0)
            frequencies = np.bincount(tokens[:, row], minlength=8) / draws
            np.testing.assert_allclose(frequencies, probs[row], atol=4 * np.sqrt(0.25 / draws))
        assert np.any(probs[0] == 0) and np.any(probs[1] > 0)  # row 0 has a support to respect

    # with top_k 3 and top_p 0.6: the most likely tokens whose entmax mass reaches 0.6, then entmax
    # over what is left
    tokens = sample(SamplingSettings(temperature=1.0, top_k=3, top_p=0.6, entmax=True))
    top3 = np.where(np.isfinite(np.asarray(apply_top_k(jnp.asarray(logits), 3))), logits, -np.inf)
    probs = reference_entmax(np.where(np.isfinite(top3), top3, -1e9))
    order = np.argsort(-probs, -1)
    for row in range(2):
        mass = np.cumsum(probs[row, order[row]])
        kept = order[row, : np.searchsorted(mass, 0.6) + 1]
        assert set(np.unique(tokens[:, row])) <= set(kept.tolist())
        assert set(np.unique(tokens[:, row])) <= set(np.flatnonzero(reference_entmax(logits)[row] > 0).tolist())
    greedy = sample(SamplingSettings(temperature=0.0, entmax=True))
    assert np.all(greedy == np.argmax(logits, -1))
