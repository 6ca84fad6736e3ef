"""Which sampling settings can the toy protocol afford? The same models scored twice, with one setting changed.

The studies sample every one of a subject's 25 DreamBooth templates several times, so the sampling settings set
their cost. For each subject, every template is sampled --n_images times under both values of the setting (`--vary
num_inference_steps`: DDIM steps; `--vary batch_images`: how many images are denoised in one batch), with the same
seeds, and scored against the references (CLIP-I, local CLIP-I, CLIP-T, DINO). The models are those that
bench_personalize_toy.py trained (PEQA on the W4A8 toy base, --runs) or, without --runs, the W4A8 base itself.
Printed: each value's mean over subjects, the paired difference (first minus second) with its 95% bootstrap interval
over subjects, and the seconds each value took.

    python bench/sampling_toy.py --runs runs/s10_bench_personalize/peqa --subjects mug_star,dog_patch,cat_heart
    python bench/sampling_toy.py --vary batch_images --values 2,50 --subjects dog_patch,mug_star,cat_heart,vase_heart
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as metrics  # noqa: E402
import train  # noqa: E402

METRICS = ("clip_i", "local_clip_i", "clip_t", "dino")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", help="folder of <subject>/personalized.safetensors (default: the untrained W4A8 base)")
    p.add_argument("--subjects", required=True, help="comma-separated toy subjects")
    p.add_argument("--vary", default="num_inference_steps", choices=("num_inference_steps", "batch_images"))
    p.add_argument("--values", default="25,50", help="the two values to compare, the first against the second")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps while --vary batch_images")
    p.add_argument("--n_images", type=int, default=2, help="samples per template")
    p.add_argument("--cache", default="runs/sampling_toy.json", help="scores kept here; rerun with more subjects")
    args = p.parse_args()
    root, classes, objects, live = metrics.dataset_subjects(Path(__file__).resolve().parents[1] / "assets/toy/dreambooth")
    ev, base, values = metrics.load_evaluators(), train.default_quantized(), [int(s) for s in args.values.split(",")]
    cache = json.loads(Path(args.cache).read_text()) if Path(args.cache).is_file() else {}
    scores, seconds = {n: {} for n in values}, {n: 0.0 for n in values}
    for name in args.subjects.split(","):
        cls, refs = classes[name], metrics.read_images(root / name)
        scales = Path(args.runs) / name / train.OUT_FILE if args.runs else None
        for n in values:
            key = f"{args.runs}/{name}/{args.vary}={n}/{args.n_images}"
            if key in cache:
                scores[n][name], seconds[n] = cache[key]["scores"], seconds[n] + cache[key]["seconds"]
                continue
            sampling = dict(num_inference_steps=args.steps, batch_images=1)
            sampling[args.vary] = n
            t0 = time.time()
            got, _, _ = metrics.score_model(base, scales, ev, refs, cls, metrics.templates_for(cls, objects, live),
                                            "sks", args.n_images, 0, guidance_scale=7.5, **sampling)
            seconds[n] += time.time() - t0
            scores[n][name] = {k: got[k] for k in METRICS}
            cache[key] = {"scores": scores[n][name], "seconds": time.time() - t0}
            Path(args.cache).write_text(json.dumps(cache, indent=1))
            print(f"{name} {args.vary}={n}: " + "  ".join(f"{k} {got[k]:.3f}" for k in METRICS), flush=True)
    a, b = values
    print(f"\n{len(scores[a])} subjects x all their templates x {args.n_images} images, guidance 7.5, "
          f"{args.runs or 'the untrained W4A8 base'}\n")
    print(f"| metric | {args.vary}={a} | {b} | {a} - {b} (95% CI over subjects) |\n|---|---|---|---|")
    for k in METRICS:
        d = metrics.confidence_interval([scores[a][s][k] - scores[b][s][k] for s in scores[a]])
        print(f"| {k} | {metrics.summarize(scores[a])[k][0]:.3f} | {metrics.summarize(scores[b])[k][0]:.3f} | "
              f"{d[0]:+.3f} ({d[1]:+.3f} to {d[2]:+.3f}) |")
    print(f"| seconds | {seconds[a]:.0f} | {seconds[b]:.0f} | {seconds[a] / seconds[b]:.2f}x |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
