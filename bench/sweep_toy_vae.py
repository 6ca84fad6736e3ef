"""The toy VAE's recipe sweep behind the README's VAE table: held-out PSNR and error every 250 steps, one thread.

    python bench/sweep_toy_vae.py NAME CH N_RES_BLOCKS CROP STEPS BATCH [EDGE_WEIGHT [KL_WEIGHT [SAMPLE_Z]]]
    python bench/sweep_toy_vae.py A 16 1 32 4000 32                  # the plan's recipe (README: 25.5 dB at 4000)
    LR=5e-3 python bench/sweep_toy_vae.py D 16 1 32 2000 32          # another learning rate; COLORAUG=1 permutes and
                                                                     # inverts color channels
Prints PSNR/error on 64 fresh training-split renders and on the 30 subjects' first references; saves runs/NAME.pt.
"""
import sys, os, time, math, random, json
import numpy as np, torch, torch.nn.functional as F
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vae as vae_lib
from toyworld import toy, world
torch.set_num_threads(1)
name, ch, nrb, crop, steps, batch = sys.argv[1], *map(int, sys.argv[2:7])
edge = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
klw = float(sys.argv[8]) if len(sys.argv) > 8 else 1e-4
samp = int(sys.argv[9]) if len(sys.argv) > 9 else 1
import os
lr = float(os.environ.get("LR", "2e-3"))
data = toy.Data(4000, 0)
rng = random.Random(123)
subj = [world.render_subject(n, *world.references(n)[0])[0] for n in world.SUBJECTS]
subj = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in subj]).float() / 127.5 - 1
coloraug = int(os.environ.get("COLORAUG", "0"))
test = torch.stack([torch.from_numpy(np.array(world.render(world.sample_scene(rng, "train"), seed=555 + i)[0]))
                    .permute(2, 0, 1)
                    for i in range(64)]).float() / 127.5 - 1
torch.manual_seed(0)
model = vae_lib.AutoencoderKL(vae_lib.VAEConfig(ch=ch, ch_mult=(1, 2, 4), num_res_blocks=nrb, norm_groups=8))
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
def grad(x):
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]
def evaluate(test=test):
    model.eval()
    with torch.no_grad():
        rec = model.decode(model.encode(test)[0]).clamp(-1, 1)
    model.train()
    a, b = (test + 1) / 2, (rec + 1) / 2
    mse = (a - b).pow(2).mean().item()
    return 10 * math.log10(1 / mse), 255 * (a - b).abs().mean().item()
t0 = time.time()
for step in range(steps):
    for gr in opt.param_groups:
        gr["lr"] = lr * min(1.0, (step + 1) / 100) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
    _, x, _ = data.batch(step, batch, 1)
    if coloraug:
        g = torch.Generator().manual_seed(step)
        perm = torch.stack([torch.randperm(3, generator=g) for _ in range(len(x))])
        x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], -x, x)
    if crop < 64:
        y0, x0 = (step * 7) % (65 - crop), (step * 13) % (65 - crop)
        x = x[:, :, y0:y0 + crop, x0:x0 + crop]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, logvar = model.encode(x)
        mean, logvar = mean.float(), logvar.float()
        z = mean + samp * torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = model.decode(z).float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + klw * kl
    if edge:
        loss = loss + edge * sum((a - b).abs().mean() for a, b in zip(grad(rec), grad(x)))
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if (step + 1) % 250 == 0 or step + 1 == steps:
        p, m = evaluate()
        ps, ms = evaluate(subj)
        print(f"{name} step {step+1} loss {loss.item():.4f} psnr {p:.2f} mae {m:.2f} subj {ps:.2f} {ms:.2f} "
              f"{time.time()-t0:.0f}s", flush=True)
(ROOT / "runs").mkdir(exist_ok=True)
torch.save(model.state_dict(), ROOT / "runs" / f"{name}.pt")
