"""The demo CLIP's contrastive loss: open_clip's without negatives, and hard negatives count against an image."""

import torch
import torch.nn.functional as F

from jobs.demo_clip import contrastive_loss


def test_without_negatives_it_is_open_clips_loss():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    assert torch.allclose(contrastive_loss(img, txt, scale), ClipLoss()(img, txt, scale), atol=1e-6)


def test_a_hard_negative_close_to_the_image_raises_the_loss_only_through_the_image_side():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(4, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    far = -img  # negatives pointing away from their images add little
    near = F.normalize(img + 0.1 * torch.randn(4, 8, generator=g), dim=-1)  # closer than the true captions
    base = contrastive_loss(img, txt, scale)
    assert contrastive_loss(img, torch.cat([txt, far]), scale) < base + 0.01
    assert contrastive_loss(img, torch.cat([txt, near]), scale) > base + 0.3
    # the text -> image half ignores the negatives: with no image-side term the two differ by the image half only
    logits = scale * img @ torch.cat([txt, near]).T
    img_half = F.cross_entropy(logits, torch.arange(4))
    txt_half = F.cross_entropy(logits[:, :4].T, torch.arange(4))
    assert torch.allclose(contrastive_loss(img, torch.cat([txt, near]), scale), (img_half + txt_half) / 2)
