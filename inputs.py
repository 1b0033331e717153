"""Batches: TFRecord shards -> rows of n_ctx + 1 tokens -> the sharded (inputs, labels) of a step.

Read top to bottom, a batch is made like this:

1. `Sampler.__init__` resolves the config's `datasets` entries ([id, stitch, mode, weight]) to
   their dataset configs, finds the shards (local or gs://, one code path through fsspec),
   scans them once (checksums, record offsets, and the largest token id, which must be below
   n_vocab), and opens them for random access.
2. Global sample g = step * batch_size + row is the unit of determinism: every choice below is
   a pure function of (seed, split, g), never of what was sampled before, so a run resumed at
   step k, or run on any number of processes, sees exactly the rows an uninterrupted
   single-process run sees.
3. `Mixture` picks the dataset of g by weight: each block of MIXTURE_BLOCK samples holds every
   dataset exactly in proportion to its weight, in a seeded shuffled order, so g also tells
   which draw (k) of that dataset it is.
4. `ShardedDataset.example(k)` turns draw k into tokens: epoch = k // examples_per_epoch, and a
   seeded permutation of all records of the dataset (a fresh one each epoch) picks the records:
   `chunks` takes one record as it is, the documents modes join `stitch` records with
   end-of-text and take a random window (`documents_random`) or the start (`documents_fixed`),
   and `conversations` takes one conversation's record with its target mask, from its start
   (cut to n_ctx + 1 tokens, or padded with mask 0): one conversation per row, so no row attends
   across two conversations.
5. `Sampler.inputs_and_labels` makes a row a training pair: for a causal LM, the row and the row
   shifted by one; with mlm_training, `MaskedLM` hides some of its tokens (a pure function of
   (seed, split, g) as well) and the labels are the hidden originals; of a conversation, the
   labels are the shifted row where the token they predict is a target (the assistant's) and
   NOT_PREDICTED elsewhere.
6. `global_batch` asks for only the rows this process's devices hold and assembles the global
   jax.Array with the batch's sharding.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence

import fsspec
import numpy as np

from configs import DatasetConfig, resolve_datasets, special_ids
from errors import ConfigError, DataError
from tfrecord import ShardReader, ShardScan, scan_shard

__all__ = ["DataError", "Sampler", "MaskedLM", "NOT_PREDICTED", "global_batch", "check_dataset",
           "check_shards_exist"]

log = logging.getLogger("neomesh")

SPLITS = {"train": 0, "eval": 1}
MIXTURE_BLOCK = 10_000  # weights are exact within every block of this many samples
SCAN_BUDGET_BYTES = 2 << 30  # shards beyond this total are checked record by record as they are read
SHARD_COUNT_IN_NAME = re.compile(r"_(\d+)_(\d+)\.tfrecords$")  # {name}_{i}_{count}.tfrecords
MLM_STREAM = 2 << 20  # the masking's random stream, apart from the datasets' (small indices) and the mixture's
NOT_PREDICTED = -1  # a label at a position the loss does not score (model_fns.lm_loss): MLM, conversations


def _rng(*key: int) -> np.random.Generator:
    """An independent random stream for each key: the key, not the history, decides the numbers."""
    return np.random.default_rng([k & 0xFFFFFFFFFFFFFFFF for k in key])


# --- shards ------------------------------------------------------------------------------------


def expand_shards(pattern: str, where: str) -> list[str]:
    """The shard files a glob names, sorted (the order fixes every record's global number). A glob
    that matches a folder is refused: a shard is a file, and the folder's name suggests the glob."""
    fs, _ = fsspec.core.url_to_fs(pattern)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    found = fs.glob(pattern, detail=True)  # one listing tells files from folders
    folders = sorted(path if local else fs.unstrip_protocol(path)
                     for path, info in found.items() if info.get("type") == "directory")
    if folders:
        raise ConfigError(f"{where}: {pattern!r} matches the folder {folders[0]}; a shard glob matches TFRecord "
                          f"files, e.g. {folders[0].rstrip('/')}/*.tfrecords")
    matches = sorted(found) if local else sorted(fs.unstrip_protocol(path) for path in found)
    matches = [path for path in matches if not path.endswith(".tmp") and ".tfrecords.tmp-" not in path]
    if not matches:
        raise ConfigError(f"{where}: no shard matches {pattern!r} (relative paths are relative to the working "
                          "directory; make the shards with data/create_tfrecords.py)")
    return matches


class ShardedDataset:
    """One dataset: its shards as one numbered sequence of records, and its sampling mode."""

    def __init__(self, dataset: DatasetConfig, index: int, split: str, n_ctx: int, n_vocab: int,
                 eos_id: int | None, pad_id: int, seed: int):
        self.dataset = dataset
        self.index = index
        self.split = split
        self.n_ctx = n_ctx
        self.n_vocab = n_vocab
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.seed = seed
        self.mode, self.stitch, self.weight = dataset.mode, dataset.stitch, dataset.weight
        key = "path" if split == "train" else "eval_path"
        pattern = dataset.path if split == "train" else dataset.eval_path
        self.paths = expand_shards(pattern, f"dataset {dataset.id!r} ({dataset.file}): key {key!r}")
        self.readers = [ShardReader(path) for path in self.paths]
        self.scans: dict[int, ShardScan] = {}
        self._scan_and_check_ids()
        counts = [self._record_count(i) for i in range(len(self.paths))]
        self.first_record = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_records = int(self.first_record[-1])
        if self.n_records == 0:
            raise DataError(f"dataset {dataset.id!r} ({dataset.file}): its shards ({pattern}) hold no records")
        if len(self.scans) == len(self.paths) and not any(scan.token_counts.sum() for scan in self.scans.values()):
            # every record is empty: each row would be padding alone, and training would learn nothing
            shards = ", ".join(self.paths[:3]) + (f" and {len(self.paths) - 3} more" if len(self.paths) > 3 else "")
            raise DataError(f"dataset {dataset.id!r} ({dataset.file}): the {self.n_records} records of its shards "
                            f"({shards}) hold no tokens; remake them with data/create_tfrecords.py")
        if self.mode == "conversations":
            self.readers[0].read_conversation(0)  # shards without target masks fail here, naming the shard
        if self.mode in ("chunks", "conversations"):
            self.examples_per_epoch = self.n_records
        else:
            self.examples_per_epoch = max(1, self.n_records // self.stitch)

    def _scan_and_check_ids(self) -> None:
        """Full scan of the shards (up to SCAN_BUDGET_BYTES): training refuses ids >= n_vocab up front."""
        scanned_bytes = 0
        for i, path in enumerate(self.paths):
            if scanned_bytes > SCAN_BUDGET_BYTES:
                log.info("dataset %s: shards from %s on are checked as they are read (scan budget spent)",
                         self.dataset.id, path)
                break
            scan = scan_shard(path)
            self.scans[i] = scan
            self.readers[i].adopt_index(scan)
            scanned_bytes += int(scan.offsets[-1] + scan.lengths[-1]) if len(scan.offsets) else 0
            if scan.max_id >= self.n_vocab:
                raise DataError(self._id_error(scan.max_id, path, scan.max_id_offset))
            if scan.min_id < 0:
                raise DataError(f"dataset {self.dataset.id!r}: {path} holds a negative token id ({scan.min_id})")

    def _id_error(self, largest: int, path: str, offset: int) -> str:
        return (f"dataset {self.dataset.id!r} ({self.dataset.file}): token id {largest} in {path} (record at byte "
                f"offset {offset}) is >= n_vocab = {self.n_vocab}; the model cannot embed it. Raise n_vocab to at "
                f"least {largest + 1}, or re-tokenize the data with the model's tokenizer")

    def _record_count(self, shard: int) -> int:
        if shard in self.scans:
            return len(self.scans[shard].offsets)
        named = SHARD_COUNT_IN_NAME.search(self.paths[shard])
        if named:  # trusted now, verified when the shard is first opened
            return int(named.group(2))
        return len(self.readers[shard])

    def record(self, number: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids [start:stop] of record `number` (counted across the sorted shards)."""
        reader, within = self._locate(number)
        ids = reader.read_ids(within, start, stop)
        self._check_ids(ids, reader, within)
        return ids

    def _locate(self, number: int) -> tuple[ShardReader, int]:
        """(the shard's reader, the record's index in it) of record `number`."""
        shard = int(np.searchsorted(self.first_record, number, side="right")) - 1
        reader = self.readers[shard]
        expected = int(self.first_record[shard + 1] - self.first_record[shard])
        if shard not in self.scans and len(reader) != expected:
            raise DataError(f"{reader.path}: holds {len(reader)} records but its name says {expected}")
        return reader, number - int(self.first_record[shard])

    def _check_ids(self, ids: np.ndarray, reader: ShardReader, within: int) -> None:
        if len(ids) and ids.max() >= self.n_vocab:
            raise DataError(self._id_error(int(ids.max()), reader.path, int(reader.offsets[within])))

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one sampler per run; the cache holds two epochs at most)
    def permutation(self, epoch: int) -> np.ndarray:
        return _rng(self.seed, SPLITS[self.split], self.index, epoch).permutation(self.n_records)

    def example(self, draw: int) -> np.ndarray:
        """Draw number `draw` of this dataset: n_ctx + 1 token ids."""
        epoch, position = divmod(draw, self.examples_per_epoch)
        order = self.permutation(epoch)
        length = self.n_ctx + 1
        if self.mode in ("chunks", "conversations"):
            return self._fit(self.record(int(order[position])), length)
        numbers = order[(position * self.stitch + np.arange(self.stitch)) % self.n_records]
        if self.mode == "documents_fixed":
            parts, total = [], 0
            for number in numbers:
                document = self._document(int(number))
                parts.extend(document)
                total += sum(len(p) for p in document)
                if total >= length:
                    break
            return self._fit(np.concatenate(parts), length)
        window_rng = _rng(self.seed, SPLITS[self.split], self.index, draw, 1)
        lengths = self._document_lengths(numbers)
        if lengths is None:  # shard not scanned: decode every document to learn the total
            joined = np.concatenate([part for number in numbers for part in self._document(int(number))])
            if len(joined) <= length:
                return self._fit(joined, length)
            start = int(window_rng.integers(0, len(joined) - length + 1))
            return joined[start:start + length]
        total = int(lengths.sum())
        if total <= length:
            return self._fit(np.concatenate([p for number in numbers for p in self._document(int(number))]), length)
        # the same window as above, but only the documents it overlaps are read and decoded
        start = int(window_rng.integers(0, total - length + 1))
        ends = np.cumsum(lengths)
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends - lengths, start + length, side="left"))
        pieces = []
        for j in range(first, last):
            begin = int(ends[j] - lengths[j])
            pieces.append(self._document_piece(int(numbers[j]), max(start, begin) - begin,
                                               min(start + length, int(ends[j])) - begin))
        return np.concatenate(pieces)

    def conversation(self, draw: int) -> tuple[np.ndarray, np.ndarray]:
        """conversations mode: (token ids, target mask) of draw `draw`, n_ctx + 1 of each: the
        conversation's start, or the whole of it padded (padding is no target)."""
        epoch, position = divmod(draw, self.examples_per_epoch)
        reader, within = self._locate(int(self.permutation(epoch)[position]))
        ids, mask = reader.read_conversation(within)
        self._check_ids(ids, reader, within)
        length = self.n_ctx + 1
        padding = max(0, length - len(ids))
        return (np.concatenate([ids[:length], np.full(padding, self.pad_id, ids.dtype)]),
                np.concatenate([mask[:length] != 0, np.zeros(padding, bool)]))

    def _document_lengths(self, numbers: np.ndarray) -> np.ndarray | None:
        """Tokens each document contributes (its own, plus the end-of-text joined after it), from the scan."""
        shards = np.searchsorted(self.first_record, numbers, side="right") - 1
        lengths = np.empty(len(numbers), dtype=np.int64)
        for i, (number, shard) in enumerate(zip(numbers, shards)):
            scan = self.scans.get(int(shard))
            if scan is None:
                return None
            within = int(number - self.first_record[shard])
            adds_eos = self.eos_id is not None and int(scan.last_ids[within]) != self.eos_id
            lengths[i] = int(scan.token_counts[within]) + adds_eos
        return lengths

    def _document_piece(self, number: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start:stop] of a document followed by its end-of-text (see `_document`)."""
        ids = self.record(number, start, stop)
        if len(ids) < stop - start:  # the slice reaches past the record: the appended end-of-text
            ids = np.concatenate([ids, np.asarray([self.eos_id], dtype=ids.dtype)])
        return ids

    def _document(self, number: int) -> list[np.ndarray]:
        """A record, followed by end-of-text unless it already ends with one (create_tfrecords appends it)."""
        ids = self.record(number)
        if self.eos_id is None or (len(ids) and ids[-1] == self.eos_id):
            return [ids]
        return [ids, np.asarray([self.eos_id], dtype=ids.dtype)]

    def _fit(self, ids: np.ndarray, length: int) -> np.ndarray:
        if len(ids) >= length:
            return ids[:length]
        return np.concatenate([ids, np.full(length - len(ids), self.pad_id, dtype=ids.dtype)])


# --- mixing datasets by weight -----------------------------------------------------------------


class Mixture:
    """Which dataset global sample g comes from, and which draw of that dataset it is."""

    def __init__(self, weights: Sequence[float], seed: int, split: str):
        self.seed, self.split = seed, split
        shares = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        # largest remainder: every block holds round(share * block) samples of each dataset, summing to the block
        exact = shares * MIXTURE_BLOCK
        quotas = np.floor(exact).astype(np.int64)
        short = MIXTURE_BLOCK - int(quotas.sum())
        quotas[np.argsort(-(exact - quotas), kind="stable")[:short]] += 1
        self.quotas = quotas
        self.slots = np.repeat(np.arange(len(quotas)), quotas)

    @functools.lru_cache(maxsize=4)  # noqa: B019
    def block(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, rank among that dataset's slots) of every slot of block `number`."""
        if len(self.quotas) == 1:
            return self.slots, np.arange(MIXTURE_BLOCK)
        order = _rng(self.seed, SPLITS[self.split], 1 << 20, number).permutation(self.slots)
        rank = np.empty(MIXTURE_BLOCK, dtype=np.int64)
        for dataset in range(len(self.quotas)):
            where = np.flatnonzero(order == dataset)
            rank[where] = np.arange(len(where))
        return order, rank

    def draw(self, g: int) -> tuple[int, int]:
        number, slot = divmod(g, MIXTURE_BLOCK)
        datasets, ranks = self.block(number)
        dataset = int(datasets[slot])
        return dataset, number * int(self.quotas[dataset]) + int(ranks[slot])


# --- masked-LM rows ------------------------------------------------------------------------------


class MaskedLM:
    """mlm_training: one row of tokens -> (inputs, labels), each n_ctx tokens.

    The text is the row's first n_ctx tokens, or with mlm_cls_token_id that token followed by the
    first n_ctx - 1. Each position is chosen with probability mlm_mask_prob, except padding (the
    row's dataset's padding id, as configs.special_ids resolves it), the cls token and the ids of
    mlm_mask_ignore_ids, which never are. Of the chosen positions a mlm_random_token_prob share
    shows a random id, a mlm_same_token_prob share shows its own token, and the rest show
    mlm_mask_id (BERT's 80/10/10 is same 0.1, random 0.1). The labels hold the original token at
    every chosen position and NOT_PREDICTED elsewhere: the loss scores the chosen positions only.

    A random id is drawn uniformly from the ids the row's dataset can hold (its dataset config's
    n_vocab, else the model's) that are not special here: not the mask, cls or padding id nor an
    ignored id, so a random replacement never looks like a token the model is told to skip.

    Every choice is a pure function of (seed, split, g), g = step * batch_size + row: resuming, or
    sampling only some rows on each host, masks each row as an uninterrupted run does.
    """

    def __init__(self, config, split: str, datasets: Sequence[ShardedDataset]):
        self.seed, self.split, self.n_ctx = config.seed, split, config.n_ctx
        self.mask_id, self.cls_id = config.mlm_mask_id, config.mlm_cls_token_id
        self.mask_prob = config.mlm_mask_prob
        self.same_prob, self.random_prob = config.mlm_same_token_prob, config.mlm_random_token_prob
        ignored = [int(i) for i in config.mlm_mask_ignore_ids or []]
        cls = [] if self.cls_id is None else [self.cls_id]
        self.never_masked = [np.asarray(sorted({*ignored, *cls, d.pad_id}), np.int64) for d in datasets]
        self.random_ids = []
        for dataset, never in zip(datasets, self.never_masked):
            vocab = dataset.dataset.n_vocab or config.n_vocab
            self.random_ids.append(np.setdiff1d(np.arange(vocab), [*never, self.mask_id]).astype(np.int32))

    def text(self, tokens: np.ndarray) -> np.ndarray:
        """The n_ctx tokens the model reads: the row's first, after the cls token if there is one."""
        if self.cls_id is None:
            return tokens[:self.n_ctx].astype(np.int32)
        return np.concatenate([[self.cls_id], tokens[:self.n_ctx - 1]]).astype(np.int32)

    def mask(self, tokens: np.ndarray, g: int, dataset: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) int32 [n_ctx] of global sample g, whose tokens come from `dataset`."""
        text = self.text(tokens)
        rng = _rng(self.seed, SPLITS[self.split], MLM_STREAM, g)
        # the same three draws for every row, used or not: no row's numbers depend on another's
        choose, share = rng.random(self.n_ctx), rng.random(self.n_ctx)
        random_pick = rng.integers(0, max(len(self.random_ids[dataset]), 1), self.n_ctx)
        chosen = (choose < self.mask_prob) & ~np.isin(text, self.never_masked[dataset])
        random = chosen & (share < self.random_prob)
        masked = chosen & (share >= self.random_prob + self.same_prob)
        inputs = np.where(masked, self.mask_id, text).astype(np.int32)
        if len(self.random_ids[dataset]):
            inputs[random] = self.random_ids[dataset][random_pick[random]]
        labels = np.where(chosen, text, NOT_PREDICTED).astype(np.int32)
        return inputs, labels


# --- the sampler -------------------------------------------------------------------------------


class Sampler:
    """Rows of n_ctx + 1 tokens for any step, as a pure function of (seed, split, step, row, batch size)."""

    def __init__(self, config, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: accepted: {', '.join(SPLITS)}")
        self.config, self.split, self.n_ctx = config, split, config.n_ctx
        dataset_configs = resolve_datasets(config)
        if split == "eval":
            with_eval = [d for d in dataset_configs if d.eval_path]
            if not with_eval:
                files = ", ".join(d.file for d in dataset_configs)
                raise ConfigError(f"evaluation needs key 'eval_path' (a glob of evaluation shards) in a dataset "
                                  f"config, and none sets it: {files}")
            dataset_configs = with_eval
        self.datasets = [self._open(d, i) for i, d in enumerate(dataset_configs)]
        self.mixture = Mixture([d.weight for d in dataset_configs], config.seed, split)
        self.masking = MaskedLM(config, split, self.datasets) if config.mlm_training else None
        self.conversations = any(d.mode == "conversations" for d in self.datasets)

    def _open(self, dataset: DatasetConfig, index: int) -> ShardedDataset:
        config = self.config
        if dataset.n_vocab is not None and dataset.n_vocab > config.n_vocab:
            raise ConfigError(f"{dataset.file}: key 'n_vocab' = {dataset.n_vocab} exceeds the model's n_vocab = "
                              f"{config.n_vocab} ({config.source}); the model could not embed every token")
        eos_id, padding_id = special_ids(config, dataset=dataset)  # this dataset's ids, by the one rule
        if eos_id is not None and eos_id >= config.n_vocab:  # the config's own eos_id is checked by validate()
            raise ConfigError(f"{dataset.file}: key 'eos_id' = {eos_id} is >= the model's n_vocab = {config.n_vocab} "
                              f"({config.source}); no embedding row holds it: accepted: an id in [0, {config.n_vocab})")
        if padding_id is None:  # neither an eos nor a padding id: rows are padded with 0
            padding_id = 0
        if dataset.mode in ("documents_random", "documents_fixed") and eos_id is None:
            log.warning("dataset %s: no eos_id in %s; stitched documents are joined without a separator",
                        dataset.id, dataset.file)
        return ShardedDataset(dataset, index, self.split, config.n_ctx, config.n_vocab, eos_id, padding_id,
                              config.seed)

    def rows(self, step: int, row_indices: Sequence[int], batch_size: int) -> np.ndarray:
        """int32 [len(row_indices), n_ctx + 1]: rows `row_indices` of the global batch at `step`."""
        out = np.empty((len(row_indices), self.n_ctx + 1), dtype=np.int32)
        for i, row in enumerate(row_indices):
            _, _, out[i] = self._sample(step, row, batch_size)
        return out

    def _draw(self, step: int, row: int, batch_size: int) -> tuple[int, int, int]:
        """(g, dataset, draw of that dataset) of one row of the batch at `step`."""
        if not 0 <= row < batch_size:
            raise ValueError(f"row {row} is outside a batch of {batch_size}")
        g = step * batch_size + int(row)
        return g, *self.mixture.draw(g)

    def _sample(self, step: int, row: int, batch_size: int) -> tuple[int, int, np.ndarray]:
        """(g, dataset, n_ctx + 1 tokens) of one row of the batch at `step`."""
        g, dataset, draw = self._draw(step, row, batch_size)
        return g, dataset, self.datasets[dataset].example(draw)

    def inputs_and_labels(self, step: int, row_indices: Sequence[int], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels), int32 [len(row_indices), n_ctx]: of a causal LM, the rows and the rows shifted
        by one; with mlm_training, the masked rows and their original tokens where masked (`MaskedLM`);
        of a conversation, the label of position t is token t + 1 where that token is a target (its
        mask is 1) and NOT_PREDICTED elsewhere."""
        if self.masking is None and not self.conversations:
            rows = self.rows(step, row_indices, batch_size)
            return rows[:, :-1], rows[:, 1:]
        inputs = np.empty((len(row_indices), self.n_ctx), dtype=np.int32)
        labels = np.empty_like(inputs)
        for i, row in enumerate(row_indices):
            g, dataset, draw = self._draw(step, row, batch_size)
            source = self.datasets[dataset]
            if self.masking is not None:
                inputs[i], labels[i] = self.masking.mask(source.example(draw), g, dataset)
            elif source.mode == "conversations":
                tokens, target = source.conversation(draw)
                inputs[i], labels[i] = tokens[:-1], np.where(target[1:], tokens[1:], NOT_PREDICTED)
            else:
                tokens = source.example(draw)
                inputs[i], labels[i] = tokens[:-1], tokens[1:]
        return inputs, labels


def global_batch(sampler: Sampler, step: int, layout, batch_size: int):
    """(inputs, labels) of `step` (Sampler.inputs_and_labels), each int32 [batch, sequence], sharded as
    ("batch", "sequence").

    Each process samples only the rows its own devices hold.
    """
    import jax

    shape = (batch_size, sampler.n_ctx)
    sharding = layout.sharding(("batch", "sequence"), shape, name="batch")
    index_map = sharding.addressable_devices_indices_map(shape)
    local_rows = sorted({row for index in index_map.values() for row in range(batch_size)[index[0]]})
    local_inputs, local_labels = sampler.inputs_and_labels(step, local_rows, batch_size)
    position = {row: i for i, row in enumerate(local_rows)}

    def piece(local: np.ndarray):
        def callback(index):
            wanted = [position[row] for row in range(batch_size)[index[0]]]
            return local[wanted][:, index[1]]

        return callback

    inputs = jax.make_array_from_callback(shape, sharding, piece(local_inputs))
    labels = jax.make_array_from_callback(shape, sharding, piece(local_labels))
    return inputs, labels


# --- --dry_run and --check_dataset -------------------------------------------------------------


def check_shards_exist(config) -> list[str]:
    """For --dry_run: every dataset of `datasets` has a dataset config, and its `path` glob (and its
    `eval_path` glob, when eval_steps > 0) matches shard files; nothing is read. One line per glob;
    a ConfigError names the dataset, its config file and the glob."""
    lines = []
    for dataset in resolve_datasets(config):
        globs = [("path", dataset.path)]
        if config.eval_steps > 0 and dataset.eval_path:
            globs.append(("eval_path", dataset.eval_path))
        for key, pattern in globs:
            paths = expand_shards(pattern, f"dataset {dataset.id!r} ({dataset.file}): key {key!r}")
            lines.append(f"dataset {dataset.id!r}: {key} {pattern} matches {len(paths)} shard(s)")
    return lines


def check_dataset(config, samples: int = 2, characters: int = 400) -> str:
    """A report for `main.py --check_dataset`: each dataset's shards, id range against n_vocab, and
    decoded samples as the training loop would see them."""
    from encoders import load_tokenizer

    lines = []
    problems = []
    for dataset in resolve_datasets(config):
        lines.append(f"dataset {dataset.id!r} ({dataset.file}): mode {dataset.mode}, stitch {dataset.stitch}, "
                     f"weight {dataset.weight}")
        for split, pattern in (("train", dataset.path), ("eval", dataset.eval_path)):
            if not pattern:
                lines.append(f"  {split}: no shards configured")
                continue
            try:
                paths = expand_shards(pattern, dataset.file)
                scans = [scan_shard(path) for path in paths]
            except (ConfigError, DataError) as err:
                problems.append(str(err))
                lines.append(f"  {split}: ERROR {err}")
                continue
            records = sum(len(s.offsets) for s in scans)
            tokens = sum(int(s.token_counts.sum()) for s in scans)
            low = min(s.min_id for s in scans)
            high = max(s.max_id for s in scans)
            verdict = "ok" if high < config.n_vocab else "TOO LARGE: training will refuse this dataset"
            lines.append(f"  {split}: {len(paths)} shards, {records} records, {tokens} tokens; "
                         f"token ids {low}..{high} against n_vocab {config.n_vocab}: {verdict}")
            if high >= config.n_vocab:
                problems.append(f"dataset {dataset.id!r}: largest token id {high} >= n_vocab {config.n_vocab}")
    if not problems:
        tokenizer = load_tokenizer(resolve_datasets(config)[0].tokenizer_path,
                                   resolve_datasets(config)[0].tokenizer_is_pretrained)
        sampler = Sampler(config, "train")
        rows = sampler.rows(0, list(range(samples)), max(samples, config.train_batch_size))
        for i, row in enumerate(rows):
            text = tokenizer.decode(row)
            shown = text[:characters] + (" [...]" if len(text) > characters else "")
            lines.append(f"--- sample {i} (step 0, row {i}; {len(row)} tokens) ---\n{shown}")
    else:
        lines.append("PROBLEMS:\n" + "\n".join(f"  {p}" for p in problems))
    return "\n".join(lines)
