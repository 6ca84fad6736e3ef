"""Hostile inputs against the command lines: crafted checkpoints, flags and paths. Each case asserts the exit code,
a one-line message that says what to do, and that every file the user had is byte-identical afterwards. The README's
"Hostile inputs" table lists these cases."""
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckpt
import quant
import refs
import sample
import train
import unet as unet_lib
import vae as vae_lib
from conftest import ROOT

CFG = replace(unet_lib.tiny(), sample_size=8)
WEIGHT = "model.diffusion_model.out.2.weight"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny float model, copies of it with a NaN or integer weight, its W4 quantization and a copy of that with
    flipped bits in the codes, an unrelated file the user cares about, and three photos."""
    d = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    sd = ckpt.StableDiffusion(refs.randomize_(unet_lib.UNet(CFG), std=0.1), vae_lib.AutoencoderKL(refs.VAE).eval(),
                              refs.clip_text(), ckpt.load_tokenizer())
    ckpt.save_compvis(sd, d / "fp.safetensors")
    tensors, meta = load_file(d / "fp.safetensors"), safe_open(str(d / "fp.safetensors"), "pt").metadata()
    for name, edit in (("nan", lambda v: v.clone().index_fill_(0, torch.tensor([0]), float("nan"))),
                       ("inf", lambda v: v.clone().fill_(float("inf"))),
                       ("int", lambda v: v.round().long()), ("bool", lambda v: v > 0)):
        save_file({**tensors, WEIGHT: edit(tensors[WEIGHT])}, str(d / f"{name}.safetensors"), metadata=meta)
    sd.unet = quant.quantize_(sd.unet, 4)
    ckpt.save_quantized(sd, d / "q.safetensors")
    tensors, meta = load_file(d / "q.safetensors"), safe_open(str(d / "q.safetensors"), "pt").metadata()
    codes = "model.diffusion_model.out.2.weight_quantizer.w_int"
    flipped = tensors[codes].clone()
    flipped.view(-1)[:4] ^= 0x11
    save_file({**tensors, codes: flipped}, str(d / "flip.safetensors"), metadata=meta)
    (d / "precious.safetensors").write_bytes(b"the user's own file, not a checkpoint")
    Image.new("RGB", (16, 16), "red").save(d / "mine.png")
    (d / "photos").mkdir()
    (d / "folder.png").mkdir()                                  # a folder with an image's name
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / "photos" / f"{i}.jpg")
    return d


def snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def kept(before, d):
    """Every file that was there is there still, byte for byte (a refused run may leave only new files, e.g. the
    lock of an output folder it created)."""
    after = snapshot(d)
    return all(after.get(k) == v for k, v in before.items())


def refused(main, argv, capsys):
    """Run a CLI's main in-process: (exit code, the one message line) of the SystemExit it must raise."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    return (1 if isinstance(code, str) else code), message


