"""`unclip device-check`: every CUDA path of the project in one short run, for a session lent a GPU.

No CUDA path is exercised by the tests (CI has no GPU), so this is where they run: embed with ``--device cuda``
(JPEGs decoded on the device) and the GPU rows of `unclip bench` for it, a probe of how long a process takes to
exit after using the GPU, the prior, the decoder and its 8 x 8 first stage trained on the GPU (bf16 autocast),
exact resume on CUDA, text -> image sampling through one and two decoder stages, embed with an SD-sized VAE,
then the `base` decoder's bench row. Each stage is a subprocess with its
own time limit; a failed, timed-out or out-of-budget stage is recorded with its reason and the next one runs. ``OUT/device_check.json`` (and
``.md``) is rewritten atomically after every stage, so a run cut short still reports what it measured.
``bench/device_check.sh`` installs the wheels of `make device-kit` on the GPU machine and runs this.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jobs.bench.harness import PY, Run, git_commit, machine_line, measure, probe_cmd, table
from pipeline.errors import UsageError
from pipeline.store import atomic_write

# What each embed stage reports of `unclip embed`'s summary.
EMBED_FIGURES = (
    "rows",
    "errors",
    "samples_per_second",
    "samples_per_second_in_tasks",
    "samples_per_second_in_warm_tasks",
    "gpu_peak_mb",
    "wall_s",
    "startup_seconds",
    "tasks_seconds",
    "close_seconds",
    "task_phase_seconds",
)


@dataclass
class DeviceCheckConfig:
    out: str = field(
        default="device_out",
        metadata={"help": "device_check.json/.md, log.txt, samples.png, samples_two_stage.png"},
    )
    device: str = field(default="cuda", metadata={"help": "cuda; cpu only for a dry run of the script"})
    budget_s: float = field(
        default=520.0, metadata={"help": "stop starting stages after this many seconds (a lease is short)"}
    )
    stages: str = field(
        default="", metadata={"help": "comma-separated subset, in order (default: every stage)"}
    )
    quick: bool = field(default=False, metadata={"help": "tiny sizes (the CPU dry run and its test)"})
    work: str = field(
        default="",
        metadata={
            "help": "shards, stores, checkpoints (default: a folder in the system temp dir, not --out)"
        },
    )


@dataclass
class Check:
    """What each stage shares: the config, the work folder, the log and the deadline."""

    cfg: DeviceCheckConfig
    work: Path
    log: Path
    deadline: float

    def run(self, cmd: list[str], limit: float) -> Run:
        """``cmd`` in its own process (and session) with a time limit, its output appended to the log whether it
        succeeds or not. A command cut short raises `StageTimeout`; none starts with under 30 s left."""
        left = self.deadline - time.monotonic()
        if left < 30:
            raise StageTimeout("out of budget: command not started", status="skipped")
        part = self.work / "stage.log"
        limit = min(limit, left)
        t0 = time.monotonic()
        try:
            return measure(cmd, log=part, timeout=limit)
        except RuntimeError as e:
            if time.monotonic() - t0 >= limit - 1:
                raise StageTimeout(f"cut short after {limit:.0f} s (the log's end: log.txt)") from e
            raise
        finally:
            with open(self.log, "a") as f:
                f.write(part.read_text() if part.exists() else "")

    def cli(self, *args: str, limit: float = 240.0) -> dict:
        """`unclip ARGS`: the JSON report it printed last (pretty-printed; {} if none) with its wall seconds."""
        run = self.run([PY, "-m", "jobs.cli", *args], limit)
        return {**_last_report(run.stdout), "wall_s": round(run.seconds, 1)}

    def probe(self, fn: Callable[..., dict], limit: float = 180.0, **kwargs) -> dict:
        """``fn(**kwargs)`` (a module-level function) in a fresh process: its JSON result."""
        return self.run(probe_cmd(fn, **kwargs), limit).result()


class StageTimeout(Exception):
    """A command of a stage not started for want of budget ("skipped"), or cut short at its limit."""

    def __init__(self, message: str, status: str = "timed_out") -> None:
        super().__init__(message)
        self.status = status


def _last_report(stdout: str) -> dict:
    """The last JSON object the `unclip` CLI printed (``json.dumps(report, indent=2)``: it opens with a line
    holding only "{"); whatever follows it is ignored."""
    lines = stdout.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip() == "{"]
    if not starts:
        return {}
    obj, _ = json.JSONDecoder().raw_decode("".join(lines[starts[-1] :]))
    return obj


def _env(c: Check) -> dict:
    import torch

    smi = shutil.which("nvidia-smi")
    line = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() if smi else None
    cuda = torch.cuda.is_available()
    return {
        "machine": machine_line(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else None,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "nvidia_smi": line,
    }


def _shards(c: Check) -> Path:
    from jobs.bench.embed_gpu import write_jpeg_shards

    return write_jpeg_shards(c.work / "shards", shards=2, per=64 if c.cfg.quick else 1024)


def _clip(c: Check) -> list[str]:
    return ["--clip", "unclip-tiny" if c.cfg.quick else "ViT-B-32", "--pretrained", "none"]


def _embed(c: Check) -> dict:
    shards, store = _shards(c), c.work / "store"
    shutil.rmtree(store, ignore_errors=True)
    batch = "32" if c.cfg.quick else "256"
    r = c.cli(
        "embed", "--shards", str(shards / "{00000..00001}.tar"), "--out", str(store), *_clip(c),
        "--batch-size", batch, "--device", c.cfg.device, "--image-decode", "device" if c.cfg.device == "cuda" else "pil",
        "--latents", "pixels", "--latent-size", "32", "--text-encodings",
    )  # fmt: skip
    c.cli("validate", str(store))  # exits 1 (and so fails the stage) on any problem
    if r.get("device_decode_fallbacks"):  # clean baseline JPEGs: the device decoder must take every one
        raise RuntimeError(
            f"the device JPEG decoder refused {r['device_decode_fallbacks']} clean JPEGs (log.txt)"
        )
    agree = c.probe(probe_agreement, limit=90.0, store=str(store))
    return {**{k: r.get(k) for k in EMBED_FIGURES}, "validate": "ok", "device_decode_fallbacks": 0, **agree}


def probe_agreement(store: str) -> dict:
    """The store's CLIP probe (`pipeline.encoders.clip_probe`, taken by the run's workers on their device, fp16
    autocast on CUDA) against the same model's on CPU in fp32: the margin the probe's 0.999 threshold has
    across devices (random weights agreed to >= 0.99992 on CPU at fp16 and bf16)."""
    from pipeline import store as st
    from pipeline.encoders import clip_probe, load_clip, probe_cosines

    m = st.load_manifest(store)
    c, seed = m["clip"], m["identity"].get("seed", 0)
    mine, theirs = clip_probe(load_clip(c["arch"], c["pretrained"], "cpu", seed)), c["probe"]
    cos = probe_cosines(mine, theirs)
    return {f"probe_cos_{theirs['device']}_vs_cpu_{t}": round(v, 6) for t, v in cos.items()}


def _embed_tasks(c: Check, clip: str, limit: float) -> dict:
    """Shard tasks in one process, device and PIL decode each with --batch-prep inline and thread, against
    the pure forward (`jobs.bench.embed_gpu.probe_tasks`): issue 11's in-task ratio without a dask cluster's
    start-up and close (~50 s a run on the H200, 2026-12-04) per row."""
    from jobs.bench.embed_gpu import probe_tasks

    quick = c.cfg.quick
    res = c.probe(
        probe_tasks,
        limit=limit,
        clips=["unclip-tiny" if quick else clip],
        shards=str(_shards(c)),
        out=str(c.work / "tasks"),
        device=c.cfg.device,
        per_round=1 if quick else 2,
        rounds=1 if quick else 2,
        batch=32 if quick else 256,
    )
    return next(iter(res.values()))


def _decode_rules(c: Check) -> dict:
    """Odd samples through the device and PIL decoders: the same rows, the same error rows, embeddings at
    cosine >= 0.999 (`jobs.bench.decode_rules`)."""
    from jobs.bench.decode_rules import decode_rules_probe, write_rules_shard

    tar = write_rules_shard(c.work / "rules" / "00000.tar")
    res = c.probe(decode_rules_probe, tar=str(tar), clip=_clip(c)[1], device=c.cfg.device)
    if not (res["same_rows"] and res["same_error_rows"] and (res["min_cos_device_vs_pil"] or 0) >= 0.999):
        raise RuntimeError(f"device and PIL paths differ: {res}")
    return res


def _train(c: Check, model: str, out: str, steps: int, *extra: str) -> dict:
    run = c.work / out
    shutil.rmtree(run, ignore_errors=True)
    r = c.cli(
        f"train-{model}", "--data", str(c.work / "store"), "--out", str(run), "--steps", str(steps),
        "--device", c.cfg.device, "--eval-every", "0", "--save-every", str(steps), "--warmup-steps", "20",
        *extra,
    )  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    return {
        "steps": steps,
        "samples_per_s": r.get("samples_per_s"),
        "loss_at_first_log": losses[0],
        "final_loss": losses[-1],
        "wall_s": r["wall_s"],
    }


def _train_prior(c: Check) -> dict:
    return _train(
        c, "prior", "prior", 50 if c.cfg.quick else 500, "--preset", "tiny" if c.cfg.quick else "vit-b-32"
    )


def _train_decoder(c: Check) -> dict:
    # A first stage left by an earlier run does not belong to this decoder.
    shutil.rmtree(c.work / "base", ignore_errors=True)
    steps = 20 if c.cfg.quick else 500
    return _train(
        c, "decoder", "decoder", steps, "--preset", "tiny", "--batch-size", "32" if c.cfg.quick else "256"
    )


def _train_base(c: Check) -> dict:
    """The two-stage decoder's first stage: `tiny-base` on the store's 32 px pixels pooled to 8 x 8."""
    steps = 20 if c.cfg.quick else 500
    return _train(
        c, "decoder", "base", steps, "--preset", "tiny-base", "--resolution", "8",
        "--batch-size", "32" if c.cfg.quick else "256",
    )  # fmt: skip


def _resume(c: Check) -> dict:
    """The prior 10 + 10 steps against 20 straight: on CUDA the weights are compared, not required equal (some
    kernels are not deterministic); on CPU they are byte for byte the same."""
    from safetensors.torch import load_file

    def weights(run: Path) -> dict:
        return load_file(str(max((run / "ckpt").glob("step_*/model.safetensors"))))

    common = ("--preset", "tiny", "--batch-size", "16", "--warmup-steps", "5")
    for name in ("straight", "halves"):
        shutil.rmtree(c.work / name, ignore_errors=True)
    base = [
        "--data",
        str(c.work / "store"),
        "--device",
        c.cfg.device,
        "--eval-every",
        "0",
        "--save-every",
        "10",
    ]
    c.cli("train-prior", *base, "--out", str(c.work / "straight"), "--steps", "20", *common)
    c.cli(
        "train-prior", *base, "--out", str(c.work / "halves"), "--steps", "20", "--stop-after", "10", *common
    )
    c.cli("train-prior", *base, "--out", str(c.work / "halves"), "--steps", "20", "--resume", *common)
    a, b = weights(c.work / "straight"), weights(c.work / "halves")
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {"max_abs_weight_diff": diff, "identical": diff == 0.0}


def _sample(c: Check) -> dict:
    grid = c.work / "samples.png"
    prompts = ["a photo of object 1 in shard 0, seen from the left", "a photo of object 7 in shard 1"]
    cmd = [
        "sample", "--prior", str(c.work / "prior"), "--decoder", str(c.work / "decoder"),
        "--prompt", *prompts, "--n", "4", "--device", c.cfg.device,
    ]  # fmt: skip
    r = c.cli(*cmd, "--out", str(grid))
    shutil.copyfile(grid, Path(c.cfg.out) / "samples.png")
    settings = json.loads(grid.with_suffix(".json").read_text())
    res = {"images": settings.get("images"), "seconds": settings.get("seconds"), "wall_s": r["wall_s"]}
    if not (c.work / "base" / "ckpt").exists():
        res["two_stage"] = "skipped: no first stage (the train_base stage failed or was not run)"
    else:  # both stages, as the demo samples
        two = c.work / "samples_two_stage.png"
        r2 = c.cli(*cmd, "--base", str(c.work / "base"), "--strength", "0.5", "--out", str(two))
        shutil.copyfile(two, Path(c.cfg.out) / two.name)
        s2 = json.loads(two.with_suffix(".json").read_text())
        res["two_stage"] = {"images": s2.get("images"), "seconds": s2.get("seconds"), "wall_s": r2["wall_s"]}
    return res


def _embed_vae(c: Check) -> dict:
    """--latents vae with a randomly initialised Stable Diffusion-sized AutoencoderKL (~84 M), by path: 256 px
    images to 4 x 32 x 32 latents (--latent-size is the latent's side; the image is 8x that)."""
    import torch
    from diffusers import AutoencoderKL

    vae = c.work / "sd_vae"
    if not (vae / "config.json").exists():
        torch.manual_seed(0)
        widths = (8, 16) if c.cfg.quick else (128, 256, 512, 512)
        AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(widths),
            up_block_types=("UpDecoderBlock2D",) * len(widths),
            block_out_channels=widths,
            layers_per_block=1 if c.cfg.quick else 2,
            latent_channels=4,
            norm_num_groups=4 if c.cfg.quick else 32,
            sample_size=256,
        ).save_pretrained(vae)
    store = c.work / "store_vae"
    shutil.rmtree(store, ignore_errors=True)
    r = c.cli(
        "embed", "--shards", str(_shards(c) / "{00000..00001}.tar"), "--out", str(store), *_clip(c),
        "--batch-size", "32" if c.cfg.quick else "128", "--device", c.cfg.device,
        "--latents", "vae", "--vae", str(vae), "--latent-size", "32",
    )  # fmt: skip
    return {k: r.get(k) for k in EMBED_FIGURES}


