#!/usr/bin/env python3
"""PyTorch's side of the CPU kernel benchmark (inference/pipeline/benches/cpu_kernels.rs).

The same kernels at the same shapes, timed the same way (median wall time of 5 calls after a
warm-up, mean CPU time of this process over them), printed as rows of the same table:
`a @ b` at 2048³, `F.linear` at the MMDiT block's shapes and `F.scaled_dot_product_attention`
on [2, 24, 1357, 64]. `make bench-kernels` runs both, one after the other.

    python inference/reference/torch_kernel_times.py [--threads N]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

RUNS = 5
LINEAR = [
    (2048, 1536, 4608),
    (2048, 1536, 1536),
    (2048, 1536, 6144),
    (2048, 6144, 1536),
    (666, 1536, 4608),
    (666, 1536, 6144),
    (666, 6144, 1536),
]


def timed(f):
    f()
    cpu0 = time.process_time()
    walls = []
    for _ in range(RUNS):
        start = time.perf_counter()
        f()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), (time.process_time() - cpu0) / RUNS


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, f32")
    print()
    print(f"| kernel | shape | wall ms (median of {RUNS}) | CPU ms (mean) | |")
    print("|---|---|---:|---:|---|")
    with torch.inference_mode():
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        t, cpu = timed(lambda: a @ b)
        print(f"| torch a @ b | 2048³ | {t * 1e3:.1f} | {cpu * 1e3:.0f} | {2 * 2048**3 / t / 1e9:.0f} GFLOP/s |")
        for m, k, n in LINEAR:
            x, w = torch.randn(m, k), torch.randn(n, k)
            t, cpu = timed(lambda: F.linear(x, w))
            print(f"| torch F.linear | {m}×{k}→{n} | {t * 1e3:.1f} | {cpu * 1e3:.0f} | {2 * m * k * n / t / 1e9:.0f} GFLOP/s |")
        shape = (2, 24, 1357, 64)
        q, k, v = (torch.randn(shape) for _ in range(3))
        t, cpu = timed(lambda: F.scaled_dot_product_attention(q, k, v))
        flops = 4 * 2 * 24 * 1357 * 1357 * 64
        print(f"| torch SDPA | [2,24,1357,64] | {t * 1e3:.1f} | {cpu * 1e3:.0f} | {flops / t / 1e9:.0f} GFLOP/s |")


if __name__ == "__main__":
    main()
