"""studies.py: a shortened trade-off study end to end, its cache, the stored results it rebuilds from, and the
README section it writes."""
import json
import re

import pytest

import quant
import studies


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory):
    """The toy model quantized W4A8 with one AdaRound iteration per block: enough to train and sample."""
    path = tmp_path_factory.mktemp("base") / "w4a8.safetensors"
    quant.main(["--wbits", "4", "--abits", "8", "--iters", "1", "--act_iters", "1", "--n_prompts", "2",
                "--num_inference_steps", "4", "--out", str(path)])
    return path


def test_tradeoff_study_writes_its_table_and_resumes(quick_base, tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "base_path", lambda base, out, results: quick_base)
    argv = ["tradeoff", "--subjects", "mug_star", "--steps", "1,2", "--n_prompts", "1", "--n_images", "1",
            "--num_inference_steps", "2", "--num_class_images", "1", "--workers", "1", "--out", str(tmp_path),
            "--results", str(tmp_path), "--no-readme"]
    studies.main(argv)
    table = (tmp_path / "tradeoff" / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[0] for r in rows] == ["| 0 (untrained, mean)", "| 1 (change)", "| 2 (change)"]
    assert all(r.count("/1 up") == 6 for r in rows[1:])            # paired changes, 3 metrics x 2 variants
    results = json.loads((tmp_path / "tradeoff" / "results.json").read_text())
    assert set(results["mug_star"]) == {"prior", "no prior"}
    assert set(results["mug_star"]["prior"]) == {"0", "1", "2"}
    steps = [r for v in results["mug_star"].values() for r in v.values()]
    assert all(r["seconds"] >= r["train_seconds"] > 0 for r in steps)    # each step's training and scoring, timed
    minutes = sum(json.loads(f.read_text())["seconds"] for f in tmp_path.glob("curves/*/mug_star/scores_*.json")) / 60
    assert f"its runs took {minutes:.0f} CPU-minutes on one thread each" in table   # summed from the cache
    assert "; W4A8 runs on 1 base (each subject's runs on one)." in table           # the bases its scores name
    run = tmp_path / "curves" / "w4a8-peqa" / "mug_star"
    stamp = (run / "scores_2.json").stat().st_mtime_ns
    studies.main(argv)                                               # cached: nothing is trained or scored again
    assert (run / "scores_2.json").stat().st_mtime_ns == stamp
    again = (tmp_path / "tradeoff" / "table.md").read_text()
    assert f"1 subjects, over runs cached by earlier jobs; its runs took {minutes:.0f} CPU-minutes" in again
    (run / "scores_1.json").unlink()                                 # step 1 is gone but the run is at step 2
    with pytest.raises(RuntimeError, match="trained past step 1"):
        studies.main(argv)


