"""machine.py: the CPU's description, the hardware-peak estimate, and the start-up probe that picks
XLA:CPU's dot library and neomesh's CPU kernels per machine, cached; decode_precision bfloat16."""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_layout import compiled_decode_hlo, computations

import machine
import sample
from configs import validate
from errors import ConfigError
from models import gpt2
from sample import generate


def tiny_config(**overrides):
    values = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_ctx": 32, "n_vocab": 64, "train_batch_size": 2}
    return validate(values | overrides, "tests/test_machine.py")


@pytest.fixture
def probe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOMESH_CACHE", str(tmp_path))
    return tmp_path / "cpu_probe.json"


def test_the_cpu_description_names_the_model_flags_and_usable_cores():
    info = machine.cpu_info()
    assert info["cpu_model"] and info["cores"] == len(os.sched_getaffinity(0))
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    assert info["flags"]["avx2"] == ("avx2" in flags) and info["flags"]["avx512f"] == ("avx512f" in flags)
    described = machine.describe()
    assert described["jax"] == jax.__version__ and "float32_peak_gflops" in described


def test_the_float32_peak_estimate_follows_the_documented_formula():
    # the 2-core 2.6 GHz Ice Lake of issue 18: 2 x 2.6 GHz x 2 AVX-512 FMA units x 16 lanes x 2 = 332.8 GFLOP/s
    ice_lake = {"cores": 2, "ghz": 2.6, "flags": dict.fromkeys(machine.FLAGS_OF_INTEREST, True)}
    peak, formula = machine.float32_peak(ice_lake)
    assert peak == pytest.approx(332.8e9) and "estimate" in formula
    avx2_only = dict(ice_lake, flags=dict(ice_lake["flags"], avx512f=False))
    assert machine.float32_peak(avx2_only)[0] == pytest.approx(2 * 2.6e9 * 2 * 8 * 2)
    assert machine.float32_peak(dict(ice_lake, ghz=None))[0] is None
    # AMD's Zen 4 (family 25) runs AVX-512 on two 256-bit FMA units: half the lanes per cycle of
    # Zen 5 (family 26), whose units are 512 bits wide
    zen = dict(ice_lake, vendor="AuthenticAMD", flags=dict(ice_lake["flags"], amx_tile=False, amx_bf16=False))
    assert machine.float32_peak(dict(zen, family=25))[0] == pytest.approx(2 * 2.6e9 * 1 * 16 * 2)
    assert machine.float32_peak(dict(zen, family=26))[0] == pytest.approx(332.8e9)


def test_a_matmul_measured_above_the_estimated_peak_raises_the_peak_to_it():
    estimate, formula = machine.float32_peak({"cores": 2, "ghz": 2.596, "vendor": "AuthenticAMD", "family": 25,
                                              "flags": dict.fromkeys(machine.FLAGS_OF_INTEREST, True)})
    assert estimate == pytest.approx(166.1e9, rel=1e-3)
    # below the estimate: kept as estimated
    assert machine.peak_not_below_measured(estimate, formula, {"XLA": 150e9, "PyTorch": None}) == (estimate, formula)
    # a boosting Zen 4 under KVM measured 211 GFLOP/s: the peak can be no lower, and the formula says why
    peak, why = machine.peak_not_below_measured(estimate, formula, {"XLA": 211e9, "PyTorch": 183e9})
    assert peak == 211e9 and "XLA's float32 matmul measured here, 211.0 GFLOP/s" in why and "166.1" in why
    assert machine.peak_not_below_measured(None, "unknown clock", {"XLA": None, "PyTorch": 90e9})[0] == 90e9
    assert machine.peak_not_below_measured(None, "unknown clock", {"XLA": None, "PyTorch": None}) == (None, "unknown clock")


