#!/usr/bin/env python3
"""Build tiny random-weight SD3.5 pipelines and record diffusers' outputs as golden files.

Everything is deterministic (fixed seeds, single thread), so running this script again with the
pinned versions of requirements.txt reproduces the same files byte for byte.

Output (under --out, default inference/testdata):
  sd35-tiny-large/          diffusers layout, MMDiT with RMS qk-norm (like SD3.5 large)
  sd35-tiny-large-single/   Stability single-file layout of the same weights
  sd35-tiny-large-fp8/      ComfyUI-style fp8_scaled all-in-one checkpoint (F8E4M3 + scale_weight)
  sd35-tiny-medium/         diffusers layout, MMDiT-X with dual attention (like SD3.5 medium)
  sd35-tiny-medium-single/  Stability single-file layout of the same weights
  golden/                   reference outputs (safetensors + json), see golden/manifest.json

The tiny models follow the conventions of the real ones that a loader relies on when a file
carries no config: CLIP heads have 64 channels, the MMDiT has as many heads as blocks.
"""

import argparse
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

# --------------------------------------------------------------------------------------------
# Prompts: punctuation, unicode, an empty (negative) prompt and one longer than every tokenizer.
LONG_PROMPT = " ".join(
    ["a very long prompt about a small red fox, a tall green tree and a wide blue river;"] * 30
)
PROMPTS = {
    "punctuation": "A photo of an astronaut riding a horse, on the moon!! (8k), 'high-res'; ultra-detailed...",
    "unicode": "Crème brûlée — «naïve» café in 東京, größer 🚀 ÉTÉ",
    "empty": "",
    "long": LONG_PROMPT,
}

CORPUS = """
a photo of an astronaut riding a horse on the moon. a painting of a fox in the snow.
the quick brown fox jumps over the lazy dog. a red car parked near a tall green tree.
portrait of a woman with long hair, studio lighting, high resolution, ultra detailed.
a cat sitting on a wooden table next to a cup of coffee in a small cafe.
landscape with mountains, a lake and a wide blue river at sunset, highly detailed, 8k.
a bowl of fruit, apples, oranges and bananas, still life, oil painting.
city street at night with neon lights and rain, cinematic, photorealistic.
an old castle on a hill, fantasy art, dramatic clouds, golden hour.
a small robot watering plants in a greenhouse, digital art, soft light.
creme brulee and naive cafe, summer, large letters, very long prompt about things.
"""

CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LEN = 77
T5_SEQ_LEN = 256

LATENT_CHANNELS = 16
VAE_SCALING, VAE_SHIFT = 1.5305, 0.0609


# --------------------------------------------------------------------------------------------
# Tokenizers


