"""qdp end to end: quantize Stable Diffusion v1, personalize it by its quantization scales, sample, evaluate, report.

The method of Ryu et al., "Memory-Efficient Personalization using Quantized Diffusion Model" (arXiv 2401.04339,
TuneQDM at ECCV), one stage per module; this file only wires them:
  1. quantize     quant.py   Q-Diffusion (arXiv 2302.04304): time-step-aware calibration, AdaRound + BRECQ, W4A8
  2. personalize  train.py   DreamBooth (arXiv 2208.12242) with prior preservation, training only the scales (PEQA,
                             arXiv 2305.14152): the baseline, S1 (selective: the content interval of t) and S2
                             (specialized: 4 experts over t)
  3. sample       sample.py  every model on the subject's evaluation prompts
  4. evaluate     eval.py    CLIP-I, local CLIP-I, CLIP-T and DINO against the subject's photos
  5. report       report.md with the table, and report.png with a grid of samples
Rerunning with the same --out reuses the quantized model and the trained scales (qdp.json checks that they were
made with the same settings) and redoes sampling, scoring and the report.

    python qdp.py                                   # the toy world, subject dog_patch (5.5 min on 2 CPU cores)
    python qdp.py --subject vase_heart --out runs/qdp_vase
    python qdp.py --ckpt v1-5-pruned-emaonly.safetensors --instance_data_dir photos/my_dog --class_name dog \
        --clip clip-vit-base-patch32 --dino dino-vits16 --device cuda --out runs/my_dog
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

import ckpt
import eval as metrics
import quant
import sample
import train
import unet as unet_lib
from toyworld import world

TOY_DATASET = Path(__file__).resolve().parent / "assets" / "toy" / "dreambooth"
METHODS = {"baseline": {}, "s1": {"t_range": "content"}, "s2": {"n_experts": 4}}   # train.py settings


def check_reuse(out, settings):
    """A rerun reuses the quantized model and the trained scales in --out, so they must come from the same settings;
    qdp.json records them. Sampling, scoring and the report are always redone."""
    record = out / "qdp.json"
    if record.is_file():
        old = json.loads(record.read_text())
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if changed:
            sys.exit(f"error: {out} holds a run made with other {', '.join(changed)}; pass another --out, or delete "
                     f"{out} to start over")
    record.write_text(json.dumps(settings, indent=2))


def stage(k, name, line):
    print(f"[{k}/5] {name}: {line}", flush=True)


def begin(k, name, line):
    """A stage's first line, before its work starts (the closing line, from stage(), gives its seconds)."""
    print(f"[{k}/5] {name}: {line} ...", flush=True)


def quantize(args, out):
    """Stage 1: the quantized base model, made once per --out (quant.py's defaults: Q-Diffusion's recipe on SD v1,
    its fast preset on the toy model)."""
    path = out / f"quantized_w{args.wbits}a{args.abits}.safetensors"
    t0 = time.time()
    begin(1, "quantize", f"W{args.wbits}A{args.abits} with AdaRound" + (f", reusing {path}" if path.is_file() else ""))
    if not path.is_file():
        quant.quantize(ckpt=args.ckpt, wbits=args.wbits, abits=args.abits, device=args.device, out=path,
                       iters=args.quant_iters, act_iters=args.quant_iters)
    stage(1, "quantize", f"W{args.wbits}A{args.abits} AdaRound in {time.time() - t0:.0f} s -> {path}")
    return path


