"""`unclip export`: a decoder trained on VAE latents becomes a diffusers `KandinskyV22Pipeline` that loads offline
and draws the same images as our own sampler (tiny random models saved to disk first; no hub)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import checkpoint
from jobs.cli import main
from pipeline.errors import UsageError
from tests.test_embed import tiny_vae

pytest.importorskip("transformers")  # the export extra; `make install` installs it


def tiny_decoder_checkpoint(
    root: Path, vae_dir: Path | None, codec: str = "vae", space_to_depth: int = 1, vae_digest: str = ""
) -> tuple[Path, object]:
    """A randomly initialised decoder (seed 0) saved the way train-decoder saves one, for a VAE-latents store."""
    from models.decoder import DiffusionDecoder, decoder_config

    torch.manual_seed(0)
    cfg = decoder_config(
        "tiny",
        emb_dim=16,
        latent_channels=4,
        latent_size=8,
        space_to_depth=space_to_depth,
        widths=(32, 64),
        guidance_scale=1.0,
    )
    dec = DiffusionDecoder(cfg).eval()
    with torch.no_grad():  # zero-initialised output layers would make every sample the same: randomise them
        for p in dec.unet.conv_out.parameters():
            p.normal_(0, 0.05)
    latents = (
        {"codec": "vae", "vae": str(vae_dir), "scale": 0.18215, "shape": [4, 8, 8], "image_size": 16}
        if codec == "vae"
        else {"codec": "pixels", "shape": [3, 32, 32], "image_size": 32}
    )
    if vae_digest:  # as stores record it since 2026-12-05
        latents["sha256"] = vae_digest
    meta = {
        "task": "decoder",
        "config": {},
        "model": dataclasses.asdict(cfg),
        "stream_step": 3,
        "world_size": 1,
        "store": {"clip": {"arch": "synthetic", "dim": 16}, "latents": latents, "text_enc": None},
    }
    checkpoint.save(root / "ckpt", 3, dec, dec, {}, meta)
    return root, dec


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    vae_dir = tiny_vae(d / "vae")
    run, dec = tiny_decoder_checkpoint(d / "run", vae_dir)
    assert main(["export", "--decoder", str(run), "--out", str(d / "out")]) == 0
    return d, vae_dir, dec


def test_movq_decode_equals_the_vae_decode_of_the_dequantised_latents(exported):
    from diffusers import AutoencoderKL, VQModel

    d, vae_dir, _ = exported
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    movq = VQModel.from_pretrained(d / "out" / "decoder" / "movq").eval()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 2  # model-scale latents
    with torch.no_grad():
        want = vae.decode(x / vae.config.scaling_factor).sample
        got = movq.decode(x, force_not_quantize=True).sample
    assert want.shape == (3, 3, 16, 16)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_exported_pipeline_draws_the_images_unclip_draws(exported, guidance):
    from diffusers import DiffusionPipeline

    from pipeline.encoders import load_vae, vae_decode

    d, vae_dir, dec = exported
    pipe = DiffusionPipeline.from_pretrained(d / "out" / "decoder")
    assert type(pipe).__name__ == "KandinskyV22Pipeline"
    emb = torch.nn.functional.normalize(
        torch.randn(2, 16, generator=torch.Generator().manual_seed(2)), dim=-1
    )
    images = pipe(
        image_embeds=emb,
        negative_image_embeds=torch.zeros_like(emb),
        height=16,
        width=16,
        num_inference_steps=6,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images  # [B, H, W, 3] in [0, 1]
    lat = dec.sample(
        emb, steps=6, sampler="ddim", guidance_scale=guidance, generator=torch.Generator().manual_seed(0)
    )
    ours = (
        (vae_decode(load_vae(str(vae_dir), "cpu"), lat) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    )
    assert images.shape == (2, 16, 16, 3)
    assert np.abs(images - ours).max() <= 1e-4
    assert np.abs(images[0] - images[1]).max() > 1e-3  # different embeddings, different pictures


@pytest.mark.parametrize(
    "case, want",
    [
        ("pixels_codec", "only 'vae' decoders export to KandinskyV22Pipeline"),
        # a tiny-preset decoder on VAE latents: exported, its pipeline crashed (16 channels for a 4-channel UNet)
        ("folded_latents", "folds 2 x 2 latent blocks into channels (space_to_depth 2"),
        ("prior_given", "is a decoder checkpoint, not a prior"),
        ("exists", "step 999); pass --overwrite to replace it"),
        ("overwrite_a_run", "is not an earlier export (no readable unclip_export.json in it)"),
        ("out_is_a_file", "is a file; give a folder"),
        ("out_under_a_file", "lies under"),
        # exported alone into an OUT whose prior came from another CLIP: the pair would not work together
        ("partner_of_another_clip", "is an export of a prior trained on CLIP ViT-B-32 (openai, 512-d)"),
        # an earlier export linked there: the write failed after the whole export, a temp folder left behind
        (
            "decoder_is_a_link",
            "decoder is a link, and the export writes a folder there; choose another --out",
        ),
        # silently ignored: the decoder's pipeline has no CLIP
        ("clip_pretrained_without_prior", "--clip-pretrained /no/clip.pt: the CLIP is the prior's"),
    ],
)
def test_refusals_are_one_line(case, want, exported, tmp_path, capsys):
    d = exported[0]
    run, out = d / "run", tmp_path / "out"
    args = ["export", "--decoder", str(run), "--out", str(out)]
    if case == "pixels_codec":
        run, _ = tiny_decoder_checkpoint(tmp_path / "pix", None, codec="pixels")
        args[2] = str(run)
    elif case == "folded_latents":
        run, _ = tiny_decoder_checkpoint(tmp_path / "fold", d / "vae", space_to_depth=2)
        args[2] = str(run)
    elif case == "prior_given":
        args += ["--prior", str(run)]
    elif (
        case == "overwrite_a_run"
    ):  # `--decoder runs/decoder --out runs --overwrite`: the run itself is OUT/decoder
        (out / "decoder").mkdir(parents=True)
        (out / "decoder/notes.txt").write_text("mine")
        args += ["--overwrite"]
    elif case == "out_is_a_file":
        out.write_text("mine")
    elif case == "out_under_a_file":
        out.write_text("mine")
        args[4] = str(out / "sub")
    elif case == "partner_of_another_clip":
        (out / "prior").mkdir(parents=True)
        clip = {"arch": "ViT-B-32", "pretrained": "openai", "dim": 512, "random_init": False}
        (out / "prior/unclip_export.json").write_text(
            json.dumps({"source_checkpoint": "p", "step": 1, "clip": clip})
        )
    elif case == "decoder_is_a_link":
        shutil.copytree(d / "out", tmp_path / "real")
        out.mkdir()
        (out / "decoder").symlink_to(tmp_path / "real/decoder")
    elif case == "clip_pretrained_without_prior":
        args += ["--clip-pretrained", "/no/clip.pt"]
    else:  # an export of another step of the run is there
        shutil.copytree(d / "out", out)
        note = json.loads((out / "decoder/unclip_export.json").read_text())
        (out / "decoder/unclip_export.json").write_text(json.dumps({**note, "step": 999}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if case == "exists" else None
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
    if case == "overwrite_a_run":
        assert sorted(p.name for p in out.rglob("*")) == ["decoder", "notes.txt"]
    elif case in ("out_is_a_file", "out_under_a_file"):
        assert out.read_text() == "mine"
    elif case == "exists":
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    elif case == "partner_of_another_clip":
        assert [p.name for p in out.iterdir()] == ["prior"]
    elif case == "decoder_is_a_link":
        assert [p.name for p in out.iterdir()] == ["decoder"] and (out / "decoder").is_symlink()
    else:
        assert not out.exists()


def test_the_decoders_vae_is_checked_by_its_content_and_found_where_it_moved_with_vae(
    exported, tmp_path, capsys
):
    """A VAE rewritten in place exported (and sampled) its new decoder with the old latents' UNet, without a
    word. Refused in one line before anything is written; `--vae` takes the folder where it lies now."""
    from types import SimpleNamespace

    from jobs.sample import check_vae
    from pipeline.encoders import vae_sha256

    vae_dir = tiny_vae(tmp_path / "vae")  # the module's VAE (seed 0), at a folder of this test's own
    digest = vae_sha256(str(vae_dir))
    run, _ = tiny_decoder_checkpoint(tmp_path / "run", vae_dir, vae_digest=digest)
    moved = tmp_path / "moved"
    shutil.copytree(vae_dir, moved)
    time.sleep(0.01)  # another mtime, as a real rewrite has
    tiny_vae(vae_dir, seed=1)
    out = tmp_path / "out"
    assert main(["export", "--decoder", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (
        f"is not the one the store's latents were made with (sha256 {digest[:12]}...); pass that VAE's folder "
        "with --vae" in err[0]
    ), err
    assert not out.exists()
    assert main(["export", "--decoder", str(run), "--out", str(out), "--vae", str(moved)]) == 0
    movq = "decoder/movq/diffusion_pytorch_model.safetensors"
    assert (out / movq).read_bytes() == (exported[0] / "out" / movq).read_bytes()  # the first VAE's decoder
    assert main(["export", "--prior", str(run), "--out", str(tmp_path / "o"), "--vae", str(moved)]) == 2
    assert "the VAE is the decoder's; pass --decoder DIR with it" in capsys.readouterr().err
    # eval-decoder --data: a held-out store of another codec or VAE is refused (its latents decode otherwise)
    meta = {"store": {"clip": {"dim": 16}, "latents": {"codec": "vae", "shape": [4, 8, 8], "sha256": digest}}}
    theirs = {"clip": {"dim": 16}, "latents": {"codec": "vae", "shape": [4, 8, 8]}}
    checkpoint.check_store(meta, theirs, "other", latents=True)  # a store made before digests: by its shape
    with pytest.raises(UsageError, match=r"other holds latents of another one \(sha256 bbbbbbbbbbbb...\)"):
        checkpoint.check_store(
            meta, {**theirs, "latents": {**theirs["latents"], "sha256": "b" * 64}}, "other", True
        )
    with pytest.raises(UsageError, match="trained on 'vae' latents; other holds 'pixels' ones"):
        checkpoint.check_store(
            meta, {**theirs, "latents": {"codec": "pixels", "shape": [4, 8, 8]}}, "other", True
        )
    pixels = SimpleNamespace(decoder_meta={"store": {"latents": {"codec": "pixels"}}})
    with pytest.raises(
        UsageError, match="--vae x: the decoder was trained on 'pixels' latents, which need no VAE"
    ):
        check_vae(pixels, "x")


def test_a_two_stage_decoders_stages_are_compared_by_their_vaes_content(exported, tmp_path, monkeypatch):
    """`sample --base` compared the two stores' codec descriptions whole: stages of two VAEs were refused as
    latents that "do not upsample", and a store made before digests as another codec."""
    from jobs import sample

    monkeypatch.setattr(sample, "same_clip", lambda a, b: True)  # these checkpoints name no real CLIP
    vae_dir = exported[1]
    runs = {k: tiny_decoder_checkpoint(tmp_path / k, vae_dir, vae_digest=k * 64)[0] for k in ("a", "b")}
    runs["old"] = tiny_decoder_checkpoint(tmp_path / "old", vae_dir)[0]  # its store recorded no digest
    decoder, meta = sample.load_decoder(str(runs["a"]), "cpu")
    m = sample.Models(None, decoder, None, {}, meta, "cpu")
    with pytest.raises(
        UsageError,
        match=r"--base was trained on latents of the VAE with sha256 bbbbbbbbbbbb\.\.\. and --decoder on another "
        r"one's \(aaaaaaaaaaaa\.\.\.\)",
    ):
        sample.attach_base(m, str(runs["b"]))
    assert sample.attach_base(m, str(runs["old"])).base is not None


def test_an_interrupted_exports_rerun_is_the_same_command(exported, tmp_path):
    """Ctrl-C says "rerun the same command": the checkpoint's own export already in place (the first of two
    folders) is redone without --overwrite, and the interrupted one's temporary folder goes."""
    d = exported[0]
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    (out / ".decoder.tmp").mkdir()
    (out / ".decoder.tmp/half.bin").write_bytes(b"cut short")
    assert main(["export", "--decoder", str(d / "run"), "--out", str(out)]) == 0
    assert not (out / ".decoder.tmp").exists()
    for f in (d / "out/decoder").rglob("*"):
        if f.is_file():
            assert (out / "decoder" / f.relative_to(d / "out/decoder")).read_bytes() == f.read_bytes(), f


