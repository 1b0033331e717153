"""Mixture-of-experts layers (models/moe.py): routing, capacity and combine against a per-token
reference written here, the load-balancing loss against its formula, expert parallelism on 8
simulated devices, decoding with the cache, and a tiny MoE model that learns."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_fns
from configs import validate
from errors import ConfigError
from mesh import build_mesh_layout
from models import gpt2, moe
from optimizers import make_optimizer

MOE = {"moe_num_experts": 4, "moe_hidden_size": 24, "moe_group_size": 8}
TINY_MOE = {
    "n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_vocab": 64, "train_batch_size": 8, "eval_batch_size": 8,
    "moe_layers": [1], "moe_params": MOE, "lr": 1e-3, "warmup_steps": 0, "lr_decay": "none",
}


def config_with(**changes):
    return validate({**TINY_MOE, **changes}, "test")


# --- routing against a per-token reference ------------------------------------------------------


def reference_route(probs, capacity, gating, policy, threshold):
    """One group, token by token: (slots: {(token, expert): (slot, gate)}, dropped tokens). probs
    [tokens, experts] float64. Every first choice takes its slot before any second choice."""
    tokens, experts = probs.shape
    choices = []  # (token, expert, gate, rank)
    for t in range(tokens):
        order = sorted(range(experts), key=lambda e: (-probs[t, e], e))
        first, second = order[0], order[1]
        if gating == "top_1":
            choices.append((t, first, probs[t, first], 0))
            continue
        total = probs[t, first] + probs[t, second] + 1e-9
        g1, g2 = probs[t, first] / total, probs[t, second] / total
        choices.append((t, first, g1, 0))
        if policy == "all" or (policy == "threshold" and g2 > threshold):
            choices.append((t, second, g2, 1))
    filled = [0] * experts
    slots = {}
    for rank in (0, 1):
        for t, e, gate, r in choices:
            if r != rank:
                continue
            if filled[e] < capacity:
                slots[t, e] = (filled[e], gate)
            filled[e] += 1
    dropped = [t for t in range(tokens) if not any((t, e) in slots for e in range(experts))]
    return slots, dropped


@pytest.mark.parametrize("gating,policy", [("top_2", "all"), ("top_2", "threshold"), ("top_2", "none"),
                                           ("top_1", "all")])
def test_routing_capacity_and_slot_order_match_a_per_token_reference(gating, policy):
    experts, tokens, capacity = 4, 12, 3  # 12 tokens, 3 slots per expert: choices are dropped
    config = config_with(moe_params={**MOE, "moe_num_experts": experts, "moe_gating": gating,
                                     "moe_second_policy_eval": policy, "moe_second_threshold_eval": 0.3})
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, tokens, experts)) * 2  # two groups
    dispatch, combine, _, stats = moe.route(jnp.asarray(logits, jnp.float32), capacity, config, training=False)
    dispatch, combine = np.asarray(dispatch), np.asarray(combine)
    dropped_total = 0
    for g in range(2):
        probs = np.exp(logits[g]) / np.exp(logits[g]).sum(-1, keepdims=True)
        slots, dropped = reference_route(probs, capacity, gating, policy, 0.3)
        dropped_total += len(dropped)
        expected_dispatch = np.zeros((tokens, experts, capacity))
        expected_combine = np.zeros((tokens, experts, capacity))
        for (t, e), (slot, gate) in slots.items():
            expected_dispatch[t, e, slot] = 1
            expected_combine[t, e, slot] = gate
        np.testing.assert_array_equal(dispatch[g], expected_dispatch)
        np.testing.assert_allclose(combine[g], expected_combine, rtol=1e-5, atol=1e-7)
    assert float(stats["dropped"]) == pytest.approx(dropped_total / (2 * tokens))
    assert dropped_total > 0 or gating == "top_1"  # the case exercises capacity


def test_random_second_policy_is_deterministic_outside_training():
    config = config_with(moe_params={**MOE, "moe_second_policy_eval": "random", "moe_second_threshold_eval": 0.3})
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 4)), jnp.float32)
    as_threshold = config_with(moe_params={**MOE, "moe_second_policy_eval": "threshold", "moe_second_threshold_eval": 0.3})
    a = moe.route(logits, 8, config, training=False)[1]
    b = moe.route(logits, 8, as_threshold, training=False)[1]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # in training, random keeps each second choice with probability gate / threshold
    train = config_with(moe_params={**MOE, "moe_second_policy_train": "random", "moe_second_threshold_train": 1.0})
    wide = jnp.asarray(np.random.default_rng(3).normal(size=(64, 16, 4)), jnp.float32)
    kept = [float(jnp.sum(moe.route(wide, 16, train, True, jax.random.key(k))[0])) - 64 * 16 for k in range(4)]
    probs = np.asarray(jax.nn.softmax(wide, -1))
    top = np.sort(probs, -1)[..., ::-1]
    expected = np.sum(top[..., 1] / (top[..., 0] + top[..., 1]))  # gate_2 / threshold 1.0, summed
    assert abs(np.mean(kept) - expected) < 0.05 * 64 * 16


def test_load_balancing_loss_follows_its_formula_on_hand_built_probabilities():
    # 4 tokens, 2 experts; first choices: e0, e0, e0, e1 -> fractions (3/4, 1/4)
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    mean_probs = probs.mean(0)  # (0.6, 0.4)
    expected = 1e-2 * 2**2 * np.mean([3 / 4 * mean_probs[0], 1 / 4 * mean_probs[1]])
    config = config_with(moe_params={**MOE, "moe_num_experts": 2, "moe_loss_coef": 1e-2})
    _, _, aux, stats = moe.route(jnp.asarray(np.log(probs)[None], jnp.float32), 4, config, training=False)
    assert float(aux) == pytest.approx(expected, rel=1e-5)
    assert float(aux) == pytest.approx(0.011, rel=1e-5)  # 0.01 * 4 * (0.75 * 0.6 + 0.25 * 0.4) / 2
    # the busiest expert under top_1: e0 takes 3 of 4 tokens, 1.5 times the mean of 2
    top_1 = config_with(moe_params={**MOE, "moe_num_experts": 2, "moe_gating": "top_1"})
    _, _, aux_top_1, stats = moe.route(jnp.asarray(np.log(probs)[None], jnp.float32), 4, top_1, training=False)
    assert float(stats["max_load"]) == pytest.approx(1.5, rel=1e-5) and float(aux_top_1) == pytest.approx(expected)


def test_capacity_and_groups_follow_the_formula():
    assert moe.group_tokens(2048, 1024) == 1024 and moe.group_tokens(96, 64) == 48 and moe.group_tokens(7, 4) == 1
    assert moe.expert_capacity(1024, 16, 1.25, 1) == 80 and moe.expert_capacity(8, 16, 1.25, 1) == 1
    assert moe.expert_capacity(8, 4, 1.25, 4) == 4 and moe.expert_capacity(8, 1, 2.0, 1) == 8


# --- the layer against a per-token reference ---------------------------------------------------


def reference_moe(p, x, config, capacity):
    """x [batch, sequence, embd] float64: route each group (reference_route) and add up each kept
    expert's output times its gate, token by token."""
    settings = config.moe
    x = np.asarray(x, np.float64)
    batch, sequence, embd = x.shape
    tokens = moe.group_tokens(sequence, settings.group_size)
    router = np.asarray(p["router"], np.float64)
    wi = [np.asarray(w, np.float64) for w in p["wi"]]
    wo = np.asarray(p["wo"], np.float64)
    plain = {"relu": lambda h: np.maximum(h, 0.0), "linear": lambda h: h,
             "gelu": lambda h: 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))}
    acts = [plain[name] for name in moe.expert_activations(config)]
    y = np.zeros_like(x)
    for b in range(batch):
        for start in range(0, sequence, tokens):
            group = x[b, start:start + tokens]
            logits = group @ router
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            slots, _ = reference_route(probs, capacity, settings.gating, "threshold", settings.second_threshold_eval)
            for (t, e), (_, gate) in slots.items():
                hidden = np.ones(wo.shape[1])
                for act, w in zip(acts, wi):
                    hidden = hidden * act(group[t] @ w[e])
                y[b, start + t] += gate * (hidden @ wo[e])
    return y


