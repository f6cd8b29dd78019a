#!/usr/bin/env python3
"""LoRA adapters for the tiny models under ../testdata, and diffusers' outputs with them.

Reads the tiny models `make_tiny_models.py` wrote (it does not change them) and writes, under
`../testdata/lora/`:

- `style.safetensors`: a transformer LoRA in diffusers' PEFT format, as
  `StableDiffusion3Pipeline.save_lora_weights` writes it (rank 4, alpha 8, on the attention,
  context and feed-forward projections), with its adapter metadata;
- `detail.safetensors`: PEFT format on the transformer (rank 2, alpha 2, fewer modules,
  including the adaLN `norm1.linear`) and on both CLIP encoders (rank 2, alpha 4);
- `kohya.safetensors`: sd-scripts' naming on the Stability modules (`lora_unet_joint_blocks_0_
  x_block_attn_qkv`, one down matrix for the fused q/k/v, `.alpha` per module, the last context
  adaLN and the final layer in Stability's (shift, scale) order) and on CLIP (`lora_te1_…`,
  `lora_te2_…`). diffusers has no SD3 converter for this format, so the script converts it to
  PEFT itself (q/k/v rows split with the down matrix shared, alpha/rank folded into up, halves
  swapped to diffusers' order) and diffusers runs the converted adapter;
- `medium.safetensors`: a PEFT LoRA made for the tiny medium transformer (it must be refused
  on large: its shapes do not fit).

Goldens (`../testdata/golden/lora_<id>.safetensors`, cases in `golden/loras.json`): large with
guidance and fixed initial latents: one adapter, two adapters with different scales
(`set_adapters`), the kohya adapter, and an adapter over the fp8_scaled checkpoint (diffusers
on its dequantised weights, as make_tiny_models.py's fp8 golden).
"""

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import transformers.integrations.peft as transformers_peft
from diffusers import StableDiffusion3Pipeline
from make_tiny_models import dequantize_fp8, stability_to_diffusers_mmdit

# transformers 5.24 asks for peft >= 0.22 before adding an adapter to a text encoder; the newest
# peft on PyPI here is 0.21.2, whose LoRA layers are all this script uses.
transformers_peft.check_peft_version = lambda min_version: None

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
GOLDEN = TESTDATA / "golden"
OUT = TESTDATA / "lora"
PROMPT = "a lighthouse on a cliff at dawn, watercolour"
NEGATIVE = "blurry"
SIZE = (64, 48)
STEPS = 4
GUIDANCE = 3.5
T5_LEN = 256
NOISE_SEED = 99