def test_an_export_into_a_folder_another_export_is_writing_is_refused(exported, tmp_path, capsys):
    """Both wrote through OUT/.decoder.tmp: one deleted the other's half-written folder, or renamed a mix of
    the two into place."""
    from pipeline import store

    d = exported[0]
    out = tmp_path / "out"
    with store.hold_folder(out):
        capsys.readouterr()
        assert main(["export", "--decoder", str(d / "run"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {out} is in use: another unclip command" in err[0], err
        assert list(out.iterdir()) == []


def test_an_export_is_the_same_bytes_whatever_the_callers_random_state(exported, tmp_path):
    """The movq's parts the VAE lacks (encoder, codebook) were drawn from the global generator: a rerun's export
    differed from the first with whatever had run before it."""
    d = exported[0]
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outs.append(tmp_path / f"out{seed}")
        assert main(["export", "--decoder", str(d / "run"), "--out", str(outs[-1])]) == 0
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert any(f.name == "diffusion_pytorch_model.safetensors" and "movq" in f.parts for f in files)
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_overwrite_replaces_an_earlier_export(exported, tmp_path):
    d = exported[0]
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    (out / "decoder/stale.txt").write_text("from the earlier export")
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--decoder", str(d / "run"), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "decoder/stale.txt").exists() and (out / "decoder/unclip_export.json").is_file()
    assert (out / "keep.txt").read_text() == "mine"


def test_the_same_typed_path_from_another_folder_is_another_checkpoint(
    exported, tmp_path, monkeypatch, capsys
):
    """`--decoder run` typed in two folders names two runs: the second must not replace the first's export."""
    d = exported[0]
    out = tmp_path / "out"
    shutil.copytree(d / "run", tmp_path / "elsewhere" / "run")
    monkeypatch.chdir(d)
    assert main(["export", "--decoder", "run", "--out", str(out)]) == 0
    assert main(["export", "--decoder", "run", "--out", str(out)]) == 0  # the same run: redone
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["export", "--decoder", "run", "--out", str(out)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err


def test_a_vae_without_mid_block_attention_becomes_a_movq_without_it(tmp_path):
    from diffusers import AutoencoderKL

    from jobs.export import movq_from_vae

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
    ).eval()
    movq = movq_from_vae(vae).eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        want = vae.decode(x / vae.config.scaling_factor).sample
        got = movq.decode(x, force_not_quantize=True).sample
    assert (got - want).abs().max().item() <= 1e-5
