"""How many DDIM steps does the toy protocol need? The same personalized models scored at 25 and at 50 steps.

The studies sample every one of a subject's 25 DreamBooth templates several times, so the step count sets their
cost. For each subject that bench_personalize_toy.py trained (PEQA on the W4A8 toy base, its --out), every template is
sampled --n_images times at both step counts, with the same seeds, and scored against the references (CLIP-I, local
CLIP-I, CLIP-T, DINO). Printed: each count's mean over subjects and the paired difference (25 minus 50) with its 95%
bootstrap interval over subjects, and the seconds each count took.

    python bench/ddim_steps_toy.py --runs runs/s10_bench_personalize/peqa --subjects mug_star,dog_patch,cat_heart
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
    p.add_argument("--runs", default="runs/bench_personalize/peqa", help="folder of <subject>/personalized.safetensors")
    p.add_argument("--subjects", required=True, help="comma-separated toy subjects")
    p.add_argument("--steps", default="25,50", help="the step counts to compare, the first against the second")
    p.add_argument("--n_images", type=int, default=2, help="samples per template")
    p.add_argument("--cache", default="runs/ddim_steps_toy.json", help="scores kept here; rerun with more subjects")
    args = p.parse_args()
    root, classes, objects, live = metrics.dataset_subjects(Path(__file__).resolve().parents[1] / "assets/toy/dreambooth")
    ev, base, counts = metrics.load_evaluators(), train.default_quantized(), [int(s) for s in args.steps.split(",")]
    cache = json.loads(Path(args.cache).read_text()) if Path(args.cache).is_file() else {}
    scores, seconds = {n: {} for n in counts}, {n: 0.0 for n in counts}
    for name in args.subjects.split(","):
        cls, refs = classes[name], metrics.read_images(root / name)
        for n in counts:
            key = f"{name}/{n}/{args.n_images}"
            if key in cache:
                scores[n][name], seconds[n] = cache[key]["scores"], seconds[n] + cache[key]["seconds"]
                continue
            t0 = time.time()
            got, _, _ = metrics.score_model(base, Path(args.runs) / name / train.OUT_FILE, ev, refs, cls,
                                            metrics.templates_for(cls, objects, live), "sks", args.n_images, 0,
                                            num_inference_steps=n, guidance_scale=7.5)
            seconds[n] += time.time() - t0
            scores[n][name] = {k: got[k] for k in METRICS}
            cache[key] = {"scores": scores[n][name], "seconds": time.time() - t0}
            Path(args.cache).write_text(json.dumps(cache, indent=1))
            print(f"{name} {n} steps: " + "  ".join(f"{k} {got[k]:.3f}" for k in METRICS), flush=True)
    a, b = counts
    print(f"\n{len(scores[a])} subjects x all their templates x {args.n_images} images, guidance 7.5\n")
    print(f"| metric | {a} steps | {b} steps | {a} - {b} (95% CI over subjects) |\n|---|---|---|---|")
    for k in METRICS:
        d = metrics.confidence_interval([scores[a][s][k] - scores[b][s][k] for s in scores[a]])
        print(f"| {k} | {metrics.summarize(scores[a])[k][0]:.3f} | {metrics.summarize(scores[b])[k][0]:.3f} | "
              f"{d[0]:+.3f} ({d[1]:+.3f} to {d[2]:+.3f}) |")
    print(f"| seconds | {seconds[a]:.0f} | {seconds[b]:.0f} | {seconds[a] / seconds[b]:.2f}x |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
