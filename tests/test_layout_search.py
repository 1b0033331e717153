"""--auto_layout / --auto_layout_and_mesh_shape (layout_search.py): the candidates obey the layout
rules, the cut-down compiles extrapolate to the whole model, and the layout chosen on 8 simulated
devices fits a memory budget that plain data parallelism does not."""

import itertools
import json
import math
import re

import jax
import pytest
from test_train import write_dataset

import layout_search
import main
import model_fns
from configs import load_config
from mesh import build_mesh_layout

TINY = ["n_layer=2", 'attention_types=[[["global","local"],1]]', "n_embd=64", "n_head=4", "n_ctx=16",
        "n_vocab=96", "train_batch_size=8", "eval_steps=0"]


def test_meshes_are_every_factorisation_into_up_to_four_non_increasing_axes():
    sizes = {n: sorted(tuple(m.values()) for m in layout_search.meshes(n)) for n in (1, 8, 12, 64)}
    assert sizes[1] == [()]
    assert sizes[8] == [(2, 2, 2), (4, 2), (8,)]
    assert sizes[12] == [(3, 2, 2), (4, 3), (6, 2), (12,)]
    # 64 = 2^6: the partitions of 6 into at most 4 parts, each axis at least 2
    by_hand = {(64,), (32, 2), (16, 4), (16, 2, 2), (8, 8), (8, 4, 2), (8, 2, 2, 2), (4, 4, 4), (4, 4, 2, 2)}
    assert set(sizes[64]) == by_hand and len(sizes[64]) == len(by_hand)
    for mesh in layout_search.meshes(64):
        assert list(mesh) == list("xyzw"[:len(mesh)])


def test_every_candidate_layout_builds_uses_each_axis_and_appears_once_up_to_swapping_axes():
    config = load_config("demo", TINY)
    mesh_shape = {"x": 2, "y": 2, "z": 2}
    found = layout_search.layouts(config, mesh_shape)
    assert found
    sizes = config.dim_sizes | {"batch": config.train_batch_size}
    signatures = set()
    for layout, fsdp in found:
        assert set(layout.values()) == set(mesh_shape)  # no idle axis
        assert all(sizes[dim] % mesh_shape[axis] == 0 for dim, axis in layout.items())
        text = {"mesh_shape": "x:2,y:2,z:2", "layout": ",".join(f"{d}:{a}" for d, a in layout.items()),
                "fsdp_axes": ",".join(fsdp)}
        chosen = config.replace(**text)
        model_fns.param_shardings(chosen, build_mesh_layout(chosen))  # no weight holds an axis twice
        if "batch" in layout:  # the activations hold batch with every other dimension
            assert [dim for dim, axis in layout.items() if axis == layout["batch"]] == ["batch"]
        assert not ("heads" in layout and layout.get("embd") == layout["heads"])  # the q/k/v/o weights
        # the same layout with its axes renamed (all three are size 2) must not appear twice
        signature = frozenset((frozenset(d for d, a in layout.items() if a == axis), axis in fsdp) for axis in mesh_shape)
        assert signature not in signatures
        signatures.add(signature)
    # a layout a user would write is there (up to the axes' names), with and without FSDP
    megatron = {frozenset({"batch"}), frozenset({"heads", "intermediate_expanded"}), frozenset({"embd"})}
    fsdp_choices = {bool(fsdp) for layout, fsdp in found
                    if {frozenset(d for d, a in layout.items() if a == axis) for axis in mesh_shape} == megatron}
    assert fsdp_choices == {True, False}


def test_a_dimension_that_does_not_divide_its_axis_is_never_proposed():
    config = load_config("demo", TINY + ["n_vocab=97", "n_head=3", "n_embd=48", "train_batch_size=5"])
    for layout, _ in itertools.chain(*(layout_search.layouts(config, m) for m in layout_search.meshes(8))):
        assert not {"vocab", "heads", "batch"} & set(layout)  # 97, 3 and 5 do not divide by 2, 4 or 8


