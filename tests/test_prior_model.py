"""Tests for models/layers.py, models/diffusion.py and models/prior.py (CPU, synthetic data)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.diffusion import GaussianDiffusion, cosine_alpha_bar, guided
from models.layers import Block, causal_padding_mask, timestep_embedding
from models.prior import PRIOR_PRESETS, DiffusionPrior, PriorConfig, PriorNetwork, prior_config

D, W = 32, 16  # CLIP embedding size and text-encoding width of the small test priors


def _prior(text_enc_dim: int = W, **kw) -> DiffusionPrior:
    torch.manual_seed(0)
    return DiffusionPrior(
        prior_config("tiny", emb_dim=D, text_enc_dim=text_enc_dim, dim=64, depth=2, **kw)
    ).eval()


def _batch(b: int = 3, n: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, D, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    txt = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    enc = torch.randn(b, n, W, generator=g)
    return x, t, txt, enc


# ---------------------------------------------------------------- layers


def test_timestep_embedding_shape_and_values():
    emb = timestep_embedding(torch.tensor([0, 5]), 7)
    assert emb.shape == (2, 7)
    assert torch.allclose(emb[0, :3], torch.ones(3)) and torch.allclose(emb[0, 3:], torch.zeros(4))
    assert emb[1, 0] == pytest.approx(math.cos(5.0)) and emb[1, 3] == pytest.approx(math.sin(5.0))


def test_causal_mask_later_tokens_do_not_change_earlier_outputs():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(16, 4) for _ in range(2)).eval()

    def run(x, valid):
        mask = causal_padding_mask(valid)
        for blk in blocks:
            x = blk(x, mask)
        return x

    x = torch.randn(2, 6, 16)
    valid = torch.ones(2, 6, dtype=torch.bool)
    y = run(x, valid)
    x2 = x.clone()
    x2[:, 4] += 1.0
    y2 = run(x2, valid)
    assert torch.allclose(y[:, :4], y2[:, :4], atol=1e-6)
    assert not torch.allclose(y[:, 4:], y2[:, 4:], atol=1e-3)
    # A masked key changes nothing else, whatever its value.
    valid[:, 1] = False
    x3 = x.clone()
    x3[:, 1] = 100.0
    keep = [0, 2, 3, 4, 5]
    assert torch.allclose(run(x, valid)[:, keep], run(x3, valid)[:, keep], atol=1e-5)


def test_mask_with_only_padding_before_a_query_gives_no_nan():
    valid = torch.tensor([[False, False, True]])
    mask = causal_padding_mask(valid)
    assert mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert torch.isfinite(Block(8, 2)(torch.randn(1, 3, 8), mask)).all()


# ---------------------------------------------------------------- diffusion


def test_cosine_schedule_values():
    ab = cosine_alpha_bar(1000)
    assert ab.shape == (1000,)
    assert 0.9999 < ab[0] < 1.0 and 0.0 < ab[-1] < 1e-4
    assert (ab[1:] < ab[:-1]).all()
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ab[499] == pytest.approx(f(0.5) / f(0.0), rel=1e-9)  # the product telescopes where unclipped


def test_q_sample_moments():
    diff = GaussianDiffusion(1000)
    x0 = torch.full((20000, 1), 2.0)
    t = torch.full((20000,), 300)
    xt = diff.q_sample(x0, t, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)))
    ab = float(diff.alpha_bar64[300])
    assert xt.mean().item() == pytest.approx(2.0 * math.sqrt(ab), abs=0.03)
    assert xt.var().item() == pytest.approx(1.0 - ab, rel=0.05)


def test_x0_loss_is_zero_for_oracle_and_positive_otherwise():
    diff = GaussianDiffusion(100)
    x0 = torch.randn(8, 4)
    assert diff.x0_loss(lambda x, t: x0, x0).item() == 0.0
    assert diff.x0_loss(lambda x, t: x, x0, generator=torch.Generator().manual_seed(0)).item() > 0.0


def test_guided_formula():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert guided(cond, uncond, 1.0).item() == 3.0 and guided(cond, uncond, 2.5).item() == 6.0


# ---------------------------------------------------------------- prior


def test_shapes_of_forward_loss_and_sample():
    prior = _prior()
    x, t, txt, enc = _batch()
    assert prior.net(x, t, txt, enc).shape == (3, D)
    assert prior.net(x, t, txt).shape == (3, D)  # text encodings are optional at call time
    loss = prior.loss(x, txt, enc, torch.ones(3, 5, dtype=torch.bool))
    assert loss.shape == () and torch.isfinite(loss)
    emb = prior.sample(txt, enc, steps=4, guidance_scale=2.0)
    assert emb.shape == (3, D) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_text_encoding_padding_invariance():
    # Sample 0 alone (2 tokens, no padding) equals sample 0 padded to the batch's longest caption (6).
    prior = _prior()
    x, t, txt, enc = _batch(b=2, n=6)
    mask = torch.tensor([[True, True, False, False, False, False], [True] * 6])
    enc[0, 2:] = 50.0  # garbage in the padding must not leak
    batched = prior.net(x, t, txt, enc, mask)
    alone = prior.net(x[:1], t[:1], txt[:1], enc[:1, :2], torch.ones(1, 2, dtype=torch.bool))
    assert torch.allclose(batched[0], alone[0], atol=1e-5)
    # Dropping a real token of sample 1 does change its prediction.
    assert not torch.allclose(prior.net(x, t, txt, enc[:, :5], mask[:, :5])[1], batched[1], atol=1e-4)


def test_drop_cond_ignores_text_and_matches_no_encodings():
    prior = _prior()
    x, t, txt, enc = _batch()
    drop = torch.tensor([True, True, False])
    a = prior.net(x, t, txt, enc, drop_cond=drop)
    b = prior.net(x, t, torch.randn(3, D), torch.randn(3, 5, W), drop_cond=drop)
    c = prior.net(x, t, txt, None, drop_cond=drop)
    assert torch.allclose(a[:2], b[:2], atol=1e-5) and torch.allclose(a[:2], c[:2], atol=1e-5)
    assert not torch.allclose(a[2], b[2], atol=1e-4)


def test_guidance_scale_one_is_conditional_and_other_scales_follow_formula():
    prior = _prior()
    x, t, txt, enc = _batch()
    cond = prior.net(x, t, txt, enc)
    uncond = prior.net(x, t, txt, enc, drop_cond=torch.ones(3, dtype=torch.bool))
    assert torch.equal(prior.predict_x0(x, t, txt, enc, guidance_scale=1.0), cond)
    g3 = prior.predict_x0(x, t, txt, enc, guidance_scale=3.0)
    assert torch.allclose(g3, uncond + 3.0 * (cond - uncond), atol=1e-5)
    assert not torch.allclose(g3, cond, atol=1e-3)


def test_the_text_embedding_counts_by_its_direction_as_sampling_gives_it():
    """Sampling feeds unit-norm CLIP text embeddings; a store adopted without --normalize holds raw ones (norm
    ~10 for ViT-L-14's text tower), on which the prior trained off the inputs it is sampled on."""
    prior = _prior()
    x, t, txt, enc = _batch()
    raw = txt * torch.tensor([[9.0], [0.3], [14.0]])
    assert torch.allclose(prior.net(x, t, raw, enc), prior.net(x, t, txt, enc), atol=1e-5)
    g = torch.Generator()
    assert torch.equal(
        prior.loss(x, raw, enc, None, g.manual_seed(3)), prior.loss(x, txt, enc, None, g.manual_seed(3))
    )


def test_float16_inputs_are_cast_inside():
    prior = _prior()
    x, t, txt, enc = _batch()
    x16, txt16, enc16 = x.half(), txt.half(), enc.half()
    ref = prior.net(x16.float(), t, txt16.float(), enc16.float())
    assert torch.allclose(prior.net(x16, t, txt16, enc16), ref, atol=1e-6)
    loss = prior.loss(
        x16, txt16, enc16, torch.ones(3, 5, dtype=torch.uint8), torch.Generator().manual_seed(0)
    )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert prior.sample(txt16, enc16, steps=2).dtype == torch.float32


def test_loss_is_reproducible_with_a_generator():
    prior = _prior()
    x, _, txt, enc = _batch()
    a = prior.loss(x, txt, enc, generator=torch.Generator().manual_seed(7))
    b = prior.loss(x, txt, enc, generator=torch.Generator().manual_seed(7))
    c = prior.loss(x, txt, enc, generator=torch.Generator().manual_seed(8))
    assert a.item() == b.item() and a.item() != c.item()


def test_bad_text_encodings_are_rejected():
    x, t, txt, enc = _batch()
    with pytest.raises(ValueError, match="text_enc_dim=0"):
        _prior(text_enc_dim=0).net(x, t, txt, enc)
    with pytest.raises(ValueError, match="more than max_text_len 4"):
        _prior(max_text_len=4).net(x, t, txt, enc)
    with pytest.raises(ValueError, match=r"text_enc must be \[B, L, 16\]"):
        _prior().net(x, t, txt, enc[..., :8])


def test_unknown_preset_and_field_errors():
    with pytest.raises(ValueError) as e:
        prior_config("x")
    assert str(e.value) == "unknown prior preset 'x'; valid: tiny, vit-b-32, vit-l-14"
    with pytest.raises(ValueError, match="unknown PriorConfig field.*bogus; valid: emb_dim"):
        prior_config("tiny", bogus=1)
    with pytest.raises(ValueError, match="dim 100 is not divisible by heads 8"):
        prior_config("tiny", dim=100, heads=8)


def test_presets_and_config_round_trip():
    big = PRIOR_PRESETS["vit-l-14"]
    assert (big.emb_dim, big.dim, big.depth, big.heads) == (768, 768, 24, 32)
    cfg = prior_config("tiny", emb_dim=D, text_enc_dim=W)
    assert cfg.embed_scale == pytest.approx(math.sqrt(D))
    assert PRIOR_PRESETS["tiny"].emb_dim == 512  # overrides do not mutate the preset
    assert PriorConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_state_dict_loads_strictly_and_round_trips_through_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    prior = _prior()
    path = tmp_path / "prior.safetensors"
    st.save_file(prior.state_dict(), str(path))
    torch.manual_seed(123)  # different init, then overwritten
    other = DiffusionPrior(PriorConfig(**dataclasses.asdict(prior.cfg))).eval()
    other.load_state_dict(st.load_file(str(path)), strict=True)
    x, t, txt, enc = _batch()
    assert torch.equal(prior.net(x, t, txt, enc), other.net(x, t, txt, enc))
    assert not any("diffusion" in k for k in prior.state_dict())  # the schedule is rebuilt from the config


def test_tiny_preset_stays_small():
    small = sum(p.numel() for p in PriorNetwork(prior_config("tiny", emb_dim=D)).parameters())
    assert 100_000 < small < 2_000_000  # the CPU demo preset stays small


def test_tiny_prior_overfits_16_pairs():
    torch.manual_seed(0)
    n = 16
    txt = F.normalize(torch.randn(n, D), dim=-1)
    img = F.normalize(torch.randn(n, D), dim=-1)
    prior = DiffusionPrior(prior_config("tiny", emb_dim=D))
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = prior.loss(img, txt, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    emb = prior.sample(txt, steps=64, generator=torch.Generator().manual_seed(1))
    cos = (emb * img).sum(-1)
    assert cos.mean().item() > 0.9 and cos.min().item() > 0.7
    # The prediction follows the text: cosine with the true embedding beats any other sample's.
    sims = emb @ img.T  # [n, n]
    assert (sims.argmax(dim=1) == torch.arange(n)).float().mean().item() > 0.9
