"""notebooks/neomesh_example.ipynb, executed top to bottom in a real Jupyter kernel on the CPU with tiny
settings injected after its parameters cell, as papermill does."""

from __future__ import annotations

import ast
import json
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("transformers")

from conftest import xla_flags  # noqa: E402

from tests.test_train import REPO, SHARED_COMPILATION  # noqa: E402

NOTEBOOK = REPO / "notebooks" / "neomesh_example.ipynb"
TINY_SETTINGS = {"CORPUS_BYTES": 80_000, "VOCAB_SIZE": 320, "N_CTX": 32, "N_EMBD": 32, "N_HEAD": 2, "N_LAYER": 2,
                 "BATCH_SIZE": 4, "TRAIN_STEPS": 24, "LR": 0.01, "SAMPLE_TOKENS": 8, "EVAL_STEPS": 1,
                 "FINETUNE_STEPS": 2}


def with_parameters(notebook, values: dict):
    """A copy of the notebook with a cell assigning `values` right after the cell tagged `parameters`."""
    cells = notebook.cells
    (at,) = [i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", [])]
    lines = [f"{name} = {value!r}" for name, value in values.items()]
    injected = nbformat.v4.new_code_cell("# injected by the test\n" + "\n".join(lines))
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells = cells[:at + 1] + [injected] + cells[at + 1:]
    return notebook


def printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []) if output.get("output_type") == "stream")


@pytest.mark.slow
def test_the_notebook_trains_samples_exports_and_fine_tunes_on_the_cpu(tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setenv("XLA_FLAGS", xla_flags(1))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for name, value in SHARED_COMPILATION.items():
        monkeypatch.setenv(name, value)
    notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), {**TINY_SETTINGS, "WORK_DIR": str(work)})
    nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    text = printed(notebook)

    # the loss fell: the run's own metrics.jsonl, first logged mean against the last
    losses = [row["loss"] for row in map(json.loads, (work / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5, losses
    assert f"trained to step {TINY_SETTINGS['TRAIN_STEPS']}" in text
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for cell in notebook.cells for o in cell.get("outputs", []))  # the loss curve, inline

    # a sample of new text after the prompt
    sample = re.search(r"sample at step \d+:\n(.*)", text)
    assert sample and len(sample.group(1)) > len("def "), text

    # Hugging Face's GPTNeo on the export computes our logits; transformers generates from it
    difference = float(re.search(r"max \|HF logits - neomesh logits\| = (\S+)", text).group(1))
    assert difference < 1e-4
    assert "transformers greedy:" in text
    assert (work / "hf" / "model.safetensors").is_file()

    # the imported model fine-tuned from its step-0 checkpoint
    assert "fine-tuned from step 0 to step 2" in text
    assert sorted(p.name for p in (work / "neo" / "checkpoints").iterdir() if p.name.isdigit()) == ["0", "2"]


def test_the_notebook_has_one_parameters_cell_and_no_stored_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    assigned = {name.id for statement in ast.parse(tagged[0].source).body for target in statement.targets
                for name in ast.walk(target) if isinstance(name, ast.Name)}
    assert set(TINY_SETTINGS) <= assigned and "WORK_DIR" in assigned
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
