"""The sharded train step, microbatching, the optimizer, and main.py's training loop with real
TFRecord shards and real orbax checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags

import model_fns
from configs import validate
from mesh import build_mesh_layout
from models import gpt2
from optimizers import learning_rate, make_optimizer
from tfrecord import write_shard

REPO = Path(__file__).resolve().parent.parent
GPT_NEO_CONFIGS = REPO / "tests" / "gpt_neo_configs"  # vendored, MIT (see its README)
TINY = {
    "n_ctx": 32, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_vocab": 256, "train_batch_size": 8,
    "attention_types": [[["global", "local"], 1]], "local_attention_radius": 8,
    "lr": 1e-3, "warmup_steps": 2, "train_steps": 3, "lr_decay_end": 8,  # the schedule must not depend on train_steps
}
LAYOUTS = [
    ("", ""),
    ("x:4,y:2", "batch:x,heads:y,vocab:y,intermediate_expanded:y"),
    ("x:2,y:4", "batch:x,embd:y"),
]


def run_steps(config, devices, batches):
    layout = build_mesh_layout(config, devices)
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = model_fns.init_state(config, layout, optimizer, shardings)
    step = model_fns.make_train_step(config, layout, optimizer, shardings)
    losses = []
    for batch in batches:
        state, metrics = step(state, jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:]))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state["params"])


def random_batches(config, count, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.n_vocab, (count, config.train_batch_size, config.n_ctx + 1), dtype=np.int32)


def repeated_batch(config, count):
    """One random batch, `count` times: random tokens have nothing to learn but themselves, so only
    a batch seen again shows the loss falling."""
    return np.repeat(random_batches(config, 1), count, axis=0)


def assert_same_params(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        relative = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12)
        assert relative <= rtol, (jax.tree_util.keystr(path), relative)


@pytest.fixture(scope="module")
def single_device_run():
    config = validate({**TINY, "mesh_shape": "", "layout": ""}, "test")
    return run_steps(config, jax.devices()[:1], repeated_batch(config, 3))


@pytest.mark.parametrize("mesh_shape,layout", LAYOUTS, ids=["empty", "x4y2-heads", "x2y4-embd"])
def test_sharded_loss_equals_single_device_loss(single_device_run, mesh_shape, layout):
    assert jax.device_count() == 8
    config = validate({**TINY, "mesh_shape": mesh_shape, "layout": layout}, "test")
    losses, params = run_steps(config, jax.devices(), repeated_batch(config, 3))
    expected_losses, expected_params = single_device_run
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_same_params(params, expected_params, rtol=1e-5)
    assert losses[-1] < losses[0]


# layouts that split heads, embd and memory_length, for models with GPT-Neo's architecture options
OPTION_LAYOUTS = [
    ("x:4,y:2", "batch:x,heads:y,vocab:y,intermediate_expanded:y,axial_rows:y,gau_expanded:y"),
    ("x:2,y:2,z:2", "batch:x,embd:y,memory_length:z,gau_key:z"),
]
OPTION_SETS = {  # together, every option built so far (rotary replaces axial's tables, so they go apart)
    "rotary": {"rotary_emb": True, "scalenorm": True, "mlp_glu": True, "activation_function": "silu",
               "no_weight_tie": True, "macaron": True, "num_mem_kv": 4, "gau_key_size": 16, "n_layer": 5,
               "attention_types": [[["global", "local", "none", "linear", "gau"], 1]]},
    "axial": {"axial_pos_emb": [4, 8], "rezero": True, "mlp_glu": True, "no_weight_tie": True},
}


@pytest.mark.parametrize("case,share", [("rotary", True), ("axial", False)],
                         ids=["rotary-shared", "axial-separate"])  # sharing and not: the same layout code
def test_sharded_training_with_architecture_options_equals_single_device(case, share):
    options = {**TINY, "n_layer": 3, "attention_types": [[["global", "local", "none"], 1]], **OPTION_SETS[case],
               "share_parameters": share}
    config = validate({**options, "mesh_shape": "", "layout": ""}, "test")
    batches = random_batches(config, 3)
    expected_losses, expected_params = run_steps(config, jax.devices()[:1], batches)
    for mesh_shape, layout in OPTION_LAYOUTS:
        sharded = validate({**options, "mesh_shape": mesh_shape, "layout": layout}, "test")
        losses, params = run_steps(sharded, jax.devices(), batches)
        np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, err_msg=layout)
        # Adam's first steps divide tiny gradients by their own size: rounding moves small biases most
        assert_same_params(params, expected_params, rtol=1e-4)


def test_four_microbatches_give_the_same_update_as_one():
    one = validate({**TINY, "mesh_shape": "x:2", "layout": "batch:x"}, "test")
    # 8 rows over 2 replicas = 4 rows x 32 tokens per replica; 32 tokens per microbatch -> 4 microbatches
    four = one.replace(tokens_per_mb_per_replica=32)
    layout = build_mesh_layout(four, jax.devices()[:2])
    assert model_fns.microbatch_count(four, layout) == 4
    batches = random_batches(one, 2)
    losses_one, params_one = run_steps(one, jax.devices()[:2], batches)
    losses_four, params_four = run_steps(four, jax.devices()[:2], batches)
    np.testing.assert_allclose(losses_four, losses_one, rtol=1e-5)
    assert_same_params(params_four, params_one, rtol=1e-5)


def test_recompute_grad_changes_memory_not_the_update_with_and_without_attention_dropout():
    """jax.checkpoint recomputes each block in the backward pass, dropout masks included; the
    sharded step's losses and parameters must not move."""
    results = {}
    for attn_dropout in (0.0, 0.3):
        for recompute in (False, True):
            config = validate({**TINY, "mesh_shape": "x:2,y:2", "layout": "batch:x,heads:y",
                               "attn_dropout": attn_dropout, "recompute_grad": recompute}, "test")
            results[attn_dropout, recompute] = run_steps(config, jax.devices()[:4], random_batches(config, 2))
    for attn_dropout in (0.0, 0.3):
        (losses, params), (expected_losses, expected_params) = results[attn_dropout, True], results[attn_dropout, False]
        np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
        assert_same_params(params, expected_params, rtol=1e-5)
    assert abs(results[0.3, False][0][0] - results[0.0, False][0][0]) > 1e-4  # the dropout is real


