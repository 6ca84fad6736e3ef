"""qdp.py end to end on the toy model, every stage shortened: quantize, personalize three ways, sample, score, report."""
import json

import pytest

import qdp

FAST = ["--quant_iters", "1", "--max_train_steps", "2", "--num_inference_steps", "2", "--n_prompts", "2",
        "--n_images", "1", "--num_class_images", "1"]


def test_end_to_end_and_rerun_reuses_the_stages(tmp_path, capsys):
    out = tmp_path / "qdp"
    qdp.main(["--out", str(out), "--subject", "vase_heart", *FAST])
    captured = capsys.readouterr()
    log = captured.out
    assert all(f"[{k}/5]" in log for k in range(1, 6))
    lines = log.splitlines()                    # each of stages 1-3 is announced before its work, then closed
    for k in (1, 2, 3):
        opened = next(i for i, line in enumerate(lines) if line.startswith(f"[{k}/5]") and line.endswith(" ..."))
        assert any(line.startswith(f"[{k}/5]") and not line.endswith(" ...") for line in lines[opened + 1:])
    assert "\r" not in captured.err and "train: 2/2 steps (100%)" in captured.err   # off a terminal: plain lines
    report = (out / "report.md").read_text()
    for row in ("| untrained |", "| baseline |", "| s1 |", "| s2 |"):
        assert row in report
    assert (out / "report.png").stat().st_size > 0
    files = {m: out / m / "personalized.safetensors" for m in ("baseline", "s1", "s2")}
    stamps = {m: f.stat().st_mtime_ns for m, f in files.items()}
    base = out / "quantized_w4a8.safetensors"
    base_stamp = base.stat().st_mtime_ns
    qdp.main(["--out", str(out), "--subject", "vase_heart", *FAST])            # a rerun trains nothing again
    assert base.stat().st_mtime_ns == base_stamp
    assert {m: f.stat().st_mtime_ns for m, f in files.items()} == stamps
    with pytest.raises(SystemExit, match="other class, subject; pass another --out"):   # nothing stale is reused
        qdp.main(["--out", str(out), "--subject", "dog_patch", *FAST])
    record = json.loads((out / "qdp.json").read_text())          # the same path, but the model in it changed
    (out / "qdp.json").write_text(json.dumps({**record, "ckpt_sha256": "0" * 64}))
    with pytest.raises(SystemExit, match="other ckpt_sha256"):
        qdp.main(["--out", str(out), "--subject", "vase_heart", *FAST])


@pytest.mark.parametrize("flags, message", [
    (["--instance_data_dir", "."], "--instance_data_dir and --class_name go together"),
    (["--methods", "baseline,s3"], "unknown --methods s3"),
    (["--clip", "somewhere"], "give both --clip and --dino"),
    (["--ckpt", "missing.safetensors"], "does not exist"),
    (["--class_inference_steps", "0"], "--class_inference_steps must be at least 1"),
])
def test_bad_flags_stop_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        qdp.parse_args(flags)
    assert message in capsys.readouterr().err


def test_unknown_subject_names_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="choose from .*dog_patch"):
        qdp.main(["--out", str(tmp_path), "--subject", "unicorn"])


def test_change_rows_are_paired_differences():
    """The report's change rows are each model's per-image scores minus the untrained model's, image by image, with
    a bootstrap interval that holds the mean and shrinks to it when every difference is the same."""
    rows = {"untrained": {"per_image": {"clip_i": [0.1, 0.2, 0.3, 0.4], "dino": [0.5, 0.5, 0.5, 0.5]}},
            "baseline": {"per_image": {"clip_i": [0.2, 0.3, 0.4, 0.5], "dino": [0.4, 0.6, 0.5, 0.9]}}}
    (line,) = qdp.change_rows(rows)
    assert line == "| baseline | +0.100 (+0.100 to +0.100) | +0.100 (" + line.split("| +0.100 (")[2]
    lo, hi = (float(v) for v in line.split("| +0.100 (")[2].rstrip(") |").split(" to "))
    assert lo < 0.1 < hi


def test_class_images_are_drawn_at_the_given_steps(tmp_path, monkeypatch):
    """--class_inference_steps reaches train.py (bench/real_path.py found qdp drawing SD class images at 50 steps)."""
    seen = []

    def personalize(**settings):
        seen.append(settings)
        (tmp_path / "baseline").mkdir()
        (tmp_path / "baseline" / "personalized.safetensors").write_bytes(b"")

    monkeypatch.setattr(qdp.train, "personalize", personalize)
    args = qdp.parse_args(["--methods", "baseline", "--class_inference_steps", "3"])
    qdp.personalize(args, "base.safetensors", tmp_path, tmp_path, "dog")
    assert [s["class_inference_steps"] for s in seen] == [3]
