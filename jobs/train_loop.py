"""The training loop every diffusion trainer shares (`train-prior`, `train-decoder`).

What differs between models is a `Task`: it resolves the network's config from the store's manifest, builds the
network, names the store fields to stream, computes the loss on a batch, and evaluates / draws a picture for
the run folder. Everything else lives here: AdamW with warmup and cosine decay, gradient clipping, EMA, bf16
autocast on CUDA, the non-finite guard, ``metrics.jsonl`` and ``loss.png``, periodic evaluation, checkpoints
(`jobs.checkpoint`) with exact resume, and DDP under torchrun (each rank streams a disjoint part of every step).

Writes under ``--out``: ``ckpt/``, ``metrics.jsonl``, ``loss.png``, ``config.json``, ``weights_by_rank.json``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import signal
import time
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from jobs import checkpoint, distributed, metrics
from pipeline import progress, store
from pipeline.encoders import probe_mismatch, resolve_device
from pipeline.errors import Interrupted, StageError, Stopped, UsageError
from pipeline.signals import handling
from pipeline.stream import VAL_FRACTION, Stream, StreamConfig

log = logging.getLogger(__name__)
# Settings that may change between a run and its resume; any other difference is an error.
# Settings added later whose default is not what older versions did: a checkpoint without one resumes with this
LEGACY_EFFECTS = {"ema_warmup": False}

RESUMABLE_CHANGES = {
    "stop_after",
    "eval_every",
    "save_every",
    "resume",
    "device",
    "log_every",
    "eval_samples",
    "sample_steps",  # the evaluation's sampler and its steps: they draw nothing from the training's random state
    "sampler",
    "log_rows",  # an audit log, not a training setting: a resume may start (or stop) keeping it
    "keep_checkpoints",
    "out",  # a run folder may be moved, and a store too (its identity is checked instead of its path)
    "data",
}


@dataclass
class TrainConfig:
    """Settings shared by every trainer; a model's trainer subclasses it with its own fields."""

    data: str  # the store (`unclip embed --out`) to stream
    out: str  # run folder: checkpoints in ckpt/, metrics.jsonl, loss.png, config.json
    batch_size: int = 64  # samples a step on each rank (under torchrun the step takes ranks x this)
    lr: float = 3e-4  # peak AdamW learning rate, after the warmup; cosine decay to 10% of it at the end
    weight_decay: float = 6e-2  # LAION's prior recipe
    warmup_steps: int = 100  # linear learning-rate warmup
    steps: int = 2000  # length of the whole run: the learning-rate schedule is laid out over it
    stop_after: int = 0  # stop this invocation at this step (checkpointed; --resume continues); 0 = run on
    grad_clip: float = 1.0  # gradient norm clipped to this
    ema_decay: float = 0.999  # decay of the weights' moving average (ema.safetensors, what sampling uses)
    # The moving average is the plain mean of every step's weights until its window (1 / (1 - ema_decay) steps)
    # is full. false: it starts from the initial weights, and after N steps still holds ema_decay^N of them
    # (0.999^2000 = 0.14 of random weights in what sampling and evaluation use).
    ema_warmup: bool = True
    eval_every: int = 500  # evaluation and the run folder's picture; 0 = never
    save_every: int = 500  # checkpoint every this many steps (and at the last)
    # the newest checkpoints kept in ckpt/ (older step_* folders go once a newer one is whole); 0 = every one.
    # A b32 decoder's checkpoint (weights, EMA, optimiser) is ~1.3 GB: 400 of them in a 200k-step run at 500.
    keep_checkpoints: int = 3
    log_every: int = 10  # a metrics.jsonl row every this many steps
    resume: bool = False  # continue from the run folder's latest checkpoint, exactly as if never stopped
    seed: int = 0  # seeds weights, data order within the split, noise and condition dropout
    val_fraction: float = (
        VAL_FRACTION  # held-out share (0.05), drawn per sample key from split_seed: stable as data grows
    )
    split_seed: int = 0  # seeds the held-out split (keep it across runs that are compared)
    device: str = "auto"  # auto (cuda if visible, else cpu), cuda, cuda:N or cpu; torchrun: the rank's GPU
    log_rows: bool = False  # write the (shard, row) ids each rank trained on, for auditing data order


