"""Benchmark: peak memory and time of one DreamBooth training step on the full SD v1 UNet (random weights).

Each case runs in a fresh child process: build the UNet, one batch of 1 instance + 1 class example at 64x64 latents
(512x512 images) with a 77x768 text context each, forward + backward + one AdamW step, as train.py does it (gradient
checkpointing over UNet blocks, the lean quantized-layer backward). The peak is the process's resident high-water mark
(VmHWM: weights, optimizer state, activations and the Python/torch runtime, all of it), since a CPU has no
max_memory_allocated; on a GPU, torch.cuda.max_memory_allocated. The two timesteps fall under different experts,
S2's worst case (two groups, each with its own forward and backward).

    python bench/bench_train.py                       # W4 S2 (4 experts), W4 PEQA, FP32 full; a few minutes
    python bench/bench_train.py --cases s2_w4 full --device cuda --steps 6      # median of 5 after a warm-up
    python bench/bench_train.py --counts               # trainable numbers of every case, no step (seconds)
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ckpt  # noqa: E402
import qlayers  # noqa: E402
import train  # noqa: E402
import unet as unet_lib  # noqa: E402

CASES = {  # name: (method, wbits, abits, experts, multi_channel)
    "s2_w4": ("peqa", 4, 32, 4, False),
    "peqa_w4": ("peqa", 4, 32, 1, False),
    "peqa_mc_w4": ("peqa", 4, 32, 1, True),
    "s2_mc_w4": ("peqa", 4, 32, 4, True),
    "s2_w4a8": ("peqa", 4, 8, 4, False),
    "s2_w8": ("peqa", 8, 32, 4, False),
    "full": ("full", 32, 32, 1, False),
}


def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


SIZES = {"sd_v1": unet_lib.sd_v1, "tiny": unet_lib.tiny}     # tiny: a quick check of this script itself


def build(method, wbits, abits, device, size="sd_v1"):
    """A random SD v1 UNet: FP32 for full; for PEQA a quantized skeleton filled with random codes and plausible
    scales, so no FP32 copy ever exists in the process."""
    cfg = SIZES[size]()
    if method == "full":
        with torch.device(device):
            return unet_lib.UNet(cfg)
    unet = qlayers.quant_skeleton(cfg, wbits, abits, device=device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in unet.state_dict().items():
            if t.dtype == torch.uint8:
                t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
            elif name.endswith("zero_point"):
                t.fill_(2 ** (wbits - 1) if ".weight_quantizer" in name else 128)
            elif name.endswith("scale"):
                t.fill_(1e-3 if ".weight_quantizer" in name else 0.05)
            else:
                t.normal_(0, 0.02, generator=g) if t.device.type == "cpu" else t.normal_(0, 0.02)
    for m in unet.modules():
        if isinstance(m, qlayers.ActQuantizer):
            m.enabled = True
    return unet


def counts():
    """Trainable numbers of every case, from UNets on the meta device (no memory, no step)."""
    print("| case | trainable numbers | per expert |\n|---|---|---|")
    for case, (method, wbits, abits, experts, multi) in CASES.items():
        with torch.device("meta"):
            unet = unet_lib.UNet(unet_lib.sd_v1()) if method == "full" else qlayers.quant_skeleton(
                unet_lib.sd_v1(), wbits, abits, device="meta")
        _, params = train.trainable(ckpt.StableDiffusion(unet, None, None, None), method, experts,
                                    train.expert_bounds(experts), multi)
        n = sum(p.numel() for p in params.values())
        print(f"| {case} | {n:,} | {n // experts:,} |")


def child(case, device, steps=1, size="sd_v1"):
    """One case in this process: `steps` training steps on one batch; the time is the median step's, and with more
    than one step the first (CUDA's warm-up: kernel choice, allocator) is left out."""
    method, wbits, abits, experts, multi = CASES[case]
    if device == "cpu":
        train.lean_malloc()                      # as train.py does on a CPU
    unet = build(method, wbits, abits, device, size)
    side, width = unet.config.sample_size, unet.config.context_dim
    built = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else status_mb("VmRSS")
    sd = ckpt.StableDiffusion(unet, None, None, None)
    model, params = train.trainable(sd, method, experts, train.expert_bounds(experts), multi)
    unet.gradient_checkpointing = True
    optimizer = torch.optim.AdamW(params.values(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    batch = dict(x_t=torch.randn(2, 4, side, side, generator=g).to(device), t=torch.tensor([100, 700], device=device),
                 ctx=torch.randn(2, 77, width, generator=g).to(device),
                 noise=torch.randn(2, 4, side, side, generator=g).to(device),
                 weight=torch.tensor([1.0, 1.0]).to(device))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        train.train_step(model, batch)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else status_mb("VmHWM")
    trainable = sum(p.numel() for p in params.values())
    print(json.dumps(dict(case=case, built_mb=built, peak_mb=peak, seconds=seconds, trainable=trainable,
                          trainable_per_expert=trainable // experts)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=["s2_w4", "peqa_w4", "full"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--counts", action="store_true", help="only print the trainable numbers of every case")
    p.add_argument("--steps", type=int, default=1, help="steps per case; the median is reported, the first left out")
    p.add_argument("--size", choices=sorted(SIZES), default="sd_v1", help="the UNet (tiny: check this script)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.device, args.steps, args.size)
    if args.counts:
        return counts()
    torch_mb = subprocess.run([sys.executable, "-c", "import torch, transformers; print(open('/proc/self/status')"
                               ".read().split('VmHWM:')[1].split()[0])"], capture_output=True, text=True).stdout
    rows = []
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, "--child", case, "--device", args.device, "--steps",
                              str(args.steps), "--size", args.size],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{case} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = next((r for r in rows if r["case"] == "full"), None)
    timed = "one training step" if args.steps == 1 else f"median of {args.steps - 1} steps after the first"
    print(f"{args.size} UNet, {timed}, batch 1 instance + 1 class, 64x64 latents, {args.device}"
          + (f"; an idle python with torch imported holds {int(torch_mb) / 1024:.0f} MB" if args.device == "cpu" else ""))
    print("| case | trainable numbers (per expert) | peak memory (GB) | vs full | step time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['peak_mb'] / full['peak_mb']:.3f}" if full else "-"
        print(f"| {r['case']} | {r['trainable']:,} ({r['trainable_per_expert']:,}) | {r['peak_mb'] / 1024:.2f} | "
              f"{ratio} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