def test_compiled_gradient_grows_linearly_with_depth():
    """Four more layers add the same amount of compiled code each time: the backward pass does
    not recompute the residual stream's gradient from the top inside every layer."""

    def compiled_lines(n_layer):
        config = validate({**TINY, "n_layer": n_layer, "attention_types": [[["global"], n_layer]],
                           "mesh_shape": "", "layout": ""}, "test")
        tokens = jax.ShapeDtypeStruct((config.train_batch_size, config.n_ctx), jnp.int32)
        grad = jax.jit(jax.grad(lambda p, t: model_fns.lm_loss(p, t, t, config, None)[0]))
        return len(grad.lower(gpt2.param_shapes(config), tokens).compile().as_text().splitlines())

    lines = [compiled_lines(n) for n in (4, 8, 12)]
    assert lines[2] - lines[1] < 1.25 * (lines[1] - lines[0]), lines


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's tunables")
def test_main_py_processes_reuse_freed_memory_instead_of_faulting_it_in_again(tmp_path):
    """A step's temporaries freed and allocated again come back without page faults."""
    script = tmp_path / "allocate.py"
    script.write_text(f"""
import resource, sys
sys.path.insert(0, {str(REPO)!r})
from main import reuse_freed_memory
reuse_freed_memory()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(256 * 2**20)  # as XLA allocates a step's temporaries
    ctypes.memset(buffer, 1, 256 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(buffer)
print(faults[-1])
""")

    def faults_on_reuse(environment):
        result = subprocess.run([sys.executable, str(script)], env=environment, capture_output=True, text=True,
                                timeout=60, check=True)
        return int(result.stdout.split()[-1])

    default = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    assert faults_on_reuse(default) < 1000
    # a user's own malloc tunables are left alone: glibc then maps and faults the buffer anew
    assert faults_on_reuse({**default, "GLIBC_TUNABLES": "glibc.malloc.check=0"}) > 10_000
    # on an accelerator the compiler's threads keep their own arenas
    assert faults_on_reuse({**default, "JAX_PLATFORMS": "cuda"}) > 10_000


