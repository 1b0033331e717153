"""Checkpoints in model_path: orbax, asynchronous and atomic, keeping the newest few.

A checkpoint at step s holds three items: `params`, `opt_state` (absent in a checkpoint
imported from Hugging Face) and `meta` (JSON, the `CheckpointMeta` below: the step, seed, the
data position, the config it was trained with, and whether it holds parameters only). Training
always resumes from the newest complete checkpoint: orbax writes into a temporary folder and
renames it when done (on a bucket, it marks a finished checkpoint with commit_success.txt), so
a crash mid-save leaves the previous checkpoint as the newest one.

model_path may be a local folder or `gs://bucket/...` (storage.py points orbax at
STORAGE_EMULATOR_HOST when it is set); orbax cannot write `memory://`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import uuid
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

import storage
from errors import ConfigError, StorageError

log = logging.getLogger("neomesh")

# What each item is; also lets orbax report a saved item's tree and shapes without reading arrays.
ITEM_HANDLERS = {"params": ocp.StandardCheckpointHandler, "opt_state": ocp.StandardCheckpointHandler,
                 "meta": ocp.JsonCheckpointHandler}


def item_handlers(directory: str) -> dict:
    # against a GCS emulator, no OCDBT (see storage.py: the emulator lacks what its manifest needs)
    ocdbt = not (storage.protocol(directory) == "gs" and storage.emulator())
    return {item: handler(use_ocdbt=ocdbt) if handler is ocp.StandardCheckpointHandler else handler()
            for item, handler in ITEM_HANDLERS.items()}


@dataclasses.dataclass
class CheckpointMeta:
    """The `meta` item of every checkpoint, written and read only here.

    schema 1 (this one); a checkpoint written before the schema existed reads as schema 0, with
    params_only taken from `imported_from`."""

    SCHEMA = 1

    step: int
    seed: int
    data_position: int  # the step whose batch comes next: batches are a pure function of (seed, step)
    config: dict
    params_only: bool = False  # no optimizer state: an import; training starts a fresh optimizer from it
    imported_from: str | None = None
    # fine-tuning (models/lora.py): params holds the adapters only, trained on this frozen base (a
    # checkpoint folder, or "random init (seed S)"); None: a whole model
    base_checkpoint: str | None = None
    schema: int = SCHEMA

    @classmethod
    def for_config(cls, config, step: int, **extra) -> CheckpointMeta:
        return cls(step=step, seed=config.seed, data_position=step, config=config.to_dict(), **extra)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any], where: str) -> CheckpointMeta:
        saved = dict(saved)
        schema = saved.pop("schema", 0)
        if schema > cls.SCHEMA:
            raise StorageError(f"{where}: checkpoint meta schema {schema} is newer than this neomesh reads "
                               f"({cls.SCHEMA}); update neomesh")
        if schema == 0:
            saved.setdefault("params_only", bool(saved.get("imported_from")))
        known = {field.name for field in dataclasses.fields(cls)}
        missing = {"step", "seed", "config"} - saved.keys()
        if missing:
            raise StorageError(f"{where}: checkpoint meta lacks {', '.join(sorted(missing))}")
        saved.setdefault("data_position", saved["step"])
        return cls(**{k: v for k, v in saved.items() if k in known}, schema=cls.SCHEMA)


ADAPTERS_FOLDER = "adapters"  # model_path/adapters: fine-tuning's checkpoints, apart from the base's


def checkpoints_directory(model_path: str, folder: str = "checkpoints") -> str:
    if not model_path:
        raise FileNotFoundError("model_path is empty: set it in the config or with --set model_path=DIR")
    if storage.protocol(model_path) not in ("file", "gs"):
        raise StorageError(f"model_path {model_path}: orbax checkpoints need a local folder or gs://bucket/...; "
                           f"{storage.protocol(model_path)}:// cannot hold them")
    return storage.join(storage.absolute(model_path), folder)


def tree_names(tree) -> dict[str, Any]:
    """{'blocks.0.attn.q': leaf, ...}: a tree's leaves by a path that does not depend on whether a
    level is a dict, a list or a named tuple (orbax's metadata spells named tuples as dicts)."""

    def part(key) -> str:
        for attribute in ("key", "idx", "name"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(part(k) for k in path): leaf for path, leaf in leaves}


# Under the checkpoints folder: where rotation renames a checkpoint before deleting it. Not a
# step's name, so no listing or restore ever considers what is in it; a start empties it.
DISCARDED = ".discarded"
# the file orbax writes last into a checkpoint on a bucket: without it the checkpoint is incomplete
COMMIT_MARKER = "commit_success.txt"


class Checkpoints:
    """model_path/checkpoints through orbax, with neomesh's own rotation and failure handling.

    Rotation (keep the newest `keep`; fewer than 1 keeps all) runs once a save is known to be
    complete, and never leaves half a checkpoint where a restore could find it: locally a
    checkpoint is first renamed into checkpoints/.discarded (atomic), then deleted; on a bucket,
    where deletion is object by object, its commit marker and meta go first, so that a kill midway
    leaves a folder every reader skips as incomplete, and the next start deletes it.

    A save that fails (a full disk, a lost bucket), in the foreground or in orbax's background
    thread, raises a StorageError naming the checkpoint and the newest complete one, at the latest
    from `wait()` / `close()`, which the training loop calls before it exits."""

    def __init__(self, model_path: str, keep: int = 3, asynchronous: bool = True, read_only: bool = False,
                 folder: str = "checkpoints"):
        self.directory = checkpoints_directory(model_path, folder)
        self.keep = keep
        self.read_only = read_only
        self.in_flight: int | None = None  # the step of the save orbax may still be writing
        self.remote = storage.is_remote(self.directory)
        if self.remote:
            storage.require_reachable(self.directory)
        storage.forget_listings()  # another process (or --new) may have changed the folder since it was listed
        writer = not read_only and jax.process_index() == 0
        if not read_only:  # before the first save: a failing one echoes while it is still being written
            quiet_closed_event_loop_reports()
        if writer:
            self.delete_leftovers()
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                item_names=tuple(ITEM_HANDLERS),
                item_handlers=item_handlers(self.directory),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=None, enable_async_checkpointing=asynchronous, create=not read_only,
                    # a save that a kill or a full disk interrupted leaves a temporary folder, holding space
                    cleanup_tmp_directories=not read_only,
                ),
            )
        except StorageError:
            raise
        except OSError as err:
            raise storage.write_error(self.directory, err) from None

    def where(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def items(self, step: int) -> set[str]:
        return set(storage.listdir(self.where(step))) & set(ITEM_HANDLERS)

    def has_optimizer_state(self, step: int) -> bool:
        return "opt_state" in self.items(step)

    def meta(self, step: int) -> CheckpointMeta:
        """The JSON item alone: cheap, and readable whatever the shapes of the arrays beside it."""
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return CheckpointMeta.from_json(dict(saved), self.where(step))

    def saved_shapes(self, step: int) -> dict[str, dict[str, tuple] | None]:
        """{'params': {name: shape}, 'opt_state': {name: shape} or None}, from orbax's metadata (no
        array is read)."""
        present = self.items(step)
        metadata = self.manager.item_metadata(step)
        shapes = {}
        for item in ("params", "opt_state"):
            tree = metadata[item] if item in present else None
            tree = getattr(tree, "tree", tree)
            shapes[item] = None if tree is None else {k: tuple(v.shape) for k, v in tree_names(tree).items()}
        return shapes

    def save(self, step: int, state: dict, meta: CheckpointMeta) -> None:
        """Start saving `step` (asynchronously unless made otherwise); the previous save is
        completed, its failure raised, and rotation done first."""
        self.wait()
        items = {"params": ocp.args.StandardSave(state["params"]), "meta": ocp.args.JsonSave(meta.to_json())}
        if state.get("opt_state") is not None:
            items["opt_state"] = ocp.args.StandardSave(state["opt_state"])
        self.in_flight = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:  # noqa: BLE001 - tensorstore's ValueError, OSError, gcsfs's errors
            self.in_flight = None
            raise self.save_failed(step, err) from None

    def committed(self, step: int) -> bool:
        """Whether `step` was written whole: locally orbax renames the finished folder into place;
        on a bucket it writes the commit marker last."""
        storage.forget_listings()
        if self.remote:
            return storage.exists(storage.join(self.where(step), COMMIT_MARKER))
        return storage.isdir(self.where(step))

    def save_failed(self, step: int, err: BaseException) -> StorageError:
        """The error for a save of `step` that did not complete; its partial files are deleted
        (they hold the space that ran out, and no restore can use them)."""
        if not self.remote:
            for partial in storage.glob(storage.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
                storage.rm_tree(partial)
        self.manager.reload()
        older = [s for s in self.manager.all_steps() if s != step and self.committed(s)]
        kept = (f"; the newest complete checkpoint, step {max(older)}, is intact" if older
                else "; no checkpoint was completed before it")
        return storage.write_error(self.where(step), err, kept)


    def restore(self, step: int, abstract: dict) -> tuple[dict, CheckpointMeta]:
        """Restore `step` into the shardings of `abstract` (a tree of jax.ShapeDtypeStruct with
        .sharding): the mesh and layout may differ from the ones it was saved with."""
        wanted = {"params": ocp.args.StandardRestore(abstract["params"]), "meta": ocp.args.JsonRestore()}
        if "opt_state" in abstract and self.has_optimizer_state(step):
            wanted["opt_state"] = ocp.args.StandardRestore(abstract["opt_state"])
        restored = self.manager.restore(step, args=ocp.args.Composite(**wanted))
        state = {"params": restored["params"], "opt_state": restored.get("opt_state")}
        return state, CheckpointMeta.from_json(dict(restored["meta"]), self.where(step))

    def restore_newest_intact(self, abstract: dict, check: Callable | None = None):
        """(state, meta, step) of the newest checkpoint that restores whole, or None when there
        is none at all. A damaged or incomplete one (unreadable meta, a missing or unreadable
        item, optimizer state missing from a checkpoint that is not a params-only import) is
        skipped with a warning naming it. `check(step, meta)` may refuse a checkpoint with a
        ConfigError, which is raised, not skipped: it is the user's to decide."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                meta = self.meta(step)
                missing = {"params"} | ({"opt_state"} if "opt_state" in abstract and not meta.params_only else set())
                missing -= self.items(step)
                if missing:
                    raise StorageError(f"it has no {' or '.join(sorted(missing))}")
                if check is not None:
                    check(step, meta)
                state, _ = self.restore(step, abstract)
                return state, meta, step
            except ConfigError:
                raise
            except Exception as err:  # noqa: BLE001 - whatever orbax or tensorstore met in a damaged folder
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                log.warning("checkpoint %s is damaged or incomplete (%s): skipping it", self.where(step), reason[:300])
                if not self.read_only:  # training will save this step again: the damaged folder goes aside
                    aside = storage.join(storage.parent(self.directory), "damaged_checkpoints", f"{step}-{uuid.uuid4().hex[:6]}")
                    storage.move(self.where(step), aside)
                    self.manager.reload()
                    log.warning("moved it to %s", aside)
        if steps:
            raise StorageError(f"{self.directory}: no checkpoint restores whole (steps {', '.join(map(str, steps))}); "
                               "move the damaged ones away, or start afresh with --new")
        return None

    def wait(self) -> None:
        """Until the save in flight is complete: raise a StorageError if it failed, else rotate."""
        step, self.in_flight = self.in_flight, None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as err:  # noqa: BLE001 - whatever orbax's background thread met
            if step is None:
                raise
            raise self.save_failed(step, err) from None
        if step is not None and not self.committed(step):  # orbax logs some failures and goes on
            raise self.save_failed(step, StorageError("orbax did not complete it"))
        if step is not None and not self.read_only and jax.process_index() == 0:
            self.rotate()

    def rotate(self) -> None:
        steps = sorted(self.manager.all_steps())
        if self.keep is None or self.keep < 1 or len(steps) <= self.keep:
            return
        for step in steps[:-self.keep]:
            self.discard(step)
        self.manager.reload()

    def discard(self, step: int) -> None:
        """Delete one checkpoint so that no moment of it looks like a checkpoint (see the class)."""
        source = self.where(step)
        try:
            if self.remote:
                for first in (COMMIT_MARKER, "meta"):
                    if storage.exists(storage.join(source, first)):
                        storage.rm_tree(storage.join(source, first))
                storage.rm_tree(source)
            else:
                aside = storage.join(self.directory, DISCARDED, f"{step}-{uuid.uuid4().hex[:6]}")
                storage.makedirs(storage.parent(aside))
                storage.move(source, aside)
                storage.rm_tree(aside)
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - OSError locally, gcsfs's errors on a bucket
            raise StorageError(f"{source}: could not delete this old checkpoint ({storage.first_line(err)}); "
                               f"check that {self.directory} is writable, then run again") from None

    def delete_leftovers(self) -> None:
        """What a kill during rotation left: the discarded folder, and on a bucket a step without
        its commit marker (no save is in flight at a start: model_path is locked)."""
        discarded = storage.join(self.directory, DISCARDED)
        if storage.exists(discarded):
            storage.rm_tree(discarded)
        if self.remote:
            for name in storage.listdir(self.directory):
                if name.isdigit() and not storage.exists(storage.join(self.directory, name, COMMIT_MARKER)):
                    log.warning("deleting %s: an incomplete checkpoint", storage.join(self.directory, name))
                    storage.rm_tree(storage.join(self.directory, name))

    def close(self) -> None:
        """Complete the save in flight (raising its failure) and release orbax's threads."""
        try:
            self.wait()
        finally:
            self.manager.close()


def quiet_closed_event_loop_reports() -> None:
    """When a save fails, tensorstore completes the writes still queued and hands each result to
    orbax's asyncio loop, which orbax closed when the first write failed; each hand-over is an
    unraisable `RuntimeError: Event loop is closed`, printed with a traceback (56 for one full
    disk). The failure itself is raised as one StorageError; these echoes of it are dropped, and
    every other unraisable error is reported as before."""
    report = sys.unraisablehook
    if getattr(report, "quiet_closed_event_loop", False):
        return

    def quiet(unraisable):
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
            return
        report(unraisable)

    quiet.quiet_closed_event_loop = True
    sys.unraisablehook = quiet


def abstract_tree(shardings, shapes):
    """ShapeDtypeStructs carrying the target shardings, for restoring onto a mesh."""
    return jax.tree.map(lambda s, shape: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=s), shardings, shapes)


def restore_params(config, layout, step: int | None = None) -> tuple[dict, int]:
    """The parameters of the newest (or a given) checkpoint in config.model_path, sharded by the
    layout. A fine-tuning config's are its base's with the adapters of model_path/adapters."""
    from model_fns import param_shardings
    from models import gpt2, lora

    if lora.active(config):
        return restore_adapted_params(config, layout, step)
    directory = checkpoints_directory(config.model_path)
    missing = f"no checkpoint in {directory}: train first, or import one with export.py --from_hf"
    if not storage.isdir(directory):
        raise FileNotFoundError(missing)
    checkpoints = Checkpoints(config.model_path, read_only=True)
    abstract = {"params": abstract_tree(param_shardings(config, layout), gpt2.param_shapes(config))}
    state, _, step = restore_step_or_newest(checkpoints, abstract, step, missing)
    return state["params"], step


def restore_step_or_newest(checkpoints, abstract, step: int | None, missing: str):
    """(state, meta, step): checkpoint `step` when one is asked for by number (no other will do),
    else the newest intact one; FileNotFoundError(missing) when there is none. Closes `checkpoints`."""
    try:
        if step is not None:
            state, meta = checkpoints.restore(step, abstract)
            return state, meta, step
        found = checkpoints.restore_newest_intact(abstract)
        if found is None:
            raise FileNotFoundError(missing)
        return found
    finally:
        checkpoints.close()


# --- fine-tuning: a frozen base and the adapters trained on it ----------------------------------------


def random_base(config) -> str:
    return f"random init (seed {config.seed})"


def resolve_base(config) -> tuple[str, int] | None:
    """The frozen base of a fine-tuning config: (model_path holding it, step), from lora_base (a
    model_path folder: its newest checkpoint; or a checkpoint folder .../checkpoints/STEP), else the
    newest checkpoint in model_path; None: there is none (a random init)."""
    where = config.source
    if config.lora_base:
        named = storage.absolute(config.lora_base.rstrip("/"))
        name, parent = storage.name(named), storage.parent(named)
        if name.isdigit() and storage.name(parent) == "checkpoints":
            if not storage.isdir(named):
                raise ConfigError(f"{where}: key 'lora_base' = {config.lora_base!r}: no checkpoint folder there")
            return storage.parent(parent), int(name)
        step = newest_step(named)
        if step is None:
            raise ConfigError(f"{where}: key 'lora_base' = {config.lora_base!r}: holds no checkpoint; accepted: a "
                              "model_path folder with checkpoints/, or a checkpoint folder .../checkpoints/STEP")
        return named, step
    step = newest_step(config.model_path)
    return None if step is None else (storage.absolute(config.model_path), step)


def newest_step(model_path: str) -> int | None:
    directory = checkpoints_directory(model_path)
    if not storage.isdir(directory):
        return None
    steps = [int(name) for name in storage.listdir(directory) if name.isdigit()]
    return max(steps) if steps else None


def base_name(base: tuple[str, int] | None, config) -> str:
    """How an adapter checkpoint's meta names its base."""
    return random_base(config) if base is None else storage.join(checkpoints_directory(base[0]), str(base[1]))


def restore_base(config, layout, base: tuple[str, int]) -> dict:
    """The frozen part of the model (lora.split's base) from checkpoint `base`, sharded by the
    layout; a checkpoint of another shape is refused by name."""
    from model_fns import param_shardings
    from models import gpt2, lora

    template = gpt2.weights(config)
    shardings = lora.split(param_shardings(config, layout), template)[0]
    shapes = lora.split(gpt2.param_shapes(config), template)[0]
    model_path, step = base
    checkpoints = Checkpoints(model_path, read_only=True)
    where = checkpoints.where(step)
    try:
        saved = checkpoints.saved_shapes(step)["params"] or {}
        expected = {name: tuple(s.shape) for name, s in tree_names(shapes).items()}
        differ = [f"{n} {saved.get(n)} in the base, {shape} in this model" for n, shape in expected.items()
                  if tuple(saved.get(n, ())) != shape]
        differ += [f"{n} only in the base" for n in saved if n not in expected]
        if differ:
            raise ConfigError(f"{config.source}: the fine-tuning base {where} does not fit this config's model "
                              f"({'; '.join(differ[:4])}); point lora_base at the model these keys describe")
        state, _ = checkpoints.restore(step, {"params": abstract_tree(shardings, shapes)})
    finally:
        checkpoints.close()
    return state["params"]


def check_base(meta: CheckpointMeta, expected: str, where: str) -> None:
    """Refuse adapters trained on another base than the one the config names."""
    if meta.base_checkpoint is None:
        raise ConfigError(f"{where} holds a whole model, not fine-tuning adapters; use another model_path")
    if meta.base_checkpoint != expected:
        raise ConfigError(f"{where}: these adapters were trained on the base {meta.base_checkpoint}, but this config's "
                          f"base is {expected}; set lora_base to {meta.base_checkpoint}, or use another model_path")


def restore_adapted_params(config, layout, step: int | None = None) -> tuple[dict, int]:
    """A fine-tuning config's whole parameter tree: the adapters of the newest (or a given) adapter
    checkpoint joined with the base it names (refused when the config names another)."""
    import jax

    from model_fns import param_shardings
    from models import gpt2, lora

    template = gpt2.weights(config)
    directory = checkpoints_directory(config.model_path, ADAPTERS_FOLDER)
    missing = f"no adapter checkpoint in {directory}: fine-tune first"
    if not storage.isdir(directory):
        raise FileNotFoundError(missing)
    shardings = lora.split(param_shardings(config, layout), template)[1]
    shapes = lora.split(gpt2.param_shapes(config), template)[1]
    checkpoints = Checkpoints(config.model_path, read_only=True, folder=ADAPTERS_FOLDER)
    abstract = {"params": abstract_tree(shardings, shapes)}
    state, meta, step = restore_step_or_newest(checkpoints, abstract, step, missing)
    base = resolve_base(config)
    check_base(meta, base_name(base, config), storage.join(directory, str(step)))
    if base is None:
        whole = jax.jit(lambda: gpt2.init_params(config, jax.random.key(config.seed)),
                        out_shardings=param_shardings(config, layout))()
        frozen = lora.split(whole, template)[0]
    else:
        frozen = restore_base(config, layout, base)
    return lora.join(frozen, state["params"], template), step
