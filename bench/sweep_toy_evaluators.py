"""The toy evaluators at a reduced scale (12,000 scenes, one thread), behind the README's evaluator numbers: the
evaluation CLIP's zero-shot accuracy on 128 held-out real renders and subject retrieval by both evaluators.

    python bench/sweep_toy_evaluators.py NAME CLIP_STEPS DINO_STEPS [TWINS 0/1 [CLASS_CONTRAST]]
    python bench/sweep_toy_evaluators.py E1 600 300 1 1.0            # README: DINO 71% of 30 subjects, 88% of 10
    python bench/sweep_toy_evaluators.py shipped 0 0                 # the shipped evaluators (README: 87.8% of 10)
A step count of 0 keeps the shipped model for that evaluator; stage checkpoints go to runs/NAME/.
"""
import sys, time, json
import torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as metrics, ckpt
from toyworld import toy, world
torch.set_num_threads(1)
name, cs, ds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
twins = bool(int(sys.argv[4])) if len(sys.argv) > 4 else True
cc = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
plan = toy.Plan(n_images=12000, eval_clip_steps=cs, dino_steps=ds, dino_twins=twins, class_contrast=cc)
out = ROOT / "runs" / name
data = toy.Data(plan.n_images, plan.seed)
t0 = time.time()
clip = (toy.train_clip(data, plan, out, name="eval_clip", seed_offset=4, vision_width=96, vision_layers=4)
        if cs else None)
t1 = time.time()
dino = toy.train_dino(data, plan, out) if ds else None
t2 = time.time()
shipped_clip, shipped_dino = metrics.read_toy_evaluators()
half = (toy.SIZE, (0.5,) * 3, (0.5,) * 3)
ev = metrics.Evaluators(clip or shipped_clip, dino or shipped_dino, ckpt.load_tokenizer(), half, half)
scenes, _ = toy.heldout_scenes(128, 0)
real = [world.render(s, seed=10_000 + i)[0] for i, s in enumerate(scenes)]
refs, labels = toy.subject_references()
chain = toy.ceiling_chain(ev, scenes, real, real, real, refs, labels, refs, {})
r = chain["real renders"]
print(name, f"clip {t1-t0:.0f}s dino {t2-t1:.0f}s", json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)
first10 = [i for i, l in enumerate(labels) if l in list(world.SUBJECTS)[:10]]
for k, f in (("dino", metrics.dino_embeds), ("clip_i", metrics.clip_image_embeds)):
    e = f(ev, [refs[i] for i in first10]); l10 = [labels[i] for i in first10]
    print(name, k, "10 subjects", toy.retrieval(e, e, l10, l10, list(range(len(l10)))))
