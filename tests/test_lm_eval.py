"""The lm-evaluation-harness adapter (lm_eval_neomesh.py) on a real neomesh checkpoint: lm-eval's own
command line over local task YAMLs and a jsonl written here, checked against our scores computed
directly, and against lm-eval's `hf` backend on the same model exported to Hugging Face."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from conftest import xla_flags  # noqa: E402

from configs import load_config  # noqa: E402
from export import export_to_hf  # noqa: E402
from models import gpt2  # noqa: E402
from tests.test_eval_tasks import PASSAGES, log_softmax  # noqa: E402
from tests.test_export import perturbed_params, save_checkpoint, write_config_file  # noqa: E402
from tests.test_train import REPO, train_tiny_tokenizer  # noqa: E402

N_CTX = 32
TEXTS = ["the cat sat on the mat", "a bird flew over the river", "we went home to the garden and the house"]
LONG_TEXT = " ".join(PASSAGES * 2)  # several n_ctx windows for the rolling loglikelihood
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

TASKS = {
    # LAMBADA's shape: the last word of each passage, acc and perplexity
    "tiny_lambada": {"output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                     "doc_to_target": "{{' ' + text.split(' ')[-1]}}",
                     "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                     {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    "tiny_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                     "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
    "tiny_generate": {"output_type": "generate_until", "doc_to_text": "{{text}}", "doc_to_target": "{{text}}",
                      "generation_kwargs": {"until": [" river"], "max_gen_toks": 6, "do_sample": False},
                      "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
}


def write_tasks(folder: Path, data: dict[str, list[str]]) -> Path:
    """One YAML per task over a local jsonl (lm-eval's json loader: nothing is downloaded)."""
    folder.mkdir(parents=True)
    for name, spec in TASKS.items():
        rows = folder / f"{name}.jsonl"
        rows.write_text("".join(json.dumps({"text": text}) + "\n" for text in data[name]))
        lines = [f"task: {name}", "dataset_path: json", f"dataset_kwargs: {{data_files: {{test: '{rows}'}}}}",
                 "test_split: test", *(f"{key}: {json.dumps(value)}" for key, value in spec.items())]
        (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A neomesh checkpoint (perturbed random weights, step 5), its config, and its HF export."""
    workdir = tmp_path_factory.mktemp("lm_eval")
    tokenizer_file = workdir / "tokenizer.json"
    train_tiny_tokenizer(TEXTS * 10 + PASSAGES * 5, tokenizer_file, ["<|endoftext|>"])
    config_file = write_config_file(workdir, "tiny", tokenizer_file, n_ctx=N_CTX, n_layer=2, n_embd=32, n_head=2,
                                    attention_types=[[["global", "local"], 1]], eval_batch_size=4)
    config = load_config(str(config_file))
    params = perturbed_params(config, seed=5)
    save_checkpoint(config, params, step=5)
    hf_dir = export_to_hf(config, workdir / "hf")
    tasks = write_tasks(workdir / "tasks", {"tiny_lambada": PASSAGES, "tiny_rolling": TEXTS + [LONG_TEXT],
                                            "tiny_generate": TEXTS})
    return workdir, config_file, config, params, hf_dir, tasks


def neomesh_lm_eval_cli(checkpoint, output: Path):
    """`python lm_eval_neomesh.py` (lm-eval's command line with the model registered), as a user runs it."""
    workdir, config_file, _, _, _, tasks = checkpoint
    command = [sys.executable, str(REPO / "lm_eval_neomesh.py"), "--model", "neomesh",
               "--model_args", f"model={config_file},step=5", "--tasks", ",".join(TASKS), "--include_path", str(tasks),
               "--batch_size", "4", "--log_samples", "--output_path", str(output)]
    env = {**os.environ, **OFFLINE, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (results_file,) = output.rglob("results_*.json")
    samples = {name: [json.loads(line) for line in next(output.rglob(f"samples_{name}_*.jsonl")).read_text().splitlines()]
               for name in TASKS}
    return json.loads(results_file.read_text())["results"], samples


def direct_log_likelihood(params, config, context: list[int], continuation: list[int]) -> float:
    forward = jax.jit(gpt2.logits, static_argnums=2)
    logits = np.asarray(forward(params, np.asarray([(context + continuation)[:-1]], np.int32), config))[0]
    log_probs = log_softmax(logits)
    return float(sum(log_probs[len(context) - 1 + i, token] for i, token in enumerate(continuation)))


@pytest.mark.slow
def test_lm_eval_scores_a_checkpoint_as_our_direct_scores_and_as_its_hf_backend_on_the_export(checkpoint, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import encoders
    import sample
    from eval_tasks import TaskEvaluator
    from mesh import build_mesh_layout

    workdir, config_file, config, params, hf_dir, tasks = checkpoint
    results, samples = neomesh_lm_eval_cli(checkpoint, tmp_path / "out")
    tokenizer = encoders.load_dataset_tokenizer(config)

    # 1. LAMBADA's shape: lm-eval's acc and perplexity are our eval_tasks' lambada_acc and lambada_ppl
    lambada_path = workdir / "tasks" / "tiny_lambada.jsonl"
    ours = TaskEvaluator(config.replace(eval_tasks=["lambada"], lambada_path=str(lambada_path)),
                         build_mesh_layout(config, jax.devices()[:1]), tokenizer)(params)
    assert results["tiny_lambada"]["acc,none"] == pytest.approx(ours["lambada_acc"])
    assert results["tiny_lambada"]["perplexity,none"] == pytest.approx(ours["lambada_ppl"], rel=1e-5)

    # 2. rolling: a text shorter than n_ctx is every token's log-probability given eos and those before it
    eos = 0
    rolling = {s["doc"]["text"]: float(s["resps"][0][0]) for s in samples["tiny_rolling"]}
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert rolling[text] == pytest.approx(direct_log_likelihood(params, config, [eos], ids), rel=1e-5)

    # 3. generate_until: our greedy decode, cut before the stop string
    generated = {s["doc"]["text"]: s["resps"][0][0] for s in samples["tiny_generate"]}
    greedy = sample.generate(params, config, [tokenizer.encode(text) for text in TEXTS], tokenizer=tokenizer,
                             max_new_tokens=6, temperature=0.0, eos_id=eos).texts
    assert [generated[text] for text in TEXTS] == [g.split(" river")[0] for g in greedy]

    # 4. the hf backend on the exported model: the same loglikelihoods (rolling windows included) and generations
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu",
                                 tasks=list(TASKS), task_manager=TaskManager(include_path=str(tasks)), batch_size=4,
                                 log_samples=True)
    for name in ("tiny_lambada", "tiny_rolling"):
        theirs = sorted((json.dumps(s["doc"]), s["resps"]) for s in hf["samples"][name])
        mine = sorted((json.dumps(s["doc"]), s["resps"]) for s in samples[name])
        assert len(theirs) == len(mine) > 0
        for (doc, their_resps), (_, my_resps) in zip(theirs, mine):
            assert len(their_resps) == len(my_resps)
            for their, my in zip(their_resps, my_resps):
                assert abs(log_likelihood(their) - log_likelihood(my)) <= 1e-4, (name, doc)
    assert {s["doc"]["text"]: s["resps"][0][0] for s in hf["samples"]["tiny_generate"]} == generated
    assert hf["results"]["tiny_lambada"]["acc,none"] == results["tiny_lambada"]["acc,none"]


def log_likelihood(response) -> float:
    """A logged response's log-likelihood: [ll, greedy] or [ll] (as numbers, or as strings in the saved samples)."""
    while isinstance(response, (list, tuple)):
        response = response[0]
    return float(response)


def test_the_adapter_refuses_unknown_model_args_by_name(checkpoint):
    from errors import ConfigError
    from lm_eval_neomesh import NeomeshLM

    _, config_file, *_ = checkpoint
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) pretrained; neomesh takes model, step"):
        NeomeshLM(model=str(config_file), pretrained="x")
