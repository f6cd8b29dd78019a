#!/usr/bin/env python3
"""GPU benchmark of sd35-server, with diffusers side by side, in one run that must not overrun.

Run through tools/device-bench.sh: it finds the CUDA libraries and passes the carried bundle
(the CUDA build of sd35-server, the diffusers wheel). Parts, in order; each one's failure is
caught and reported, and the parts that do not need its result still run:

  preflight   every Python package the script uses is imported and its version printed (diffusers
              installed from the carried wheel when the environment lacks it), the GPU described
              through NVML (name, memory, driver), the binary asked for its version.
  parity      the tiny models of inference/testdata on the device and on the CPU from one seed:
              f32 device vs CPU >= 45 dB; bf16 device vs f32 device and fp8 device vs fp8 CPU with
              the floors of the smoke gate (inference/pipeline/src/smoke.rs, read at run time);
              large with CFG, large-turbo, medium with skip-layer guidance (12 steps, so it runs on
              steps 1 and 2), and the prequantised single-file fp8 checkpoint.
  weights     SD3.5-Large-shaped random weights in the diffusers layout (38 blocks of 38 heads,
              real CLIP-L / CLIP-G / VAE shapes, no T5), made on the device with torch; the
              initial latents.
  large-bf16  sd35-server generate, 1024x1024, 28 steps, CFG 3.5, bf16: seconds per image and per
              step, peak GPU memory (NVML, device-wide above the level before) beside the peak
              `sd35-server plan` computes for the same request.
  diffusers   StableDiffusion3Pipeline (torch SDPA) on the same weights, latents and settings; the
              time ratio ours / diffusers and the PSNR between the two images.
  large-fp8   the same bf16 weights served as fp8, quantised at load (on the CPU cores, bytes
              uploaded): load time, seconds per step, peak GPU memory beside the plan's.
  medium      SD3.5-Medium-shaped random weights (MMDiT-X, 24 blocks), 12 steps at the model
              card's guidance with its skip-layer guidance (layers 7, 8, 9 on steps 1 and 2 of 12):
              the skip-layer steps' time beside the others', peak GPU memory beside the plan's.
  fp8-engine  `sd35-server build-engine --precision fp8` for the Large weights on the CPU cores
              (convert, hash, a CPU smoke image of the 8B model): the slowest and least certain
              part, so it runs last, only when the budget still has room, or never with
              --skip-fp8-build. Serving fp8 is measured by large-fp8 either way.

Time: every part has an estimate; an optional part is skipped when less budget is left than its
estimate, and every command is killed when the budget runs out, so the summary always prints.
The summary (markdown: the device, each figure and the command that produced it) goes to stdout
and, with --out FILE.json, to FILE.json and FILE.md; the JSON is rewritten after every part.

Exit status: 0 when every part that ran passed, 1 otherwise. `--dry-run` runs the same parts on
the CPU with small shapes (the device side on the GPU's op graph, SD35_GENERIC_OPS=1).
"""

import argparse
import datetime
import hashlib
import importlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "inference" / "testdata"
SMOKE_RS = ROOT / "inference" / "pipeline" / "src" / "smoke.rs"
PROMPT = "a photo of an astronaut riding a horse on the moon"
F32_FLOOR_DB = 45.0
# Seconds kept back from every command's time limit, for the summary.
RESERVE_S = 10.0

# SD3.5 shapes of the random pipelines: the published ones, and small ones for dry runs.
SHAPES = {
    "large": {
        "large": dict(num_layers=38, num_attention_heads=38, attention_head_dim=64,
                      caption_projection_dim=2432, joint_attention_dim=4096,
                      pooled_projection_dim=2048, pos_embed_max_size=192, sample_size=128),
        "medium": dict(num_layers=24, num_attention_heads=24, attention_head_dim=64,
                       caption_projection_dim=1536, joint_attention_dim=4096,
                       pooled_projection_dim=2048, pos_embed_max_size=384, sample_size=128,
                       dual_attention_layers=list(range(13))),
        "clip_l": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                       num_hidden_layers=12, projection_dim=768),
        "clip_g": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                       num_hidden_layers=32, projection_dim=1280),
        "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
    },
    "small": {
        "large": dict(num_layers=2, num_attention_heads=4, attention_head_dim=64,
                      caption_projection_dim=256, joint_attention_dim=256,
                      pooled_projection_dim=192, pos_embed_max_size=32, sample_size=32),
        # Ten blocks, so the model card's skip-layer guidance layers (7, 8, 9) exist.
        "medium": dict(num_layers=10, num_attention_heads=2, attention_head_dim=64,
                       caption_projection_dim=128, joint_attention_dim=256,
                       pooled_projection_dim=192, pos_embed_max_size=32, sample_size=32,
                       dual_attention_layers=[0, 1, 2]),
        "clip_l": dict(hidden_size=64, intermediate_size=128, num_attention_heads=1,
                       num_hidden_layers=2, projection_dim=64),
        "clip_g": dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                       num_hidden_layers=2, projection_dim=128),
        "vae": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32),
    },
}

# The Python packages every part together imports: (import name, distribution name).
PACKAGES = [("torch", "torch"), ("transformers", "transformers"), ("accelerate", "accelerate"),
            ("safetensors", "safetensors"), ("PIL", "pillow"), ("numpy", "numpy"),
            ("pynvml", "nvidia-ml-py"), ("diffusers", "diffusers")]

