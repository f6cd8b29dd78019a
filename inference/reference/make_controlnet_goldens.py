#!/usr/bin/env python3
"""Tiny SD3.5-style ControlNets for the tiny large model under ../testdata, and diffusers'
outputs with them.

Reads the tiny models `make_tiny_models.py` wrote (it does not change them) and writes, under
`../testdata/controlnet/`, two random `SD3ControlNetModel`s configured as Stability's SD3.5
Large ControlNets are (`joint_attention_dim: null`: single-stream blocks and no text;
`use_pos_embed: false`: the transformer's patch embedding is shared; `force_zeros_for_pooled_
projection: false`: the real pooled vector), sized for `sd35-tiny-large` (2 heads of 16, patch
2, 16 latent channels, pooled 192), with 2 blocks each. Every weight is random, the
zero-initialised `controlnet_blocks` and `pos_embed_input` included, so the residuals are not
zero. Each is written in two layouts:

- `canny/`, `blur/`: diffusers folders (`config.json` + `diffusion_pytorch_model.safetensors`;
  `blur/` is sharded with its index json);
- `sd3.5_large_controlnet_canny.safetensors`, `sd3.5_large_controlnet_blur.safetensors`: the
  single-file layout of Stability's sd3.5 repository (`ControlNetEmbedder`: `t_embedder`,
  `y_embedder`, `transformer_blocks.{i}.adaLN_modulation.1` / `.attn.qkv` / `.attn.proj` /
  `.mlp.fc1` / `.mlp.fc2`, `controlnet_blocks.{i}`, `pos_embed_input.proj` and an `x_embedder`
  the SD3.5 models do not use). The blocks' adaLN keeps diffusers' chunk order: no block is
  "pre-only", so nothing is swapped.

Goldens under `../testdata/golden/` (cases in `golden/controlnets.json`):

- `controlnet_forward_{canny,blur}.safetensors`: the ControlNet alone on fixed inputs, a batch
  of two: `latents` [2,16,6,8], `x_embedded` (the tiny transformer's `pos_embed` of them, with
  its position table) [2,12,32], `control_latents` [2,16,6,8], `pooled` [2,192], `timestep`
  [2], `scale` [1], and the residuals `residual.{i}` [2,12,32] (already × scale); canny also
  `residual_zero_pooled.{i}`, the residuals with a zero pooled vector (what
  `force_zeros_for_pooled_projection: true` makes the pipeline pass);
- `controlnet_<id>.safetensors` / `.init.safetensors`: `StableDiffusion3ControlNetPipeline`
  on the tiny large model with fixed initial latents: final `latents`, decoded `image` in
  [0, 1], 8-bit `pixels`; and the initial `latents`;
- `controlnet_canny.png`, `controlnet_blur.png`: the control images (64x48 RGB) the pipelines
  took, used as given (no preprocessing).

The pipeline encodes the control image with `latent_dist.sample()`, from the global RNG; the
script replaces that one method with the posterior's mean, as the serving pipeline encodes
control images. Everything else is diffusers' own.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from safetensors.torch import save_file

from diffusers import SD3ControlNetModel, SD3Transformer2DModel, StableDiffusion3ControlNetPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from make_tiny_models import perturb_

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
GOLDEN = TESTDATA / "golden"
OUT = TESTDATA / "controlnet"
BASE = "sd35-tiny-large"
PROMPT = "a stone bridge over a river, ink drawing"
NEGATIVE = "blurry"
SIZE = (64, 48)  # width, height
STEPS = 5
T5_LEN = 256
NOISE_SEED = 2718
FORWARD_SCALE = 0.8
FORWARD_TIMESTEPS = [750.0, 123.5]

CONTROLNETS = {"canny": 11, "blur": 29}  # flavour: seed


def posterior_mean(self, generator=None):
    return self.mean


def build_controlnet(base_cfg, seed):
    torch.manual_seed(seed)
    model = SD3ControlNetModel(
        sample_size=base_cfg["sample_size"],
        patch_size=base_cfg["patch_size"],
        in_channels=base_cfg["in_channels"],
        num_layers=2,
        attention_head_dim=base_cfg["attention_head_dim"],
        num_attention_heads=base_cfg["num_attention_heads"],
        joint_attention_dim=None,
        pooled_projection_dim=base_cfg["pooled_projection_dim"],
        out_channels=base_cfg["out_channels"],
        pos_embed_max_size=None,
        pos_embed_type=None,
        use_pos_embed=False,
        force_zeros_for_pooled_projection=False,
    )
    return perturb_(model, seed + 1).eval()


def controlnet_to_stability(sd, num_layers, hidden, in_channels, patch, seed):
    out = {
        "pos_embed_input.proj.weight": sd["pos_embed_input.proj.weight"],
        "pos_embed_input.proj.bias": sd["pos_embed_input.proj.bias"],
    }
    for src, dst in [("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")]:
        for i, j in [(1, 0), (2, 2)]:
            for p in ("weight", "bias"):
                out[f"{dst}.mlp.{j}.{p}"] = sd[f"time_text_embed.{src}.linear_{i}.{p}"]
    for i in range(num_layers):
        d = s = f"transformer_blocks.{i}"
        for p in ("weight", "bias"):
            out[f"{s}.adaLN_modulation.1.{p}"] = sd[f"{d}.norm1.linear.{p}"]
            out[f"{s}.attn.qkv.{p}"] = torch.cat([sd[f"{d}.attn.to_{c}.{p}"] for c in "qkv"])
            out[f"{s}.attn.proj.{p}"] = sd[f"{d}.attn.to_out.0.{p}"]
            out[f"{s}.mlp.fc1.{p}"] = sd[f"{d}.ff.net.0.proj.{p}"]
            out[f"{s}.mlp.fc2.{p}"] = sd[f"{d}.ff.net.2.{p}"]
            out[f"controlnet_blocks.{i}.{p}"] = sd[f"controlnet_blocks.{i}.{p}"]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values()), "unmapped weights"
    # Stability's ControlNetEmbedder also carries a patch embedding of its own, which the SD3.5
    # models never use (the transformer's embedding is shared): random, to be ignored.
    g = torch.Generator().manual_seed(seed)
    out["x_embedder.proj.weight"] = torch.randn((hidden, in_channels, patch, patch), generator=g)
    out["x_embedder.proj.bias"] = torch.randn((hidden,), generator=g)
    return {k: v.contiguous() for k, v in out.items()}


def canny_like_image():
    """White one-pixel outlines on black, as an edge detector draws them."""
    w, h = SIZE
    img = np.zeros((h, w), dtype=np.uint8)
    img[6, 5:30] = img[30, 5:30] = 255
    img[6:31, 5] = img[6:31, 29] = 255
    y, x = np.mgrid[0:h, 0:w]
    ring = np.abs(np.sqrt((x - 46.0) ** 2 + (y - 27.0) ** 2) - 11.0) < 0.6
    img[ring] = 255
    img[40, 2:62] = 255
    return Image.fromarray(np.stack([img] * 3, axis=-1), "RGB")


def blur_image():
    """A picture with colour regions, blurred as the blur ControlNet's inputs are."""
    w, h = SIZE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.where(x < 30, 210, 40)
    g = 255 * (y / (h - 1))
    b = np.where((x - 44) ** 2 + (y - 22) ** 2 < 120, 240, 30)
    rgb = np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").filter(ImageFilter.GaussianBlur(3))