@pytest.mark.parametrize("activation", ["relu", ["gelu", "linear"]], ids=["relu", "geglu"])
def test_moe_layer_equals_the_per_token_reference_with_dropped_tokens(activation):
    config = config_with(moe_activation=activation, moe_params={**MOE, "moe_second_policy_eval": "threshold"})
    params = gpt2.init_params(config, jax.random.key(0))["blocks"][1]["moe"]
    x = jax.random.normal(jax.random.key(1), (2, 16, 32))
    capacity = moe.expert_capacity(8, 4, config.moe.capacity_factor_eval, 1)
    y, _, stats = jax.jit(lambda p, x: moe.moe(p, x, config, None, training=False))(params, x)
    np.testing.assert_allclose(np.asarray(y), reference_moe(params, x, config, capacity), rtol=2e-4, atol=2e-5)
    # eval capacity factor 2.0 on 8-token groups: 4 slots per expert
    assert capacity == 4
    tight = config_with(moe_activation=activation, moe_params={**MOE, "moe_capacity_factor_eval": 0.5})
    y_tight, _, tight_stats = jax.jit(lambda p, x: moe.moe(p, x, tight, None, training=False))(params, x)
    np.testing.assert_allclose(np.asarray(y_tight), reference_moe(params, x, tight, 1), rtol=2e-4, atol=2e-5)
    assert float(tight_stats["dropped"]) > 0


