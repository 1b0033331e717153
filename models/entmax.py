"""α-entmax and its Fenchel–Young loss, over the last axis, in float32: `entmax_loss` and
`main.py --entmax_sampling` (α = 1.3, GPT-Neo's entmax_1.3).

α-entmax maps logits z [..., V] to the probabilities that maximise p·z + H_α(p) over the simplex,
with the Tsallis entropy (zero for a one-hot p, maximal for the uniform one)

    H_α(p) = (1 - Σ_j p_j^α) / (α (α - 1))

The maximiser is

    p_i = [(α - 1) z_i - τ]_+ ^ (1 / (α - 1)),   τ the one number with Σ_i p_i = 1.

Unlike softmax it has exact zeros: every token with (α - 1) z_i <= τ gets probability 0. α → 1
gives softmax, α = 2 sparsemax. For α = 1.3 τ has no closed form, so it is found numerically.
With s_i = (α - 1)(z_i - max z) (so max s = 0; entmax does not change when every logit moves by
the same amount), the mass f(τ) + 1 = Σ [s_i - τ]_+^(1/(α-1)) falls as τ rises. It is >= 1 at
τ = -1 (the top token alone has mass 1) and <= 1 at τ = -(1/V)^(α-1) (there each token's term is
at most 1/V), so τ lies in

    [-1, -(1/V)^(α-1)]  (that is, [(α-1) max z - 1, (α-1) max z - (1/V)^(α-1)] for unshifted z)

BISECTION_STEPS halvings of that interval, then NEWTON_STEPS Newton steps on f from the bracket's
lower end (f is convex and falling there, so the steps climb to the root without passing it),
reach float32's resolution of τ; the probabilities are renormalised to sum to 1 at the end. Each
step reads the logits once and keeps only [...] numbers, so XLA fuses it into one pass: no
[..., V] temporary per step (loss and gradient together hold two [..., V] float32 temporaries).

The Fenchel–Young loss of entmax (Blondel, Martins & Niculae) for target y, p* = entmax(z):

    L(z, y) = (p* - e_y)·z + H_α(p*)

It is >= 0, is 0 exactly when p* = e_y, and is finite for every target, also one whose entmax
probability is 0 (-log p*_y, GPT-Neo's entmax loss, is infinite there). Its gradient with respect
to z is p* - e_y, which `entmax_loss` returns directly (a custom VJP) rather than differentiating
through the bisection.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ALPHA = 1.3  # GPT-Neo's entmax_1.3
# 8 halvings leave a bracket for τ under 2^-8 ≈ 0.004 wide, a tenth of the top token's distance
# above τ (>= V^-(α-1), 0.039 at V = 50257); from there each Newton step squares the error, and 3
# reach float32's resolution of τ (measured against a float64 entmax: 4 halvings are too few)
BISECTION_STEPS = 8
NEWTON_STEPS = 3


def _power(x, exponent):
    """x^exponent for x >= 0 as exp(exponent * log x), and 0 at x = 0 for any exponent (a token
    outside the support adds nothing, also to f's slope): XLA vectorises exp and log, while a
    general float power runs element by element on a CPU, ~5x slower over a vocabulary."""
    if exponent == 0.0:  # the slope's exponent at α = 2: exp(0 * log 0) would be NaN
        return (x > 0).astype(x.dtype)
    return jnp.exp(exponent * jnp.log(x))  # exp(exponent * -inf) = 0 at x = 0


def entmax(logits, alpha: float = ALPHA):
    """α-entmax over the last axis: float32 probabilities summing to 1, with exact zeros.
    Logits of -inf (filtered-out tokens) get probability 0; a row needs one finite logit."""
    if not alpha > 1.0:
        raise ValueError(f"entmax: alpha = {alpha}: must be above 1 (alpha 1 is softmax)")
    z = logits.astype(jnp.float32)
    vocab = z.shape[-1]
    top = jnp.max(z, axis=-1, keepdims=True)
    power = 1.0 / (alpha - 1.0)

    def above(tau):  # [s_i - τ]_+; XLA fuses it into each pass (the bisection loop keeps one copy of s)
        return jnp.maximum((alpha - 1.0) * (z - top) - tau[..., None], 0.0)

    lo = jnp.full(z.shape[:-1], -1.0, jnp.float32)
    hi = jnp.full(z.shape[:-1], -((1.0 / vocab) ** (alpha - 1.0)), jnp.float32)

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        too_much = jnp.sum(_power(above(mid), power), axis=-1) >= 1.0  # τ is at least mid
        return jnp.where(too_much, mid, lo), jnp.where(too_much, hi, mid)

    lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, halve, (lo, hi))

    def newton(tau):
        # f(τ) = Σ [s_i - τ]_+^power - 1 is convex and falling, so Newton's steps from lo (f >= 0)
        # climb to the root without passing it; the clip keeps rounding inside the bracket, where
        # the top token keeps f' < 0
        lifted = _power(above(tau), power - 1.0)
        mass = jnp.sum(lifted * above(tau), axis=-1)
        slope = -power * jnp.sum(lifted, axis=-1)
        return jnp.clip(tau - (mass - 1.0) / slope, lo, hi)

    tau = lo
    for _ in range(NEWTON_STEPS):  # unrolled: a second loop would hold its own [..., V] copy of s
        tau = newton(tau)
    unnormalised = _power(above(tau), power)
    return unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)


def tsallis_entropy(probs, alpha: float = ALPHA):
    """H_α(p) = (1 - Σ p_j^α) / (α (α - 1)) over the last axis."""
    return (1.0 - jnp.sum(_power(probs, alpha), axis=-1)) / (alpha * (alpha - 1.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def entmax_loss(logits, labels, alpha: float = ALPHA):
    """The α-entmax Fenchel–Young loss per position: logits [..., V] (float32), labels [...] int
    -> [...] float32, (p* - e_y)·z + H_α(p*). Its gradient with respect to logits is p* - e_y."""
    return _loss_and_probs(logits, labels, alpha)[0]


def _loss_and_probs(logits, labels, alpha):
    z = logits.astype(jnp.float32)
    probs = entmax(z, alpha)
    # (p* - e_y)·z does not change when z moves by a constant (p* sums to 1): measured from the top
    # logit, the products stay small and the loss of a confident, correct prediction stays exact
    centred = z - jnp.max(z, axis=-1, keepdims=True)
    is_label = jnp.arange(z.shape[-1]) == labels[..., None]  # no gather: works with `vocab` sharded
    expected = jnp.sum(probs * centred, axis=-1)
    label_logit = jnp.sum(jnp.where(is_label, centred, 0.0), axis=-1)
    return expected - label_logit + tsallis_entropy(probs, alpha), probs


def _entmax_loss_forward(logits, labels, alpha):
    loss, probs = _loss_and_probs(logits, labels, alpha)
    return loss, (probs, labels)  # one [..., V] residual: p*


def _entmax_loss_backward(alpha, residuals, loss_cotangent):
    probs, labels = residuals
    is_label = jnp.arange(probs.shape[-1]) == labels[..., None]
    grad = loss_cotangent[..., None] * jnp.where(is_label, probs - 1.0, probs)
    return grad, None  # labels are integers: no gradient


entmax_loss.defvjp(_entmax_loss_forward, _entmax_loss_backward)