def test_log_grads_adds_each_parameter_gradient_norm_to_the_metrics():
    config = validate({**TINY, "log_grads": True}, "test")
    layout = build_mesh_layout(config, jax.devices()[:1])
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = model_fns.init_state(config, layout, optimizer, shardings)
    batch = jnp.asarray(random_batches(config, 1)[0])
    state, metrics = model_fns.make_train_step(config, layout, optimizer, shardings)(state, batch[:, :-1], batch[:, 1:])
    per_parameter = {k.removeprefix("grad_norm/"): float(v) for k, v in metrics.items() if k.startswith("grad_norm/")}
    assert {"wte", "wpe", "ln_f.scale", "blocks.0.attn.q", "blocks.1.mlp.proj_bias"} <= per_parameter.keys()
    assert len(per_parameter) == len(jax.tree.leaves(state["params"]))
    total = np.sqrt(sum(norm**2 for norm in per_parameter.values()))
    assert total == pytest.approx(float(metrics["grad_norm"]), rel=1e-5)
    off = validate(TINY, "test")  # without log_grads only the global norm (the state was donated: use the new one)
    _, metrics = model_fns.make_train_step(off, layout, optimizer, shardings)(state, batch[:, :-1], batch[:, 1:])
    assert sorted(metrics) == ["cross_entropy", "finite", "grad_norm", "loss"]


