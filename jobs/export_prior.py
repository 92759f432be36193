"""`unclip export --prior`: a trained prior and its CLIP as a diffusers `KandinskyV22PriorPipeline` folder.

What is written under ``OUT/prior/``:
- ``prior/``: the EMA prior as diffusers' `PriorTransformer`. Our token sequence (text encodings, text embedding,
  timestep, noised image embedding, learned query; causal attention with padded text masked) is the one
  `PriorTransformer` builds, so the weights map one to one, given four constraints (checked, each refused in
  one line): attention heads x head_dim == width (diffusers has one inner width), the text-encoding width ==
  the embedding width (its text projection is ``Linear(embedding_dim, ...)``), the width a multiple of 256 (our
  256 timestep frequencies must be a subset of its ``width`` ones: ours are its every ``width/256``-th,
  and the other columns of the first time-MLP layer are zero) and an MLP of 4x the width.
  ``clip_std`` = 1 / the prior's embedding scale and ``clip_mean`` = 0, so the pipeline's `post_process_latents`
  returns embeddings at CLIP's scale.
- ``text_encoder/``, ``image_encoder/``: the open_clip towers as `transformers`' `CLIPTextModelWithProjection` /
  `CLIPVisionModelWithProjection` (same weights; per-token ``last_hidden_state`` and image embeddings equal
  open_clip's). One deliberate change: our prior was trained on *unit-norm* text embeddings, and the pipeline
  feeds ``text_embeds`` to the prior as the text tower makes them. A per-sample normalisation cannot be folded
  into a linear layer, so the export adds one dimension: ``text_embeds`` = ``c * Q @ e`` where ``e`` is
  open_clip's text embedding, ``Q`` a fixed (D+1) x D isometry onto the vectors whose coordinates sum to zero
  and ``c`` = 1000. The prior's ``embedding_proj_norm`` (a LayerNorm) then computes exactly ``e / |e|``
  (the mean it subtracts is zero by construction; ``c`` makes its epsilon negligible), and its projection
  absorbs ``Q``. `open_clip_text_embeds` undoes the map for anyone who wants open_clip's embedding back.
- ``tokenizer/``: a `CLIPTokenizer` made from open_clip's bundled BPE vocabulary (the same ids).
- ``scheduler/``: an `UnCLIPScheduler` on our cosine schedule (diffusers' ``squaredcos_cap_v2``), predicting
  the clean embedding, no clipping: ancestral sampling, the one sampler that pipeline steps with.

Exact: the pipeline at ``guidance_scale=1`` equals our prior stepped by the same scheduler (tested). Not exact:
with guidance > 1 the pipeline's unconditional branch encodes the empty caption, whereas our prior learned a
null token with every text encoding masked; and its output embeddings are not re-normalised (normalise them
before the decoder, which was trained on unit-norm embeddings).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from jobs import checkpoint
from pipeline.errors import UsageError

TEXT_EMBED_SCALE = 1000.0  # c above: LayerNorm's eps (1e-5) against c^2 |e|^2 / (D + 1)


def zero_sum_isometry(dim: int) -> torch.Tensor:
    """Q [(dim + 1), dim]: orthonormal columns, each orthogonal to the all-ones vector (deterministic)."""
    a = torch.eye(dim + 1, dtype=torch.float64)
    a[:, 0] = 1.0
    q, _ = torch.linalg.qr(a)  # first column spans the ones vector, the rest its complement
    return q[:, 1:].contiguous()


def open_clip_text_embeds(text_embeds: torch.Tensor) -> torch.Tensor:
    """The exported text tower's ``text_embeds`` [B, D + 1] -> open_clip's text embedding [B, D]."""
    q = zero_sum_isometry(text_embeds.shape[-1] - 1).to(text_embeds)
    return text_embeds @ q / TEXT_EMBED_SCALE


def exportable(cfg, context_length: int) -> list[str]:
    """Why a `PriorConfig` cannot become a `PriorTransformer` exactly (empty when it can)."""
    head_dim = cfg.head_dim or cfg.dim // cfg.heads
    why = []
    if cfg.heads * head_dim != cfg.dim:
        why.append(f"heads x head_dim ({cfg.heads} x {head_dim}) must equal the width {cfg.dim}")
    if cfg.text_enc_dim != cfg.emb_dim:
        got = "no text encodings" if not cfg.text_enc_dim else f"text-encoding width {cfg.text_enc_dim}"
        why.append(
            f"{got}; the pipeline needs per-token text encodings as wide as the embedding ({cfg.emb_dim})"
        )
    if cfg.dim % 256:
        why.append(f"the width {cfg.dim} must be a multiple of 256 (timestep frequencies)")
    if cfg.ff_mult != 4:
        why.append(f"the MLP must be 4x the width, not {cfg.ff_mult}x")
    if cfg.max_text_len < context_length:
        why.append(f"max_text_len {cfg.max_text_len} is shorter than CLIP's context {context_length}")
    return why


@torch.no_grad()
def prior_transformer(prior, context_length: int):
    """Our `DiffusionPrior`'s network as a diffusers `PriorTransformer` (see the module docstring)."""
    from diffusers import PriorTransformer

    cfg, net = prior.cfg, prior.net
    why = exportable(cfg, context_length)
    if why:
        raise UsageError("this prior cannot be exported to PriorTransformer: " + "; ".join(why))
    d, emb = cfg.dim, cfg.emb_dim
    head_dim = cfg.head_dim or d // cfg.heads
    pt = PriorTransformer(
        num_attention_heads=cfg.heads,
        attention_head_dim=head_dim,
        num_layers=cfg.depth,
        embedding_dim=emb,
        num_embeddings=context_length,
        additional_embeddings=4,
        dropout=0.0,
        embedding_proj_norm_type="layer",
        encoder_hid_proj_type="linear",
        added_emb_type="prd",
        embedding_proj_dim=emb + 1,
        clip_embed_dim=emb,
    )
    s = {k: v.clone() for k, v in pt.state_dict().items()}
    src = net.state_dict()
    s.update(_time_and_inputs(src, d, emb, context_length))
    for i in range(cfg.depth):
        s.update(_block(src, f"blocks.{i}.", f"transformer_blocks.{i}."))
    s["norm_out.weight"], s["norm_out.bias"] = src["ln_out.weight"], src["ln_out.bias"]
    s["proj_to_clip_embeddings.weight"], s["proj_to_clip_embeddings.bias"] = (
        src["out.weight"],
        src["out.bias"],
    )
    s["clip_mean"] = torch.zeros(1, emb)
    s["clip_std"] = torch.full((1, emb), 1.0 / cfg.embed_scale)
    pt.load_state_dict(s, strict=True)
    return pt.eval()


