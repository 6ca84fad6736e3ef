"""How strong must toy personalization be before the subject shows? A reduced-scale sweep on one subject.

qdp.py's demo trains each method with train.py's toy defaults; its report.png showed no dog_patch in any row. This
sweep measures, bottom up, how far each kind of training moves the samples towards the subject: full-precision
DreamBooth (every UNet weight) first, as the ceiling the scale-only methods can hope for, then PEQA on the quantized
W4A8 model, each at a few learning rates and step counts. Each config trains one train.py run on the subject (no prior
preservation, so the ceiling is not capped by the class loss; --prior adds it), then samples "a photo of sks <class>"
and two context prompts and scores them against the references with the toy evaluators (CLIP-I, DINO). The table
puts the untrained model's scores first and the references' own (each reference against the others) last.

    python bench/sweep_toy_personalize.py       # dog_patch, 9 configs: about 25 min on one core
    python bench/sweep_toy_personalize.py --subject vase_heart --configs full:2e-4:400,peqa:3e-3:400 --prior
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ckpt  # noqa: E402
import eval as metrics  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

CONFIGS = ("full:5e-5:200,full:2e-4:400,full:1e-3:400,"
           "peqa:2e-4:200,peqa:1e-3:400,peqa:3e-3:400,peqa:1e-2:400,peqa:3e-3:1000,peqa:1e-2:1000")
TEMPLATES = ["a photo of {0} {1}", "a {0} {1} in the jungle", "a {0} {1} on a cobblestone street"]


def score(base, scales, refs, cls, n_images, seed):
    scores, images, _ = metrics.score_model(base, scales, EV, refs, cls, TEMPLATES, "sks", n_images, seed,
                                            num_inference_steps=25, guidance_scale=7.5)
    return {k: scores[k] for k in ("clip_i", "dino", "clip_t")}, images


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--subject", default="dog_patch", help="toy subject of assets/toy/dreambooth")
    p.add_argument("--configs", default=CONFIGS, help="comma-separated METHOD:LR:STEPS, METHOD full or peqa")
    p.add_argument("--prior", action="store_true", help="train with prior preservation (20 class images)")
    p.add_argument("--n_images", type=int, default=4, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    p.add_argument("--out", default="runs/sweep_personalize", help="runs, samples and results.json; reused")
    p.add_argument("--fp", default=str(ckpt.TOY_CKPT), help="the float base model (full configs)")
    p.add_argument("--quantized", default=None, help="the quantized base model (peqa configs); unset: the toy model "
                   "quantized W4A8 by quant.py's fast preset")
    args = p.parse_args()
    root, classes, _, _ = metrics.dataset_subjects(Path(__file__).resolve().parents[1] / "assets/toy/dreambooth")
    cls, refs = classes[args.subject], metrics.read_images(root / args.subject)
    out = Path(args.out) / (args.subject + ("_prior" if args.prior else ""))
    out.mkdir(parents=True, exist_ok=True)
    bases = {"full": Path(args.fp), "peqa": Path(args.quantized) if args.quantized else train.default_quantized()}
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    jobs = [("untrained fp", "full", None, 0), ("untrained W4A8", "peqa", None, 0)]
    jobs += [(c, c.split(":")[0], float(c.split(":")[1]), int(c.split(":")[2])) for c in args.configs.split(",")]
    for name, method, lr, steps in jobs:
        if name in results:
            continue
        scales = None
        if lr is not None:
            run = out / name.replace(":", "_")
            prior = dict(with_prior_preservation=True, class_prompt=f"a photo of a {cls}", num_class_images=20,
                         class_data_dir=Path(args.out) / f"class_{method}")
            if not (run / train.OUT_FILE).is_file():
                train.personalize(ckpt=bases[method], method=method, instance_data_dir=root / args.subject,
                                  instance_prompt=f"a photo of sks {cls}", learning_rate=lr, max_train_steps=steps,
                                  output_dir=run, seed=args.seed, checkpointing_steps=100000,
                                  **(prior if args.prior else {}))
            scales = run / train.OUT_FILE
        results[name], images = score(bases[method], scales, refs, cls, args.n_images, args.seed)
        sample.labelled_grid([(im, "") for im in images], cols=args.n_images * 3, zoom=1).save(out / (name.replace(":", "_")
                                                                                             + ".png"))
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"{name}: " + "  ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
    ref_scores = metrics.reference_fidelity(EV, refs)
    print(f"\n{args.subject}: {len(TEMPLATES)} prompts x {args.n_images} samples, 25 DDIM steps, guidance 7.5"
          f"{', prior preservation' if args.prior else ''}\n")
    print("| config (method:lr:steps) | CLIP-I | DINO | CLIP-T |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['clip_i']:.3f} | {r['dino']:.3f} | {r['clip_t']:.3f} |")
    print(f"| references vs each other | {ref_scores['clip_i']:.3f} | {ref_scores['dino']:.3f} | - |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    EV = metrics.load_evaluators()
    main()
