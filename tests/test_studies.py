"""studies.py: a shortened trade-off study end to end, its cache, and the README section it writes."""
import json

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
    monkeypatch.setattr(studies, "base_path", lambda base, out: quick_base)
    argv = ["tradeoff", "--subjects", "mug_star", "--steps", "1,2", "--n_prompts", "1", "--n_images", "1",
            "--num_inference_steps", "2", "--num_class_images", "1", "--workers", "1", "--out", str(tmp_path),
            "--no-readme"]
    studies.main(argv)
    table = (tmp_path / "tradeoff" / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[0] for r in rows] == ["| 0 (untrained, mean)", "| 1 (change)", "| 2 (change)"]
    assert all(r.count("/1 up") == 6 for r in rows[1:])            # paired changes, 3 metrics x 2 variants
    results = json.loads((tmp_path / "tradeoff" / "results.json").read_text())
    assert set(results["mug_star"]) == {"prior", "no prior"}
    assert set(results["mug_star"]["prior"]) == {"0", "1", "2"}
    run = tmp_path / "curves" / "w4a8-peqa" / "mug_star"
    stamp = (run / "scores_2.json").stat().st_mtime_ns
    studies.main(argv)                                               # cached: nothing is trained or scored again
    assert (run / "scores_2.json").stat().st_mtime_ns == stamp
    (run / "scores_1.json").unlink()                                 # step 1 is gone but the run is at step 2
    with pytest.raises(RuntimeError, match="trained past step 1"):
        studies.main(argv)


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
    monkeypatch.setattr(studies, "base_path", lambda base, out: quick_base)
    held = torch.ones(300 * 2**20 // 4)                              # the parent holds 300 MiB more
    args = argparse.Namespace(out=str(tmp_path), num_class_images=1)
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
    (tmp_path / "runs").mkdir()
    shutil.copy(quick_base, tmp_path / "runs" / "toy_w4a8.safetensors")   # the W4A8 base, found where train.py looks
    common = [str(conftest.ROOT / "studies.py"), "tradeoff", "--subjects", "mug_star,dog_patch", "--steps", "1",
              "--n_prompts", "1", "--n_images", "1", "--num_inference_steps", "2", "--num_class_images", "1",
              "--workers", "1", "--no-readme"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    for cmd, out in (([sys.executable], "one"),
                     ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       "29541"], "two")):
        done = subprocess.run([*cmd, *common, "--out", str(tmp_path / out)], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / d / "tradeoff" / "results.json").read_text()) for d in ("one", "two"))
    assert list(one) == list(two) == ["mug_star", "dog_patch"]
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
