"""Config loading, overrides and validation: every mistake is a ConfigError naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from configs import (
    ATTENTION_KINDS,
    KEYS,
    OPTIONS,
    Config,
    load_config,
    options_in_use,
    options_table,
    parse_override,
    readme_with_options_table,
    resolve_datasets,
    special_ids,
    validate,
)
from errors import ConfigError
from models import gpt2

REPO = Path(__file__).resolve().parent.parent
GPT_NEO_CONFIGS = Path(__file__).resolve().parent / "gpt_neo_configs"  # vendored, MIT (see its README)
GPT_NEO_MODEL_CONFIGS = sorted(GPT_NEO_CONFIGS.glob("*.json"))
SMALL = {"n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_vocab": 64, "attention_types": None}


@pytest.mark.parametrize("path", GPT_NEO_MODEL_CONFIGS, ids=lambda p: p.stem)
def test_reference_gpt_neo_configs_load_unchanged(path):
    raw = json.loads(path.read_text())
    config = load_config(str(path))
    for key, value in raw.items():
        assert getattr(config, key) == value
    assert len(config.layer_kinds) == config.n_layer


def test_gpt_neo_configs_are_vendored_and_their_dataset_config_resolves():
    assert {p.stem for p in GPT_NEO_MODEL_CONFIGS} >= {"gpt3_small_256", "gpt3_XL_256_Pile", "gpt3_PAR_small_256"}
    assert (GPT_NEO_CONFIGS / "LICENSE").read_text().startswith("MIT License")
    (pile,) = resolve_datasets(load_config(str(GPT_NEO_CONFIGS / "gpt3_XL_256_Pile.json")))
    assert (pile.tokenizer_path, pile.eos_id, pile.padding_id) == ("gpt2", 50256, 50257)


def test_every_key_has_a_default_and_a_meaning():
    config = validate({}, "empty")
    for key, spec in KEYS.items():
        assert spec.meaning, key
        assert getattr(config, key) == spec.default


def test_model_name_resolves_under_configs_and_json_path_is_used_as_is(tmp_path):
    assert load_config("demo").source.endswith("configs/demo.json")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(SMALL))
    assert load_config(str(path)).n_embd == 32
    with pytest.raises(ConfigError, match="no_such_model"):
        load_config("no_such_model")


def test_overrides_are_typed():
    config = load_config("demo", ["train_steps=7", "lr=1e-3", "mesh_shape=x:1", 'layout=batch:x',
                                  'attention_types=[[["local"], 2]]', "n_layer=2", "recompute_grad=true"])
    assert config.train_steps == 7 and isinstance(config.train_steps, int)
    assert config.lr == 1e-3
    assert config.mesh_shape == "x:1"
    assert config.layer_kinds == ["local", "local"]
    assert config.recompute_grad is True
    assert parse_override("model_path=runs/a=b") == ("model_path", "runs/a=b")


BAD = [
    ("n_layers=4", "n_layer"),                       # unknown key, with a suggestion
    ("n_layer=four", "n_layer"),                     # wrong type
    ("n_layer=0", "n_layer"),                        # not positive
    ("n_head=5", "n_embd"),                          # n_embd not divisible by n_head
    ('attention_types=[[["global"], 3]]', "attention_types"),   # expands to 3 layers, not 2
    ('attention_types=[[["sparse"], 2]]', "attention_types"),   # unknown kind
    ('attention_types=[["global", 2]]', "attention_types"),     # malformed entry
    ("mesh_shape=x4", "mesh_shape"),                 # malformed mesh
    ("mesh_shape=x:0", "mesh_shape"),                # empty axis
    ("layout=batch", "layout"),                      # malformed layout
    ("layout=batches:x", "layout"),                  # unknown dimension
    ("layout=batch:z", "layout"),                    # axis not in the mesh
    ("precision=float16", "precision"),
    ("opt_name=sgd", "opt_name"),
    ("lr_decay=step", "lr_decay"),
    ("activation_function=gelux", "activation_function"),
    ("attn_dropout=1.5", "attn_dropout"),
    ("top_p=0", "top_p"),
    ('datasets=[["mydata", 25, "documents_random"]]', "datasets"),           # three fields, not four
    ('datasets=[["mydata", 25, "documents_sorted", 1.0]]', "datasets"),      # unknown sampling mode
    ("tokens_per_mb_per_replica=-1", "tokens_per_mb_per_replica"),
    ("input_fn=sample_documents", "input_fn"),       # not one of GPT-Neo's readers
    ("predict_steps=-1", "predict_steps"),
    ("train_steps", "train_steps"),                  # --set without a value
]


@pytest.mark.parametrize("override,key", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_a_config_error_naming_the_key(override, key):
    overrides = [f"{k}={json.dumps(v)}" for k, v in SMALL.items()] + ["mesh_shape=x:1"]
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides + [override])
    assert key in str(err.value)


def test_unknown_key_suggests_the_closest_known_key(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({**SMALL, "warmup_step": 10}))
    with pytest.raises(ConfigError, match="did you mean 'warmup_steps'") as err:
        load_config(str(path))
    assert str(path) in str(err.value)


def test_invalid_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "n_layer": 2,\n  "n_embd": \n}')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON at line 4"):
        load_config(str(path))


def test_dataset_id_without_dataset_config_names_the_id(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**SMALL, "datasets": [["nowhere", 4, "documents_random", 1.0]]}))
    config = load_config(str(path))  # the model itself is valid: --dry_run needs no data
    with pytest.raises(ConfigError, match="'datasets' names 'nowhere'"):
        resolve_datasets(config)


def test_dataset_config_beside_the_model_config_is_found(tmp_path):
    (tmp_path / "dataset_configs").mkdir()
    (tmp_path / "dataset_configs" / "mine.json").write_text(json.dumps({"n_vocab": 64, "path": "x/*.tfrecords",
                                                                         "eos_id": 0}))
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**SMALL, "datasets": [["mine", 3, "chunks", 2.0]]}))
    (dataset,) = resolve_datasets(load_config(str(path)))
    assert (dataset.id, dataset.stitch, dataset.mode, dataset.weight, dataset.eos_id) == ("mine", 3, "chunks", 2.0, 0)


def test_activation_function_is_honoured():
    """GPT-Neo read another key and always used GELU; here the configured activation changes the model."""
    tokens = jnp.arange(16)[None] % 64
    outputs = {}
    for name in ("gelu", "relu"):
        config = validate({**SMALL, "activation_function": name}, "test")
        outputs[name] = gpt2.logits(gpt2.init_params(config, jax.random.key(0)), tokens, config)
    assert float(jnp.max(jnp.abs(outputs["gelu"] - outputs["relu"]))) > 1e-4


# a value that turns each option of configs.OPTIONS on (a new row needs one here)
OPTION_SETTINGS = {
    "attention_types: global": {"attention_types": [[["local", "global"], 1]]},
    "attention_types: local": {"attention_types": [[["global", "local"], 1]]},
    "attention_types: linear": {"attention_types": [[["global", "linear"], 1]]},
    "attention_types: gau": {"attention_types": [[["global", "gau"], 1]]},
    "attention_types: none": {"attention_types": [[["global", "none"], 1]]},
    "rotary_emb": {"rotary_emb": True},
    "axial_pos_emb": {"axial_pos_emb": [4, 4]},
    "num_mem_kv": {"num_mem_kv": 2},
    "scalenorm": {"scalenorm": True},
    "rezero": {"rezero": True},
    "macaron": {"macaron": True},
    "mlp_glu": {"mlp_glu": True},
    "share_parameters": {"share_parameters": True},
    "no_weight_tie": {"no_weight_tie": True},
    "moe_layers": {"moe_layers": [1]},
    "entmax_loss": {"entmax_loss": True},
    "mlm_training": {"mlm_training": True, "mlm_mask_id": 3},
    "activation_function": {"activation_function": "softplus"},
}
UNIMPLEMENTED = [row for row, option in OPTIONS.items() if not option.implemented]


def test_options_table_covers_every_architecture_option_and_attention_kind():
    architecture = {"rotary_emb", "axial_pos_emb", "num_mem_kv", "scalenorm", "rezero", "macaron", "mlp_glu",
                    "share_parameters", "no_weight_tie", "moe_layers", "entmax_loss", "mlm_training",
                    "activation_function"}
    assert set(OPTIONS) == architecture | {f"attention_types: {kind}" for kind in ATTENTION_KINDS}
    assert set(OPTION_SETTINGS) == set(OPTIONS)
    for row, option in OPTIONS.items():
        assert option.what and (option.hf or option.hf_lacks), row


@pytest.mark.parametrize("row", [row for row, option in OPTIONS.items() if option.implemented], ids=str)
def test_options_in_use_finds_each_implemented_option_a_config_sets(row):
    config = validate({**SMALL, **OPTION_SETTINGS[row]}, "test")
    assert row in [used for used, _, _ in options_in_use(config)]


def test_a_plain_config_uses_only_global_attention():
    assert [row for row, _, _ in options_in_use(validate(SMALL, "test"))] == ["attention_types: global"]


@pytest.mark.parametrize("row", UNIMPLEMENTED, ids=str)
def test_an_unimplemented_option_is_refused_by_name_however_the_config_is_made(row, tmp_path):
    """validate, load_config (file and --set), Config.replace and Config itself all refuse, so no config
    that make_train_step, make_eval_step, generate or a benchmark receives can hold the option."""
    setting = OPTION_SETTINGS[row]
    key = next(iter(setting))
    named = f"layer 1 is '{row.split(': ')[1]}'" if row.startswith("attention_types") else f"key {key!r}"
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**SMALL, **setting}))
    makers = {
        "validate": lambda: validate({**SMALL, **setting}, "test.json"),
        "load_config": lambda: load_config(str(path)),
        "--set": lambda: load_config("demo", [f"{k}={json.dumps(v)}" for k, v in {**SMALL, **setting}.items()]),
        "replace": lambda: validate(SMALL, "test.json").replace(**setting),
        "Config": lambda: Config({**validate(SMALL, "test.json").to_dict(), **setting}, "test.json"),
    }
    for maker in makers.values():
        with pytest.raises(ConfigError, match="not implement") as err:
            maker()
        assert named in str(err.value) and OPTIONS[row].what in str(err.value)


def test_benchmarks_build_their_configs_through_validation():
    from bench.train_throughput import config_for

    assert config_for(SMALL).n_layer == 2
    with pytest.raises(ConfigError, match="'moe_layers'"):
        config_for({**SMALL, "moe_layers": [SMALL["n_layer"]]})


def test_readme_options_table_is_generated_from_the_options_table():
    readme = (REPO / "README.md").read_text()
    assert options_table() in readme
    assert readme_with_options_table(readme) == readme, "README.md is out of date: run python configs.py --readme"


def test_eval_tasks_take_lambada_with_its_file_and_refuse_other_tasks_by_name():
    with pytest.raises(ConfigError, match=r"key 'lambada_path' = '': is empty but eval_tasks has 'lambada'.*lambada_test.jsonl"):
        validate({**SMALL, "eval_tasks": ["lambada"]}, "test")
    assert validate({**SMALL, "eval_tasks": ["lambada"], "lambada_path": "l.jsonl"}, "test").eval_tasks == ["lambada"]
    with pytest.raises(ConfigError, match=r"key 'eval_tasks'.*unknown task 'hellaswag'.*lambada"):
        validate({**SMALL, "eval_tasks": ["hellaswag"]}, "test")
    assert validate({**SMALL, "eval_tasks": []}, "test").eval_tasks == []


def test_gpt_neo_keys_neomesh_does_not_act_on_are_logged_once_by_name_when_loaded(tmp_path, caplog):
    path = tmp_path / "neo.json"
    path.write_text(json.dumps({**SMALL, "input_fn": "generic_text", "shuffle_input_filenames": False,
                                "predict_steps": 1}))
    with caplog.at_level("INFO", logger="neomesh"):
        config = load_config(str(path))
        config.replace(train_steps=5)  # a derived config logs nothing again
        validate(config.to_dict(), str(path))
    messages = [record.getMessage() for record in caplog.records]
    for key in ("input_fn", "shuffle_input_filenames", "predict_steps"):
        assert sum(f"key {key!r}" in m for m in messages) == 1, (key, messages)
    assert all(str(path) in m for m in messages) and len(messages) == 3


def test_a_config_without_those_keys_logs_nothing(tmp_path, caplog):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({**SMALL, "shuffle_input_filenames": True, "predict_steps": 0}))
    with caplog.at_level("INFO", logger="neomesh"):
        load_config(str(path))
    assert caplog.records == []


def test_special_ids_take_the_key_then_the_dataset_config_and_pad_with_eos_where_none_fits(tmp_path):
    xl = load_config(str(GPT_NEO_CONFIGS / "gpt3_XL_256_Pile.json"))  # pile.json: eos 50256, padding 50257 = n_vocab
    assert special_ids(xl) == (50256, 50256)
    assert special_ids(xl.replace(eos_id=7, padding_id=9)) == (7, 9)
    assert special_ids(xl.replace(eos_id=7)) == (7, 7)
    assert special_ids(validate(SMALL, "test")) == (None, None)  # no datasets: nothing to read
    path = tmp_path / "elsewhere.json"
    path.write_text(json.dumps({**SMALL, "datasets": [["nowhere", 1, "chunks", 1.0]], "eos_id": 3}))
    assert special_ids(load_config(str(path))) == (3, 3)  # a dataset config not here is training's error


NAN, INF = float("nan"), float("inf")
OUT_OF_RANGE = [  # (key, value, what the message must say is accepted)
    ("lr", NAN, "finite"), ("lr", INF, "finite"), ("lr", -1e-3, "[0, inf)"),
    ("gradient_clipping", NAN, "finite"), ("layer_norm_epsilon", NAN, "finite"), ("layer_norm_epsilon", 0, "(0, inf)"),
    ("beta1", 1.0, "[0, 1)"), ("beta2", -3, "[0, 1)"), ("beta2", NAN, "finite"),
    ("epsilon", 0, "(0, inf)"), ("epsilon", -1e-8, "(0, inf)"), ("ada_epsilon1", -1e-30, "(0, inf)"),
    ("ada_epsilon2", -1e-3, "[0, inf)"), ("temperature", NAN, "finite"), ("z_loss", INF, "finite"),
    ("weight_decay", NAN, "finite"), ("top_p", NAN, "finite"), ("top_p", 0, "(0, 1]"),
    ("repetition_penalty", INF, "finite"), ("attn_dropout", NAN, "finite"), ("res_dropout", 1.0, "[0, 1)"),
    ("mlm_mask_prob", 1.5, "[0, 1]"), ("z_loss", 10**400, "beyond the range of a float"),
    ("peak_flops", -1e12, "[0, inf)"), ("peak_flops", "989e12", "takes a float"), ("peak_flops", NAN, "finite"),
    ("lr_decay_end", -1, "[1, 2^31"), ("seed", 2**63, "2^63 = 9223372036854775808"), ("seed", -1, "[0, 2^63"),
    ("sampling_seed", 2**64, "2^63"), ("n_vocab", 2**31, "2^31 = 2147483648"), ("n_ctx", 10**30, "2^31"),
    ("train_steps", 10**30, "2^31"), ("warmup_steps", 2**31, "2^31"), ("local_attention_radius", 10**30, "2^31"),
    ("intermediate_size", 2**31, "2^31"), ("n_layer", 2000, "[1, 1024]"), ("n_embd", 2**40, "2^31"),
    ("eos_id", -1, "[0, n_vocab = 64)"), ("eos_id", 64, "[0, n_vocab = 64)"), ("padding_id", -1, "[0, 2^31"),
    ("mlm_mask_ignore_ids", [1, 64], "n_vocab = 64"), ("precision", "fp16", "float32, bfloat16"),
    ("model_path", 5, "takes a str"), ("model_path", ["runs"], "takes a str"), ("model_path", "a\x00b", "NUL"),
    ("n_ctx", 10**5000, "about 5000 digits"), ("moe_params", {"a": [[[[[[[[[1]]]]]]]]]}, "nested"),
    ("attention_types", [[["global"], 10**12]], "expands to 1000000000000 layers"),
    ("attention_types", [[[["global"]], 2]], "unknown kind ['global']"),
    ("attention_types", [[[{"kind": "global"}], 2]], "unknown kind {'kind': 'global'}"),
    ("mesh_shape", "x:²", "is not name:size"),
    ("datasets", [["mydata", 1, "chunks", NAN]], "finite positive"),
    ("datasets", [["mydata", 1, "chunks", INF]], "finite positive"),
    ("datasets", [["../mydata", 1, "chunks", 1.0]], "no slash"),
    ("n_embd", 2**30, "dimension 'intermediate_expanded' would be 4294967296"),  # 4 * n_embd: beyond int32
    ("n_ctx", 2**31 - 1, "dimension 'row'"),  # a training row holds n_ctx + 1 tokens
]


@pytest.mark.parametrize("key,value,accepted", OUT_OF_RANGE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(OUT_OF_RANGE)])
def test_out_of_range_non_finite_and_mistyped_values_are_refused_naming_the_key(key, value, accepted):
    with pytest.raises(ConfigError) as err:
        validate({**SMALL, key: value}, "test.json")
    message = str(err.value)
    assert message.startswith("test.json: ") and "\n" not in message and accepted in message
    assert f"key {key!r}" in message or "dimension" in message


def test_arrays_xla_cannot_address_are_refused_before_anything_compiles():
    with pytest.raises(ConfigError, match=r"activations .* beyond the 2\^60"):  # batch * n_ctx * 4 n_embd
        validate({**SMALL, "n_embd": 2**20, "n_head": 1, "n_ctx": 2**20, "train_batch_size": 2**20}, "test.json")
    with pytest.raises(ConfigError, match=r"weight \S+ would hold .* beyond the 2\^60"):
        validate({**SMALL, "n_vocab": 2**31 - 1, "n_embd": 2**31 - 1, "n_head": 1, "intermediate_size": 4,
                  "gau_expanded_size": 4}, "test.json")


def test_values_at_the_edges_of_their_ranges_are_accepted():
    config = validate({**SMALL, "lr": 0.0, "beta1": 0.0, "seed": 2**63 - 1, "eos_id": 63, "padding_id": 64,
                       "attn_dropout": 0.0, "top_p": 1.0, "n_vocab": 64, "gradient_clipping": 0}, "test.json")
    assert special_ids(config) == (63, 63)  # padding_id >= n_vocab keeps its meaning: the eos_id
    assert validate({**SMALL, "n_layer": 96}, "test.json").n_layer == 96  # GPT-3's depth


def test_a_dataset_config_value_out_of_range_names_the_dataset_config(tmp_path):
    (tmp_path / "dataset_configs").mkdir()
    (tmp_path / "dataset_configs" / "mine.json").write_text(json.dumps({"path": "x/*.tfrecords", "eos_id": -1}))
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**SMALL, "datasets": [["mine", 1, "chunks", 1.0]]}))
    with pytest.raises(ConfigError, match=r"mine.json: key 'eos_id' = -1: accepted: an integer in \[0, 2\^31"):
        resolve_datasets(load_config(str(path)))


def test_config_files_that_are_not_utf8_too_deep_or_too_long_are_one_line_naming_the_file(tmp_path):
    files = {
        "latin1.json": ('{"model_path": "caf\u00e9"}'.encode("latin-1"), "not UTF-8 text (byte 19 is 0xe9)"),
        "deep.json": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        "digits.json": (b'{"n_ctx": ' + b"7" * 5000 + b"}", "more than 4300 digits"),
    }
    for name, (content, says) in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError) as err:
            load_config(str(tmp_path / name))
        assert str(err.value).startswith(f"{tmp_path / name}: ") and says in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="more than 4300 digits"):
        load_config("demo", ["n_ctx=" + "7" * 5000])
