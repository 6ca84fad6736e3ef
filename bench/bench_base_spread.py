"""How much one quantization run is a sample: the toy model quantized W4A8 (quant.py's fast preset, as train.py's
default base) several times, each in its own process, and each untrained base scored on one subject with
studies.py's protocol (all 25 templates x 2 images, 25 DDIM steps, seed 0). Rows: twice on one thread (the same
tensors?), on two threads (another float order in the same arithmetic), and with calibration seed 1 (another
sample, for scale). "stored" rows are the scores docs/results/ holds for the same subject and protocol, made on
another day and machine: the FP one says whether scoring itself repeats there, the W4A8 one how far that day's
base (not kept) lies from today's. digest: ckpt.model_sha256 (the stored rows: the digest they recorded).

    OMP_NUM_THREADS=1 python bench/bench_base_spread.py        # about 20 minutes on one core beside another job
    python bench/bench_base_spread.py --subject cat_heart --out runs/bench_bases
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ckpt  # noqa: E402
import studies  # noqa: E402

SETTINGS = dict(n_prompts=25, n_images=2, num_inference_steps=25, seed=0, batch_images=50)
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "runs"      # studies.py's stored scores
ROWS = [("1 thread", 1, 0), ("1 thread, again", 1, 0), ("2 threads", 2, 0), ("1 thread, seed 1", 1, 1)]


def quantize_in_a_process(out, threads, seed):
    """quant.py's fast W4A8 preset on `threads` threads, in a fresh process (a thread count is fixed at start)."""
    code = (f"import torch, quant; torch.set_num_threads({threads}); "
            f"quant.quantize(wbits=4, abits=8, preset='fast', seed={seed}, out={str(out)!r}, overwrite=True)")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).resolve().parents[1],
                   stdout=subprocess.DEVNULL)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--subject", default="backpack_bolt", help="a toy subject (studies.py's names)")
    p.add_argument("--out", default="runs/bench_bases", help="where the bases are written")
    args = p.parse_args()
    torch.set_num_threads(1)
    cls = args.subject.split("_")[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bases = []
    for k, (name, threads, seed) in enumerate(ROWS):
        path = out / f"w4a8_{k}.safetensors"
        quantize_in_a_process(path, threads, seed)
        bases.append((f"W4A8, {name}", str(path)))
    rows = [("FP", str(ckpt.TOY_CKPT)), ("FP, stored", "fp-full"), ("W4A8, stored", "w4a8-peqa"), *bases]
    first = {}
    print(f"untrained scores on {args.subject} ({SETTINGS['n_prompts']} templates x {SETTINGS['n_images']} images, "
          f"{SETTINGS['num_inference_steps']} DDIM steps); differences from the first row of the same kind\n")
    print("| base | digest | CLIP-I | local CLIP-I | CLIP-T | DINO |")
    print("|---|---|---|---|---|---|")
    results = {}
    for name, path in rows:
        if name.endswith("stored"):
            kept = RESULTS / path / args.subject / "scores_0.json"
            if not kept.is_file():
                continue
            s = json.loads(kept.read_text())
            digest = s["base_sha256"][:12]
        else:
            s, digest = studies.score(path, None, args.subject, cls, SETTINGS), ckpt.model_sha256(path)[:12]
        ref = first.setdefault(name.split(",")[0], s)
        cell = lambda m: f"{s[m]:.4f}" + (f" ({s[m] - ref[m]:+.4f})" if s is not ref else "")
        print(f"| {name} | {digest} | {cell('clip_i')} | {cell('local_clip_i')} | {cell('clip_t')} | {cell('dino')} |",
              flush=True)
        results[name] = {"digest": digest, **{m: s[m] for m in ("clip_i", "local_clip_i", "clip_t", "dino")}}
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
