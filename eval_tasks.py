"""Task evaluations (`eval_tasks`): LAMBADA at every checkpoint and on --eval, and the scorer of
continuations they rest on, which the lm-evaluation-harness adapter (lm_eval_neomesh.py) shares.

LAMBADA asks for the last word of a passage. Each line of the task file is {"text": passage}; the
target is the passage's last word with the space before it, the context everything before that.
`lambada_acc` is the fraction of passages whose every target token is the model's greedy choice;
`lambada_log_ppl` the mean over passages of the target's negative log-likelihood (nats, summed over
its tokens); `lambada_ppl` its exp, lm-evaluation-harness's LAMBADA perplexity.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Sequence

import numpy as np

import storage
from errors import ConfigError

log = logging.getLogger("neomesh")

TASKS = ("lambada",)
LAMBADA_SOURCE = ("the standard LAMBADA test set as jsonl, one {\"text\": ...} per line: OpenAI's "
                  "lambada_test.jsonl (5153 passages, https://openaipublic.blob.core.windows.net/gpt-2/data/"
                  "lambada_test.jsonl), which neomesh never downloads itself")
SMALLEST_LENGTH_BUCKET = 16  # rows are padded to 16, 32, 64, ... tokens (at most n_ctx), one program each


# --- reading the task file ---------------------------------------------------------------------


def read_lambada(path: str, source: str) -> list[tuple[str, str]]:
    """(context, target) of every passage of the LAMBADA jsonl at `path` (local, gs://, ...); the
    target is the last word with its leading space. `source` names the config for messages."""
    if not path:
        raise ConfigError(f"{source}: key 'lambada_path' is empty but eval_tasks has 'lambada'; set it to {LAMBADA_SOURCE}")
    if not storage.isfile(path):
        raise ConfigError(f"{source}: key 'lambada_path' = {path!r}: no such file; it must be {LAMBADA_SOURCE}")
    passages = []
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, TypeError, KeyError):
            raise ConfigError(f"{path}: line {number} is not a JSON object with a \"text\" field "
                              f"(key 'lambada_path' must name {LAMBADA_SOURCE})") from None
        if not isinstance(text, str):
            raise ConfigError(f"{path}: line {number}: \"text\" must be a string, not {type(text).__name__}")
        split = split_last_word(text)
        if split is None:
            raise ConfigError(f"{path}: line {number}: the passage has no space, so no last word to predict: {text[:60]!r}")
        passages.append(split)
    if not passages:
        raise ConfigError(f"{path}: no passages (key 'lambada_path' must name {LAMBADA_SOURCE})")
    return passages


def split_last_word(text: str) -> tuple[str, str] | None:
    """("The cat sat on the", " mat") from "The cat sat on the mat"; None without a space."""
    text = text.strip()
    cut = text.rfind(" ")
    if cut <= 0:
        return None
    return text[:cut], text[cut:]


# --- scoring continuations -------------------------------------------------------------------------


def pack_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], n_ctx: int):
    """(inputs, labels, scored) [rows, length] for (context ids, continuation ids) pairs: row i is
    context + continuation (its last n_ctx + 1 tokens when longer) shifted by one, right-padded
    with id 0 to the row length bucket; `scored` marks the labels that are continuation tokens."""
    rows = []
    for context, continuation in pairs:
        if not continuation:
            raise ValueError("a continuation of no tokens has no likelihood to score")
        if not context:
            raise ValueError("a continuation needs at least one context token before it (e.g. eos)")
        if len(continuation) > n_ctx:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit in n_ctx = {n_ctx}")
        rows.append(((list(context) + list(continuation))[-(n_ctx + 1):], len(continuation)))
    length = length_bucket(max(len(tokens) - 1 for tokens, _ in rows), n_ctx)
    inputs = np.zeros((len(rows), length), np.int32)
    labels = np.zeros((len(rows), length), np.int32)
    scored = np.zeros((len(rows), length), bool)
    for i, (tokens, scored_count) in enumerate(rows):
        used = len(tokens) - 1
        inputs[i, :used] = tokens[:-1]
        labels[i, :used] = tokens[1:]
        scored[i, used - scored_count:used] = True
    return inputs, labels, scored


def length_bucket(length: int, n_ctx: int) -> int:
    bucket = SMALLEST_LENGTH_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, n_ctx)


def row_scores(params, inputs, labels, scored, config, layout):
    """(sum of the scored labels' log-probabilities [rows], whether each scored label is the argmax
    [rows]) under the causal model: right padding never reaches an earlier position."""
    import jax
    import jax.numpy as jnp

    from models import gpt2

    logits = gpt2.logits(params, inputs, config, layout)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    label_log_probs = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == labels
    return jnp.sum(jnp.where(scored, label_log_probs, 0.0), axis=-1), jnp.all(greedy | ~scored, axis=-1)


class ContinuationScorer:
    """Log-likelihoods of continuations given contexts, `batch_size` rows per compiled call, each
    batch sharded over the layout's batch axis (every host passes the same pairs)."""

    def __init__(self, config, layout, batch_size: int):
        if config.mlm_training:
            raise ConfigError(f"{config.source}: key 'mlm_training' = True: a masked-LM model sees the word it "
                              "would predict, so it has no continuation likelihoods (eval_tasks, lm-eval)")
        # a batch the batch axis does not divide runs unsplit rather than refused
        self.config, self.layout, self.batch_size = config, layout.for_batch(batch_size), batch_size

    @functools.cached_property
    def _compiled(self):
        import jax

        from model_fns import param_shardings

        return jax.jit(functools.partial(row_scores, config=self.config, layout=self.layout),
                       in_shardings=(param_shardings(self.config, self.layout), *[self._batch_sharding] * 3),
                       out_shardings=self.layout.replicated())

    @functools.cached_property
    def _batch_sharding(self):
        # rows over the batch axis; positions never split: a length bucket need not divide a mesh axis
        return self.layout.sharding(("batch", None), (self.batch_size, 1), name="eval_tasks batch")

    def score(self, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (context ids, continuation ids), in the order given.
        Pairs are batched longest first, so a batch's rows share a length bucket."""
        import jax

        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            # a short last batch is filled with copies of its first pair, whose scores are dropped
            batch = [pairs[i] for i in chosen] + [pairs[chosen[0]]] * (self.batch_size - len(chosen))
            arrays = pack_rows(batch, self.config.n_ctx)
            placed = [jax.make_array_from_callback(a.shape, self._batch_sharding, lambda index, a=a: a[index])
                      for a in arrays]
            log_likelihoods, greedy = jax.device_get(self._compiled(params, *placed))
            for row, i in enumerate(chosen):
                results[i] = (float(log_likelihoods[row]), bool(greedy[row]))
        return results


# --- LAMBADA --------------------------------------------------------------------------------------


def lambada_scores(results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """{lambada_acc, lambada_log_ppl, lambada_ppl} from each passage's (log-likelihood, greedy)."""
    log_ppl = -sum(ll for ll, _ in results) / len(results)
    return {"lambada_acc": sum(greedy for _, greedy in results) / len(results), "lambada_log_ppl": log_ppl,
            "lambada_ppl": math.exp(min(log_ppl, 700.0))}


class TaskEvaluator:
    """The config's eval_tasks, ready to score parameters: task files read and tokenized once (a
    missing or malformed file is refused here, before any training), then `__call__(params)` ->
    {metric: value} at every evaluation."""

    def __init__(self, config, layout, tokenizer=None):
        import encoders

        self.config = config
        self.scorer = ContinuationScorer(config, layout, config.eval_batch_size)
        tokenizer = tokenizer if tokenizer is not None else encoders.load_dataset_tokenizer(config)
        self.pairs = {}
        if "lambada" in config.eval_tasks:
            passages = read_lambada(config.lambada_path, config.source)
            contexts = tokenizer.encode_batch([context for context, _ in passages])
            targets = tokenizer.encode_batch([target for _, target in passages])
            largest = max(max(ids, default=0) for ids in contexts + targets)
            if largest >= config.n_vocab:
                raise ConfigError(f"{config.source}: key 'n_vocab' = {config.n_vocab}: the tokenizer gives id {largest} "
                                  f"on {config.lambada_path}; n_vocab must exceed every id of the dataset's tokenizer")
            self.pairs["lambada"] = list(zip(contexts, targets))
            log.info("eval_tasks: lambada, %d passages from %s", len(passages), config.lambada_path)

    def __call__(self, params) -> dict[str, float]:
        scores = {}
        if "lambada" in self.pairs:
            scores |= lambada_scores(self.scorer.score(params, self.pairs["lambada"]))
        return scores

    @staticmethod
    def line(step: int, scores: dict[str, float]) -> str:
        return f"step {step} | " + " | ".join(f"{name} {value:.4f}" for name, value in scores.items())