def test_weight_decay_skips_norms_and_biases():
    """Every weight of the model decays except LayerNorm parameters and biases, whose names say so."""
    config = validate({**TINY, "weight_decay": 0.5, "gradient_clipping": 0.0}, "test")
    params = gpt2.init_params(config, jax.random.key(0))
    params = jax.tree.map(lambda w: w + 1.0, params)  # no zero weights: decay moves every decayed one
    optimizer = make_optimizer(config)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    seen = {"decayed": 0, "kept": 0}
    for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
        names = [str(getattr(k, "key", "")) for k in path]
        kept = any(n.startswith("ln") or n.endswith("bias") for n in names)
        moved = float(jnp.abs(update).max()) > 0
        assert moved != kept, jax.tree_util.keystr(path)
        seen["kept" if kept else "decayed"] += 1
    assert seen["kept"] > 0 and seen["decayed"] > 0


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_a_tenth(decay):
    config = validate({**TINY, "lr": 1.0, "warmup_steps": 10, "train_steps": 100, "lr_decay_end": None,
                       "lr_decay": decay}, "test")
    schedule = learning_rate(config)
    warm = [float(schedule(s)) for s in range(10)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert float(schedule(100)) == pytest.approx(0.1, rel=1e-5)
    assert float(schedule(500)) == pytest.approx(0.1, rel=1e-5)
    middle = 1.0 - 0.9 * 0.5 if decay == "linear" else 0.1 + 0.9 * 0.5
    assert float(schedule(50)) == pytest.approx(middle, rel=1e-4)


# --- main.py end to end -------------------------------------------------------------------------


def train_tiny_tokenizer(corpus: list[str], path: Path, special_tokens: list[str]):
    """A real byte-level BPE tokenizer of 300 ids trained on `corpus`, saved at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(path))
    return tokenizer


def write_dataset(folder: Path, n_vocab: int, documents: int = 60, max_id: int | None = None, seed: int = 0) -> Path:
    """Shards of random documents, and a model config beside a dataset config naming them."""
    rng = np.random.default_rng(seed)
    shards = folder / "shards"
    shards.mkdir(parents=True)
    top = max_id if max_id is not None else n_vocab - 1
    docs = [rng.integers(2, top + 1, rng.integers(20, 90)) for _ in range(documents)]
    docs[0][0] = top
    half = documents // 2
    write_shard(str(shards / f"tiny_0_{half}.tfrecords"), docs[:half])
    write_shard(str(shards / f"tiny_1_{documents - half}.tfrecords"), docs[half:])
    (folder / "dataset_configs").mkdir()
    (folder / "dataset_configs" / "tiny.json").write_text(json.dumps({
        "n_vocab": n_vocab, "path": str(shards / "*.tfrecords"), "eval_path": str(shards / "tiny_1_*.tfrecords"),
        "eos_id": 0, "padding_id": 1, "tokenizer_path": ""}))
    config = {**TINY, "datasets": [["tiny", 2, "documents_random", 1.0]], "iterations": 2,
              "steps_per_checkpoint": 3, "mesh_shape": "", "layout": "", "embed_dropout": 0.1,
              "res_dropout": 0.1, "eval_steps": 1, "eval_batch_size": 4}
    path = folder / "model.json"
    path.write_text(json.dumps(config))
    return path


# main.py runs of one test session share compiled programs: most tests start main.py several times
# on one model (train, resume, predict), and compiling is most of a tiny run's time
SHARED_COMPILATION = {
    "JAX_COMPILATION_CACHE_DIR": str(Path(tempfile.gettempdir()) /
                                     f"neomesh-tests-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}


def main_py(*args, check=True, devices=1, background=False):
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu",
           **SHARED_COMPILATION}
    command = [sys.executable, str(REPO / "main.py"), *args]
    if background:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def final_params(model_path: Path, model_config: Path):
    from checkpoints import restore_params
    from configs import load_config

    config = load_config(str(model_config), [f"model_path={model_path}", "mesh_shape=", "layout="])
    return restore_params(config, build_mesh_layout(config, jax.devices()[:1]))


def logged(model_path: Path, key: str) -> dict[int, float]:
    lines = (model_path / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def test_resume_in_a_new_process_is_exact(tmp_path):
    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main_py("--model", str(model_config), "--set", f"model_path={straight}", "--set", "train_steps=6")
    first = main_py("--model", str(model_config), "--set", f"model_path={resumed}", "--set", "train_steps=3")
    second = main_py("--model", str(model_config), "--set", f"model_path={resumed}", "--set", "train_steps=6")
    assert "resumed" in second.stdout and "at step 3" in second.stdout
    assert "step 2/3 | loss" in first.stdout and "tok/s" in first.stdout and "ETA" in first.stdout

    straight_loss, resumed_loss = logged(straight, "loss"), logged(resumed, "loss")
    assert straight_loss[6] == pytest.approx(resumed_loss[6], rel=1e-6)
    assert logged(straight, "eval_loss")[6] == pytest.approx(logged(resumed, "eval_loss")[6], rel=1e-6)
    (params_a, step_a), (params_b, step_b) = final_params(straight, model_config), final_params(resumed, model_config)
    assert step_a == step_b == 6
    assert_same_params(params_b, params_a, rtol=1e-6)

    record = json.loads((straight / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "tokens_per_sec"} <= record.keys()
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert (straight / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_new_refuses_without_a_terminal_unless_yes(tmp_path):
    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    model_path = tmp_path / "run"
    main_py("--model", str(model_config), "--set", f"model_path={model_path}", "--set", "train_steps=1",
            "--set", "eval_steps=0")
    refused = main_py("--model", str(model_config), "--set", f"model_path={model_path}", "--new", check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert (model_path / "checkpoints" / "1").exists()
    main_py("--model", str(model_config), "--set", f"model_path={model_path}", "--set", "train_steps=2",
            "--set", "eval_steps=0", "--new", "--yes")
    assert sorted(logged(model_path, "loss")) == [2]  # started afresh: step 1 was logged by the deleted run only


def test_training_logs_gradient_norms_with_log_grads_and_each_unused_gpt_neo_key_once(tmp_path):
    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    model_path = tmp_path / "run"
    result = main_py("--model", str(model_config), "--set", f"model_path={model_path}", "--set", "train_steps=2",
                     "--set", "eval_steps=0", "--set", "log_grads=true", "--set", "predict_steps=1",
                     "--set", "shuffle_input_filenames=false")
    assert result.stdout.count("key 'predict_steps'") == 1 and result.stdout.count("key 'shuffle_input_filenames'") == 1
    record = json.loads((model_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["grad_norm/wte"] > 0 and "grad_norm/blocks.1.mlp.fc" in record


def test_main_refuses_an_unknown_moe_params_key_in_one_line_naming_it(tmp_path):
    result = main_py("--model", "demo", "--set", "moe_layers=[1]", "--set", 'moe_params={"moe_num_expert": 4}',
                     "--dry_run", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "key 'moe_params'" in result.stderr and "'moe_num_expert'" in result.stderr
    assert "did you mean 'moe_num_experts'" in result.stderr


def test_training_refuses_token_ids_at_or_above_n_vocab(tmp_path):
    model_config = write_dataset(tmp_path, n_vocab=TINY["n_vocab"], max_id=290)  # the config claims 256; a shard holds 290
    result = main_py("--model", str(model_config), "--set", f"model_path={tmp_path / 'run'}", check=False)
    assert result.returncode == 2
    assert "tiny" in result.stderr and "290" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_override_on_the_command_line_is_one_clear_line(tmp_path):
    result = main_py("--model", "demo", "--set", "n_head=5", check=False)
    assert result.returncode == 2
    assert "n_embd" in result.stderr and "Traceback" not in result.stderr


def test_dry_run_on_gpt3_small_reports_about_125m_parameters(tmp_path):
    # --dry_run checks that the datasets exist: GPT-Neo's config reads local shards made here
    write_dataset(tmp_path, n_vocab=50257)
    config = json.loads((GPT_NEO_CONFIGS / "gpt3_small_256.json").read_text())
    (tmp_path / "gpt3_small.json").write_text(json.dumps({**config, "datasets": [["tiny", 2, "documents_random", 1.0]]}))
    result = main_py("--model", str(tmp_path / "gpt3_small.json"), "--dry_run", "--set", "mesh_shape=x:2,y:1",
                     "--set", "train_batch_size=2", devices=2)
    assert "dataset 'tiny': path" in result.stdout
    count = int(result.stdout.split("parameters: ")[1].split(" ")[0].replace(",", ""))
    assert 120e6 < count < 130e6
    assert "per-device memory:" in result.stdout


# --- resume refuses what would break it (train.run in this process) ----------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run trained for one step by train.run: its checkpoint folder, the model config and a
    second dataset config (another shard mix)."""
    import train
    from configs import load_config

    folder = tmp_path_factory.mktemp("resume")
    model_config = write_dataset(folder, TINY["n_vocab"])
    other = json.loads((folder / "dataset_configs" / "tiny.json").read_text())
    (folder / "dataset_configs" / "other.json").write_text(json.dumps(other))
    config = load_config(str(model_config), [f"model_path={folder / 'run'}", "train_steps=1", "eval_steps=0"])
    train.run(config, layout=build_mesh_layout(config, jax.devices()[:1]))
    return folder / "run", model_config


def resume(saved_run, tmp_path, overrides, **options):
    """train.run one more step from a copy of the saved run, with the config changed by `overrides`."""
    import shutil

    import train
    from configs import load_config

    saved, model_config = saved_run
    model_path = tmp_path / "run"
    shutil.copytree(saved, model_path)
    config = load_config(str(model_config), [f"model_path={model_path}", "train_steps=2", "eval_steps=0", *overrides])
    return train.run(config, layout=build_mesh_layout(config, jax.devices()[:1]), **options)


DATA_CHANGES = {
    "seed": ["seed=7"],
    "train_batch_size": ["train_batch_size=4"],
    "datasets": ['datasets=[["tiny", 2, "documents_random", 1.0], ["other", 2, "documents_random", 1.0]]'],
    "n_ctx": ["n_ctx=16"],
}


@pytest.mark.parametrize("key", ["seed", "train_batch_size", "datasets"])
def test_resume_refuses_a_change_of_data_order_by_key_and_says_how_to_override(saved_run, tmp_path, key):
    from errors import ConfigError

    with pytest.raises(ConfigError, match=f"{key}: checkpoint .*--allow_data_change") as refused:
        resume(saved_run, tmp_path, DATA_CHANGES[key])
    assert "order of the training data" in str(refused.value)


@pytest.mark.parametrize("key", ["seed", "train_batch_size", "datasets"])
def test_resume_with_allow_data_change_continues_at_the_saved_step(saved_run, tmp_path, key):
    result = resume(saved_run, tmp_path, DATA_CHANGES[key], allow_data_change=True)
    assert (result.start_step, result.step) == (1, 2)
    assert np.isfinite(result.metrics["loss"])


@pytest.mark.parametrize("allow", [False, True])
def test_resume_refuses_another_n_ctx_by_key_with_or_without_allow_data_change(saved_run, tmp_path, allow):
    """n_ctx also sets the learned position table's length: the flag allows other data, not other
    shapes, so the refusal names the key and the table, and does not offer the flag."""
    from errors import ConfigError

    with pytest.raises(ConfigError, match=r"wpe \(32, 64\) in the checkpoint, \(16, 64\) now.*n_ctx: checkpoint 32") as refused:
        resume(saved_run, tmp_path, DATA_CHANGES["n_ctx"], allow_data_change=allow)
    assert "--allow_data_change" not in str(refused.value)


def test_resume_refuses_another_n_embd_naming_the_shapes_and_the_key(saved_run, tmp_path):
    from errors import ConfigError

    with pytest.raises(ConfigError, match=r"blocks\.0\.attn\.q \(64, 4, 16\) in the checkpoint, \(128, 4, 32\) now") as refused:
        resume(saved_run, tmp_path, ["n_embd=128"])
    assert "n_embd: checkpoint 64, config 128" in str(refused.value)


@pytest.mark.parametrize("change,key", [(["opt_name=adafactor"], "opt_name"),
                                        (["gradient_clipping=0.0"], "gradient_clipping")])
def test_resume_refuses_an_optimizer_state_of_another_structure_by_key(saved_run, tmp_path, change, key):
    from errors import ConfigError

    with pytest.raises(ConfigError, match=f"optimizer state this config cannot continue \\({key}: checkpoint"):
        resume(saved_run, tmp_path, change)


def test_params_only_checkpoint_starts_a_fresh_optimizer_and_ignores_data_keys(saved_run, tmp_path, caplog):
    """What export.py --from_hf writes: parameters and meta (params_only) at step 0; fine-tuning it
    with another seed and batch size is no resume of a data order."""
    import train
    from checkpoints import CheckpointMeta, Checkpoints
    from configs import load_config

    _, model_config = saved_run
    model_path = tmp_path / "imported"
    config = load_config(str(model_config), [f"model_path={model_path}", "train_steps=2", "eval_steps=0"])
    params = gpt2.init_params(config, jax.random.key(3))
    checkpoints = Checkpoints(str(model_path), asynchronous=False)
    checkpoints.save(0, {"params": params, "opt_state": None},
                     CheckpointMeta.for_config(config, 0, params_only=True, imported_from="hf"))
    checkpoints.close()
    assert Checkpoints(str(model_path), read_only=True).meta(0).params_only

    tuned = config.replace(seed=11, train_batch_size=4)
    with caplog.at_level("INFO", logger="neomesh"):
        result = train.run(tuned, layout=build_mesh_layout(tuned, jax.devices()[:1]))
    assert "holds parameters only: starting a fresh optimizer state" in caplog.text
    assert (result.start_step, result.step) == (0, 2)
    saved = Checkpoints(str(model_path), read_only=True)
    assert saved.has_optimizer_state(2) and not saved.meta(2).params_only and saved.meta(2).seed == 11


# --- a run that goes non-finite saves nothing from it (train.run in this process) --------------


def strict_rows(model_path: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"metrics.jsonl holds {constant}, which strict JSON does not allow")

    return [json.loads(line, parse_constant=refuse) for line in (model_path / "metrics.jsonl").read_text().splitlines()]


def saved_params_are_finite(model_path: Path, model_config: Path) -> dict[int, bool]:
    from checkpoints import Checkpoints, restore_params
    from configs import load_config

    config = load_config(str(model_config), [f"model_path={model_path}"])
    steps = Checkpoints(str(model_path), read_only=True).manager.all_steps()
    layout = build_mesh_layout(config, jax.devices()[:1])
    return {step: all(bool(np.isfinite(np.asarray(leaf)).all())
                      for leaf in jax.tree.leaves(restore_params(config, layout, step)[0])) for step in steps}


def train_in_process(model_config: Path, model_path: Path, *overrides, devices: int = 1):
    import train
    from configs import load_config

    config = load_config(str(model_config), [f"model_path={model_path}", "eval_steps=0", *overrides])
    return train.run(config, layout=build_mesh_layout(config, jax.devices()[:devices]))


def test_mfu_is_measured_against_peak_flops_per_device_times_the_devices(tmp_path, caplog):
    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="neomesh"):
        train_in_process(model_config, run, "train_steps=2", "iterations=1", "peak_flops=1e9", devices=2)
    assert "MFU against peak_flops from the config" in caplog.text
    tokens_per_sec, mfu = logged(run, "tokens_per_sec"), logged(run, "mfu")
    assert sorted(mfu) == [1, 2]
    for step, value in mfu.items():
        assert value == pytest.approx(tokens_per_sec[step] * tiny_flops_per_token() / (1e9 * 2), rel=1e-9)


