"""`unclip export --prior`: a prior and its CLIP become a diffusers `KandinskyV22PriorPipeline` that loads offline
and equals our prior (tiny random models with fixed seeds, saved to disk first; no hub)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs import checkpoint
from jobs import export_prior as ep
from jobs.cli import main

pytest.importorskip("transformers")  # the export extra; `make install` installs it

ARCH = "unclip-export-test"  # text width == embedding width, as the Kandinsky prior pipeline needs
CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CAPTIONS = ["a red circle at the top left", "A Blue square, in the center!", "green", ""]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from pipeline.encoders import _open_clip, load_clip

    d = tmp_path_factory.mktemp("clipcfg")
    (d / f"{ARCH}.json").write_text(json.dumps(CLIP_CFG))
    _open_clip().add_model_config(d)
    return load_clip(ARCH, "none", "cpu", 0)


def random_prior(**overrides):
    from models.prior import DiffusionPrior, PriorConfig

    torch.manual_seed(0)
    base = {"emb_dim": 64, "dim": 256, "depth": 2, "heads": 4, "head_dim": 64, "text_enc_dim": 64}
    cfg = PriorConfig(**{**base, **overrides})
    prior = DiffusionPrior(cfg).eval()
    with torch.no_grad():  # make every parameter matter (the query, positions and null token start tiny)
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return prior


def save_prior(root: Path, prior) -> Path:
    meta = {
        "task": "prior",
        "config": {},
        "model": dataclasses.asdict(prior.cfg),
        "stream_step": 3,
        "world_size": 1,
        "store": {
            "clip": {"arch": ARCH, "pretrained": "none", "random_init": True, "seed": 0, "dim": 64},
            "latents": None,
            "text_enc": {"width": 64},
        },
    }
    checkpoint.save(root / "ckpt", 3, prior, prior, {}, meta)
    return root


def text_inputs(clip, captions):
    """Our prior's inputs for captions: unit-norm text embeddings, per-token encodings, mask."""
    from pipeline.encoders import encode_text

    emb, enc, lengths = encode_text(clip, clip.tokenizer(captions), with_tokens=True)
    mask = torch.arange(enc.shape[1])[None] < lengths[:, None]
    return emb, enc, mask, lengths


def test_converted_prior_equals_ours_on_the_same_inputs():
    prior = random_prior()
    pt = ep.prior_transformer(prior, context_length=16)
    g = torch.Generator().manual_seed(1)
    b, d = 5, 64
    x_t = torch.randn(b, d, generator=g) * 3
    t = torch.tensor([0, 1, 250, 600, 999])
    e = torch.randn(b, d, generator=g) * 7  # an unnormalised text embedding, as a text tower gives it
    enc = torch.randn(b, 16, d, generator=g)
    mask = torch.arange(16)[None] < torch.tensor([2, 16, 5, 9, 1])[:, None]
    folded = (
        ep.TEXT_EMBED_SCALE * e.double() @ ep.zero_sum_isometry(d).T
    )  # what the exported text tower emits
    with torch.no_grad():
        want = prior.net(x_t, t, F.normalize(e, dim=-1), enc, mask)
        got = pt(x_t, t, proj_embedding=folded.float(), encoder_hidden_states=enc, attention_mask=mask)
    got = got.predicted_image_embedding
    assert want.abs().mean() > 0.1
    assert (got - want).abs().max().item() <= 1e-5
    out = pt.post_process_latents(want)
    assert torch.allclose(out, want / prior.cfg.embed_scale)


def test_towers_and_tokenizer_equal_open_clip(clip):
    from pipeline.encoders import encode_image

    tok = ep.tokenizer(clip.tokenizer, 16)
    ids = tok(CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    want_ids = clip.tokenizer(CAPTIONS)
    real = ids.attention_mask.bool()
    assert torch.equal(real.sum(1), (want_ids != 0).sum(1))  # same lengths, end-of-text included
    assert torch.equal(ids.input_ids[real], want_ids[want_ids != 0])
    emb, enc, mask, _ = text_inputs(clip, CAPTIONS)
    text = ep.text_tower(clip.model, 64)
    with torch.no_grad():
        out = text(ids.input_ids)
    assert (out.last_hidden_state[:, : enc.shape[1]][mask] - enc[mask]).abs().max() <= 1e-5
    assert (ep.open_clip_text_embeds(out.text_embeds) - emb).abs().max() <= 1e-5
    assert out.text_embeds.sum(-1).abs().max() <= 1e-2 * out.text_embeds.abs().max()  # coordinates sum to 0
    vision = ep.vision_tower(clip.model)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = vision(pixel_values=images).image_embeds
    assert (got - encode_image(clip, images)).abs().max() <= 1e-5


def test_exported_pipeline_at_guidance_1_equals_our_prior(clip, tmp_path):
    from diffusers import DiffusionPipeline

    prior = random_prior()
    run = save_prior(tmp_path / "run", prior)
    assert main(["export", "--prior", str(run), "--out", str(tmp_path / "out")]) == 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out" / "prior")
    assert type(pipe).__name__ == "KandinskyV22PriorPipeline"
    prompts = CAPTIONS[:3]
    got = pipe(
        prompts, num_inference_steps=6, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)
    ).image_embeds

    emb, enc, mask, _ = text_inputs(clip, prompts)  # ours: the same scheduler, the same noise draws
    sched = ep.scheduler(prior.cfg.timesteps)
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(prompts), 64, generator=g)
    steps = sched.timesteps
    with torch.no_grad():
        for i, t in enumerate(steps):
            x0 = prior.net(x, t.expand(len(prompts)), F.normalize(emb, dim=-1), enc, mask)
            prev = steps[i + 1] if i + 1 < len(steps) else None
            x = sched.step(x0, timestep=t, sample=x, generator=g, prev_timestep=prev).prev_sample
    want = x / prior.cfg.embed_scale
    assert got.shape == (3, 64)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got[0] - got[1]).abs().max() > 1e-3  # different prompts, different embeddings