def train_clip_bpe(num_merges=64):
    """A byte-level BPE in CLIP's format: vocab = bytes, bytes+</w>, merges, then the specials."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort(key=lambda c: ord(c))
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # A small deterministic BPE trainer (the library's trainer breaks count ties arbitrarily):
    # merge the most frequent adjacent pair, ties broken by the pair itself.
    from collections import Counter

    words = Counter()
    for line in CORPUS.strip().splitlines():
        normalized = tok.normalizer.normalize_str(line)
        for piece, _ in tok.pre_tokenizer.pre_tokenize_str(normalized):
            symbols = list(piece)
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append(f"{a} {b}")
        new_words = Counter()
        for w, n in words.items():
            out, k = [], 0
            while k < len(w):
                if k + 1 < len(w) and w[k] == a and w[k + 1] == b:
                    out.append(a + b)
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            new_words[tuple(out)] += n
        words = new_words
    vocab = {}
    for c in alphabet:
        vocab[c] = len(vocab)
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    for m in merges:
        a, b = m.split(" ")
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(path: Path, vocab, merges, pad_token):
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {BOS: vocab[BOS], EOS: vocab[EOS], pad_token: vocab[pad_token]}
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in sorted(special.items(), key=lambda kv: kv[1])
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": CLIP_MAX_LEN,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}, indent=2)
        + "\n"
    )


def write_t5_tokenizer(path: Path):
    """A unigram sentencepiece model (T5 style ids: pad 0, eos 1, unk 2) plus its tokenizer.json."""
    import sentencepiece as spm

    path.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in CORPUS.strip().splitlines()] * 4),
        model_writer=buf,
        vocab_size=180,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        seed_sentencepiece_size=10000,
        minloglevel=2,
    )
    (path / "spiece.model").write_bytes(buf.getvalue())
    tok = T5TokenizerFast.from_pretrained(path, extra_ids=8, model_max_length=512, legacy=False)
    tok.save_pretrained(path)
    return T5TokenizerFast.from_pretrained(path)


# --------------------------------------------------------------------------------------------
# Models


def clip_config(vocab, hidden, layers, act, pad_id):
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=128,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=CLIP_MAX_LEN,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=pad_id,
    )


def perturb_(module, seed, scale=0.02):
    """Random non-trivial values for every parameter (norm weights and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            parts = name.split(".")
            if p.ndim == 1 and parts[-1] == "weight" and ("norm" in parts[-2] or parts[-2].startswith("ln")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(max(fan_in, 1)))
    return module


def head_dim(num_layers):
    # As many heads as blocks, like the real models; narrow heads keep the deeper model small.
    return 16 if num_layers == 2 else 4


def build_transformer(seed, num_layers, dual_layers, qk_norm="rms_norm"):
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        attention_head_dim=head_dim(num_layers),
        num_attention_heads=num_layers,
        joint_attention_dim=192,
        caption_projection_dim=num_layers * head_dim(num_layers),
        pooled_projection_dim=192,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=16,
        dual_attention_layers=tuple(dual_layers),
        qk_norm=qk_norm,
    )
    pos = model.pos_embed.pos_embed.clone()
    perturb_(model, seed + 1)
    # Keep the sin-cos position table (a buffer, but saved with the weights).
    model.pos_embed.pos_embed.copy_(pos)
    return model.eval()


def build_vae(seed):
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=VAE_SCALING,
        shift_factor=VAE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    return perturb_(vae, seed + 1, 0.05).eval()


