"""Does bfloat16 autocast speed up training the toy models on this CPU? One forward + backward of the toy VAE (32x32
crops, batch 32), the toy UNet (batch 32) and the evaluation CLIP (batch 128), fp32 against bf16 autocast, side by
side in one run (best of a few repeats), one thread. Behind toy.py's choice: bf16 for the VAE only.

    OMP_NUM_THREADS=1 python bench/bench_toy_bf16.py
"""
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toyworld import toy  # noqa: E402
import unet as unet_lib  # noqa: E402
import vae as vae_lib  # noqa: E402


def best_time(fn, bf16, repeats=4):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fn()
        loss.float().backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = vae_lib.AutoencoderKL(vae_lib.toy())
    x = torch.randn(32, 3, 32, 32)
    unet = unet_lib.UNet(unet_lib.toy())
    z, t, ctx = torch.randn(32, 4, 16, 16), torch.randint(0, 1000, (32,)), torch.randn(32, 20, 64)
    clip = CLIPModel(toy.clip_config(vision_width=96, vision_layers=4))
    px, ids = torch.randn(128, 3, 64, 64), torch.randint(0, 49000, (128, 16))
    cases = {"VAE": lambda: (vae.decode(vae.encode(x)[0]).float() - x).abs().mean(),
             "UNet": lambda: unet(z, t, ctx).float().pow(2).mean(),
             "evaluation CLIP": lambda: clip(input_ids=ids, pixel_values=px, return_loss=True).loss}
    print("| model | fp32 s | bf16 s | speed-up |\n|---|---|---|---|")
    for name, fn in cases.items():
        fp, bf = best_time(fn, False), best_time(fn, True)
        print(f"| {name} | {fp:.3f} | {bf:.3f} | {fp / bf:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
