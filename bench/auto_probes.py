"""Two ways to choose S1's interval per subject, side by side on one toy subject (studies.py's kept W4A8 base):

- **influence** (train.auto_interval, `--t_range auto` today): no training; per fifth of 0..999, how far the
  instance prompt moves the untrained model's noise prediction from the empty prompt's, relative to its error;
- **probes** (the rule `--t_range auto` used until session 18, kept here as the record of why it was replaced):
  starting each time from the untrained scales, train `probe_steps` steps on one fifth alone, then measure on a fixed
  held-out set over all of t how much the instance loss fell (gain) and the class loss rose (cost); the best fifth
  by gain - cost, grown through neighbours scoring at least half as much, all of t when none scores above zero.

Printed per fifth: the influence score, then for each probe length the probes' gain, cost and score and the
instance-loss change inside the fifth's own two tenths of t and outside them; last, the interval each rule picks.
Study 4 of the README (each fifth trained alone for a whole run, then scored) is what either rule should predict.

    OMP_NUM_THREADS=1 python bench/auto_probes.py --subject dog_bolt --probe_steps 40,160   # ~10 min on one core
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402
import studies  # noqa: E402
import train  # noqa: E402


@torch.no_grad()
def bin_losses(model, sets, batch_size=32):
    """{inst, class} -> the model's mean noise-prediction MSE in each t bin of the held-out sets."""
    out = {}
    for kind, s in sets.items():
        mse = []
        for i in range(0, len(s["t"]), batch_size):
            x, t = s["x_t"][i:i + batch_size], s["t"][i:i + batch_size]
            eps = model(x, t, s["ctx"].expand(len(x), -1, -1))
            mse.append(((eps.float() - s["noise"][i:i + batch_size].float()) ** 2).mean(dim=(1, 2, 3)).cpu())
        mse = torch.cat(mse)
        out[kind] = torch.stack([mse[s["bin"].cpu() == k].mean() for k in range(s["bins"])])
    return out


def grow_interval(scores):
    """The probes' rule: the best part of 0..999, grown through each neighbour scoring at least half as much; all
    of t when no part scores above zero."""
    n, best = len(scores), max(range(len(scores)), key=lambda k: scores[k])
    if scores[best] <= 0:
        return [0, sample.NUM_TRAIN_TIMESTEPS - 1]
    keep = lambda k: 0 <= k < n and scores[k] >= 0.5 * scores[best]
    lo = hi = best
    while keep(lo - 1):
        lo -= 1
    while keep(hi + 1):
        hi += 1
    width = sample.NUM_TRAIN_TIMESTEPS // n
    return [lo * width, (hi + 1) * width - 1]


def probe_rows(model, params, data, args, probe_steps):
    """The probes: per fifth (gain, cost, own-tenths instance change, other-tenths instance change); the untrained
    scales are put back after each."""
    g = torch.Generator().manual_seed(args.seed + 1)
    sets = {k: dict(train.noised_set(data[f"{k}_mean"], data[f"{k}_std"], data["alphas_cumprod"], g),
                    ctx=data[f"{k}_ctx"]) for k in ("inst", "class")}
    before = bin_losses(model, sets)
    start = {n: p.detach().clone() for n, p in params.items()}
    width, rows = sample.NUM_TRAIN_TIMESTEPS // train.AUTO_PARTS, []
    for k in range(train.AUTO_PARTS):
        t_range = (k * width, (k + 1) * width - 1)
        optimizer = torch.optim.AdamW(params.values(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
        for _ in range(probe_steps):
            train.optimizer_step(model, params, optimizer,
                                 train.make_batch(data, g, args.train_batch_size, t_range, args.prior_loss_weight),
                                 args.max_grad_norm)
        after = bin_losses(model, sets)
        change = (after["inst"] - before["inst"]) / before["inst"]
        own = torch.zeros_like(change, dtype=torch.bool)
        own[2 * k:2 * k + 2] = True                      # ten tenths of t, two per fifth
        cost = ((after["class"] - before["class"]) / before["class"]).mean().item()
        rows.append((-change.mean().item(), cost, change[own].mean().item(), change[~own].mean().item()))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
                p.grad = None
    return rows


class Measured(Exception):
    """Raised once both rules are measured: the training run itself is not needed."""


def measure(subject, cls, probe_steps, args):
    """Both rules on the untrained scales of one train.py run, stopped before its first training step."""
    run_args = train.parse_args(ckpt=studies.base_path("w4a8", args.out, args.results),
                                instance_data_dir=studies.DATASET / subject, instance_prompt=f"a photo of sks {cls}",
                                output_dir=Path(args.out) / "auto_probes" / subject, max_train_steps=400, seed=0,
                                with_prior_preservation=True, class_prompt=f"a photo of a {cls}",
                                class_data_dir=studies.class_dir(args.out, "w4a8", cls), num_class_images=20,
                                t_range="auto")
    seen, trainable, auto = {}, train.trainable, train.auto_interval

    def keep_params(*a, **k):
        model, seen["params"] = trainable(*a, **k)
        return model, seen["params"]

    def both(model, data, seed=0):            # run() has filled in run_args' defaults (learning rate) by now
        chosen, rows = auto(model, data, seed)
        probes = {n: probe_rows(model, seen["params"], data, run_args, n) for n in probe_steps}
        raise Measured(chosen, rows, probes)
    train.trainable, train.auto_interval = keep_params, both
    try:
        train.personalize(run_args)
        raise RuntimeError("the rules were not measured")
    except Measured as done:
        return done.args
    finally:
        train.trainable, train.auto_interval = trainable, auto


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subject", default="dog_bolt")
    p.add_argument("--probe_steps", default="40,160", help="comma-separated probe lengths (the old rule used 40 for "
                                                           "a 400-step run)")
    p.add_argument("--out", default="runs/studies", help="studies.py's cache (base, class images)")
    p.add_argument("--results", default=str(ROOT / "docs" / "results"), help="where the kept base lives")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    classes = studies.metrics.dataset_subjects(studies.DATASET)[1]
    if args.subject not in classes:
        raise SystemExit(f"error: no toy subject {args.subject!r}; choose one of {', '.join(classes)}")
    cls, steps = classes[args.subject], [int(s) for s in args.probe_steps.split(",")]
    chosen, influence, probes = measure(args.subject, cls, steps, args)
    print(f"{args.subject} ({cls}), kept W4A8 base; probes' instance change: relative, held-out, per tenth of t\n")
    print("| fifth | influence | " + " | ".join(f"{n} steps: gain | cost | score | own tenths | other tenths"
                                               for n in steps) + " |")
    print("|---|---|" + "---|" * (5 * len(steps)))
    for k, row in enumerate(influence):
        cells = [f"{row['t_range'][0]}-{row['t_range'][1]}", f"{row['score']:.3f}"]
        for n in steps:
            gain, cost, own, other = probes[n][k]
            cells += [f"{x:+.3f}" for x in (gain, cost, gain - cost, own, other)]
        print("| " + " | ".join(cells) + " |")
    picks = [f"influence (train.auto_interval) {chosen[0]}-{chosen[1]}"]
    for n in steps:
        lo, hi = grow_interval([gain - cost for gain, cost, _, _ in probes[n]])
        picks.append(f"probes of {n} steps {lo}-{hi}")
    print("\nthe interval each rule picks: " + "; ".join(picks))


if __name__ == "__main__":
    main()