def test_figures_extrapolated_from_two_and_four_layers_match_the_six_layer_compile():
    config = load_config("demo", TINY + ["n_layer=6", 'attention_types=[[["global","local"],3]]'])
    candidate = layout_search.Candidate({"x": 4, "y": 2}, {"batch": "x", "heads": "y"}, ("x",))
    assert layout_search.repeating_period(config) == 2
    extrapolated = layout_search.measure(config, candidate, jax.devices(), stand_in=False)
    assert extrapolated["compiled_layers"] == [2, 4]
    whole = layout_search.measure(config.replace(attention_types=[[["global", "local", "global"], 2]]),
                                  candidate, jax.devices(), stand_in=False)  # period 3: two periods are 6, compiled whole
    assert whole["compiled_layers"] == [6]
    assert extrapolated["parameter_bytes"] == whole["parameter_bytes"]
    assert extrapolated["flops"] == pytest.approx(whole["flops"], rel=0.02)
    assert extrapolated["traffic_bytes"] == pytest.approx(whole["traffic_bytes"], rel=0.02)
    assert extrapolated["temporary_bytes"] == pytest.approx(whole["temporary_bytes"], rel=0.15)
    # per device: the batch is split 4 ways, attention's projections 8 (heads over y too), the MLP's
    # and the logits' 4 ways; the backward's extra work (the written CPU backward) stays within 25%
    model = model_fns.flops_per_token(config) * config.train_batch_size * config.n_ctx
    assert model / 8 <= extrapolated["flops"] <= 1.25 * model / 4


def test_the_chosen_layout_fits_a_budget_that_data_parallelism_does_not(tmp_path, capsys):
    """A model whose training state (a large vocabulary) is too big for one device's budget when
    every device holds all of it: the search must shard it, and --dry_run of its --set line must
    fit where batch:x alone is refused."""
    model = write_dataset(tmp_path, 4096)
    values = json.loads(model.read_text()) | {"n_vocab": 4096, "n_embd": 128, "n_head": 8, "n_layer": 2,
                                              "n_ctx": 16, "train_batch_size": 8, "model_path": str(tmp_path / "run"),
                                              "attention_types": [[["global"], 2]], "eval_steps": 0}
    model.write_text(json.dumps(values))
    budget = "8MB"  # the state alone is 16 bytes x 0.8M parameters = 13 MB on every device under batch:x
    assert main.main(["--model", str(model), "--dry_run", "--device_memory", budget,
                      "--set", "mesh_shape=x:8", "--set", "layout=batch:x"]) == 2
    assert "does NOT fit" in capsys.readouterr().out
    assert main.main(["--model", str(model), "--auto_layout_and_mesh_shape", "--device_memory", budget,
                      "--search_seconds", "10"]) == 0
    printed = capsys.readouterr().out
    settings = re.search(r"^use: (.*)$", printed, re.M).group(1).split()
    chosen = dict(s.split("=", 1) for s in settings if s != "--set")
    assert math.prod(int(a.split(":")[1]) for a in chosen["mesh_shape"].split(",")) == 8
    assert main.main(["--model", str(model), "--dry_run", "--device_memory", budget, *settings]) == 0
    assert "fits:" in capsys.readouterr().out
    # the printed ranking puts fitting layouts first, fastest first
    rows = [line.split() for line in printed.splitlines() if re.match(r"^\s+\d+\s", line)]
    fitting = [float(row[-1]) for row in rows if "fit)" not in row[-1] and len(row) >= 7]
    assert fitting == sorted(fitting)


def test_auto_layout_without_a_mesh_shape_says_to_search_meshes_too(capsys):
    assert main.main(["--model", "demo", "--auto_layout"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--auto_layout_and_mesh_shape" in err[0], err


def test_auto_layout_keeps_the_configs_mesh_and_prints_a_layout_that_trains_on_it(tmp_path, capsys):
    model = write_dataset(tmp_path, 96)
    values = json.loads(model.read_text()) | {"n_layer": 1, "attention_types": [[["global"], 1]],
                                              "model_path": str(tmp_path / "run"), "eval_steps": 0}
    model.write_text(json.dumps(values))
    assert main.main(["--model", str(model), "--set", "mesh_shape=a:4,b:2", "--auto_layout",
                      "--search_seconds", "3"]) == 0
    printed = capsys.readouterr().out
    settings = re.search(r"^use: (.*)$", printed, re.M).group(1).split()
    assert "mesh_shape=a:4,b:2" in settings  # the user's mesh, axis names and all
    layout = dict(part.split(":") for part in dict(s.split("=", 1) for s in settings if s != "--set")["layout"].split(","))
    assert set(layout.values()) == {"a", "b"}
    assert main.main(["--model", str(model), "--dry_run", "--device_memory", "1GiB", *settings]) == 0
