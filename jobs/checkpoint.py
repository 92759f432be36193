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

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import UsageError

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
    save_file(_state(model), tmp / "model.safetensors")
    save_file(_state(ema), tmp / "ema.safetensors")
    torch.save(extra_state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "version": code_version(), **meta}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "latest")
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a ckpt/ root (its `latest`), or a training --out folder (its ckpt/latest)."""
    p = Path(path)
    for root in (p, p / "ckpt"):
        if (root / "latest").exists():
            return root / (root / "latest").read_text().strip()
    if (p / "meta.json").exists():
        return p
    raise UsageError(f"no checkpoint at {path} (expected a step_* folder, or a folder with a 'latest' file)")


def read_meta(folder: str | Path) -> dict:
    meta = json.loads((Path(folder) / "meta.json").read_text())
    fmt = meta.get("version", {}).get("checkpoint_format")
    if fmt != CHECKPOINT_FORMAT:
        raise UsageError(f"checkpoint {folder} has format {fmt}; this code reads format {CHECKPOINT_FORMAT}")
    return meta


def load_weights(module: torch.nn.Module, file: str | Path) -> None:
    """Strict load: a missing or unexpected key is an error naming it."""
    state = load_file(str(file))
    missing, unexpected = module.state_dict().keys() - state.keys(), state.keys() - module.state_dict().keys()
    if missing or unexpected:
        raise UsageError(
            f"{file} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    module.load_state_dict(state, strict=True)


def load_state(folder: str | Path) -> dict:
    return torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
