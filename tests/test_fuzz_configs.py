"""A config fuzzer: seeded mutations of a small valid config, every one either refused with a
ConfigError naming what is wrong or accepted as a config that trains a step.

The mutations (`mutations()`, deterministic, about 3,000): every key of configs.KEYS set to each of
MUTANT_VALUES (wrong types, signs, NaN and infinity, huge integers and floats, malformed and
unicode strings, NUL characters, lists and dicts where scalars go, deep nesting), plus STRUCTURED
cases for the keys whose values have structure (attention_types, datasets, mesh_shape and layout,
axial_pos_emb, ids against n_vocab, sizes XLA cannot address) and unknown keys.

- test_every_mutation_is_refused_by_name_or_accepted: all of them through configs.validate, in
  this process. A refusal is a ConfigError whose one-line message names the key; any other
  exception fails the test.
- test_accepted_mutations_train_one_step (slow): accepted single-key mutations are merged into
  as few configs as possible (one key at most once in each; the merged config must still
  validate), smallest values first, and the first TRAINED_GROUPS of those configs (about half the
  accepted mutations) each train one step on real TFRecord shards made here. Building the step or reading the data
  may still refuse a merged config, but only with a ConfigError or DataError (one `error:` line
  through the command line), e.g. a step beyond the device's memory (n_vocab 2^31 - 1 is
  addressable, but not on this host); a step that runs must give a finite loss.
- test_refused_configs_are_one_error_line_through_main_py (slow): five rejected configs
  (files that are not UTF-8, nested 100,000 deep, holding a 5000-digit integer, and the
  CLI_MUTATIONS) through `main.py --dry_run` in parallel: exit code 2, one `error:` line, no
  traceback. (Every other refusal is the same ConfigError, which main.py prints the same way.)
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import KEYS, Config, validate
from errors import ConfigError, DataError
from main import REUSE_FREED_MEMORY
from tfrecord import write_shard

REPO = Path(__file__).resolve().parent.parent
SEED = 20261202
TRAINED_GROUPS = 2  # merged configs trained one step each: ~10 s apiece to compile on a 2-core CPU
# mutations that main.py ended with a traceback before they were refused by validate: run through
# main.py as well, beside the three damaged files
CLI_MUTATIONS = [{"mesh_shape": "x:²"}, {"attention_types": [[[{"kind": "global"}], 2]]}]

BASE = {
    "n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 1, "n_vocab": 64, "attention_types": None,
    "local_attention_radius": 8, "train_batch_size": 2, "eval_batch_size": 2, "train_steps": 1,
    "iterations": 1, "mesh_shape": "", "layout": "", "datasets": [["fuzz", 1, "chunks", 1.0]],
}


def deep_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def deep_dict(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


NAN, INF = float("nan"), float("inf")
MUTANT_VALUES = [
    None, True, False, 0, -1, 2, 7, 1.5, -0.5, 1e-300, NAN, INF, -INF, 2**31, 2**31 - 1, 2**63, -(2**63) - 1,
    10**30, 10**5000, 1e308, -1e308, "", "x", "x:²", "💥🚀", "ünïcödé", "a\x00b", "１２", "NaN", "3", " ",
    "global", "batch:x", [], [1], [NAN], ["a", "b"], [[[]]], {}, {"a": 1}, deep_list(60), deep_dict(60),
]
STRUCTURED = [
    {"attention_types": [[["global"], 10**12]]},
    {"attention_types": [[["global"], 2**63]]},
    {"attention_types": [[[["global"]], 2]]},
    {"attention_types": [[[{"kind": "global"}], 2]]},
    {"attention_types": [[["global", "local"], 1]]},
    {"attention_types": [[["global"], -1], [["local"], 3]]},
    {"attention_types": [[["global"], 1.5]]},
    {"attention_types": [[["global"], True], [["local"], 1]]},
    {"attention_types": [[[], 2]]},
    {"attention_types": [["global", 2]]},
    {"attention_types": [[["Global"], 2]]},
    {"attention_types": [[["local"], 1]]},
    {"attention_types": [[["global"], 0], [["local"], 1]]},
    {"datasets": [["fuzz", 1, "chunks", NAN]]},
    {"datasets": [["fuzz", 1, "chunks", INF]]},
    {"datasets": [["fuzz", 1, "chunks", -1.0]]},
    {"datasets": [["fuzz", 0, "chunks", 1.0]]},
    {"datasets": [["fuzz", 2**63, "chunks", 1.0]]},
    {"datasets": [["fuzz", 1.5, "chunks", 1.0]]},
    {"datasets": [["", 1, "chunks", 1.0]]},
    {"datasets": [["../fuzz", 1, "chunks", 1.0]]},
    {"datasets": [["fu\x00zz", 1, "chunks", 1.0]]},
    {"datasets": [["fuzz", 1, "chunkz", 1.0]]},
    {"datasets": [["fuzz", 1, ["chunks"], 1.0]]},
    {"datasets": [["fuzz", 1, "chunks"]]},
    {"datasets": ["fuzz"]},
    {"datasets": [["fuzz", 3, "documents_random", 2.0]]},
    {"datasets": [["fuzz", 1, "documents_fixed", 10**400]]},
    {"mesh_shape": "x:-1"}, {"mesh_shape": "x:1,x:1"}, {"mesh_shape": "x:99999999999999999999999"},
    {"mesh_shape": "x:" + "9" * 5000}, {"layout": "batch:" + "x" * 5000},
    {"mesh_shape": "ü:1"}, {"mesh_shape": ":"}, {"mesh_shape": ",,,"}, {"mesh_shape": "x:1"},
    {"mesh_shape": "x:1", "layout": "batch:x"}, {"mesh_shape": "x:1", "layout": "batch:y"},
    {"mesh_shape": "x:1", "layout": "batch:x,batch:x"}, {"mesh_shape": "x:1", "layout": "bätch:x"},
    {"axial_pos_emb": [4, 4]}, {"axial_pos_emb": [4]}, {"axial_pos_emb": [2**40, 1]},
    {"axial_pos_emb": [-4, -4]}, {"axial_pos_emb": ["a", "b"]}, {"axial_pos_emb": [4.0, 4.0]},
    {"eos_id": 64}, {"eos_id": 63}, {"padding_id": 64}, {"padding_id": 2**31}, {"mlm_mask_id": 64},
    {"moe_layers": [2]}, {"mlm_mask_ignore_ids": [1, 64]},
    {"n_embd": 2**30},  # its MLP (4 * n_embd) is beyond int32
    {"n_embd": 2**40},  # XLA aborted on this (an array's element count overflowed int64)
    {"n_ctx": 2**31 - 1},  # a training row (n_ctx + 1 tokens) is beyond int32
    {"n_embd": 2**20, "n_head": 1, "n_ctx": 2**20, "train_batch_size": 2**20},  # activations beyond 2^60 elements
    {"n_vocab": 2**31 - 1, "n_embd": 2**31 - 1, "n_head": 1},  # wte beyond 2^60 elements
    {"n_layer": 2000}, {"n_layer": 1025}, {"n_layer": 3},
    {"n_head": 3}, {"n_head": 64}, {"intermediate_size": 0},
    {"lr_decay_end": -1}, {"lr_decay_end": 5}, {"warmup_steps": 3},
    {"n_layers": 2}, {"": 1}, {"💥": 1}, {"lr ": 0.1},
]


def mutations() -> list[dict]:
    """Every (key, value) of KEYS x MUTANT_VALUES, then STRUCTURED, each a dict of the keys it
    changes, in a seeded order."""
    cases = [{key: value} for key in KEYS for value in MUTANT_VALUES] + STRUCTURED
    random.Random(SEED).shuffle(cases)
    return cases


def outcome(change: dict) -> Config | ConfigError:
    """validate's answer for BASE with `change`: the Config, or the ConfigError it raised (anything
    else propagates, and fails the test)."""
    try:
        return validate({**BASE, **change}, "fuzz.json")
    except ConfigError as err:
        return err


def named(change: dict) -> list[str]:
    """The words one of which a refusal of `change` must name: its keys, or the dimension or array
    a size check names for them."""
    return [*change, "dimension", "weight", "logits", "attention scores", "MLP activations", "parameters"]


@pytest.fixture(scope="module")
def results():
    return [(change, outcome(change)) for change in mutations()]


def test_every_mutation_is_refused_by_name_or_accepted(results):
    rejected = [(c, r) for c, r in results if isinstance(r, ConfigError)]
    accepted = [(c, r) for c, r in results if isinstance(r, Config)]
    assert len(results) >= 300 and len(rejected) + len(accepted) == len(results)
    for change, err in rejected:
        message = str(err)
        assert "\n" not in message and len(message) < 1500, message
        assert any(repr(word) in message or word in message for word in named(change)), (change, message)
    # what must be refused is: no NaN, infinity or out-of-range value survives validation
    for change, config in accepted:
        for key in change:
            value = getattr(config, key)
            assert not (isinstance(value, float) and not math.isfinite(value)), (key, value)
    print(f"\nconfig fuzzer: {len(results)} mutations, {len(rejected)} refused, {len(accepted)} accepted")


def damaged_files() -> dict[str, bytes]:
    """Config files that cannot be read as configs (tests/test_configs.py checks their messages)."""
    return {
        "latin1.json": '{"n_layer": 2, "model_path": "caf\u00e9"}'.encode("latin-1"),
        "deep.json": b"[" * 100_000 + b"]" * 100_000,
        "digits.json": b'{"n_ctx": ' + b"7" * 5000 + b"}",
    }


# --- accepted configs train a step ---------------------------------------------------------------


def write_data(folder: Path) -> Path:
    """Two shards of 16 records of token ids 0 and 1 (so every accepted n_vocab, 2 and up, embeds
    them), a dataset config `fuzz` beside a model config; returns the model config's path."""
    rng = np.random.default_rng(0)
    (folder / "shards").mkdir()
    for shard in range(2):
        write_shard(str(folder / "shards" / f"fuzz_{shard}_16.tfrecords"), [rng.integers(0, 2, 40) for _ in range(16)])
    (folder / "dataset_configs").mkdir()
    (folder / "dataset_configs" / "fuzz.json").write_text(json.dumps(
        {"n_vocab": 2, "path": str(folder / "shards" / "*.tfrecords"), "eos_id": 0, "padding_id": 1}))
    path = folder / "model.json"
    path.write_text(json.dumps(BASE))
    return path


