"""Checkpoints: one folder per save, written under a temporary name and renamed, then `latest` updated.

    ckpt/step_00001000/model.safetensors   online weights
    ckpt/step_00001000/ema.safetensors     EMA weights (what eval and sampling use)
    ckpt/step_00001000/state.pt            optimizer, scheduler, RNG states (loaded with weights_only=True)
    ckpt/step_00001000/meta.json           step, resolved config, code version, stream position
    ckpt/latest                            name of the newest complete folder

Loading is strict: missing or unexpected weights, another checkpoint format or another model config is an
error that names the difference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline import store
from pipeline.errors import UsageError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: meta.json names its task and holds the network config under 'model'
PACKAGE_VERSION = "0.1.0"


def code_version() -> dict:
    """Package version and checkpoint format (checked on load), and the git commit (informational)."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package": PACKAGE_VERSION, "checkpoint_format": CHECKPOINT_FORMAT, "git_commit": commit}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def remove_leftovers(out: Path, ckpt_dir: Path) -> list[str]:
    """Delete what a run killed mid-write leaves in its folder: `atomic_write`'s temp files (``.latest.tmpPID``,
    ``.config.json.tmpPID``, ...) and half-written checkpoint folders (``ckpt/.tmp_step_N``, which a resume with
    another --save-every might never reach again). Only ever called by the run that holds the folder."""
    removed = []
    for folder in (out, ckpt_dir):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_file() and store.TEMP_NAME.fullmatch(p.name):
                p.unlink()
            elif p.is_dir() and folder == ckpt_dir and p.name.startswith(".tmp_step_"):
                shutil.rmtree(p)
            else:
                continue
            removed.append(str(p.relative_to(out)))
    if removed:
        log.info(
            "removed %d file(s) a killed run left half-written: %s", len(removed), ", ".join(removed[:5])
        )
    return removed


