"""Benchmark: one forward of the full SD v1 UNet (random weights), ours vs diffusers.UNet2DConditionModel.

Both models share the same weight tensors and are timed alternately in one process, so machine noise hits both
alike; the number to read is the ratio. Peak memory is measured in a fresh child process per model (the high-water
mark of its resident set, minus what the process held before the forward), since a CPU has no max_memory_allocated.

    python bench/bench_unet.py                  # batch 2, 64x64 latents (512x512 images), 3 timed rounds
    python bench/bench_unet.py --device cuda    # on a GPU, memory from torch.cuda.max_memory_allocated
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import unet as unet_lib  # noqa: E402


def build(which, device):
    """A random-weight SD v1 UNet of the requested implementation, in eval mode."""
    from diffusers import UNet2DConditionModel
    cfg = unet_lib.sd_v1()
    with torch.device(device):
        if which == "diffusers":
            return UNet2DConditionModel(**unet_lib.diffusers_config(cfg)).eval()
        return unet_lib.UNet(cfg).eval()


def inputs(batch, size, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=g).to(device)
    return x, torch.full((batch,), 500, device=device), torch.randn(batch, 77, 768, generator=g).to(device)


def forward(which, model, x, t, ctx):
    out = model(x, t, ctx)
    return out.sample if which == "diffusers" else out


def status_mb(field):
    """VmRSS (resident now) or VmHWM (resident high-water mark) of this process, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def child(which, batch, size, device):
    """Print 'weights_mb peak_mb' for one model, measured in this fresh process."""
    model = build(which, device)
    x, t, ctx = inputs(batch, size, device)
    with torch.no_grad():
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
            forward(which, model, x, t, ctx)
            torch.cuda.synchronize()
            print(base, torch.cuda.max_memory_allocated() / 2**20)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                 # reset the high-water mark: count the forward only
            base = status_mb("VmRSS")
            forward(which, model, x, t, ctx)
            print(base, status_mb("VmHWM"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with classifier-free guidance)")
    parser.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512x512 images)")
    parser.add_argument("--rounds", type=int, default=3, help="timed forwards per model, alternating")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--child", choices=["ours", "diffusers"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.batch, args.size, args.device)

    ref = build("diffusers", args.device)
    ours = build("ours", "meta")
    sd = ref.state_dict()
    ours.load_state_dict({k: sd[v] for k, v in unet_lib.diffusers_key_map(ours.config).items()}, assign=True)
    models = {"ours": ours, "diffusers": ref}
    x, t, ctx = inputs(args.batch, args.size, args.device)
    times = {k: [] for k in models}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with torch.no_grad():
        diff = (forward("ours", ours, x, t, ctx) - forward("diffusers", ref, x, t, ctx)).abs().max().item()
        for _ in range(args.rounds):
            for name, model in models.items():
                sync()
                t0 = time.perf_counter()
                forward(name, model, x, t, ctx)
                sync()
                times[name].append(time.perf_counter() - t0)
    del models, ours, ref, sd

    mem = {}
    for name in times:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--size",
                              str(args.size), "--device", args.device], capture_output=True, text=True, check=True)
        mem[name] = [float(v) for v in out.stdout.split()]

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SD v1 UNet forward, batch {args.batch}, {args.size}x{args.size} latents, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds}; "
          f"max |ours - diffusers| = {diff:.1e}\n")
    print("| model | forward (s) | RSS before forward (MB) | peak RSS (MB) | peak - before (MB) |")
    print("|---|---|---|---|---|")
    for k in med:
        print(f"| {k} | {med[k]:.2f} | {mem[k][0]:.0f} | {mem[k][1]:.0f} | {mem[k][1] - mem[k][0]:.0f} |")
    print(f"| **ratio ours/diffusers** | **{med['ours'] / med['diffusers']:.3f}** | | "
          f"**{mem['ours'][1] / mem['diffusers'][1]:.3f}** | |")


if __name__ == "__main__":
    main()