# keys whose accepted values may still be refused when a run starts (an empty `datasets`, a mesh of more
# devices than there are, microbatches that do not divide the batch of each replica of the mesh):
# merged with others, such a refusal would leave the rest of a group untried
ALONE = {"datasets", "mesh_shape", "layout", "tokens_per_mb_per_replica"}


def size(change: dict) -> float:
    """The largest number a mutation sets (0 for none): merging starts from the smallest values."""
    numbers = [abs(v) for v in change.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return float(max(numbers, default=0))


def merged_groups(accepted: list[dict]) -> list[dict]:
    """Accepted single-key mutations merged into as few configs as possible, smallest values first:
    each key once in a group, and the merged config must still validate; ALONE keys' mutations
    come last, one per group."""
    groups: list[dict] = []
    alone: list[dict] = []
    for change in sorted(accepted, key=size):
        if set(change) & ALONE:
            alone.append(dict(change))
            continue
        for group in groups:
            if not set(change) & set(group) and isinstance(outcome({**group, **change}), Config):
                group.update(change)
                break
        else:
            groups.append(dict(change))
    return groups + alone


def train_one_step(config: Config) -> float:
    """One step of `config` on its real data, as main.py trains it; the compiled step is checked
    against the device's memory first (as --dry_run does), so nothing too large is allocated."""
    import inputs
    import model_fns
    import train
    from mesh import build_mesh_layout, check_fits_in_memory
    from optimizers import make_optimizer

    layout = build_mesh_layout(config, jax.devices()[:1])
    step, (_, shardings), _ = train.compile_train_step(config, layout)
    check_fits_in_memory(step, layout, config.source)
    state = model_fns.init_state(config, layout, make_optimizer(config), shardings)
    batch_inputs, batch_labels = inputs.global_batch(inputs.Sampler(config), 0, layout, config.train_batch_size)
    state, metrics = step(state, batch_inputs, batch_labels)
    return float(metrics["loss"])


@pytest.mark.slow
def test_accepted_mutations_train_one_step(results, tmp_path):
    model_config = write_data(tmp_path)
    accepted = [change for change, result in results if isinstance(result, Config) and len(change) == 1]
    groups = merged_groups(accepted)[:TRAINED_GROUPS]
    trained = refused = 0
    for group in groups:
        try:
            config = validate({**BASE, **group}, str(model_config))
            loss = train_one_step(config)
        except (ConfigError, DataError) as err:  # a refusal when the step is built or the data read
            assert "\n" not in str(err), str(err)
            refused += len(group)
            continue
        assert math.isfinite(loss), (group, loss)
        trained += len(group)
    assert trained >= 0.5 * sum(len(g) for g in groups)
    print(f"\nconfig fuzzer: {len(accepted)} accepted single-key mutations; {trained} trained one step in "
          f"{len(groups)} merged configs, {refused} refused when the step was built or the data read")


# --- through the command line --------------------------------------------------------------------


@pytest.mark.slow
def test_refused_configs_are_one_error_line_through_main_py(results, tmp_path):
    rejected = [change for change, result in results if isinstance(result, ConfigError)]
    files = dict(damaged_files())
    for i, change in enumerate(CLI_MUTATIONS):
        assert change in rejected
        files[f"mutation{i}.json"] = json.dumps({**BASE, **change}).encode()
    # the malloc settings main.py would restart itself with, given up front: one start per process
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": REUSE_FREED_MEMORY}
    runs = {}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        runs[name] = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--model", str(tmp_path / name),
                                       "--dry_run"], cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
    for name, run in runs.items():
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 2, (name, stderr[-2000:])
        assert "Traceback" not in stderr and stderr.startswith("error: ") and stderr.count("\n") == 1, (name, stderr)
        assert name in stderr or "key" in stderr, (name, stderr)
