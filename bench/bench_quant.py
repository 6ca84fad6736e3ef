"""Benchmark: the W4 and W8 quantized SD v1 UNet against FP32: file size, resident memory and forward time.

The full SD v1 UNet architecture with random weights, float activations (W4A32, W8A32). File: the UNet's state dict
written as safetensors, bytes on disk. Memory: each model is built in a fresh child process and measured from
/proc/self/status: the resident set it adds (VmRSS after building minus before) and the high-water mark during one
forward; the quantized children build from the config alone (quant_skeleton, random codes), so FP32 weights never
exist there. Time: the three models in one process, timed alternately (median); the quantized ones are the FP one
quantized with min/max ranges (the Lp search would take minutes on a CPU and does not change the speed). Both time and
memory use --threads threads (default 1: on a shared 2-core machine a second thread mostly times OpenMP waits for a
descheduled thread, which costs the quantized path's extra elementwise ops far more than their work).

    python bench/bench_quant.py                  # batch 2, 64x64 latents (512x512 images), 3 rounds: ~4 minutes
    python bench/bench_quant.py --size 32        # 32x32 latents: ~2 minutes
    python bench/bench_quant.py --toy            # and the toy model's W4A8 quantization time (a few minutes more)
"""
import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ckpt  # noqa: E402
import qlayers  # noqa: E402
import quant  # noqa: E402
import unet as unet_lib  # noqa: E402

MODELS = {"fp32": 32, "w8": 8, "w4": 4}
BARS = {"file": 0.16, "resident": 0.2, "forward": 1.15}      # W4 vs FP32


def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def inputs(batch, size):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 77, 768, generator=g)
    return x, torch.full((batch,), 500), ctx


@torch.no_grad()
def random_quantized(wbits):
    """A quantized SD v1 UNet with random codes, built without any float weight."""
    model = qlayers.quant_skeleton(unet_lib.sd_v1(), wbits, 32)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("w_int"):
            t.random_(0, 256)
        elif name.endswith("zero_point"):
            t.fill_(2 ** (wbits - 1))
        elif name.endswith("scale"):
            t.fill_(0.004 if wbits == 4 else 0.0003)
        else:
            t.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02)
    return model.eval()


def child(which, batch, size):
    """Print 'before after peak file' (MB) for one model, measured in this fresh process."""
    x, t, ctx = inputs(batch, size)
    before = status_mb("VmRSS")
    model = unet_lib.UNet(unet_lib.sd_v1()).eval() if which == "fp32" else random_quantized(MODELS[which])
    after = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                             # reset the high-water mark: count the forward only
    with torch.no_grad():
        model(x, t, ctx)
    peak = status_mb("VmHWM")
    with tempfile.TemporaryDirectory() as d:                     # after the forward: writing is not measured
        save_file(model.state_dict(), f"{d}/unet.safetensors")
        file_mb = os.path.getsize(f"{d}/unet.safetensors") / 2**20
    print(before, after, peak, file_mb)


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
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the forwards")
    parser.add_argument("--toy", action="store_true", help="also time the toy model's W4A8 quantization")
    parser.add_argument("--child", choices=list(MODELS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args.batch, args.size)

    t_start = time.perf_counter()
    mem = {}
    for name in MODELS:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--size",
                              str(args.size), "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} child failed:\n{out.stderr[-2000:]}")
        mem[name] = [float(v) for v in out.stdout.split()]

    fp = unet_lib.UNet(unet_lib.sd_v1()).eval()
    qlayers.RATIOS = [1.0]                                         # min/max range: see the docstring
    models = {name: fp if bits == 32 else quant.quantize_(copy.deepcopy(fp), bits).eval()
              for name, bits in MODELS.items()}
    x, t, ctx = inputs(args.batch, args.size)
    times, rel = {k: [] for k in models}, {}
    with torch.no_grad():
        ref = fp(x, t, ctx)
        for name, model in models.items():
            rel[name] = ((model(x, t, ctx) - ref).norm() / ref.norm()).item()
        for _ in range(args.rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x, t, ctx)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    toy = toy_quantization() if args.toy else None

    print(f"SD v1 UNet (random weights), batch {args.batch}, {args.size}x{args.size} latents, cpu, torch "
          f"{torch.__version__}, {args.threads} thread(s), forward: median of {args.rounds} alternating rounds\n")
    print("| model | UNet file (MB) | vs FP32 | UNet resident (MB) | vs FP32 | peak RSS in forward (MB) | forward (s) "
          "| vs FP32 | output rel. error vs FP32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratio = {}
    for k in MODELS:
        file_mb, resident = mem[k][3], mem[k][1] - mem[k][0]
        ratio[k] = dict(file=file_mb / mem["fp32"][3], resident=resident / (mem["fp32"][1] - mem["fp32"][0]),
                        forward=med[k] / med["fp32"])
        print(f"| {k} | {file_mb:.0f} | {ratio[k]['file']:.3f} | {resident:.0f} | {ratio[k]['resident']:.3f} | "
              f"{mem[k][2]:.0f} | {med[k]:.2f} | {ratio[k]['forward']:.3f} | {rel[k]:.3f} |")
    print("\nW4 bars: " + ", ".join(f"{k} {ratio['w4'][k]:.3f}x <= {bar}x "
                                    f"{'met' if ratio['w4'][k] <= bar else 'MISSED'}" for k, bar in BARS.items()))
    print("all forwards (s): " + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in times[k]) for k in times)
          + f"; bench wall time {time.perf_counter() - t_start:.0f} s")
    if toy:
        print(f"\ntoy model, W4A8 AdaRound (fast preset: {toy[2]}): calibration {toy[0]:.1f} s, "
              f"reconstruction {toy[1]:.1f} s, total {toy[0] + toy[1]:.1f} s")


if __name__ == "__main__":
    main()