def process_exit_probe(device: str, decode: bool) -> dict:
    """Touch ``device`` (and, with ``decode``, decode one JPEG there with torchvision), then report when the work
    ended: the caller times the process's exit from that moment."""
    import io

    import torch
    from PIL import Image

    torch.zeros(1, device=device)
    if decode:
        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="JPEG")
        decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"done_at": time.time()}


def _exit_probe(c: Check) -> dict:
    """How long a process takes to exit after using the GPU, with and without a device JPEG decode: on the H200
    (2026-12-04) closing embed's LocalCluster took ~28 s (1.3 s on CPU), and nvJPEG's teardown is a suspect."""
    res = {}
    for decode in (False, True):
        r = c.probe(process_exit_probe, limit=90.0, device=c.cfg.device, decode=decode)
        res[f"exit_s_after_{'decode_jpeg' if decode else 'cuda_only'}"] = round(time.time() - r["done_at"], 2)
    return res


def _bench(c: Check, stage: str, limit: float = 300.0, *extra: str) -> dict:
    out = c.work / f"bench_{stage}"  # shared by a stage's runs: its generated shards are made once
    args = ["bench", "--stages", stage, "--repeats", "1", "--out", str(out), *extra] + (
        ["--quick"] if c.cfg.quick else []
    )
    c.cli(*args, limit=limit)
    return json.loads((out / "results.json").read_text())["results"]


