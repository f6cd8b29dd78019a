#!/usr/bin/env python3
"""CPU benchmark: our pipeline (`sd35-server generate`) against diffusers, side by side.

Both run the same random-weight SD3 transformer big enough to be compute-bound (by default
hidden 1536 = 24 heads of 64, depth 2), with the tiny text encoders and VAE of
inference/testdata, at 512x512 for 4 steps with classifier-free guidance, from the same initial
latents, in f32, each in its own process with the same thread count. Prints seconds per step
(median), the ratio, each process's peak RSS and minor page faults, and how far apart the two
images are. With `--repeat N` the pair runs N times, alternating, and each run's ratio is printed
with their median.

Run by hand from the repository root, in the reference venv (see README.md beside this file):
    cargo build --release -p sd35-server
    python inference/reference/benchmark.py [--threads N] [--repeat N]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "inference" / "testdata" / "sd35-tiny-large"
PROMPT = "a photo of an astronaut riding a horse on the moon"

DIFFUSERS_RUN = r"""
import json, sys, time, torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file
model, latents_file, out, steps, guidance, size, threads = sys.argv[1:8]
torch.set_num_threads(int(threads))
pipe = StableDiffusion3Pipeline.from_pretrained(model, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
latents = load_file(latents_file)["latents"]
marks = []
def on_step(p, i, t, kw):
    marks.append(time.perf_counter())
    return kw
with torch.inference_mode():
    start = time.perf_counter()
    image = pipe(prompt=sys.argv[8], negative_prompt="", num_inference_steps=int(steps),
                 guidance_scale=float(guidance), height=int(size), width=int(size), latents=latents,
                 callback_on_step_end=on_step).images[0]
image.save(out)
steps_s = [b - a for a, b in zip([start] + marks[:-1], marks)]
print(json.dumps({"steps": steps_s}))
"""


def build_model(work: Path, hidden: int, depth: int, size: int) -> Path:
    import torch
    from diffusers import SD3Transformer2DModel

    model = work / "model"
    shutil.copytree(TINY, model)
    shutil.rmtree(model / "transformer")
    torch.manual_seed(0)
    t = SD3Transformer2DModel(
        sample_size=size // 8,
        patch_size=2,
        in_channels=16,
        num_layers=depth,
        attention_head_dim=64,
        num_attention_heads=hidden // 64,
        joint_attention_dim=192,
        caption_projection_dim=hidden,
        pooled_projection_dim=192,
        out_channels=16,
        pos_embed_max_size=max(size // 16, 16),
        qk_norm="rms_norm",
    )
    t.save_pretrained(model / "transformer", safe_serialization=True)
    return model


def run(cmd, env):
    """Runs `cmd`; returns (stdout+stderr, peak RSS in MiB, minor page faults) of that process."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}):\n{out}")
    return out, usage.ru_maxrss / 1024, usage.ru_minflt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--repeat", type=int, default=1, help="run the pair this many times, alternating")
    ap.add_argument("--binary", default=str(ROOT / "target" / "release" / "sd35-server"))
    args = ap.parse_args()
    if not Path(args.binary).is_file():
        sys.exit(f"{args.binary} not found: run `cargo build --release -p sd35-server` first")

    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="sd35-bench-") as tmp:
        work = Path(tmp)
        model = build_model(work, args.hidden, args.depth, args.size)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn((1, 16, args.size // 8, args.size // 8), generator=g)
        save_file({"latents": latents}, work / "latents.safetensors")
        common = [str(args.steps), str(args.guidance), str(args.size)]

        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
                   NO_COLOR="1", RUST_LOG="info")
        runs = []
        for i in range(args.repeat):
            ours_out, ours_rss, ours_flt = run(
                [args.binary, "generate", "--model", str(model), "--prompt", PROMPT, "--out",
                 str(work / "ours.png"), "--steps", common[0], "--guidance", common[1], "--width", common[2],
                 "--height", common[2], "--init-latents", str(work / "latents.safetensors"), "--precision", "f32"],
                env,
            )
            clean = re.sub(r"\x1b\[[0-9;]*m", "", ours_out)
            ours_steps = [float(m) for m in re.findall(r"step done .*?seconds=([0-9.eE+-]+)", clean)]
            ref_out, ref_rss, ref_flt = run(
                [sys.executable, "-c", DIFFUSERS_RUN, str(model), str(work / "latents.safetensors"),
                 str(work / "ref.png"), *common, str(args.threads), PROMPT],
                env,
            )
            ref_steps = json.loads(ref_out.strip().splitlines()[-1])["steps"]
            runs.append(dict(ours=statistics.median(ours_steps), ref=statistics.median(ref_steps),
                             ours_rss=ours_rss, ref_rss=ref_rss, ours_flt=ours_flt, ref_flt=ref_flt))
            if args.repeat > 1:
                r = runs[-1]
                print(f"run {i + 1}: ours {r['ours']:.3f} s/step, diffusers {r['ref']:.3f} s/step, "
                      f"ratio {r['ours'] / r['ref']:.2f}", flush=True)
        a = np.asarray(Image.open(work / "ours.png"), dtype=np.int16)
        b = np.asarray(Image.open(work / "ref.png"), dtype=np.int16)

    print(f"SD3 transformer hidden {args.hidden}, depth {args.depth}, {args.size}x{args.size}, "
          f"{args.steps} steps, CFG {args.guidance}, f32, {args.threads} threads, torch {torch.__version__}")
    print()
    print("| run | sd35-server s/step | diffusers s/step | ratio | sd35-server peak RSS (MiB) "
          "| diffusers peak RSS (MiB) | sd35-server minor faults | diffusers minor faults |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(runs):
        print(f"| {i + 1} | {r['ours']:.3f} | {r['ref']:.3f} | {r['ours'] / r['ref']:.2f} | {r['ours_rss']:.0f} "
              f"| {r['ref_rss']:.0f} | {r['ours_flt']} | {r['ref_flt']} |")
    ratios = [r["ours"] / r["ref"] for r in runs]
    rss = [r["ours_rss"] / r["ref_rss"] for r in runs]
    print()
    print(f"time ratio ours/diffusers: {statistics.median(ratios):.2f} (median of {len(runs)}; "
          f"min {min(ratios):.2f}, max {max(ratios):.2f})   RSS ratio: {statistics.median(rss):.2f}")
    print(f"images: max pixel difference {int(np.abs(a - b).max())}, "
          f"{float((a == b).mean()) * 100:.2f}% of values identical")


if __name__ == "__main__":
    main()