# Random SD3.5-shaped weights in the diffusers layout, made in a process of their own so that the
# benchmark's own process never holds GPU memory. argv[1]: a JSON file (see make_weights).
WEIGHTS_RUN = r"""
import json, shutil, sys, time
from pathlib import Path
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

job = json.loads(Path(sys.argv[1]).read_text())
start = time.perf_counter()
shape, dev, out = job["shape"], torch.device(job["device"]), Path(job["out"])
tiny = Path(job["tiny"])
if out.exists():
    shutil.rmtree(out)
out.mkdir(parents=True)
for sub in ("tokenizer", "tokenizer_2", "scheduler"):
    shutil.copytree(tiny / sub, out / sub)
index = json.loads((tiny / "model_index.json").read_text())
index["text_encoder_3"] = [None, None]
index["tokenizer_3"] = [None, None]
(out / "model_index.json").write_text(json.dumps(index, indent=2))
gen = torch.Generator(device=dev).manual_seed(job["seed"])

def randomise(module):
    # Trained-like magnitudes keep 38 bf16 blocks finite: N(0, 0.02) matrices, unit norms.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return module

def save(module, sub):
    module.to("cpu").save_pretrained(out / sub, safe_serialization=True, max_shard_size="10GB")

torch.set_default_dtype(torch.bfloat16)
with dev:
    t = SD3Transformer2DModel(patch_size=2, in_channels=16, out_channels=16, qk_norm="rms_norm",
                              **shape[job["variant"]])
    params = sum(p.numel() for p in t.parameters())
    save(randomise(t), "transformer")
    del t
    reuse = job.get("reuse")
    for sub, key, act in (("text_encoder", "clip_l", "quick_gelu"), ("text_encoder_2", "clip_g", "gelu")):
        if reuse:
            (out / sub).symlink_to(Path(reuse) / sub, target_is_directory=True)
            continue
        tiny_cfg = json.loads((tiny / sub / "config.json").read_text())
        cfg = CLIPTextConfig(vocab_size=max(49408, tiny_cfg["vocab_size"]), max_position_embeddings=77,
                             hidden_act=act, bos_token_id=tiny_cfg["bos_token_id"],
                             eos_token_id=tiny_cfg["eos_token_id"], pad_token_id=tiny_cfg["pad_token_id"],
                             **shape[key])
        save(randomise(CLIPTextModelWithProjection(cfg)), sub)
    if reuse:
        (out / "vae").symlink_to(Path(reuse) / "vae", target_is_directory=True)
    else:
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, sample_size=1024,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                            use_post_quant_conv=False, **shape["vae"])
        save(randomise(vae), "vae")
torch.set_default_dtype(torch.float32)
g = torch.Generator().manual_seed(job["seed"])
for path, size in job["latents"]:
    save_file({"latents": torch.randn((1, 16, size // 8, size // 8), generator=g)}, path)
print(json.dumps({"transformer_params": params, "seconds": time.perf_counter() - start,
                  "bytes": sum(f.stat().st_size for f in out.rglob("*.safetensors") if not f.is_symlink())}))
"""

DIFFUSERS_RUN = r"""
import json, sys, time, torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file
model, latents_file, out, steps, guidance, size, device, dtype, prompt = sys.argv[1:10]
dtype = getattr(torch, dtype)
dev = torch.device(device)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
t0 = time.perf_counter()
pipe = StableDiffusion3Pipeline.from_pretrained(
    model, text_encoder_3=None, tokenizer_3=None, torch_dtype=dtype).to(dev)
pipe.set_progress_bar_config(disable=True)
load_s = time.perf_counter() - t0
latents = load_file(latents_file)["latents"].to(dev, dtype)
def call(n, marks=None):
    def on_step(p, i, t, kw):
        if marks is not None:
            sync(); marks.append(time.perf_counter())
        return kw
    return pipe(prompt=prompt, negative_prompt="", num_inference_steps=n,
                guidance_scale=float(guidance), height=int(size), width=int(size),
                latents=latents.clone(), callback_on_step_end=on_step).images[0]
with torch.inference_mode():
    call(2)  # warm-up: kernels chosen, caches filled
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    marks = []
    start = time.perf_counter()
    image = call(int(steps), marks)
    sync()
    image_s = time.perf_counter() - start
image.save(out)
steps_s = [b - a for a, b in zip([start] + marks[:-1], marks)]
peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
print(json.dumps({"load_s": load_s, "image_s": image_s, "steps": steps_s, "torch_peak_mib": peak}))
"""


def log(msg=""):
    print(msg, flush=True)


class PartSkipped(Exception):
    """A part that did not run, and why (not a failure)."""


class PartFailed(Exception):
    """A part that ran and missed what it checks (a parity floor, an expected log line)."""


# --- commands -----------------------------------------------------------------------------------

class Runner:
    """Runs commands under the run's time budget, each with its output in a log file."""

    def __init__(self, args, work):
        self.args = args
        self.started = time.perf_counter()
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.commands = []  # display form of every command run, referenced by number

    def elapsed(self):
        return time.perf_counter() - self.started

    def left(self):
        return self.args.budget_seconds - self.elapsed()

    def display(self, cmd):
        """A command as a person would type it: the binary by name, long paths shortened."""
        subs = [(str(self.args.binary), "sd35-server"), (sys.executable, "python3"),
                (str(self.args.work), "$WORK"), (str(ROOT) + "/", ""), (PROMPT, "$PROMPT")]
        words = []
        for word in map(str, cmd):
            if len(word) > 120 and "\n" in word:
                word = "<script>"
            for a, b in subs:
                word = word.replace(a, b)
            words.append(word)
        return " ".join(w if w == "<script>" or re.fullmatch(r"[\w@%+=:,./$-]+", w) else shlex.quote(w)
                        for w in words)

    def run(self, cmd, env, limit=None, name="cmd", gpu=None):
        """Runs `cmd` to its end, the budget's end or `limit` seconds, whichever is first.

        Returns a dict: code, out (stdout+stderr), wall_s, rss_mib (peak resident set),
        gpu_peak_mib (NVML, when `gpu` is an Nvml), ref (the command's number in the summary).
        Raises RuntimeError with the output's tail when the command fails or is stopped."""
        self.count += 1
        shown = [f"{k}={env[k]}" for k in ("SD35_GENERIC_OPS", "SD35_OP_CHUNK_ELEMENTS") if env and env.get(k)]
        self.commands.append(" ".join(shown + [self.display(cmd)]))
        ref = len(self.commands)
        timeout = self.left() - RESERVE_S
        if limit is not None:
            timeout = min(timeout, limit)
        if timeout <= 1:
            raise PartSkipped(f"no budget left for [{ref}]")
        path = self.logs / f"{self.count:02d}-{name}.log"
        start = time.perf_counter()
        with open(path, "w") as out, GpuPeak(gpu) as peak:
            p = subprocess.Popen([str(c) for c in cmd], env=env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            stopped = False
            try:
                while True:
                    pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.perf_counter() - start > timeout:
                        os.killpg(p.pid, signal.SIGKILL)
                        pid, status, usage = os.wait4(p.pid, 0)
                        stopped = True
                        break
                    time.sleep(0.05)
            except BaseException:  # interrupted: the command and its children go too
                os.killpg(p.pid, signal.SIGKILL)
                os.wait4(p.pid, 0)
                raise
            p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))
        result = dict(code=p.returncode, out=text, wall_s=wall, rss_mib=usage.ru_maxrss / 1024,
                      gpu_peak_mib=peak.mib, ref=ref)
        if stopped:
            raise RuntimeError(f"[{ref}] stopped after {wall:.0f} s (time budget): "
                               f"{self.display(cmd)[:200]}\n{tail(text)}")
        if p.returncode != 0:
            raise RuntimeError(f"[{ref}] exit {p.returncode} after {wall:.1f} s: "
                               f"{self.display(cmd)[:200]}\n{tail(text)}")
        return result