def _time_and_inputs(src: dict, d: int, emb: int, context_length: int) -> dict:
    """PriorTransformer weights of the timestep MLP, the input projections, positions and the query token."""
    s = {}
    # time: ours is Linear(256 sinusoids) -> SiLU -> Linear; its sinusoids are [cos | sin] of d/2 frequencies
    w1 = torch.zeros(d, d)
    stride, half = d // 256, d // 2
    w1[:, 0:half:stride] = src["time_in.mlp.0.weight"][:, :128]  # cos of our frequency j = its j * stride
    w1[:, half:d:stride] = src["time_in.mlp.0.weight"][:, 128:]
    s["time_embedding.linear_1.weight"], s["time_embedding.linear_1.bias"] = w1, src["time_in.mlp.0.bias"]
    s["time_embedding.linear_2.weight"] = src["time_in.mlp.2.weight"]
    s["time_embedding.linear_2.bias"] = src["time_in.mlp.2.bias"]
    s["proj_in.weight"], s["proj_in.bias"] = src["image_in.weight"], src["image_in.bias"]
    q = zero_sum_isometry(emb).float()  # [D + 1, D]
    s["embedding_proj.weight"] = src["text_in.weight"] @ q.T / math.sqrt(emb + 1)  # [d, D + 1]
    s["embedding_proj.bias"] = src["text_in.bias"]
    s["encoder_hidden_states_proj.weight"] = src["text_enc_in.weight"]
    s["encoder_hidden_states_proj.bias"] = src["text_enc_in.bias"]
    pos = torch.zeros(1, context_length + 4, d)
    pos[0, :context_length] = src["text_enc_pos"][:context_length]
    s["positional_embedding"] = pos
    s["prd_embedding"] = src["query"].view(1, 1, d)
    return s


