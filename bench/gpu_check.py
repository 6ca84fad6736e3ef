"""The real SD v1 path on one GPU at realistic settings: memory per stage, training-step and sampling times.

bench/real_path.py proves that every command runs at full size; this measures what a GPU user would ask next, on the
same random-weight files of SD v1.5's shapes (made by real_path.py's builders):
1. quant.py W4A8 with AdaRound on Q-Diffusion's calibration shape (50 DDIM steps, every 2nd kept, both CFG halves)
   with fewer prompts and iterations, in bf16 autocast;
2. train.py S2 (4 experts) with prior preservation on 4 class images the model draws, 50 steps at 512x512;
3. the training-step time of full DreamBooth (FP32 weights, AdamW), the PEQA baseline and S2 side by side
   (bench/bench_train.py, a fresh process each, median of 5 steps after a warm-up);
4. 4 images at 512x512 (50 DDIM steps, guidance 7.5) from the W4A8 model and from the FP16 model;
5. eval.py's scores of those W4 images with the CLIP ViT-B/32 and DINO ViT-S/16 folders.
Each stage prints its seconds and torch.cuda.max_memory_allocated (reset before it); sized for under 8 minutes on
one modern GPU (about 11 GB of disk for the files).

    python bench/gpu_check.py                           # on a CUDA machine
    python bench/gpu_check.py --device cpu --size tiny  # the same stages on tiny shapes: checks this script
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_train  # noqa: E402
import ckpt  # noqa: E402
import eval as metrics  # noqa: E402
import quant  # noqa: E402
import real_path  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402


def peak_mib(device):
    """Peak memory since the last reset: torch.cuda.max_memory_allocated on a GPU; on a CPU the process's resident
    high-water mark (never reset, so read it as a running maximum)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return bench_train.status_mb("VmHWM")


def measured(rows, name, device, fn):
    """Run fn() as one stage: append (name, seconds, peak MiB) to rows and return fn's result."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    rows.append((name, time.perf_counter() - t0, peak_mib(device)))
    print(f"| {name} | {rows[-1][1]:.1f} | {rows[-1][2]:,.0f} |", flush=True)
    return out


def step_times(device, size):
    """bench_train.py's side-by-side training steps (one fresh process per case)."""
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--cases", "full", "peqa_w4", "s2_w4", "--device",
           device.split(":")[0], "--steps", "6", "--size", "sd_v1" if size == "full" else "tiny"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"error: bench_train.py failed:\n{done.stderr[-2000:]}")
    return done.stdout


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (or cuda:N); cpu with --size tiny checks the script")
    p.add_argument("--size", choices=sorted(real_path.SIZES), default="full")
    p.add_argument("--work", default=None, help="folder for the files (default runs/gpu_check_<size>); reused")
    p.add_argument("--n_prompts", type=int, default=8, help="calibration prompts (Q-Diffusion: 128)")
    p.add_argument("--iters", type=int, default=100, help="AdaRound iterations per block (Q-Diffusion: 20,000)")
    p.add_argument("--train_steps", type=int, default=50, help="S2 training steps")
    p.add_argument("--photos", default=str(real_path.PHOTOS), help="a few photos of one dog")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: CUDA is not available here; run on a GPU machine, or check the script with --device cpu "
                 "--size tiny")
    work = Path(args.work or ROOT / "runs" / f"gpu_check_{args.size}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    real_path.prepare(work, args.size, Path(args.photos))
    sd_file, q_file, run = work / "sd15.safetensors", work / "w4a8.safetensors", work / "s2"
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.size} size\n\n| stage | seconds | peak memory (MiB) |\n|---|---|---|")
    rows, prompt = [], "a photo of sks dog"
    shutil.rmtree(run, ignore_errors=True)                     # every check trains afresh (the files are reused)
    measured(rows, f"quant.py W4A8 AdaRound ({args.n_prompts} prompts x 50 steps, {args.iters} iterations, bf16)",
             args.device, lambda: quant.quantize(
                 ckpt=str(sd_file), wbits=4, abits=8, device=args.device, n_prompts=args.n_prompts,
                 num_inference_steps=50, calib_every=2, iters=args.iters, act_iters=args.iters // 4, batch_size=16,
                 mixed_precision="bf16", out=str(q_file), overwrite=True))
    measured(rows, f"train.py S2 + prior (4 class images), {args.train_steps} steps, bf16", args.device,
             lambda: train.personalize(
                 ckpt=str(q_file), instance_data_dir=work / "photos", instance_prompt=prompt,
                 with_prior_preservation=True, class_prompt="a photo of a dog", class_data_dir=work / "class_images",
                 num_class_images=4, n_experts=4, max_train_steps=args.train_steps, mixed_precision="bf16",
                 output_dir=run, device=args.device))
    images = {}
    for label, path, scales in (("W4A8 + S2 scales", q_file, run / train.OUT_FILE), ("FP16", sd_file, None)):
        def draw():
            sd = ckpt.load_sd(path, device=args.device, dtype=torch.float16 if args.device != "cpu" else
                              torch.float32)
            if scales is not None:
                sd = ckpt.load_personalized(sd, scales, base_path=path)
            t0 = time.perf_counter()
            images[label] = sample.generate(sd, prompt, seed=0, num_images_per_prompt=4)
            return time.perf_counter() - t0
        seconds = measured(rows, f"sample 4 images, {label} (load + draw)", args.device, draw)
        print(f"    drawing alone: {seconds:.1f} s", flush=True)
    ev = metrics.load_evaluators(str(work / "clip"), str(work / "dino"))
    refs = ckpt.read_images(work / "photos")
    scores = measured(rows, "eval: CLIP-I, CLIP-T, DINO of the W4 images", args.device, lambda: {
        "clip_i": metrics.clip_i(ev, images["W4A8 + S2 scales"], refs),
        "clip_t": metrics.clip_t(ev, images["W4A8 + S2 scales"], ["a photo of a dog"] * 4),
        "dino": metrics.dino(ev, images["W4A8 + S2 scales"], refs)})
    print("\nTraining steps side by side (bench/bench_train.py):\n" + step_times(args.device, args.size))
    (work / "gpu_check.json").write_text(json.dumps({"device": name, "rows": rows, "scores": scores}, indent=2))


if __name__ == "__main__":
    main()