@pytest.mark.parametrize(
    "overrides, want",
    [
        ({"dim": 128, "heads": 4, "head_dim": 32}, "must be a multiple of 256"),
        ({"heads": 8, "head_dim": 64}, "heads x head_dim (8 x 64) must equal the width 256"),
        ({"text_enc_dim": 0}, "no text encodings; the pipeline needs per-token text encodings"),
        ({"ff_mult": 2}, "the MLP must be 4x the width"),
    ],
)
def test_presets_that_do_not_map_are_refused_in_one_line(overrides, want, clip, tmp_path, capsys):
    run = save_prior(tmp_path / "run", random_prior(**overrides))
    out = tmp_path / "out"
    assert main(["export", "--prior", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_a_prior_export_is_the_same_bytes_whatever_the_callers_random_state(clip, tmp_path):
    run = save_prior(tmp_path / "run", random_prior())
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outs.append(tmp_path / f"out{seed}")
        assert main(["export", "--prior", str(run), "--out", str(outs[-1])]) == 0
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert len(files) > 5
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_the_fold_is_an_isometry_onto_zero_sum_vectors():
    q = ep.zero_sum_isometry(7)
    assert q.shape == (8, 7)
    assert np.allclose((q.T @ q).numpy(), np.eye(7), atol=1e-12)
    assert np.allclose(q.sum(0).numpy(), 0, atol=1e-12)


def _pair(tmp_path):
    """A prior and a decoder (on a tiny random VAE) recorded as trained on the same CLIP."""
    from tests.test_embed import tiny_vae
    from tests.test_export import tiny_decoder_checkpoint

    prior_run = save_prior(tmp_path / "prior_run", random_prior())
    dec_run, _ = tiny_decoder_checkpoint(tmp_path / "dec_run", tiny_vae(tmp_path / "vae"))
    meta_path = checkpoint.resolve(dec_run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["store"]["clip"] = json.loads((checkpoint.resolve(prior_run) / "meta.json").read_text())["store"][
        "clip"
    ]
    meta_path.write_text(json.dumps(meta))
    return prior_run, dec_run


def test_a_pair_whose_prior_cannot_be_loaded_writes_neither(clip, tmp_path, capsys):
    """The decoder was written first and the prior refused after it: a decoder alone in OUT, or, with
    --overwrite, beside another CLIP's prior."""
    prior_run, dec_run = _pair(tmp_path)
    ema = checkpoint.resolve(prior_run) / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    out = tmp_path / "out"
    assert main(["export", "--prior", str(prior_run), "--decoder", str(dec_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ema.safetensors" in err[0] and "cannot be read as safetensors" in err[0], err
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def test_a_pair_export_reports_each_step_and_an_overwrite_swaps_whole_folders(clip, tmp_path, capsys):
    prior_run, dec_run = _pair(tmp_path)
    out = tmp_path / "out"
    args = ["export", "--prior", str(prior_run), "--decoder", str(dec_run), "--out", str(out)]
    assert main(args) == 0
    from jobs.export import ExportConfig, run

    report = run(
        ExportConfig(out=str(out), prior=str(prior_run), decoder=str(dec_run))
    )  # the same checkpoints
    assert report["prior_step"] == 3 and report["decoder_step"] == 3 and "step" not in report
    assert report["prior"] == str(out / "prior") and report["decoder"] == str(out / "decoder")
    # killed between the two renames of an overwrite: OUT/decoder gone, the earlier export at .decoder.old
    decoder_files = {p.relative_to(out): p.read_bytes() for p in (out / "decoder").rglob("*") if p.is_file()}
    (out / "decoder").rename(out / ".decoder.old")
    (out / ".decoder.tmp").mkdir()
    (out / ".decoder.tmp/half.bin").write_bytes(b"cut short")
    # another checkpoint without --overwrite: refused, as it would be with the earlier export in place, which
    # is put back whole (it was deleted by this export's swap)
    shutil.copytree(dec_run, tmp_path / "dec_run2")
    capsys.readouterr()
    assert main(["export", "--decoder", str(tmp_path / "dec_run2"), "--out", str(out)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert {
        p.relative_to(out): p.read_bytes() for p in (out / "decoder").rglob("*") if p.is_file()
    } == decoder_files
    assert main(["export", "--decoder", str(dec_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["decoder", "prior"]
    assert {
        p.relative_to(out): p.read_bytes() for p in (out / "decoder").rglob("*") if p.is_file()
    } == decoder_files