def test_expert_weights_are_truncated_normal_with_fan_in_scale():
    config = config_with(moe_params={**MOE, "moe_hidden_size": 256, "moe_num_experts": 8}, n_embd=64)
    p = gpt2.init_params(config, jax.random.key(0))["blocks"][1]["moe"]
    wi, wo = np.asarray(p["wi"][0]), np.asarray(p["wo"])
    assert wi.shape == (8, 64, 256) and wo.shape == (8, 256, 64) and p["router"].shape == (64, 8)
    assert np.abs(wi).max() <= 2 / math.sqrt(64) + 1e-6 and np.abs(wo).max() <= 2 / math.sqrt(256) + 1e-6
    # a normal cut at 2 sigma keeps 0.88 of its standard deviation
    assert wi.std() == pytest.approx(0.88 / math.sqrt(64), rel=0.03)
    assert "mlp" not in gpt2.init_params(config, jax.random.key(0))["blocks"][1]


# --- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,named", [
    ({"moe_params": {"moe_num_expert": 4}}, "did you mean 'moe_num_experts'"),
    ({"moe_params": {"moe_gating": "top_3"}}, "top_1, top_2"),
    ({"moe_params": {"moe_capacity_factor_train": 0}}, "moe_params.moe_capacity_factor_train"),
    ({"moe_params": {"moe_second_policy_train": "sometimes"}}, "all, none, threshold, random"),
    ({"moe_params": {"moe_use_second_place_loss": True}}, "moe_use_second_place_loss"),
    ({"moe_activation": "rellu"}, "did you mean 'relu'"),
    ({"moe_activation": []}, "non-empty list"),
    ({"moe_layers": [2]}, "[0, n_layer = 2)"),
])
def test_moe_config_errors_name_the_key_and_what_is_accepted(changes, named):
    with pytest.raises(ConfigError) as err:
        config_with(**changes)
    assert named in str(err.value)