class Task:
    """What one model adds to the loop. Subclasses set `name`, `fields`, `loss_label` and the methods."""

    name = "model"
    loss_label = "loss"
    # Settings whose one effect is the network's config, which a resume compares whole: one given now as the
    # value the checkpoint's default resolved to (--snr-shift 4 where the preset's is 4) is the same run.
    model_settings: frozenset[str] = frozenset()

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    @property
    def fields(self) -> tuple[str, ...]:
        """Store fields to stream."""
        raise NotImplementedError

    def model_config(self, manifest: dict) -> dict:
        """The network's resolved config (JSON-able) from the settings and the store; UsageError if unfit."""
        raise NotImplementedError

    def build(self, model_cfg: dict) -> torch.nn.Module:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, run: RunState, step: int) -> dict | None:
        """Held-out metrics with the EMA weights (rank 0 only), written to metrics.jsonl; None = nothing."""
        return None

    def val_stream(self, batch_size: int = 256) -> Stream:
        """The held-out split, in order, with this task's fields."""
        c = self.cfg
        return Stream(
            StreamConfig(
                c.data,
                fields=self.fields,
                batch_size=batch_size,
                split="val",
                val_fraction=c.val_fraction,
                split_seed=c.split_seed,
            )
        )


@dataclass
class RunState:
    """Everything one invocation of the loop holds (what used to be passed around as a dict)."""

    cfg: TrainConfig
    task: Task
    manifest: dict  # the store's: its CLIP model and latent codec go into every checkpoint
    model_cfg: dict
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator  # noise, timesteps, condition dropout: one stream per rank
    rank: int
    world: int
    device: str
    out: Path
    # How the train stream split and ordered the store (`Stream.order`), and how the resumed checkpoint's did
    stream_order: str = ""
    resumed_order: str | None = None
    shards: dict | None = None  # `store_shards` of the stream's store, and of the resumed checkpoint's
    resumed_shards: dict | None = None

    @property
    def ckpt_dir(self) -> Path:
        return ckpt_dir(self.out)


def ckpt_dir(out: str | Path) -> Path:
    """Where a run folder keeps its checkpoints (``step_*`` and the ``latest`` file naming the newest)."""
    return Path(out) / "ckpt"