def test_the_kernel_probe_times_both_attention_kernels_caches_the_choice_and_logs_it(probe_cache, caplog, monkeypatch):
    config = tiny_config(n_layer=3, attention_types=[[["global", "local", "local"], 1]], local_attention_radius=8)
    with caplog.at_level(logging.INFO, logger="neomesh"):
        tuned = machine.tune(config)
    assert tuned.attention_kernel in machine.ATTENTION_KERNELS
    assert tuned.replace(attention_kernel="auto").to_dict() == config.to_dict()  # nothing else changes
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("cpu probe:"))
    assert f"cpu probe: attention_kernel {tuned.attention_kernel};" in line
    timed = dict(re.findall(r"(blocked|plain) ([\d.]+) ms", line))
    assert set(timed) == {"blocked", "plain"} and all(float(ms) > 0 for ms in timed.values())
    assert "at n_ctx 32, 2 heads" in line and "in float32" in line
    cached = json.loads(probe_cache.read_text())
    (key, entry), = cached.items()
    assert "jax " + jax.__version__ in key and machine.cpu_info()["cpu_model"] in key
    assert entry["attention_kernel"] == tuned.attention_kernel

    # the cached choice is read back, not probed again: a planted choice comes back as it is
    planted = {"plain": "blocked", "blocked": "plain"}[tuned.attention_kernel]
    probe_cache.write_text(json.dumps({key: dict(entry, attention_kernel=planted)}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neomesh"):
        again = machine.tune(config)
    assert again.attention_kernel == planted
    assert any("(cached)" in r.getMessage() for r in caplog.records)

    # under another dot library, at another context or in another dtype the choice is probed again
    machine.tune(config.replace(n_ctx=64))
    machine.tune(config.replace(precision="bfloat16"))
    monkeypatch.setenv("XLA_FLAGS", machine.XLA_DOT_OPTIONS["eigen"][1])
    machine.tune(config)
    assert len(json.loads(probe_cache.read_text())) == 4


def test_the_attention_probe_counts_the_layers_whose_attention_the_kernel_decides():
    """global and local layers, not a global layer with memory key/values (plain only), nor linear,
    gau or none layers, nor anything under mlm_training."""
    mixed = tiny_config(n_layer=6, attention_types=[[["global", "local", "linear", "none", "local", "gau"], 1]],
                        local_attention_radius=8, gau_key_size=16)
    assert machine.attention_kernel_layers(mixed) == {"global": 1, "local": 2}
    assert machine.attention_kernel_layers(mixed.replace(num_mem_kv=2)) == {"local": 2}
    assert not machine.attention_kernel_layers(mixed.replace(mlm_training=True, mlm_mask_id=1))
    assert machine.time_attention_kernels(tiny_config(attention_types=[[["linear"], 1]])) is None
    seconds = machine.time_attention_kernels(mixed)
    assert set(seconds) == set(machine.ATTENTION_KERNELS) and all(s > 0 for s in seconds.values())


def test_a_config_without_a_choice_to_make_is_not_probed(probe_cache):
    forced = tiny_config(attention_kernel="blocked", cpu_backward="plain")
    assert machine.tune(forced).to_dict() == forced.to_dict()
    linear_only = tiny_config(attention_types=[[["linear"], 1]])
    assert machine.tune(linear_only).attention_kernel == "auto"
    assert not probe_cache.exists()


def test_forced_keys_and_cpu_probe_off_skip_the_probe(probe_cache):
    forced = tiny_config(attention_kernel="blocked", cpu_backward="written")
    assert machine.tune(forced).to_dict() == forced.to_dict()
    off = tiny_config(cpu_probe="off")
    assert machine.tune(off).to_dict() == off.to_dict()
    assert machine.tune(off, decoding=True).to_dict() == off.to_dict()
    assert machine.set_xla_dot_option(off, decoding=False) is None
    assert not probe_cache.exists()


def test_the_probe_stops_timing_an_option_slower_than_the_fastest_in_every_round_of_a_majority(monkeypatch):
    """Passes add up, counted, to the options being chosen between; one slower in every round
    stops being timed once a majority of the rounds has run (5 of 9), and timing ends when one
    option is left. Where the first round shows the rounds would overrun the budget, as many as
    fit run, at least 3. (Timed on a clock the passes move on, so that nothing here is noise.)"""
    now = [0.0]
    monkeypatch.setattr(machine.time, "perf_counter", lambda: now[0])
    calls = collections.Counter()

    def taking(name, seconds):
        def run():
            calls[name] += 1
            now[0] += seconds
        return run

    # option a: two 8 ms passes; option b: one 2 ms pass that a step runs 20 times
    passes = {("a", 1): taking("a1", 0.008), ("a", 2): taking("a2", 0.008), ("b", 1): taking("b1", 0.002)}
    counts = {("a", 1): 1, ("a", 2): 1, ("b", 1): 20}
    seconds = machine.time_round_robin(passes, 9, option_of=lambda name: name[0], count_of=counts.get)
    assert calls == {"a1": 1 + 5, "a2": 1 + 5, "b1": 1 + 5}
    assert seconds == {("a", 1): pytest.approx(0.008), ("a", 2): pytest.approx(0.008), ("b", 1): pytest.approx(0.002)}
    calls.clear()  # uncounted, b is the fastest: a stops instead, after as many rounds
    machine.time_round_robin(passes, 9, option_of=lambda name: name[0])
    assert calls == {"a1": 1 + 5, "a2": 1 + 5, "b1": 1 + 5}
    calls.clear()  # options that never part get every round
    machine.time_round_robin({"x": taking("x", 0.01), "y": taking("y", 0.01)}, 9)
    assert calls == {"x": 1 + 9, "y": 1 + 9}
    calls.clear()  # so does a single option
    machine.time_round_robin({"x": taking("x", 0.01)}, 9)
    assert calls == {"x": 1 + 9}
    calls.clear()  # 0.1 s rounds and a 0.55 s budget: 5 rounds
    machine.time_round_robin({"x": taking("x", 0.05), "y": taking("y", 0.05)}, 9, budget=0.55)
    assert calls == {"x": 1 + 5, "y": 1 + 5}
    calls.clear()  # never fewer than 3
    machine.time_round_robin({"x": taking("x", 0.05), "y": taking("y", 0.05)}, 9, budget=0.01)
    assert calls == {"x": 1 + 3, "y": 1 + 3}
    assert machine.time_round_robin({}, 9, budget=1.0) == {}


def test_the_xla_dot_probe_times_the_products_in_the_dtype_the_run_computes_them_in(probe_cache):
    """bfloat16 products are where the dot libraries differ most (XLA's own kernels convert them to
    float32 first), so a bfloat16 decode is probed apart from a float32 one and keeps its own choice,
    its products in the dtype its loop streams them in (streamed_dtypes)."""
    float32 = machine.choose_xla_dot_option(tiny_config(predict_batch_size=4), decoding=True)
    bfloat16 = machine.choose_xla_dot_option(tiny_config(predict_batch_size=4, decode_precision="bfloat16"), decoding=True)
    assert "in float32" in float32["why"] and "in bfloat16" in bfloat16["why"]
    assert len(json.loads(probe_cache.read_text())) == 2
    assert all(seconds is None or seconds > 0 for seconds in bfloat16["seconds"].values())
    # and the probe runs the products as the model asks for them: in bfloat16, accumulating in float32,
    # decoding's in both of decode_product's orders (a library is judged by its faster one)
    products = [[4, 32, 128, 3]]  # rows, in, out, per step
    training = machine.time_dot_options(products, "bfloat16")
    assert set(training["seconds"]["default"]) == {"rows_first"}
    assert training["streamed"]["default"] == {"rows_first": ["bfloat16"]}  # no loop: as asked
    both = machine.time_dot_options(products, "bfloat16", machine.DECODE_ORDERS, decoding=True)["seconds"]["default"]
    assert set(both) == {"rows_first", "weights_first"} and all(s > 0 for s in both.values())
    assert "(rows_first / weights_first)" in bfloat16["why"]
    assert bfloat16["seconds"]["default"] == pytest.approx(min(float(ms) for ms in re.search(
        r"default ([\d.]+) / ([\d.]+) ms", bfloat16["why"]).groups()) / 1e3, abs=1e-4)


def test_a_dot_probe_that_timed_nothing_keeps_xlas_default_is_not_cached_and_the_decode_order_is_timed(probe_cache, monkeypatch):
    """A probe subprocess that dies (here: XLA refuses an unknown flag) is no finding: the run keeps
    XLA's default, the next run probes again, and the decode order is timed under the library in
    force instead of read from the failed probe."""
    config = tiny_config(predict_batch_size=2)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_no_such_flag_for_the_probe=1")
    failed = machine.choose_xla_dot_option(config, decoding=True)
    assert failed["option"] == "default" and "probed again next run" in failed["why"]
    assert all(seconds is None for seconds in failed["seconds"].values())
    assert not probe_cache.exists()
    monkeypatch.setenv("XLA_FLAGS", "")
    # were such a probe's entry in the cache (as older versions wrote it), the order is timed
    products = machine.probe_products(config, decoding=True)
    probe_cache.write_text(json.dumps({machine.dot_option_key(products, "float32", decoding=True): failed}))
    choice = machine.choose_decode_product(config)
    assert choice["decode_product"] in machine.DECODE_ORDERS and "timed under the dot library in force" in choice["why"]
    probe_cache.unlink()
    assert machine.choose_xla_dot_option(config, decoding=True)["seconds"]["default"] is not None
    assert len(json.loads(probe_cache.read_text())) == 1


def test_the_decoding_probe_runs_one_tokens_products_over_weights_that_do_not_fit_in_the_cache():
    """A token reads every weight once: the probe counts each product as often as a token runs
    it, and reads each shape from as many distinct weights as exceed the last-level cache by half
    (at most the token's count), so neither the vocabulary alone nor a cached weight decides."""
    try:  # util-linux's reading of one cache of each level agrees (glibc's getconf gives a whole socket's L3)
        caches = subprocess.run(["lscpu", "-B", "-C=NAME,ONE-SIZE", "--noheadings"], capture_output=True, text=True).stdout
    except OSError:
        caches = ""
    sizes = [int(size) for size in re.findall(r"^\S+\s+(\d+)$", caches, re.MULTILINE)]
    if sizes:
        assert machine.last_level_cache_bytes() == max(sizes)
    streamed = 3 * machine.last_level_cache_bytes() // 2
    config = tiny_config(n_layer=3, n_embd=512, n_head=8, mlp_glu=True, intermediate_size=1536, n_vocab=4096,
                         predict_batch_size=2)
    products = machine.probe_products(config, decoding=True)
    counts = {(rows, inner, out): count for rows, inner, out, count in products}
    assert counts == {(2, 512, 512): 3 * 4, (2, 512, 1536): 3 * 2, (2, 1536, 512): 3, (2, 512, 4096): 1}
    for product in products:
        _, inner, out, count = product
        copies = machine.weight_copies(product, "float32")
        assert 1 <= copies <= count
        assert copies == count or copies * inner * out * 4 >= streamed > (copies - 1) * inner * out * 4
        assert machine.weight_copies(product, "bfloat16") >= copies  # half the bytes: as many copies or more
    # a step's time: each product's pass over its copies scaled to its count
    step = [[1, 2048, 4096, 100], [1, 8, 80, 1]]  # a 16 MB bfloat16 weight a step reads 100 times, one read once
    operands = machine.product_operands(step, {"weights_first": ["bfloat16", "float32"]}, ["weights_first"])
    (x, weights), (_, vocabulary) = operands["weights_first"]
    copies = machine.weight_copies(step[0], "bfloat16")
    assert x.shape == (1, 2048) and x.dtype == jnp.bfloat16 and len(vocabulary) == 1 and vocabulary[0].dtype == jnp.float32
    assert len(weights) == copies < 100 and weights[0].shape == (4096, 2048)  # out-first, distinct buffers
    assert len({w.unsafe_buffer_pointer() for w in weights}) == copies
    seconds = {("weights_first", 0): 0.2, ("weights_first", 1): 0.5}
    assert machine.seconds_per_step(step, operands, seconds, ["weights_first"]) == \
        {"weights_first": pytest.approx(0.2 * 100 / copies + 0.5)}
    # training's products are bound by arithmetic: once each
    assert all(product[3] == 1 for product in machine.probe_products(config, decoding=False))


def test_the_xla_dot_probe_sets_one_of_its_options_and_a_user_flag_wins(probe_cache, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    config = tiny_config(predict_batch_size=1)
    choice = machine.set_xla_dot_option(config, decoding=True)
    assert choice["option"] in machine.XLA_DOT_OPTIONS
    assert os.environ["XLA_FLAGS"].strip() == machine.XLA_DOT_OPTIONS[choice["option"]][1]
    assert choice["seconds"]["default"] is not None  # XLA's default always runs
    assert json.loads(probe_cache.read_text())  # cached
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=false")
    assert machine.set_xla_dot_option(config, decoding=True) is None
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_onednn=false"


def test_the_decode_probe_times_both_orders_of_the_decoding_products_caches_and_logs_the_choice(probe_cache, caplog):
    config = tiny_config(predict_batch_size=4)
    with caplog.at_level(logging.INFO, logger="neomesh"):
        tuned = machine.tune(config, decoding=True)
    assert tuned.decode_product in ("rows_first", "weights_first")
    assert tuned.replace(decode_product="auto").to_dict() == config.to_dict()  # nothing else changes
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("cpu probe: decode_product"))
    assert f"decode_product {tuned.decode_product};" in line
    timed = dict(re.findall(r"(rows_first|weights_first) ([\d.]+) ms", line))
    assert set(timed) == {"rows_first", "weights_first"} and all(float(ms) > 0 for ms in timed.values())
    # one token's products: q, k, v and out, the MLP's two, the vocabulary's
    assert "[(4, 32, 32) x4, (4, 32, 128), (4, 128, 32), (4, 32, 64)] in float32" in line
    (key, entry), = json.loads(probe_cache.read_text()).items()
    # the planted opposite comes back from the cache; another batch or dtype is probed apart
    planted = {"rows_first": "weights_first", "weights_first": "rows_first"}[tuned.decode_product]
    probe_cache.write_text(json.dumps({key: dict(entry, decode_product=planted)}))
    assert machine.tune(config, decoding=True).decode_product == planted
    machine.tune(config.replace(predict_batch_size=1), decoding=True)
    machine.tune(config.replace(decode_precision="bfloat16"), decoding=True)
    assert len(json.loads(probe_cache.read_text())) == 3
    # a value in the config is kept, and training leaves the key alone
    forced = tiny_config(predict_batch_size=4, decode_product="weights_first")
    assert machine.tune(forced, decoding=True).decode_product == "weights_first"
    assert machine.tune(config).decode_product == "auto"


def test_the_decode_order_under_the_probed_dot_library_comes_from_the_dot_probes_own_timings(probe_cache, monkeypatch):
    """The dot probe has already timed both orders under the library it chose: the order is
    chosen from those figures, not timed a second time; under a library set by hand it is timed."""
    monkeypatch.setenv("XLA_FLAGS", "")
    config = tiny_config(predict_batch_size=4)
    dots = machine.set_xla_dot_option(config, decoding=True)
    choice = machine.choose_decode_product(config)
    assert f"the dot probe's, under {dots['option']}" in choice["why"]
    timed = dict(re.findall(r"(rows_first|weights_first) ([\d.]+) ms", choice["why"]))
    for order, seconds in dots["by_order"][dots["option"]].items():
        assert float(timed[order]) == pytest.approx(seconds * 1e3, abs=0.006)
    other = next(name for name in machine.XLA_DOT_OPTIONS if name not in ("default", dots["option"]))
    monkeypatch.setenv("XLA_FLAGS", machine.XLA_DOT_OPTIONS[other][1])
    assert "timed under the dot library in force" in machine.choose_decode_product(config)["why"]


def test_weights_first_is_not_kept_where_its_copy_of_the_weights_would_not_fit_in_memory(probe_cache):
    """Weights-first decoding keeps an out-first copy of the block weights while sampling: a
    cached choice of it gives way to rows first when that copy would take over half the memory
    available (here a model far larger than any machine's memory, its choice planted in the
    cache so that nothing is timed)."""
    config = tiny_config(n_layer=1000, n_embd=16384, n_head=128, predict_batch_size=8)
    products = machine.probe_products(config, decoding=True)
    copy = machine.weights_first_copy_bytes(products, "float32")
    assert copy == 1000 * (4 * 16384 * 16384 + 2 * 16384 * 4 * 16384) * 4  # q, k, v, out and the MLP's two; not the vocabulary
    assert machine.weights_first_copy_bytes(products, "bfloat16") == copy // 2
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
    assert machine.available_memory_bytes() == int(meminfo["MemAvailable"].split()[0]) * 1024
    key = machine.machine_key("decode product", products, "float32", machine.dot_flags_in_force() or "default dots")
    probe_cache.write_text(json.dumps({key: {"decode_product": "weights_first", "why": "planted"}}))
    choice = machine.choose_decode_product(config)
    assert choice["decode_product"] == "rows_first"
    assert "but weights first would copy" in choice["why"] and "GB of memory available" in choice["why"]
    small = tiny_config(predict_batch_size=8)  # a copy that fits keeps the cached choice
    small_products = machine.probe_products(small, decoding=True)
    key = machine.machine_key("decode product", small_products, "float32", machine.dot_flags_in_force() or "default dots")
    probe_cache.write_text(json.dumps({key: {"decode_product": "weights_first", "why": "planted"}}))
    assert machine.choose_decode_product(small)["decode_product"] == "weights_first"


@pytest.mark.parametrize("key, value", [("cpu_probe", "on"), ("decode_precision", "float16"), ("cpu_backward", "cpu"),
                                        ("decode_product", "columns_first")])
def test_bad_probe_and_decode_keys_are_clear_errors(key, value):
    with pytest.raises(ConfigError, match=f"{key}.*{value}"):
        tiny_config(**{key: value})


def test_bfloat16_decoding_runs_in_bfloat16_and_its_logits_stay_close_to_float32s():
    config = tiny_config(n_layer=2, n_ctx=32, n_vocab=128)
    params = jax.jit(lambda key: gpt2.init_params(config, key))(jax.random.key(0))
    prompt = np.random.default_rng(0).integers(0, config.n_vocab, (1, 24)).astype(np.int32)
    # the reference: the float32 model's logits, and the same model with every weight rounded to
    # bfloat16 and run as precision bfloat16 computes (what decode_precision bfloat16 decodes with)
    reference = np.asarray(jax.jit(lambda p: gpt2.logits(p, prompt, config))(params), np.float64)
    rounded = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    bf16_config = config.replace(precision="bfloat16")
    bf16_logits = np.asarray(jax.jit(lambda p: gpt2.logits(p, prompt, bf16_config))(rounded), np.float64)
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); two layers of rounded weights
    # and activations compound a few dozen such roundings (measured: max 3%, mean 0.5% of the
    # logits' spread): bounds of 10% and 2% leave room, and a wrong cast or layout would be off by
    # the spread itself
    spread = reference.std()
    assert np.abs(bf16_logits - reference).max() < 0.1 * spread
    assert np.abs(bf16_logits - reference).mean() < 0.02 * spread
    assert np.abs(bf16_logits - reference).max() > 0  # it did round

    bf16 = config.replace(decode_precision="bfloat16")
    samples = generate(params, bf16, prompt.tolist(), max_new_tokens=8, temperature=0.0)
    assert len(samples.tokens[0]) == 8 and all(0 <= t < config.n_vocab for t in samples.tokens[0])
    # the first new token is the bfloat16 model's greedy choice after the prompt
    assert samples.tokens[0][0] == int(np.argmax(bf16_logits[0, -1]))


def test_bfloat16_decoding_of_several_rows_streams_bfloat16_weights_at_every_step():
    """The decode loop carries the weights as cast once per generation. Each step's products take
    them as bfloat16 (accumulating in float32); a product asked for in bfloat16, or fed a float32
    activation, makes XLA:CPU convert the weights back to float32 before the loop, and every step
    then streams twice the bytes. (One row is a matrix-vector product, which XLA:CPU only runs in
    float32: there bfloat16 gains nothing; see the README.)"""
    config = tiny_config(n_layer=2, n_embd=64, n_head=4, n_ctx=128, n_vocab=512, attention_types=[[["global", "local"], 1]],
                         local_attention_radius=8, decode_precision="bfloat16")
    shape = sample.DecodeShape(batch=4, prompt_slots=16, cache_slots=48)
    # sample.generate runs a decode_precision bfloat16 loop as precision bfloat16
    hlo = compiled_decode_hlo(config.replace(precision="bfloat16"), sample.sampling_layout(None, 4), shape)
    body = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)[0]
    carried = computations(hlo)[body].splitlines()[0]  # the body's parameter: what each step reads
    for weight in ("[64,256]", "[256,64]", "[64,64]", "[64,512]"):  # fc, proj, q/k/v/out (as XLA reshapes them), unembed
        assert f"bf16{weight}" in carried and f"f32{weight}" not in carried, weight


