"""Hugging Face interop (export.py): HF's GPTNeo is the independent reference implementation of the
architecture, so equal logits here are the model's correctness anchor as well as the converter's.

Tiny models (3 layers, 64 wide, 4 heads, n_ctx 64), a local window of 5 (shorter than the sequence),
a tokenizer of ~300 tokens trained here, and n_vocab 320 (a vocabulary padded past the tokenizer).
"""

from __future__ import annotations

import functools
import json
import logging
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import export  # noqa: E402
from checkpoints import CheckpointMeta, Checkpoints, restore_params  # noqa: E402
from configs import OPTIONS, load_config  # noqa: E402
from encoders import load_dataset_tokenizer, load_tokenizer  # noqa: E402
from export import ACTIVATIONS_TO_HF, ExportError, export_to_hf, import_from_hf  # noqa: E402
from mesh import build_mesh_layout  # noqa: E402
from models import gpt2  # noqa: E402
from models.activations import ACTIVATIONS  # noqa: E402

N_VOCAB, N_CTX, N_EMBD, N_HEAD, WINDOW = 320, 64, 64, 4, 5
ATTENTION_TYPES = [[["global", "local"], 1], [["local"], 1]]  # global, local, local


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def tokenizer_file(workdir):
    """A byte-level BPE tokenizer as GPT-Neo trains one: <|endoftext|> 0, <|padding|> 1, prefix space, NFKC."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    rng = random.Random(0)
    words = "the mesh named axis layout model token shard neo alpha beta gamma delta of and to".split()
    corpus = [" ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(200)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    path = workdir / "tok" / "byte-level-bpe.tokenizer.json"
    path.parent.mkdir()
    tokenizer.save(str(path))
    return path


def write_config(workdir, name: str, tokenizer_file, **overrides):
    """configs/<name>.json beside a dataset config naming the tokenizer; returns the loaded Config."""
    return load_config(str(write_config_file(workdir, name, tokenizer_file, **overrides)))


def write_config_file(workdir, name: str, tokenizer_file, **overrides):
    """configs/<name>.json beside a dataset config naming the tokenizer; returns its path."""
    configs = workdir / "configs"
    (configs / "dataset_configs").mkdir(parents=True, exist_ok=True)
    dataset = {"path": str(workdir / "no-shards" / "*.tfrecords"), "tokenizer_path": str(tokenizer_file),
               "eos_id": 0, "padding_id": 1, "n_vocab": N_VOCAB}
    (configs / "dataset_configs" / "tiny.json").write_text(json.dumps(dataset))
    values = {"n_vocab": N_VOCAB, "n_ctx": N_CTX, "n_embd": N_EMBD, "n_head": N_HEAD, "n_layer": 3,
              "attention_types": ATTENTION_TYPES, "local_attention_radius": WINDOW, "layer_norm_epsilon": 1e-4,
              "intermediate_size": 96, "model_path": str(workdir / name), "datasets": [["tiny", 1, "chunks", 1.0]]}
    values |= overrides
    path = configs / f"{name}.json"
    path.write_text(json.dumps(values))
    return path


def perturbed_params(config, seed: int):
    """Our init plus noise on every leaf, so LayerNorm scales and biases are not ones and zeros."""
    params = gpt2.init_params(config, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def save_checkpoint(config, params, step: int) -> None:
    checkpoints = Checkpoints(config.model_path, asynchronous=False)
    checkpoints.save(step, {"params": params, "opt_state": None}, CheckpointMeta.for_config(config, step, params_only=True))
    checkpoints.close()


def restore(config):
    return restore_params(config, build_mesh_layout(config, jax.devices()[:1]))


def random_tokens(seed: int, batch: int = 2, length: int = N_CTX):
    return np.random.default_rng(seed).integers(0, N_VOCAB, size=(batch, length))


def our_logits(params, config, tokens):
    return np.asarray(gpt2.logits(params, jnp.asarray(tokens), config))


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def load_hf(folder):
    """from_pretrained (safetensors only): the model, its loading info, and what transformers warned."""
    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        model, info = transformers.GPTNeoForCausalLM.from_pretrained(folder, use_safetensors=True,
                                                                      output_loading_info=True)
    finally:
        hf_logger.removeHandler(handler)
    return model.eval(), info, warnings


@pytest.fixture(scope="module")
def exported(workdir, tokenizer_file):
    """Ours (perturbed random weights, step 7) -> a checkpoint -> export_to_hf -> from_pretrained."""
    config = write_config(workdir, "ours", tokenizer_file)
    params = perturbed_params(config, seed=3)
    save_checkpoint(config, params, step=7)
    out = export_to_hf(config, workdir / "ours-hf")
    model, info, warnings = load_hf(out)
    return config, params, out, model, (info, warnings)


def test_export_gives_hf_the_same_logits(exported):
    config, params, _, model, _ = exported
    tokens = random_tokens(1)
    ours, theirs = our_logits(params, config, tokens), hf_logits(model, tokens)
    assert theirs.shape == (2, N_CTX, N_VOCAB)  # every padded vocabulary row is exported
    assert np.max(np.abs(ours - theirs)) <= 1e-4


def test_from_pretrained_reports_no_missing_or_unexpected_weights(exported):
    _, _, out, model, (info, warnings) = exported
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert not any(info.values()), info  # missing, unexpected and mismatched keys, load errors
    assert warnings == []  # transformers' LOAD REPORT (MISSING / UNEXPECTED) is a warning
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied, as ours


def test_export_then_import_preserves_every_parameter_bitwise(exported, workdir):
    config, params, out, _, _ = exported
    imported = import_from_hf(out, workdir / "reimported", workdir / "configs" / "reimported.json")
    for key in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "local_attention_radius", "layer_norm_epsilon",
                "activation_function", "mlp_width", "layer_kinds"):
        assert getattr(imported, key) == getattr(config, key), key
    restored, step = restore(imported)
    assert step == 0
    flat_in, tree_in = jax.tree.flatten(params)
    flat_out, tree_out = jax.tree.flatten(restored)
    assert tree_in == tree_out
    for a, b in zip(flat_in, flat_out):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    text = "the mesh <|endoftext|> neo"
    assert load_dataset_tokenizer(imported).encode(text) == load_dataset_tokenizer(config).encode(text)


def test_exported_tokenizer_loads_in_autotokenizer_and_encodes_as_ours(exported, tokenizer_file):
    _, _, out, _, _ = exported
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(str(tokenizer_file))
    text = "the mesh  named ﬁ axis\nlayout <|endoftext|> neo"
    assert hf_tokenizer.encode(text) == ours.encode(text)
    assert hf_tokenizer.eos_token_id == ours.eos_id == 0
    assert len(hf_tokenizer) < N_VOCAB  # the padded rows are never produced by the tokenizer


def test_hf_greedy_generation_equals_ours_token_for_token(exported, tokenizer_file):
    """HF's generate (its KV cache, its local-window mask) against our sample.generate at temperature 0;
    36 new tokens run far past the window of 5."""
    import sample

    config, params, _, model, _ = exported
    prompt = load_tokenizer(str(tokenizer_file)).encode("the mesh named axis layout")
    ours = sample.generate(params, config, prompt, temperature=0, max_new_tokens=36, eos_id=0).tokens[0]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=36, eos_token_id=0,
                            pad_token_id=1)[0, len(prompt):].tolist()
    assert len(ours) > 2 * WINDOW
    assert ours == hf


@pytest.fixture(scope="module")
def hf_folder(workdir, tokenizer_file):
    """A randomly initialised HF GPTNeoForCausalLM (global/local mix, window 5) saved as safetensors,
    with its tokenizer as vocab.json + merges.txt, the way EleutherAI's released folders hold it."""
    from tokenizers import Tokenizer

    hf_config = transformers.GPTNeoConfig(
        vocab_size=N_VOCAB, max_position_embeddings=N_CTX, hidden_size=N_EMBD, num_layers=3, num_heads=N_HEAD,
        attention_types=ATTENTION_TYPES, window_size=WINDOW, intermediate_size=128, layer_norm_epsilon=1e-3,
        activation_function="gelu_new", bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoForCausalLM(hf_config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    folder = workdir / "hf-random"
    model.save_pretrained(folder)  # safetensors
    Tokenizer.from_file(str(tokenizer_file)).model.save(str(folder))  # vocab.json + merges.txt
    return folder, model


@pytest.fixture(scope="module")
def imported(hf_folder, workdir):
    folder, model = hf_folder
    config = import_from_hf(folder, workdir / "from-hf", workdir / "configs" / "from_hf.json")
    params, _ = restore(config)
    return config, params, model


def test_import_gives_us_hf_logits(imported):
    config, params, model = imported
    assert config.layer_kinds == ["global", "local", "local"] and config.local_attention_radius == WINDOW
    assert config.mlp_width == 128 and config.layer_norm_epsilon == 1e-3 and config.activation_function == "gelu"
    tokens = random_tokens(2)
    assert np.max(np.abs(our_logits(params, config, tokens) - hf_logits(model, tokens))) <= 1e-4


@pytest.mark.parametrize("radius", [WINDOW - 1, WINDOW + 1])
def test_a_window_off_by_one_would_be_caught(imported, radius):
    """The equality above pins window_size == local_attention_radius: one position more or less differs."""
    config, params, model = imported
    tokens = random_tokens(2)
    shifted = config.replace(local_attention_radius=radius)
    assert np.max(np.abs(our_logits(params, shifted, tokens) - hf_logits(model, tokens))) > 1e-3


def test_imported_tokenizer_encodes_as_hf_and_is_found_through_the_config(imported, hf_folder):
    config, _, _ = imported
    folder, _ = hf_folder
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_dataset_tokenizer(config)  # the dataset config written beside the imported config
    text = "the mesh  named ﬁ axis 2048\nlayout <|endoftext|> neo gamma"
    assert ours.encode(text) == hf_tokenizer.encode(text)
    assert ours.eos_id == 0


# a value that turns on each option of configs.OPTIONS that HF GPTNeo cannot express (a new row needs one)
NOT_EXPORTABLE = {
    "attention_types: linear": {"attention_types": [[["global", "linear"], 1], [["local"], 1]]},
    "attention_types: gau": {"attention_types": [[["global", "gau", "local"], 1]], "gau_key_size": 16},
    "attention_types: none": {"attention_types": [[["none", "global", "local"], 1]]},
    "rotary_emb": {"rotary_emb": True},
    "axial_pos_emb": {"axial_pos_emb": [8, 8]},
    "num_mem_kv": {"num_mem_kv": 2},
    "scalenorm": {"scalenorm": True},
    "rezero": {"rezero": True},
    "macaron": {"macaron": True},
    "mlp_glu": {"mlp_glu": True},
    "share_parameters": {"share_parameters": True},
    "no_weight_tie": {"no_weight_tie": True},
    "moe_layers": {"moe_layers": [1]},
    "entmax_loss": {"entmax_loss": True},
    "mlm_training": {"mlm_training": True, "mlm_mask_id": 1},
    "activation_function": {"activation_function": "softplus"},
}


def test_every_option_hf_gptneo_cannot_express_has_a_refusal_test():
    assert set(NOT_EXPORTABLE) == {row for row, option in OPTIONS.items() if not option.hf}


@pytest.mark.parametrize("row", sorted(NOT_EXPORTABLE))
def test_export_refuses_by_name_each_option_hf_gptneo_cannot_express(workdir, tokenizer_file, row, capsys):
    """Through export.py's command line, one `error:` line naming the key, and nothing written: an option
    neomesh implements is refused for what HF lacks; one it does not yet, when the config loads."""
    setting = NOT_EXPORTABLE[row]
    key = next(iter(setting))
    name = "refused_" + row.replace(": ", "_")
    path = write_config_file(workdir, name, tokenizer_file, **setting)
    out = workdir / f"{name}-hf"
    assert export.main(["--model", str(path), "--to_hf", str(out)]) == 2  # as main.py: a user error exits 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"key {key!r}" in err
    assert not out.exists()
    option = OPTIONS[row]
    if option.implemented:
        with pytest.raises(ExportError, match="Hugging Face GPTNeo cannot express") as refused:
            export_to_hf(load_config(str(path)), out)
        assert f"key {key!r}" in str(refused.value) and option.hf_lacks in str(refused.value)
        assert not out.exists()
    else:
        assert "does not implement" in err


def test_import_refuses_a_pickle(workdir):
    folder = workdir / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neo"}))
    (folder / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(ExportError, match="pytorch_model.bin"):
        import_from_hf(folder, workdir / "pickled-out", workdir / "configs" / "pickled.json")


@pytest.mark.parametrize("ours", sorted(ACTIVATIONS_TO_HF))
def test_activation_names_mean_the_same_function_in_hf(ours):
    x = np.linspace(-6, 6, 241, dtype=np.float32)
    theirs = transformers.activations.ACT2FN[ACTIVATIONS_TO_HF[ours]](torch.tensor(x)).numpy()
    assert np.max(np.abs(np.asarray(ACTIVATIONS[ours](jnp.asarray(x))) - theirs)) <= 1e-5


@pytest.fixture(scope="module")
def cli_imported(hf_folder, workdir):
    """`python export.py --from_hf ...`, run through its command-line entry point."""
    import export

    folder, model = hf_folder
    config_path = workdir / "configs" / "neo_cli.json"
    assert export.main(["--from_hf", str(folder), "--model_path", str(workdir / "neo-cli"),
                        "--config_out", str(config_path)]) == 0
    return config_path, folder, model


def test_predict_at_temperature_zero_continues_an_imported_model_as_hf_generate_does(cli_imported, workdir):
    """The user's path: import on the command line, then `main.py --predict` (its tokenizer found through
    the written config) against HF's tokenizer + greedy generate, compared as text."""
    import main

    config_path, folder, model = cli_imported
    prompt_file = workdir / "prompt.txt"
    prompt_file.write_text("the mesh named axis layout")
    assert main.main(["--model", str(config_path), "--predict", "--prompt", str(prompt_file),
                      "--set", "temperature=0", "--set", "predict_max_steps=30"]) == 0
    predictions = (workdir / "neo-cli" / "predictions_nosacred_0.txt").read_text()

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = hf_tokenizer.encode(prompt_file.read_text())
    with torch.no_grad():
        new = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30, eos_token_id=0,
                             pad_token_id=1)[0, len(prompt):].tolist()
    new = new[:-1] if new[-1] == 0 else new
    decode = functools.partial(hf_tokenizer.decode, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert len(new) > 2 * WINDOW
    assert f"\n{decode(prompt)}{decode(new)}\n" in predictions


def test_main_export_of_an_imported_model_gives_back_hf_logits(cli_imported, workdir):
    """HF -> neomesh (export.py --from_hf) -> HF (main.py --export, default folder model_path/hf)."""
    import main

    config_path, _, model = cli_imported
    assert main.main(["--model", str(config_path), "--export"]) == 0
    again, info, warnings = load_hf(workdir / "neo-cli" / "hf")
    assert not any(info.values()) and warnings == []
    tokens = random_tokens(4)
    assert np.max(np.abs(hf_logits(again, tokens) - hf_logits(model, tokens))) == 0.0  # bitwise, both in torch


def test_import_reads_bfloat16_mask_buffers_and_a_tied_lm_head_as_older_checkpoints_store_them(hf_folder, workdir):
    """Released folders may hold bfloat16 or float16 weights, the attention mask buffers and a copy of
    the tied lm_head; each weight arrives as the float32 of what was stored, the rest is dropped."""
    from safetensors.torch import save_file

    folder, model = hf_folder
    legacy = workdir / "hf-legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    state = {name: t.to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    for i in range(3):
        state[f"transformer.h.{i}.attn.attention.bias"] = torch.ones(1, 1, N_CTX, N_CTX, dtype=torch.bool)
        state[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    save_file(state, str(legacy / "model.safetensors"), metadata={"format": "pt"})
    config = import_from_hf(legacy, workdir / "from-legacy", workdir / "configs" / "legacy.json")
    params, _ = restore(config)
    assert np.array_equal(np.asarray(params["wte"]), state["transformer.wte.weight"].float().numpy())
    q = state["transformer.h.1.attn.attention.q_proj.weight"].float().numpy()
    assert np.array_equal(np.asarray(params["blocks"][1]["attn"]["q"]).reshape(N_EMBD, N_EMBD).T, q)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"activation_function": "gelu"}, "exact erf"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"model_type": "gpt2"}, "model_type"),
    ],
)
def test_import_refuses_what_neomesh_cannot_run_by_name(hf_folder, workdir, change, named):
    folder, _ = hf_folder
    refused = workdir / f"hf-refused-{named.replace(' ', '-')}"
    refused.mkdir()
    (refused / "config.json").write_text(json.dumps(json.loads((folder / "config.json").read_text()) | change))
    (refused / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(ExportError, match=named):
        import_from_hf(refused, workdir / "refused-out", workdir / "configs" / "import_refused.json")
    assert not (workdir / "refused-out").exists()


def test_import_never_overwrites_a_config_or_a_checkpoint(cli_imported, workdir):
    config_path, folder, _ = cli_imported
    with pytest.raises(ExportError, match="exists"):
        import_from_hf(folder, workdir / "elsewhere", config_path)
    with pytest.raises(ExportError, match="already holds checkpoints"):
        import_from_hf(folder, workdir / "neo-cli", workdir / "configs" / "other.json")
    assert not (workdir / "elsewhere").exists() and not (workdir / "configs" / "other.json").exists()
