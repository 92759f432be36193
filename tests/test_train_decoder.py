"""train-decoder / sample / eval-decoder: exact resume, errors, learning colours, text -> image plumbing."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import checkpoint
from jobs.cli import main as cli
from jobs.sample import SampleConfig
from jobs.sample import run as sample_run
from jobs.train_decoder import TrainDecoderConfig, main
from jobs.train_prior import TrainPriorConfig
from jobs.train_prior import main as train_prior
from pipeline.errors import UsageError
from tests.synthetic_store import make_store

# unclip-tiny (open_clip, random weights) is the store's CLIP, so that `unclip sample` can load it.
DIM = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    make_store(root, [200, 0, 200], dim=DIM, n_classes=8, latent_size=16, clip_arch="unclip-tiny")
    return str(root)


# A decoder small enough for a 2-core CPU test: tiny preset at 16 px latents.
def cfg_for(data, out, **kw):
    base = dict(
        data=data,
        out=str(out),
        batch_size=16,
        steps=8,
        eval_every=0,
        save_every=4,
        log_every=2,
        warmup_steps=2,
        val_fraction=0.1,
        device="cpu",
    )
    return TrainDecoderConfig(**{**base, **kw})


def weights(folder):
    return {n: (folder / n).read_bytes() for n in ("model.safetensors", "ema.safetensors")}


def test_resume_is_exact(data, tmp_path):
    ev = dict(
        eval_every=4, eval_samples=4, sample_steps=2
    )  # an evaluation at the checkpoint must not perturb
    main(cfg_for(data, tmp_path / "straight", **ev))
    main(cfg_for(data, tmp_path / "resumed", stop_after=4, **ev))
    report = main(cfg_for(data, tmp_path / "resumed", resume=True, **ev))
    assert report["start_step"] == 4
    a = weights(tmp_path / "straight/ckpt/step_00000008")
    assert a == weights(tmp_path / "resumed/ckpt/step_00000008")
    assert a != weights(tmp_path / "straight/ckpt/step_00000004")
    meta = checkpoint.read_meta(tmp_path / "straight/ckpt/step_00000008")
    assert meta["task"] == "decoder" and meta["model"]["latent_size"] == 16
    assert meta["model"]["snr_shift"] == 4.0  # the tiny preset's
    assert meta["store"]["latents"]["codec"] == "pixels" and meta["store"]["clip"]["arch"] == "unclip-tiny"
    assert (tmp_path / "straight/loss.png").stat().st_size > 1000


def test_an_evaluation_whose_pictures_cannot_be_decoded_keeps_its_latent_figures_and_the_run_goes_on(
    data, tmp_path, monkeypatch, caplog
):
    """A VAE folder moved or rewritten after step 0 stopped a long training run at its next evaluation."""
    from jobs import train_decoder
    from pipeline.errors import UsageError

    def moved(*a, **kw):
        raise UsageError(
            "the VAE the store's latents were made with is not at /vae on this machine; put it back"
        )

    monkeypatch.setattr(train_decoder, "latents_to_images", moved)
    main(cfg_for(data, tmp_path, steps=4, eval_every=2, eval_samples=4, sample_steps=2))
    evs = [
        json.loads(x)["eval"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in x
    ]
    assert len(evs) == 2 and all(
        set(e) == {"samples", "recon_latent_mse"} and e["recon_latent_mse"] > 0 for e in evs
    )
    assert (
        "evaluation at step 2: no pictures: the VAE the store's latents were made with is not at /vae"
        in caplog.text
    )
    assert (tmp_path / "ckpt/step_00000004").is_dir()


def test_store_without_latents_and_bad_settings_are_one_line_errors(tmp_path, data, capsys):
    plain = tmp_path / "plain"
    make_store(plain, [64], dim=DIM)
    with pytest.raises(UsageError, match="has no latents; embed the shards with `unclip embed --latents"):
        main(cfg_for(str(plain), tmp_path / "a"))
    assert cli(["train-decoder", "--data", data, "--out", str(tmp_path / "b"), "--preset", "huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown --preset 'huge'; valid: tiny, tiny-base, b32, base, large" in err
    assert cli(["train-decoder", "--data", data, "--out", str(tmp_path / "c"), "--sampler", "euler"]) == 2
    assert "valid: ddim, dpm++" in capsys.readouterr().err
    assert cli(["train-decoder", "--data", data, "--out", str(tmp_path / "d"), "--snr-shift", "0"]) == 2
    assert "--snr-shift must be > 0 (1 = uniform timesteps), got 0.0" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "bcd")
    main(cfg_for(data, tmp_path / "e", steps=1, save_every=1, snr_shift=1.0))  # the flag reaches the network
    assert checkpoint.read_meta(checkpoint.resolve(tmp_path / "e"))["model"]["snr_shift"] == 1.0


@pytest.mark.slow  # ~18 s of the default suite's 5 min; the model-level fit (test_decoder_model) stays in it
def test_decoder_learns_colours_from_embeddings(data, tmp_path):
    """Each scene is a solid colour: after a short run the reconstruction's colour from the image embedding is
    far closer to the true colour than another scene's colour is (chance)."""
    main(
        cfg_for(
            data,
            tmp_path,
            steps=150,
            lr=2e-3,
            warmup_steps=10,
            ema_decay=0.9,
            save_every=150,
            eval_every=150,
            eval_samples=16,
        )
    )
    ev = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval" in x][-1]
    assert ev["eval"]["samples"] == 16
    assert (tmp_path / "reconstructions.png").stat().st_size > 500
    from models.decoder import build_decoder
    from pipeline.stream import Stream, StreamConfig, dequantize_torch

    meta = checkpoint.read_meta(checkpoint.resolve(tmp_path))
    dec = build_decoder(meta["model"])
    checkpoint.load_weights(dec, checkpoint.resolve(tmp_path) / "ema.safetensors")
    val = Stream(
        StreamConfig(data, fields=("img_emb", "latents"), batch_size=32, split="val", val_fraction=0.1)
    )
    b = next(val.torch_batches())
    true = dequantize_torch(b["latents"], [-1] * 3, [1] * 3).mean((2, 3))  # [B, 3] colour
    gen = torch.Generator().manual_seed(0)
    out = dec.sample(b["img_emb"].float(), steps=10, guidance_scale=1.0, generator=gen).mean((2, 3))
    err = (out - true).abs().mean().item()
    chance = (true.roll(1, 0) - true).abs().mean().item()
    assert err < chance / 2.5, (err, chance)  # measured 0.16 vs 0.54


