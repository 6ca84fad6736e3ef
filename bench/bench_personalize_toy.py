"""Does personalization work in the toy world? Subject fidelity of "a photo of sks <class>" before and after training,
for full-precision DreamBooth, the PEQA baseline, S1 and S2, on every toy subject.

For each toy subject (the 30 of assets/toy/dreambooth, or --subjects) and each method, train.py runs with its toy
defaults (200 steps, prior preservation with class images the base model draws itself), then 8 samples of "a photo of
sks <class>" are scored against the subject's reference images with the evaluation CLIP (CLIP-I) and the toy DINO;
"before" is the same prompt on the untrained base (FP for full, the quantized W4A8 model for the others). Means over
subjects with 95% bootstrap intervals. Rerunning reuses finished runs and cached class images (delete --out to start over).

    python bench/bench_personalize_toy.py                      # 10 subjects x 4 methods took 52 min on 2 cores
    python bench/bench_personalize_toy.py --subjects mug_star,dog_patch --methods peqa,s2
"""
import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ckpt  # noqa: E402
import eval as metrics  # noqa: E402
import train  # noqa: E402

METHODS = {"full": dict(method="full"), "peqa": {}, "s1": dict(t_range="content"), "s2": dict(n_experts=4)}


def score(base, scales, references, cls, n_images, seed):
    scores, _, _ = metrics.score_model(base, scales, EV, references, cls, ["a photo of {0} {1}"], "sks", n_images,
                                       seed, num_inference_steps=50, guidance_scale=7.5)
    return {k: scores[k] for k in ("clip_i", "dino")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", default="all")
    p.add_argument("--methods", default="full,peqa,s1,s2")
    p.add_argument("--num_class_images", type=int, default=20)
    p.add_argument("--n_images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_personalize")
    args = p.parse_args()
    root, classes, _, _ = metrics.dataset_subjects(Path(__file__).resolve().parents[1] / "assets/toy/dreambooth")
    subjects = list(classes) if args.subjects == "all" else args.subjects.split(",")
    methods = args.methods.split(",")
    out, q_base, fp_base = Path(args.out), train.default_quantized(), ckpt.TOY_CKPT
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    for name in subjects:
        cls, refs = classes[name], metrics.read_images(root / name)
        for m in methods:
            base = fp_base if m == "full" else q_base
            key = f"{name}/{m}"
            if key in results:
                continue
            run = out / m / name
            if not (run / "personalized.safetensors").is_file():
                train.personalize(ckpt=base, instance_data_dir=root / name, instance_prompt=f"a photo of sks {cls}",
                                  with_prior_preservation=True, class_prompt=f"a photo of a {cls}",
                                  num_class_images=args.num_class_images,
                                  class_data_dir=out / ("class_fp" if m == "full" else "class_q") / cls,
                                  output_dir=run, seed=args.seed, **METHODS[m])
            before_key = f"{name}/before_{'fp' if m == 'full' else 'q'}"
            if before_key not in results:
                results[before_key] = score(base, None, refs, cls, args.n_images, args.seed)
            results[key] = score(base, run / "personalized.safetensors", refs, cls, args.n_images, args.seed)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
            print(f"{key}: " + "  ".join(f"{k} {results[before_key][k]:.3f} -> {v:.3f}"
                                         for k, v in results[key].items()), flush=True)
    print(f"\n{len(subjects)} subjects, {args.n_images} samples each of \"a photo of sks <class>\", 95% bootstrap "
          "intervals over subjects\n")
    print("| method | CLIP-I before | CLIP-I after | gain (paired) | DINO before | DINO after | gain (paired) |")
    print("|---|---|---|---|---|---|---|")
    means = {}                                                     # method: {metric: (before, after)}
    for m in methods:
        before = [results[f"{s}/before_{'fp' if m == 'full' else 'q'}"] for s in subjects]
        after = [results[f"{s}/{m}"] for s in subjects]
        cells = []
        for k in ("clip_i", "dino"):
            for rows in (before, after):
                mean, lo, hi = metrics.confidence_interval([r[k] for r in rows])
                cells.append(f"{mean:.3f} ({lo:.3f}-{hi:.3f})")
            gain = [a[k] - b[k] for a, b in zip(after, before)]
            mean, lo, hi = metrics.confidence_interval(gain)
            cells.append(f"{mean:+.3f} ({lo:+.3f} to {hi:+.3f}), {sum(g > 0 for g in gain)}/{len(gain)} up")
            means.setdefault(m, {})[k] = tuple(sum(r[k] for r in rows) / len(rows) for rows in (before, after))
        print(f"| {m} | " + " | ".join(cells) + " |")
    ceilings = [metrics.reference_fidelity(EV, metrics.read_images(root / s)) for s in subjects]
    ceiling = {k: sum(c[k] for c in ceilings) / len(ceilings) for k in ("clip_i", "dino")}
    gap = lambda m, k: (means[m][k][1] - means[m][k][0]) / (ceiling[k] - means[m][k][0])  # noqa: E731
    print(f"\nreferences vs each other: CLIP-I {ceiling['clip_i']:.3f}, DINO {ceiling['dino']:.3f}; gap closed "
          "(after - before) / (references - before): "
          + ", ".join(f"{m} {100 * gap(m, 'clip_i'):.0f}% / {100 * gap(m, 'dino'):.0f}%" for m in methods))


if __name__ == "__main__":
    EV = metrics.load_evaluators()
    main()
