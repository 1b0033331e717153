"""Checkpoints in model_path: orbax, asynchronous and atomic, keeping the newest few.

A checkpoint at step s holds three items: `params`, `opt_state` (absent in a checkpoint
imported from Hugging Face) and `meta` (JSON: the step, seed, the data position and the config
it was trained with). Training always resumes from the newest complete checkpoint: orbax
writes into a temporary folder and renames it when done, so a crash mid-save leaves the
previous checkpoint as the newest one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def checkpoints_directory(model_path: str) -> str:
    if not model_path:
        raise FileNotFoundError("model_path is empty: set it in the config or with --set model_path=DIR")
    return os.path.join(absolute(model_path), "checkpoints")


class Checkpoints:
    def __init__(self, model_path: str, keep: int = 3, asynchronous: bool = True, read_only: bool = False):
        self.directory = checkpoints_directory(model_path)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=asynchronous, create=not read_only,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def has_optimizer_state(self, step: int) -> bool:
        return "opt_state" in self.items(step)

    def items(self, step: int) -> set[str]:
        folder = Path(self.directory) / str(step)
        return {p.name for p in folder.iterdir()} if folder.is_dir() else {"params", "opt_state", "meta"}

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON item alone: cheap, and readable whatever the shapes of the arrays beside it."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def save(self, step: int, state: dict, meta: dict[str, Any]) -> None:
        items = {"params": ocp.args.StandardSave(state["params"]), "meta": ocp.args.JsonSave(meta)}
        if state.get("opt_state") is not None:
            items["opt_state"] = ocp.args.StandardSave(state["opt_state"])
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract: dict) -> tuple[dict, dict]:
        """Restore `step` into the shardings of `abstract` (a tree of jax.ShapeDtypeStruct with
        .sharding): the mesh and layout may differ from the ones it was saved with."""
        wanted = {"params": ocp.args.StandardRestore(abstract["params"]), "meta": ocp.args.JsonRestore()}
        if "opt_state" in abstract and self.has_optimizer_state(step):
            wanted["opt_state"] = ocp.args.StandardRestore(abstract["opt_state"])
        restored = self.manager.restore(step, args=ocp.args.Composite(**wanted))
        state = {"params": restored["params"], "opt_state": restored.get("opt_state")}
        return state, dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_tree(shardings, shapes):
    """ShapeDtypeStructs carrying the target shardings, for restoring onto a mesh."""
    return jax.tree.map(lambda s, shape: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=s), shardings, shapes)


def restore_params(config, layout, step: int | None = None) -> tuple[dict, int]:
    """The parameters of the newest (or a given) checkpoint in config.model_path, sharded by the layout."""
    from model_fns import param_shardings
    from models import gpt2

    directory = checkpoints_directory(config.model_path)
    missing = f"no checkpoint in {directory}: train first, or import one with export.py --from_hf"
    if "://" not in directory and not os.path.isdir(directory):
        raise FileNotFoundError(missing)
    checkpoints = Checkpoints(config.model_path, read_only=True)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(missing)
    abstract = {"params": abstract_tree(param_shardings(config, layout), gpt2.param_shapes(config))}
    state, _ = checkpoints.restore(step, abstract)
    checkpoints.close()
    return state["params"], step