def tiny_flops_per_token() -> float:
    """A training token's FLOPs in TINY, written out: 6 per matmul weight (q, k, v, out and the
    MLP's two 4 x n_embd projections in each layer; the tied embedding at the output), and 12 x
    n_embd per key a query sees (q.k and probs.v, forward and backward) in its global and local layer."""
    n_embd, positions = TINY["n_embd"], np.arange(TINY["n_ctx"])
    weights = TINY["n_layer"] * 12 * n_embd**2 + TINY["n_vocab"] * n_embd
    keys_seen = (positions + 1).mean() + np.minimum(positions + 1, TINY["local_attention_radius"]).mean()
    return float(6 * weights + 12 * n_embd * keys_seen)


def test_a_step_that_is_not_finite_stops_the_run_and_the_newest_checkpoint_stays_finite(tmp_path):
    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    run = tmp_path / "run"
    train_in_process(model_config, run, "train_steps=5", "steps_per_checkpoint=5", "iterations=5")
    with pytest.raises(FloatingPointError, match=r"step \d+ is not finite .* the newest checkpoint, step 5, is intact"):
        train_in_process(model_config, run, "lr=1e6", "train_steps=20", "iterations=20", "steps_per_checkpoint=5")
    finite = saved_params_are_finite(run, model_config)
    assert finite == {5: True}
    strict_rows(run)

    resumed = train_in_process(model_config, run, "train_steps=10", "steps_per_checkpoint=5", "iterations=5")
    assert (resumed.start_step, resumed.step) == (5, 10)
    assert all(saved_params_are_finite(run, model_config).values())


