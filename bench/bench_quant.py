"""Benchmark: the W4 quantized SD v1 UNet against FP32 (memory, forward time), and the toy model's quantization time.

Memory: each model is built in a fresh child process and measured from /proc/self/status: the resident set it adds
(VmRSS after building minus before), and the high-water mark during one forward. The W4 child builds the quantized
UNet from its config alone (quant_skeleton, random codes), so FP32 weights never exist there. Time: both models in one
process, timed alternately; the W4 model is the FP one quantized with a min/max range (the Lp search would take
minutes on a CPU and does not change the speed). Last, the toy model is quantized W4A8 with the fast preset, as
`python quant.py` does, timing calibration and reconstruction.

    python bench/bench_quant.py                  # batch 2, 64x64 latents (512x512 images), 3 timed rounds
"""
import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ckpt  # noqa: E402
import quant  # noqa: E402
import unet as unet_lib  # noqa: E402


def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def inputs(batch, size):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 77, 768, generator=g)
    return x, torch.full((batch,), 500), ctx


@torch.no_grad()
def random_w4():
    """A W4 SD v1 UNet with random codes, built without any float weight."""
    model = quant.quant_skeleton(unet_lib.sd_v1(), 4, 32)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("w_int"):
            t.random_(0, 256)
        elif name.endswith("zero_point"):
            t.fill_(8)
        elif name.endswith("scale"):
            t.fill_(0.004)
        else:
            t.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02)
    return model.eval()


def child(which, batch, size):
    """Print 'before after peak' (MB) for one model, measured in this fresh process."""
    x, t, ctx = inputs(batch, size)
    before = status_mb("VmRSS")
    model = random_w4() if which == "w4" else unet_lib.UNet(unet_lib.sd_v1()).eval()
    after = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                             # reset the high-water mark: count the forward only
    with torch.no_grad():
        model(x, t, ctx)
    print(before, after, status_mb("VmHWM"))


def toy_quantization():
    """(seconds to calibrate, seconds to quantize, settings) for `python quant.py` on the toy model (W4A8)."""
    p = quant.PRESETS["fast"]
    sd = ckpt.load_sd(ckpt.TOY_CKPT)
    t0 = time.perf_counter()
    calib = quant.calibrate(sd, quant.default_prompts(sd, p["n_prompts"]), p["num_inference_steps"], p["calib_every"])
    t1 = time.perf_counter()
    quant.quantize_model(sd, 4, 8, "adaround", calib, 16, p["iters"], p["act_iters"], p["batch_size"], p["lr"],
                         p["act_lr"])
    settings = ", ".join(f"{k} {v}" for k, v in p.items()) + f", {len(calib['t'])} samples"
    return t1 - t0, time.perf_counter() - t1, settings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with classifier-free guidance)")
    parser.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512x512 images)")
    parser.add_argument("--rounds", type=int, default=3, help="timed forwards per model, alternating")
    parser.add_argument("--skip_toy", action="store_true", help="skip the toy quantization timing")
    parser.add_argument("--child", choices=["fp32", "w4"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.batch, args.size)

    mem = {}
    for name in ("fp32", "w4"):
        out = subprocess.run([sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--size",
                              str(args.size)], capture_output=True, text=True, check=True)
        mem[name] = [float(v) for v in out.stdout.split()]

    fp = unet_lib.UNet(unet_lib.sd_v1()).eval()
    quant.RATIOS = [1.0]                                         # min/max range: see the docstring
    w4 = quant.quantize_(copy.deepcopy(fp), 4).eval()
    models = {"fp32": fp, "w4": w4}
    x, t, ctx = inputs(args.batch, args.size)
    times = {k: [] for k in models}
    with torch.no_grad():
        ref = fp(x, t, ctx)
        rel = ((w4(x, t, ctx) - ref).norm() / ref.norm()).item()
        for _ in range(args.rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x, t, ctx)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    toy = None if args.skip_toy else toy_quantization()

    print(f"SD v1 UNet forward, batch {args.batch}, {args.size}x{args.size} latents, cpu, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds}; W4 vs FP32 output: relative error {rel:.3f}\n")
    print("| model | forward (s) | UNet resident (MB) | peak RSS in forward (MB) |")
    print("|---|---|---|---|")
    for k in med:
        print(f"| {k} | {med[k]:.2f} | {mem[k][1] - mem[k][0]:.0f} | {mem[k][2]:.0f} |")
    print(f"| **ratio w4/fp32** | **{med['w4'] / med['fp32']:.3f}** | "
          f"**{(mem['w4'][1] - mem['w4'][0]) / (mem['fp32'][1] - mem['fp32'][0]):.3f}** | "
          f"**{mem['w4'][2] / mem['fp32'][2]:.3f}** |")
    if toy:
        print(f"\ntoy model, W4A8 AdaRound (fast preset: {toy[2]}): calibration {toy[0]:.1f} s, "
              f"reconstruction {toy[1]:.1f} s, total {toy[0] + toy[1]:.1f} s")


if __name__ == "__main__":
    main()