def run(pipe, case, control_image, noise):
    with torch.no_grad():
        final = pipe(
            prompt=case["prompt"],
            negative_prompt=case["negative_prompt"],
            control_image=control_image,
            controlnet_conditioning_scale=case["scale"],
            control_guidance_start=case["control_guidance_start"],
            control_guidance_end=case["control_guidance_end"],
            num_inference_steps=case["steps"],
            guidance_scale=case["guidance"],
            height=case["height"],
            width=case["width"],
            latents=noise.clone(),
            max_sequence_length=case["t5_len"],
            output_type="latent",
        ).images
        decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    image = (decoded / 2 + 0.5).clamp(0, 1)
    pixels = (image.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return final, image, torch.from_numpy(pixels.copy())


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    DiagonalGaussianDistribution.sample = posterior_mean
    base_cfg = json.loads((TESTDATA / BASE / "transformer" / "config.json").read_text())
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)

    # The ControlNets, in both layouts.
    hidden = base_cfg["num_attention_heads"] * base_cfg["attention_head_dim"]
    for name, seed in CONTROLNETS.items():
        model = build_controlnet(base_cfg, seed)
        # The blur one is sharded, as large diffusers checkpoints are.
        model.save_pretrained(OUT / name, max_shard_size="100KB" if name == "blur" else "10GB")
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        stability = controlnet_to_stability(sd, model.config.num_layers, hidden, base_cfg["in_channels"],
                                            base_cfg["patch_size"], seed + 2)
        save_file(stability, OUT / f"sd3.5_large_controlnet_{name}.safetensors")

    # The ControlNet alone on fixed inputs.
    transformer = SD3Transformer2DModel.from_pretrained(TESTDATA / BASE / "transformer").eval()
    w, h = SIZE
    g = torch.Generator().manual_seed(31)
    latents = torch.randn((2, 16, h // 8, w // 8), generator=g)
    control_latents = torch.randn((2, 16, h // 8, w // 8), generator=g)
    pooled = torch.randn((2, base_cfg["pooled_projection_dim"]), generator=g)
    timestep = torch.tensor(FORWARD_TIMESTEPS)
    forward_cases = []
    with torch.no_grad():
        x_embedded = transformer.pos_embed(latents)
        for name in CONTROLNETS:
            cn = SD3ControlNetModel.from_pretrained(OUT / name).eval()
            tensors = {
                "latents": latents,
                "x_embedded": x_embedded,
                "control_latents": control_latents,
                "pooled": pooled,
                "timestep": timestep,
                "scale": torch.tensor([FORWARD_SCALE]),
            }
            outs = cn(hidden_states=x_embedded, controlnet_cond=control_latents, conditioning_scale=FORWARD_SCALE,
                      pooled_projections=pooled, timestep=timestep, return_dict=False)[0]
            for i, r in enumerate(outs):
                tensors[f"residual.{i}"] = r
            if name == "canny":
                zero = cn(hidden_states=x_embedded, controlnet_cond=control_latents,
                          conditioning_scale=FORWARD_SCALE, pooled_projections=torch.zeros_like(pooled),
                          timestep=timestep, return_dict=False)[0]
                for i, r in enumerate(zero):
                    tensors[f"residual_zero_pooled.{i}"] = r
            save_file({k: v.contiguous() for k, v in tensors.items()}, GOLDEN / f"controlnet_forward_{name}.safetensors")
            forward_cases.append(dict(
                file=f"controlnet_forward_{name}.safetensors",
                controlnet=f"controlnet/{name}",
                single_file=f"controlnet/sd3.5_large_controlnet_{name}.safetensors",
                scale=FORWARD_SCALE,
                timesteps=FORWARD_TIMESTEPS,
                residuals=len(outs),
            ))
            print("forward", name, [float(r.abs().mean()) for r in outs])

    # End to end.
    images = {"canny": canny_like_image(), "blur": blur_image()}
    for name, img in images.items():
        img.save(GOLDEN / f"controlnet_{name}.png")
    noise = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator().manual_seed(NOISE_SEED))
    cases = [
        dict(id="canny_50", mode="canny", scale=0.5, guidance=0.0, negative_prompt=""),
        dict(id="canny_100", mode="canny", scale=1.0, guidance=0.0, negative_prompt=""),
        dict(id="blur_70_cfg", mode="blur", scale=0.7, guidance=3.5, negative_prompt=NEGATIVE),
        dict(id="blur_100", mode="blur", scale=1.0, guidance=0.0, negative_prompt=""),
        dict(id="canny_window", mode="canny", scale=1.0, guidance=0.0, negative_prompt="",
             control_guidance_start=0.2, control_guidance_end=0.8),
    ]
    for case in cases:
        case.setdefault("control_guidance_start", 0.0)
        case.setdefault("control_guidance_end", 1.0)
        case.update(
            model=BASE,
            controlnet=f"controlnet/{case['mode']}",
            single_file=f"controlnet/sd3.5_large_controlnet_{case['mode']}.safetensors",
            control_image=f"controlnet_{case['mode']}.png",
            prompt=PROMPT,
            steps=STEPS,
            width=w,
            height=h,
            t5_len=T5_LEN,
        )
        # The pipeline replaces the ControlNet's patch embedding with the transformer's: a
        # fresh ControlNet per pipeline.
        controlnet = SD3ControlNetModel.from_pretrained(OUT / case["mode"])
        pipe = StableDiffusion3ControlNetPipeline.from_pretrained(TESTDATA / BASE, controlnet=controlnet,
                                                                  torch_dtype=torch.float32)
        final, decoded, pixels = run(pipe, case, images[case["mode"]], noise)
        save_file({"latents": noise.contiguous()}, GOLDEN / f"controlnet_{case['id']}.init.safetensors")
        save_file({"latents": final.contiguous(), "image": decoded.contiguous(), "pixels": pixels},
                  GOLDEN / f"controlnet_{case['id']}.safetensors")
        print(case["id"], "done")

    manifest = {
        "forward": forward_cases,
        "cases": cases,
        "versions": {
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
    (GOLDEN / "controlnets.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
