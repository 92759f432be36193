"""Stage 3 — stream: the embedding store -> shuffled torch batches for a trainer, without loading it whole.

Reads a store written by `pipeline.embed`, a block of shards at a time (see `Store`). Writes nothing.

Order: the tar order of a shard's rows is img2dataset's completion order, which differs from one download to
the next, so it is not used. A sample's split (train / val) is a hash of ``(split_seed, key)``: it never changes
when shards or samples are added or removed, or when the same data is downloaded again. A shard's rows are
taken in an order fixed by their keys (row position only for a store whose metadata has no keys). Each epoch
permutes the shards with ``(seed, epoch)``, takes them ``shards_per_block`` at a time and permutes the rows of
each block, so batches mix several shards while only a few are touched at once.
That global order is cut into steps of ``batch_size * world_size`` samples and rank ``r`` takes every
``world_size``-th of them: ranks see disjoint data, and step ``s`` is a pure function of the seed, so a
stream restarts at any step without reading what came before it.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import store
from pipeline.errors import StageError, UsageError
from pipeline.prefetch import background, will_need

FIELDS = ("img_emb", "text_emb", "latents", "text_enc")
SPLITS = ("train", "val", "all")
# How a stream split and ordered a store's rows (`Stream.order`, recorded in checkpoints: a resume needs the
# order it was trained with): "key" (every shard by its sample keys, `key_codes` version 1), "row" (by row
# position: a store without keys, and every store before checkpoints recorded this), "mixed".
KEY_ORDER = "key"
# Batches of at least this many rows gather their fields on two threads; below it, handing a field to another
# thread costs more than it saves (batch 64 on the 2-core VM: 146 k pairs/s threaded, 245 k in one thread).
PARALLEL_ROWS = 1024


VAL_FRACTION = (
    0.05  # the held-out share, the trainers' and evals' default too: one split for a loader and them
)


@dataclass
class StreamConfig:
    store: str
    fields: tuple[str, ...] = ("img_emb", "text_emb")
    batch_size: int = 64
    split: str = "train"  # "train" (shuffled, endless) or "val" (in order, one pass) or "all"
    val_fraction: float = VAL_FRACTION
    split_seed: int = 0
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shards_per_block: int = 8  # shards mixed together in one shuffle block: more mixing vs more open files
    prefetch: int = 4  # batches prepared ahead in a background thread
    start_step: int = 0
    # The train split read once (shuffled, its last partial batch kept, as few rows as it has): for evaluating on
    # the training data, where the endless stream repeated samples.
    one_pass: bool = False


class Store:
    """Row index over a store's done shards; a batch's rows are copied straight from each shard file's memory
    map into the batch.

    Every byte a batch holds crosses memory once: from the page cache, through the map, into the batch. (An
    earlier version first copied each shuffle block into memory, then gathered from the copy: twice the
    traffic, plus page faults on fresh block buffers. `make bench`'s stream_vs_mmap, a first epoch in a fresh
    process on a 2-core VM, went from medians of 0.21-0.40 (runs from 0.12 to 0.84) to ~0.5 (0.44-0.63).)
    The maps are opened as blocks come and closed (unmapped) as later ones do, ``max_maps`` at most, so the
    store pages the process maps, its RSS, are bounded by about two blocks, never by the store's size.
    When a block is reached, its files and the next block's are read ahead (`advise`): on a disk or a network
    filesystem they are then read sequentially into the page cache, not faulted in at random a few KB at a
    time.
    """

    def __init__(self, root: str | Path, max_cached: int = 64, max_maps: int = 64, reuse: int = 8):
        self.root = Path(root)
        self.manifest = store.load_manifest(self.root)
        markers = store.done_markers(self.root)  # every done shard (a store still being embedded: so far)
        self.done = [(s, int(m["rows"])) for s, m in markers]
        self.done_files = {s: m.get("files") for s, m in markers}  # each file's sha256, as its marker says
        self.error_rows = sum(int(m.get("errors", 0)) for _, m in markers)
        self.shards = [(s, n) for s, n in self.done if n > 0]
        self._cache: OrderedDict = OrderedDict()  # whole per-shard arrays (text encodings), read into memory
        self._max_cached = max_cached
        self._maps: OrderedDict = OrderedDict()
        self._max_maps = max_maps
        self._lock = threading.Lock()  # a batch's fields are gathered on several threads
        self._outs = Recycler(reuse)
        # a row's shape per field: the manifest's where it says (a file of another width was a traceback deep
        # in the model), else the first map opened's
        dim = int(self.manifest["clip"]["dim"])
        self._shapes: dict[str, tuple[int, ...]] = {"img_emb": (dim,), "text_emb": (dim,)}
        if self.manifest.get("latents"):
            self._shapes["latents"] = tuple(int(x) for x in self.manifest["latents"]["shape"])
        self._normalize = {
            f for f, d in self.manifest.items() if isinstance(d, dict) and d.get("normalize_on_read")
        }

    def array(self, field: str, shard: str) -> np.ndarray:
        key = (field, shard)
        if key not in self._cache:
            self._cache[key] = store.load_array(store.field_path(self.root, field, shard))
            if len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _map(self, field: str, shard_index: int) -> np.ndarray:
        key = (field, shard_index)
        with self._lock:
            m = self._maps.get(key)
            if m is None:
                # A plain ndarray view (the map stays open under it): np.memmap's per-result bookkeeping
                # is not needed for a gather's copy.
                shard, n = self.shards[shard_index]
                m = store.open_array(self.root, field, shard).view(np.ndarray)
                shape = self._shapes.setdefault(field, m.shape[1:])
                if len(m) != n or m.shape[1:] != shape:
                    path = store.field_path(self.root, field, shard)
                    raise StageError(
                        f"{path} holds {len(m)} rows of shape {m.shape[1:]} where its done marker says {n} rows "
                        f"of shape {shape}; `unclip validate {self.root}` lists the damage"
                    )
                self._maps[key] = m
                if len(self._maps) > self._max_maps:
                    self._maps.popitem(last=False)  # unmapped once no gather holds it
            self._maps.move_to_end(key)
            return m

    def gather(self, field: str, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``field`` at (shard index, row) pairs, in the order given: one indexed copy per shard the batch
        touches, from that shard's map. Adopted folders stored un-normalised are normalised here (row by row)."""
        if len(shards) and shards[0] == shards[-1] and (shards == shards[0]).all():  # one shard: no grouping
            groups: list = [(int(shards[0]), slice(None))]
        else:  # (shard, the batch positions of its rows)
            order = np.argsort(shards, kind="stable")
            ordered = shards[order]
            starts = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist(), len(order)]
            groups = [(int(ordered[a]), order[a:b]) for a, b in zip(starts, starts[1:])]
        out = None
        for shard, sel in groups:
            m = self._map(field, shard)
            if out is None:
                out = self._outs.empty(field, (len(rows), *m.shape[1:]), m.dtype)
            out[sel] = m[rows[sel]]  # indexing, not np.take: numpy's row-copy path, ~2x faster here
        if field in self._normalize:  # adopted folders stored un-normalised
            x = out.astype(np.float32)
            out[:] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return out

    def advise(self, fields: tuple[str, ...], members: tuple[int, ...]) -> None:
        """Ask the kernel to read these shards' files into the page cache now, in the background
        (`prefetch.will_need`). Files whose map is open were read lately and are skipped: on a small store
        every file stays mapped, and advising them again each epoch cost more than the gathers."""
        for field in fields:
            for i in members:
                with self._lock:  # the gather threads open and close maps
                    if (field, i) in self._maps:
                        continue
                try:
                    will_need(store.field_path(self.root, field, self.shards[i][0]))
                except OSError:
                    pass  # a missing file is reported by the gather that needs it

    def split_rows(self, shard_index: int, split: str, fraction: float, seed: int) -> tuple[np.ndarray, bool]:
        """Row numbers of a shard that belong to ``split``, in the order of their keys' codes (`key_codes`),
        and whether keys were used (a shard whose metadata has no key column goes by row position)."""
        shard, n = self.shards[shard_index]
        if split != "train":  # a trainer builds its held-out stream again at every evaluation
            return _cached_split(str(self.root), shard, n, split, fraction, seed)
        return _split(self.root, shard, n, split, fraction, seed)

    def text_enc(self, shard_index: int) -> tuple[np.ndarray, np.ndarray]:
        """A shard's per-token encodings and their row offsets, checked against its done marker as they are
        read (under the lock, so no thread uses them unchecked): a file cut short or of another shard was an
        IndexError or a broadcast error mid-training."""
        shard, n = self.shards[shard_index]
        with self._lock:
            checked = ("text_enc_offsets", shard) in self._cache and ("text_enc", shard) in self._cache
            off, enc = self.array("text_enc_offsets", shard), self.array("text_enc", shard)
            if checked:
                return enc, off
            wrong = None
            if off.ndim != 1 or len(off) != n + 1:
                wrong = f"{store.field_path(self.root, 'text_enc_offsets', shard)} holds {len(off)} offsets"
            elif off[0] != 0 or (np.diff(off) < 0).any() or off[-1] != len(enc) or enc.ndim != 2:
                wrong = (
                    f"{store.field_path(self.root, 'text_enc', shard)} holds {len(enc)} token rows where its "
                    f"offsets span {int(off[0])}..{int(off[-1])}"
                )
            if wrong:
                self._cache.pop(("text_enc_offsets", shard), None)
                self._cache.pop(("text_enc", shard), None)
                raise StageError(
                    f"{wrong}, which does not fit the {n} rows of its done marker; `unclip validate {self.root}` "
                    "lists the damage"
                )
        return enc, off

    def gather_text_enc(self, shards: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-token encodings padded to the batch's longest caption: [B, L, W] and a mask [B, L]."""
        spans = []
        for s, r in zip(shards, rows):
            enc, off = self.text_enc(int(s))
            spans.append((enc, int(off[r]), int(off[r + 1])))
        width = spans[0][0].shape[1]
        longest = max(b - a for _, a, b in spans)
        out = np.zeros((len(rows), longest, width), dtype=store.EMB_DTYPE)
        mask = np.zeros((len(rows), longest), dtype=bool)
        for i, (enc, a, b) in enumerate(spans):
            out[i, : b - a] = enc[a:b]
            mask[i, : b - a] = True
        return out, mask


def _split(root, shard: str, n: int, split: str, fraction: float, seed: int) -> tuple[np.ndarray, bool]:
    keys = store.read_keys(root, shard)
    if keys is None:  # no keys (some adopted folders): by row position
        rng = np.random.default_rng([seed, int(shard) if shard.isdigit() else sum(shard.encode())])
        order, u = np.arange(n), rng.random(n)
    else:
        if len(keys) != n or keys.null_count:
            raise UsageError(
                f"{root}: shard {shard}'s metadata has {len(keys)} keys ({keys.null_count} null) for {n} rows; "
                f"run `unclip validate {root}`"
            )
        codes = key_codes(keys)
        order, u = np.argsort(codes, kind="stable"), key_uniform(codes, seed)
    if split == "all":
        return order, keys is not None
    val = u[order] < fraction
    return order[val if split == "val" else ~val], keys is not None


@lru_cache(maxsize=1 << 16)
def _cached_split(root: str, shard: str, n: int, split: str, fraction: float, seed: int):
    rows, keyed = _split(root, shard, n, split, fraction, seed)
    rows.flags.writeable = False  # shared by every stream that asks again
    return rows, keyed


_HASHED = np.uint64(1 << 63)  # set in the code of a key that is not a plain number: the two kinds never meet


def key_codes(keys: pa.Array) -> np.ndarray:
    """A uint64 per key that depends on that key alone. A key of 1 to 17 ASCII digits (img2dataset's) is
    ``value << 5 | length`` (numeric order for keys of one width, and "01" is not "1"), parsed by arrow at
    ~1 ms per 10k keys; any other key is 63 bits of its blake2b digest, with the top bit set (a Python loop,
    ~10 ms per 10k keys)."""
    if pa.types.is_binary(keys.type) or pa.types.is_large_binary(keys.type):
        raw = keys.to_pylist()
        numeric = np.zeros(len(raw), dtype=bool)
    else:
        keys = keys.cast(pa.string())
        numeric = pc.fill_null(pc.match_substring_regex(keys, r"^[0-9]{1,17}$"), False).to_numpy(
            zero_copy_only=False
        )
        raw = None
    codes = np.zeros(len(keys), dtype=np.uint64)
    if numeric.any():
        digits = pc.filter(keys, pa.array(numeric))
        value = pc.cast(digits, pa.uint64()).to_numpy()
        codes[numeric] = (value << np.uint64(5)) | pc.utf8_length(digits).to_numpy().astype(np.uint64)
    if not numeric.all():
        others = raw if raw is not None else pc.filter(keys, pa.array(~numeric)).to_pylist()
        digests = [
            int.from_bytes(
                hashlib.blake2b(k if isinstance(k, bytes) else k.encode(), digest_size=8).digest(), "little"
            )
            for k in others
        ]
        codes[~numeric] = (np.array(digests, dtype=np.uint64) >> np.uint64(1)) | _HASHED
    return codes


def key_uniform(codes: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per key code, a pure function of ``(seed, code)`` (splitmix64)."""
    mixed = _splitmix64(codes ^ _splitmix64(np.array([seed % 2**64], dtype=np.uint64)))
    return (mixed >> np.uint64(11)) * 2.0**-53


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Stream:
    """Batches of numpy arrays (``batches``) or torch tensors on a device (``torch_batches``)."""

    def __init__(self, cfg: StreamConfig):
        bad = [f for f in cfg.fields if f not in FIELDS]
        if bad:
            raise UsageError(f"unknown stream field(s) {bad}; valid: {', '.join(FIELDS)}")
        if cfg.split not in SPLITS:
            raise UsageError(f"unknown --split '{cfg.split}'; valid: {', '.join(SPLITS)}")
        if cfg.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1 (got {cfg.batch_size})")
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise UsageError(
                f"--val-fraction must be in [0, 1) (got {cfg.val_fraction}): training needs rows"
            )
        if cfg.world_size < 1 or not 0 <= cfg.rank < cfg.world_size:
            raise UsageError(
                f"rank {cfg.rank} of world size {cfg.world_size}: the world size must be >= 1 and the rank in "
                "0 .. world size - 1"
            )
        if cfg.shards_per_block < 1:
            raise UsageError(f"shards_per_block must be >= 1 (got {cfg.shards_per_block})")
        for name in ("prefetch", "start_step"):
            if getattr(cfg, name) < 0:
                raise UsageError(f"{name} must be >= 0 (got {getattr(cfg, name)})")
        self.cfg = cfg
        self.dense = tuple(f for f in cfg.fields if f != "text_enc")  # one row of an array per sample
        # Two blocks' maps per dense field; text encodings' per-shard arrays (text and offsets) for two blocks.
        self.store = Store(
            cfg.store,
            max_cached=max(1, 4 * cfg.shards_per_block),
            max_maps=max(1, 2 * cfg.shards_per_block * len(self.dense)),
            reuse=cfg.prefetch + 4,  # the queue's batches, the one being made, and a few the trainer holds
        )
        # Each shard's keys are read once here (~3 ms per 10k-row shard), on threads: arrow and numpy release
        # the GIL while they parse and sort.
        try:
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                split = list(
                    pool.map(
                        lambda i: self.store.split_rows(i, cfg.split, cfg.val_fraction, cfg.split_seed),
                        range(len(self.store.shards)),
                    )
                )
        except StageError as e:  # a damaged metadata file, found on opening: the input, before any work
            if not hasattr(e, "damage"):
                raise
            raise UsageError(str(e)) from e
        self.rows = [rows for rows, _ in split]
        keyed = {k for _, k in split}
        # What a checkpoint records: a store without keys is split as it was before keys were used.
        self.order = "mixed" if len(keyed) > 1 else ("row" if keyed == {False} else KEY_ORDER)
        self.num_samples = sum(len(r) for r in self.rows)
        self.global_batch = cfg.batch_size * cfg.world_size
        if not self.store.shards and cfg.split == "train" and not cfg.one_pass:
            # no setting here helps: the hint below (a smaller batch or validation share) would mislead
            done = len(self.store.done)
            summary = Path(cfg.store) / "logs" / "embed_summary.json"
            errors = self.store.error_rows
            if not done:
                why = "it holds no finished shard yet: run `unclip embed` on it to the end first"
            elif errors:
                why = (
                    f"its {done} finished shard(s) hold only error rows ({errors}: samples embed could not "
                    f"read); see {summary} for why, or `unclip validate {cfg.store}`"
                )
            else:
                why = f"its {done} finished shard(s) hold no rows (`unclip validate {cfg.store}` checks them)"
            raise UsageError(f"{cfg.store} holds no rows to train on: {why}")
        if self.num_samples < self.global_batch and cfg.split == "train" and not cfg.one_pass:
            raise UsageError(
                f"the train split of {cfg.store} has {self.num_samples} samples, fewer than one step of "
                f"{cfg.batch_size} x {cfg.world_size} rank(s) ({sum(n for _, n in self.store.shards)} rows in "
                f"{len(self.store.shards)} non-empty shards); lower --batch-size or --val-fraction, or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def _epoch_order(
        self, epoch: int
    ) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], np.ndarray, np.ndarray]]:
        """(block's shard indices, the next block's, shard index per sample, row per sample), block by block,
        in this epoch's global order. Outside the train split: shards and rows in order."""
        train = self.cfg.split == "train"
        rng = np.random.default_rng([self.cfg.seed, epoch])
        shard_order = rng.permutation(len(self.rows)) if train else np.arange(len(self.rows))
        per = self.cfg.shards_per_block
        blocks = [tuple(int(i) for i in shard_order[b : b + per]) for b in range(0, len(shard_order), per)]
        if train:  # the next epoch's first block, read ahead while this epoch's last one is served
            first = np.random.default_rng([self.cfg.seed, epoch + 1]).permutation(len(self.rows))[:per]
            after = tuple(int(i) for i in first)
        else:
            after = ()
        for k, block in enumerate(blocks):
            shards = np.concatenate([np.full(len(self.rows[i]), i) for i in block])
            rows = np.concatenate([self.rows[i] for i in block])
            perm = rng.permutation(len(rows)) if train else slice(None)
            yield block, blocks[k + 1] if k + 1 < len(blocks) else after, shards[perm], rows[perm]

    def indices(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's (shard index, row) per step, from ``start_step``; endless for train."""
        cfg, step = self.cfg, self.cfg.start_step
        epoch, skip = (
            (step // self.steps_per_epoch, step % self.steps_per_epoch)
            if cfg.split == "train" and not cfg.one_pass
            else (0, 0)
        )
        while True:
            pending_s, pending_r, have, to_skip = [], [], 0, skip * self.global_batch
            advised: set[tuple[int, ...]] = set()
            for block, following, s, r in self._epoch_order(epoch):
                if to_skip >= len(r):  # whole block skipped without gathering anything
                    to_skip -= len(r)
                    continue
                for b in (block, following):  # this block's files, and the next's, read ahead
                    if b and b not in advised:
                        self.store.advise(self.dense, b)
                        advised.add(b)
                s, r, to_skip = s[to_skip:], r[to_skip:], 0
                pending_s.append(s)
                pending_r.append(r)
                have += len(r)
                while have >= self.global_batch:
                    # Joined once a block (its start with the last one's rest); each step is then a view of
                    # the block's order, where joining every step copied the block's rest again and again.
                    if len(pending_s) > 1:
                        pending_s, pending_r = [np.concatenate(pending_s)], [np.concatenate(pending_r)]
                    s_all, r_all = pending_s[0], pending_r[0]
                    g = self.global_batch
                    yield s_all[:g][cfg.rank :: cfg.world_size], r_all[:g][cfg.rank :: cfg.world_size]
                    pending_s, pending_r, have = [s_all[g:]], [r_all[g:]], have - g
            if (
                cfg.split != "train" or cfg.one_pass
            ):  # one pass; the last partial batch is kept, split across ranks
                if have:
                    s_all, r_all = np.concatenate(pending_s), np.concatenate(pending_r)
                    if len(s_all[cfg.rank :: cfg.world_size]):
                        yield s_all[cfg.rank :: cfg.world_size], r_all[cfg.rank :: cfg.world_size]
                return
            epoch, skip = epoch + 1, 0

    def _load(self, shards: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        """One batch. From `PARALLEL_ROWS` rows up, the dense fields are gathered at once, the first on this
        thread and the others on the shared gather threads (numpy lets go of the GIL while it copies rows): a
        gather of 1-4 KB rows at random waits on memory latency more than on bandwidth, so two threads copied
        1.4x the rows one did on the 2-core VM."""
        on_threads = self.dense[1:] if len(rows) >= PARALLEL_ROWS else ()
        later = {f: _gather_pool().submit(self.store.gather, f, shards, rows) for f in on_threads}
        # in field order: the first is gathered here while the threads gather the others
        got = {f: later[f].result() if f in later else self.store.gather(f, shards, rows) for f in self.dense}
        batch: dict[str, np.ndarray] = {}
        for f in self.cfg.fields:  # keys in the order asked for
            if f == "text_enc":
                batch["text_enc"], batch["text_enc_mask"] = self.store.gather_text_enc(shards, rows)
            else:
                batch[f] = got[f]
        batch["shard"], batch["row"] = shards, rows
        return batch

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Numpy batches, prepared ``prefetch`` ahead in a background thread."""
        return background((self._load(s, r) for s, r in self.indices()), self.cfg.prefetch)

    def torch_batches(self, device="cpu") -> Iterator[dict]:
        """Torch tensors on ``device``; pinned memory and non-blocking copies on CUDA. Stores' dtypes kept
        (float16 embeddings, uint8 latents): cast and dequantise on the device."""
        import torch

        device = torch.device(device)
        cuda = device.type == "cuda"
        for b in self.batches():
            out = {}
            for k, v in b.items():
                t = torch.from_numpy(np.ascontiguousarray(v))
                out[k] = t.pin_memory().to(device, non_blocking=True) if cuda else t
            yield out


class Recycler:
    """Arrays for batches, each handed out again once nothing outside holds it, ``keep`` per field and shape.

    A fresh multi-MB array per batch makes glibc map and unmap memory (or grow and trim a thread's heap) over
    and over, and every page of it faults again: on the bench's store, 4-7 k page faults an epoch beyond the
    file maps' and 10-25% of the stream's speed. A kept array is free when its reference count is what it is
    with only this pool holding it (`_refs`, one function for both counts): a torch tensor made from it, a
    numpy view or slice of it, or the batch dict all hold a reference, so an array a trainer still uses is
    never handed out again.
    """

    def __init__(self, keep: int):
        self._keep = keep
        self._kept: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._free = _refs([np.empty(0)], 0)

    def empty(self, field: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        key = (field, shape, np.dtype(dtype).str)
        with self._lock:
            kept = self._kept.setdefault(key, [])
            for i in range(len(kept)):
                if _refs(kept, i) == self._free:
                    return kept[i]
            if len(kept) < self._keep:
                kept.append(np.empty(shape, dtype=dtype))
                return kept[-1]
        return np.empty(shape, dtype=dtype)


def _refs(arrays: list, i: int) -> int:
    return sys.getrefcount(arrays[i])


class _Gatherers:
    """Two daemon threads that run gathers for every stream in the process (a trainer makes a held-out stream
    at every evaluation; threads of its own each would be left behind). Daemons, unlike a ThreadPoolExecutor's
    threads, which the interpreter joins at exit: a gather stuck on a hung filesystem must not stop Ctrl-C from
    ending the process, as the stream's own producer thread (also a daemon) does not."""

    def __init__(self, threads: int = 2):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        for k in range(threads):
            threading.Thread(target=self._run, name=f"unclip-stream-gather-{k}", daemon=True).start()

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while True:
            fut, fn, args = self._jobs.get()
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on it
                fut.set_exception(e)
            del fut, fn, args  # the result is the caller's: held here, its array could not be reused


_POOL: _Gatherers | None = None
_POOL_LOCK = threading.Lock()


def _gather_pool() -> _Gatherers:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _Gatherers()
        return _POOL


def _forget_pool_after_fork() -> None:
    """A forked child has none of its parent's threads: it starts its own on first use (a DataLoader worker or
    a multiprocessing child that streams would otherwise wait forever on threads that are not there)."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def dequantize_torch(q, lo, hi):
    """The torch twin of `store.dequantize`, for latents on the training device. q: uint8 [B, C, h, w]."""
    import torch

    lo = torch.as_tensor(lo, dtype=torch.float32, device=q.device).view(1, -1, 1, 1)
    hi = torch.as_tensor(hi, dtype=torch.float32, device=q.device).view(1, -1, 1, 1)
    return lo + q.float() / 255.0 * (hi - lo)
