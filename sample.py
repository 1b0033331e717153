"""Autoregressive sampling (`main.py --predict`): the sampling filters, prompt handling and one
compiled decode loop. The model is models/gpt2.forward, the same as in training, here over a
decoding cache (models/attention.py describes it per attention kind).

One compiled call does everything: a prefill pass over the (padded) prompt fills the cache,
then a `lax.while_loop` adds one position per step, running the model on that position only.
Shapes never depend on the prompt: prompts are left-padded to one of a few length buckets, so a
new prompt reuses a compiled program unless it falls in a new bucket. Row b of the batch starts
at slot pad[b], so every row's newest token sits in the same slot while its position is slot -
pad[b]; padding slots are masked out of every attention.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configs import special_ids
from errors import ConfigError
from mesh import MeshLayout
from models import gpt2
from models.entmax import entmax

log = logging.getLogger("neomesh")

DEFAULT_PROMPT = "In a shocking finding, scientists discovered"
SMALLEST_PROMPT_BUCKET = 16  # prompts are padded to 16, 32, 64, ... tokens (at most n_ctx)
CACHE_ROUNDING = 64  # cache slots are rounded up to a multiple of this, so nearby lengths share a program


# --- logit filters: pure functions of logits [batch, vocab] -----------------------------------


def apply_repetition_penalty(logits, seen, penalty: float):
    """Make tokens already present less likely: a positive logit is divided by `penalty`, a
    negative one multiplied by it (CTRL's rule, as in Hugging Face). seen [batch, vocab] bool."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def apply_temperature(logits, temperature: float):
    """Divide by a positive temperature: below 1 sharpens, above 1 flattens."""
    return logits / temperature


def apply_top_k(logits, k: int):
    """Keep the k largest logits of each row (and any tied with the k-th); the rest become -inf.
    k = 0, or k >= vocab, keeps everything."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def apply_top_p(logits, p: float, probabilities=jax.nn.softmax):
    """Nucleus filter: keep the most likely tokens whose probabilities first sum to at least p
    (the most likely token always stays), and any tied with the least likely kept one; the rest
    become -inf. p = 1 keeps everything. `probabilities` maps logits to the distribution that is
    sampled (softmax, or entmax with entmax sampling), whose mass p measures."""
    if p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    sorted_probs = probabilities(sorted_logits)  # both map each logit's rank to its probability's
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the tokens ranked above
    kept_count = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # >= 1: the first has mass_before 0
    threshold = jnp.take_along_axis(sorted_logits, kept_count - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How a token is chosen from logits; hashable, so a compiled program is kept per setting."""

    temperature: float = 0.9  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    entmax: bool = False  # draw from entmax-1.3 of the filtered logits instead of softmax (--entmax_sampling)

    def check(self, where: str) -> None:
        if self.temperature < 0:
            raise ConfigError(f"{where}: temperature = {self.temperature}: must be zero (greedy) or more")
        if self.top_k < 0:
            raise ConfigError(f"{where}: top_k = {self.top_k}: must be zero (off) or more")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{where}: top_p = {self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"{where}: repetition_penalty = {self.repetition_penalty}: must be positive (1 is off)")


def choose_tokens(logits, seen, rng, settings: SamplingSettings):
    """logits [batch, vocab] float32 -> token ids [batch]: penalty, temperature, top-k, top-p,
    then a draw (or the argmax when temperature is 0), in Hugging Face's order.

    With settings.entmax the draw is from entmax-1.3 of the logits the filters leave, where
    softmax would be: temperature divides the logits first (below 1 also shrinks entmax's support,
    above 1 widens it), top-p measures its mass p in entmax probabilities, and a token outside
    entmax's support of the penalised, tempered logits is never drawn. Greedy is the same argmax."""
    if settings.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = apply_temperature(logits, settings.temperature)
    logits = apply_top_k(logits, settings.top_k)
    logits = apply_top_p(logits, settings.top_p, entmax if settings.entmax else jax.nn.softmax)
    if settings.entmax:
        logits = jnp.log(entmax(logits))  # -inf outside the support: never drawn
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# --- the compiled decode loop -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """The static shape of one compiled generation program."""

    batch: int
    prompt_slots: int  # the prompt bucket: prompts are left-padded to this many slots
    cache_slots: int  # prompt_slots + room for the new tokens, rounded up


def transposes_unembed(config, shape: DecodeShape) -> bool:
    """Whether the decode loop transposes the output embedding to [embd, vocab] once per call.
    A decoding step that multiplies rows first (decode_product) reads that order faster from two
    rows (125M, batch 8: each ~45 ms step ~10 ms faster on a Zen 5); for one row both orders read
    about equally fast, and the copy (~0.1 s at 125M) would only delay the first token. Weights
    first reads the table as stored, [vocab, embd]."""
    return shape.batch > 1 and config.decode_product != "weights_first"


def last_logits(hidden, output, shape: DecodeShape, config, layout):
    """hidden [batch, embd] (after ln_f) -> float32 logits [batch, vocab] through the model's output
    projection; `output` is gpt2.output_weights(...), its table [embd, vocab] when
    transposes_unembed."""
    return gpt2.unembed(hidden[:, None], output, config, layout, transposed=transposes_unembed(config, shape))[:, 0]


def decode_loop(params, prompt, pad, new_tokens, eos_id, seed, *, config, layout, shape, settings):
    """The whole generation, compiled once per (shape, settings): prefill, then one token per
    step until `new_tokens` (a traced scalar) are made or every row has emitted eos_id (-1: never).

    Returns the new tokens [batch, cache_slots - prompt_slots] (after a row's eos: eos_id) and
    how many steps ran.
    """
    params = jax.tree.map(lambda w: w.astype(gpt2.compute_dtype(config)), params)
    # with fsdp_axes, every weight gathered once for the whole generation, not at every token
    params = gpt2.gathered(params, gpt2.weights(config), layout)
    output = gpt2.output_weights(params, config)  # table [vocab, embd]
    if transposes_unembed(config, shape):
        output = (layout.constrain(output[0].T, ("embd", "vocab")), output[1])
    batch_rows = jnp.arange(shape.batch)
    capacity = shape.cache_slots - shape.prompt_slots
    rng = jax.random.key(seed)

    seen = jnp.zeros((shape.batch, config.n_vocab), bool)
    if settings.repetition_penalty != 1.0:  # the prompt counts as already present
        not_padding = jnp.arange(shape.prompt_slots)[None, :] >= pad[:, None]
        seen = seen.at[batch_rows[:, None], prompt].max(not_padding)

    cache = gpt2.init_cache(config, shape.batch, shape.cache_slots, first_slot=pad, layout=layout)
    hidden, cache, _ = gpt2.forward(params, prompt, config, layout, cache=cache, begins_text=True)
    logits = last_logits(hidden[:, -1], output, shape, config, layout)
    first = choose_tokens(logits, seen, jax.random.fold_in(rng, 0), settings)
    generated = jnp.full((shape.batch, capacity), jnp.maximum(eos_id, 0), jnp.int32)

    def emit(step, token, generated, seen, finished):
        token = jnp.where(finished, eos_id, token)  # a finished row keeps emitting eos
        generated = generated.at[:, step].set(token)
        seen = seen.at[batch_rows, token].set(True) if settings.repetition_penalty != 1.0 else seen
        return generated, seen, finished | (token == eos_id)

    generated, seen, finished = emit(0, first, generated, seen, jnp.zeros(shape.batch, bool))

    def keep_going(carry):
        step, _, _, _, finished = carry
        return (step < new_tokens) & ~jnp.all(finished)

    def one_token(carry):
        step, cache, generated, seen, finished = carry
        hidden, cache, _ = gpt2.forward(params, generated[:, step - 1, None], config, layout, cache=cache,
                                        begins_text=False)
        logits = last_logits(hidden[:, 0], output, shape, config, layout)
        token = choose_tokens(logits, seen, jax.random.fold_in(rng, step), settings)
        generated, seen, finished = emit(step, token, generated, seen, finished)
        return step + 1, cache, generated, seen, finished

    steps, _, generated, _, _ = jax.lax.while_loop(keep_going, one_token, (1, cache, generated, seen, finished))
    return generated, steps


# --- planning shapes, compiling, and the public entry point ----------------------------------


def prompt_bucket(length: int, n_ctx: int) -> int:
    """The smallest of 16, 32, 64, ... (capped at n_ctx) that holds `length` tokens."""
    bucket = SMALLEST_PROMPT_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, n_ctx)


