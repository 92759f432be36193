"""The decoder network: Kandinsky 2.2 form, presets, space-to-depth, loss, guidance, diffusers round trip."""

import pytest
import torch

from models.decoder import (
    DECODER_PRESETS,
    DiffusionDecoder,
    build_decoder,
    decoder_config,
    depth_to_space,
    space_to_depth,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DiffusionDecoder(decoder_config("tiny", emb_dim=16, latent_size=16))


def test_space_to_depth_round_trip():
    x = torch.randn(2, 3, 32, 32)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 12, 16, 16) and torch.equal(y[:, :4, 0, 0].flatten(), x[0:2, 0, :2, :2].flatten())
    assert torch.equal(depth_to_space(y, 2), x)


def test_unet_is_kandinsky_decoder_form(tiny):
    c = tiny.unet.config
    assert c.addition_embed_type == "image" and c.encoder_hid_dim_type == "image_proj"
    assert c.encoder_hid_dim == 16 and c.in_channels == 12 and c.out_channels == 24
    x, t, e = torch.randn(3, 12, 8, 8), torch.tensor([0, 500, 999]), torch.randn(3, 16)
    assert tiny(x, t, e).shape == (3, 12, 8, 8)


def test_preset_sizes():
    """tiny is a few million parameters; b32 / base / large about 85 M, 190 M, 800-900 M (built on meta)."""
    expected = {
        "tiny": (2e6, 6e6),
        "tiny-base": (1.5e6, 2.2e6),
        "b32": (70e6, 100e6),
        "base": (160e6, 230e6),
        "large": (750e6, 950e6),
    }
    for name, (lo, hi) in expected.items():
        with torch.device("meta"):
            d = DiffusionDecoder(decoder_config(name, emb_dim=64 if name.startswith("tiny") else 768))
        n = sum(p.numel() for p in d.parameters())
        assert lo < n < hi, (name, n)
    with pytest.raises(
        ValueError, match="unknown decoder preset 'huge'; valid: tiny, tiny-base, b32, base, large"
    ):
        decoder_config("huge")
    with pytest.raises(ValueError, match="not divisible by its 4x downsampling"):
        decoder_config("tiny", latent_size=12)
    assert set(DECODER_PRESETS) == {"tiny", "tiny-base", "b32", "base", "large"}


def test_save_pretrained_round_trip(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    tiny.unet.save_pretrained(tmp_path)
    again = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    x, t, e = torch.randn(2, 12, 8, 8), torch.tensor([10, 900]), torch.randn(2, 16)
    kw = dict(encoder_hidden_states=None, added_cond_kwargs={"image_embeds": e})
    tiny.eval()
    assert torch.equal(tiny.unet(x, t, **kw).sample, again(x, t, **kw).sample)


def test_loss_reproducible_and_guidance(tiny):
    lat, emb = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 16)
    a, b, c = (tiny.loss(lat, emb, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert a.item() == b.item() and a.item() != c.item()
    x, t = torch.randn(2, 12, 8, 8), torch.tensor([300, 700])
    e = torch.randn(2, 16)
    tiny.eval()
    cond, uncond = tiny(x, t, e), tiny(x, t, torch.zeros_like(e))
    assert torch.allclose(tiny.predict_v(x, t, e, 1.0), cond)
    assert torch.allclose(tiny.predict_v(x, t, e, 3.0), uncond + 3 * (cond - uncond), atol=1e-5)


def test_shifted_timesteps_lower_the_log_snr_by_twice_the_log_shift():
    import math

    import numpy as np

    from models.diffusion import GaussianDiffusion

    diff = GaussianDiffusion(1000)
    assert torch.equal(diff.shifted_timesteps(1.0), torch.arange(1000))
    ab = diff.alpha_bar64
    log_snr = np.log(ab) - np.log1p(-ab)
    shifted = diff.shifted_timesteps(4.0).numpy()
    assert (np.diff(shifted) >= 0).all() and shifted[-1] == 999
    target = log_snr - 2 * math.log(4.0)
    inside = target >= log_snr[-1]  # targets past the last step map to it
    got = log_snr[shifted][inside]
    # the nearest timestep: no other is closer to the target
    assert (abs(got - target[inside]) <= abs(log_snr[None, :] - target[inside, None]).min(1) + 1e-12).all()
    assert shifted[500] > 800 and shifted[0] > 0  # half of all draws land past t = 800
    with pytest.raises(ValueError, match="shift must be > 0"):
        diff.shifted_timesteps(0.0)
    with pytest.raises(ValueError, match="snr_shift must be > 0"):
        decoder_config("tiny", snr_shift=-1.0)


def test_loss_draws_its_timesteps_through_the_shift(tiny):
    """The tiny preset trains on shift-4 timesteps: the UNet sees table[uniform draw], with the same draws."""
    assert tiny.cfg.snr_shift == 4.0
    seen = []
    hook = tiny.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    try:
        tiny.loss(torch.rand(6, 3, 16, 16) * 2 - 1, torch.randn(6, 16), torch.Generator().manual_seed(3))
    finally:
        hook.remove()
    g = torch.Generator().manual_seed(3)
    torch.rand(6, generator=g)  # the condition dropout is drawn first
    uniform = torch.randint(0, 1000, (6,), generator=g)
    assert torch.equal(seen[0], tiny.diffusion.shifted_timesteps(4.0)[uniform])
    assert not torch.equal(seen[0], uniform)


def test_sample_shape_seed_and_config_round_trip(tiny):
    import dataclasses
    import json

    e = torch.randn(2, 16)
    a, b = (tiny.sample(e, steps=3, generator=torch.Generator().manual_seed(0)) for _ in range(2))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b) and torch.isfinite(a).all()
    cfg = json.loads(json.dumps(dataclasses.asdict(tiny.cfg)))
    again = build_decoder(cfg)
    assert again.cfg == tiny.cfg
    again.load_state_dict(tiny.state_dict(), strict=True)


def test_tiny_decoder_fits_solid_colours():
    torch.manual_seed(0)
    dec = DiffusionDecoder(decoder_config("tiny", emb_dim=8, latent_size=16, cond_drop_prob=0.0))
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])
    lat = colours[:, :, None, None].expand(4, 3, 16, 16).repeat(4, 1, 1, 1)  # [16, 3, 16, 16]
    emb = torch.randn(4, 8).repeat(4, 1)
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = dec.loss(lat, emb, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 2