class _LossModule(torch.nn.Module):
    """DDP averages the gradients of what runs through `forward`: route the task's loss through it."""

    def __init__(self, task: Task, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self._task = task

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return self._task.loss(self.model, batch, generator)


def load_store_manifest(data: str) -> dict:
    if not (Path(data) / store.MANIFEST).exists():
        raise UsageError(
            f"--data {data} is not an embedding store (no {store.MANIFEST}); run `unclip embed` on its shards, or "
            "`unclip adopt` on an embedding folder made elsewhere"
        )
    return store.load_manifest(data)


def store_identity(manifest: dict) -> dict:
    """What sampling needs from the training store: the CLIP model (and seed, for random weights), the
    latent codec with its quantisation constants, and whether per-token text encodings were stored."""
    return {
        "clip": {**manifest["clip"], "seed": manifest.get("identity", {}).get("seed", 0)},
        "latents": manifest.get("latents"),
        "text_enc": manifest.get("text_enc"),
    }


def store_shards(done: list[tuple[str, int]], files: dict | None = None) -> dict:
    """The done shards a run's stream was split from, as a checkpoint records them (their count, rows, a digest
    of each one's name and rows, and one of the file digests their done markers hold), so that a resume can tell
    the data has changed, a shard redone with other samples but as many rows included. The done markers', not
    the manifest's list: a running embed writes markers first, and the manifest only at its end. (Of a finished
    store the two are the same, so a checkpoint that recorded the manifest's is compared alike.)"""
    shards = sorted((str(s), int(n)) for s, n in done)
    digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()
    out = {"shards": len(shards), "rows": sum(n for _, n in shards), "sha256": digest}
    if files is not None:
        content = sorted((s, files.get(s)) for s, _ in shards)
        out["files_sha256"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return out


def shards_changed(then: dict | None, now: dict) -> str | None:
    """How the store a checkpoint was trained on differs from this one, in words, or None. A checkpoint from
    before a key was recorded is compared on the keys it has."""
    if then is None:  # a checkpoint from before any of it was recorded says nothing
        return None
    if any(then[k] != now[k] for k in ("shards", "rows", "sha256") if k in then):
        return f"{then['shards']} shards of {then['rows']} rows then, {now['shards']} of {now['rows']} now"
    if "files_sha256" in then and then["files_sha256"] != now.get("files_sha256"):
        return f"the same {now['shards']} shards of {now['rows']} rows, but some were written again since"
    return None


def _check_resume(meta: dict, run: RunState) -> None:
    """A resume continues the same run: same task, network, settings and number of processes."""
    if meta.get("task") != run.task.name:
        raise UsageError(f"--resume: the checkpoint is a {meta.get('task')} run, not a {run.task.name} run")
    if meta["model"] != run.model_cfg:
        keys = set(run.model_cfg) | set(meta["model"])  # a key on one side only is a difference too
        diff = sorted(k for k in keys if meta["model"].get(k) != run.model_cfg.get(k))
        raise UsageError(f"checkpoint's model config differs from this run's in {', '.join(diff)}")
    old = meta["config"]
    for k, then in LEGACY_EFFECTS.items():  # the run goes on as it began
        if k not in old and getattr(run.cfg, k) != then:
            log.info(
                "--resume: the checkpoint predates --%s; the run continues with %s", k.replace("_", "-"), then
            )
            run.cfg = replace(run.cfg, **{k: then})
    new = asdict(run.cfg)
    # A setting added in a later version is absent from older checkpoints: there it had its default's effect,
    # or LEGACY_EFFECTS' where that differs.
    defaults = {f.name: f.default for f in fields(run.cfg) if f.default is not MISSING} | LEGACY_EFFECTS
    diff = sorted(
        k
        for k in new
        if k not in RESUMABLE_CHANGES | run.task.model_settings and old.get(k, defaults.get(k)) != new[k]
    )
    if diff:
        raise UsageError(
            f"--resume with other settings than the checkpoint's: {', '.join(diff)} "
            f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
        )
    now, then = store_identity(run.manifest), copy.deepcopy(meta.get("store") or {})
    then_clip = then.get("clip") or {}
    if "sha256" not in then_clip:  # a checkpoint from before stores recorded it (an adopt rerun adds it)
        now["clip"].pop("sha256", None)
    # A store's CLIP probe (`pipeline.encoders.clip_probe`) is added by its next embed or adopt run where an
    # older version made it; one model's probe taken again (a store made again with --overwrite on another
    # device) differs in its last bits: compared by what the model embeds, not byte for byte
    probes = then_clip.pop("probe", None), now["clip"].pop("probe", None)
    if all(probes) and (how := probe_mismatch(probes[1], probes[0], ("now", "then"))):
        raise UsageError(
            f"--resume: {run.cfg.data} was embedded by another CLIP model than this run was trained on, under the "
            f"same name ({how}); resume on the same store, or start a new --out"
        )
    if then != now:
        raise UsageError(
            f"--resume: {run.cfg.data} is not the store this run was trained on (its CLIP model or latent "
            "codec differ); resume on the same store, or start a new --out"
        )
    run.resumed_shards = meta.get("store_shards")  # checked against the stream's once it is built
    if meta["world_size"] != run.world:
        # Step s of the stream is cut for a fixed number of ranks, and each rank's noise generator is saved:
        # another world size would change the data order and the noise, so the run would not be the same.
        raise UsageError(
            f"--resume: the checkpoint was trained with {meta['world_size']} process(es), this run has "
            f"{run.world}; resume with --nproc_per_node {meta['world_size']} (or start a new --out)"
        )


def adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (one pass over the parameters instead of a list of ops per tensor):
    measured 7-8% of a `tiny` decoder step on 2 CPU cores and 19 of 21 ms of the demo CLIP's update."""
    return torch.optim.AdamW(params, fused=True, **kw)


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:  # linear warmup, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The moving average's decay at update ``step`` (0-based): ``step / (step + 1)`` until that reaches
    ``decay`` with ``warmup``, which makes the average the mean of the weights of steps 0 .. step."""
    return min(decay, step / (step + 1)) if warmup else decay


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def check_settings(cfg: TrainConfig) -> None:
    """Ranges of the shared settings, before anything is built or written; one UsageError naming the first
    bad one."""
    rules = [
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("lr", cfg.lr > 0, "> 0 (and finite)"),
        ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, ">= 0"),
        ("steps", cfg.steps >= 1, ">= 1"),
        ("stop_after", cfg.stop_after >= 0, ">= 0 (0 = run to --steps)"),
        ("grad_clip", cfg.grad_clip > 0, "> 0"),
        ("ema_decay", 0 <= cfg.ema_decay < 1, "in [0, 1)"),
        ("keep_checkpoints", cfg.keep_checkpoints >= 0, ">= 0 (0 = keep every checkpoint)"),
        ("eval_every", cfg.eval_every >= 0, ">= 0 (0 = never)"),
        ("save_every", cfg.save_every >= 1, ">= 1"),
        ("log_every", cfg.log_every >= 1, ">= 1"),
        ("val_fraction", 0 <= cfg.val_fraction < 1, "in [0, 1)"),
        ("seed", 0 <= cfg.seed < 2**63, "in [0, 2**63)"),
        ("split_seed", 0 <= cfg.split_seed < 2**63, "in [0, 2**63)"),
    ]
    # The tasks' evaluation settings (each task's config adds its own): checked here too, or a bad one would
    # surface at the first evaluation, after the training steps before it.
    for name, ok, want in (
        ("eval_samples", lambda v: v >= 1, ">= 1"),
        ("sample_steps", lambda v: v >= 1, ">= 1"),
        ("guidance_scale", lambda v: v is None or v >= 0, ">= 0 (1 = no guidance)"),
    ):
        if hasattr(cfg, name):
            rules.append((name, ok(getattr(cfg, name)), want))
    for name, ok, want in rules:
        if not ok or (isinstance(getattr(cfg, name), float) and not math.isfinite(getattr(cfg, name))):
            raise UsageError(f"--{name.replace('_', '-')} must be {want} (got {getattr(cfg, name)})")


def _prepare(task: Task) -> RunState:
    """Resolve, build and (with --resume) restore: the state at the start of this invocation."""
    cfg = task.cfg
    check_settings(cfg)
    device = resolve_device(cfg.device)
    manifest = load_store_manifest(cfg.data)
    listed, done = {str(s["shard"]) for s in manifest.get("shards", [])}, set(store.done_shards(cfg.data))
    if listed != done and int(os.environ.get("RANK", "0")) == 0:  # the stream takes the done shards
        from pipeline.validate import redo

        what = "adoption" if (manifest.get("identity") or {}).get("adopted") else "embed run"
        log.warning(
            "--data %s: its manifest lists %d shard(s) and %d are done, so its %s did not finish (or was "
            "killed); training on the %d done shards. To finish it, %s (`unclip validate` checks it)",
            cfg.data, len(listed), len(done), what, len(done), redo(Path(cfg.data), manifest),
        )  # fmt: skip
    model_cfg = json.loads(json.dumps(task.model_config(manifest)))  # as meta.json will hold it
    if hasattr(cfg, "sample_steps"):  # the evaluation's sampler: refused now, not at the first evaluation
        from models.samplers import check_steps

        try:
            check_steps(cfg.sample_steps, model_cfg.get("timesteps", 1000), "--sample-steps")
        except ValueError as e:
            raise UsageError(str(e)) from None
    rank, world, device = distributed.setup(device)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = task.build(model_cfg).to(device)
    if world > 1:  # dropout draws from the global generators: one seed left every rank the same masks
        torch.manual_seed((cfg.seed * 1000 + rank) % 2**63)
    opt = adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.96))
    return RunState(
        cfg=cfg,
        task=task,
        manifest=manifest,
        model_cfg=model_cfg,
        model=model,
        ema=copy.deepcopy(model).requires_grad_(False),
        opt=opt,
        sched=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps)),
        gen=torch.Generator().manual_seed((cfg.seed * 1000 + rank) % 2**63),  # as before below 9.2e15
        rank=rank,
        world=world,
        device=device,
        out=Path(cfg.out),
    )


def _is_run_folder(folder: Path) -> bool:
    """Whether `folder` is a run this loop started: its config.json is the one `train` writes first."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"task", "train", "model"} <= set(config)


def _restore(run: RunState) -> int:
    """Load the latest checkpoint into `run` (with --resume); the step to continue from. Without --resume an
    --out that already holds a checkpoint is refused: a new run there would overwrite it step by step."""
    store.check_out_folder(run.out, _is_run_folder, "a training run's folder (no config.json of train-*)")
    if not run.cfg.resume:
        if (run.ckpt_dir / "latest").exists():
            raise UsageError(
                f"--out {run.out} already holds a training run (its latest checkpoint: "
                f"{(run.ckpt_dir / 'latest').read_text().strip()}); pass --resume to continue it, or choose "
                "a new --out"
            )
        return 0
    if not (run.ckpt_dir / "latest").exists():
        log.warning("--resume: no checkpoint in %s, starting from scratch", run.ckpt_dir)
        return 0
    folder = checkpoint.resolve(run.ckpt_dir)
    meta = checkpoint.read_meta(folder)
    _check_resume(meta, run)
    run.resumed_order = meta.get("stream_order", "row")  # checked against the stream's once it is built
    checkpoint.load_weights(run.model, folder / "model.safetensors")
    checkpoint.load_weights(run.ema, folder / "ema.safetensors")
    state = checkpoint.load_state(folder)
    run.opt.load_state_dict(state["opt"])
    run.sched.load_state_dict(state["sched"])
    run.gen.set_state(state["gen"][run.rank])
    torch.set_rng_state(state["torch_rng"][run.rank])
    cuda_rng = state.get("cuda_rng", [None] * run.world)[run.rank]  # absent in checkpoints made before it was
    if cuda_rng is not None and run.device.startswith("cuda"):
        torch.cuda.set_rng_state(cuda_rng, run.device)
    log.info("resumed from %s at step %d", folder, meta["step"])
    return int(meta["step"])


def train(task: Task) -> dict:
    """Run the loop for `task` from scratch or from its latest checkpoint; the run's report."""
    try:
        return _prepared_and_trained(task)
    except Interrupted:
        raise
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one before the loop: what a rerun continues from
        latest = ckpt_dir(task.cfg.out) / "latest"
        if latest.exists():
            raise Interrupted(f"nothing since {latest.parent / latest.read_text().strip()} was saved") from e
        raise Interrupted("no checkpoint was saved", nothing_kept=True) from e


def _prepared_and_trained(task: Task) -> dict:
    run = _prepare(task)
    try:
        # rank 0 writes the run's files: a second run given the same --out meanwhile is refused, not mixed in.
        # Every rank learns the outcome, so all refuse together (the others would wait in a collective).
        held, refused = contextlib.ExitStack(), None
        if run.rank == 0:
            try:
                held.enter_context(store.hold_folder(run.out))
            except UsageError as e:
                refused = str(e)
        refused = distributed.every_ranks(refused, run.world)[0]
        if refused:
            raise UsageError(refused)
        with held:
            return _train(task, run)
    finally:
        if run.world > 1:
            dist.destroy_process_group()


def _train(task: Task, run: RunState) -> dict:
    start = _restore(run)
    if run.world > 1:
        # Each rank read `latest` itself. One that saw another checkpoint (an --out that is not shared by every
        # node, a stale cache) would average gradients of different steps, then hang at a collective.
        starts = distributed.every_ranks(start, run.world)
        if len(set(starts)) > 1:
            raise UsageError(
                f"--resume: the ranks found different checkpoints in {run.ckpt_dir} (the step each resumes from, "
                f"by rank: {starts}); every rank must see the same --out, a folder on a filesystem every node shares"
            )
    model = _LossModule(task, run.model)
    if run.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    stream = Stream(
        StreamConfig(
            run.cfg.data,
            fields=task.fields,
            batch_size=run.cfg.batch_size,
            val_fraction=run.cfg.val_fraction,
            split_seed=run.cfg.split_seed,
            seed=run.cfg.seed,
            rank=run.rank,
            world_size=run.world,
            start_step=start,
        )
    )
    run.stream_order = stream.order
    run.shards = store_shards(stream.store.done, stream.store.done_files)
    changed = shards_changed(run.resumed_shards, run.shards)
    if changed and run.rank == 0:
        log.warning(
            "--resume: %s changed since the checkpoint (%s): the run continues on the store as it is, so its "
            "data from here is not an uninterrupted run's",
            run.cfg.data, changed,
        )  # fmt: skip
    if run.resumed_order is not None and run.resumed_order != stream.order:
        by = {"row": "row position", "key": "sample key"}
        raise UsageError(
            f"--resume: the checkpoint's stream split and ordered {run.cfg.data} by "
            f"{by.get(run.resumed_order, run.resumed_order)}, this version's by "
            f"{by.get(stream.order, stream.order)}, so the run cannot continue on the same data; start a "
            "new --out (or resume with the version that wrote it)"
        )
    if run.rank == 0:  # only once the settings, the store and the checkpoint were all accepted
        run.out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_leftovers(
            run.out, run.ckpt_dir
        )  # a killed run's half-written files (we hold the lock)
        config = {"task": task.name, "train": asdict(run.cfg), "model": run.model_cfg}
        store.write_json(run.out / "config.json", config)
        metrics.truncate(run.out / "metrics.jsonl", start)
    return _loop(model, stream, start, run)


def _all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _save(step: int, run: RunState) -> None:
    """Checkpoint `step`; weights that are not finite are never written, and `latest` does not move."""
    if not (_all_finite(run.model) and _all_finite(run.ema)):
        raise StageError(
            f"weights are not finite at step {step}: not checkpointed; the last good checkpoint is in "
            f"{run.ckpt_dir} (lower --lr or raise --warmup-steps, then --resume)"
        )
    gens, rngs, cuda_rngs = distributed.gather_rng_states(run.gen, run.world, run.device)
    if run.rank != 0:
        return
    state = {"opt": run.opt.state_dict(), "sched": run.sched.state_dict(), "gen": gens, "torch_rng": rngs}
    state["cuda_rng"] = cuda_rngs
    meta = {
        "task": run.task.name,
        "config": asdict(run.cfg),
        "model": run.model_cfg,
        "stream_step": step,
        "world_size": run.world,
        "store": store_identity(run.manifest),
        "stream_order": run.stream_order,  # how the store's rows were split and ordered
        "store_shards": run.shards,  # what it was split from
    }
    checkpoint.save(run.ckpt_dir, step, run.model, run.ema, state, meta)
    checkpoint.prune(run.ckpt_dir, run.cfg.keep_checkpoints)


def _last_good(run: RunState) -> str:
    """What a diverged run leaves, and what to do about it."""
    if (run.ckpt_dir / "latest").exists():
        return f"the last good checkpoint is in {run.ckpt_dir} (lower --lr or raise --warmup-steps, then --resume)"
    return "no checkpoint was written yet (lower --lr or raise --warmup-steps, and start again)"


def _step(model: torch.nn.Module, batch: dict, step: int, run: RunState) -> tuple[float, float]:
    """One optimiser step; (loss, gradient norm). A non-finite loss or gradient stops the run untouched."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.startswith("cuda")):
        loss = model(batch, run.gen)
    own = bool(torch.isfinite(loss))
    agreed = own
    if run.world > 1:
        # every rank stops at the same step, each with a line: one rank alone stopping before backward left the
        # others in DDP's all-reduce, ended by a gloo or NCCL traceback ("connection closed by peer")
        finite = torch.tensor([int(own)], dtype=torch.int32, device=loss.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        agreed = bool(finite.item())
    if own and not agreed:
        raise StageError(
            f"loss is not finite on another rank at step {step} (its own line says why): stopping with it"
        )
    if not own:
        bad = [
            k
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()
        ]
        if bad:  # the data, not the learning rate
            raise StageError(
                f"loss is {loss.item()} at step {step}: this step's {', '.join(bad)} hold NaN or inf values from "
                f"the store; `unclip validate {run.cfg.data}` names the file"
            )
        raise StageError(f"loss is {loss.item()} at step {step}: stopping; {_last_good(run)}")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    if not torch.isfinite(grad_norm):
        raise StageError(
            f"gradient norm is {float(grad_norm)} at step {step}: stopping before the update; {_last_good(run)}"
        )
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.sched.step()
    _ema_update(run.ema, run.model, ema_decay_at(step, run.cfg.ema_decay, run.cfg.ema_warmup))
    return loss.item(), float(grad_norm)


def _rows_before(path: Path, start: int, batch_size: int) -> list[torch.Tensor]:
    """--log-rows: the (shard, row) ids of steps 0 .. start - 1 that earlier invocations logged (their rows
    past the checkpoint this run resumes from are dropped: those steps run again), as the log's first part.
    Steps that ran without --log-rows are rows of -1, so row i of the log is always step i // batch_size's."""
    if not start:
        return []
    logged = torch.load(path) if path.exists() else torch.zeros(0, 2, dtype=torch.long)
    if len(logged) < start * batch_size:
        log.warning(
            "--log-rows: steps %d .. %d ran without --log-rows; %s holds -1 for their rows",
            len(logged) // batch_size, start - 1, path,
        )  # fmt: skip
        missing = torch.full((start * batch_size - len(logged), 2), -1, dtype=torch.long)
        logged = torch.cat([logged, missing])
    return [logged[: start * batch_size]]


ROWS_SHARDS = "rows_shards.json"  # --log-rows: the shard names its shard ids stand for, by id


def _shard_ids(out: Path, names: list[str], rank: int) -> torch.Tensor:
    """--log-rows: each of the stream's shards (by its position among the store's non-empty shards) -> its id
    in the log, the shard's place in ``rows_shards.json``. That list only grows, so the ids logged before a
    resume keep naming the same shards when the store has gained some (positions would shift)."""
    path = out / ROWS_SHARDS
    known = store.read_json(path) if path.exists() else []
    seen = set(known)
    known += [n for n in names if n not in seen]
    if rank == 0:
        store.write_json(path, known)
    where = {n: i for i, n in enumerate(known)}
    return torch.tensor([where[n] for n in names], dtype=torch.long)


class _Flag:
    """Set by a signal handler: plain attributes, as a handler may run inside any Python code, an Event's own
    lock included."""

    def __init__(self) -> None:
        self.set = False
        self.signum = 0  # the signal that set it (the CLI's exit code and words follow it)
        self.at = 0.0  # when its handler first ran (time.monotonic())


# SIGTERMs within this many seconds of the first are the same notice: under SLURM every process of the step gets
# one, torchrun included, which passes its own on to each rank a few milliseconds later.
SIGTERM_REPEAT_S = 5.0
# A rank that shares torchrun's process group (torchrun before it started each rank in a session of its own)
# gets the terminal's Ctrl-C and torchrun's copy of it milliseconds apart: one press. Elsewhere every SIGINT is a
# press of its own. (Handlers run between Python bytecodes: two presses during one long native call may count
# as one, and then a third press is needed.)
SIGINT_REPEAT_S = 0.5
CTRL_C_NOTE = (
    b"\nCtrl-C: stopping once this step (and its evaluation, if one is due) is checkpointed; Ctrl-C again "
    b"stops at once, unsaved\n"
)


def _sigint_repeat_s() -> float:
    """SIGINT_REPEAT_S where the terminal's Ctrl-C and torchrun's copy can both reach this process, else 0."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not a torchrun rank: one SIGINT a press
        return 0.0
    try:
        return SIGINT_REPEAT_S if os.getpgid(0) == os.getpgid(os.getppid()) else 0.0
    except OSError:  # the parent gone
        return 0.0


@contextlib.contextmanager
def _stop_flag(announce: bool = True):
    """A flag that SIGTERM or Ctrl-C (SIGINT) sets while the block runs, in place of dying; the loop then
    checkpoints the step it is on and stops.

    SIGTERM is a batch scheduler's notice (SLURM's at the time limit or on preemption, torchrun's when it stops
    its ranks) that a SIGKILL follows. One more than SIGTERM_REPEAT_S after the first has the previous handler's
    effect (the default: the end), so that a rank that cannot get back to the loop (stuck in a collective with a
    dead peer) can still be ended. Ctrl-C had ended the run with nothing saved since the last periodic
    checkpoint (up to --save-every steps); now the first press saves, and says so (``announce``: rank 0). A
    second press (a SIGINT after the first's copy, `_sigint_repeat_s`), or any signal of the other kind after the
    flag is set (torchrun, pressed twice, passes SIGTERM on), is a KeyboardInterrupt: a user who will not wait
    for the save. Where `signals.handling` installs nothing, the flag is never set and nothing changes."""
    flag = _Flag()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    sigint_repeat = _sigint_repeat_s()

    def on_signal(signum, _frame):
        now = time.monotonic()
        if not flag.set:
            flag.set, flag.signum, flag.at = True, signum, now
            if signum == signal.SIGINT and announce:
                os.write(2, CTRL_C_NOTE)  # not `logging` or print: neither may be entered from a handler
        elif signum == flag.signum == signal.SIGTERM:
            if now - flag.at > SIGTERM_REPEAT_S:
                signal.signal(signum, previous[signum])
                signal.raise_signal(signum)
        elif signum != flag.signum or now - flag.at > sigint_repeat:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            raise KeyboardInterrupt

    with handling(signal.SIGTERM, on_signal), handling(signal.SIGINT, on_signal):
        yield flag


def _agreed(stop_flag: _Flag, run: RunState) -> bool:
    """Whether any rank has had SIGTERM or Ctrl-C (every rank calls this at the same point)."""
    return distributed.mean_over_ranks(float(stop_flag.set), run.world, run.device) > 0


def _loop(model: torch.nn.Module, stream: Stream, start: int, run: RunState) -> dict:
    with _stop_flag(announce=run.rank == 0) as stop_flag, progress.logs_above_bars():
        return _loop_until(model, stream, start, run, stop_flag)


def _loop_until(model: torch.nn.Module, stream: Stream, start: int, run: RunState, stop_flag: _Flag) -> dict:
    cfg, rank = run.cfg, run.rank
    metrics_file = run.out / "metrics.jsonl"
    rows_path = run.out / f"rows_rank{rank}.pt"
    rows_log = _rows_before(rows_path, start, cfg.batch_size) if cfg.log_rows else None
    if rows_log is not None:
        shard_ids = _shard_ids(run.out, [name for name, _ in stream.store.shards], rank)
    batches = stream.torch_batches(run.device)
    t0, seen, last_loss, report_eval = time.perf_counter(), 0, float("nan"), None
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    name = f"train-{run.task.name}"
    if start >= end:  # a finished chunk run again (a requeued job): a no-op, as the same command should be
        why = f"--steps {cfg.steps}" if start >= cfg.steps else f"--stop-after {cfg.stop_after}"
        # a finished run is news, not a fault; an earlier --stop-after than the checkpoint may be a mistake
        log.log(
            logging.INFO if start >= cfg.steps else logging.WARNING,
            "%s: the checkpoint is at step %d, at or past %s: nothing to train",
            name, start, why,
        )  # fmt: skip
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=name, disable=rank != 0)
    run.model.train()
    stopped = 0  # the step a SIGTERM or Ctrl-C stopped the run after (checkpointed), if one did
    for step in bar:
        b = next(batches)
        if rows_log is not None:
            rows_log.append(torch.stack([shard_ids[b["shard"].cpu()], b["row"].cpu()], 1))
        last_loss, grad_norm = _step(model, b, step, run)
        seen += len(b["row"]) * run.world
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            # the loss over the whole batch, every rank's share: rank 0's alone is a noisier curve
            last_loss = distributed.mean_over_ranks(last_loss, run.world, run.device)
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            sps = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{last_loss:.4f}", samples_per_s=f"{sps:.0f}")
            # the rate this step was taken at (the scheduler has already moved on to the next step's)
            lr = run.sched.base_lrs[0] * run.sched.lr_lambdas[0](step)
            row = {"step": done, "loss": last_loss, "grad_norm": grad_norm, "lr": lr, "samples_per_s": sps}
            metrics.append(metrics_file, row)
        # Evaluated before the save: a checkpoint exists only for a step whose evaluation ran, so a resume after
        # a failed or interrupted evaluation redoes it (its settings were checked before the first step).
        # The evaluation has its own generators: the run's random state is untouched.
        if rank == 0 and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            report_eval = run.task.evaluate(run, done)
            if report_eval is not None:
                metrics.append(metrics_file, {"step": done, "eval": report_eval})
        # Every rank stops after the same step (one may have had the signal a step later): the flag is agreed on.
        stop = _agreed(stop_flag, run)
        if done == end or stop or (cfg.save_every and done % cfg.save_every == 0):
            if rows_log:  # before the checkpoint (whose RNG gather waits for every rank's): a resume from it
                buf = io.BytesIO()  # always finds the rows of every step before it
                torch.save(torch.cat(rows_log), buf)
                store.atomic_write(rows_path, buf.getvalue())
            _save(done, run)
            stop = stop or _agreed(stop_flag, run)  # a signal during the save: stop on it, not one step on
        if stop and done < end:
            # the signal of the lowest-numbered rank that had one (a peer's Ctrl-C is no SIGTERM)
            signum = next(
                (n for n in distributed.every_ranks(stop_flag.signum, run.world) if n), signal.SIGTERM
            )
            stopped = done
            break
    bar.close()
    distributed.record_weight_digests(run.model, run.rank, run.world, run.out)
    if rank == 0:
        metrics.plot_loss(metrics_file, run.out / "loss.png", name, run.task.loss_label)
    if stopped:
        message = f"{name} stopped after step {stopped} of {end}, checkpointed in {run.ckpt_dir}"
        raise Stopped(message, signum=signum)
    elapsed = time.perf_counter() - t0
    return {
        "steps": max(end, start),
        "start_step": start,
        "final_loss": None if math.isnan(last_loss) else last_loss,  # None: no step ran (JSON has no NaN)
        "seconds": round(elapsed, 2),
        "samples_per_s": round(seen / elapsed, 1) if seen else None,
        "ckpt": str(run.ckpt_dir),
        "eval": report_eval,
    }
