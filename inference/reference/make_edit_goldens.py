#!/usr/bin/env python3
"""Golden outputs of diffusers' SD3 image editing on the tiny models under ../testdata.

Reads the tiny models `make_tiny_models.py` wrote (it does not change them) and records what
`StableDiffusion3Img2ImgPipeline` and `StableDiffusion3InpaintPipeline` compute with them, for
`../pipeline/tests/edit_parity.rs`:

- an input image and a mask, drawn here deterministically and saved as PNG files
  (`golden/edit_image.png`, `golden/edit_mask.png`: white = repaint);
- for large with guidance, large-turbo's defaults (no guidance) and medium (guidance, no
  skip-layer guidance: the edit pipelines have none), at two strengths whose schedules start
  at different steps: img2img, and inpainting with the mask;
- per case: the initial noise (`edit_<id>.init.safetensors`, what `--init-latents` gives the
  Rust side), the final latents, the decoded image in [0, 1] and its 8-bit pixels.

The VAE encodes with the posterior's mean (`retrieve_latents(..., sample_mode="argmax")`): the
pipelines' default samples it from the generator, which would make an edit depend on state no
request controls. The script patches that one function; everything else is diffusers' own.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img as img2img_module
import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint as inpaint_module
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
GOLDEN = TESTDATA / "golden"
SIZE = (64, 48)  # width, height: multiples of 16, not square
NOISE_SEED = 4321
T5_LEN = 256
PROMPT = "a red fox in the snow, oil painting"


def argmax_latents(encoder_output, generator=None, sample_mode="argmax"):
    return encoder_output.latent_dist.mode()


def input_image():
    """A deterministic picture with edges, gradients and flat regions."""
    w, h = SIZE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 120 * np.sin(x / 7.0)
    g = 255 * (y / (h - 1))
    b = np.where((x - 40) ** 2 + (y - 20) ** 2 < 150, 230, 40)
    rgb = np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def input_mask():
    """White (repaint) over a rectangle that does not sit on the 8-pixel grid."""
    w, h = SIZE
    m = np.zeros((h, w), dtype=np.uint8)
    m[13:37, 5:42] = 255
    return Image.fromarray(m, "L")


def run(pipe, case, image, mask, noise):
    kwargs = dict(
        prompt=PROMPT,
        negative_prompt=case["negative_prompt"],
        image=image,
        strength=case["strength"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance"],
        max_sequence_length=T5_LEN,
        generator=torch.Generator().manual_seed(NOISE_SEED),
        output_type="latent",
        # Both pipelines resize to their default size otherwise.
        height=SIZE[1],
        width=SIZE[0],
    )
    if mask is not None:
        kwargs.update(mask_image=mask)
    with torch.no_grad():
        final = pipe(**kwargs).images
        decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    image = (decoded / 2 + 0.5).clamp(0, 1)
    pixels = (image.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return final, image, torch.from_numpy(pixels.copy())


def main():
    torch.set_num_threads(1)
    img2img_module.retrieve_latents = argmax_latents
    inpaint_module.retrieve_latents = argmax_latents
    image, mask = input_image(), input_mask()
    image.save(GOLDEN / "edit_image.png")
    mask.save(GOLDEN / "edit_mask.png")
    w, h = SIZE
    noise = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator().manual_seed(NOISE_SEED))

    models = {
        "large": dict(model="sd35-tiny-large", guidance=3.5, steps=5, negative_prompt="blurry"),
        "turbo": dict(model="sd35-tiny-large", guidance=0.0, steps=4, negative_prompt=""),
        "medium": dict(model="sd35-tiny-medium", guidance=4.5, steps=5, negative_prompt="blurry"),
    }
    # 5 steps: strength 0.5 starts at step 2, 0.8 at step 1 (and 0.6 too: 5 × 0.6 is
    # 3.0000000000000004 in floating point). 4 steps: 0.5 at 2, 0.75 at 1.
    strengths = {"large": (0.5, 0.8), "turbo": (0.5, 0.75), "medium": (0.5, 0.8)}
    cases = []
    for name, m in models.items():
        img2img = StableDiffusion3Img2ImgPipeline.from_pretrained(TESTDATA / m["model"], torch_dtype=torch.float32)
        inpaint = StableDiffusion3InpaintPipeline.from_pretrained(TESTDATA / m["model"], torch_dtype=torch.float32)
        for kind, pipe, use_mask in (("img2img", img2img, False), ("inpaint", inpaint, True)):
            for strength in strengths[name]:
                case = dict(
                    id=f"{kind}_{name}_{int(round(strength * 100))}",
                    kind=kind,
                    model=m["model"],
                    prompt=PROMPT,
                    negative_prompt=m["negative_prompt"],
                    steps=m["steps"],
                    guidance=m["guidance"],
                    strength=strength,
                    width=w,
                    height=h,
                    t5_len=T5_LEN,
                )
                final, decoded, pixels = run(pipe, case, image, mask if use_mask else None, noise)
                save_file({"latents": noise.contiguous()}, GOLDEN / f"edit_{case['id']}.init.safetensors")
                save_file({"latents": final.contiguous(), "image": decoded.contiguous(), "pixels": pixels},
                          GOLDEN / f"edit_{case['id']}.safetensors")
                cases.append(case)
                print(case["id"], "done")
    manifest = {
        "image": "edit_image.png",
        "mask": "edit_mask.png",
        "cases": cases,
        "versions": {
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
    (GOLDEN / "edits.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
