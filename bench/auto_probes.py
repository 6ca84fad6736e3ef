"""What `--t_range auto`'s probes see (train.auto_interval, the interval S1 picks per subject): for one toy subject on
studies.py's kept W4A8 base, each fifth of 0..999 trained alone for `probe_steps` steps from the untrained model,
then the relative change of the held-out instance and class losses, per tenth of t. Printed per fifth: gain and
cost as auto_interval scores them (means over the ten bins), the instance change inside the fifth's own two bins
and outside them, and the interval grow_interval picks. Run at several probe lengths to see whether a short probe
measures the subject being learned or only the first steps' disruption.

    OMP_NUM_THREADS=1 python bench/auto_probes.py --subject dog_bolt --probe_steps 40,160   # ~10 min on one core
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import studies  # noqa: E402
import train  # noqa: E402


class Probed(Exception):
    """Raised once the probes are measured: the training run itself is not needed."""


def probe(subject, cls, steps, args):
    """[(t_range, gain, cost, own-bins instance change, other-bins instance change)], and grow_interval's pick."""
    losses, original, auto = [], train.bin_losses, train.auto_interval

    def recording(model, sets, batch_size=32):
        losses.append(original(model, sets, batch_size))
        return losses[-1]

    def probes_only(model, params, data, run_args, probe_steps=None):
        rows = auto(model, params, data, run_args, probe_steps=steps)[1]
        raise Probed(rows)
    train.bin_losses, train.auto_interval = recording, probes_only
    try:
        train.personalize(ckpt=studies.base_path("w4a8", args.out, args.results),
                          instance_data_dir=studies.DATASET / subject, instance_prompt=f"a photo of sks {cls}",
                          output_dir=Path(args.out) / "auto_probes" / subject, max_train_steps=400, seed=0,
                          with_prior_preservation=True, class_prompt=f"a photo of a {cls}",
                          class_data_dir=studies.class_dir(args.out, "w4a8", cls), num_class_images=20, t_range="auto")
        raise RuntimeError("the probes did not run")
    except Probed as done:
        rows = done.args[0]
    finally:
        train.bin_losses, train.auto_interval = original, auto
    before, out = losses[0]["inst"], []
    for k, (row, after) in enumerate(zip(rows, losses[1:])):
        change = (after["inst"] - before) / before
        own = torch.zeros_like(change, dtype=torch.bool)
        own[2 * k:2 * k + 2] = True                      # ten bins of t, two per fifth
        out.append((row["t_range"], row["gain"], row["cost"], change[own].mean().item(), change[~own].mean().item()))
    return out, train.grow_interval([r["score"] for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subject", default="dog_bolt")
    p.add_argument("--probe_steps", default="40,160", help="comma-separated probe lengths (auto uses 40 for a "
                                                           "400-step run)")
    p.add_argument("--out", default="runs/studies", help="studies.py's cache (base, class images)")
    p.add_argument("--results", default=str(ROOT / "docs" / "results"), help="where the kept base lives")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    classes = studies.metrics.dataset_subjects(studies.DATASET)[1]
    if args.subject not in classes:
        raise SystemExit(f"error: no toy subject {args.subject!r}; choose one of {', '.join(classes)}")
    cls = classes[args.subject]
    print(f"{args.subject} ({cls}), kept W4A8 base; instance loss change: relative, held-out, per tenth of t\n")
    print("| probe steps | fifth | gain | cost | score | instance change, own bins | instance change, other bins |")
    print("|---|---|---|---|---|---|---|")
    picks = []
    for steps in [int(s) for s in args.probe_steps.split(",")]:
        rows, pick = probe(args.subject, cls, steps, args)
        for (lo, hi), gain, cost, own, other in rows:
            cells = [f"{lo}-{hi}", *(f"{x:+.3f}" for x in (gain, cost, gain - cost, own, other))]
            print(f"| {steps} | " + " | ".join(cells) + " |")
        picks.append(f"{steps} steps: {pick[0]}-{pick[1]}")
    print("\nauto's interval: " + "; ".join(picks))


if __name__ == "__main__":
    main()
