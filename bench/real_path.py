"""The real SD v1 path, end to end at full size, on random weights: every command a GPU user would run, run once.

No pretrained weights exist here, so this writes files of the real shapes with random weights and runs the user's
commands on them at minimal settings (a handful of AdaRound iterations, two training steps, two DDIM steps):
- an SD-v1.5-shaped CompVis .safetensors (UNet 859.5M, VAE 83.7M, CLIP ViT-L/14 text encoder 123.1M; float16, as
  the common pruned files), built from qdp's own modules and written by ckpt.save_compvis;
- a CLIPModel folder shaped as ViT-B/32 and a ViTModel folder shaped as DINO ViT-S/16 (transformers configs,
  save_pretrained, their preprocessor configs), the evaluators of CLIP-I, CLIP-T and DINO;
- a folder of real photos: a DreamBooth subject from ../shared/assets (CC BY 4.0 / Unsplash License).
Then, each as its own process (wall time and the process's resident high-water mark, everything included):
quant.py W4A8 with AdaRound, train.py with prior preservation and S2 at 512x512, sample.py --scales at 512x512,
sample.py --export to both layouts and each back through the loader (ckpt.py), eval.py --clip --dino on the samples,
and qdp.py --ckpt end to end. qdp.py finds quant.py's file in its --out and reuses it, as a rerun does: Q-Diffusion's
calibration recipe, qdp's default on SD, would take hours on a CPU. The first failing command stops the run.

    python bench/real_path.py                  # full size, 11 GB of disk (the README has its time on 2 CPU cores)
    python bench/real_path.py --size tiny      # the same commands on tiny shapes, in a minute
    python bench/real_path.py --stages 3-8     # some of them again, one after another
Stage 1 runs on every core; then qdp.py (stage 9, which needs only stage 1's file) runs on one thread beside stages
2-8 on the other.
"""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel, ViTConfig,
                          ViTImageProcessor, ViTModel)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ckpt  # noqa: E402
import unet as unet_lib  # noqa: E402
import vae as vae_lib  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "assets" / "dreambooth" / "dataset" / "dog"
SIZES = {  # SD v1.5, CLIP ViT-B/32 and DINO ViT-S/16 shapes; tiny: the same families, small
    "full": dict(unet=unet_lib.sd_v1(), vae=vae_lib.sd_v1(),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                 clip_text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                 clip_vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, patch_size=32, image_size=224),
                 projection_dim=512,
                 dino=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                           patch_size=16, image_size=224)),
    "tiny": dict(unet=dataclasses.replace(unet_lib.tiny(), sample_size=8),   # 64x64 images
                 vae=vae_lib.VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),  # SD's 8x
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 clip_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 clip_vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  patch_size=8, image_size=32),
                 projection_dim=16,
                 dino=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=8, image_size=32)),
}
TEXT_COMMON = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                   eos_token_id=49407, pad_token_id=1)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_sd(path, size, seed=0):
    """A CompVis single file of random weights in SD v1's layout (float16), which ckpt.load_sd and diffusers read."""
    torch.manual_seed(seed)
    s = SIZES[size]
    model = ckpt.StableDiffusion(unet_lib.UNet(s["unet"]).eval(), vae_lib.AutoencoderKL(s["vae"]).eval(),
                                 CLIPTextModel(CLIPTextConfig(**TEXT_COMMON, **s["text"])).eval(),
                                 ckpt.load_tokenizer())
    ckpt.save_compvis(model, path, dtype=torch.float16)
    return path


def write_clip(folder, size, seed=1):
    """A random CLIPModel folder shaped as ViT-B/32 (text 512 wide, 224 px images in 32 px patches), with the SD v1
    tokenizer (CLIP's own BPE) and CLIP's image preprocessing."""
    torch.manual_seed(seed)
    s = SIZES[size]
    cfg = CLIPConfig(text_config={**TEXT_COMMON, **s["clip_text"]}, vision_config=s["clip_vision"],
                     projection_dim=s["projection_dim"])
    CLIPModel(cfg).save_pretrained(folder)
    ckpt.load_tokenizer().save_pretrained(folder)
    side = s["clip_vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_mean=CLIP_MEAN,
                       image_std=CLIP_STD).save_pretrained(folder)
    return folder