# In order of what a short lease must not miss: embed on the GPU and its figures (issue 11's) first, the cheap
# in-process task rows before the CLI rows (each CLI run paid ~50 s of cluster start-up and close on the H200),
# then the other CUDA paths (each of which ran once, on an H200, 2026-12-04), then the rest.
STAGES: dict[str, Callable[[Check], dict]] = {
    "env": _env,
    "embed": _embed,
    "embed_tasks": lambda c: _embed_tasks(c, "ViT-B-32", 150.0),
    "embed_tasks_l14": lambda c: _embed_tasks(c, "ViT-L-14", 150.0),
    # a model a stage: `unclip bench` writes its results at its end, so a model cut short loses only its rows
    "bench_embed_gpu": lambda c: _bench(
        c,
        "embed_gpu",
        300.0,
        "--gpu-clips",
        "ViT-B-32",
        "--gpu-variants",
        "device,device_2_workers,device_4_workers",
    ),
    "exit_probe": _exit_probe,
    "bench_embed_gpu_l14": lambda c: _bench(c, "embed_gpu", 150.0, "--gpu-clips", "ViT-L-14"),
    "bench_embed_gpu_pil": lambda c: _bench(
        c, "embed_gpu", 120.0, "--gpu-clips", "ViT-B-32", "--gpu-variants", "pil"
    ),
    "bench_embed_gpu_compile": lambda c: _bench(
        c, "embed_gpu", 150.0, "--gpu-clips", "ViT-B-32", "--gpu-variants", "device_compile"
    ),
    "decode_rules": _decode_rules,
    "train_prior": _train_prior,
    "train_decoder": _train_decoder,
    "train_base": _train_base,
    "sample": _sample,
    "resume": _resume,
    "embed_vae": _embed_vae,
    "bench_decoder": lambda c: _bench(c, "decoder"),
}