def sampling_layout(layout: MeshLayout | None, batch: int) -> MeshLayout:
    """The layout for sampling: one device when none is given; a batch the batch axis does not
    divide (predict_batch_size 1 on a data-parallel mesh) is replicated instead of refused."""
    if layout is None:
        from jax.sharding import Mesh

        return MeshLayout(Mesh(np.asarray(jax.devices()[:1]), ("data",)), {})
    axis = layout.layout.get("batch")
    if axis is not None and batch % layout.mesh.shape[axis]:
        log.info("sampling: batch %d does not divide over mesh axis %r (size %d); the batch is replicated",
                 batch, axis, layout.mesh.shape[axis])
        return layout.with_layout({d: a for d, a in layout.layout.items() if d != "batch"})
    return layout


_COMPILED: dict = {}


def compiled_decode_loop(config, layout: MeshLayout, shape: DecodeShape, settings: SamplingSettings):
    """A jit-compiled `decode_loop`, kept per config, mesh, layout, shape and settings."""
    key = (json.dumps(config.to_dict(), sort_keys=True, default=str), layout.mesh, tuple(sorted(layout.layout.items())),
           layout.fsdp_axes, shape, settings)
    if key not in _COMPILED:
        from model_fns import param_shardings

        def batch_sharding(*trailing):
            return layout.sharding(("batch", *trailing), (shape.batch,) + (1,) * len(trailing), name="sampling batch")

        _COMPILED[key] = jax.jit(
            functools.partial(decode_loop, config=config, layout=layout, shape=shape, settings=settings),
            in_shardings=(param_shardings(config, layout), batch_sharding(None), batch_sharding(),
                          layout.replicated(), layout.replicated(), layout.replicated()),
            out_shardings=(batch_sharding(None), layout.replicated()),
        )
    return _COMPILED[key]