def build_text_encoders(vocab, tok_l, tok_g, t5_tok, seed):
    torch.manual_seed(seed)
    clip_l = perturb_(
        CLIPTextModelWithProjection(clip_config(vocab, 64, 2, "quick_gelu", tok_l.pad_token_id)), seed + 1
    ).eval()
    clip_g = perturb_(
        CLIPTextModelWithProjection(clip_config(vocab, 128, 2, "gelu", tok_g.pad_token_id)), seed + 2
    ).eval()
    t5_cfg = T5Config(
        vocab_size=len(t5_tok),
        d_model=192,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    t5 = perturb_(T5EncoderModel(t5_cfg), seed + 3).eval()
    return clip_l, clip_g, t5


# --------------------------------------------------------------------------------------------
# Stability / ComfyUI single-file conversions (inverse of diffusers' single_file_utils)


def swap_scale_shift(w):
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def mmdit_to_stability(sd, num_layers, dual_layers):
    out = {
        "pos_embed": sd["pos_embed.pos_embed"],
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "context_embedder.weight": sd["context_embedder.weight"],
        "context_embedder.bias": sd["context_embedder.bias"],
    }
    for src, dst in [("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")]:
        for i, j in [(1, 0), (2, 2)]:
            for p in ("weight", "bias"):
                out[f"{dst}.mlp.{j}.{p}"] = sd[f"time_text_embed.{src}.linear_{i}.{p}"]
    for i in range(num_layers):
        d, s = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == num_layers - 1
        for p in ("weight", "bias"):
            out[f"{s}.x_block.attn.qkv.{p}"] = torch.cat([sd[f"{d}.attn.to_{c}.{p}"] for c in "qkv"])
            out[f"{s}.context_block.attn.qkv.{p}"] = torch.cat(
                [sd[f"{d}.attn.add_{c}_proj.{p}"] for c in "qkv"]
            )
            out[f"{s}.x_block.attn.proj.{p}"] = sd[f"{d}.attn.to_out.0.{p}"]
            if not last:
                out[f"{s}.context_block.attn.proj.{p}"] = sd[f"{d}.attn.to_add_out.{p}"]
            out[f"{s}.x_block.adaLN_modulation.1.{p}"] = sd[f"{d}.norm1.linear.{p}"]
            ctx = sd[f"{d}.norm1_context.linear.{p}"]
            out[f"{s}.context_block.adaLN_modulation.1.{p}"] = swap_scale_shift(ctx) if last else ctx
            out[f"{s}.x_block.mlp.fc1.{p}"] = sd[f"{d}.ff.net.0.proj.{p}"]
            out[f"{s}.x_block.mlp.fc2.{p}"] = sd[f"{d}.ff.net.2.{p}"]
            if not last:
                out[f"{s}.context_block.mlp.fc1.{p}"] = sd[f"{d}.ff_context.net.0.proj.{p}"]
                out[f"{s}.context_block.mlp.fc2.{p}"] = sd[f"{d}.ff_context.net.2.{p}"]
            if i in dual_layers:
                out[f"{s}.x_block.attn2.qkv.{p}"] = torch.cat([sd[f"{d}.attn2.to_{c}.{p}"] for c in "qkv"])
                out[f"{s}.x_block.attn2.proj.{p}"] = sd[f"{d}.attn2.to_out.0.{p}"]
        out[f"{s}.x_block.attn.ln_q.weight"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{s}.x_block.attn.ln_k.weight"] = sd[f"{d}.attn.norm_k.weight"]
        out[f"{s}.context_block.attn.ln_q.weight"] = sd[f"{d}.attn.norm_added_q.weight"]
        out[f"{s}.context_block.attn.ln_k.weight"] = sd[f"{d}.attn.norm_added_k.weight"]
        if i in dual_layers:
            out[f"{s}.x_block.attn2.ln_q.weight"] = sd[f"{d}.attn2.norm_q.weight"]
            out[f"{s}.x_block.attn2.ln_k.weight"] = sd[f"{d}.attn2.norm_k.weight"]
    for p in ("weight", "bias"):
        out[f"final_layer.linear.{p}"] = sd[f"proj_out.{p}"]
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap_scale_shift(sd[f"norm_out.linear.{p}"])
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values()), "unmapped weights"
    return {"model.diffusion_model." + k: v.contiguous() for k, v in out.items()}


def vae_to_ldm(sd, num_up_blocks):
    import re

    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", n)
        n = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        n = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{num_up_blocks - 1 - int(m.group(1))}.block.{m.group(2)}.",
            n,
        )
        n = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{num_up_blocks - 1 - int(m.group(1))}.upsample.",
            n,
        )
        n = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", n)
        n = n.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0." in n:
            n = n.replace("mid_block.attentions.0.", "mid.attn_1.")
            n = n.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k")
            n = n.replace("to_v", "v").replace("to_out.0", "proj_out")
            if v.ndim == 2:
                v = v[:, :, None, None]
        out["first_stage_model." + n] = v.contiguous()
    return out


# FP8 (F8E4M3) with one f32 scale per tensor, the way ComfyUI's *_fp8_scaled files store it.
F8_MAX = 448.0


def quantize_fp8(w):
    scale = (w.abs().max().float() / F8_MAX).clamp(min=1e-12)
    q = (w.float() / scale).clamp(-F8_MAX, F8_MAX).to(torch.float8_e4m3fn)
    return q, scale.reshape(()).to(torch.float32)