def write_dino(folder, size, seed=2):
    """A random ViTModel folder shaped as DINO ViT-S/16 (384 wide, 6 heads, 224 px images in 16 px patches)."""
    torch.manual_seed(seed)
    s = SIZES[size]
    ViTModel(ViTConfig(**s["dino"]), add_pooling_layer=False).save_pretrained(folder)
    side = s["dino"]["image_size"]
    ViTImageProcessor(size={"height": side, "width": side}, image_mean=IMAGENET_MEAN,
                      image_std=IMAGENET_STD).save_pretrained(folder)
    return folder


def commands(work, size):
    """(stage, script, argv) in the order a user runs them."""
    sd, q, s2, photos = work / "sd15.safetensors", work / "w4a8.safetensors", work / "s2", work / "photos"
    prompt, steps = "a photo of sks dog", ["--num_inference_steps", "2"]
    return [
        ("quant.py W4A8 AdaRound", "quant.py", ["--ckpt", sd, "--wbits", "4", "--abits", "8", "--n_prompts", "1",
                                                *steps, "--calib_every", "1", "--iters", "4", "--act_iters", "2",
                                                "--batch_size", "2", "--out", q]),
        ("train.py S2, prior", "train.py", ["--ckpt", q, "--instance_data_dir", photos, "--instance_prompt", prompt,
                                            "--with_prior_preservation", "--class_prompt", "a photo of a dog",
                                            "--class_data_dir", work / "class_images", "--num_class_images", "1",
                                            "--class_inference_steps", "2", "--n_experts", "4",
                                            "--max_train_steps", "2", "--output_dir", s2]),
        ("sample.py --scales", "sample.py", ["--ckpt", q, "--scales", s2 / "personalized.safetensors", "--prompt",
                                             prompt, *steps, "--out", work / "samples" / "s2.png"]),
        ("sample.py --export compvis", "sample.py", ["--ckpt", q, "--scales", s2 / "personalized.safetensors",
                                                     "--expert", "2", "--export", work / "export.safetensors"]),
        ("ckpt.py <compvis export>", "ckpt.py", [work / "export.safetensors"]),
        ("sample.py --export diffusers", "sample.py", ["--ckpt", q, "--scales", s2 / "personalized.safetensors",
                                                       "--expert", "2", "--export", work / "export_diffusers"]),
        ("ckpt.py <diffusers export>", "ckpt.py", [work / "export_diffusers"]),
        ("eval.py --clip --dino", "eval.py", ["--images", work / "samples", "--references", photos, "--prompt",
                                              "a photo of a dog", "--clip", work / "clip", "--dino", work / "dino",
                                              "--out", work / "eval"]),
        ("qdp.py --ckpt", "qdp.py", ["--ckpt", sd, "--instance_data_dir", photos, "--class_name", "dog", "--methods",
                                     "baseline,s2", "--max_train_steps", "2", "--num_class_images", "1",
                                     "--class_inference_steps", "2", "--n_prompts", "1", "--n_images", "1", *steps,
                                     "--clip", work / "clip", "--dino", work / "dino", "--out", work / "qdp"]),
    ]


# runs a script as __main__, then prints the process's resident high-water mark (a fresh program image starts anew)
_MEASURED = ("import runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, '.'); "
             "runpy.run_path(sys.argv[0], run_name='__main__'); "
             "print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")


