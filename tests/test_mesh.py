"""mesh_shape / layout -> Mesh and NamedShardings, with Mesh-TensorFlow's rules enforced."""

from __future__ import annotations

import jax
import pytest

from configs import validate
from errors import ConfigError
from mesh import DATA_AXIS, auto_layout, build_mesh_layout, parse_layout, parse_mesh_shape
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


def test_empty_mesh_shape_is_data_parallel_over_all_devices_or_one_device():
    layout = build_mesh_layout(config())
    assert dict(layout.mesh.shape) == {DATA_AXIS: jax.device_count()} and layout.layout == {"batch": DATA_AXIS}
    layout = build_mesh_layout(config(train_batch_size=3))  # 3 rows cannot spread over 8 devices
    assert layout.mesh.size == 1


def test_auto_layout_and_mesh_shape_fits_the_devices_and_validates():
    cfg = config(n_embd=64, n_head=8)
    for memory in (1e12, 1e5):  # plenty: data parallel only; scarce: a model-parallel axis too
        mesh_shape, layout_text = auto_layout(cfg, 8, memory, choose_mesh=True)
        chosen = cfg.replace(mesh_shape=mesh_shape, layout=layout_text)
        layout = build_mesh_layout(chosen)
        param_shardings(chosen, layout)  # every dimension divides its axis
        if memory < 1e6:
            assert layout.mesh.shape["y"] > 1 and "heads:y" in layout_text
        else:
            assert layout.mesh.shape["x"] == 8 and layout_text == "batch:x"