def test_a_run_that_is_never_finite_saves_no_checkpoint(tmp_path):
    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    with pytest.raises(FloatingPointError, match="no checkpoint was saved"):
        train_in_process(model_config, tmp_path / "run", "lr=1e6", "train_steps=20", "iterations=20",
                         "steps_per_checkpoint=5")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not checkpoints.exists() or saved_params_are_finite(tmp_path / "run", model_config) == {}


def test_skip_nonfinite_steps_keeps_the_state_and_counts_the_skipped_steps(tmp_path):
    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    run = tmp_path / "run"
    result = train_in_process(model_config, run, "lr=1e6", "train_steps=8", "iterations=4", "steps_per_checkpoint=4",
                              "skip_nonfinite_steps=true")
    assert result.step == 8
    assert all(saved_params_are_finite(run, model_config).values())
    rows = strict_rows(run)
    assert rows[-1]["step"] == 8 and rows[-1]["skipped_steps"] > 0


def test_the_logged_mean_loss_covers_every_step_since_the_last_line_across_checkpoints(tmp_path):
    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    every = train_in_process(model_config, tmp_path / "every", "train_steps=8", "iterations=1",
                             "steps_per_checkpoint=100")
    assert every.step == 8
    per_step = {r["step"]: r["loss"] for r in strict_rows(tmp_path / "every") if "loss" in r}
    train_in_process(model_config, tmp_path / "windows", "train_steps=8", "iterations=4", "steps_per_checkpoint=5")
    windows = {r["step"]: r["loss"] for r in strict_rows(tmp_path / "windows") if "loss" in r}
    assert windows[8] == pytest.approx(np.mean([per_step[s] for s in range(5, 9)]), rel=1e-5)
    assert windows[4] == pytest.approx(np.mean([per_step[s] for s in range(1, 5)]), rel=1e-5)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_the_run_resumes(tmp_path, caplog):
    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    run = tmp_path / "run"
    train_in_process(model_config, run, "train_steps=4", "iterations=2", "steps_per_checkpoint=4")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 3.1')  # a full disk cut this append short
    with caplog.at_level("WARNING", logger="neomesh"):
        resumed = train_in_process(model_config, run, "train_steps=6", "iterations=2", "steps_per_checkpoint=4")
    assert resumed.step == 6 and "cut short" in caplog.text
    assert [r["step"] for r in strict_rows(run) if "loss" in r] == [2, 4, 6]