def test_a_fresh_clone_rebuilds_the_tables_from_the_stored_results(quick_base, tmp_path, monkeypatch):
    """--results alone (what git keeps) rebuilds a study's table: no run folder, no base model, no class image; a
    step scored with other settings is run again."""
    monkeypatch.setattr(studies, "base_path", lambda base, out, results: quick_base)
    argv = ["tradeoff", "--subjects", "mug_star", "--steps", "1", "--n_prompts", "1", "--n_images", "1",
            "--num_inference_steps", "2", "--num_class_images", "1", "--workers", "1", "--results",
            str(tmp_path / "results"), "--no-readme"]
    studies.main(argv + ["--out", str(tmp_path / "first")])
    table = (tmp_path / "results" / "tradeoff" / "table.md").read_text()
    assert not (tmp_path / "first" / "tradeoff" / "table.md").exists()     # the table went to --results
    stored = sorted((tmp_path / "results" / "curves").glob("*/mug_star/scores_*.json"))
    assert sorted(f.name for f in stored) == ["scores_0.json", "scores_1.json", "scores_1.json"]
    stamps = [f.stat().st_mtime_ns for f in stored]

    def nothing_made(base, out, results):
        raise AssertionError("a base model was asked for")
    monkeypatch.setattr(studies, "base_path", nothing_made)
    studies.main(argv + ["--out", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh" / "class").exists()               # no class image drawn
    assert [f.stat().st_mtime_ns for f in stored] == stamps
    again = (tmp_path / "results" / "tradeoff" / "table.md").read_text()
    rows = lambda t: [line for line in t.splitlines() if line.startswith("|")]
    assert rows(again) == rows(table)
    monkeypatch.setattr(studies, "base_path", lambda base, out, results: quick_base)
    studies.main(argv + ["--out", str(tmp_path / "fresh"), "--seed", "1"])   # a second seed is stored beside
    assert [f.stat().st_mtime_ns for f in stored] == stamps
    assert (tmp_path / "results" / "curves" / "w4a8-peqa-seed1" / "mug_star" / "scores_1.json").is_file()
    assert (tmp_path / "results" / "tradeoff-seed1" / "table.md").is_file()
    studies.main(argv + ["--out", str(tmp_path / "fresh"), "--n_images", "2"])   # other settings: scored anew
    assert all(f.stat().st_mtime_ns != t for f, t in zip(stored, stamps))
    run = tmp_path / "results" / "curves" / "w4a8-peqa" / "mug_star"
    kept = json.loads((run / "scores_1.json").read_text())
    assert kept["base_sha256"] == studies.ckpt.model_sha256(quick_base)
    (run / "scores_1.json").write_text(json.dumps({**kept, "base_sha256": "another base"}))
    (run / "scores_0.json").unlink()                                 # step 0 to score, step 1 from another base
    with pytest.raises(SystemExit, match="mug_star's stored w4a8 steps in .* scored on another w4a8 base"):
        studies.main(argv + ["--out", str(tmp_path / "fresh"), "--n_images", "2"])


def test_a_base_is_named_by_its_tensors_not_by_its_file(quick_base, tmp_path):
    """A quantization made again on the same machine and threads is bit-identical but records other timings: the
    same model_sha256, another file sha256. Other UNet tensors, or another float model behind them: another one."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    tensors = load_file(quick_base)
    with safe_open(str(quick_base), "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["qdp.quant"])

    def saved(name, **changes):
        m = {**meta, "qdp.quant": json.dumps({**info, **changes.pop("quant", {})}), **changes}
        save_file(tensors, str(tmp_path / name), metadata=m)
        return tmp_path / name
    again = saved("again.safetensors", quant={"quant_seconds": info["quant_seconds"] + 7})
    assert studies.ckpt.sha256(again) != studies.ckpt.sha256(quick_base)
    assert studies.ckpt.model_sha256(again) == studies.ckpt.model_sha256(quick_base)
    for other in (saved("codes.safetensors", **{"qdp.unet_sha256": "0" * 64}),
                  saved("float.safetensors", quant={"base_sha256": "1" * 64})):
        assert studies.ckpt.model_sha256(other) != studies.ckpt.model_sha256(quick_base)
    assert studies.ckpt.model_sha256(studies.ckpt.TOY_CKPT) == studies.ckpt.sha256(studies.ckpt.TOY_CKPT)


def test_a_quantized_base_is_kept_small_and_restored_exactly(quick_base, tmp_path, monkeypatch):
    """The first study quantizes a base and keeps its UNet in --results/bases/; a fresh --out (another machine)
    restores that base, tensor for tensor, instead of quantizing another; a damaged kept base says so."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    made = []

    def quantize(path, wbits, abits):
        made.append((wbits, abits))
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(quick_base, path)
    monkeypatch.setattr(studies.train, "default_quantized", quantize)
    results = tmp_path / "results"
    first = studies.base_path("w4a8", tmp_path / "a", results)
    kept = results / "bases" / "toy_w4a8.safetensors"
    assert made == [(4, 8)] and kept.stat().st_size < quick_base.stat().st_size / 4
    again = studies.base_path("w4a8", tmp_path / "b", results)
    assert made == [(4, 8)]                                           # restored, not quantized again
    a, b = load_file(first), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert studies.ckpt.model_sha256(again) == studies.ckpt.model_sha256(quick_base)
    assert studies.base_path("fp", tmp_path / "b", results) == studies.ckpt.TOY_CKPT
    tensors, meta = studies.ckpt.read_tensors(kept)
    key = next(k for k in tensors if k.endswith(".w_int"))
    save_file({**tensors, key: tensors[key] ^ 1}, str(kept), metadata=meta)    # flipped bits in the codes
    with pytest.raises(SystemExit, match="does not rebuild the base it kept"):
        studies.base_path("w4a8", tmp_path / "c", results)
    assert not (tmp_path / "c" / "toy_w4a8.safetensors").exists()


def test_a_subjects_runs_on_one_base_kind_share_one_base(tmp_path, monkeypatch):
    """A run with nothing stored is refused when another run of the same subject and base kind was scored on another
    base (its methods would meet on two models); other subjects and other base kinds do not count."""
    import argparse
    from pathlib import Path
    monkeypatch.setattr(studies, "base_path", lambda base, out, results: studies.ckpt.TOY_CKPT)   # a stand-in
    args = argparse.Namespace(out=str(tmp_path / "out"), results=str(tmp_path / "results"), n_prompts=1, n_images=1,
                              num_inference_steps=2, seed=0, num_class_images=1, batch_images=1, workers=1)
    variants = {"baseline": ("w4a8", "peqa", True, [1]), "S1": ("w4a8", "s1", True, [1]),
                "FP": ("fp", "full", True, [1])}
    classes = {"mug_star": "mug", "dog_patch": "dog"}
    with monkeypatch.context() as m:
        m.setattr(studies, "prepare_bases", lambda jobs, args: jobs)
        jobs = studies.jobs_for(variants, list(classes), classes, args)
    monkeypatch.setattr(studies, "make_class_images", lambda spec: None)
    here = studies.ckpt.model_sha256(studies.ckpt.TOY_CKPT)

    def store(subject, name, base_sha256):
        job = next(j for j in jobs if (j["subject"], j["name"]) == (subject, name))
        Path(job["scores_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(job["scores_dir"]) / "scores_1.json").write_text(
            json.dumps({"settings": job["settings"], "base_sha256": base_sha256}))
        return job["scores_dir"]
    for name in ("baseline", "S1"):                         # another subject's runs, all stored on another base
        store("dog_patch", name, "another base")
    store("mug_star", "FP", here)
    studies.jobs_for(variants, list(classes), classes, args)
    mixed = store("mug_star", "baseline", "another base")
    with pytest.raises(SystemExit, match=f"mug_star's stored w4a8 steps in {re.escape(mixed)} were scored on another"):
        studies.jobs_for(variants, list(classes), classes, args)


def test_readme_section_is_replaced_between_its_markers(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- study:main -->\nold table\n<!-- /study:main -->\nafter\n")
    monkeypatch.setattr(studies, "README", readme)
    studies.write_readme("main", "| new | table |")
    assert readme.read_text() == "intro\n<!-- study:main -->\n| new | table |\n<!-- /study:main -->\nafter\n"
    studies.write_readme("tradeoff", "ignored")                     # no markers: the README is left alone
    assert "ignored" not in readme.read_text()


def test_peak_memory_is_the_runs_own(quick_base, tmp_path, monkeypatch):
    """The child's own high-water mark: more than torch alone, and not the parent's size carried over the fork."""
    import argparse

    import torch
    monkeypatch.setattr(studies, "base_path", lambda base, out, results: quick_base)
    held = torch.ones(300 * 2**20 // 4)                              # the parent holds 300 MiB more
    args = argparse.Namespace(out=str(tmp_path), results=str(tmp_path), num_class_images=1)
    mib = studies.peak_memory("w4a8", {}, "mug_star", "mug", args, steps=1)
    assert 150 < mib < 2000
    held2 = torch.ones(300 * 2**20 // 4)                             # holding more in the parent changes nothing
    assert abs(studies.peak_memory("w4a8", {}, "mug_star", "mug", args, steps=1) - mib) < 100
    del held, held2


def test_spearman_ranks():
    """Rank correlation: +1 for any increasing relation, -1 for a decreasing one, order of pairs irrelevant."""
    assert studies.spearman([1, 2, 3, 4, 5], [10, 20, 25, 90, 100]) == pytest.approx(1)
    assert studies.spearman([0.1, 0.5, 0.2], [3, 1, 2]) == pytest.approx(-1)
    assert studies.spearman([3, 1, 2, 5], [0.3, 0.9, 0.1, 0.4]) == pytest.approx(studies.spearman([1, 2, 3, 5],
                                                                                             [0.9, 0.1, 0.3, 0.4]))


def test_sharded_studies_equal_one_process(quick_base, tmp_path):
    """torchrun with 2 CPU processes (gloo) shares the jobs out and writes the same results as one process."""
    import os
    import shutil
    import subprocess
    import sys

    import conftest
    for out in ("one", "two"):             # the W4A8 base, kept small with the results: each restores it
        studies.keep_base(quick_base, tmp_path / out / "bases" / "toy_w4a8.safetensors")
    common = [str(conftest.ROOT / "studies.py"), "tradeoff", "--subjects", "mug_star,dog_patch", "--steps", "1",
              "--n_prompts", "1", "--n_images", "1", "--num_inference_steps", "2", "--num_class_images", "1",
              "--workers", "1", "--no-readme"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    for cmd, out in (([sys.executable], "one"),
                     ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       "29541"], "two")):
        done = subprocess.run([*cmd, *common, "--out", str(tmp_path / out), "--results", str(tmp_path / out)],
                              cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / d / "tradeoff" / "results.json").read_text()) for d in ("one", "two"))
    assert list(one) == list(two) == ["mug_star", "dog_patch"]
    for out in ("one", "two"):
        restored = tmp_path / out / "toy_w4a8.safetensors"
        assert studies.ckpt.model_sha256(restored) == studies.ckpt.model_sha256(quick_base)
    for s in one:
        for variant, steps in one[s].items():
            for n, scores in steps.items():
                for k in ("clip_i", "local_clip_i", "clip_t", "dino"):
                    assert two[s][variant][n][k] == pytest.approx(scores[k], abs=1e-5)
    table = lambda d: [ln for ln in (tmp_path / d / "tradeoff" / "table.md").read_text().splitlines() if "|" in ln]
    assert table("one") == table("two")


def test_prompt_order_puts_every_third_first_and_keeps_all():
    templates = [f"t{i}" for i in range(25)]
    order = studies.prompt_order(templates)
    assert order[:9] == templates[::3] and sorted(order) == sorted(templates) and len(order) == 25


def test_verdicts_come_from_the_stored_results(tmp_path):
    """A made-up set of stored results where S1 is better than the baseline, S2 worse and S1+S2 the same up to
    noise: the table says reproduced, not reproduced and inconclusive, row by row, from those files alone."""
    import math
    import random
    import statistics
    rng = random.Random(0)
    subjects = list(studies.metrics.dataset_subjects(studies.DATASET)[1])[:10]    # toy subjects, made-up scores
    metrics_ = ("clip_i", "local_clip_i", "clip_t", "dino")
    score = lambda shift, **extra: {**{k: 0.5 + shift + rng.gauss(0, 0.005) for k in metrics_},
                                    "train_seconds": 10.0, "trainable": 100, "file_mib": 0.1, **extra}
    cost = dict(trainable=400, file_mib=0.4, train_seconds=12.0)
    main = {s: {"FP DreamBooth (full)": {"0": score(0), "200": score(0.1)},
                "W4A8 peqa": {"0": score(0), "200": score(0.1)}, "W4A8 s1": {"200": score(0.15)},
                "W4A8 s2": {"200": score(0.05, **cost)}, "W4A8 s1+s2": {"200": score(0.1 + rng.gauss(0, 0.03))}}
            for s in subjects}
    tradeoff = {s: {"prior": {"0": score(0), "50": score(0.02), "400": {**score(0.1), "clip_t": 0.3}}}
                for s in subjects}
    intervals = {s: {"all t (baseline)": {"0": score(0), "200": score(0.1)},
                     **{f"t {lo}-{lo + 199}": {"200": score(0.2 if lo == 400 else 0.05)} for lo in range(0, 1000, 200)},
                     "S1 auto (per subject)": {"200": score(0.2)}} for s in subjects}
    for name, results in (("tradeoff", tradeoff), ("main", main), ("intervals", intervals)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    studies.main(["verdicts", "--results", str(tmp_path), "--no-readme"])
    rows = [line.split(" | ") for line in (tmp_path / "verdicts" / "table.md").read_text().splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    word = {(r[0][2:], r[1], r[2]): r[-1].rstrip(" |") for r in rows}
    assert word[("1. trade-off", "baseline at 400 minus 50 steps", "DINO")] == "reproduced"
    assert word[("1. trade-off", "baseline at 400 minus 50 steps", "CLIP-T")] == "reproduced"    # it falls
    assert word[("2. S1 beats the baseline", "S1 - baseline", "local CLIP-I")] == "reproduced"
    assert word[("3. S2 beats the baseline", "S2 - baseline", "DINO")] == "not reproduced"
    assert word[("3. S2 beats S1", "S2 - S1", "CLIP-I")] == "not reproduced"
    assert word[("4. S1 + S2 beats the baseline", "S1+S2 - baseline", "CLIP-I")] == "inconclusive"
    assert word[("6. S2 costs more than S1", "S2 - S1", "trainable")] == "reproduced"
    assert word[("7. a key interval exists", "the other subjects' best fifth of t - the other fifths (DINO gain)",
                 "DINO")] == "reproduced"
    assert len(rows) == 3 + 4 * 4 + 6 + 3 + 1 + 2
    need = {(r[0][2:], r[1], r[2]): r[-2] for r in rows}
    spread = statistics.stdev([main[s]["W4A8 s1+s2"]["200"]["clip_i"] - main[s]["W4A8 peqa"]["200"]["clip_i"]
                               for s in subjects])                   # about 0.03: some 35 subjects for +-0.01
    assert need[("4. S1 + S2 beats the baseline", "S1+S2 - baseline", "CLIP-I")] == str(math.ceil((1.96 * spread
                                                                                                  / 0.01) ** 2))
    assert need[("6. S2 costs more than S1", "S2 - S1", "trainable")] == "-"
    studies.main(["verdicts", "--results", str(tmp_path), "--no-readme", "--subjects", ",".join(subjects[:3])])
    few = [line for line in (tmp_path / "verdicts" / "table.md").read_text().splitlines() if line.startswith("| 2.")]
    assert few and all(re.search(r"\| 3 \| [\d,]+ \| too few subjects \|$", line) for line in few)
    for name in ("tradeoff", "intervals"):           # a study not run yet: its claims say so, the others stand
        (tmp_path / name / "results.json").unlink()
    studies.main(["verdicts", "--results", str(tmp_path), "--no-readme"])
    table = (tmp_path / "verdicts" / "table.md").read_text()
    assert all(f"not run yet (`python studies.py {name}`)" in table for name in ("tradeoff", "intervals"))
    assert "| 2. S1 beats the baseline | S1 - baseline | local CLIP-I |" in table
    with pytest.raises(SystemExit, match="run `python studies.py main --seed 1` first"):   # seeds are kept apart
        studies.main(["verdicts", "--results", str(tmp_path), "--no-readme", "--seed", "1"])
    with pytest.raises(SystemExit, match="run `python studies.py main` first"):
        (tmp_path / "main" / "results.json").unlink()
        studies.main(["verdicts", "--results", str(tmp_path), "--no-readme"])


def test_verdict_words_for_an_interval():
    """Up or down claims: an interval clear of 0 on the claimed side reproduces, one with no change that way in it
    (the other side, or [0, 0] where the two methods trained the same model) does not, one across 0 is open."""
    assert studies.verdict(0.01, 0.05) == "reproduced"
    assert studies.verdict(-0.05, -0.01) == "not reproduced"
    assert studies.verdict(0.0, 0.0) == "not reproduced"
    assert studies.verdict(-0.02, 0.03) == "inconclusive"
    assert studies.verdict(-0.05, -0.01, direction=-1) == "reproduced"
    assert studies.verdict(0.0, 0.0, direction=-1) == "not reproduced"
    assert studies.verdict(-0.005, 0.02, margin=0.01) == "reproduced"
    assert studies.verdict(-0.03, -0.02, margin=0.01) == "not reproduced"
    assert studies.verdict(-0.02, 0.01, margin=0.01) == "inconclusive"


def test_grid_needs_the_main_studys_runs(tmp_path):
    with pytest.raises(SystemExit, match="is missing; run `python studies.py main --subjects dog_patch` first"):
        studies.main(["grid", "--out", str(tmp_path), "--results", str(tmp_path), "--subjects", "dog_patch",
                      "--no-readme"])