CASES = {  # name: (module, argv with {d} for the files folder, exit code, words the message must hold)
    "sample: NaN weights": (sample, ["--ckpt", "{d}/nan.safetensors", "--prompt", "a cat", "--out", "{d}/new.png"],
                            1, "holds NaN or inf"),
    "sample: inf weights": (sample, ["--ckpt", "{d}/inf.safetensors", "--prompt", "a cat", "--out", "{d}/new.png"],
                            1, "holds NaN or inf"),
    "sample: integer weights": (sample, ["--ckpt", "{d}/int.safetensors", "--prompt", "a", "--out", "{d}/new.png"],
                                1, "holds int64 values where float weights belong"),
    "sample: corrupted codes": (sample, ["--ckpt", "{d}/flip.safetensors", "--prompt", "a", "--out", "{d}/new.png"],
                                1, "do not match the checksum"),
    "sample: --guidance_scale nan": (sample, ["--ckpt", "{d}/fp.safetensors", "--prompt", "a", "--guidance_scale",
                                              "nan", "--out", "{d}/new.png"], 2, "must be a finite number"),
    "sample: --out is a folder": (sample, ["--ckpt", "{d}/fp.safetensors", "--prompt", "a", "--out",
                                           "{d}/folder.png"], 2, "is a folder"),
    "sample: --out is the user's image": (sample, ["--ckpt", "{d}/fp.safetensors", "--prompt", "a", "--out",
                                                   "{d}/mine.png"], 2, "already exists; add --overwrite"),
    "sample: --out under a file": (sample, ["--ckpt", "{d}/fp.safetensors", "--prompt", "a", "--out",
                                            "{d}/mine.png/x.png"], 2, "is a file, so nothing can be written"),
    "quant: NaN weights": (quant, ["--ckpt", "{d}/nan.safetensors", "--out", "{d}/new.safetensors"], 1,
                           "holds NaN or inf"),
    "quant: bool weights": (quant, ["--ckpt", "{d}/bool.safetensors", "--out", "{d}/new.safetensors"], 1,
                            "holds bool values"),
    "quant: --out exists": (quant, ["--ckpt", "{d}/fp.safetensors", "--out", "{d}/precious.safetensors"], 2,
                            "already exists; add --overwrite"),
    "quant: --save_calib is the input": (quant, ["--ckpt", "{d}/fp.safetensors", "--out", "{d}/new.safetensors",
                                                 "--save_calib", "{d}/fp.safetensors"], 2, "is also an input"),
    "quant: --save_calib is --out": (quant, ["--ckpt", "{d}/fp.safetensors", "--out", "{d}/new.safetensors",
                                             "--save_calib", "{d}/new.safetensors"], 2, "is also an input"),
    "quant: already quantized": (quant, ["--ckpt", "{d}/q.safetensors", "--out", "{d}/new.safetensors"], 1,
                                 "is already quantized"),
    "ckpt: --to_compvis is the input": (ckpt, ["{d}/fp.safetensors", "--to_compvis", "{d}/fp.safetensors"], 1,
                                        "is also an input"),
    "ckpt: --to_compvis exists": (ckpt, ["{d}/fp.safetensors", "--to_compvis", "{d}/precious.safetensors"], 1,
                                  "already exists; add --overwrite"),
    "ckpt: --to_diffusers is a file": (ckpt, ["{d}/fp.safetensors", "--to_diffusers", "{d}/precious.safetensors"],
                                       1, "is a file, not a folder"),
    "ckpt: integer weights": (ckpt, ["{d}/int.safetensors"], 1, "holds int64 values"),
    "train: NaN weights": (train, ["--ckpt", "{d}/nan.safetensors", "--method", "full", "--instance_data_dir",
                                   "{d}/photos", "--instance_prompt", "a sks cat", "--output_dir", "{d}/run"], 1,
                           "holds NaN or inf"),
    "train: --output_dir is a file": (train, ["--ckpt", "{d}/q.safetensors", "--instance_data_dir", "{d}/photos",
                                              "--instance_prompt", "a sks cat", "--output_dir",
                                              "{d}/precious.safetensors"], 2, "is a file, not a folder"),
    "train: --learning_rate nan": (train, ["--ckpt", "{d}/q.safetensors", "--instance_data_dir", "{d}/photos",
                                           "--instance_prompt", "a sks cat", "--output_dir", "{d}/run",
                                           "--learning_rate", "nan"], 2, "positive and finite"),
    "train: --resolution 63": (train, ["--ckpt", "{d}/q.safetensors", "--instance_data_dir", "{d}/photos",
                                       "--instance_prompt", "a sks cat", "--output_dir", "{d}/run", "--resolution",
                                       "63"], 2, "multiple of 8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_one_line_and_files_kept(case, files, capsys):
    module, argv, code, words = CASES[case]
    before = snapshot(files)
    got_code, message = refused(module.main, [a.replace("{d}", str(files)) for a in argv], capsys)
    assert (got_code, words in message) == (code, True), message
    assert message.startswith(("error:", "usage:")) or ": error: " in message
    assert kept(before, files)


def test_sample_replaces_only_its_own_images(files, tmp_path, capsys):
    """A PNG sample.py wrote (it marks it) may be drawn again in place; the user's own image needs --overwrite."""
    out = tmp_path / "cat.png"
    argv = ["--ckpt", str(files / "fp.safetensors"), "--prompt", "a cat", "--num_inference_steps", "2",
            "--device", "cpu", "--out", str(out)]
    sample.main(argv)
    assert sample.written_by_us(out) and not sample.written_by_us(files / "mine.png")
    sample.main(argv + ["--seed", "1"])
    assert out.is_file()
    mine = tmp_path / "mine.png"
    mine.write_bytes((files / "mine.png").read_bytes())
    assert refused(sample.main, argv[:-1] + [str(mine)], capsys)[0] == 2
    sample.main(argv[:-1] + [str(mine), "--overwrite"])
    assert sample.written_by_us(mine)


@pytest.mark.parametrize("argv,words", [
    (["quant.py", "--ckpt", "{d}/q.safetensors", "--out", "{d}/new.safetensors"], "is already quantized"),
    (["ckpt.py", "{d}/flip.safetensors"], "do not match the checksum"),
], ids=["quant-sees-quantized", "ckpt-catches-quant-errors"])
def test_scripts_run_as_their_importable_module(argv, words, files):
    """Run as scripts, quant.py and ckpt.py use the same module objects as the code they call, so quant.py sees that
    a file is quantized and ckpt.py catches the CheckpointError that quant raises: one line, exit 1, no traceback."""
    before = snapshot(files)
    r = subprocess.run([sys.executable, *[a.replace("{d}", str(files)) for a in argv]], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert kept(before, files)