@dataclasses.dataclass
class Samples:
    """What `generate` returns: per prompt row, the prompt ids as used (after truncation), the new
    token ids (ending at the first eos, which is kept), and the new text when a tokenizer was given."""

    prompt_tokens: list[list[int]]
    tokens: list[list[int]]
    texts: list[str] | None = None


def as_token_rows(prompt, tokenizer) -> list[list[int]]:
    """A text, one token-id sequence, or several -> a list of token-id rows."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("generate: a text prompt needs tokenizer=...; or pass token ids")
        return [list(tokenizer.encode(prompt))]
    rows = list(prompt)
    if rows and all(isinstance(t, (int, np.integer)) for t in rows):
        return [[int(t) for t in rows]]
    if rows and all(isinstance(r, str) for r in rows):
        if tokenizer is None:
            raise ValueError("generate: text prompts need tokenizer=...; or pass token ids")
        return [list(tokenizer.encode(r)) for r in rows]
    try:
        return [[int(t) for t in row] for row in rows]
    except TypeError:
        raise ValueError("generate: prompt must be a text, a sequence of token ids, or a sequence of those") from None


def check_prompts(rows: list[list[int]], config) -> list[list[int]]:
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("generate: every prompt needs at least one token (an empty prompt has nothing to continue)")
    for i, row in enumerate(rows):
        bad = [t for t in row if not 0 <= t < config.n_vocab]
        if bad:
            raise ValueError(f"generate: prompt {i} has token id {bad[0]}, outside [0, n_vocab = {config.n_vocab})")
    longest = max(len(row) for row in rows)
    if longest >= config.n_ctx:
        log.warning("prompt of %d tokens is longer than n_ctx - 1 = %d: keeping its last %d tokens",
                    longest, config.n_ctx - 1, config.n_ctx - 1)
        rows = [row[-(config.n_ctx - 1):] for row in rows]
    return rows


def generate(
    params,
    config,
    prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    *,
    tokenizer=None,
    layout: MeshLayout | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    entmax_sampling: bool = False,
) -> Samples:
    """Continue each prompt row by up to max_new_tokens tokens (default: predict_max_steps),
    stopping a row at eos_id (default: configs.special_ids' rule; none: never) and every
    row at n_ctx. Sampling settings default to the config's; temperature 0 is greedy;
    entmax_sampling draws from entmax-1.3 instead of softmax (see choose_tokens). Rows of
    different lengths are fine. `params` is the float32 tree of gpt2.init_params, placed on any
    devices (they are resharded per the layout)."""
    refuse_masked_lm(config)
    rows = check_prompts(as_token_rows(prompt, tokenizer), config)
    settings = SamplingSettings(
        temperature=config.temperature if temperature is None else float(temperature),
        top_k=config.top_k if top_k is None else int(top_k),
        top_p=config.top_p if top_p is None else float(top_p),
        repetition_penalty=config.repetition_penalty if repetition_penalty is None else float(repetition_penalty),
        entmax=bool(entmax_sampling),
    )
    settings.check("generate")
    if eos_id is None:
        eos_id = special_ids(config, tokenizer)[0]
    seed = config.sampling_seed if seed is None else int(seed)
    requested = config.predict_max_steps if max_new_tokens is None else int(max_new_tokens)
    if requested < 0:
        raise ValueError(f"generate: max_new_tokens = {requested}: must be zero or more")

    longest = max(len(row) for row in rows)
    new_tokens = min(requested, config.n_ctx - longest)  # no position past n_ctx - 1
    if new_tokens < requested:
        log.info("generation stops at n_ctx = %d: %d new tokens instead of %d", config.n_ctx, new_tokens, requested)
    if new_tokens == 0:
        return Samples(rows, [[] for _ in rows], [""] * len(rows) if tokenizer is not None else None)

    bucket = prompt_bucket(longest, config.n_ctx)
    cache_slots = bucket + math.ceil(new_tokens / CACHE_ROUNDING) * CACHE_ROUNDING
    shape = DecodeShape(batch=len(rows), prompt_slots=bucket, cache_slots=cache_slots)
    layout = sampling_layout(layout, shape.batch)
    padded = np.zeros((shape.batch, bucket), np.int32)
    for i, row in enumerate(rows):
        padded[i, bucket - len(row):] = row
    pad = np.asarray([bucket - len(row) for row in rows], np.int32)

    # decode_precision bfloat16: the weights are cast once, inside the compiled program, and the
    # model computes as under precision bfloat16, so each token streams half the bytes
    decode_config = config.replace(precision="bfloat16") if config.decode_precision == "bfloat16" else config
    run = compiled_decode_loop(decode_config, layout, shape, settings)
    from model_fns import param_shardings

    params = jax.device_put(params, param_shardings(config, layout))  # a no-op when already placed so
    # every process holds every prompt row: each places the rows of its own devices
    padded, pad = (jax.make_array_from_callback(x.shape, layout.sharding(("batch",) + (None,) * (x.ndim - 1), x.shape,
                                                                         name="sampling batch"),
                                                lambda index, x=x: x[index]) for x in (padded, pad))
    generated, _ = run(params, padded, pad, np.int32(new_tokens), np.int32(-1 if eos_id is None else eos_id),
                       np.uint32(seed % 2**32))
    if not generated.is_fully_addressable:  # rows on other processes' devices
        from jax.experimental import multihost_utils

        generated = multihost_utils.process_allgather(generated, tiled=True)
    generated = np.asarray(jax.device_get(generated))[:, :new_tokens]

    completions = []
    for row in generated.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        completions.append(row)
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(row[:-1] if row and row[-1] == eos_id else row) for row in completions]
    return Samples(rows, completions, texts)


def refuse_masked_lm(config) -> None:
    """Sampling continues a prompt, which a masked-LM model (attending both ways) was not trained to do."""
    if config.mlm_training:
        raise ConfigError(f"{config.source}: key 'mlm_training' = True: an MLM model fills masks (mlm_mask_id) in a "
                          "text, it does not continue a prompt, and neomesh does not build mask filling yet; "
                          "--predict and generate take a causal LM (mlm_training: false)")


# --- main.py --predict -----------------------------------------------------------------------


def read_prompt(prompt_file: str | None) -> str:
    """The prompt text of --prompt FILE, or DEFAULT_PROMPT without one."""
    if prompt_file is None:
        log.info("no --prompt given: using the default prompt %r", DEFAULT_PROMPT)
        return DEFAULT_PROMPT
    import storage

    if not storage.isfile(prompt_file):
        raise ConfigError(f"--prompt {prompt_file}: no such file")
    try:
        text = storage.read_text(prompt_file)
    except UnicodeDecodeError as err:
        raise ConfigError(f"--prompt {prompt_file}: not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x}); "
                          "the prompt is a text file") from None
    if not text.strip():
        raise ConfigError(f"--prompt {prompt_file}: the prompt file is empty; write the text to continue into it")
    return text


def conversation_turns(text: str, where: str) -> list[tuple[str, str]] | None:
    """The turns of a prompt that is a conversation (one Firefly-format JSON line whose last turn
    has no assistant text yet), or None for a plain-text prompt."""
    from data.conversations import parse_conversation

    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(values, dict) or "conversation" not in values:
        return None
    return parse_conversation(text, where, prompt=True)


def encode_prompt(config, text: str, tokenizer, where: str) -> list[int]:
    """The prompt's tokens: its text encoded; a conversation rendered as training rendered it, with
    the first dataset's conversation_template (create_tfrecords writes it into the dataset config;
    data/conversations.py's default without one) up to the last turn's assistant prefix, each
    earlier answer ending with eos_id, so that the model continues as the assistant."""
    from configs import resolve_datasets
    from data.conversations import DEFAULT_TEMPLATE, check_template, render_prompt

    turns = conversation_turns(text, where)
    if turns is None:
        return tokenizer.encode(text)
    dataset = resolve_datasets(config)[0]
    template = DEFAULT_TEMPLATE
    if dataset.conversation_template is not None:
        template = check_template(dataset.conversation_template, f"{dataset.file}: key 'conversation_template'")
    else:
        log.info("%s: no conversation_template; the conversation prompt is rendered with the default one", dataset.file)
    eos_id = special_ids(config, tokenizer)[0]
    return render_prompt(turns, template, tokenizer.encode, [] if eos_id is None else [eos_id])


def sample_header(i: int) -> str:
    return "=" * 40 + f" SAMPLE {i} " + "=" * 40


def run_predict(config, layout: MeshLayout, prompt_file: str | None, sacred_id: str = "nosacred",
                entmax_sampling: bool = False) -> str:
    """`main.py --predict`: sample predict_batch_size completions of the prompt from the newest
    checkpoint in model_path (from entmax-1.3 with entmax_sampling), print them, and write them to
    model_path/predictions_<sacred_id>_<step>.txt (one `SAMPLE i` section per completion: the prompt,
    then the new text; only the new text with remove_partial_sequences)."""
    import storage
    from checkpoints import restore_params
    from encoders import load_dataset_tokenizer

    refuse_masked_lm(config)
    text = read_prompt(prompt_file)  # before the slow parts: a bad prompt file fails at once
    tokenizer = load_dataset_tokenizer(config)
    prompt = encode_prompt(config, text, tokenizer, f"--prompt {prompt_file}")
    if not prompt:
        raise ConfigError(f"--prompt {prompt_file}: the prompt encodes to no tokens")
    params, step = restore_params(config, layout)
    samples = generate(params, config, [prompt] * config.predict_batch_size, tokenizer=tokenizer, layout=layout,
                       entmax_sampling=entmax_sampling)

    prompt_text = tokenizer.decode(samples.prompt_tokens[0])
    shown_prompt = "" if config.remove_partial_sequences else prompt_text  # GPT-Neo's key: new tokens only
    sections = [f"{sample_header(i)}\n{shown_prompt}{completion}\n{'=' * 80}\n"
                for i, completion in enumerate(samples.texts)]
    path = storage.join(config.model_path, f"predictions_{sacred_id}_{step}.txt")  # local or gs://
    if jax.process_index() == 0:
        print(f"prompt ({len(prompt)} tokens):\n{prompt_text}\n")
        print("".join(sections), end="", flush=True)
        storage.write_text(path, "".join(sections))
        log.info("wrote %d samples to %s", len(sections), path)
    return path