def save(
    ckpt_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    extra_state: dict,
    meta: dict,
) -> Path:
    root = Path(ckpt_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(_state(model), tmp / "model.safetensors")
        save_file(_state(ema), tmp / "ema.safetensors")
        torch.save(extra_state, tmp / "state.pt")
        (tmp / "meta.json").write_text(
            json.dumps({"step": step, "version": code_version(), **meta}, indent=2)
        )
        for p in [
            *tmp.iterdir(),
            tmp,
        ]:  # on the disk before `latest` names them: a power loss keeps a whole step
            store.fsync_path(p)
    except Exception as e:
        # A full disk: safetensors and torch.save raise their own errors for it, not OSError (torch's reads
        # "[enforce fail at inline_container.cc] unexpected pos"). The half-written step goes, freeing its
        # space; the steps before it are whole.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise
        free = shutil.disk_usage(root).free / 2**20
        raise OSError(
            f"cannot write checkpoint {final.name} into {root} ({free:.0f} MiB free there): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from e
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    store.atomic_write(root / "latest", final.name.encode())  # synced, with the rename of the step above it
    return final


STEP_NAME = re.compile(r"step_(\d{8})")


def prune(ckpt_dir: str | Path, keep: int) -> list[str]:
    """Remove all but the newest ``keep`` step folders (0 = keep every one), once the newest is whole and
    `latest` names it. Each goes by a rename to a `.tmp_step_*` name first, so a kill midway leaves no step
    folder without its weights (`remove_leftovers` clears the rest on the next start). Returns their names."""
    root = Path(ckpt_dir)
    if keep <= 0 or not root.is_dir():
        return []
    steps = sorted(
        (p for p in root.iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name)), key=lambda p: p.name
    )
    latest = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    removed = []
    for p in steps[:-keep]:
        if p.name == latest:  # never the one a resume or `sample` reads (it is the newest: a guard only)
            continue
        gone = root / f".tmp_{p.name}"
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(p, gone)
        shutil.rmtree(gone, ignore_errors=True)
        removed.append(p.name)
    return removed


@contextlib.contextmanager
def writing_beside(folder: Path, what: str, on_failure=None):
    """Around the writes of an evaluation's report into the checkpoint folder it evaluated, which a training
    run still going may have pruned meanwhile (--keep-checkpoints): then a one-line failure, never the folder
    made again around the report alone (a step folder without weights, which the run's next prune deletes,
    report and all). ``on_failure`` shows the figures before that failure."""
    from pipeline.errors import StageError

    try:
        if not folder.is_dir():
            raise FileNotFoundError(folder)
        yield
    except FileNotFoundError:
        if on_failure is not None:
            on_failure()
        raise StageError(
            f"{folder} was deleted while it was evaluated (a training run still going keeps only its newest "
            f"--keep-checkpoints), so {what} was not written there; the figures are above: pass --out to keep "
            "them"
        ) from None


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a ckpt/ root (its `latest`), or a training --out folder (its ckpt/latest)."""
    p = Path(path)
    for root in (p, p / "ckpt"):
        if (root / "latest").exists():
            name = (root / "latest").read_text().strip()
            folder = root / name
            if not name or not (folder / "meta.json").is_file():
                what = f"names {name}, which is missing or incomplete" if name else "is empty"
                raise UsageError(
                    f"{root / 'latest'} {what}; point at one of the step_* folders there, or retrain"
                )
            return folder
    if (p / "meta.json").exists():
        return p
    raise UsageError(f"no checkpoint at {path} (expected a step_* folder, or a folder with a 'latest' file)")


def read_meta(folder: str | Path) -> dict:
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"checkpoint {folder}: meta.json cannot be read ({e})") from e
    if not isinstance(meta, dict):
        raise UsageError(f"checkpoint {folder}: meta.json is not a JSON object")
    version = meta.get("version")
    fmt = version.get("checkpoint_format") if isinstance(version, dict) else None
    if fmt != CHECKPOINT_FORMAT:
        raise UsageError(f"checkpoint {folder} has format {fmt}; this code reads format {CHECKPOINT_FORMAT}")
    kinds = {"task": str, "step": int, "model": dict, "config": dict, "store": dict}
    bad = [k for k, t in kinds.items() if not isinstance(meta.get(k), t)]
    if bad or not isinstance(meta["store"].get("clip"), dict):
        raise UsageError(
            f"checkpoint {folder}: meta.json lacks or mistypes {', '.join(bad) or 'store.clip'}; it was not written "
            "by this code's training (or was edited)"
        )
    return meta


def build_model(folder: str | Path, meta: dict) -> torch.nn.Module:
    """The network a checkpoint's meta.json describes (``meta["task"]``: prior or decoder), with fresh weights.

    A model config this code cannot build (a field it does not know, as from another version, or a bad
    value) is one line naming the checkpoint and the version that wrote it, not a traceback."""
    from models.decoder import build_decoder
    from models.prior import build_prior

    builders = {"prior": build_prior, "decoder": build_decoder}
    task = meta.get("task")
    if task not in builders:
        raise UsageError(f"checkpoint {folder} is a {task} checkpoint; valid: {', '.join(builders)}")
    try:
        return builders[task](meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise unbuildable(folder, meta, e) from e


def unbuildable(folder: str | Path, meta: dict, e: Exception) -> UsageError:
    """The one-line refusal of a checkpoint whose model config this code cannot build (`build_model`)."""
    v = meta.get("version", {})
    return UsageError(
        f"checkpoint {folder}: its {meta.get('task')} config cannot be built by this code ({e}); it was written "
        f"by unclip-pipeline {v.get('package')} at commit {v.get('git_commit')}, this is {PACKAGE_VERSION}"
    )


def open_task(path: str | Path, task: str, flag: str = "") -> tuple[Path, dict]:
    """The checkpoint folder ``path`` names and its meta, refused in one line unless it is a ``task`` one
    (``flag``, default ``--TASK``, is the flag the message names)."""
    folder = resolve(path)
    meta = read_meta(folder)
    if meta.get("task") != task:
        raise UsageError(f"{flag or '--' + task} {path} is a {meta.get('task')} checkpoint, not a {task}")
    return folder, meta


def load_weights(module: torch.nn.Module, file: str | Path) -> None:
    """Strict load: a missing or unexpected key is an error naming it."""
    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise UsageError(
            f"{file} cannot be read as safetensors (missing, truncated or not a checkpoint): {e}"
        ) from e
    own = module.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or unexpected:
        raise UsageError(
            f"{file} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    shapes = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if shapes:
        k = shapes[0]
        raise UsageError(
            f"{file} does not match the model: {len(shapes)} tensor(s) differ in shape, e.g. {k} "
            f"{tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} here "
            "(a checkpoint trained on a store with another embedding size?)"
        )
    module.load_state_dict(state, strict=True)


def load_state(folder: str | Path) -> dict:
    """Optimiser, schedule and generator states. weights_only=True: a pickle holding code is refused, not run."""
    path = Path(folder) / "state.pt"
    try:
        # torch warns of a plain pickle (not its zip format) in two lines above our one: the refusal says it all
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for refused code, RuntimeError/EOFError for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"{path} cannot be loaded safely (damaged, or holds more than tensors): {first}"
        ) from e


def check_store(meta: dict, manifest: dict, data: str, latents: bool = False) -> None:
    """A model is evaluated only on a store of the kind it was trained on: same embedding size (and latent
    shape when ``latents``). One UsageError naming both otherwise."""
    trained = meta.get("store", {})
    dim, have = trained.get("clip", {}).get("dim"), manifest.get("clip", {}).get("dim")
    if dim != have:
        raise UsageError(
            f"the checkpoint was trained on {dim}-d CLIP embeddings ({trained.get('clip', {}).get('arch')}); "
            f"{data} holds {have}-d ones ({manifest.get('clip', {}).get('arch')})"
        )
    from jobs.sample import clip_name, same_clip

    try:
        other = not same_clip(meta, {"store": {"clip": manifest["clip"]}})
        names = clip_name(meta), clip_name({"store": {"clip": manifest["clip"]}})
    except KeyError:  # an older checkpoint's record: the size agreed, nothing more to compare
        other = False
    if other:
        log.warning(
            "the checkpoint was trained on CLIP %s embeddings and %s holds %s ones, of the same size: its figures "
            "on them say little",
            names[0], data, names[1],
        )  # fmt: skip
    if latents:
        then, now = trained.get("latents") or {}, manifest.get("latents") or {}
        if not now:
            raise UsageError(
                f"{data} has no latents (it was embedded without --latents): evaluate the decoder on a store "
                f"embedded with `--latents {then.get('codec', 'pixels')}`, as it was trained"
            )
        if then.get("shape") != now.get("shape"):
            raise UsageError(
                f"the checkpoint was trained on latents of shape {then.get('shape')}; {data} holds {now.get('shape')}"
            )
        if then.get("codec") != now.get("codec"):
            raise UsageError(
                f"the checkpoint was trained on '{then.get('codec')}' latents; {data} holds '{now.get('codec')}' ones"
            )
        if then.get("sha256") and now.get("sha256"):
            if then["sha256"] != now["sha256"]:
                raise UsageError(
                    f"the checkpoint was trained on latents of the VAE with sha256 {then['sha256'][:12]}...; "
                    f"{data} holds latents of another one (sha256 {now['sha256'][:12]}...)"
                )
        elif then.get("vae") != now.get("vae"):  # a store made before digests: its VAE is known by its path
            log.warning(
                "the checkpoint was trained on latents of the VAE %s and %s holds latents of %s: if that is another "
                "VAE, its images are decoded wrong",
                then.get("vae"),
                data,
                now.get("vae"),
            )


def warn_if_other_split(meta: dict, order: str) -> None:
    """Warn when a held-out stream (``order``: `Stream.order`) splits the store otherwise than the model's
    training did: its held-out samples then include samples the model was trained on."""
    trained = meta.get("stream_order", "row")  # checkpoints made before it was recorded split by row position
    if trained != order:
        log.warning(
            "the checkpoint was trained on a %s split of this store and this version draws a %s split: the "
            "held-out samples here differ from its own and include samples it was trained on",
            trained,
            order,
        )


def default_out_writable(check) -> None:
    """Run ``check`` (a `store.check_out_*` of an evaluation's default output, beside its checkpoint, which may be
    shared and read-only): its refusal says how to write elsewhere."""
    try:
        check()
    except UsageError as e:
        raise UsageError(f"{e}; pass --out to write it elsewhere") from None