def markdown(report: dict) -> str:
    rows = []
    for name, r in report["stages"].items():
        status = r.get("status", "")
        body = r.get("error") or "; ".join(
            f"{k} {json.dumps(v) if isinstance(v, (dict, list)) else v}"
            for k, v in r.items()
            if k not in ("status", "seconds")
        )
        rows.append([name, status, f"{r.get('seconds', '')}", body[:400]])
    head = f"Device check: {report['env'].get('device_name') or report['device']}; {report['date']}; commit {report['commit']}."
    return "\n".join([head, "", *table(["stage", "status", "s", "figures"], rows)]) + "\n"


def run(cfg: DeviceCheckConfig) -> dict:
    names = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    if cfg.stages.strip() and not names:  # ",," was every stage
        raise UsageError(f"--stages {cfg.stages!r} names no stage; valid: {', '.join(STAGES)}")
    names = names or list(STAGES)
    if not cfg.budget_s > 0 or cfg.budget_s != cfg.budget_s or cfg.budget_s == float("inf"):
        raise UsageError(f"--budget-s must be a number of seconds > 0 (got {cfg.budget_s})")
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise UsageError(f"unknown device-check stage(s) {', '.join(unknown)}; valid: {', '.join(STAGES)}")
    if cfg.device not in ("cuda", "cpu"):
        raise UsageError(f"unknown device '{cfg.device}'; valid: cuda, cpu")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA device is visible; --device cpu runs the script dry")
    out = Path(cfg.out)
    # The lease's tool returns only a few small files from OUT: the bulky work stays out of it.
    work = Path(cfg.work) if cfg.work else Path(tempfile.gettempdir()) / "unclip_device_check"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    check = Check(cfg, work, out / "log.txt", time.monotonic() + cfg.budget_s)
    check.log.write_text("")
    report: dict = {
        "device": cfg.device,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        # the lease copies uncommitted changes too: a commit with "-dirty" says the code was not that commit
        "commit": _short(git_commit()),
    }
    report["env"], report["stages"] = {}, {}
    for name in names:
        t0 = time.monotonic()
        print(f"[device-check] {name} ...", flush=True)
        try:
            res = {"status": "ok", **STAGES[name](check)}
        except StageTimeout as e:
            res = {"status": e.status, "error": str(e)}
        except Exception as e:  # recorded, and the next stage runs: one broken path must not hide the others
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-1500:]}
        res["seconds"] = round(time.monotonic() - t0, 1)
        if name == "env" and res["status"] == "ok":
            report["env"] = {k: v for k, v in res.items() if k not in ("status", "seconds")}
        report["stages"][name] = res
        print(f"[device-check] {name}: {res['status']} in {res['seconds']} s", flush=True)
        atomic_write(out / "device_check.json", (json.dumps(report, indent=1) + "\n").encode())
        atomic_write(out / "device_check.md", markdown(report).encode())
    print(markdown(report))
    statuses = {name: r["status"] for name, r in report["stages"].items()}
    # a stage failed or cut short is a failed check (exit 1), for the lease's tool and CI; one the budget left
    # unstarted ("skipped") is not
    return {**statuses, "exit_code": int(any(v in ("failed", "timed_out") for v in statuses.values()))}


def _short(commit: str) -> str:
    """A commit's first 10 characters, its "-dirty" kept."""
    return commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")