def carried_dtypes(carried: str, leading: int, trailing: int) -> set[str]:
    """The dtypes of the arrays in an HLO loop's parameter that hold a [leading, trailing] matrix,
    however XLA splits its dimensions ([64, 4, 16] for a [64, 64] q projection)."""
    found = set()
    for short, dims in re.findall(r"\b(f32|bf16)\[([\d,]+)\]", carried):
        sizes = [int(size) for size in dims.split(",")]
        if any(np.prod(sizes[:k]) == leading and np.prod(sizes[k:]) == trailing for k in range(1, len(sizes))):
            found.add({"f32": "float32", "bf16": "bfloat16"}[short])
    return found


@pytest.mark.parametrize("order", machine.DECODE_ORDERS)
def test_the_decoding_probe_times_each_product_in_the_dtype_the_decoding_loop_streams_its_weight_in(order):
    """bfloat16 weights are not always multiplied in bfloat16: XLA:CPU runs a one-row product only
    in float32, converting the weight before the loop, which then reads float32 at every step. The
    probe finds, per product, the dtype that sample.py's decode loop carries the weight in, and
    times its products in that dtype (one-row bfloat16 products timed as such took twice as long
    as the loop's, at 125M, and chose the order on kernels no loop runs)."""
    config = tiny_config(n_layer=2, n_embd=64, n_head=4, n_ctx=128, n_vocab=512, decode_precision="bfloat16",
                         decode_product=order)
    seen = set()
    for batch in (1, 4):
        shape = sample.DecodeShape(batch=batch, prompt_slots=16, cache_slots=48)
        hlo = compiled_decode_hlo(config.replace(precision="bfloat16"), sample.sampling_layout(None, batch), shape)
        body = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)[0]
        carried = computations(hlo)[body].splitlines()[0]  # the body's parameter: what each step reads
        products = machine.probe_products(config.replace(predict_batch_size=batch), decoding=True)
        probed = machine.streamed_dtypes(products, "bfloat16", [order], {"in force": None}, decoding=True)["in force"][order]
        for (_, inner, out, _), dtype in zip(products, probed):
            in_loop = carried_dtypes(carried, *((inner, out) if order == "rows_first" else (out, inner)))
            if order == "weights_first" and out == config.n_vocab:
                # the table is stored out-first and read in float32 for the token lookup as well
                assert dtype in in_loop and in_loop <= {dtype, "float32"}, (batch, in_loop, dtype)
            else:
                assert in_loop == {dtype}, (batch, inner, out, in_loop, dtype)
            seen.add(dtype)
        # the probe runs its products in those dtypes
        operands = machine.product_operands(products, {order: probed}, [order])[order]
        assert [w[0].dtype for _, w in operands] == [jnp.dtype(dtype) for dtype in probed]
    if order == "rows_first":
        assert seen == {"float32", "bfloat16"}  # what XLA:CPU 0.10 does: one row in float32, four in bfloat16


def test_main_probes_single_host_training_and_sampling_of_models_large_enough_to_gain():
    import main

    small_125m = tiny_config(n_layer=12, n_embd=768, n_head=12, n_ctx=2048, n_vocab=50257)
    train_args = main.parse_args(["--model", "gpt3_small"])
    assert main.probes_machine(train_args, small_125m)
    assert main.probes_machine(main.parse_args(["--model", "gpt3_small", "--predict"]), small_125m)
    assert not main.probes_machine(main.parse_args(["--model", "gpt3_small", "--eval"]), small_125m)
    assert not main.probes_machine(main.parse_args(["--model", "gpt3_small", "--num_processes", "2"]), small_125m)
    assert not main.probes_machine(train_args, small_125m.replace(cpu_probe="off"))
    assert not main.probes_machine(train_args, tiny_config())  # start-up would outweigh the gain