def last_json(text):
    """The last line of a command's output that is a JSON object."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise PartFailed(f"no JSON result in the output:\n{tail(text)}")


def tail(text, n=1500):
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


# --- GPU description and memory (NVML) ------------------------------------------------------------

class Nvml:
    """The first GPU through NVML; `error` says why not when there is none."""

    def __init__(self):
        self.error = None
        self.info = {}
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nv = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as e:  # noqa: BLE001 - no driver, no GPU, no package: all say "no NVML"
            self.error = f"{type(e).__name__}: {e}"
            return
        nv, h = self.nv, self.handle

        def get(f, *a):
            try:
                v = f(*a)
                return v.decode() if isinstance(v, bytes) else v
            except Exception:  # noqa: BLE001 - one missing field loses only that field
                return None

        mem = nv.nvmlDeviceGetMemoryInfo(h)
        cc = get(nv.nvmlDeviceGetCudaComputeCapability, h)
        cuda = get(nv.nvmlSystemGetCudaDriverVersion)
        self.info = {
            "name": get(nv.nvmlDeviceGetName, h), "count": get(nv.nvmlDeviceGetCount),
            "memory_total_mib": mem.total / 2**20, "memory_used_mib": mem.used / 2**20,
            "memory_free_mib": mem.free / 2**20, "driver": get(nv.nvmlSystemGetDriverVersion),
            "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
            "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
            "power_limit_w": (get(nv.nvmlDeviceGetPowerManagementLimit, h) or 0) / 1000 or None,
            "temperature_c": get(nv.nvmlDeviceGetTemperature, h, 0),
        }

    def used_mib(self):
        return self.nv.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20

    def line(self):
        i = self.info
        if self.error:
            return f"no GPU through NVML ({self.error})"
        return (f"{i['name']}: {i['memory_total_mib']:.0f} MiB ({i['memory_used_mib']:.0f} used, "
                f"{i['memory_free_mib']:.0f} free), driver {i['driver']}, CUDA {i['cuda_driver']}, "
                f"compute capability {i['compute_capability']}, {i['count']} GPU(s)")


class GpuPeak:
    """Peak device memory in use while the block runs (NVML every 20 ms), above the level at
    its start, in MiB; `mib` stays None without NVML."""

    def __init__(self, nvml):
        self.mib = None
        self.nvml = nvml if nvml is not None and nvml.error is None else None
        self._stop = threading.Event()

    def __enter__(self):
        if self.nvml:
            self._base = self.nvml.used_mib()
            self.mib = 0.0
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.mib = max(self.mib, self.nvml.used_mib() - self._base)
            time.sleep(0.02)

    def __exit__(self, *exc):
        if self.nvml:
            self._stop.set()
            self._thread.join()


# --- helpers --------------------------------------------------------------------------------------

def log_seconds(text, message):
    """`seconds=` values of the log lines whose message is `message`."""
    pat = re.compile(re.escape(message) + r".*?seconds=([0-9.eE+-]+)")
    return [float(m) for m in pat.findall(text)]


def psnr(a_path, b_path):
    import numpy as np
    from PIL import Image
    a = np.asarray(Image.open(a_path).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(b_path).convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        raise PartFailed(f"{a_path.name} is {a.shape}, {b_path.name} is {b.shape}")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def smoke_floors():
    """The smoke gate's PSNR floors for an image served on CUDA against a CPU reference, read
    from smoke.rs's `min_psnr_db`, so this benchmark and the gate cannot drift apart."""
    text = SMOKE_RS.read_text()
    fp8 = re.search(r"\(DeviceKind::Cpu, DeviceKind::Cuda, Precision::Fp8\)\s*=>\s*([0-9.]+)", text)
    other = re.search(r"\(DeviceKind::Cpu, DeviceKind::Cuda, _\)\s*=>\s*([0-9.]+)", text)
    if not fp8 or not other:
        raise RuntimeError(f"{SMOKE_RS.relative_to(ROOT)}: min_psnr_db's CPU -> CUDA arms not found; "
                           "update smoke_floors() in tools/device_bench.py")
    return {"bf16": float(other.group(1)), "fp8": float(fp8.group(1))}


def median(xs):
    return statistics.median(xs) if xs else None


