"""mesh_shape / layout -> Mesh and NamedShardings, with Mesh-TensorFlow's rules enforced."""

from __future__ import annotations

import jax
import pytest

from configs import validate
from errors import ConfigError
from mesh import DATA_AXIS, build_mesh_layout, parse_layout, parse_mesh_shape
from model_fns import param_shardings

SMALL = {"n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_vocab": 64, "train_batch_size": 8}


def config(**keys):
    return validate({**SMALL, **keys}, "test")


def test_mesh_shape_and_layout_parse_in_order():
    assert parse_mesh_shape("x:4, y:2") == {"x": 4, "y": 2}
    assert parse_layout("batch:x,heads:y", {"x": 4, "y": 2}) == {"batch": "x", "heads": "y"}


def test_parameters_are_sharded_by_their_dimension_names():
    cfg = config(mesh_shape="x:4,y:2", layout="batch:x,heads:y,vocab:y,intermediate_expanded:y")
    shardings = param_shardings(cfg, build_mesh_layout(cfg))
    assert shardings["wte"].spec == jax.sharding.PartitionSpec("y", None)
    assert shardings["blocks"][0]["attn"]["q"].spec == jax.sharding.PartitionSpec(None, "y", None)
    assert shardings["blocks"][0]["mlp"]["fc"].spec == jax.sharding.PartitionSpec(None, "y")
    assert shardings["ln_f"]["scale"].spec == jax.sharding.PartitionSpec(None)


def test_dimension_not_divisible_by_its_mesh_axis_names_tensor_dimension_size_and_axis():
    cfg = config(n_vocab=63, mesh_shape="x:4,y:2", layout="vocab:y")
    layout = build_mesh_layout(cfg)
    with pytest.raises(ConfigError) as err:
        param_shardings(cfg, layout)
    message = str(err.value)
    for part in ("wte", "'vocab'", "63", "'y'", "2"):
        assert part in message


def test_one_tensor_may_not_use_a_mesh_axis_twice():
    cfg = config(mesh_shape="x:4,y:2", layout="embd:y,heads:y")
    with pytest.raises(ConfigError, match="maps both 'embd' and 'heads' to mesh axis 'y'"):
        param_shardings(cfg, build_mesh_layout(cfg))


def test_mesh_size_different_from_device_count_says_both_and_suggests_a_shape():
    with pytest.raises(ConfigError) as err:
        build_mesh_layout(config(mesh_shape="x:64,y:4", layout="batch:x"))
    message = str(err.value)
    assert "256 devices" in message and f"{jax.device_count()} are available" in message
    assert f"mesh_shape=x:{jax.device_count()},y:1" in message


def test_empty_mesh_shape_is_data_parallel_over_all_devices():
    layout = build_mesh_layout(config())
    assert dict(layout.mesh.shape) == {DATA_AXIS: jax.device_count()} and layout.layout == {"batch": DATA_AXIS}
    assert set(layout.mesh.devices.flat) == set(jax.devices())
    # an eval batch that does not divide the devices changes nothing about training
    assert build_mesh_layout(config(eval_batch_size=3, eval_steps=1)).mesh.size == jax.device_count()


def test_empty_mesh_shape_with_a_train_batch_the_devices_do_not_divide_names_both_and_suggests_a_mesh():
    cfg = config(train_batch_size=3)  # 3 rows cannot spread over 8 devices
    with pytest.raises(ConfigError) as err:
        build_mesh_layout(cfg)
    message = str(err.value)
    assert "train_batch_size 3" in message and "8 devices" in message
    # both suggestions are configs that build, on every device
    assert "--set train_batch_size=8" in message
    mesh_shape, layout_text = (message.split(f"--set {key}=")[1].split()[0] for key in ("mesh_shape", "layout"))
    suggested = cfg.replace(mesh_shape=mesh_shape, layout=layout_text)
    layout = build_mesh_layout(suggested)
    param_shardings(suggested, layout)
    assert layout.mesh.size == jax.device_count() and "batch" not in layout.layout


def test_an_eval_batch_the_batch_axis_does_not_divide_runs_unsplit_with_the_one_device_loss():
    import numpy as np

    import model_fns
    from models import gpt2

    cfg = config(eval_batch_size=3, eval_steps=1)
    layout = build_mesh_layout(cfg)
    eval_layout = layout.for_batch(3)
    assert eval_layout.mesh is layout.mesh and eval_layout.layout == {}
    assert layout.for_batch(16) is layout
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), gpt2.param_shapes(cfg))
    tokens = rng.integers(0, cfg.n_vocab, (3, cfg.n_ctx + 1)).astype(np.int32)
    shardings = {"params": model_fns.param_shardings(cfg, layout)}
    sharded = model_fns.make_eval_step(cfg, eval_layout, shardings, 3)(params, tokens[:, :-1], tokens[:, 1:])
    one = build_mesh_layout(cfg, jax.devices()[:1])
    single = model_fns.make_eval_step(cfg, one, {"params": model_fns.param_shardings(cfg, one)}, 3)(
        params, tokens[:, :-1], tokens[:, 1:])
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-6)


@pytest.mark.parametrize("flags,expected", [
    (["--gpu_ids", "banana"], "--gpu_ids: 'banana' is not a GPU index"),
    (["--gpu_ids", "0", "1", "2"], "--gpu_ids 0 1 2: JAX finds no GPU"),
    (["--tpu", "my-tpu"], "--tpu my-tpu: this machine has no TPU runtime"),
    (["--tpu", "colab"], "--tpu colab: JAX finds no TPU here"),
])
def test_devices_this_machine_lacks_are_one_clear_line(flags, expected, capsys, monkeypatch):
    import importlib.util

    import main

    if importlib.util.find_spec("libtpu") is not None or jax.default_backend() != "cpu":
        pytest.skip("this machine has an accelerator runtime")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored afterwards; --gpu_ids sets it
    assert main.main(["--model", "demo", "--dry_run", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines


def test_dry_run_compiles_the_eval_step_too_unsplit_when_its_batch_does_not_divide(tmp_path, capsys):
    from test_train import write_dataset

    import train
    from configs import load_config

    model_config = write_dataset(tmp_path, 64)
    cfg = load_config(str(model_config), [f"model_path={tmp_path / 'run'}", "n_vocab=64", "n_layer=1", "n_embd=32",
                                          "n_ctx=16", "attention_types=[[[\"global\"], 1]]", "eval_batch_size=3"])
    layout = build_mesh_layout(cfg)
    assert layout.mesh.size == jax.device_count() and layout.layout == {"batch": DATA_AXIS}
    report = train.dry_run(cfg, layout)
    printed = capsys.readouterr().out
    assert "eval step (eval_batch_size 3, unsplit" in printed and report["eval_compile_seconds"] > 0
    assert report["expert_parameters"] == 0 and "expert" not in printed.split("parameters: ")[1].splitlines()[0]