def test_a_second_writer_on_one_model_path_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path):
    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    run = tmp_path / "run"
    first = main_py("--model", str(model_config), "--set", f"model_path={run}", "--set", "train_steps=100000",
                    "--set", "eval_steps=0", background=True)
    try:
        lock = run / "neomesh.lock"
        deadline = time.time() + 120
        while not (lock.exists() and lock.stat().st_size) and time.time() < deadline:
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = main_py("--model", str(model_config), "--set", f"model_path={run}", "--set", "train_steps=2",
                         "--set", "eval_steps=0", check=False)
        assert second.returncode == 2
        assert f"in use by process {first.pid}" in second.stderr and second.stderr.count("\n") == 1
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert lock.exists()  # kill -9 leaves it behind
    third = main_py("--model", str(model_config), "--set", f"model_path={run}", "--set", "train_steps=2",
                    "--set", "eval_steps=0")
    assert f"taking over the lock of process {first.pid}" in third.stdout + third.stderr
    assert not lock.exists()  # released at the end of the run


# --- a damaged newest checkpoint is skipped, by name -------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("damaged")
    model_config = write_dataset(folder, TINY["n_vocab"])
    train_in_process(model_config, folder / "run", "train_steps=6", "steps_per_checkpoint=3", "iterations=3")
    return folder / "run", model_config