@pytest.fixture(scope="module")
def pair(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    common = dict(
        data=data, steps=4, batch_size=16, eval_every=0, save_every=4, val_fraction=0.1, device="cpu"
    )
    train_prior(TrainPriorConfig(out=str(root / "prior"), **common))
    main(TrainDecoderConfig(out=str(root / "decoder"), **common))
    return root


def test_sample_writes_grid_and_settings_and_is_seeded(pair, tmp_path):
    kw = dict(
        prior=str(pair / "prior"),
        decoder=str(pair / "decoder"),
        prompt=["a red circle", "a cat"],
        n=3,
        prior_steps=3,
        decoder_steps=3,
        device="cpu",
    )
    r = sample_run(SampleConfig(out=str(tmp_path / "a.png"), **kw))
    assert r["images"] == 6 and (tmp_path / "a.png").stat().st_size > 500
    settings = json.loads((tmp_path / "a.json").read_text())
    assert settings["prior_step"] == 4 and settings["decoder_step"] == 4 and settings["settings"]["seed"] == 0
    sample_run(SampleConfig(out=str(tmp_path / "b.png"), **kw))
    sample_run(SampleConfig(out=str(tmp_path / "c.png"), seed=1, **kw))
    from PIL import Image

    a, b, c = (np.asarray(Image.open(tmp_path / f"{x}.png")) for x in "abc")
    assert (a == b).all() and not (a == c).all()


def test_sample_replaces_only_its_own_output_and_takes_every_prompt_flag(pair, tmp_path, capsys):
    """A rerun replaces its own grid and settings; a file of the user's at either path is refused before any
    work (the settings .json beside --out was replaced without a word). --prompt given twice: both count."""
    args = ["sample", "--prior", str(pair / "prior"), "--decoder", str(pair / "decoder"), "--n", "1"]
    args += [
        "--prior-steps",
        "2",
        "--decoder-steps",
        "2",
        "--device",
        "cpu",
        "--prompt",
        "a",
        "--prompt",
        "b c",
    ]
    out = tmp_path / "g.png"
    assert cli(args + ["--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["prompts"] == ["a", "b c"]
    assert cli(args + ["--out", str(out), "--seed", "1"]) == 0  # its own: replaced
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["seed"] == 1
    capsys.readouterr()
    notes = tmp_path / "n.json"
    notes.write_text("my notes")
    assert cli(args + ["--out", str(tmp_path / "n.png")]) == 2
    assert "n.png's settings file" in capsys.readouterr().err and notes.read_text() == "my notes"
    assert not (tmp_path / "n.png").exists()
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a picture of mine")
    assert cli(args + ["--out", str(mine)]) == 2
    assert "exists and is not an earlier grid of ours" in capsys.readouterr().err
    assert mine.read_bytes() == b"a picture of mine" and not mine.with_suffix(".json").exists()
    # a folder where no file can be made, although os.access says root may write anywhere
    assert cli(args + ["--out", "/proc/g.png"]) == 2
    assert "cannot be written (/proc is not writable)" in capsys.readouterr().err


def test_sample_errors(pair, tmp_path, capsys):
    base = ["sample", "--prior", str(pair / "prior"), "--decoder", str(pair / "decoder")]
    assert cli(base + ["--out", str(tmp_path / "x.png")]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert cli(base + ["--prompt", "a red circle", "  ", "--out", str(tmp_path / "x.png")]) == 2
    assert "--prompt 2 of 2 is empty" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    assert cli(base + ["--prompt", "a", "--sampler", "plms", "--out", str(tmp_path / "x.png")]) == 2
    assert "valid: ddim, dpm++" in capsys.readouterr().err
    swapped = ["sample", "--prior", str(pair / "decoder"), "--decoder", str(pair / "prior"), "--prompt", "a"]
    assert cli(swapped + ["--out", str(tmp_path / "x.png")]) == 2
    assert "is a decoder checkpoint, not a prior" in capsys.readouterr().err
    # A decoder trained on another CLIP's store.
    other = tmp_path / "other"
    make_store(other, [64], dim=DIM, n_classes=4, latent_size=16, clip_arch="unclip-tiny", seed=3)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["clip"]["pretrained"] = "/ckpts/another-clip.pt"
    manifest["clip"]["random_init"] = False
    (other / "manifest.json").write_text(json.dumps(manifest))
    main(cfg_for(str(other), tmp_path / "dec2", steps=2, save_every=2, val_fraction=0.0))
    cmd = ["sample", "--prior", str(pair / "prior"), "--decoder", str(tmp_path / "dec2"), "--prompt", "a"]
    assert cli(cmd + ["--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "prior was trained on CLIP unclip-tiny (none, 64-d)" in err and "another-clip.pt" in err
    assert not (tmp_path / "x.png").exists()


def test_two_checkpoints_share_a_clip_checkpoint_file_by_content_where_both_stores_recorded_it():
    from jobs.sample import same_clip

    def meta(pretrained, sha=None, random_init=False, seed=0):
        clip = {
            "arch": "ViT-B-32",
            "dim": 512,
            "pretrained": pretrained,
            "random_init": random_init,
            "seed": seed,
        }
        return {"store": {"clip": {**clip, **({"sha256": sha} if sha else {})}}}

    assert same_clip(meta("/a/clip.pt", "s1"), meta("/moved/clip.pt", "s1"))  # one file, moved
    assert not same_clip(meta("/a/clip.pt", "s1"), meta("/a/clip.pt", "s2"))  # retrained in place
    assert same_clip(meta("/a/clip.pt"), meta("/a/clip.pt", "s1"))  # a store from before digests: by path
    assert not same_clip(meta("/a/clip.pt"), meta("/b/clip.pt", "s1"))
    assert same_clip(meta("none", random_init=True), meta("random", random_init=True))
    assert not same_clip(meta("none", random_init=True, seed=1), meta("none", random_init=True))
    assert not same_clip(meta("openai"), meta("laion2b_s34b_b79k"))


def pair_with_store_clip(pair: Path, tmp_path: Path, **clip) -> list[str]:
    """A copy of ``pair`` whose checkpoints record ``clip`` in their store's CLIP; the `sample` command for it."""
    for task in ("prior", "decoder"):
        shutil.copytree(pair / task, tmp_path / task)
        for meta_file in (tmp_path / task).glob("ckpt/step_*/meta.json"):
            meta = json.loads(meta_file.read_text())
            meta["store"]["clip"].update(clip)
            meta_file.write_text(json.dumps(meta))
    return [
        "sample",
        "--prior",
        str(tmp_path / "prior"),
        "--decoder",
        str(tmp_path / "decoder"),
        "--prompt",
        "a",
    ]


def test_sample_loads_the_stores_clip_checkpoint_by_content_wherever_it_lies(pair, tmp_path, capsys):
    """The store records its CLIP checkpoint's sha256, and the checkpoints trained on it keep it: sampling
    refuses other weights at that path (a CLIP retrained in place made every prompt an embedding the models
    never saw, with exit 0), names a file that is gone, and takes the same file from where it lies now with
    --clip-pretrained."""
    import hashlib

    from pipeline.encoders import _open_clip

    open_clip = _open_clip()  # with unclip-tiny's config added
    torch.manual_seed(5)
    ckpt = tmp_path / "clip" / "tiny5.pt"
    ckpt.parent.mkdir()
    torch.save(open_clip.create_model_and_transforms("unclip-tiny", pretrained=None)[0].state_dict(), ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # as training on a store embedded with that file records it
    cmd = pair_with_store_clip(pair, tmp_path, pretrained=str(ckpt), random_init=False, sha256=digest)
    cmd += ["--n", "1", "--prior-steps", "2", "--decoder-steps", "2", "--out", str(tmp_path / "x.png")]

    moved = tmp_path / "elsewhere.pt"
    ckpt.rename(moved)
    capsys.readouterr()
    assert cli(cmd) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is not at {ckpt}; put that file (sha256 {digest[:12]}...) back there" in err[0]
    assert cli(cmd + ["--clip-pretrained", str(moved)]) == 0 and (tmp_path / "x.png").exists()
    (tmp_path / "x.png").unlink()
    torch.manual_seed(6)  # other weights at the same path
    torch.save(open_clip.create_model_and_transforms("unclip-tiny", pretrained=None)[0].state_dict(), moved)
    capsys.readouterr()
    assert cli(cmd + ["--clip-pretrained", str(moved)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{moved} (sha256 " in err[0]
    assert f"is not the one these models were trained with (sha256 {digest[:12]}...)" in err[0]
    assert cli(cmd + ["--clip-pretrained", "laion2b_s34b_b79k"]) == 2  # a tag for the store's file
    assert "give a checkpoint file of those weights" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_one_clip_name_under_two_open_clips_is_two_clips_where_the_stores_recorded_probes(
    pair, tmp_path, capsys
):
    """A store records what its CLIP embeds a fixed probe as, and its checkpoints keep that: sampling under an
    open_clip that builds another model from the same name embedded every prompt with it, with exit 0."""

    from jobs.sample import checkpoint_clip, same_clip
    from pipeline.encoders import clip_probe, load_clip

    ours, other = (clip_probe(load_clip("unclip-tiny", "none", "cpu", s)) for s in (0, 1))
    clip = {"arch": "unclip-tiny", "dim": 64, "pretrained": "none", "random_init": True, "seed": 0}

    def meta(probe=None):
        return {"store": {"clip": {**clip, **({"probe": probe} if probe else {})}}}

    assert same_clip(meta(ours), meta(dict(ours))) and same_clip(
        meta(ours), meta()
    )  # an older store: by name
    assert not same_clip(meta(ours), meta(other))
    assert checkpoint_clip(meta(ours), "cpu").dim == 64
    cmd = pair_with_store_clip(
        pair, tmp_path, probe=other
    )  # as training on another open_clip's store records it
    capsys.readouterr()
    assert cli(cmd + ["--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "CLIP unclip-tiny (none) here is not the model these checkpoints were trained" in err[0]
    )
    assert "image cosine" in err[0] and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "case, want",
    [
        ("out_is_a_folder", "is a folder; name the file to write"),
        ("out_under_a_file", "a file; give a path in a folder"),
        ("negative_guidance", "--decoder-guidance must be >= 0 (1 = no guidance), got -1.0"),
        ("prompts_not_text", "is not UTF-8 text (byte 0): one prompt a line"),
        ("base_is_a_prior", "--base "),
        ("eval_unknown_sampler", "unknown --sampler 'euler'; valid: ddim, dpm++"),
        ("eval_out_is_a_file", "is a file; give a folder"),
        ("eval_prior_out_is_a_folder", "is a folder; name the file to write"),
        # more steps than the training schedule's 1,000: NaN images with exit 0 (dpm++), a traceback (ddim)
        ("prior_steps_above_schedule", "--prior-steps must be between 1 and 1000"),
        ("decoder_steps_above_schedule", "--decoder-steps must be between 1 and 1000"),
        ("eval_decoder_steps_above_schedule", "--decoder-steps must be between 1 and 1000"),
        ("eval_prior_steps_above_schedule", "--steps must be between 1 and 1000"),
        ("seed_beyond_64_bits", "--seed must be in [0, 2**63)"),
        # it said "trained on latents of shape [3, 16, 16]; ... holds None"
        ("eval_store_without_latents", "has no latents (it was embedded without --latents)"),
        ("eval_out_holds_a_users_file", "eval_decoder.json exists and is not an earlier eval-decoder report"),
    ],
)
def test_sample_and_eval_refuse_before_the_work(case, want, pair, data, tmp_path, capsys):
    """Each refused in one line, exit 2, before any sampling: a bad --out used to fail after all of it."""
    png = tmp_path / "x.png"
    args = ["sample", "--prior", str(pair / "prior"), "--decoder", str(pair / "decoder"), "--prompt", "a"]
    if case == "out_is_a_folder":
        png.mkdir()
    elif case == "out_under_a_file":
        (tmp_path / "f").write_text("mine")
        png = tmp_path / "f" / "x.png"
    elif case == "negative_guidance":
        args += ["--decoder-guidance", "-1"]
    elif case == "prompts_not_text":
        (tmp_path / "p.txt").write_bytes(b"\xff\xfe\x00binary")
        args += ["--prompts", str(tmp_path / "p.txt")]
    elif case == "base_is_a_prior":
        args += ["--base", str(pair / "prior")]
    elif case in ("prior_steps_above_schedule", "decoder_steps_above_schedule"):
        args += ["--" + case.split("_steps")[0] + "-steps", "1001", "--sampler", "dpm++"]
    elif case == "seed_beyond_64_bits":
        args += ["--seed", str(2**64)]
    elif case == "eval_decoder_steps_above_schedule":
        args = ["eval-decoder", "--decoder", str(pair / "decoder"), "--data", data, "--decoder-steps", "1001"]
        png = tmp_path / "ev"
    elif case == "eval_out_holds_a_users_file":
        args = ["eval-decoder", "--decoder", str(pair / "decoder"), "--data", data]
        png = tmp_path / "ev"
        png.mkdir()
        (png / "eval_decoder.json").write_text("mine")
    elif case == "eval_store_without_latents":
        plain = tmp_path / "plain"
        make_store(plain, [16], dim=DIM, n_classes=4, latent_size=0)
        args = ["eval-decoder", "--decoder", str(pair / "decoder"), "--data", str(plain)]
        png = tmp_path / "ev"
    elif case == "eval_prior_steps_above_schedule":
        args = ["eval-prior", "--ckpt", str(pair / "prior"), "--data", data, "--steps", "1001"]
        png = tmp_path / "ev.json"
    elif case.startswith("eval"):
        png = tmp_path / "f"
        png.write_text("mine") if case == "eval_out_is_a_file" else png.mkdir()
        args = ["eval-decoder", "--decoder", str(pair / "decoder"), "--data", data, "--sampler", "euler"]
        if case == "eval_out_is_a_file":
            args[-1] = "ddim"
        elif case == "eval_prior_out_is_a_folder":
            args = ["eval-prior", "--ckpt", str(pair / "prior"), "--data", data]
    assert cli([*args, "--out", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
    if case == "base_is_a_prior":
        assert "is a prior checkpoint, not a decoder" in err[0]
    if case == "eval_out_holds_a_users_file":
        assert (png / "eval_decoder.json").read_text() == "mine"
    mine = ("p.txt", "f", "eval_decoder.json") if case != "eval_store_without_latents" else ()
    made = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in mine]
    assert not [p for p in made if "plain" not in p.parts]


@pytest.mark.parametrize("command", ["eval-prior", "eval-decoder"])
def test_eval_refuses_an_unwritable_default_report_folder_before_the_work(
    command, pair, data, monkeypatch, capsys
):
    """Without --out the report goes beside the checkpoint; a read-only checkpoint folder (a shared one) is refused
    at once, pointing at --out, instead of after the evaluation. (Tests run as root: the refusal is faked.)"""
    import os

    from jobs import checkpoint

    ckpt = pair / ("prior" if command == "eval-prior" else "decoder")
    folder = checkpoint.resolve(str(ckpt))
    before = sorted(p.name for p in folder.iterdir())
    real = os.access
    monkeypatch.setattr("pipeline.store.os.access", lambda p, mode: Path(p) != folder and real(p, mode))
    flag = "--ckpt" if command == "eval-prior" else "--decoder"
    assert cli([command, flag, str(ckpt), "--data", data]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder} is not writable" in err[0] and "pass --out" in err[0], err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_eval_decoder_reports_against_floor_and_ceiling(pair, data, tmp_path, monkeypatch):
    from jobs import eval_decoder

    # reconstructions go in chunks of --batch-size (8 = 3 + 3 + 2), as text -> image does, not all at once
    sizes, decode = [], eval_decoder.decode
    monkeypatch.setattr(eval_decoder, "decode", lambda m, e, *a: sizes.append(len(e)) or decode(m, e, *a))
    args = [
        "eval-decoder",
        "--decoder",
        str(pair / "decoder"),
        "--prior",
        str(pair / "prior"),
        "--data",
        data,
    ]
    assert (
        cli(
            args
            + ["--max-samples", "8", "--decoder-steps", "2", "--prior-steps", "2", "--out", str(tmp_path)]
            + ["--batch-size", "3"]
        )
        == 0
    )
    assert sizes[:3] == [3, 3, 2]
    r = json.loads((tmp_path / "eval_decoder.json").read_text())
    assert r["samples"] == 8
    assert r["settings"]["prior_steps"] == 2 and r["settings"]["prior_candidates"] == 2  # traceable figures
    for key in ("reconstruction", "text_to_image", "ceiling_true_images", "floor_random_pairs"):
        assert -1 <= r[key]["cos"] <= 1 and 0 <= r[key]["top1"] <= 1
    assert r["floor_random_pairs"]["top1"] == 1 / 8
    assert (tmp_path / "eval_decoder.png").exists()


def test_checkpoint_from_another_version_is_a_one_line_error(pair, data, tmp_path, capsys):
    """A decoder whose meta.json names a model field this code does not know (written by another version) is
    refused by sample and eval-decoder in one line naming the field and the writing version, nothing written."""
    import shutil

    dec = tmp_path / "decoder"
    shutil.copytree(pair / "decoder", dec)
    step = checkpoint.resolve(str(dec))
    meta = json.loads((step / "meta.json").read_text())
    meta["model"]["arch"] = "pixart"
    (step / "meta.json").write_text(json.dumps(meta))
    sample = ["sample", "--prior", str(pair / "prior"), "--decoder", str(dec), "--prompt", "a"]
    assert cli(sample + ["--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "decoder config cannot be built by this code" in err and "'arch'" in err
    assert f"unclip-pipeline {meta['version']['package']}" in err and "Traceback" not in err
    assert cli(["eval-decoder", "--decoder", str(dec), "--data", data, "--out", str(tmp_path / "ev")]) == 2
    assert "decoder config cannot be built" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "ev").exists()


def test_two_stage_decoder_base_at_lower_resolution_then_image_to_image(pair, data, tmp_path, capsys):
    """`--resolution 8` trains on the 16 px latents area-pooled to 8 x 8; `sample --base` draws the base's
    picture, upsamples it and lets the decoder redraw the last `strength` of its steps: at a small strength the
    final picture is the base's, upsampled. Mismatched stages and bad settings are one-line errors."""
    import torch.nn.functional as F

    from jobs.sample import attach_base, decode, decode_steps, load_models, text_to_image_steps

    main(cfg_for(data, tmp_path / "base", preset="tiny-base", resolution=8, steps=4, save_every=4))
    meta = checkpoint.read_meta(checkpoint.resolve(tmp_path / "base"))
    assert meta["model"]["latent_size"] == 8 and meta["store"]["latents"]["shape"] == [3, 16, 16]
    # the first-stage preset without --resolution trains at its own 8 x 8, not the store's 16 (hours on the demo)
    main(cfg_for(data, tmp_path / "base_own", preset="tiny-base", steps=1, save_every=1))
    assert checkpoint.read_meta(checkpoint.resolve(tmp_path / "base_own"))["model"]["latent_size"] == 8
    m = attach_base(load_models(str(pair / "prior"), str(pair / "decoder"), "cpu"), str(tmp_path / "base"))
    emb = torch.randn(4, DIM, generator=torch.Generator().manual_seed(0))
    cfg = SampleConfig(prior="", decoder="", decoder_steps=25, strength=0.04)
    low = m.base.sample(emb, steps=25, generator=torch.Generator().manual_seed(5))
    steps = []  # a progress bar's: every network step of both stages, as many as its total counts
    out = decode(m, emb, cfg, torch.Generator().manual_seed(5), lambda: steps.append(1))  # the base's draws
    assert len(steps) == decode_steps(m, cfg) == 25 + 1  # the base's 25, the decoder's int(25 * 0.04)
    assert low.shape == (4, 3, 8, 8) and out.shape == (4, 3, 16, 16)
    up = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    alone = m.decoder.sample(emb, steps=25, generator=torch.Generator().manual_seed(5))
    assert (out - up).abs().mean() < 0.2 * (alone - up).abs().mean()
    kw = dict(prior=str(pair / "prior"), decoder=str(pair / "decoder"), prompt=["a red circle"], n=2)
    capsys.readouterr()
    sc = SampleConfig(
        out=str(tmp_path / "a.png"), base=str(tmp_path / "base"), device="cpu", batch_size=1, **kw
    )
    r = sample_run(sc)
    assert r["base_step"] == 4 and r["settings"]["strength"] == 0.5
    total = text_to_image_steps(m, sc, 2)  # 2 batches of the prior's steps, the base's and half the decoder's
    assert total == 2 * (sc.prior_steps + sc.decoder_steps + sc.decoder_steps // 2)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("sample: 100%") and f"| {total}/{total} [" in line for line in bar), bar[-3:]
    assert (tmp_path / "a.png").stat().st_size > 500
    args = ["sample", "--prior", str(pair / "prior"), "--decoder", str(pair / "decoder"), "--prompt", "a"]
    assert (
        cli(args + ["--base", str(tmp_path / "base"), "--strength", "0", "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert "--strength must be in (0, 1]" in capsys.readouterr().err
    # without --base it would change nothing: refused, not recorded as if it had been used
    assert cli(args + ["--strength", "0.3", "--out", str(tmp_path / "y.png")]) == 2
    assert (
        "--strength is the share of the decoder's steps that redraw --base's picture"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "y.png").exists()
    # a base trained at a side that does not divide the decoder's: 16 px base under an 8 px "decoder"
    bad = args[:4] + [str(tmp_path / "base")] + ["--base", str(pair / "decoder"), "--prompt", "a"]
    assert cli(bad + ["--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "do not upsample to --decoder's 3x8x8" in err
    assert cli(["train-decoder", "--data", data, "--out", str(tmp_path / "r"), "--resolution", "5"]) == 2
    assert "--resolution 5 must divide the store's latent side 16" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "r").exists()
    ev = [
        "eval-decoder",
        "--decoder",
        str(pair / "decoder"),
        "--data",
        data,
        "--base",
        str(tmp_path / "base"),
    ]
    assert cli(ev + ["--max-samples", "4", "--decoder-steps", "2", "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev/eval_decoder.json").read_text())
    assert report["base_step"] == 4 and report["settings"]["strength"] == 0.5  # recorded as used (was null)
    # the 8 px first stage evaluated alone: its 8 x 8 pictures in the grid beside the 16 x 16 true ones (was a
    # numpy concatenate traceback, the report written without its picture)
    alone = ["eval-decoder", "--decoder", str(tmp_path / "base"), "--data", data, "--max-samples", "4"]
    assert cli(alone + ["--decoder-steps", "2", "--out", str(tmp_path / "ev8")]) == 0
    from PIL import Image

    assert (
        Image.open(tmp_path / "ev8/eval_decoder.png").size
        == Image.open(tmp_path / "ev/eval_decoder.png").size
    )


def test_resume_of_a_checkpoint_from_before_a_setting_existed(data, tmp_path):
    """A run checkpointed by a version without `--resolution` resumes: the missing setting counts as its
    default. Another value of it is still refused."""
    main(cfg_for(data, tmp_path, steps=4, stop_after=2, save_every=2))
    meta_path = checkpoint.resolve(tmp_path) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["resolution"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="model config differs from this run.s in latent_size"):
        main(cfg_for(data, tmp_path, steps=4, save_every=2, resume=True, resolution=8))
    assert main(cfg_for(data, tmp_path, steps=4, save_every=2, resume=True))["start_step"] == 2


def test_prior_candidates_keep_the_draw_nearest_the_prompt(pair, capsys, tmp_path):
    """--prior-candidates K: K prior draws per prompt, the one with the highest cosine to the prompt's text
    embedding kept (DALL-E 2's n = 2)."""
    from jobs.sample import load_models, prior_embeddings, text_conditions

    m = load_models(str(pair / "prior"), str(pair / "decoder"), "cpu")
    prompts = [
        f"a {c} circle on a {b} background" for c in ("red", "blue", "green") for b in ("black", "white")
    ]
    cfg = SampleConfig(prior="", decoder="", prior_steps=3, prior_candidates=3)
    chosen = prior_embeddings(m, prompts, cfg, torch.Generator().manual_seed(5))
    txt, _, _ = text_conditions(m.clip, prompts, False)
    draws = m.prior.sample(
        txt.repeat_interleave(3, 0), steps=3, sampler="dpm++", generator=torch.Generator().manual_seed(5)
    ).view(6, 3, -1)
    cos = torch.einsum("bkd,bd->bk", draws, txt)
    best = cos.argmax(1)
    assert torch.equal(chosen, draws[torch.arange(6), best])
    assert best.tolist() != [0] * 6  # the choice is not the first draw every time
    assert (cos.max(1).values >= cos[:, 0]).all() and cos.max(1).values.mean() > cos[:, 0].mean()
    one = prior_embeddings(
        m,
        prompts,
        SampleConfig(prior="", decoder="", prior_steps=3, prior_candidates=1),
        torch.Generator().manual_seed(5),
    )
    assert torch.equal(
        one, m.prior.sample(txt, steps=3, sampler="dpm++", generator=torch.Generator().manual_seed(5))
    )
    cmd = ["sample", "--prior", str(pair / "prior"), "--decoder", str(pair / "decoder"), "--prompt", "a"]
    assert cli(cmd + ["--prior-candidates", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "--prior-candidates must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_eval_decoder_dequantises_with_the_data_stores_own_range(pair, data, tmp_path):
    """Another store of the same codec fits its own lo/hi (a VAE's range is fitted on each store's first
    images): eval-decoder reads --data's uint8 latents back with --data's range, not the one the decoder was
    trained with, else every latent it scores is shifted and scaled."""
    import shutil

    from jobs.eval_decoder import EvalDecoderConfig, _held_out

    other = tmp_path / "other"
    shutil.copytree(data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["latents"]["lo"], manifest["latents"]["hi"] = [-2.0, -0.5, 0.0], [2.0, 0.5, 3.0]
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = dict(decoder=str(pair / "decoder"), max_samples=8)
    ours, rows = _held_out(EvalDecoderConfig(data=data, **cfg), ("latents",))
    theirs, rows_other = _held_out(EvalDecoderConfig(data=str(other), **cfg), ("latents",))
    assert rows == rows_other and len(rows) == 8
    q = (ours["latents"] + 1) / 2  # back to [0, 1] from the trained store's [-1, 1]
    lo = torch.tensor([-2.0, -0.5, 0.0]).view(1, 3, 1, 1)
    hi = torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(theirs["latents"], lo + q * (hi - lo), atol=1e-5, rtol=0)
    assert not torch.allclose(theirs["latents"], ours["latents"])


def test_a_resume_may_name_the_value_the_checkpoints_default_resolved_to(data, tmp_path):
    """--snr-shift 4 where the preset's 4 was used, --resolution 16 on a 16 px store: the same network and the
    same run, which a resume refused as "other settings than the checkpoint's". Another value is refused."""
    main(cfg_for(data, tmp_path, steps=6, stop_after=2, save_every=2))
    with pytest.raises(UsageError, match="model config differs from this run.s in snr_shift"):
        main(cfg_for(data, tmp_path, steps=6, save_every=2, resume=True, snr_shift=3.0))
    same = dict(snr_shift=4.0, guidance_scale=1.0, resolution=16)
    assert (
        main(cfg_for(data, tmp_path, steps=6, stop_after=4, save_every=2, resume=True, **same))["start_step"]
        == 2
    )
    # and the next resume, with the defaults again, goes on as well
    assert main(cfg_for(data, tmp_path, steps=6, save_every=2, resume=True))["start_step"] == 4


def test_eval_decoder_files_its_report_under_the_step_it_evaluated(pair, data, tmp_path, monkeypatch):
    """A training still going wrote a newer step and pointed `latest` at it mid-evaluation: the report went
    into the newer step's folder with the older step's figures."""
    import shutil

    from jobs import eval_decoder

    run = tmp_path / "decoder"
    shutil.copytree(pair / "decoder", run)
    first = checkpoint.resolve(run)
    embed = eval_decoder.clip_image_embeddings

    def training_moves_on(*a):
        if not (run / "ckpt/step_00000008").exists():
            shutil.copytree(first, run / "ckpt/step_00000008")
            (run / "ckpt/latest").write_text("step_00000008")
        return embed(*a)

    monkeypatch.setattr(eval_decoder, "clip_image_embeddings", training_moves_on)
    args = [
        "eval-decoder",
        "--decoder",
        str(run),
        "--data",
        data,
        "--max-samples",
        "4",
        "--decoder-steps",
        "2",
    ]
    assert cli(args) == 0
    assert json.loads((first / "eval_decoder.json").read_text())["decoder_step"] == 4
    assert not (run / "ckpt/step_00000008/eval_decoder.json").exists()


def test_a_refusal_after_the_checkpoints_are_read_is_one_line_on_a_real_stderr(pair, data, tmp_path):
    """The refusals above are one line to capsys, but the CLI's log handler printed open_clip's seven INFO lines
    and its random-weights warning first: steps beyond the schedule, a prior given as --base and a store of
    another CLIP were refused below 11 lines of model building. (A subprocess: its stderr is the user's.)"""
    import subprocess
    import sys

    other = tmp_path / "other"
    make_store(other, [16], dim=32, n_classes=4, latent_size=16, clip_arch="unclip-tiny")
    sample = ["sample", "--prior", str(pair / "prior"), "--decoder", str(pair / "decoder"), "--prompt", "a"]
    for args, want in (
        ([*sample, "--prior-steps", "1001"], "--prior-steps must be between 1 and 1000"),
        ([*sample, "--base", str(pair / "prior")], "is a prior checkpoint, not a decoder"),
        (
            ["eval-decoder", "--decoder", str(pair / "decoder"), "--data", str(other)],
            "the checkpoint was trained on 64-d CLIP embeddings (unclip-tiny)",
        ),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *args, "--out", str(tmp_path / "x.png")],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and want in r.stderr, r.stderr
