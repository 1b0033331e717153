"""lm-evaluation-harness on a neomesh checkpoint, without exporting it: the `neomesh` model.

    python lm_eval_neomesh.py --model neomesh --model_args model=gpt3_small[,step=N] --tasks lambada_openai
    # or, in Python:
    import lm_eval, lm_eval_neomesh
    lm_eval.simple_evaluate(model="neomesh", model_args="model=gpt3_small", tasks=["lambada_openai"])

This file is `lm_eval` itself with the model registered: lm-eval finds models only in its registry,
and a model outside its own package is registered by importing the module that defines it (lm-eval
has no plugin discovery for models), so plain `lm_eval --model neomesh` does not know it. Every other
argument is lm-eval's own (`--tasks`, `--include_path`, `--batch_size`, `--limit`, ...).

model_args: `model` (a config name or .json path, as main.py's --model), `step` (default: the
newest checkpoint), `model_path` (default: the config's), `batch_size` (default: lm-eval's
--batch_size; "auto" means eval_batch_size). Loglikelihoods are batched through the compiled scorer
of eval_tasks.py, sharded by the config's mesh_shape and layout over the local devices; rolling
loglikelihoods score n_ctx-token windows as lm-eval's hf backend does; generate_until decodes
greedily (or at the task's temperature) with the KV-cached decode loop of sample.py.
"""

from __future__ import annotations

import logging
import sys

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

log = logging.getLogger("neomesh")

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf backend default


@register_model("neomesh")
class NeomeshLM(TemplateLM):
    """A neomesh checkpoint as an lm-eval model (loglikelihood, loglikelihood_rolling, generate_until)."""

    def __init__(self, model: str, step: int | str | None = None, model_path: str | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None, device: str | None = None,
                 **unknown):
        super().__init__()
        from errors import ConfigError

        if unknown:
            raise ConfigError(f"lm-eval --model_args: unknown argument(s) {', '.join(sorted(unknown))}; neomesh takes "
                              "model, step, model_path, batch_size")
        import encoders
        from checkpoints import restore_params
        from configs import load_config, special_ids
        from eval_tasks import ContinuationScorer
        from mesh import build_mesh_layout

        self.config = load_config(str(model), [f"model_path={model_path}"] if model_path else [])
        self.layout = build_mesh_layout(self.config)
        self.params, self.step = restore_params(self.config, self.layout, None if step in (None, "") else int(step))
        self.tokenizer = encoders.load_dataset_tokenizer(self.config)
        eos_id = special_ids(self.config, self.tokenizer)[0]
        if eos_id is None:
            raise ConfigError(f"{self.config.source}: no eos_id (config, dataset config or tokenizer): lm-eval needs "
                              "one to score a text from its start and to stop generation")
        self.eos_id = eos_id
        self.batch_size = (self.config.eval_batch_size if batch_size in (None, "", "auto") or str(batch_size).startswith("auto")
                           else int(batch_size))
        self.scorer = ContinuationScorer(self.config, self.layout, self.batch_size)
        log.info("lm-eval: %s at step %d, batches of %d", self.config.model_path, self.step, self.batch_size)

    # --- what TemplateLM builds on ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    @property
    def max_length(self) -> int:
        return self.config.n_ctx

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.source

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) -> (log-likelihood, greedy)."""
        results = self.scorer.score(self.params, [(context, continuation) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    # --- the two request kinds TemplateLM leaves to the model ----------------------------------------

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text: its tokens in disjoint windows of up to n_ctx
        predicted tokens, each window conditioned on the tokens before it that fit (the first on eos)."""
        from lm_eval import utils

        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append(window)
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_likelihood, _) in zip(owners, self.scorer.score(self.params, windows)):
            totals[owner] += log_likelihood
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued (greedy unless the task asks for a temperature) until one of the
        task's `until` strings, eos, max_gen_toks new tokens or n_ctx; the text before the stop string."""
        import sample

        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            settings = generation_settings(gen_kwargs, self.tok_decode([self.eot_token_id]))
            groups.setdefault(settings, []).append(index)
        for (until, max_new, temperature), indices in groups.items():
            keep = max(self.config.n_ctx - max_new, 1)  # room for the new tokens, as the hf backend leaves
            for start in range(0, len(indices), self.batch_size):
                chosen = indices[start:start + self.batch_size]
                rows = [self.tok_encode(requests[i].args[0])[-keep:] or [self.eot_token_id] for i in chosen]
                samples = sample.generate(self.params, self.config, rows, tokenizer=self.tokenizer, layout=self.layout,
                                          max_new_tokens=max_new, temperature=temperature, top_k=0, top_p=1.0,
                                          repetition_penalty=1.0, eos_id=self.eot_token_id)
                for i, text in zip(chosen, samples.texts):
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs


def generation_settings(gen_kwargs: dict, eot_text: str) -> tuple[tuple[str, ...], int, float]:
    """(stop strings, max new tokens, temperature) of a task's generation arguments, as the hf
    backend reads them: `until` (a string or list; eos's text always stops too), `max_gen_toks`,
    and `temperature` / `do_sample` (greedy unless do_sample, or a temperature above 0 without it)."""
    from errors import ConfigError

    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    if not all(isinstance(stop, str) for stop in until):
        raise ConfigError(f"lm-eval generation_kwargs: 'until' must be a string or a list of strings, not {until!r}")
    if eot_text and eot_text not in until:
        until.append(eot_text)
    max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    do_sample = kwargs.pop("do_sample", None)
    sampled = do_sample is True or (do_sample is None and temperature > 0)
    return tuple(until), max_new, (temperature or 1.0) if sampled else 0.0


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with the neomesh model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    cli_evaluate()


if __name__ == "__main__":
    main()
