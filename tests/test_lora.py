"""LoRA fine-tuning (models/lora.py): a real base checkpoint, a real fine-tuning run of train.run
on real TFRecord shards, its adapter checkpoint, the merged HF export and the peft folder loaded
by the peft library."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import TINY, assert_same_params, random_batches, run_steps, write_dataset

import model_fns
import train
from checkpoints import CheckpointMeta, Checkpoints, restore_params, tree_names
from configs import load_config, validate
from errors import ConfigError
from mesh import build_mesh_layout
from models import gpt2, lora
from models.params import initialise

TARGETS = ["q", "v", "out", "fc", "proj"]
SMALLER = {"n_ctx": 16, "n_embd": 32, "train_batch_size": 4}  # than test_train's TINY (suite time)


def random_params(config, seed: int):
    """A model with every weight random, made in numpy (no program to compile): biases and norms
    not zeros and ones, LoRA's B not zero."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda w: jnp.asarray(rng.normal(0, 0.05, gpt2.shape_of(w, config)).astype(np.float32)
                                              + (1.0 if w.init == "ones" else 0.0)),
                        gpt2.weights(config), is_leaf=gpt2.is_weight)


def save_base(config, seed: int, step: int):
    """A whole-model checkpoint (as an import or a pretraining run leaves one) in config.model_path."""
    params = random_params(config, seed)
    checkpoints = Checkpoints(config.model_path, asynchronous=False)
    checkpoints.save(step, {"params": params, "opt_state": None},
                     CheckpointMeta.for_config(config, step, params_only=True))
    checkpoints.close()
    return jax.device_get(params)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A base checkpoint at step 5 in model_path, then train.run of 2 LoRA steps (dropout on)."""
    folder = tmp_path_factory.mktemp("lora")
    model_config = write_dataset(folder, TINY["n_vocab"])
    model_path = folder / "run"
    overrides = [f"model_path={model_path}", "eval_steps=0", *(f"{k}={v}" for k, v in SMALLER.items())]
    base_config = load_config(str(model_config), overrides)
    base = save_base(base_config, seed=3, step=5)
    config = load_config(str(model_config), overrides + ["train_steps=2", "lora_rank=4", "lora_alpha=8",
                                                         "lora_dropout=0.1", f"lora_targets={json.dumps(TARGETS)}"])
    layout = build_mesh_layout(config, jax.devices()[:1])
    result = train.run(config, layout=layout)
    return folder, model_config, base_config, config, base, result


def test_lora_at_init_gives_the_base_models_logits():
    base_config = validate({**TINY, "mesh_shape": "", "layout": ""}, "test")
    config = base_config.replace(lora_rank=4, lora_targets=TARGETS)
    base = random_params(base_config, 1)
    adapter_weights = lora.split(gpt2.weights(config), gpt2.weights(config))[1]
    adapters = initialise(adapter_weights, config, jax.random.key(2))  # LoRA's own init
    assert any(np.abs(np.asarray(a)).max() > 0 for a in jax.tree.leaves(adapters))  # A is random
    tokens = jnp.asarray(random_batches(base_config, 1)[0, :2, :-1])
    whole = lora.join(base, adapters, gpt2.weights(config))
    adapted = jax.jit(lambda p: gpt2.logits(p, tokens, config))(whole)
    np.testing.assert_array_equal(adapted, jax.jit(lambda p: gpt2.logits(p, tokens, base_config))(base))


def test_fine_tuning_changes_only_the_adapters_and_saves_only_them(finetuned):
    folder, _, _, config, base, result = finetuned
    assert result.step == 2 and np.isfinite(result.metrics["loss"])
    whole, step = restore_params(config, build_mesh_layout(config, jax.devices()[:1]))
    assert step == 2
    whole = tree_names(jax.device_get(whole))
    for name, value in tree_names(base).items():  # the frozen base, bit for bit
        np.testing.assert_array_equal(whole[name], value, err_msg=name)
    adapter_names = {name for name in whole if name not in tree_names(base)}
    assert adapter_names == {f"blocks.{i}.{part}.{t}_lora_{f}" for i in range(2) for t in TARGETS for f in "ab"
                             for part in (["attn"] if t in ("q", "v", "out") else ["mlp"])}
    assert all(np.abs(whole[name]).max() > 0 for name in adapter_names if name.endswith("_b"))  # B left zero

    adapters = Checkpoints(str(folder / "run"), read_only=True, folder="adapters")
    saved = adapters.saved_shapes(2)
    meta = adapters.meta(2)
    adapters.close()
    assert set(saved["params"]) == adapter_names
    adapter_elements = sum(int(np.prod(shape)) for shape in saved["params"].values())
    optimizer_elements = sum(int(np.prod(shape)) for shape in saved["opt_state"].values())
    assert adapter_elements * 2 <= optimizer_elements <= adapter_elements * 2 + 8  # Adam's mu, nu (+ counts)
    assert all(any(name.endswith(adapter) for adapter in adapter_names)
               for name, shape in saved["opt_state"].items() if shape)
    assert meta.base_checkpoint == str(folder / "run" / "checkpoints" / "5")
    assert sorted(p.name for p in (folder / "run" / "checkpoints").iterdir()) == ["5"]  # the base stays


def test_adapters_refuse_a_base_they_were_not_trained_on(finetuned, tmp_path):
    _, model_config, base_config, config, _, _ = finetuned
    other = base_config.replace(model_path=str(tmp_path / "other"))
    save_base(other, seed=7, step=1)
    changed = config.replace(lora_base=str(tmp_path / "other"), train_steps=3)
    with pytest.raises(ConfigError, match="trained on the base .*checkpoints/5.*this config's base is .*other"):
        train.run(changed, layout=build_mesh_layout(changed, jax.devices()[:1]))
    with pytest.raises(ConfigError, match="lora_base"):
        restore_params(changed, build_mesh_layout(changed, jax.devices()[:1]))


def test_merged_export_and_the_peft_folder_give_hf_the_adapted_logits(finetuned, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import export

    _, _, _, config, _, _ = finetuned
    whole, _ = restore_params(config, build_mesh_layout(config, jax.devices()[:1]))
    tokens = random_batches(config, 1)[0, :2, :-1]
    ours = np.asarray(gpt2.logits(whole, jnp.asarray(tokens), config))

    def hf_logits(model):
        with torch.no_grad():
            return model.eval()(torch.tensor(tokens)).logits.numpy()

    merged = export.export_to_hf(config, tmp_path / "merged", merge_lora=True)
    np.testing.assert_allclose(hf_logits(transformers.GPTNeoForCausalLM.from_pretrained(merged)), ours, atol=1e-4)

    base_dir = export.export_to_hf(config.replace(lora_rank=0), tmp_path / "base")  # the base alone
    base_model = transformers.GPTNeoForCausalLM.from_pretrained(base_dir)
    assert np.abs(hf_logits(base_model) - ours).max() > 1e-3  # the adapters matter
    adapters = export.export_peft(config, tmp_path / "peft")
    assert sorted(p.name for p in adapters.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    adapted = peft.PeftModel.from_pretrained(base_model, str(adapters))
    np.testing.assert_allclose(hf_logits(adapted), ours, atol=1e-4)

    with pytest.raises(export.ExportError, match="--merge_lora"):
        export.export_to_hf(config, tmp_path / "unmerged")


def test_sharded_lora_training_equals_single_device():
    options = {**TINY, **SMALLER, "lora_rank": 4, "lora_targets": ["q", "v", "fc"]}
    single = validate({**options, "mesh_shape": "", "layout": ""}, "test")
    batches = random_batches(single, 2)
    expected_losses, expected_adapters = run_steps(single, jax.devices()[:1], batches)
    sharded = validate({**options, "mesh_shape": "x:2,y:2,z:2", "layout": "batch:x,heads:y,lora_rank:z"}, "test")
    layout = build_mesh_layout(sharded, jax.devices())
    shardings = model_fns.state_shardings(sharded, layout, __import__("optimizers").make_optimizer(sharded))
    assert shardings["params"]["blocks"]["0"]["attn"]["q_lora_a"].spec == jax.sharding.PartitionSpec(None, "z")
    losses, adapters = run_steps(sharded, jax.devices(), batches)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    # A's first gradient is 0 (B is), its second tiny: Adam's division by its own size moves rounding most
    assert_same_params(adapters, expected_adapters, rtol=1e-3)


@pytest.mark.parametrize("change,named", [
    ({"lora_rank": 4, "lora_targets": ["q", "query"]}, "lora_targets"),
    ({"lora_rank": 4, "lora_targets": []}, "lora_targets"),
    ({"lora_rank": 4, "lora_targets": ["fc_gate"]}, "fc_gate"),
    ({"prefix_tuning": True}, "num_mem_kv"),
    ({"lora_rank": 4, "attention_types": [[["gau", "none"], 1]]}, "no layer of this model has"),
    ({"lora_base": "somewhere"}, "lora_base"),
])
def test_fine_tuning_keys_refuse_bad_values_by_name(change, named):
    with pytest.raises(ConfigError, match=named) as refused:
        validate({**TINY, **change}, "test.json")
    assert str(refused.value).startswith("test.json: key ") and "\n" not in str(refused.value)


def test_dry_run_reports_the_optimizer_state_of_the_adapters_beside_full_trainings():
    """From shapes alone (nothing compiled): Adam keeps two float32 moments per trained weight."""
    config = validate({**TINY, **SMALLER, "lora_rank": 4, "mesh_shape": "", "layout": ""}, "test")
    layout = build_mesh_layout(config, jax.devices()[:1])
    optimizer = __import__("optimizers").make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    shapes = jax.eval_shape(lambda: model_fns.init_state(config, layout, optimizer, shardings))
    report = train.optimizer_state_report(config, shapes)
    n_embd, heads, kv, rank = config.n_embd, config.n_head, config.head_dim, 4
    adapters = config.n_layer * 2 * (n_embd * rank + rank * heads * kv)  # q and v, A and B
    assert report["trained_parameters"] == adapters
    assert 8 * adapters <= report["optimizer_state_bytes"] <= 8 * adapters + 64  # + Adam's step counts
    whole = gpt2.parameter_count(config.replace(lora_rank=0))
    assert 8 * whole <= report["full_training_optimizer_state_bytes"] <= 8 * whole + 64


@pytest.mark.parametrize("change,named", [({"prompt_tuning_tokens": 2}, "prompt_tuning_tokens"),
                                          ({"num_mem_kv": 2, "prefix_tuning": True}, "prefix_tuning")])
def test_prompt_and_prefix_tuning_are_refused_by_hf_export_by_name(change, named, tmp_path):
    import export

    config = validate({**TINY, **change, "model_path": str(tmp_path / "none")}, "test.json")
    with pytest.raises(export.ExportError, match=f"key '{named}'.*no place"):
        export.export_to_hf(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_main_py_dry_run_of_a_lora_config_shows_the_optimizer_memory_saved(finetuned):
    from test_train import main_py

    folder, model_config, _, _, _, _ = finetuned
    sets = [f"model_path={folder / 'run'}", *(f"{k}={v}" for k, v in SMALLER.items()), "lora_rank=4",
            f"lora_targets={json.dumps(TARGETS)}"]
    result = main_py("--model", str(model_config), *(a for s in sets for a in ("--set", s)), "--dry_run")
    line = next(row for row in result.stdout.splitlines() if row.startswith("trained parameters:"))
    assert "fine-tuning adapters only; training every weight:" in line
    assert float(line.split("(")[1].split(", ")[1].split("x")[0]) > 5  # full training's state, several times as much