def truncate_arrays(step_folder: Path) -> None:
    files = [p for p in (step_folder / "params").rglob("*") if p.is_file() and p.stat().st_size > 64]
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "no meta": lambda run: __import__("shutil").rmtree(run / "checkpoints" / "6" / "meta"),
    "no optimizer state": lambda run: __import__("shutil").rmtree(run / "checkpoints" / "6" / "opt_state"),
    "empty folder": lambda run: [__import__("shutil").rmtree(p) if p.is_dir() else p.unlink()
                                 for p in (run / "checkpoints" / "6").iterdir()],
    "truncated arrays": lambda run: truncate_arrays(run / "checkpoints" / "6"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_the_run_resumes_from_the_one_before(
        two_checkpoints, tmp_path, caplog, damage):
    import shutil

    from checkpoints import restore_params
    from configs import load_config

    saved, model_config = two_checkpoints
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    DAMAGE[damage](run)
    config = load_config(str(model_config), [f"model_path={run}"])
    with caplog.at_level("WARNING", logger="neomesh"):
        _, step = restore_params(config, build_mesh_layout(config, jax.devices()[:1]))  # --predict, --eval, export
    if damage == "no optimizer state":  # sampling needs only the parameters, which are whole
        assert step == 6
    else:
        assert step == 3
        assert f"checkpoint {run / 'checkpoints' / '6'} is damaged or incomplete" in caplog.text
    with caplog.at_level("WARNING", logger="neomesh"):
        resumed = train_in_process(model_config, run, "train_steps=9", "steps_per_checkpoint=3", "iterations=3")
    assert f"checkpoint {run / 'checkpoints' / '6'} is damaged or incomplete" in caplog.text
    assert (resumed.start_step, resumed.step) == (3, 9)
    assert len(list((run / "damaged_checkpoints").iterdir())) == 1  # kept for a look, out of the way


@pytest.mark.slow
def test_gpt_neo_test_models_combination_trains_and_samples_through_main_py(tmp_path):
    """The options GPT-Neo's own test_models.py combines (2 layers global/local, rotary, 16 memory
    key/values, an untied head, shared parameters, a mixture of experts in layer 1, ReZero,
    res_dropout 0.1), with a tokenizer trained here: main.py trains it and samples from its
    checkpoint."""
    corpus = ["memory keys are seen by every query", "rotary turns each pair of dimensions",
              "a shared block serves every layer of the model"] * 30
    tokenizer = train_tiny_tokenizer(corpus, tmp_path / "tokenizer.json", ["<|endoftext|>"])
    (tmp_path / "shards").mkdir()
    documents = [tokenizer.encode(text).ids + [0] for text in corpus]
    write_shard(str(tmp_path / "shards" / f"neo_0_{len(documents)}.tfrecords"), documents)
    (tmp_path / "dataset_configs").mkdir()
    (tmp_path / "dataset_configs" / "neo.json").write_text(json.dumps({
        "n_vocab": 300, "path": str(tmp_path / "shards" / "*.tfrecords"), "eos_id": 0,
        "tokenizer_path": str(tmp_path / "tokenizer.json")}))
    config = {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_ctx": 32, "n_vocab": 320, "train_batch_size": 4,
              "attention_types": [[["global", "local"], 1]], "local_attention_radius": 8,
              "rotary_emb": True, "num_mem_kv": 16, "no_weight_tie": True, "share_parameters": True,
              "rezero": True, "res_dropout": 0.1, "moe_layers": [1],
              "moe_params": {"moe_num_experts": 4, "moe_hidden_size": 32, "moe_dropout_rate": 0.0},
              "datasets": [["neo", 2, "documents_random", 1.0]],
              "train_steps": 4, "iterations": 2, "steps_per_checkpoint": 4, "lr": 3e-3,
              "model_path": str(tmp_path / "model"), "predict_max_steps": 10, "mesh_shape": "", "layout": ""}
    (tmp_path / "neo.json").write_text(json.dumps(config))
    main_py("--model", str(tmp_path / "neo.json"))
    losses = logged(tmp_path / "model", "loss")
    assert set(losses) == {2, 4} and all(np.isfinite(list(losses.values())))
    assert set(logged(tmp_path / "model", "moe_dropped/1")) == {2, 4}  # the MoE layer's routing, logged
    (tmp_path / "prompt.txt").write_text("memory keys are")
    sampled = main_py("--model", str(tmp_path / "neo.json"), "--predict", "--prompt", str(tmp_path / "prompt.txt"))
    written = (tmp_path / "model" / "predictions_nosacred_4.txt").read_text()
    assert " SAMPLE 0 " in written and "memory keys are" in written and "SAMPLE 0" in sampled.stdout
