"""The studies of Ryu et al. (arXiv 2401.04339, TuneQDM) rerun in the toy world: each is one command that trains with
train.py, scores with eval.py (CLIP-I, local CLIP-I, CLIP-T, DINO, after DreamBooth, arXiv 2208.12242) and writes
a table, a plot and its section of the README.

1. tradeoff: subject fidelity (CLIP-I, DINO) and prompt fidelity (CLIP-T) against training steps for the PEQA
   baseline (arXiv 2305.14152), with and without DreamBooth's prior preservation.
2. main: full-precision DreamBooth, the baseline, S1 (selective), S2 (4 experts) and S1+S2 on the toy model
   quantized W4A8 and W8A8 (quant.py's fast preset): the four metrics, trainable numbers, file size, peak memory
   and time of a training run.
3. experts: S2 with 1, 2, 4 and 8 experts.
4. intervals: the proof of concept behind S1: the baseline trained at the t of one fifth of 0..999 at a time, next
   to all of t, S1's content interval and the interval train.py's --t_range auto chooses per subject.
5. grid: references, then what the untrained model and each method draw, for three subjects (after main).
6. verdicts: one row per claim of the paper (the README's list), each a paired difference over subjects with its 95%
   interval and one word (reproduced, not reproduced, inconclusive), computed from what 1, 2 and 4 stored.
Every run covers all toy subjects; means come with 95% bootstrap intervals over subjects. The prompts are all 25 of a
subject's DreamBooth templates (`--n_prompts 9`: every third, the shorter protocol of the first studies), two images
each, 25 DDIM steps, guidance 7.5. This file only schedules runs and draws their tables and plots, which
belong neither in the training nor in the metric code; that is why it stands apart.

    python studies.py main --subjects backpack_bolt,cat_heart,clock_moon   # 74 min on one core (measured)
    python studies.py main                 # all 30: ~30 CPU minutes per subject (measured on 11), ~7.5 h on 2 cores
    python studies.py tradeoff             # ~10 CPU minutes per subject (estimated from main's run times)
    python studies.py experts              # ~6 per subject after main (shared runs are reused)
    python studies.py intervals            # ~15 per subject after main (its baseline and S1 runs are reused)
Runs are cached in runs/studies/ (rerun to resume; delete a folder to redo it); their scores, one small JSON file
per scored step, and each study's results.json are kept apart in docs/results/, which git tracks, so that a fresh
clone rebuilds every table and verdict without training (a scored step found there is not run again); the quantized
bases they were scored on are kept there too, small (base_path), so that a later run adds subjects on the same model.
`--workers 2` (the default) runs two single-threaded jobs side by side: for models this small that is twice the
throughput of one job on two threads.
Under torchrun the jobs are shared among its processes (each with its own --workers), on one machine or several with
a shared --out and --results; the first process writes the tables:
    torchrun --nproc_per_node 4 studies.py main --workers 1     # four processes, one job each at a time
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

import ckpt
import eval as metrics
import sample
import train

ROOT = Path(__file__).resolve().parent
DATASET = ROOT / "assets" / "toy" / "dreambooth"
README = ROOT / "README.md"
BASES = {"fp": None, "w4a8": dict(wbits=4, abits=8), "w8a8": dict(wbits=8, abits=8)}
# method -> train.py settings (keywords of train.personalize); S1's interval is train.content_interval(), S2's
# experts split t uniformly
METHODS = {"full": dict(method="full"), "peqa": {}, "s1": dict(t_range="content"), "s1auto": dict(t_range="auto"),
           "s2": dict(n_experts=4), "s1+s2": dict(t_range="content", n_experts=4),
           **{f"s2x{k}": dict(n_experts=k) for k in (1, 2, 8)},
           **{f"t{lo}-{lo + 199}": dict(t_range=f"{lo},{lo + 199}") for lo in range(0, 1000, 200)}}
METRICS = ("clip_i", "local_clip_i", "clip_t", "dino")


# --------------------------------------------------------------------------------------------------------------------
# jobs: one subject, one base model, one method; each runs in a worker process and caches its scores on disk


def base_path(base, out, results):
    """The base model file: the toy FP checkpoint, or the toy model quantized by quant.py's fast preset into --out.
    A quantized base is made once and kept in --results/bases/ beside the scores made on it (its UNet only: the rest
    is the shipped toy model's), because quantizing again on another machine or thread count makes another model
    (AdaRound's rounding choices flip on float-order noise): a fresh clone restores the kept base and goes on adding
    subjects and studies on the same model. A kept base of an older toy model is replaced."""
    if base == "fp":
        return ckpt.TOY_CKPT
    path, kept = Path(out) / f"toy_{base}.safetensors", Path(results) / "bases" / f"toy_{base}.safetensors"
    if ckpt.quantized_from(kept) == ckpt.sha256(ckpt.TOY_CKPT):
        if not path.is_file() or ckpt.model_sha256(path) != ckpt.model_sha256(kept):
            print(f"restoring the kept {base} base {kept} into {path}")
            restore_base(kept, path)
        return path
    train.default_quantized(path, **BASES[base])            # made again if the toy model changed
    keep_base(path, kept)
    return path


def keep_base(path, kept):
    """Store a quantized toy base small: its UNet tensors ("model.*", 2 MB at W4A8), its metadata and the sha256
    of all its tensors, which restore_base rebuilds exactly from them and the toy checkpoint."""
    tensors, meta = ckpt.read_tensors(path)
    unet, rest = ({k: v for k, v in tensors.items() if k.startswith("model.") == is_unet} for is_unet in (True, False))
    toy = load_file(ckpt.TOY_CKPT)
    if rest.keys() != {k for k in toy if not k.startswith("model.")} or \
            any(not torch.equal(v, toy[k].to(v.dtype)) for k, v in rest.items()):
        raise SystemExit(f"error: {path}'s VAE and text encoder are not the shipped toy model's; delete it and "
                         f"run again to quantize the toy model anew")
    dtypes = {str(v.dtype).removeprefix("torch.") for v in rest.values()}
    if len(dtypes) != 1:
        raise SystemExit(f"error: {path} holds its VAE and text encoder in {sorted(dtypes)}, not in one dtype; delete "
                         f"it and run again to quantize the toy model anew")
    ckpt.atomic_save(unet, kept, {**meta, "qdp.kept.tensors_sha256": ckpt.unet_digest(tensors),
                                  "qdp.kept.rest_dtype": dtypes.pop()})


def restore_base(kept, path):
    """The quantized base file that keep_base stored, rebuilt: the kept UNet tensors and metadata, the VAE and text
    encoder from the toy checkpoint in the dtype the base held them in; checked against the kept tensors' sha256."""
    unet, meta = ckpt.read_tensors(kept)
    want, dtype = meta.pop("qdp.kept.tensors_sha256"), meta.pop("qdp.kept.rest_dtype")
    rest = {k: v.to(getattr(torch, dtype)) for k, v in load_file(ckpt.TOY_CKPT).items() if not k.startswith("model.")}
    tensors = {**rest, **unet}
    if ckpt.unet_digest(tensors) != want:
        raise SystemExit(f"error: {kept} does not rebuild the base it kept (its tensors' sha256 differs); delete it to "
                         f"quantize the toy model anew (its stored scores then cannot be extended)")
    ckpt.atomic_save(tensors, path, meta)


def class_dir(out, base, cls):
    return Path(out) / "class" / base / cls


def make_class_images(spec):
    """The prior's class images of one class, drawn by one base model (DreamBooth draws them with the model it tunes)."""
    torch.set_num_threads(1)
    sd = ckpt.load_sd(spec["base_file"])
    with quiet(Path(spec["dir"]) / "log.txt"):
        train.generate_class_images(sd, f"a photo of a {spec['cls']}", spec["dir"], spec["n"], seed=0)
    return spec["cls"]


@contextlib.contextmanager
def quiet(log):
    """A worker's progress bars and prints go to its log file, not into the parent's terminal."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


_EV = None


def score(base, scales, subject, cls, settings):
    """eval.py's protocol scores of one subject (eval.score_model): its first `n_prompts` templates in
    prompt_order, `n_images` each."""
    global _EV
    _EV = _EV or metrics.load_evaluators()
    root, _, objects, live = metrics.dataset_subjects(DATASET)
    templates = prompt_order(metrics.templates_for(cls, objects, live))[:settings["n_prompts"]]
    scores, _, _ = metrics.score_model(base, scales, _EV, metrics.read_images(root / subject), cls, templates, "sks",
                                       settings["n_images"], settings["seed"],
                                       num_inference_steps=settings["num_inference_steps"], guidance_scale=7.5,
                                       batch_images=settings["batch_images"])
    return scores


def prompt_order(templates):
    """Every third template first (backgrounds, property changes and, for dogs and cats, accessories: the nine of the
    shorter protocol), then the rest, so that the first N are a spread of the 25 for any N."""
    return templates[::3] + [t for i, t in enumerate(templates) if i % 3]


def run_job(spec):
    """Train `spec["subject"]` with `spec["flags"]` up to each of `spec["steps"]` in turn (a resumed run equals an
    uninterrupted one, train.py's guarantee) and score the model after each; step 0 scores the untrained base.
    Returns {step: scores, train_seconds and seconds (training and scoring)}; every finished step is cached in the
    run folder."""
    torch.set_num_threads(1)
    run, results = Path(spec["dir"]), {}
    with quiet(run / "log.txt"):
        for n in spec["steps"]:
            cached = Path(spec["scores_dir"]) / f"scores_{n}.json"
            kept = stored_step(spec, n)
            if kept:
                results[n] = kept
                continue
            t0, scales = time.time(), None
            state = run / train.STATE_FILE
            if n > 0 and state.is_file() and int(safe_open(str(state), "pt").metadata()["step"]) > n:
                raise RuntimeError(f"{run} has trained past step {n} without scoring it; delete the folder")
            if n > 0:
                prior = dict(with_prior_preservation=True, class_prompt=f"a photo of a {spec['cls']}",
                             class_data_dir=spec["class_dir"], num_class_images=spec["settings"]["num_class_images"])
                try:
                    scales, _ = train.personalize(ckpt=spec["base_file"], instance_data_dir=DATASET / spec["subject"],
                                                  instance_prompt=f"a photo of sks {spec['cls']}", output_dir=run,
                                                  max_train_steps=n, seed=spec["settings"]["seed"],
                                                  resume=state.is_file(), **(prior if spec["prior"] else {}),
                                                  **spec["flags"])
                except train.TrainingError as e:          # e.g. the cached run was made with another --seed
                    raise RuntimeError(f"{e} [studies.py: delete {run} to redo this run]") from None
            train_seconds = time.time() - t0
            r = {**score(spec["base_file"], scales, spec["subject"], spec["cls"], spec["settings"]),
                 "train_seconds": train_seconds, "seconds": time.time() - t0, "settings": spec["settings"],
                 "base_sha256": spec["base_sha256"]}
            if scales is not None:
                r["trainable"] = sum(v.numel() for v in load_file(scales).values())
                r["file_mib"] = scales.stat().st_size / 2**20
            if n > 0 and (run / "auto_interval.json").is_file():         # --t_range auto's scores, for intervals
                r["auto_interval"] = json.loads((run / "auto_interval.json").read_text())
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(r, indent=2))
            results[n] = r
    return spec["subject"], spec["name"], results


def stored_step(spec, n):
    """The scores of step n of a job as --results holds them, or None where they are missing or were made with other
    settings (another protocol or toy model)."""
    cached = Path(spec["scores_dir"]) / f"scores_{n}.json"
    kept = json.loads(cached.read_text()) if cached.is_file() else {}
    return kept if kept.get("settings") == spec["settings"] else None


def in_workers(fn, items, workers, show=None):
    """fn over items in a pool of single-threaded workers (spawned: a clean torch in each), results in order;
    `show(result)` names each finished item on the terminal."""
    if workers <= 1:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        done = []
        for k, f in enumerate([pool.submit(fn, x) for x in items]):
            done.append(f.result())
            if show:
                print(f"  {k + 1}/{len(items)} {show(done[-1])}", flush=True)
        return done


def shard():
    """(rank, world size) of this process: under torchrun, which starts one studies.py per process on one machine or
    several (gloo, so CPUs do), the jobs are shared out; (0, 1) otherwise."""
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def run_jobs(jobs, workers):
    """Every job's results, in job order. Under torchrun each process runs every world-th job from its rank, in
    `workers` processes of its own, and all processes get all results."""
    rank, world = shard()
    mine = in_workers(run_job, jobs[rank::world], workers, show=lambda r: f"{r[1]} {r[0]}")
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return [parts[i % world][i // world] for i in range(len(jobs))]


def prepare_bases(jobs, args):
    """Base files and class images for the jobs that still have a step to score, made before any job starts (no two
    jobs race); under torchrun by the first process while the others wait. Nothing is made where --results already
    holds every step (a fresh clone rebuilds the tables without quantizing or drawing anything)."""
    kept = [[stored_step(j, n) for n in j["steps"]] for j in jobs]          # each stored step read once
    todo = [j for j, steps in zip(jobs, kept) if None in steps]
    bases = sorted({j["base"] for j in todo})
    rank, world = shard()
    if rank > 0:
        dist.barrier()                                      # the first process makes them; then they are found
    files = {b: str(base_path(b, args.out, args.results)) for b in bases}
    hashes = {b: ckpt.model_sha256(f) for b, f in files.items()}
    # A subject's runs on one base kind all use one base, so that its methods meet on one model. A base quantized
    # anew on another machine or thread count is another model (AdaRound's rounding choices flip on float-order
    # noise), so a subject's stored steps from another base are not mixed with new ones.
    scored_on = {}                                          # (subject, base kind) -> [(scores_dir, bases named)]
    for j, steps in zip(jobs, kept):
        scored_on.setdefault((j["subject"], j["base"]), []).append(
            (j["scores_dir"], {r.get("base_sha256") for r in steps if r} - {None}))
    for subject, base in sorted({(j["subject"], j["base"]) for j in todo}):
        mixed = [folder for folder, named in scored_on[subject, base] if named - {hashes[base]}]
        if mixed:
            raise SystemExit(
                f"error: {subject}'s stored {base} steps in {', '.join(mixed)} were scored on another {base} base than "
                f"{files[base]}; delete those folders (and their run folders under --out) to redo {subject}'s {base} "
                f"runs on this base")
    if rank == 0:
        specs = [dict(base_file=files[b], cls=c, n=args.num_class_images, dir=str(class_dir(args.out, b, c)))
                 for b in bases for c in sorted({j["cls"] for j in todo if j["base"] == b})]
        in_workers(make_class_images, specs, args.workers)
        if world > 1:
            dist.barrier()
    for j in todo:
        j["base_file"], j["base_sha256"] = files[j["base"]], hashes[j["base"]]
    return jobs


def seeded(args):
    """What a --seed other than 0 adds to run and study folder names: '-seed1' and so on, so that a second training
    seed of the same runs is stored beside the first (the spread between seeds is the training noise), not over it."""
    return f"-seed{args.seed}" if args.seed else ""


def jobs_for(variants, subjects, classes, args, folder="runs"):
    """variants: {name: (base, method, prior, steps)} -> job specs; the run folder is named by what it trains, so
    two studies that need the same run share it (the trade-off's runs, scored on the way, live apart); its scores go
    to the same path under --results."""
    settings = {k: getattr(args, k) for k in ("n_prompts", "n_images", "num_inference_steps", "seed",
                                              "num_class_images", "batch_images")}
    settings["toy_sha256"] = ckpt.sha256(ckpt.TOY_CKPT)     # cached scores of another toy model are not reused
    jobs = []
    for s in subjects:
        for name, (base, method, prior, steps) in variants.items():
            tag = f"{base}-{method}" + ("" if prior else "-noprior") + seeded(args)
            jobs.append(dict(name=name, subject=s, cls=classes[s], base=base, flags=METHODS[method],
                             prior=prior, steps=steps, settings=settings, dir=str(Path(args.out) / folder / tag / s),
                             scores_dir=str(Path(args.results) / folder / tag / s),
                             class_dir=str(class_dir(args.out, base, classes[s]))))
    return prepare_bases(jobs, args)


# --------------------------------------------------------------------------------------------------------------------
# tables, plots and the README


def cell(values, fmt="{:.3f}"):
    mean, lo, hi = metrics.confidence_interval(values)
    return f"{fmt.format(mean)} ({fmt.format(lo)}-{fmt.format(hi)})"


def write_readme(name, block):
    """Replace the README's text between <!-- study:NAME --> and <!-- /study:NAME --> with `block`."""
    text = README.read_text()
    pattern = re.compile(rf"(<!-- study:{name} -->\n).*?(<!-- /study:{name} -->)", re.S)
    if not pattern.search(text):
        print(f"README.md has no <!-- study:{name} --> markers; the section is in the study folder only")
        return
    README.write_text(pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text))
    print(f"updated the {name} section of README.md")


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot, the table only")
        return None


# runs train.py as __main__, then prints the process's own resident high-water mark (VmHWM, which a fresh program
# image starts anew; getrusage's ru_maxrss would instead carry the parent's size over the fork)
_MEASURED = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
             "print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")


def peak_memory(base, flags, subject, cls, args, steps=5):
    """Peak resident memory (MiB) of a short, fresh train.py run in a process of its own: everything it holds, the
    Python and torch runtime included (Linux)."""
    out = Path(tempfile.mkdtemp(prefix="qdp_memory_"))
    cmd = [sys.executable, "-c", _MEASURED, str(ROOT / "train.py"),
           "--ckpt", str(base_path(base, args.out, args.results)),
           "--instance_data_dir", str(DATASET / subject), "--instance_prompt", f"a photo of sks {cls}",
           "--with_prior_preservation", "--class_prompt", f"a photo of a {cls}", "--class_data_dir",
           str(class_dir(args.out, base, cls)), "--num_class_images", str(args.num_class_images),
           "--max_train_steps", str(steps), "--output_dir", str(out), *sample.flags_argv(train.parser(), flags)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("VmHWM ")]
    if run.returncode != 0 or not peak:
        (out / "log.txt").write_text(run.stdout + run.stderr)
        raise RuntimeError(f"the memory run failed ({(run.stderr.strip().splitlines() or ['no output'])[-1]}); see "
                           f"{out / 'log.txt'}, or skip it with --no-memory")
    shutil.rmtree(out)
    return int(peak[0]) / 1024                               # kB -> MiB


def stored_memory(args, name, variants, subject, classes):
    """Each variant's peak memory (MiB) for --memory, measured one after another in processes of their own (the first
    torchrun process alone) where --results does not hold it yet; stored there as memory.json (delete it to measure
    again on another machine)."""
    path = Path(args.results) / name / "memory.json"
    memory = json.loads(path.read_text()) if path.is_file() else {}
    if not args.memory or shard()[0] > 0:
        return memory if args.memory else {}
    for v, (base, method, _, _) in variants.items():
        if v not in memory:
            memory[v] = peak_memory(base, METHODS[method], subject, classes[subject], args)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(memory, indent=2) + "\n")
    return memory


def save_plot(fig, name, args):
    if shard()[0] > 0:                                      # under torchrun the first process writes the results
        return None
    path = Path(args.out) / name / "plot.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    if not args.readme:
        return str(path)
    (ROOT / "docs").mkdir(exist_ok=True)
    fig.savefig(ROOT / "docs" / f"study_{name}.png", dpi=110, bbox_inches="tight")
    return f"docs/study_{name}.png"


def finish(name, table, results, args, t0, plot, jobs):
    """Write results.json and table.md, and the README section: the table, the plot and the command (under torchrun,
    the first process alone)."""
    if shard()[0] > 0:
        return
    folder = Path(args.results) / (name + seeded(args))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    # this run's wall time where it scored everything itself; a table over runs that earlier jobs cached says so
    files = [f for j in jobs for f in Path(j["scores_dir"]).glob("scores_*.json")]
    scored = [f.stat().st_mtime > t0 for f in files]
    wall = (f"{(time.time() - t0) / 60:.0f} min on this 2-core CPU" if all(scored) else
            "over runs cached by earlier jobs" if not any(scored) else
            f"{(time.time() - t0) / 60:.0f} min on this 2-core CPU, over {scored.count(False)} of {len(scored)} "
            f"scored steps cached by earlier jobs")
    command = "python studies.py " + " ".join(sys.argv[1:])
    block = (f"{table}\n\n" + (f"![{name}]({plot})\n\n" if plot else "")
             + f"`{command}`: {len(results)} subjects, {wall}{cpu_time(files)}{bases_used(jobs)}.\n")
    (folder / "table.md").write_text(block)
    print(block)
    if args.readme:
        write_readme(name, block)


def bases_used(jobs):
    """'; W4A8 runs on 2 bases, W8A8 on 1 (...)': how many quantization runs a study's stored quantized scores name
    (a base quantized anew is another model; each subject's runs share one); '' where none is quantized."""
    named = {}
    for j in jobs:
        if j["base"] != "fp":
            named.setdefault(j["base"], set()).update((stored_step(j, n) or {}).get("base_sha256") for n in j["steps"])
    counts = [(b, len(h - {None})) for b, h in sorted(named.items())]
    said = [f"{b.upper()} {'runs ' if not k else ''}on {n} base{'s' if n > 1 else ''}"
            for k, (b, n) in enumerate(counts)]
    return f"; {', '.join(said)} (each subject's runs on one)" if said else ""


def cpu_time(files):
    """What the study's runs cost, summed from their cached scores files (each run trains and scores on one thread),
    so that a table written over runs earlier jobs made still says it: '; its runs took X CPU-minutes ...', or ''
    where none was timed."""
    steps = [json.loads(f.read_text()) for f in files]
    timed = [r["seconds"] for r in steps if "seconds" in r]
    if not timed:
        return ""
    return (f"; its runs took {sum(timed) / 60:.0f} CPU-minutes on one thread each"
            + (f" (the {len(timed)} of {len(steps)} scored steps that recorded their time)" if len(timed) < len(steps)
               else ""))


def per_subject(done):
    """[(subject, variant, {step: scores})] -> {subject: {variant: {step: scores}}}."""
    out = {}
    for subject, name, steps in done:
        out.setdefault(subject, {})[name] = {str(k): v for k, v in steps.items()}
    return out


# --------------------------------------------------------------------------------------------------------------------
# the studies


def delta(after, before):
    """Paired change over subjects: mean, 95% bootstrap interval, and how many subjects went up."""
    d = [a - b for a, b in zip(after, before)]
    mean, lo, hi = metrics.confidence_interval(d)
    return mean, lo, hi, sum(x > 0 for x in d)


def delta_cell(after, before):
    mean, lo, hi, up = delta(after, before)
    return f"{mean:+.3f} ({lo:+.3f} to {hi:+.3f}), {up}/{len(after)} up"


def study_tradeoff(args, subjects, classes):
    """Study 1: the baseline's subject and prompt fidelity against training steps, with and without the prior.
    The untrained row holds the means; the others the paired change from it, subject by subject."""
    t0, steps = time.time(), [int(s) for s in args.steps.split(",")]
    variants = {"prior": ("w4a8", "peqa", True, [0, *steps]), "no prior": ("w4a8", "peqa", False, steps)}
    jobs = jobs_for(variants, subjects, classes, args, "curves")
    results = per_subject(run_jobs(jobs, args.workers))

    def column(variant, step, k):
        src = "prior" if step == 0 else variant                 # step 0 is the untrained base, shared
        return [results[s][src][str(step)][k] for s in subjects]

    keys = ("clip_i", "dino", "clip_t")
    names = metrics.METRIC_NAMES
    rows = ["| steps | " + " | ".join(f"{v}: {names[k]}" for v in variants for k in keys) + " |",
            "|---" * (1 + 2 * len(keys)) + "|",
            "| 0 (untrained, mean) | " + " | ".join(cell(column(v, 0, k)) for v in variants for k in keys) + " |"]
    rows += [f"| {n} (change) | " + " | ".join(delta_cell(column(v, n, k), column(v, 0, k)) for v in variants
                                              for k in keys) + " |" for n in steps]
    plot, plt = None, pyplot()
    if plt:
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
        x = [0, *steps]
        for v, style in zip(variants, ("-o", "--s")):
            for ax, k in zip(axes[:3], keys):
                stats = [delta(column(v, n, k), column(v, 0, k)) for n in x]
                ax.plot(x, [m for m, *_ in stats], style, label=v)
                ax.fill_between(x, [lo for _, lo, _, _ in stats], [hi for _, _, hi, _ in stats], alpha=0.15)
                ax.axhline(0, color="gray", lw=0.5)
                ax.set(xlabel="training steps", title=f"{names[k]}, change from untrained")
            ci = [delta(column(v, n, "clip_i"), column(v, 0, "clip_i"))[0] for n in x]
            ct = [delta(column(v, n, "clip_t"), column(v, 0, "clip_t"))[0] for n in x]
            axes[3].plot(ci, ct, style, label=v)
            for n, a, b in zip(x, ci, ct):
                axes[3].annotate(str(n), (a, b), fontsize=7)
        axes[3].set(xlabel="CLIP-I change (subject)", ylabel="CLIP-T change (prompt)", title="the trade-off, by step")
        axes[0].legend()
        fig.tight_layout()
        plot = save_plot(fig, "tradeoff", args)
    note = ("Rows after the first: the paired change from the untrained model, mean over subjects with a 95% "
            "bootstrap interval, and how many subjects went up.")
    finish("tradeoff", note + "\n\n" + "\n".join(rows), results, args, t0, plot, jobs)


def study_methods(args, subjects, classes, name, variants, label, footer=None):
    """Studies 2-4: one trained model per variant and subject, scored after --train_steps (the toy default). Means
    of the four metrics, then the paired change of CLIP-I, DINO and CLIP-T from the untrained model of the same base."""
    t0 = time.time()
    jobs = jobs_for(variants, subjects, classes, args)
    results = per_subject(run_jobs(jobs, args.workers))
    memory = stored_memory(args, name, variants, subjects[0], classes)
    untrained = {base: [results[s][v]["0"] for s in subjects] for v, (base, _, _, steps) in variants.items()
                 if 0 in steps}
    head = (f"| {label} | CLIP-I | local CLIP-I | CLIP-T | DINO | change CLIP-I | change DINO | change CLIP-T "
            "| trainable | file | peak RSS | train time |")
    rows = [head, "|---" * 12 + "|"]
    points = {}
    for v, (base, _, _, steps) in variants.items():
        for n in steps:
            scores = [results[s][v][str(n)] for s in subjects]
            means = [f"{sum(r[k] for r in scores) / len(scores):.3f}" for k in METRICS]
            if n == 0:
                rows.append(f"| {base.upper()} untrained | " + " | ".join(means) + " | - | - | - | - | - | - | - |")
                continue
            points[v] = [delta([r[k] for r in scores], [r[k] for r in untrained[base]]) for k in ("clip_i", "dino",
                                                                                              "clip_t")]
            changes = [delta_cell([r[k] for r in scores], [r[k] for r in untrained[base]])
                       for k in ("clip_i", "dino", "clip_t")]
            extra = [f"{scores[0]['trainable']:,}", f"{scores[0]['file_mib']:.2f} MiB",
                     f"{memory[v]:.0f} MiB" if v in memory else "-",
                     f"{sum(r['train_seconds'] for r in scores) / len(scores):.0f} s"]
            rows.append(f"| {v} | " + " | ".join(means + changes + extra) + " |")
    plot, plt = None, pyplot()
    if plt:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for v, (ci, dn, ct) in points.items():
            for ax, (m, lo, hi, _), k in zip(axes, (ci, dn), ("CLIP-I", "DINO")):
                ax.errorbar(m, ct[0], xerr=[[m - lo], [hi - m]], yerr=[[ct[0] - ct[1]], [ct[2] - ct[0]]], fmt="o",
                            capsize=3, label=v)
                ax.axhline(0, color="gray", lw=0.5), ax.axvline(0, color="gray", lw=0.5)
                ax.set(xlabel=f"{k} change (subject)", ylabel="CLIP-T change (prompt)")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        plot = save_plot(fig, name, args)
    note = ("Means over subjects; the change columns are paired with the untrained model of the same base (mean, 95% "
            "bootstrap interval, subjects that went up). Peak RSS: the whole train.py process on one thread, a few "
            "steps; train time: one run of the toy default on one thread beside another job.")
    tail = "\n\n" + footer(results) if footer else ""
    finish(name, note + "\n\n" + "\n".join(rows) + tail, results, args, t0, plot, jobs)


def study_main(args, subjects, classes):
    n = args.train_steps
    variants = {"FP DreamBooth (full)": ("fp", "full", True, [0, n])}
    for base in ("w4a8", "w8a8"):
        for k, method in enumerate(("peqa", "s1", "s2", "s1+s2")):
            variants[f"{base.upper()} {method}"] = (base, method, True, [0, n] if k == 0 else [n])
    study_methods(args, subjects, classes, "main", variants, "model / method")


def study_experts(args, subjects, classes):
    variants = {f"{k} expert{'s' if k > 1 else ''}": ("w4a8", {1: "peqa", 4: "s2"}.get(k, f"s2x{k}"), True,
                                                       [0, args.train_steps] if k == 1 else [args.train_steps])
                for k in (1, 2, 4, 8)}
    study_methods(args, subjects, classes, "experts", variants, "S2, W4A8")


def study_intervals(args, subjects, classes):
    """S1's proof of concept: the baseline trained on one fifth of the timesteps at a time, next to all of t, S1's
    content interval and the interval --t_range auto chose per subject; what each adds to subject fidelity and costs
    in prompt fidelity, and whether auto's scores rank the fifths as the full runs do."""
    n = args.train_steps
    variants = {"all t (baseline)": ("w4a8", "peqa", True, [0, n])}
    fifths = {f"t {m[1:]}": ("w4a8", m, True, [n]) for m in METHODS if re.fullmatch(r"t\d+-\d+", m)}
    variants.update(fifths)
    variants["S1 content (354-933)"] = ("w4a8", "s1", True, [n])
    variants["S1 auto (per subject)"] = ("w4a8", "s1auto", True, [n])

    def auto_vs_runs(results):
        chosen, rho = [], {k: [] for k in ("clip_i", "dino", "clip_t")}
        for s in subjects:
            auto = results[s]["S1 auto (per subject)"][str(n)]["auto_interval"]
            chosen.append(f"{s} {auto['t_range'][0]}-{auto['t_range'][1]}")
            untrained = results[s]["all t (baseline)"]["0"]
            for k in rho:
                measured = [results[s][v][str(n)][k] - untrained[k] for v in fifths]
                rho[k].append(spearman([r["score"] for r in auto["parts"]], measured))
        ci = lambda v: "{:+.2f} ({:+.2f} to {:+.2f})".format(*metrics.confidence_interval(v))
        lines = [f"--t_range auto chose: {', '.join(chosen)}.",
                 "Rank correlation (Spearman, mean over subjects, 95% interval) between auto's scores of the five "
                 "fifths and the change a full run on each fifth made: "
                 + ", ".join(f"{metrics.METRIC_NAMES[k]} {ci(v)}" for k, v in rho.items()) + "."]
        for a, b in (("S1 auto (per subject)", "all t (baseline)"), ("S1 auto (per subject)", "S1 content (354-933)"),
                     ("S1 content (354-933)", "all t (baseline)")):
            pair = lambda k: delta_cell([results[s][a][str(n)][k] for s in subjects],
                                        [results[s][b][str(n)][k] for s in subjects])
            lines.append(f"{a} minus {b}: " + "; ".join(f"{metrics.METRIC_NAMES[k]} {pair(k)}" for k in METRICS) + ".")
        return "\n\n".join(lines)
    study_methods(args, subjects, classes, "intervals", variants, "t trained", footer=auto_vs_runs)


def spearman(a, b):
    """Spearman's rank correlation of two equal-length lists (no ties expected)."""
    rank = lambda x: torch.tensor(x).argsort().argsort().float()
    ra, rb = rank(a), rank(b)
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


# --------------------------------------------------------------------------------------------------------------------
# verdicts: the paper's claims, decided from the studies' stored results


MARGIN = 0.01            # "at no loss" / "close to": a paired difference whose interval stays above -MARGIN
MIN_SUBJECTS = 5         # below this a bootstrap interval over subjects is too coarse to decide anything


def verdict(lo, hi, direction=1, margin=None):
    """One word for a paired difference's 95% interval [lo, hi]. With `margin` None the claim is a change in
    `direction` (+1 up, -1 down): reproduced if the interval lies on that side of 0, not reproduced if no change
    that way lies inside it (it lies on the other side, or ends at 0: [0, 0] where two methods trained the same
    model), inconclusive if it holds changes both ways. With a margin the claim is "no worse than by `margin`":
    reproduced if lo > -margin, not reproduced if hi < -margin."""
    if margin is not None:
        return "reproduced" if lo > -margin else "not reproduced" if hi < -margin else "inconclusive"
    lo, hi = sorted((direction * lo, direction * hi))
    return "reproduced" if lo > 0 else "not reproduced" if hi <= 0 else "inconclusive"


def stored(args, name):
    """A study's stored results, or None if it has not been run into this --results."""
    path = Path(args.results) / (name + seeded(args)) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def subjects_needed(differences, half_width=MARGIN):
    """How many subjects a 95% interval of half-width `half_width` would take, from the spread of these paired
    differences (normal approximation: 1.96 sd / sqrt(n) = half_width)."""
    if len(differences) < 2:
        return "-"
    sd = statistics.stdev(differences)
    return f"{max(len(differences), math.ceil((1.96 * sd / half_width) ** 2)):,}"


def paired_row(claim, what, a, b, key, direction=1, margin=None):
    """A verdict row from two {subject: scores} maps, paired over the subjects both hold, with the subjects a
    half-width of MARGIN would take (for the fidelity metrics)."""
    subjects = [s for s in a if s in b]
    differences = [a[s][key] - b[s][key] for s in subjects]
    mean, lo, hi = metrics.confidence_interval(differences)
    fmt = {"trainable": "{:+,.0f}", "file_mib": "{:+.2f} MiB", "train_seconds": "{:+.0f} s"}.get(key, "{:+.3f}")
    needed = subjects_needed(differences) if key in metrics.METRIC_NAMES else "-"
    word = verdict(lo, hi, direction, margin) if len(subjects) >= MIN_SUBJECTS else "too few subjects"
    return (f"| {claim} | {what} | {metrics.METRIC_NAMES.get(key, key)} | {fmt.format(mean)} ({fmt.format(lo)} to "
            f"{fmt.format(hi)}) | {len(subjects)} | {needed} | {word} |")


def scores_at(results, variant, step=None):
    """{subject: scores} of one variant of a study's stored results, at `step` (default: its last scored step)."""
    return {s: v[variant][step or max(v[variant], key=int)] for s, v in results.items() if variant in v}


def not_run(claims, study):
    return [f"| {c} | - | - | - | 0 | - | not run yet (`python studies.py {study}`) |" for c in claims]


def verdict_rows(tradeoff, main, intervals):
    """The verdict table's rows (claims 1-7 of the README) from the stored results of three studies (None: a study
    not run yet, whose claims get a row that says so)."""
    return ((tradeoff_rows(tradeoff) if tradeoff else not_run(["1. trade-off"], "tradeoff"))
            + (main_rows(main) if main else not_run(["2.-6. the methods"], "main"))
            + (interval_rows(intervals) if intervals else not_run(["7. a key interval"], "intervals")))


def tradeoff_rows(tradeoff):
    rows = []
    steps = sorted({int(n) for v in tradeoff.values() for n in v["prior"]})
    first, last = str(steps[1] if steps[0] == 0 else steps[0]), str(steps[-1])
    for key, d in (("clip_i", 1), ("dino", 1), ("clip_t", -1)):
        rows.append(paired_row("1. trade-off", f"baseline at {last} minus {first} steps",
                               scores_at(tradeoff, "prior", last), scores_at(tradeoff, "prior", first), key, d))
    return rows


def main_rows(main):
    rows = []
    base, full = scores_at(main, "W4A8 peqa"), scores_at(main, "FP DreamBooth (full)")
    for claim, method, other, label in (("2. S1 beats the baseline", "W4A8 s1", base, "S1 - baseline"),
                                        ("3. S2 beats the baseline", "W4A8 s2", base, "S2 - baseline"),
                                        ("3. S2 beats S1", "W4A8 s2", scores_at(main, "W4A8 s1"), "S2 - S1"),
                                        ("4. S1 + S2 beats the baseline", "W4A8 s1+s2", base, "S1+S2 - baseline")):
        for key in ("local_clip_i", "clip_i", "dino"):
            rows.append(paired_row(claim, label, scores_at(main, method), other, key))
        rows.append(paired_row(claim, label + f" (no loss: > -{MARGIN})", scores_at(main, method), other, "clip_t",
                               margin=MARGIN))
    for method in ("W4A8 s1", "W4A8 s2", "W4A8 s1+s2"):
        for key in ("clip_i", "dino"):
            rows.append(paired_row("5. close to FP DreamBooth", f"{method[5:]} - full (> -{MARGIN})",
                                   scores_at(main, method), full, key, margin=MARGIN))
    s1, s2 = scores_at(main, "W4A8 s1"), scores_at(main, "W4A8 s2")
    for key in ("trainable", "file_mib", "train_seconds"):
        rows.append(paired_row("6. S2 costs more than S1", "S2 - S1", s2, s1, key))
    return rows


def interval_rows(intervals):
    rows = []
    fifths = [v for v in next(iter(intervals.values())) if v.startswith("t ")]
    untrained = scores_at(intervals, "all t (baseline)", "0")
    trained = {v: scores_at(intervals, v) for v in fifths}
    gains = {s: {v: trained[v][s]["dino"] - untrained[s]["dino"] for v in fifths} for s in intervals}
    chosen, rest = {}, {}
    for s, g in gains.items():             # the fifth the *other* subjects gain most from: no subject picks its own
        others = [o for o in gains if o != s] or [s]
        pick = max(fifths, key=lambda v: sum(gains[o][v] for o in others))
        chosen[s], rest[s] = {"dino": g[pick]}, {"dino": sum(g[v] for v in fifths if v != pick) / (len(fifths) - 1)}
    rows.append(paired_row("7. a key interval exists", "the other subjects' best fifth of t - the other fifths "
                           "(DINO gain)", chosen, rest, "dino"))
    for key in ("clip_i", "dino"):
        rows.append(paired_row("7. it is found from data", "S1 auto - baseline",
                               scores_at(intervals, "S1 auto (per subject)"), scores_at(intervals, "all t (baseline)"),
                               key))
    return rows


def study_verdicts(args, subjects, classes):
    """The verdict table, computed from what `tradeoff`, `main` and `intervals` stored (nothing is trained)."""
    if not stored(args, "main"):
        raise SystemExit(f"error: {Path(args.results) / ('main' + seeded(args))} holds no results; run `python "
                         f"studies.py main{' --seed ' + str(args.seed) if args.seed else ''}` first")
    kept = lambda results: results and {s: v for s, v in results.items()          # --subjects' only, if given
                                        if args.subjects == "all" or s in subjects}
    main = kept(stored(args, "main"))
    rows = verdict_rows(kept(stored(args, "tradeoff")), main, kept(stored(args, "intervals")))
    table = "\n".join([f"| claim | comparison | metric | paired difference (95% CI) | subjects | subjects for "
                        f"+-{MARGIN} | verdict |", "|---|---|---|---|---|---|---|", *rows])
    note = (f"Each row pairs the two models subject by subject (W4A8 base); verdict: reproduced where the interval "
            f"lies on the paper's side of 0 (or, for \"no loss\" and \"close to\", above -{MARGIN}), not "
            f"reproduced where it lies on the other side, inconclusive where it holds both (too few subjects: under "
            f"{MIN_SUBJECTS}). \"Subjects for +-{MARGIN}\": "
            f"how many subjects an interval that narrow would take, from the spread of the differences measured "
            f"(1.96 sd / sqrt(n) = {MARGIN}).")
    finish("verdicts", note + "\n\n" + table, main, args, time.time(), None, [])


GRID = {"untrained W4A8": ("w4a8", None), "W4A8 baseline": ("w4a8", "w4a8-peqa"), "W4A8 S1": ("w4a8", "w4a8-s1"),
        "W4A8 S2": ("w4a8", "w4a8-s2"), "FP DreamBooth": ("fp", "fp-full")}


def study_grid(args, subjects, classes):
    """What the main study's models draw for the first three --subjects: a row of references, then a row per model
    of the first four templates in prompt_order, each the first of the images the scores came from (same seeds)."""
    root, _, objects, live = metrics.dataset_subjects(DATASET)
    lacking = [Path(args.out) / "runs" / tag / s / train.OUT_FILE for s in subjects[:3] for _, tag in GRID.values()
               if tag and not (Path(args.out) / "runs" / tag / s / train.OUT_FILE).is_file()]
    if lacking:                                                          # before any sampling
        raise SystemExit(f"error: {lacking[0]} is missing; run `python studies.py main --subjects "
                         f"{','.join(subjects[:3])}` first")
    cells = []
    for s in subjects[:3]:
        refs, cls = metrics.read_images(root / s), classes[s]
        templates = prompt_order(metrics.templates_for(cls, objects, live))[:args.n_prompts]   # as scored: the
        # same batches, so the same images even where a W4A8 model's rounding depends on the batch
        cells += [(im, f"{s}: reference {i + 1}") for i, im in enumerate(refs[:4])]
        for label, (base, tag) in GRID.items():
            scales = Path(args.out) / "runs" / tag / s / train.OUT_FILE if tag else None
            base_file = base_path(base, args.out, args.results)
            _, images, prompts = metrics.score_model(base_file, scales, None, refs, cls, templates, "sks",
                                                     args.n_images, args.seed, batch_images=args.batch_images,
                                                     num_inference_steps=args.num_inference_steps, guidance_scale=7.5)
            cells += [(images[i], f"{label}: {prompts[i]}") for i in range(0, 4 * args.n_images, args.n_images)]
    path = Path(args.out) / "grid" / "grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    sample.labelled_grid(cells, cols=4).save(path)
    if args.readme:
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(path, ROOT / "docs" / "study_grid.png")
        write_readme("grid", f"![references, then each model's samples](docs/study_grid.png)\n\n`python studies.py "
                     f"{' '.join(sys.argv[1:])}`: for each subject a row of its references, then per model the first "
                     f"image of four templates (the seeds the scores used).\n")
    print(f"wrote {path}")


STUDIES = {"tradeoff": study_tradeoff, "main": study_main, "experts": study_experts, "intervals": study_intervals,
           "verdicts": study_verdicts, "grid": study_grid}


def main(argv=None):
    p = argparse.ArgumentParser(description="The paper's studies in the toy world: tables, plots, README sections.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("study", choices=sorted(STUDIES), help="which study to run (see the module docstring)")
    p.add_argument("--subjects", default="all", help="comma-separated toy subjects, or all")
    p.add_argument("--workers", type=int, default=2, help="number of single-threaded jobs run side by side")
    p.add_argument("--out", default="runs/studies", help="cache of runs (scales, training state) and class images")
    p.add_argument("--results", default="docs/results", help="the scores of every scored step and each study's "
                   "results.json (small JSON files, kept in git: tables and verdicts rebuild from them)")
    p.add_argument("--steps", default="50,100,200,400", help="tradeoff: comma-separated training steps to score at")
    p.add_argument("--train_steps", type=int, default=train.TOY_DEFAULTS["max_train_steps"],
                   help="main/experts/intervals: training steps per run (train.py's toy default)")
    p.add_argument("--n_prompts", type=int, default=25, help="prompt templates per subject: all 25 of DreamBooth's, "
                   "or the first N in prompt_order (9: every third, the shorter protocol)")
    p.add_argument("--n_images", type=int, default=2, help="images per prompt")
    p.add_argument("--num_inference_steps", type=int, default=25, help="DDIM steps per image (25 scores as 50 "
                   "within 0.006 on the toy model: bench/sampling_toy.py)")
    p.add_argument("--batch_images", type=int, default=50, help="images denoised in one batch when scoring (whole "
                   "templates; 1: one template at a time). 50 takes half the time of 2 on the toy model; on a W4A8 "
                   "model the float rounding of another batch size moves some images (bench/eval_batch_toy.py)")
    p.add_argument("--num_class_images", type=int, default=20, help="class images for the prior preservation loss, "
                   "per class")
    p.add_argument("--seed", type=int, default=0, help="seeds the training runs and the evaluation samples; "
                   "another seed than 0 stores its runs and tables apart (folders named -seedN) and leaves the README "
                   "to seed 0")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="main/experts: measure each method's peak memory in a process of its own")
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=True,
                   help="write the table and plot into README.md (and docs/)")
    args = p.parse_args(argv)
    _, classes, _, _ = metrics.dataset_subjects(DATASET)
    subjects = list(classes) if args.subjects == "all" else args.subjects.split(",")
    unknown = [s for s in subjects if s not in classes]
    if unknown:
        p.error(f"unknown subjects {', '.join(unknown)}; the toy subjects are {', '.join(classes)}")
    if args.workers < 1 or args.n_images < 1 or not 1 <= args.n_prompts <= 25:
        p.error("--workers and --n_images must be >= 1, --n_prompts in 1..25")
    if args.seed and args.readme:
        print(f"--seed {args.seed}: the tables go to {args.results}/<study>-seed{args.seed}/, the README keeps "
              "seed 0's")
        args.readme = False
    torch.set_num_threads(1 if args.workers > 1 else torch.get_num_threads())
    STUDIES[args.study](args, subjects, classes)


if __name__ == "__main__":
    main()