def fp8_scaled(sd, prefix, is_linear):
    """Linear weights -> F8E4M3 + `scale_weight`; everything else bf16; plus the marker."""
    out = {}
    for k, v in sd.items():
        if is_linear(k, v):
            q, s = quantize_fp8(v)
            out[prefix + k] = q
            out[prefix + k[: -len("weight")] + "scale_weight"] = s
        else:
            out[prefix + k] = v.to(torch.bfloat16)
    out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def dequantize_fp8(sd):
    """What a consumer of an fp8_scaled file computes with: every weight back to f32."""
    out = {}
    for k, v in sd.items():
        if k.endswith("scale_weight") or k.endswith("scaled_fp8"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            out[k] = v.to(torch.float32) * sd[k[: -len("weight")] + "scale_weight"]
        else:
            out[k] = v.to(torch.float32)
    return out


def mmdit_is_linear(k, v):
    return v.ndim == 2 and k.endswith(".weight") and "pos_embed" not in k


def t5_is_linear(k, v):
    return v.ndim == 2 and k.endswith(".weight") and "shared" not in k and "embed_tokens" not in k


def stability_to_diffusers_mmdit(sd, num_layers, dual_layers):
    """Inverse of mmdit_to_stability (used to load the fp8 file back into diffusers)."""
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    out = {
        "pos_embed.pos_embed": sd["pos_embed"],
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "context_embedder.weight": sd["context_embedder.weight"],
        "context_embedder.bias": sd["context_embedder.bias"],
    }
    for src, dst in [("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")]:
        for i, j in [(1, 0), (2, 2)]:
            for p in ("weight", "bias"):
                out[f"time_text_embed.{src}.linear_{i}.{p}"] = sd[f"{dst}.mlp.{j}.{p}"]
    for i in range(num_layers):
        d, s = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == num_layers - 1
        for p in ("weight", "bias"):
            for c, t in zip("qkv", sd[f"{s}.x_block.attn.qkv.{p}"].chunk(3)):
                out[f"{d}.attn.to_{c}.{p}"] = t
            for c, t in zip("qkv", sd[f"{s}.context_block.attn.qkv.{p}"].chunk(3)):
                out[f"{d}.attn.add_{c}_proj.{p}"] = t
            out[f"{d}.attn.to_out.0.{p}"] = sd[f"{s}.x_block.attn.proj.{p}"]
            if not last:
                out[f"{d}.attn.to_add_out.{p}"] = sd[f"{s}.context_block.attn.proj.{p}"]
            out[f"{d}.norm1.linear.{p}"] = sd[f"{s}.x_block.adaLN_modulation.1.{p}"]
            ctx = sd[f"{s}.context_block.adaLN_modulation.1.{p}"]
            out[f"{d}.norm1_context.linear.{p}"] = swap_scale_shift(ctx) if last else ctx
            out[f"{d}.ff.net.0.proj.{p}"] = sd[f"{s}.x_block.mlp.fc1.{p}"]
            out[f"{d}.ff.net.2.{p}"] = sd[f"{s}.x_block.mlp.fc2.{p}"]
            if not last:
                out[f"{d}.ff_context.net.0.proj.{p}"] = sd[f"{s}.context_block.mlp.fc1.{p}"]
                out[f"{d}.ff_context.net.2.{p}"] = sd[f"{s}.context_block.mlp.fc2.{p}"]
            if i in dual_layers:
                for c, t in zip("qkv", sd[f"{s}.x_block.attn2.qkv.{p}"].chunk(3)):
                    out[f"{d}.attn2.to_{c}.{p}"] = t
                out[f"{d}.attn2.to_out.0.{p}"] = sd[f"{s}.x_block.attn2.proj.{p}"]
        out[f"{d}.attn.norm_q.weight"] = sd[f"{s}.x_block.attn.ln_q.weight"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{s}.x_block.attn.ln_k.weight"]
        out[f"{d}.attn.norm_added_q.weight"] = sd[f"{s}.context_block.attn.ln_q.weight"]
        out[f"{d}.attn.norm_added_k.weight"] = sd[f"{s}.context_block.attn.ln_k.weight"]
        if i in dual_layers:
            out[f"{d}.attn2.norm_q.weight"] = sd[f"{s}.x_block.attn2.ln_q.weight"]
            out[f"{d}.attn2.norm_k.weight"] = sd[f"{s}.x_block.attn2.ln_k.weight"]
    for p in ("weight", "bias"):
        out[f"proj_out.{p}"] = sd[f"final_layer.linear.{p}"]
        out[f"norm_out.linear.{p}"] = swap_scale_shift(sd[f"final_layer.adaLN_modulation.1.{p}"])
    return out


# --------------------------------------------------------------------------------------------
# Goldens


def encode_prompt_parts(pipe, prompt, t5_len):
    """Each text encoder's outputs exactly as StableDiffusion3Pipeline uses them."""
    res = {}
    for idx, name in [(0, "clip_l"), (1, "clip_g")]:
        hidden, pooled = pipe._get_clip_prompt_embeds(prompt, device="cpu", clip_model_index=idx)
        res[f"{name}.hidden"], res[f"{name}.pooled"] = hidden, pooled
    res["t5.hidden"] = pipe._get_t5_prompt_embeds(prompt, max_sequence_length=t5_len, device="cpu")
    return res


def token_ids(pipe, prompt, t5_len):
    out = {}
    for name, tok, n in [
        ("clip_l", pipe.tokenizer, CLIP_MAX_LEN),
        ("clip_g", pipe.tokenizer_2, CLIP_MAX_LEN),
        ("t5", pipe.tokenizer_3, t5_len),
    ]:
        ids = tok(prompt, padding="max_length", max_length=n, truncation=True, add_special_tokens=True).input_ids
        out[name] = [int(i) for i in ids]
    return out


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def psnr(a, b):
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def run_e2e(pipe, case, latents):
    kwargs = dict(
        prompt=case["prompt"],
        negative_prompt=case["negative_prompt"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance"],
        latents=latents.clone(),
        max_sequence_length=case["t5_len"],
        output_type="latent",
    )
    if case.get("slg_layers"):
        kwargs.update(
            skip_guidance_layers=case["slg_layers"],
            skip_layer_guidance_scale=case["slg_scale"],
            skip_layer_guidance_start=case["slg_start"],
            skip_layer_guidance_stop=case["slg_stop"],
        )
    with torch.no_grad():
        final = pipe(**kwargs).images
        decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    image = (decoded / 2 + 0.5).clamp(0, 1)
    pixels = (image.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return final, image, torch.from_numpy(pixels.copy())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "testdata"))
    args = ap.parse_args()
    out = Path(args.out)
    for d in ["sd35-tiny-large", "sd35-tiny-large-single", "sd35-tiny-large-fp8", "sd35-tiny-medium",
              "sd35-tiny-medium-single", "golden"]:
        shutil.rmtree(out / d, ignore_errors=True)
    golden = out / "golden"
    golden.mkdir(parents=True)
    tmp = out / ".tok-tmp"
    shutil.rmtree(tmp, ignore_errors=True)

    # Tokenizers, written once and copied into each layout.
    vocab, merges = train_clip_bpe()
    write_clip_tokenizer(tmp / "tokenizer", vocab, merges, pad_token=EOS)
    write_clip_tokenizer(tmp / "tokenizer_2", vocab, merges, pad_token="!")
    t5_tok = write_t5_tokenizer(tmp / "tokenizer_3")
    tok_l = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    tok_g = CLIPTokenizer.from_pretrained(tmp / "tokenizer_2")
    assert tok_l.pad_token_id == vocab[EOS] and tok_g.pad_token_id == vocab["!"]

    clip_l, clip_g, t5 = build_text_encoders(vocab, tok_l, tok_g, t5_tok, seed=10)
    vae = build_vae(seed=20)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    models = {
        "large": dict(layers=2, dual=[], seed=30),
        # Ten blocks, so the model card's skip-layer guidance layers (7, 8, 9) exist and the
        # served defaults exercise it; dual attention in the first blocks, as in SD3.5 medium.
        "medium": dict(layers=10, dual=[0, 1, 2], seed=40),
    }
    manifest = {"prompts": PROMPTS, "clip_max_len": CLIP_MAX_LEN, "t5_len": T5_SEQ_LEN, "cases": []}

    for name, m in models.items():
        transformer = build_transformer(m["seed"], m["layers"], m["dual"])
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=clip_l,
            tokenizer=tok_l,
            text_encoder_2=clip_g,
            tokenizer_2=tok_g,
            text_encoder_3=t5,
            tokenizer_3=t5_tok,
        )
        ddir = out / f"sd35-tiny-{name}"
        pipe.save_pretrained(ddir, safe_serialization=True)
        # Real repositories shard the big models; do the same for the transformer and T5.
        transformer.save_pretrained(ddir / "transformer", safe_serialization=True, max_shard_size="150KB")
        for f in (ddir / "transformer").glob("diffusion_pytorch_model.safetensors"):
            if (ddir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists():
                f.unlink()
        for t in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            shutil.rmtree(ddir / t)
            shutil.copytree(tmp / t, ddir / t)

        # Goldens come from the pipeline as loaded back from disk.
        pipe = StableDiffusion3Pipeline.from_pretrained(ddir, torch_dtype=torch.float32)
        tsd = pipe.transformer.state_dict()

        # Stability single-file layout of the same weights.
        sdir = out / f"sd35-tiny-{name}-single"
        (sdir / "text_encoders").mkdir(parents=True)
        single = mmdit_to_stability(tsd, m["layers"], m["dual"])
        single.update(vae_to_ldm(pipe.vae.state_dict(), 4))
        single_name = f"sd3.5_{name}.safetensors"
        save_file(single, sdir / single_name)
        shutil.copy(ddir / "text_encoder" / "model.safetensors", sdir / "text_encoders" / "clip_l.safetensors")
        shutil.copy(ddir / "text_encoder_2" / "model.safetensors", sdir / "text_encoders" / "clip_g.safetensors")
        # The tiny fixtures keep f32 whatever the file name says, so one set of goldens serves both layouts.
        shutil.copy(ddir / "text_encoder_3" / "model.safetensors", sdir / "text_encoders" / "t5xxl_fp16.safetensors")
        for t in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            shutil.copytree(tmp / t, sdir / t)
        # Round trip through diffusers' own single-file loader proves the conversion.
        back = SD3Transformer2DModel.from_single_file(
            str(sdir / single_name), config=str(ddir), subfolder="transformer", torch_dtype=torch.float32
        ).state_dict()
        assert all(torch.equal(back[k], tsd[k]) for k in tsd), "transformer single-file round trip"
        vback = AutoencoderKL.from_single_file(
            str(sdir / single_name), config=str(ddir), subfolder="vae", torch_dtype=torch.float32
        ).state_dict()
        vsd = pipe.vae.state_dict()
        assert all(torch.equal(vback[k], vsd[k]) for k in vsd), "vae single-file round trip"

        # Each text encoder, for every prompt.
        if name == "large":
            enc = {}
            tokens = {}
            for pname, prompt in PROMPTS.items():
                tokens[pname] = token_ids(pipe, prompt, T5_SEQ_LEN)
                with torch.no_grad():
                    for k, v in encode_prompt_parts(pipe, prompt, T5_SEQ_LEN).items():
                        if k.startswith("t5") and pname in ("punctuation", "unicode"):
                            continue  # keeps the goldens small: token ids cover these prompts for T5
                        enc[f"{pname}.{k}"] = v.contiguous()
            tokens["long"]["t5_512"] = token_ids(pipe, LONG_PROMPT, 512)["t5"]
            save_file(enc, golden / "encoders.safetensors")
            (golden / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False, indent=1) + "\n")

            # VAE decode of a fixed latent.
            g = torch.Generator().manual_seed(5)
            z = torch.randn((1, LATENT_CHANNELS, 8, 12), generator=g)
            with torch.no_grad():
                img = pipe.vae.decode(z).sample
            save_file({"latents": z, "image": img.contiguous()}, golden / "vae_decode.safetensors")

            # Scheduler schedules.
            sched = {}
            for n in (1, 4, 6, 28, 40):
                pipe.scheduler.set_timesteps(n)
                sched[str(n)] = {
                    "timesteps": [float(t) for t in pipe.scheduler.timesteps],
                    "sigmas": [float(s) for s in pipe.scheduler.sigmas],
                }
            (golden / "scheduler.json").write_text(json.dumps(sched, indent=1) + "\n")

        # One transformer forward on fixed inputs (batch 2 like CFG), and with skipped layers.
        g = torch.Generator().manual_seed(m["seed"] + 7)
        fwd = {
            "hidden_states": torch.randn((2, LATENT_CHANNELS, 8, 12), generator=g),
            "encoder_hidden_states": torch.randn((2, CLIP_MAX_LEN + 8, 192), generator=g),
            "pooled_projections": torch.randn((2, 192), generator=g),
            "timestep": torch.tensor([937.5, 937.5]),
        }
        with torch.no_grad():
            fwd["output"] = pipe.transformer(**{k: v for k, v in fwd.items()}, return_dict=False)[0]
            fwd["output_skip1"] = pipe.transformer(
                **{k: v for k, v in fwd.items() if k != "output"}, skip_layers=[1], return_dict=False
            )[0]
        save_file({k: v.contiguous() for k, v in fwd.items()}, golden / f"transformer_{name}.safetensors")

        # End to end, from fixed initial latents.
        cases = [
            dict(id=f"{name}_cfg", prompt=PROMPTS["punctuation"], negative_prompt="", steps=4, guidance=3.5,
                 width=96, height=64, t5_len=T5_SEQ_LEN),
            dict(id=f"{name}_noguidance", prompt=PROMPTS["unicode"], negative_prompt="", steps=2, guidance=1.0,
                 width=64, height=64, t5_len=T5_SEQ_LEN),
        ]
        if name == "large":
            # SD3.5 large turbo's model card on the same architecture: 4 steps, no guidance.
            cases.append(dict(id="turbo_default", prompt=PROMPTS["punctuation"], negative_prompt="", steps=4,
                              guidance=0.0, width=64, height=48, t5_len=T5_SEQ_LEN))
        if name == "medium":
            cases.append(dict(id="medium_slg", prompt=PROMPTS["long"], negative_prompt="blurry, low quality",
                              steps=6, guidance=4.5, width=64, height=64, t5_len=T5_SEQ_LEN,
                              slg_layers=[1], slg_scale=2.8, slg_start=0.01, slg_stop=0.5))
            # The model card's defaults (what a server serves): skip-layer guidance on blocks 7, 8, 9
            # for steps i with 0.01 n < i < 0.2 n, i.e. steps 1 and 2 of 12.
            cases.append(dict(id="medium_default", prompt=PROMPTS["punctuation"], negative_prompt="", steps=12,
                              guidance=4.5, width=48, height=48, t5_len=T5_SEQ_LEN,
                              slg_layers=[7, 8, 9], slg_scale=2.8, slg_start=0.01, slg_stop=0.2))
        for case in cases:
            g = torch.Generator().manual_seed(1234)
            lat = torch.randn((1, LATENT_CHANNELS, case["height"] // 8, case["width"] // 8), generator=g)
            final, image, pixels = run_e2e(pipe, case, lat)
            save_file({"latents": lat}, golden / f"e2e_{case['id']}.init.safetensors")
            save_file({"latents": final.contiguous(), "image": image.contiguous(), "pixels": pixels},
                      golden / f"e2e_{case['id']}.safetensors")
            case["model"] = f"sd35-tiny-{name}"
            manifest["cases"].append(case)

        if name == "large":
            # ComfyUI-style fp8_scaled all-in-one checkpoint and its own reference outputs.
            fdir = out / "sd35-tiny-large-fp8"
            fdir.mkdir()
            t5sd = {k: v for k, v in pipe.text_encoder_3.state_dict().items() if k != "encoder.embed_tokens.weight"}
            fp8 = fp8_scaled(single_mmdit := {k.removeprefix("model.diffusion_model."): v for k, v in single.items()
                                              if k.startswith("model.diffusion_model.")},
                             "model.diffusion_model.", mmdit_is_linear)
            fp8.update(fp8_scaled(t5sd, "text_encoders.t5xxl.transformer.", t5_is_linear))
            del fp8["text_encoders.t5xxl.transformer.scaled_fp8"]
            fp8["text_encoders.t5xxl.transformer.scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
            for k, v in pipe.text_encoder.state_dict().items():
                fp8["text_encoders.clip_l.transformer." + k] = v.to(torch.bfloat16).contiguous()
            for k, v in pipe.text_encoder_2.state_dict().items():
                fp8["text_encoders.clip_g.transformer." + k] = v.to(torch.bfloat16).contiguous()
            for k, v in single.items():
                if k.startswith("first_stage_model."):
                    fp8[k] = v.to(torch.bfloat16).contiguous()
            save_file(fp8, fdir / "sd3.5_large_fp8_scaled.safetensors")
            for t in ("tokenizer", "tokenizer_2", "tokenizer_3"):
                shutil.copytree(tmp / t, fdir / t)
            del single_mmdit

            # Load the file back into diffusers the way a consumer dequantises it.
            sd = dequantize_fp8(load_file(fdir / "sd3.5_large_fp8_scaled.safetensors"))
            qpipe = StableDiffusion3Pipeline.from_pretrained(ddir, torch_dtype=torch.float32)
            qpipe.transformer.load_state_dict(stability_to_diffusers_mmdit(
                {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}, m["layers"], m["dual"]))
            pre = "text_encoders.t5xxl.transformer."
            t5q = {k.removeprefix(pre): v for k, v in sd.items() if k.startswith(pre)}
            t5q["encoder.embed_tokens.weight"] = t5q["shared.weight"]
            qpipe.text_encoder_3.load_state_dict(t5q)
            for attr, pre in [("text_encoder", "text_encoders.clip_l.transformer."),
                              ("text_encoder_2", "text_encoders.clip_g.transformer.")]:
                getattr(qpipe, attr).load_state_dict({k.removeprefix(pre): v for k, v in sd.items()
                                                      if k.startswith(pre)})
            vq = {}
            for k, v in pipe.vae.state_dict().items():
                vq[k] = v.to(torch.bfloat16).to(torch.float32)
            qpipe.vae.load_state_dict(vq)
            case = dict(manifest["cases"][0])
            case.update(id="large_fp8_cfg", model="sd35-tiny-large-fp8")
            g = torch.Generator().manual_seed(1234)
            lat = torch.randn((1, LATENT_CHANNELS, case["height"] // 8, case["width"] // 8), generator=g)
            final, image, pixels = run_e2e(qpipe, case, lat)
            save_file({"latents": lat}, golden / f"e2e_{case['id']}.init.safetensors")
            save_file({"latents": final.contiguous(), "image": image.contiguous(), "pixels": pixels},
                      golden / f"e2e_{case['id']}.safetensors")
            f32 = load_file(golden / "e2e_large_cfg.safetensors")
            case["reference_psnr_vs_f32_db"] = psnr(image, f32["image"])
            case["reference_rel_err_latents_vs_f32"] = rel_err(final, f32["latents"])
            manifest["cases"].append(case)

    shutil.rmtree(tmp)
    manifest["versions"] = {
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
        "tokenizers": __import__("tokenizers").__version__,
    }
    (golden / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.1f} MB)")
    for c in manifest["cases"]:
        if "reference_psnr_vs_f32_db" in c:
            print(f"{c['id']}: reference fp8 PSNR vs f32 {c['reference_psnr_vs_f32_db']:.2f} dB")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
