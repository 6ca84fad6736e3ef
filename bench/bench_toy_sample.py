"""Benchmark: how long the embedded toy model takes to sample a 4-image grid on this machine.

Times `sample.generate` (text encoding, the denoising loop with classifier-free guidance, VAE decoding) for each
scheduler and a few step counts, median of several runs after one warm-up.

    python bench/bench_toy_sample.py
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ckpt  # noqa: E402
import sample  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=str(ckpt.TOY_CKPT), help="model to time (default: the toy model)")
    parser.add_argument("--images", type=int, default=4, help="images per grid")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per setting")
    args = parser.parse_args()
    sd = ckpt.load_sd(args.ckpt)
    prompt = "a photo of a red striped mug on the beach"
    print(f"{args.images}-image grid, {Path(args.ckpt).name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds}\n")
    print("| scheduler | steps | seconds per grid | UNet forwards |\n|---|---|---|---|")
    for scheduler, steps in (("ddim", 50), ("plms", 50), ("ddim", 25)):
        times = []
        for i in range(args.rounds + 1):
            t0 = time.perf_counter()
            sample.generate(sd, prompt, seed=i, num_inference_steps=steps, scheduler=scheduler,
                            num_images_per_prompt=args.images)
            times.append(time.perf_counter() - t0)
        forwards = steps + (scheduler == "plms")
        print(f"| {scheduler} | {steps} | {statistics.median(times[1:]):.2f} | {forwards} (batch {2 * args.images}) |")


if __name__ == "__main__":
    main()