TRANSFORMER_ALL = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                   "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
CLIP_ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def seeded_adapter(model, name, config, seed, spread):
    """Adds a PEFT adapter whose A and B are seeded random (B is zero by default)."""
    model.add_adapter(config, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in sorted(model.named_parameters()):
            if f".{name}." in key and ("lora_A" in key or "lora_B" in key):
                param.copy_(torch.randn(param.shape, generator=g) * spread)
    return get_peft_model_state_dict(model, adapter_name=name)


def metadata(config):
    """The adapter config as save_lora_weights records it, without the machine-local model path
    PEFT fills in when the adapter is added."""
    return {**config.to_dict(), "base_model_name_or_path": None}


def pipeline(model="sd35-tiny-large"):
    pipe = StableDiffusion3Pipeline.from_pretrained(TESTDATA / model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, noise, adapters):
    if adapters:
        pipe.set_adapters([a for a, _ in adapters], adapter_weights=[s for _, s in adapters])
    with torch.no_grad():
        final = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            width=SIZE[0],
            height=SIZE[1],
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            max_sequence_length=T5_LEN,
            latents=noise.clone(),
            output_type="latent",
        ).images
        decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    image = (decoded / 2 + 0.5).clamp(0, 1)
    pixels = (image.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return final, image, torch.from_numpy(pixels.copy())


def kohya_adapter(pipe, seed):
    """An sd-scripts-style SD3 LoRA on the Stability modules of the tiny large model."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    h = cfg.num_attention_heads * cfg.attention_head_dim
    layers = cfg.num_layers
    sd, rank = {}, 2

    def module(name, out_features, in_features, alpha):
        sd[f"{name}.lora_down.weight"] = torch.randn((rank, in_features), generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn((out_features, rank), generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))

    for i in range(layers):
        last = i == layers - 1
        b = f"lora_unet_joint_blocks_{i}"
        module(f"{b}_x_block_attn_qkv", 3 * h, h, 4)
        module(f"{b}_x_block_attn_proj", h, h, 1)
        module(f"{b}_x_block_mlp_fc1", 4 * h, h, 2)
        module(f"{b}_x_block_adaLN_modulation_1", 6 * h, h, 2)
        module(f"{b}_context_block_attn_qkv", 3 * h, h, 2)
        module(f"{b}_context_block_adaLN_modulation_1", (2 if last else 6) * h, h, 2)
    module("lora_unet_final_layer_adaLN_modulation_1", 2 * h, h, 2)
    module("lora_unet_context_embedder", h, cfg.joint_attention_dim, 2)
    te_hidden = pipe.text_encoder.config.hidden_size
    te2_hidden = pipe.text_encoder_2.config.hidden_size
    module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", te_hidden, te_hidden, 1)
    module("lora_te1_text_model_encoder_layers_1_mlp_fc1", pipe.text_encoder.config.intermediate_size,
           te_hidden, 2)
    module("lora_te2_text_model_encoder_layers_0_self_attn_v_proj", te2_hidden, te2_hidden, 2)
    return sd, layers


def swap_halves(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def kohya_to_peft(sd, layers):
    """The conversion the Rust loader performs, written out for diffusers to run."""
    out = {}

    def put(target, down, up):
        out[f"{target}.lora_A.weight"] = down.clone()
        out[f"{target}.lora_B.weight"] = up.clone()

    names = sorted({k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")})
    for name in names:
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        up = up * (sd[f"{name}.alpha"].item() / down.shape[0])
        if name.startswith("lora_te1_") or name.startswith("lora_te2_"):
            prefix = "text_encoder" if name.startswith("lora_te1_") else "text_encoder_2"
            rest = name.split("_", 2)[2]
            rest = rest.replace("text_model_encoder_layers_", "text_model.encoder.layers.")
            rest = rest.replace("_self_attn_", ".self_attn.").replace("_mlp_", ".mlp.")
            put(f"{prefix}.{rest}", down, up)
            continue
        if name == "lora_unet_final_layer_adaLN_modulation_1":
            put("transformer.norm_out.linear", down, swap_halves(up))
            continue
        if name == "lora_unet_context_embedder":
            put("transformer.context_embedder", down, up)
            continue
        i = int(name.split("_")[4])
        d = f"transformer.transformer_blocks.{i}"
        last = i == layers - 1
        kind = name.split(f"joint_blocks_{i}_", 1)[1]
        if kind == "x_block_attn_qkv":
            for c, part in zip("qkv", up.chunk(3)):
                put(f"{d}.attn.to_{c}", down, part)
        elif kind == "context_block_attn_qkv":
            for c, part in zip("qkv", up.chunk(3)):
                put(f"{d}.attn.add_{c}_proj", down, part)
        elif kind == "x_block_attn_proj":
            put(f"{d}.attn.to_out.0", down, up)
        elif kind == "x_block_mlp_fc1":
            put(f"{d}.ff.net.0.proj", down, up)
        elif kind == "x_block_adaLN_modulation_1":
            put(f"{d}.norm1.linear", down, up)
        elif kind == "context_block_adaLN_modulation_1":
            put(f"{d}.norm1_context.linear", down, swap_halves(up) if last else up)
        else:
            raise ValueError(name)
    return out


def load_peft(pipe, sd, name):
    """Loads a PEFT state dict with alpha = rank (scale folded into B) as adapter `name`."""
    pipe.load_lora_weights(sd, adapter_name=name)


def main():
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    w, h = SIZE
    noise = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator().manual_seed(NOISE_SEED))

    # The adapters, made on a scratch pipeline and saved as users get them.
    maker = pipeline()
    style_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TRANSFORMER_ALL, init_lora_weights=False)
    style = seeded_adapter(maker.transformer, "style", style_cfg, seed=1, spread=0.08)
    StableDiffusion3Pipeline.save_lora_weights(
        OUT, transformer_lora_layers=style, weight_name="style.safetensors",
        transformer_lora_adapter_metadata=metadata(style_cfg))
    detail_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "to_out.0", "norm1.linear"],
                            init_lora_weights=False)
    te_cfg = LoraConfig(r=2, lora_alpha=4, target_modules=CLIP_ALL, init_lora_weights=False)
    detail = seeded_adapter(maker.transformer, "detail", detail_cfg, seed=2, spread=0.1)
    te1 = seeded_adapter(maker.text_encoder, "detail", te_cfg, seed=3, spread=0.3)
    te2 = seeded_adapter(maker.text_encoder_2, "detail", te_cfg, seed=4, spread=0.3)
    StableDiffusion3Pipeline.save_lora_weights(
        OUT, transformer_lora_layers=detail, text_encoder_lora_layers=te1, text_encoder_2_lora_layers=te2,
        weight_name="detail.safetensors", transformer_lora_adapter_metadata=metadata(detail_cfg),
        text_encoder_lora_adapter_metadata=metadata(te_cfg), text_encoder_2_lora_adapter_metadata=metadata(te_cfg))
    kohya, layers = kohya_adapter(maker, seed=5)
    save_file(kohya, OUT / "kohya.safetensors")
    medium = pipeline("sd35-tiny-medium")
    med_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False)
    med = seeded_adapter(medium.transformer, "medium", med_cfg, seed=6, spread=0.1)
    StableDiffusion3Pipeline.save_lora_weights(
        OUT, transformer_lora_layers=med, weight_name="medium.safetensors",
        transformer_lora_adapter_metadata=metadata(med_cfg))
    del maker, medium

    cases = []

    def record(case_id, pipe, adapters, model, files):
        final, image, pixels = run(pipe, noise, adapters)
        save_file({"latents": final.contiguous(), "image": image.contiguous(), "pixels": pixels},
                  GOLDEN / f"lora_{case_id}.safetensors")
        cases.append(dict(id=case_id, model=model, loras=[dict(file=f, scale=s) for f, (_, s) in
                                                         zip(files, adapters)]))
        print(case_id, "done")

    pipe = pipeline()
    pipe.load_lora_weights(OUT / "style.safetensors", adapter_name="style")
    record("one", pipe, [("style", 1.0)], "sd35-tiny-large", ["style.safetensors"])
    pipe.load_lora_weights(OUT / "detail.safetensors", adapter_name="detail")
    record("two", pipe, [("style", 0.7), ("detail", 1.3)], "sd35-tiny-large",
           ["style.safetensors", "detail.safetensors"])

    pipe = pipeline()
    load_peft(pipe, kohya_to_peft(kohya, layers), "kohya")
    record("kohya", pipe, [("kohya", 0.8)], "sd35-tiny-large", ["kohya.safetensors"])

    # Over the fp8_scaled checkpoint, dequantised the way make_tiny_models.py's fp8 golden is.
    sd = dequantize_fp8(load_file(TESTDATA / "sd35-tiny-large-fp8" / "sd3.5_large_fp8_scaled.safetensors"))
    qpipe = pipeline()
    qpipe.transformer.load_state_dict(stability_to_diffusers_mmdit(
        {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}, layers, []))
    pre = "text_encoders.t5xxl.transformer."
    t5q = {k.removeprefix(pre): v for k, v in sd.items() if k.startswith(pre)}
    t5q["encoder.embed_tokens.weight"] = t5q["shared.weight"]
    qpipe.text_encoder_3.load_state_dict(t5q)
    for attr, pre in [("text_encoder", "text_encoders.clip_l.transformer."),
                      ("text_encoder_2", "text_encoders.clip_g.transformer.")]:
        getattr(qpipe, attr).load_state_dict({k.removeprefix(pre): v for k, v in sd.items() if k.startswith(pre)})
    qpipe.vae.load_state_dict({k: v.to(torch.bfloat16).to(torch.float32) for k, v in qpipe.vae.state_dict().items()})
    qpipe.load_lora_weights(OUT / "style.safetensors", adapter_name="style")
    record("fp8", qpipe, [("style", 1.0)], "sd35-tiny-large-fp8", ["style.safetensors"])

    save_file({"latents": noise.contiguous()}, GOLDEN / "lora.init.safetensors")
    manifest = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=w, height=h, steps=STEPS,
                    guidance=GUIDANCE, t5_len=T5_LEN, init="lora.init.safetensors", cases=cases,
                    versions={"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                              "peft": __import__("peft").__version__})
    (GOLDEN / "loras.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