def start(script, argv, log, threads=None):
    """Start `python script argv` in the repository (with `threads` torch threads, else the environment's)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    f = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-c", _MEASURED, script, *map(str, argv)], cwd=ROOT, stdout=f,
                            stderr=subprocess.STDOUT, text=True, env=env)
    return proc, f, time.time(), script, argv, log


def finish(job):
    """Wait for a started command; (seconds, peak resident MiB), or exit with its last lines."""
    proc, f, t0, script, argv, log = job
    proc.wait()
    f.close()
    seconds, lines = time.time() - t0, Path(log).read_text().splitlines()
    peak = [line.split()[1] for line in lines if line.startswith("VmHWM ")]
    if proc.returncode != 0 or not peak:
        tail = "\n    ".join(lines[-15:])
        sys.exit(f"error: `python {script} {' '.join(map(str, argv))}` failed after {seconds:.0f} s:\n    {tail}\n"
                 f"(whole log: {log})")
    return seconds, int(peak[0]) / 1024


def prepare(work, size, photos):
    """The model files and the photos, each made once per --work folder."""
    made = {}
    for name, fn in (("sd15.safetensors", write_sd), ("clip", write_clip), ("dino", write_dino)):
        if not (work / name).exists():
            t0 = time.time()
            fn(work / name, size)
            made[name] = time.time() - t0
    if not (work / "photos").is_dir():
        if not photos.is_dir():
            sys.exit(f"error: no photos at {photos}; pass --photos FOLDER (a few photos of one dog)")
        shutil.copytree(photos, work / "photos")
    return made


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="full: SD v1.5 shapes; tiny: a quick check")
    p.add_argument("--work", default=None, help="folder for the files (default runs/real_path_<size>); reused")
    p.add_argument("--photos", default=str(PHOTOS), help="a few photos of one dog")
    p.add_argument("--stages", default=None, help="only these of the numbered commands, e.g. 2-8 or 9 (two such "
                   "runs in parallel share a --work folder: qdp.py, 9, needs only stage 1's file)")
    p.add_argument("--fresh", action="store_true", help="delete the outputs of earlier runs in --work first "
                   "(the model files are kept)")
    args = p.parse_args(argv)
    work = Path(args.work or ROOT / "runs" / f"real_path_{args.size}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for name in ("w4a8.safetensors", "s2", "class_images", "samples", "export.safetensors", "export_diffusers",
                     "eval", "qdp"):
            path = work / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    made = prepare(work, args.size, Path(args.photos))
    (work / "qdp").mkdir(exist_ok=True)
    rows = [f"| write {name} (random weights) | {s:.0f} | - |" for name, s in made.items()]
    print(f"{args.size} size, {torch.get_num_threads()} threads, work folder {work}", flush=True)
    todo, t0 = list(enumerate(commands(work, args.size), 1)), time.time()
    if args.stages:                                           # these, one after another, threads as the shell says
        lo, _, hi = args.stages.partition("-")
        keep = range(int(lo), int(hi or lo) + 1)
        todo, side = [c for c in todo if c[0] in keep], None
    else:                      # stage 1 on every core, then qdp.py (9) on one thread beside 2-8 on the other
        side = todo.pop()
    log = lambda k, stage: work / f"log_{k}_{stage.split()[0]}.txt"
    beside = None
    try:
        for k, (stage, script, cmd) in todo:
            if (script == "qdp.py" or side and k == 2) and (work / "w4a8.safetensors").is_file():
                shutil.copy(work / "w4a8.safetensors", work / "qdp" / "quantized_w4a8.safetensors")  # as a rerun
            if side and k == 2:
                beside = start(side[1][1], side[1][2], log(side[0], side[1][0]), threads=1)
            threads = None if not side else 1 if k > 1 else os.cpu_count()   # (sample.pick_threads would go by
            seconds, peak = finish(start(script, cmd, log(k, stage), threads))   # a load average that lags behind)
            rows.append(f"| {k}. {stage} | {seconds:.0f} | {peak:,.0f} |")
            print(rows[-1], flush=True)
    except SystemExit:
        if beside:
            beside[0].kill()
        raise
    if beside:
        seconds, peak = finish(beside)
        rows.append(f"| {side[0]}. {side[1][0]} (beside 2-8) | {seconds:.0f} | {peak:,.0f} |")
        print(rows[-1], flush=True)
    rows.append(f"| the whole run | {time.time() - t0:.0f} | - |")
    table = "| stage | seconds | peak resident memory (MiB) |\n|---|---|---|\n" + "\n".join(rows)
    (work / f"table{'_' + args.stages if args.stages else ''}.md").write_text(table + "\n")
    print("\n" + table)
    print(json.dumps({"size": args.size, "threads": torch.get_num_threads(), "cpu": os.cpu_count()}))


if __name__ == "__main__":
    main()