def test_moe_params_take_mesh_tensorflow_defaults():
    settings = config_with(moe_params=None).moe
    assert (settings.num_experts, settings.gating, settings.capacity_factor_train, settings.capacity_factor_eval,
            settings.hidden_size, settings.group_size, settings.min_expert_capacity, settings.loss_coef,
            settings.second_policy_train, settings.second_threshold_train, settings.dropout_rate) == \
        (16, "top_2", 1.25, 2.0, 4096, 1024, 1, 1e-2, "random", 0.2, 0.0)


def test_expert_count_must_divide_its_mesh_axis():
    config = config_with(mesh_shape="x:8", layout="batch:x,experts:x")  # 4 experts on 8 devices
    with pytest.raises(ConfigError, match="'experts' has size 4, which does not divide evenly by mesh axis 'x'"):
        model_fns.param_shardings(config, build_mesh_layout(config, jax.devices()))


def test_active_parameters_count_two_of_e_experts():
    config = config_with()
    dense = config_with(moe_layers=None)
    experts = gpt2.parameter_count(config, experts=True)
    assert experts == 4 * (32 * 24 + 24 * 32)
    assert gpt2.parameter_count(config) - experts == gpt2.parameter_count(dense) - (32 * 128 + 128 + 128 * 32 + 32) + 32 * 4
    active = gpt2.parameter_count(config, matmul_only=True)
    assert active == gpt2.parameter_count(dense, matmul_only=True) - 2 * 32 * 128 + 32 * 4 + experts // 2


# --- training: sharded equals single-device; expert parallelism ------------------------------


def run_steps(config, devices, batches):
    """(metrics per step, final params, compiled step's HLO text): the step compiled once, ahead of time."""
    layout = build_mesh_layout(config, devices)
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = model_fns.init_state(config, layout, optimizer, shardings)
    inputs = jnp.asarray(batches[0][:, :-1])
    step = model_fns.make_train_step(config, layout, optimizer, shardings).lower(state, inputs, inputs).compile()
    history = []
    for batch in batches:
        state, metrics = step(state, jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:]))
        history.append({k: float(v) for k, v in metrics.items()})
    return history, jax.device_get(state["params"]), step.as_text(), state


def batches_for(config, count, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.n_vocab, (count, config.train_batch_size, config.n_ctx + 1), dtype=np.int32)


SHARDED = {"moe_params": {**MOE, "moe_num_experts": 8}}  # 8 experts: an axis of size 4 holds 2 per device


@pytest.fixture(scope="module")
def single_device_moe():
    """policy -> one device's run, without microbatches. `random` second choices draw with a key
    folded per microbatch, so microbatched runs compare under the deterministic `threshold`."""
    runs = {}

    def run(policy):
        if policy not in runs:
            config = config_with(moe_params={**SHARDED["moe_params"], "moe_second_policy_train": policy})
            runs[policy] = run_steps(config, jax.devices()[:1], batches_for(config, 3))[:2]
        return runs[policy]

    return run