def personalize(args, base, out, subject_dir, cls):
    """Stage 2: one train.py run per method, all with prior preservation on class images the quantized model draws
    (generated once, shared by the methods)."""
    runs = {}
    begin(2, "personalize", f"{', '.join(args.methods)} on {subject_dir} as '{args.token} {cls}', with prior "
          f"preservation on {args.num_class_images} class images")
    for method in args.methods:
        run = out / method
        t0 = time.time()
        if not (run / train.OUT_FILE).is_file():
            train.personalize(ckpt=base, instance_data_dir=subject_dir,
                              instance_prompt=f"a photo of {args.token} {cls}", with_prior_preservation=True,
                              class_prompt=f"a photo of a {cls}", class_data_dir=out / "class_images",
                              num_class_images=args.num_class_images, output_dir=run, seed=args.seed,
                              class_inference_steps=args.class_inference_steps,
                              device=args.device, max_train_steps=args.max_train_steps or None,
                              resume=(run / train.STATE_FILE).is_file(), **METHODS[method])
            (run / "seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
        runs[method] = run / train.OUT_FILE
    seconds = {m: float((out / m / "seconds.txt").read_text()) for m in runs if (out / m / "seconds.txt").is_file()}
    stage(2, "personalize", ", ".join(f"{m} {seconds.get(m, 0):.0f} s" for m in runs) + f" -> {out}/<method>/")
    return runs


def sample_and_score(args, base, runs, refs, cls, templates):
    """Stages 3 and 4: the untrained quantized model and each personalized one, on the same prompts and seeds."""
    ev = metrics.load_evaluators(args.clip, args.dino) if args.evaluate else None
    rows, grids = {}, {}
    t0 = time.time()
    begin(3, "sample and evaluate", f"{1 + len(runs)} models x {len(templates)} prompts x {args.n_images} images")
    for name, scales in [("untrained", None), *runs.items()]:
        scores, images, prompts = metrics.score_model(base, scales, ev, refs, cls, templates, args.token, args.n_images,
                                                      args.seed, args.device, per_image=True,
                                                      num_inference_steps=args.num_inference_steps,
                                                      guidance_scale=args.guidance_scale)
        if scales is not None:
            scores.update(trainable=sum(v.numel() for v in load_file(scales).values()),
                          file_mib=scales.stat().st_size / 2**20)
        rows[name], grids[name] = scores, [(images[i], prompts[i]) for i in range(0, len(images), args.n_images)]
        print(f"    {name}: {len(images)} images drawn" + (" and scored" if ev else "")
              + f" ({time.time() - t0:.0f} s so far)", flush=True)
    stage(3, "sample", f"{len(rows)} models x {len(templates)} prompts x {args.n_images} images in "
          f"{time.time() - t0:.0f} s")
    if ev is not None:
        stage(4, "evaluate", "  ".join(f"{n} CLIP-I {r['clip_i']:.3f} DINO {r['dino']:.3f}" for n, r in rows.items()))
    else:
        stage(4, "evaluate", "skipped: give --clip and --dino folders to score a real model")
    return rows, grids


LEGEND = {
    "clip_i": "mean cosine between each sample and each reference photo in the evaluation CLIP's image space: how much "
              "the samples look like the subject",
    "local_clip_i": "CLIP-I on the crop where the model attends to the class word: the subject itself, not the "
                    "background",
    "clip_t": "cosine between each sample and its prompt without the identifier: how well the prompt is followed",
    "dino": "as CLIP-I in a self-supervised ViT's space (the toy world: its DINO stand-in), which tells individuals of "
            "one class apart better than CLIP does"}


def change_rows(rows):
    """Markdown rows: each trained model's CLIP-I and DINO minus the untrained model's, paired image by image (same
    prompts and seeds), with a 95% bootstrap interval over the images."""
    base = rows["untrained"]["per_image"]
    lines = []
    for name, r in rows.items():
        if name == "untrained":
            continue
        cells = []
        for k in ("clip_i", "dino"):
            mean, lo, hi = metrics.confidence_interval([a - b for a, b in zip(r["per_image"][k], base[k])])
            cells.append(f"{mean:+.3f} ({lo:+.3f} to {hi:+.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report(args, out, rows, grids, refs, subject, cls, seconds):
    """Stage 5: report.png (the references, then each model's first image of every prompt) and report.md (settings,
    the table, the change from the untrained model, what the columns mean and what one subject can show)."""
    n_prompts = len(grids["untrained"])
    cols = min(n_prompts, 9)
    cells = [(im, f"reference {i}") for i, im in enumerate(refs[:cols])]
    cells += [(Image.new("RGB", (8, 8), "white"), "")] * (-len(cells) % cols)
    for name, g in grids.items():
        cells += [(im, f"{name}: {p}") for im, p in g]
    sample.labelled_grid(cells, cols=cols).save(out / "report.png")
    keys = [k for k in ("clip_i", "local_clip_i", "clip_t", "dino") if k in next(iter(rows.values()))]
    n_scored = n_prompts * args.n_images
    lines = [f"# qdp report: {subject} ({cls})", "",
             f"Base `{args.ckpt}` quantized W{args.wbits}A{args.abits}; DreamBooth with prior preservation on the "
             f"scales only; {n_prompts} prompts x {args.n_images} images per model, {args.num_inference_steps} DDIM "
             f"steps, guidance {args.guidance_scale}, seed {args.seed}. Total {seconds / 60:.1f} min.", ""]
    if keys:
        lines += ["| model | " + " | ".join(metrics.METRIC_NAMES[k] for k in keys) + " | trainable | file |",
                  "|---" * (len(keys) + 3) + "|"]
        for name, r in rows.items():
            extra = [f"{r['trainable']:,}", f"{r['file_mib']:.2f} MiB"] if "trainable" in r else ["-", "-"]
            lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " | " + " | ".join(extra) + " |")
        lines += ["", f"Change from the untrained model, paired image by image ({n_scored} images, the same prompts "
                  "and seeds for every model), with a 95% bootstrap interval over the images:", "",
                  "| model | CLIP-I change | DINO change |", "|---|---|---|", *change_rows(rows), "",
                  "What the columns measure (higher is better for each):", ""]
        lines += [f"- {metrics.METRIC_NAMES[k]}: {LEGEND[k]}." for k in keys]
        lines += ["", f"One subject and {n_scored} samples per model: a change whose interval holds 0 is noise, and "
                  "no ranking of the methods follows from one subject. The paper's protocol (30 subjects x 25 "
                  "prompts: `python eval.py --dataset ...`, or `python studies.py` in the toy world) can rank them."]
    lines += ["", "![samples](report.png)", "",
              f"report.png: the references, then one row per model with the first of the {args.n_images} images of "
              f"each of the {n_prompts} prompts.", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(rows, indent=2))
    stage(5, "report", f"{out / 'report.md'} and {out / 'report.png'}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Quantize SD v1, personalize it by its scales (baseline, S1, S2), "
                                "sample, evaluate and report; the toy world by default.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=str(ckpt.TOY_CKPT), help="float SD v1 checkpoint (file or diffusers folder)")
    p.add_argument("--subject", default="dog_patch", help="toy subject (assets/toy/dreambooth) when no "
                   "--instance_data_dir is given")
    p.add_argument("--instance_data_dir", default=None, help="folder of 3-6 photos of your subject; unset: --subject")
    p.add_argument("--class_name", default=None, help="with --instance_data_dir: the subject's class, e.g. dog")
    p.add_argument("--token", default="sks", help="the rare identifier, as in 'a photo of sks dog'")
    p.add_argument("--methods", default="baseline,s1,s2", help=f"methods to train, comma-separated, of "
                   f"{', '.join(METHODS)}")
    p.add_argument("--wbits", type=int, choices=[4, 8], default=4, help="weight bits of the quantized model")
    p.add_argument("--abits", type=int, choices=[8, 32], default=8, help="activation bits (32: float activations)")
    p.add_argument("--quant_iters", type=int, default=None, help="AdaRound and activation-step "
                   "iterations per block; unset: quant.py's preset for the model")
    p.add_argument("--max_train_steps", type=int, default=None, help="training steps per method; unset: train.py's "
                   f"for the model ({train.REAL_DEFAULTS['max_train_steps']} on SD, "
                   f"{train.TOY_DEFAULTS['max_train_steps']} on the toy model)")
    p.add_argument("--num_class_images", type=int, default=None, help="class images for the prior preservation "
                   "loss; unset: 20 on the toy model, 100 on SD")
    p.add_argument("--class_inference_steps", type=int, default=50, help="DDIM steps per class image (train.py's)")
    p.add_argument("--n_prompts", type=int, default=None, help="the first N evaluation templates, of every "
                   "third of the 25 on the toy model (9) or of all 25 on SD; unset: all of them")
    p.add_argument("--n_images", type=int, default=None, help="images per prompt; unset: 2 on the toy model, 4 on SD")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM denoising steps per image")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance when sampling")
    p.add_argument("--clip", default=None, help="local CLIP ViT-B/32 folder; unset: the toy evaluator on the toy "
                   "model, while on SD the samples are drawn but not scored (give --clip and --dino together)")
    p.add_argument("--dino", default=None, help="local DINO ViT-S/16 folder (see --clip)")
    p.add_argument("--seed", type=int, default=0, help="seeds the training runs and the evaluation samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (cuda where available)")
    p.add_argument("--out", default="runs/qdp", help="output folder; a rerun reuses its finished stages")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown --methods {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if not Path(args.ckpt).exists():
        p.error(f"--ckpt {args.ckpt} does not exist; give an SD v1 checkpoint file or diffusers folder")
    if (args.instance_data_dir is None) != (args.class_name is None):
        p.error("--instance_data_dir and --class_name go together, e.g. --instance_data_dir photos --class_name dog")
    if args.instance_data_dir and not Path(args.instance_data_dir).is_dir():
        p.error(f"--instance_data_dir {args.instance_data_dir} is not a folder")
    if (args.clip is None) != (args.dino is None):
        p.error("give both --clip and --dino folders, or neither for the toy evaluators")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("CUDA is not available here; use --device cpu")
    if not math.isfinite(args.guidance_scale):
        p.error(f"--guidance_scale must be a finite number, e.g. 7.5, got {args.guidance_scale}")
    for name in ("n_prompts", "n_images", "num_class_images", "max_train_steps", "quant_iters",
                 "class_inference_steps"):
        if getattr(args, name) is not None and getattr(args, name) < (0 if name == "quant_iters" else 1):
            p.error(f"--{name} must be at least {0 if name == 'quant_iters' else 1}")
    return args


def main(argv=None):
    args = parse_args(argv)
    sample.pick_threads(args.device)
    t0, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    toy_model = ckpt.load_sd(args.ckpt).unet.config == unet_lib.toy()
    # the subject: a toy one, or the user's photos; the prompts: DreamBooth's templates for its class
    root, classes, objects, live = metrics.dataset_subjects(TOY_DATASET)
    if args.instance_data_dir:
        subject_dir, cls, subject = Path(args.instance_data_dir), args.class_name, Path(args.instance_data_dir).name
    elif args.subject in classes:
        subject_dir, cls, subject = root / args.subject, classes[args.subject], args.subject
    else:
        sys.exit(f"error: no toy subject {args.subject!r}; choose from {', '.join(classes)}, "
                 "or give --instance_data_dir and --class_name")
    templates = metrics.templates_for(cls, objects, live)
    templates = (templates[::3] if toy_model else templates)[:args.n_prompts]
    args.n_images = args.n_images or (2 if toy_model else 4)
    args.num_class_images = args.num_class_images or (20 if toy_model else 100)
    args.evaluate = toy_model or args.clip is not None
    try:
        refs = metrics.read_images(subject_dir, "--instance_data_dir")
    except ckpt.CheckpointError as e:
        sys.exit(f"error: {e}")
    check_reuse(out, {k: str(getattr(args, k)) for k in ("ckpt", "wbits", "abits", "quant_iters", "token",
                                                         "max_train_steps", "num_class_images", "seed")}
                | {"subject": str(subject_dir.resolve()), "class": cls, "ckpt_sha256": ckpt.sha256(args.ckpt)}
                | ({} if args.class_inference_steps == 50    # recorded when not the default: older qdp.json still match
                   else {"class_inference_steps": args.class_inference_steps}))
    try:
        base = quantize(args, out)
        runs = personalize(args, base, out, subject_dir, cls)
        rows, grids = sample_and_score(args, base, runs, refs, cls, templates)
    except (train.TrainingError, ckpt.CheckpointError) as e:
        sys.exit(f"error: {e} (qdp.py keeps its runs in {out}: delete it or pass another --out)")
    report(args, out, rows, grids, refs, subject, cls, time.time() - t0)
    print(f"done in {(time.time() - t0) / 60:.1f} min: {out / 'report.md'}")


if __name__ == "__main__":
    main()