def _block(src: dict, a: str, b: str) -> dict:
    """One of our pre-LN blocks (prefix ``a``) as a diffusers BasicTransformerBlock (prefix ``b``)."""
    s = {}
    wq, wk, wv = src[a + "attn.qkv.weight"].chunk(3, dim=0)
    bq, bk, bv = src[a + "attn.qkv.bias"].chunk(3, dim=0)
    pairs = {
        "norm1": "ln_attn",
        "attn1.to_out.0": "attn.proj",
        "norm3": "ln_mlp",
        "ff.net.0.proj": "mlp.fc",
        "ff.net.2": "mlp.proj",
    }
    for theirs, ours in pairs.items():
        s[f"{b}{theirs}.weight"], s[f"{b}{theirs}.bias"] = src[f"{a}{ours}.weight"], src[f"{a}{ours}.bias"]
    for name, w, bias in (("to_q", wq, bq), ("to_k", wk, bk), ("to_v", wv, bv)):
        s[f"{b}attn1.{name}.weight"], s[f"{b}attn1.{name}.bias"] = w, bias
    return s


def _act(block: nn.Module) -> str:
    act = block.mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise UsageError(f"CLIP activation {type(act).__name__} has no transformers equivalent; cannot export")


def _check_open_clip(model: nn.Module) -> None:
    v = model.visual if hasattr(model, "visual") else None
    problems = []
    if not hasattr(model, "token_embedding") or getattr(model, "text_projection", None) is None:
        problems.append("the text tower is not open_clip's built-in causal transformer with a projection")
    if getattr(model, "text_pool_type", "argmax") not in ("argmax", "eos"):
        problems.append(f"text pooling '{model.text_pool_type}' (only end-of-text pooling converts)")
    if type(v).__name__ != "VisionTransformer":
        problems.append(f"the image tower is {type(v).__name__}, not a ViT")
    elif v.attn_pool is not None or v.pool_type != "tok" or v.final_ln_after_pool or v.proj is None:
        problems.append("the ViT pools otherwise than the class token after ln_post with a projection")
    for tower in (getattr(model, "transformer", None), getattr(v, "transformer", None)):
        blocks = list(getattr(tower, "resblocks", []))
        plain = all(
            isinstance(b.ls_1, nn.Identity)
            and isinstance(b.ls_2, nn.Identity)
            and isinstance(b.attn, nn.MultiheadAttention)
            for b in blocks
        )
        if not plain:
            problems.append("layer scale or a custom attention in the residual blocks")
    if problems:
        raise UsageError("this CLIP cannot be converted to transformers' CLIP: " + "; ".join(problems))


def _blocks(dst_layers, src_blocks) -> dict:
    out = {}
    for i, blk in enumerate(src_blocks):
        p = f"{dst_layers}.{i}."
        wq, wk, wv = blk.attn.in_proj_weight.chunk(3, dim=0)
        bq, bk, bv = blk.attn.in_proj_bias.chunk(3, dim=0)
        for name, w, b in (("q_proj", wq, bq), ("k_proj", wk, bk), ("v_proj", wv, bv)):
            out[p + f"self_attn.{name}.weight"], out[p + f"self_attn.{name}.bias"] = w, b
        for theirs, mod in (
            ("self_attn.out_proj", blk.attn.out_proj),
            ("layer_norm1", blk.ln_1),
            ("layer_norm2", blk.ln_2),
            ("mlp.fc1", blk.mlp.c_fc),
            ("mlp.fc2", blk.mlp.c_proj),
        ):
            out[p + theirs + ".weight"], out[p + theirs + ".bias"] = mod.weight, mod.bias
    return out


def _proj_weight(proj) -> torch.Tensor:
    """open_clip projections are used as ``x @ proj`` ([W, D] parameters) or as a Linear: a Linear weight."""
    return proj.weight if isinstance(proj, nn.Linear) else proj.T