@pytest.mark.parametrize("mesh_shape,layout,microbatch", [
    ("x:8", "batch:x", None),  # experts replicated
    ("x:4,y:2", "batch:x,experts:y,heads:y", 16),  # experts on an axis of size 2; 2 microbatches
    ("x:2,y:4", "batch:x,experts:y", None),  # and of size 4
    ("x:2,y:4", "batch:y,experts:y", 16),  # experts on the batch's own axis (all-to-all); 2 microbatches
], ids=["replicated", "experts-y2-microbatches", "experts-y4", "experts-on-batch-axis-microbatches"])
def test_sharded_moe_training_equals_single_device(single_device_moe, mesh_shape, layout, microbatch):
    """Routing groups are rows' runs of positions, so neither the mesh nor microbatching moves a
    token's experts: losses, routing statistics and parameters equal one device's without
    microbatches. Expert weights stay sharded: each device holds its own experts, and the compiled
    step never gathers them."""
    policy = "threshold" if microbatch else "random"
    config = config_with(moe_params={**SHARDED["moe_params"], "moe_second_policy_train": policy},
                         mesh_shape=mesh_shape, layout=layout, tokens_per_mb_per_replica=microbatch)
    expected_history, expected_params = single_device_moe(policy)
    history, params, hlo, state = run_steps(config, jax.devices(), batches_for(config, 3))
    for name in ("loss", "moe_dropped/1", "moe_max_load/1"):
        np.testing.assert_allclose([h[name] for h in history], [h[name] for h in expected_history], rtol=1e-5,
                                   err_msg=name)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(expected_params)):
        assert np.linalg.norm(a - b) <= 1e-4 * max(np.linalg.norm(b), 1e-12), jax.tree_util.keystr(path)
    assert history[-1]["moe_dropped/1"] > 0  # training capacity drops tokens here: the case exercises it

    axis = dict(pair.split(":") for pair in layout.split(",")).get("experts")
    if axis is None:
        return
    size = int(dict(pair.split(":") for pair in mesh_shape.split(","))[axis])
    wi = state["params"]["blocks"][1]["moe"]["wi"][0]
    assert wi.sharding.shard_shape(wi.shape) == (8 // size, 32, 24)
    gathered = [line for line in hlo.splitlines() if re.search(r"all-gather(-start)?\(", line)
                and re.search(r"\[8,(32,24|24,32)\]", line.split("all-gather")[0])]
    assert not gathered, gathered[:2]
    if "batch:" + axis in layout:
        assert re.search(r"all-to-all(-start)?\(", hlo)  # tokens travel to their experts' devices


# --- decoding, evaluation, a model that learns ----------------------------------------------


def test_decoding_with_the_cache_equals_the_full_forward_without_capacity_limits():
    """A cache means decoding: capacity is unbounded, so step-by-step decoding equals a forward
    whose capacity drops nothing (a capacity factor of E)."""
    config = config_with(moe_params={**MOE, "moe_capacity_factor_eval": 4.0})
    params = gpt2.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    expected = jax.jit(lambda p, t: gpt2.logits(p, t, config))(params, tokens)
    cache = gpt2.init_cache(config, 2, 16)
    forward = jax.jit(lambda p, t, c: gpt2.forward(p, t, config, cache=c)[:2])
    hidden, cache = forward(params, tokens[:, :5], cache)
    pieces = [hidden]
    for t in range(5, 12):
        hidden, cache = forward(params, tokens[:, t:t + 1], cache)
        pieces.append(hidden)
    logits = gpt2.unembed(jnp.concatenate(pieces, axis=1), gpt2.output_weights(params, config), config)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-4, atol=1e-4)

    # --predict's compiled decode loop, greedy, against a loop of full forwards
    from sample import generate

    sampled = generate(params, config, [3, 4, 5], max_new_tokens=4, temperature=0.0).tokens[0]
    logits_of = jax.jit(lambda p, t: gpt2.logits(p, t, config))
    sequence = [3, 4, 5]
    for _ in range(4):
        sequence.append(int(jnp.argmax(logits_of(params, jnp.asarray([sequence]))[0, -1])))
    assert list(sampled) == sequence[3:]


def test_eval_is_deterministic_and_adds_the_aux_loss_once_per_moe_layer():
    config = config_with(moe_layers=[0, 1], moe_params={**MOE, "moe_loss_coef": 0.5})
    params = gpt2.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
    loss_of = jax.jit(lambda p, t, c: model_fns.lm_loss(p, t, t, c, None), static_argnums=2)
    loss, extras = loss_of(params, tokens, config)
    again, _ = loss_of(params, tokens, config)
    assert float(loss) == float(again)
    _, _, aux = jax.jit(lambda p, t: gpt2.forward(p, t, config))(params, tokens)
    # each layer's balance term is at least 1 (E^2 * mean(f * p) >= 1 by Cauchy-Schwarz), times 0.5
    assert float(aux["losses"]["moe_aux_loss"]) >= 2 * 0.5 - 1e-5
    without = config_with(moe_layers=[0, 1], moe_params={**MOE, "moe_loss_coef": 0.0})
    plain, _ = loss_of(params, tokens, without)
    assert float(loss) - float(plain) == pytest.approx(float(aux["losses"]["moe_aux_loss"]), rel=1e-4)
    assert set(extras) == {"cross_entropy", "moe_dropped/0", "moe_max_load/0", "moe_dropped/1", "moe_max_load/1"}