def fmt(x, spec=".2f", unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf" + unit
    return format(x, spec) + unit


def mib(b):
    return None if b is None else b / 2**20


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"


# --- the benchmark --------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.runner = Runner(args, self.work)
        self.nvml = None
        self.modules = {}  # import name -> version, or None when the import failed
        self.results = {"parts": {}, "figures": []}
        self.env = dict(os.environ, NO_COLOR="1", RUST_LOG="info", PYTHONUNBUFFERED="1")
        self.env.setdefault("CUDA_CACHE_PATH", str(self.work / "cuda-cache"))
        self.env.setdefault("CUDA_CACHE_MAXSIZE", str(2**31))
        # The device side: on a dry run, the CPU running the GPU's op graph, chunked small.
        self.dev_env = dict(self.env)
        self.cpu_env = dict(self.env)
        self.cpu_env.pop("SD35_GENERIC_OPS", None)
        self.dev_label = args.device
        if args.dry_run:
            self.dev_env.update(SD35_GENERIC_OPS="1", SD35_OP_CHUNK_ELEMENTS="2048")
            self.dev_label = "cpu-generic"  # the CPU on the GPU's op graph
        self.model = {"large": self.work / "large", "medium": self.work / "medium"}
        self.latents = self.work / f"latents-large-{args.size}.safetensors"
        self.medium_latents = self.work / f"latents-medium-{args.medium_size}.safetensors"

    # figures ------------------------------------------------------------------------------------

    def figure(self, part, name, value, shown, ok=None, refs=()):
        self.results["figures"].append(dict(part=part, figure=name, value=value, shown=shown, ok=ok,
                                            refs=list(refs)))

    def gpu(self):
        return self.nvml if self.args.device == "cuda" else None

    def generate(self, part, model, out, precision, size, steps, latents, variant, extra=(),
                 guidance=None, env=None, limit=None):
        """`sd35-server generate` on the device; its figures from its log."""
        cmd = [self.args.binary, "generate", "--model", model, "--prompt", PROMPT, "--out", out,
               "--precision", precision, "--width", size, "--height", size, "--steps", steps]
        if guidance is not None:
            cmd += ["--guidance", guidance]
        cmd += ["--init-latents", latents, "--no-t5", "--device", self.args.device, "--variant", variant,
                *extra]
        r = self.runner.run(cmd, env or self.dev_env, limit=limit, name=part, gpu=self.gpu())
        load = log_seconds(r["out"], "model loaded")
        image = log_seconds(r["out"], "image written")
        step = log_seconds(r["out"], "step done")
        if not image or len(step) != steps:
            raise PartFailed(f"[{r['ref']}] wrote {len(step)} of {steps} step lines, "
                             f"image line {'found' if image else 'missing'}:\n{tail(r['out'])}")
        slg = re.search(r"generating.*?slg=(\S+(?: \S+)*?)(?: \w+=|$)", r["out"], re.M)
        return dict(load_s=load[0] if load else None, image_s=image[0], steps=step,
                    step_median_s=median(step), gpu_peak_mib=r["gpu_peak_mib"], rss_mib=r["rss_mib"],
                    wall_s=r["wall_s"], ref=r["ref"], slg=slg.group(1) if slg else None)

    def plan(self, variant, precision, size, guidance):
        cmd = [self.args.binary, "plan", "--variant", variant, "--precision", precision, "--width", size,
               "--height", size, "--device", self.args.device, "--json"]
        if guidance is not None:
            cmd += ["--guidance", guidance]
        r = self.runner.run(cmd, self.env, limit=30, name="plan")
        out = r["out"]
        p = json.loads(out[out.index("{"):out.rindex("}") + 1])
        p["ref"] = r["ref"]
        return p

    def measured_vs_plan(self, part, run, plan, label):
        measured = run["gpu_peak_mib"] if run["gpu_peak_mib"] is not None else None
        planned = mib(plan["peak_bytes"])
        what = "peak GPU memory (NVML)" if measured is not None else "peak GPU memory (no GPU: not measured)"
        self.figure(part, f"{label}: {what}", measured, fmt(measured, ".0f", " MiB"), refs=[run["ref"]])
        self.figure(part, f"{label}: peak computed by `plan` (published shapes)", planned,
                    fmt(planned, ".0f", " MiB"), refs=[plan["ref"]])
        if measured:
            self.figure(part, f"{label}: measured / computed", measured / planned,
                        fmt(measured / planned, ".2f"), refs=[run["ref"], plan["ref"]])
        if self.args.device == "cpu":
            self.figure(part, f"{label}: peak RSS ({cpu_name()})", run["rss_mib"],
                        fmt(run["rss_mib"], ".0f", " MiB"), refs=[run["ref"]])

    def timing(self, part, run, label):
        self.figure(part, f"{label}: s/image", run["image_s"], fmt(run["image_s"], ".2f", " s"),
                    refs=[run["ref"]])
        self.figure(part, f"{label}: s/step (median)", run["step_median_s"],
                    fmt(run["step_median_s"], ".3f", " s"), refs=[run["ref"]])
        self.figure(part, f"{label}: load", run["load_s"], fmt(run["load_s"], ".1f", " s"), refs=[run["ref"]])

    # parts --------------------------------------------------------------------------------------

    def preflight(self):
        a = self.args
        log(f"python {platform.python_version()} ({sys.executable}); {os.cpu_count()} CPUs: {cpu_name()}")
        site = self.work / "site"
        try:
            import diffusers  # noqa: F401
            self.results["diffusers_from"] = "environment"
        except ImportError:
            wheels = sorted(Path(a.wheels).glob("*.whl")) if a.wheels else []
            if not wheels:
                log(f"  diffusers is not installed and no wheel is in {a.wheels}")
            else:
                shutil.rmtree(site, ignore_errors=True)
                for wheel in wheels:
                    with zipfile.ZipFile(wheel) as z:
                        meta = [n for n in z.namelist() if n.endswith(".dist-info/WHEEL")]
                        if not meta or b"Root-Is-Purelib: true" not in z.read(meta[0]):
                            raise RuntimeError(f"{wheel.name}: not a pure-Python wheel; cannot be carried")
                        z.extractall(site)
                sys.path.insert(0, str(site))
                importlib.invalidate_caches()
                for env in (self.env, self.dev_env, self.cpu_env):
                    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
                self.results["diffusers_from"] = " ".join(w.name for w in wheels)
                log(f"  installed from the carried wheels: {self.results['diffusers_from']}")
        failed = []
        for name, dist in PACKAGES:
            try:
                mod = __import__(name)
                version = getattr(mod, "__version__", None)
                if version is None:
                    from importlib.metadata import version as dist_version
                    version = dist_version(dist)
                self.modules[name] = version
                log(f"  {name:<13} {version}")
            except Exception as e:  # noqa: BLE001 - report every missing package, not the first
                self.modules[name] = None
                failed.append(f"{name} ({type(e).__name__}: {e})")
                log(f"  {name:<13} MISSING: {type(e).__name__}: {e}")
        if self.modules.get("diffusers"):
            try:  # the classes the parts use: a lazy module imports them only here
                from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: F401
                from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # noqa: F401
            except Exception as e:  # noqa: BLE001
                self.modules["diffusers"] = None
                failed.append(f"diffusers classes ({type(e).__name__}: {e})")
        self.results["packages"] = self.modules
        self.results["python"] = platform.python_version()
        self.results["cpu"] = {"count": os.cpu_count(), "name": cpu_name()}
        self.nvml = Nvml()
        self.results["gpu"] = self.nvml.info or {"error": self.nvml.error}
        log(f"  GPU: {self.nvml.line()}")
        if self.modules.get("torch"):
            import torch
            cuda = torch.cuda.is_available()  # NVML-based here: no CUDA context in this process
            self.results["torch_cuda"] = {"available": cuda, "cuda": torch.version.cuda}
            log(f"  torch sees CUDA: {cuda} (built for CUDA {torch.version.cuda})")
            if a.device == "cuda" and not cuda:
                failed.append("torch sees no CUDA device")
        r = self.runner.run([a.binary, "--version"], self.env, limit=30, name="version")
        digest = hashlib.sha256(Path(a.binary).read_bytes()).hexdigest()
        self.results["binary"] = {"path": str(a.binary), "version": r["out"].strip(), "sha256": digest,
                                  "bytes": Path(a.binary).stat().st_size}
        log(f"  binary: {r['out'].strip()}, {Path(a.binary).stat().st_size / 2**20:.1f} MiB, sha256 {digest[:16]}")
        floors = smoke_floors()
        log(f"  smoke gate floors (CPU reference, served on CUDA): bf16 {floors['bf16']:.0f} dB, "
            f"fp8 {floors['fp8']:.0f} dB; f32 parity floor {F32_FLOOR_DB:.0f} dB")
        if a.device == "cuda" and self.nvml.error:
            failed.append(f"NVML ({self.nvml.error})")
        if failed:
            raise PartFailed("missing: " + "; ".join(failed))

    def need(self, *modules):
        missing = [m for m in modules if not self.modules.get(m)]
        if missing:
            raise PartSkipped(f"needs {', '.join(missing)} (failed in preflight)")

    def parity(self):
        self.need("numpy", "PIL")
        a = self.args
        dev = a.device
        floors = {"f32": F32_FLOOR_DB, **smoke_floors()}
        # model dir, label, variant (its model card's guidance and skip-layer guidance), steps,
        # precisions compared. Medium: 12 steps, so skip-layer guidance runs (steps 1 and 2).
        cases = [
            ("sd35-tiny-large", "large CFG", "large", 4, ("f32", "bf16", "fp8")),
            ("sd35-tiny-large", "large-turbo", "large-turbo", 4, ("f32",)),
            ("sd35-tiny-medium", "medium SLG", "medium", 12, ("f32", "bf16", "fp8")),
            ("sd35-tiny-large-fp8", "large fp8 file", "large", 4, ("fp8",)),
        ]
        out = self.work / "parity"
        out.mkdir(exist_ok=True)
        failures = []
        for model, label, variant, steps, precisions in cases:
            images = {}

            def image(where, precision):
                key = (where, precision)
                if key not in images:
                    path = out / f"{model}-{variant}-{precision}-{where}.png"
                    cmd = [a.binary, "generate", "--model", TESTDATA / model, "--prompt", PROMPT, "--out", path,
                           "--precision", precision, "--width", 128, "--height", 128, "--steps", steps,
                           "--seed", 7, "--variant", variant, "--device", dev if where == "dev" else "cpu"]
                    env = self.dev_env if where == "dev" else self.cpu_env
                    r = self.runner.run(cmd, env, limit=180, name=f"parity-{where}", gpu=None)
                    images[key] = (path, r["ref"])
                return images[key]

            pairs = {"f32": (("dev", "f32"), ("cpu", "f32")), "bf16": (("dev", "bf16"), ("dev", "f32")),
                     "fp8": (("dev", "fp8"), ("cpu", "fp8"))}
            for precision in precisions:
                (p1, r1), (p2, r2) = image(*pairs[precision][0]), image(*pairs[precision][1])
                db = psnr(p1, p2)
                floor = floors[precision]
                ok = db >= floor
                against = {"f32": "CPU f32", "bf16": f"{self.dev_label} f32", "fp8": "CPU fp8"}[precision]
                name = f"{label} ({model}, {steps} steps) {precision}: {self.dev_label} vs {against} PSNR"
                self.figure("parity", name, db, f"{fmt(db, '.1f', ' dB')} (floor {floor:.0f})", ok=ok,
                            refs=[r1, r2])
                log(f"  {name} {fmt(db, '.1f')} dB (floor {floor:.0f}) {'ok' if ok else 'BELOW FLOOR'}")
                if not ok:
                    failures.append(f"{label} {precision} {db:.1f} dB < {floor:.0f}")
        if failures:
            raise PartFailed("; ".join(failures))

    def weights(self):
        self.need("torch", "transformers", "diffusers", "safetensors")
        r = self.make_weights("large", latents=[(self.latents, self.args.size)])
        shapes = "SD3.5 Large" if self.args.shape == "large" else "small Large-like"
        self.figure("weights", f"transformer parameters ({shapes} shapes)",
                    r["transformer_params"], f"{r['transformer_params'] / 1e6:,.1f} M", refs=[r["ref"]])
        self.figure("weights", "random weights made and written", r["seconds"],
                    f"{r['seconds']:.0f} s, {r['bytes'] / 2**30:.2f} GiB", refs=[r["ref"]])

    def make_weights(self, variant, latents, reuse=None):
        job = {"shape": SHAPES[self.args.shape], "variant": variant, "device": self.args.device,
               "out": str(self.model[variant]), "tiny": str(TESTDATA / "sd35-tiny-large"), "seed": 0,
               "reuse": str(reuse) if reuse else None, "latents": [[str(p), s] for p, s in latents]}
        job_file = self.work / f"weights-{variant}.json"
        job_file.write_text(json.dumps(job, indent=2))
        r = self.runner.run([sys.executable, "-c", WEIGHTS_RUN, job_file], self.env, name=f"weights-{variant}")
        result = last_json(r["out"])
        result["ref"] = r["ref"]
        log(f"  {variant}: transformer {result['transformer_params'] / 1e6:,.1f} M parameters, "
            f"{result['bytes'] / 2**30:.2f} GiB written in {result['seconds']:.0f} s")
        return result

    def needs_weights(self, variant="large"):
        if self.results["parts"].get("weights", {}).get("status") != "ok":
            raise PartSkipped("needs the weights part")

    def large_bf16(self):
        self.needs_weights()
        a = self.args
        run = self.generate("large-bf16", self.model["large"], self.work / "ours-bf16.png", "bf16", a.size,
                            a.steps, self.latents, "large", guidance=a.guidance)
        self.results["large_bf16"] = run
        self.timing("large-bf16", run, f"sd35-server bf16 {a.size}² {a.steps} steps CFG {a.guidance}")
        log(f"  {run['image_s']:.2f} s/image, {run['step_median_s']:.3f} s/step (median), "
            f"load {fmt(run['load_s'], '.1f')} s, peak GPU memory {fmt(run['gpu_peak_mib'], '.0f')} MiB")
        plan = self.plan("large", "bf16", a.size, a.guidance)
        self.results["plan_large_bf16"] = plan
        self.measured_vs_plan("large-bf16", run, plan, "bf16")
        log(f"  plan (computed, published Large shapes): peak {mib(plan['peak_bytes']):.0f} MiB")

    def diffusers_part(self):
        self.needs_weights()
        self.need("torch", "diffusers")
        a = self.args
        out = self.work / "diffusers.png"
        cmd = [sys.executable, "-c", DIFFUSERS_RUN, self.model["large"], self.latents, out, a.steps, a.guidance,
               a.size, a.device, "bfloat16", PROMPT]
        r = self.runner.run(cmd, self.env, name="diffusers", gpu=self.gpu())
        ref = last_json(r["out"])
        ref.update(gpu_peak_mib=r["gpu_peak_mib"], rss_mib=r["rss_mib"], wall_s=r["wall_s"], ref=r["ref"],
                   step_median_s=median(ref["steps"]))
        self.results["diffusers_bf16"] = ref
        label = f"diffusers bf16 {a.size}² {a.steps} steps CFG {a.guidance}"
        self.timing("diffusers", ref, label)
        self.figure("diffusers", f"{label}: peak GPU memory (NVML; torch allocator "
                    f"{fmt(ref['torch_peak_mib'], '.0f')} MiB)", ref["gpu_peak_mib"],
                    fmt(ref["gpu_peak_mib"], ".0f", " MiB"), refs=[r["ref"]])
        log(f"  {ref['image_s']:.2f} s/image, {ref['step_median_s']:.3f} s/step (median), "
            f"peak GPU memory {fmt(ref['gpu_peak_mib'], '.0f')} MiB")
        mine = self.results.get("large_bf16")
        if mine:
            refs = [mine["ref"], r["ref"]]
            ratio = mine["image_s"] / ref["image_s"]
            step_ratio = mine["step_median_s"] / ref["step_median_s"]
            self.results.update(ratio_image=ratio, ratio_step=step_ratio)
            self.figure("diffusers", "time ratio sd35-server / diffusers, per image (ours in a fresh process, "
                        "diffusers after a 2-step warm-up)", ratio, f"{ratio:.2f}", refs=refs)
            self.figure("diffusers", "time ratio sd35-server / diffusers, per step (median)", step_ratio,
                        f"{step_ratio:.2f}", refs=refs)
            if mine["gpu_peak_mib"] and ref["gpu_peak_mib"]:
                m = mine["gpu_peak_mib"] / ref["gpu_peak_mib"]
                self.figure("diffusers", "peak GPU memory ratio sd35-server / diffusers", m, f"{m:.2f}", refs=refs)
            db = psnr(self.work / "ours-bf16.png", out)
            self.figure("diffusers", "PSNR sd35-server vs diffusers image (same latents; random weights)", db,
                        fmt(db, ".1f", " dB"), refs=refs)
            log(f"  ratio ours/diffusers {ratio:.2f} per image, {step_ratio:.2f} per step; PSNR {fmt(db, '.1f')} dB")

    def large_fp8(self):
        self.needs_weights()
        a = self.args
        run = self.generate("large-fp8", self.model["large"], self.work / "ours-fp8.png", "fp8", a.size,
                            a.fp8_steps, self.latents, "large", guidance=a.guidance)
        self.results["large_fp8"] = run
        self.timing("large-fp8", run, f"sd35-server fp8 (quantised at load) {a.size}² {a.fp8_steps} steps")
        bf16 = self.results.get("large_bf16")
        if bf16:
            ratio = run["step_median_s"] / bf16["step_median_s"]
            self.figure("large-fp8", "s/step fp8 / bf16", ratio, f"{ratio:.2f}", refs=[run["ref"], bf16["ref"]])
        plan = self.plan("large", "fp8", a.size, a.guidance)
        self.measured_vs_plan("large-fp8", run, plan, "fp8")
        log(f"  load (quantising) {fmt(run['load_s'], '.1f')} s, {run['step_median_s']:.3f} s/step, "
            f"peak GPU memory {fmt(run['gpu_peak_mib'], '.0f')} MiB, plan {mib(plan['peak_bytes']):.0f} MiB")

    def medium(self):
        self.need("torch", "transformers", "diffusers", "safetensors")
        a = self.args
        reuse = self.model["large"] if self.results["parts"].get("weights", {}).get("status") == "ok" else None
        w = self.make_weights("medium", latents=[(self.medium_latents, a.medium_size)], reuse=reuse)
        self.figure("medium", "transformer parameters (MMDiT-X)", w["transformer_params"],
                    f"{w['transformer_params'] / 1e6:,.1f} M", refs=[w["ref"]])
        steps = a.medium_steps
        run = self.generate("medium", self.model["medium"], self.work / "ours-medium.png", "bf16", a.medium_size,
                            steps, self.medium_latents, "medium")
        self.results["medium"] = run
        self.timing("medium", run, f"sd35-server medium bf16 {a.medium_size}² {steps} steps (model card "
                    "guidance and skip-layer guidance)")
        # The pipeline's rule: skip-layer guidance on step i (from 0) when 0.01 n < i < 0.2 n.
        slg_steps = [i for i in range(steps) if 0.01 * steps < i < 0.2 * steps]
        if not slg_steps:
            raise PartFailed(f"{steps} steps: skip-layer guidance never runs; use at least 10")
        with_slg = [run["steps"][i] for i in slg_steps]
        without = [t for i, t in enumerate(run["steps"]) if i not in slg_steps and i > 0]
        ratio = median(with_slg) / median(without)
        self.figure("medium", "skip-layer guidance layers (log) / steps (from 0)", run["slg"],
                    f"{run['slg']} on steps {slg_steps}", refs=[run["ref"]])
        self.figure("medium", "s/step with skip-layer guidance / without (median; > 1: its extra pass ran)", ratio,
                    f"{ratio:.2f}", refs=[run["ref"]])
        plan = self.plan("medium", "bf16", a.medium_size, None)
        self.measured_vs_plan("medium", run, plan, "medium bf16")
        log(f"  {run['image_s']:.2f} s/image, {run['step_median_s']:.3f} s/step; SLG layers {run['slg']} on "
            f"steps {slg_steps}: {ratio:.2f}x the time of the others")

    def fp8_engine(self):
        self.needs_weights()
        a = self.args
        cache = self.work / "cache"
        entry = cache / "models" / "bench"
        if entry.is_symlink():
            entry.unlink()
        elif entry.exists():
            shutil.rmtree(entry)
        shutil.rmtree(cache / "engines" / "bench-fp8", ignore_errors=True)
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(self.model["large"], target_is_directory=True)
        marker = {"source": {"kind": "import", "dir": str(self.model["large"])}, "revision": "main",
                  "variant": "large", "files": [], "completedAt": int(time.time())}
        (self.model["large"] / ".sd35-complete.json").write_text(json.dumps(marker))
        cmd = [a.binary, "build-engine", "--cache-root", cache, "--cache-key", "bench", "--engine-key",
               "bench-fp8", "--precision", "fp8", "--variant", "large"]
        r = self.runner.run(cmd, self.cpu_env, name="build-engine")
        engine = cache / "engines" / "bench-fp8"
        size = sum(f.stat().st_size for f in engine.rglob("*") if f.is_file())
        self.figure("fp8-engine", f"build-engine fp8 on {os.cpu_count()} CPUs ({cpu_name()}), smoke image included",
                    r["wall_s"], f"{r['wall_s']:.0f} s, peak RSS {r['rss_mib'] / 1024:.1f} GiB, "
                    f"engine {size / 2**30:.2f} GiB", refs=[r["ref"]])
        for message in ("engine files written", "engine complete"):
            s = log_seconds(r["out"], message)
            if s:
                self.figure("fp8-engine", f"build-engine: {message}", s[0], f"{s[0]:.0f} s", refs=[r["ref"]])
        log(f"  built in {r['wall_s']:.0f} s (peak RSS {r['rss_mib'] / 1024:.1f} GiB), {size / 2**30:.2f} GiB")
        run = self.generate("fp8-engine", engine, self.work / "ours-engine.png", "fp8", a.size, 2, self.latents,
                            "large", guidance=a.guidance)
        self.figure("fp8-engine", "the engine served on the device: s/step (median of 2)", run["step_median_s"],
                    fmt(run["step_median_s"], ".3f", " s"), refs=[run["ref"]])

    # driver -------------------------------------------------------------------------------------

    def parts(self):
        """(name, title, required, estimate in seconds on the device, function)."""
        a = self.args
        return [
            ("preflight", "preflight: packages, GPU, binary", True, 20, self.preflight),
            ("parity", "a. parity on the tiny models, device vs CPU", True, 90, self.parity),
            ("weights", f"b. SD3.5-Large-shaped random weights ({a.shape} shapes)", True, 60, self.weights),
            ("large-bf16", f"b. sd35-server Large bf16, {a.size}², {a.steps} steps, CFG {a.guidance}", True, 80,
             self.large_bf16),
            ("diffusers", "c. diffusers on the same weights and latents", False, 70, self.diffusers_part),
            ("large-fp8", f"d. sd35-server Large fp8 quantised at load, {a.fp8_steps} steps", False, 60,
             self.large_fp8),
            ("medium", f"d. SD3.5-Medium-shaped, {a.medium_steps} steps with skip-layer guidance", False, 60,
             self.medium),
            ("fp8-engine", "d. build-engine fp8 for Large on the CPU cores", False, 200, self.fp8_engine),
        ]

    def run(self):
        a = self.args
        log(f"sd35 device benchmark on {a.device}{' (dry run: CPU, small shapes)' if a.dry_run else ''}; "
            f"budget {a.budget_seconds:.0f} s; work {self.work}")
        scale = a.estimate_scale
        for name, title, required, estimate, fn in self.parts():
            part = {"title": title, "required": required}
            self.results["parts"][name] = part
            left = self.runner.left()
            log()
            log(f"== {title} ({left:.0f} s of budget left)")
            start = time.perf_counter()
            try:
                if name in a.skip or (name == "fp8-engine" and a.skip_fp8_build):
                    part["asked_to_skip"] = True
                    raise PartSkipped("asked (--skip)")
                if not required and left - RESERVE_S < estimate * scale:
                    raise PartSkipped(f"budget: {left:.0f} s left, the part needs about {estimate * scale:.0f} s")
                fn()
                part["status"] = "ok"
            except PartSkipped as e:
                part["status"] = "skipped"
                part["note"] = str(e)
            except PartFailed as e:
                part["status"] = "FAILED"
                part["note"] = str(e)
            except Exception as e:  # noqa: BLE001 - one part's failure must not stop the others
                part["status"] = "FAILED"
                part["note"] = f"{type(e).__name__}: {e}"
                part["traceback"] = traceback.format_exc()[-3000:]
            except KeyboardInterrupt:
                part["status"] = "interrupted"
                part["elapsed_s"] = time.perf_counter() - start
                raise
            part["elapsed_s"] = time.perf_counter() - start
            note = f": {part['note']}" if part.get("note") else ""
            log(f"-- {name}: {part['status']} in {part['elapsed_s']:.1f} s{note}")
            self.save()
        self.results["total_s"] = self.runner.elapsed()
        self.save()
        summary = self.summary()
        log()
        log(summary)
        if a.out:
            Path(a.out).with_suffix(".md").write_text(summary + "\n")
        failed = [n for n, p in self.results["parts"].items()
                  if p["status"] == "FAILED"
                  or (p["required"] and p["status"] != "ok" and not p.get("asked_to_skip"))]
        return 1 if failed else 0

    def save(self):
        self.results["commands"] = self.runner.commands
        self.results["args"] = {k: str(v) for k, v in vars(self.args).items()}
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(self.args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(self.results, indent=2, default=str))
            tmp.replace(self.args.out)

    def summary(self):
        a, r = self.args, self.results
        gpu = r.get("gpu", {})
        device = (f"{gpu['name']} ({gpu['memory_total_mib']:.0f} MiB, driver {gpu['driver']}, CUDA "
                  f"{gpu['cuda_driver']}, compute capability {gpu['compute_capability']})"
                  if gpu.get("name") else f"no GPU ({gpu.get('error', 'NVML not reached')})")
        if a.device == "cpu":
            device = f"CPU: {os.cpu_count()} × {cpu_name()}; {device}"
        if a.dry_run:
            device += ("; `cpu-generic`: the CPU running the GPU's op graph (SD35_GENERIC_OPS=1, "
                       "small chunks), `CPU`: its fused kernels")
        pk = r.get("packages", {})
        lines = [
            f"### sd35 device benchmark{' (dry run on the CPU, small shapes)' if a.dry_run else ''}",
            "",
            f"- device: {device}",
            f"- binary: {r.get('binary', {}).get('version', a.binary)} (sha256 "
            f"{r.get('binary', {}).get('sha256', '?')[:16]}); python {r.get('python')}; "
            + ", ".join(f"{k} {v or 'MISSING'}" for k, v in pk.items())
            + (f" (from {r['diffusers_from']})" if r.get("diffusers_from") else ""),
            f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; whole run "
            f"{r.get('total_s', 0):.0f} s of a {a.budget_seconds:.0f} s budget",
            "",
            "| part | status | s | note |",
            "|---|---|---:|---|",
        ]
        for name, p in r["parts"].items():
            note = (p.get("note") or "").replace("\n", " ").replace("|", "\\|")
            lines.append(f"| {name} | {p.get('status', 'not run')} | {p.get('elapsed_s', 0):.0f} | {note[:300]} |")
        lines += ["", "| part | figure | value | cmd |", "|---|---|---:|---|"]
        for f in r["figures"]:
            mark = "" if f["ok"] is None else (" ok" if f["ok"] else " **BELOW FLOOR**")
            refs = " ".join(f"[{i}]" for i in f["refs"])
            lines.append(f"| {f['part']} | {f['figure']} | {f['shown']}{mark} | {refs} |")
        lines += ["", f"Commands (`$WORK`: the work directory; `$PROMPT`: \"{PROMPT}\"; "
                  "`python3 -c <script>`: the scripts in tools/device_bench.py):", ""]
        used = sorted({i for f in r["figures"] for i in f["refs"]})
        for i in used:
            lines.append(f"{i}. `{self.runner.commands[i - 1]}`")
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.environ.get("SD35_SERVER_BIN", str(ROOT / "target/cuda/sd35-server")))
    ap.add_argument("--wheels", help="carried wheels to install when the environment lacks diffusers")
    ap.add_argument("--dry-run", action="store_true",
                    help="the CPU as the device, small shapes, small sizes (checks this script, no GPU)")
    ap.add_argument("--device", choices=["cuda", "cpu"])
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--fp8-steps", type=int, default=None, help="steps of the fp8 timing")
    ap.add_argument("--medium-steps", type=int, default=12,
                    help="steps of the Medium run (skip-layer guidance needs at least 10)")
    ap.add_argument("--medium-size", type=int)
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="optional parts are skipped when less is left than they need; commands are "
                         "stopped when it runs out (default 420, a dry run 1500)")
    ap.add_argument("--estimate-scale", type=float, default=None,
                    help="multiplies the parts' time estimates (a dry run: 0.5)")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["parity", "diffusers", "large-fp8", "medium", "fp8-engine"])
    ap.add_argument("--skip-fp8-build", action="store_true", help="same as --skip fp8-engine")
    ap.add_argument("--work", default=os.environ.get("SD35_BENCH_WORK", "/tmp/sd35-device-bench"))
    ap.add_argument("--out", help="write the results here as JSON, and the summary beside it as .md")
    args = ap.parse_args()
    dry = args.dry_run
    defaults = dict(device="cpu" if dry else "cuda", shape="small" if dry else "large", size=128 if dry else 1024,
                    steps=4 if dry else 28, fp8_steps=2 if dry else 8, medium_size=128 if dry else 1024,
                    budget_seconds=1500 if dry else 420, estimate_scale=0.5 if dry else 1.0)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.work = str(Path(args.work).resolve())
    args.binary = str(Path(args.binary).resolve())
    # torch.cuda.is_available() asks NVML, so this process never creates a CUDA context.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    bench = Bench(args)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return bench.run()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'SIGINT'}): the summary so far")
        bench.results["interrupted"] = True
        bench.results["total_s"] = bench.runner.elapsed()
        bench.save()
        log(bench.summary())
        return 1


if __name__ == "__main__":
    sys.exit(main())