@torch.no_grad()
def text_tower(model: nn.Module, emb_dim: int):
    """open_clip's text tower as `CLIPTextModelWithProjection`, its projection folded as the module says."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    _check_open_clip(model)
    blocks = model.transformer.resblocks
    width = model.token_embedding.weight.shape[1]
    cfg = CLIPTextConfig(
        vocab_size=model.token_embedding.weight.shape[0],
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        projection_dim=emb_dim + 1,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=model.positional_embedding.shape[0],
        hidden_act=_act(blocks[0]),
        layer_norm_eps=model.ln_final.eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    hf = CLIPTextModelWithProjection(cfg)
    s = {
        "text_model.embeddings.token_embedding.weight": model.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": model.positional_embedding,
        "text_model.final_layer_norm.weight": model.ln_final.weight,
        "text_model.final_layer_norm.bias": model.ln_final.bias,
    }
    s.update(_blocks("text_model.encoder.layers", blocks))
    q = zero_sum_isometry(emb_dim).float()
    s["text_projection.weight"] = TEXT_EMBED_SCALE * q @ _proj_weight(model.text_projection)  # [D + 1, W]
    _load(hf, s)
    return hf.eval()


@torch.no_grad()
def vision_tower(model: nn.Module):
    """open_clip's ViT as `CLIPVisionModelWithProjection` (same weights, same image embeddings)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    _check_open_clip(model)
    v = model.visual
    blocks = v.transformer.resblocks
    width = v.conv1.weight.shape[0]
    image_size = v.image_size[0] if isinstance(v.image_size, (tuple, list)) else v.image_size
    patch = v.conv1.weight.shape[-1]
    proj = _proj_weight(v.proj)
    cfg = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        projection_dim=proj.shape[0],
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        image_size=image_size,
        patch_size=patch,
        hidden_act=_act(blocks[0]),
        layer_norm_eps=v.ln_pre.eps,
    )
    hf = CLIPVisionModelWithProjection(cfg)
    s = {
        "vision_model.embeddings.class_embedding": v.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
        "vision_model.pre_layrnorm.weight": v.ln_pre.weight,
        "vision_model.pre_layrnorm.bias": v.ln_pre.bias,
        "vision_model.post_layernorm.weight": v.ln_post.weight,
        "vision_model.post_layernorm.bias": v.ln_post.bias,
        "visual_projection.weight": proj,
    }
    s.update(_blocks("vision_model.encoder.layers", blocks))
    _load(hf, s)
    return hf.eval()


def _load(hf: nn.Module, state: dict) -> None:
    """Load every parameter (buffers such as position ids keep their own values); nothing may be left over."""
    own = hf.state_dict()
    missing = [k for k in own if k not in state and "position_ids" not in k]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise RuntimeError(f"CLIP conversion mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    hf.load_state_dict({**own, **{k: v.detach().clone() for k, v in state.items()}}, strict=True)


def tokenizer(open_clip_tokenizer, context_length: int):
    """A `CLIPTokenizer` with open_clip's vocabulary and merges (so the same ids), padded to the context."""
    from transformers import CLIPTokenizer

    tok = open_clip_tokenizer
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in tok.encoder.items()}
    merges = [tuple(pair) for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def image_processor(preprocess_cfg: dict):
    from transformers import CLIPImageProcessor

    size = preprocess_cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(preprocess_cfg["mean"]),
        image_std=list(preprocess_cfg["std"]),
        resample=3,  # bicubic, as open_clip
    )


def scheduler(num_train_timesteps: int):
    from diffusers import UnCLIPScheduler

    return UnCLIPScheduler(
        num_train_timesteps=num_train_timesteps,
        variance_type="fixed_small_log",
        clip_sample=False,
        prediction_type="sample",
    )


def pipeline(prior, clip):
    """The `KandinskyV22PriorPipeline` of a `DiffusionPrior` and the `pipeline.encoders.Clip` it was trained on."""
    from diffusers import KandinskyV22PriorPipeline
    from open_clip import get_model_preprocess_cfg

    ctx = clip.context_length
    return KandinskyV22PriorPipeline(
        prior=prior_transformer(prior, ctx),
        image_encoder=vision_tower(clip.model),
        text_encoder=text_tower(clip.model, prior.cfg.emb_dim),
        tokenizer=tokenizer(clip.tokenizer, ctx),
        scheduler=scheduler(prior.cfg.timesteps),
        image_processor=image_processor(get_model_preprocess_cfg(clip.model)),
    )


def prior_pipeline(folder: Path, meta: dict, clip_pretrained: str = "") -> tuple:
    """(the `KandinskyV22PriorPipeline`, its unclip_export.json note, the report's figures) of a prior checkpoint
    folder, in memory; `jobs.export.write_pipeline` writes it."""
    from jobs.sample import checkpoint_clip

    prior = checkpoint.build_model(folder, meta).eval()
    checkpoint.load_weights(prior, folder / "ema.safetensors")
    clip = checkpoint_clip(meta, "cpu", clip_pretrained)
    pipe = pipeline(prior, clip)
    note = {
        "source_checkpoint": str(folder.resolve()),
        "step": meta["step"],
        "clip": meta["store"]["clip"],
        "text_embeds": f"{TEXT_EMBED_SCALE:g} * Q @ open_clip text embedding (jobs.export_prior)",
        "exact_at_guidance_scale": 1.0,
    }
    return pipe, note, {"prior_step": meta["step"], "parameters": sum(p.numel() for p in prior.parameters())}
