"""How close the quantized toy model stays to full precision: round-to-nearest vs AdaRound at W8A8, W4A8, W8A32, W4A32.

One run, same calibration set and seeds for every row (quant.py's fast preset):
- noise-prediction MSE against the FP UNet on held-out (x_t, t, c): UNet inputs collected, exactly as calibration
  data is, from other prompts and other noise than the calibration set's;
- for FP and the W4A8 rows: 64 samples for held-out prompts (class/color/context triples never in pretraining), and
  the evaluation CLIP's zero-shot class/color/context accuracy and CLIP-T on them;
- wall time of calibration and of each quantization.

    python bench/bench_quant_toy.py                                   # about 20 minutes on 2 CPU cores
    python bench/bench_quant_toy.py --rows 8,8 --act_iters 0          # one row, a changed setting
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ckpt  # noqa: E402
import eval as metrics  # noqa: E402
import quant  # noqa: E402
from toyworld import toy  # noqa: E402

ROWS = [(8, 8), (4, 8), (8, 32), (4, 32)]


@torch.no_grad()
def heldout_mse(unet, fp_unet, data, batch=128):
    err = 0.0
    for i in range(0, len(data["t"]), batch):
        x, t, c = data["x"][i:i + batch], data["t"][i:i + batch], data["ctx"][i:i + batch]
        err += (unet(x, t, c) - fp_unet(x, t, c)).pow(2).sum().item()
    return err / data["x"].numel()


def images_row(sd, ev, scenes, prompts):
    images = toy.generate_heldout(sd, prompts, steps=50, guidance_scale=7.5, seed=0)
    acc = toy.attribute_accuracy(ev, images, scenes)
    return {**acc, "clip_t": metrics.clip_t(ev, images, prompts)}


def main():
    ap = argparse.ArgumentParser(description="round-to-nearest vs AdaRound on the toy model")
    ap.add_argument("--rows", nargs="*", default=[f"{w},{a}" for w, a in ROWS], help="wbits,abits pairs")
    ap.add_argument("--act_iters", type=int, default=None, help="override the fast preset's act_iters")
    args = ap.parse_args()
    p = dict(quant.PRESETS["fast"])
    if args.act_iters is not None:
        p["act_iters"] = args.act_iters
    sd, ev = ckpt.load_sd(ckpt.TOY_CKPT), metrics.load_evaluators()
    t0 = time.perf_counter()
    calib = quant.calibrate(sd, quant.default_prompts(sd, p["n_prompts"], seed=0), p["num_inference_steps"],
                            p["calib_every"], seed=0)
    calib_s = time.perf_counter() - t0
    held = quant.calibrate(sd, quant.default_prompts(sd, p["n_prompts"], seed=1), p["num_inference_steps"],
                           p["calib_every"], seed=1)
    scenes, prompts = toy.heldout_scenes(64, seed=0)
    print(f"calibration: {p['n_prompts']} prompts x {p['num_inference_steps']} DDIM steps, every "
          f"{p['calib_every']}nd step kept, both CFG halves = {len(calib['t'])} samples, {calib_s:.0f} s; held-out set "
          f"{len(held['t'])} samples from other prompts and seeds", flush=True)
    fp = images_row(sd, ev, scenes, prompts)
    rows = [("FP32", "-", 0.0, 0.0, fp)]
    for wbits, abits in (map(int, r.split(",")) for r in args.rows):
        for method in ("rtn", "adaround"):
            t0 = time.perf_counter()
            q = quant.quantize_model(sd, wbits, abits, method, calib, iters=p["iters"], act_iters=p["act_iters"],
                                     batch_size=p["batch_size"], lr=p["lr"], act_lr=p["act_lr"], seed=0)
            secs = time.perf_counter() - t0
            mse = heldout_mse(q.unet, sd.unet, held)
            imgs = images_row(q, ev, scenes, prompts) if (wbits, abits) == (4, 8) else None
            rows.append((f"W{wbits}A{abits}", method, mse, secs, imgs))
            print(f"W{wbits}A{abits} {method}: MSE {mse:.5f}, {secs:.0f} s", flush=True)
    print("\n| model | method | MSE vs FP (held-out) | vs RTN | quantize s | class | color | context | CLIP-T |")
    print("|---|---|---|---|---|---|---|---|---|")
    rtn = {}
    for name, method, mse, secs, imgs in rows:
        rtn.setdefault(name, mse)
        ratio = f"{mse / rtn[name]:.2f}x" if method == "adaround" else ("1.00x" if method == "rtn" else "-")
        cells = ([f"{100 * imgs[k]:.1f}%" for k in ("class", "color", "context")] + [f"{imgs['clip_t']:.3f}"]
                 if imgs else ["", "", "", ""])
        mse_s = f"{mse:.5f}" if method != "-" else "0"
        print(f"| {name} | {method} | {mse_s} | {ratio} | {secs:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