def test_a_tiny_moe_model_learns_and_its_router_comes_to_choose_by_token():
    """Next-token rules that depend only on the token (no attention): the loss falls below a mark,
    and the router, whose choices at init also vary with the position, comes to send each token to
    one expert at every position, with both experts in use."""
    vocab = 32
    config = validate({
        "n_ctx": 8, "n_embd": 32, "n_head": 2, "n_layer": 1, "n_vocab": vocab, "train_batch_size": 16,
        "attention_types": [[["none"], 1]], "moe_layers": [0], "lr": 1e-2, "warmup_steps": 0, "lr_decay": "none",
        "moe_params": {"moe_num_experts": 2, "moe_gating": "top_1", "moe_hidden_size": 8, "moe_group_size": 8,
                       "moe_capacity_factor_train": 2.0, "moe_capacity_factor_eval": 2.0},
    }, "test")
    half = vocab // 2
    successor = np.concatenate([(np.arange(half) * 5 + 3) % half, half + (np.arange(half) * 7 + 1) % half])
    rng = np.random.default_rng(0)
    layout = build_mesh_layout(config, jax.devices()[:1])
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = model_fns.init_state(config, layout, optimizer, shardings)
    step = model_fns.make_train_step(config, layout, optimizer, shardings)

    def choices(params):  # [token, position] -> the expert the router picks
        x = params["wte"][:, None, :] + params["wpe"][None, :8, :]
        normed = gpt2.prenorm(params["blocks"][0]["ln_2"], x, config)
        return np.asarray(jnp.argmax(normed @ params["blocks"][0]["moe"]["router"], axis=-1))

    def by_token(choice):  # the mean share of a token's positions that go to its usual expert
        return np.mean([max(np.mean(row), 1 - np.mean(row)) for row in choice])

    at_init = by_token(choices(state["params"]))
    for _ in range(150):
        tokens = rng.integers(0, vocab, (16, 9))
        state, metrics = step(state, jnp.asarray(tokens[:, :-1]), jnp.asarray(successor[tokens[:, :-1]]))
    assert float(metrics["cross_entropy"]) < 0.3, float(metrics["cross_entropy"])
    trained = choices(state["params"])
    assert by_token(trained) >= 0.98 > at_init
    assert 0.2 <= np.mean(trained) <= 0.8  # both experts serve tokens


def test_gpt_neo_test_suite_combination_shares_one_block_of_mlp_and_experts():
    """GPT-Neo's own model test combined MoE in layer 1 with shared parameters, memory key/values,
    an untied output and residual dropout (its axial table, 32 x 32 for n_ctx 4, is made to fit);
    test_train.py's GPT-Neo combination trains and samples such a model through main.py."""
    config = validate({
        "n_head": 1, "n_ctx": 4, "n_embd": 1, "n_vocab": 256, "n_layer": 2, "train_batch_size": 1,
        "attention_types": [[["global", "local"], 1]], "res_dropout": 0.1, "axial_pos_emb": [2, 2],
        "moe_layers": [1], "num_mem_kv": 16, "no_weight_tie": True, "moe_params": {"moe_dropout_rate": 0.0},
        "local_attention_radius": 128, "share_parameters": True, "lr": 1e-3, "warmup_steps": 0,
    }, "test")
    block = gpt2.init_params(config, jax.random.key(0))["blocks"]
    assert len(block) == 1 and {"mlp", "moe"} <= set(block[0])  # layer 0's MLP and layer 1's experts, shared
    assert block[0]["moe"]["wi"][0].shape == (16, 1, 4096)
