"""quant.py: the integer codes, the quantizers' invariants, the memory-lean autograd Function, reconstruction, files and
the command line, on tiny random models."""
import copy
import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckpt
import qlayers
import quant
import refs
import sample
import unet as unet_lib
import vae as vae_lib

CFG = replace(unet_lib.tiny(), sample_size=8)


@pytest.fixture(scope="module")
def tiny_sd():
    """A tiny random SD (UNet with 8x8 latents, 8x VAE, 32-wide CLIP text tower) and the CompVis file it is saved in."""
    torch.manual_seed(0)
    sd = ckpt.StableDiffusion(refs.randomize_(unet_lib.UNet(CFG), std=0.1), vae_lib.AutoencoderKL(refs.VAE).eval(),
                              refs.clip_text(), ckpt.load_tokenizer())
    return sd


@pytest.fixture(scope="module")
def tiny_file(tiny_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    ckpt.save_compvis(tiny_sd, path)
    return path


@pytest.fixture(scope="module")
def calib(tiny_sd):
    return quant.calibrate(tiny_sd, ["a photo of a cat", "a red mug", "a dog on the beach", ""], 4, every=1)


@pytest.fixture(scope="module")
def w4a8(tiny_sd, calib):
    """The tiny SD quantized W4A8 with round-to-nearest and activation ranges from the calibration set."""
    return quant.quantize_model(tiny_sd, 4, 8, "rtn", calib)


def test_calibration_covers_the_trajectory(calib):
    """Every kept step appears for every prompt in both CFG halves: (uncond, cond) x 4 prompts x 4 steps."""
    assert calib["x"].shape == (32, 4, 8, 8) and calib["ctx"].shape == (32, 77, 32)
    assert calib["t"].tolist() == [t for t in sample.ddim_timesteps(4) for _ in range(8)]


# --------------------------------------------------------------------------------------------------------------------
# codes and quantizers


@pytest.mark.parametrize("n_bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 2, 7, 36])
def test_pack_unpack_is_exact(n_bits, k):
    """Packing then unpacking gives back every code, for odd lengths too; 4 bits or fewer take half a byte each."""
    codes = torch.randint(0, 2**n_bits, (5, k), dtype=torch.uint8)
    packed = qlayers.pack(codes, n_bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2 if n_bits <= 4 else k)
    assert torch.equal(qlayers.unpack(packed, n_bits, k), codes)


@pytest.mark.parametrize("n_bits", [4, 8])
def test_rtn_error_is_at_most_half_a_step(n_bits):
    """Inside each channel's clipping range [scale (0 - zero_point), scale (2^b - 1 - zero_point)], rounding to
    nearest moves a weight by at most half a step; the same holds for an activation quantizer's range."""
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1)
    q = qlayers.WeightQuantizer(w.shape, n_bits)
    q.init_rtn(w)
    s, z, flat = q.scale, q.zero_point, w.flatten(1)
    inside = (flat >= s * -z) & (flat <= s * (q.qmax - z))
    err = (q.weight().flatten(1) - flat).abs()
    assert inside.float().mean() > 0.8
    assert (err <= s / 2 * (1 + 1e-5))[inside].all()
    x = torch.randn(4, 3, 10, 10) * 3
    a = qlayers.ActQuantizer(n_bits)
    quant.init_activation_quantizers(nn.Sequential(a, nn.Identity(), nn.Conv2d(3, 3, 1)), [x], 2)
    inside = (x >= a.scale * -a.zero_point) & (x <= a.scale * (2**n_bits - 1 - a.zero_point))
    assert a.enabled and ((a(x) - x).abs() <= a.scale / 2 * (1 + 1e-5))[inside].all()


def test_range_search_in_blocks_equals_the_plain_search():
    """search_range's in-place blocked loop gives the plain formula's choice exactly: for each ratio, the whole
    tensor's |q(x) - x|^2.4 summed per row, the least error's range kept."""
    x = torch.randn(40, 300) * torch.rand(40, 1) + 0.1 * torch.randn(40, 1)
    qmax, lo, hi = 15, x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    errors, ranges = [], []
    for r in qlayers.RATIOS:
        s = ((hi - lo) * r / qmax).clamp(min=1e-8)
        z = torch.round(-lo * r / s)
        errors.append(((torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s - x).abs().pow(2.4).sum(1))
        ranges.append((s[:, 0], z[:, 0]))
    pick = torch.stack(errors).argmin(0)                 # first of equal minima, as the strict < keeps
    want_s = torch.stack([ranges[k][0][i] for i, k in enumerate(pick.tolist())])
    want_z = torch.stack([ranges[k][1][i] for i, k in enumerate(pick.tolist())])
    for block in (1, 900, 2**17):                        # one row, three rows, all rows per block
        s, z = qlayers.search_range(x, 4, block=block)
        assert torch.equal(s[:, 0], want_s) and torch.equal(z[:, 0], want_z)


def test_soft_rounding_equals_the_fraction_at_init():
    """AdaRound starts where the float weight is: h(alpha) = frac(w / scale), so the soft weight equals w in range."""
    w = torch.randn(6, 20)
    q = qlayers.WeightQuantizer(w.shape, 4)
    q.init_rtn(w)
    q.start_adaround(w)
    v = w / q.scale
    torch.testing.assert_close(q.soft_rounding(), v - v.floor(), atol=1e-5, rtol=0)
    inside = (w >= q.scale * -q.zero_point) & (w <= q.scale * (q.qmax - q.zero_point))
    torch.testing.assert_close(q.weight()[inside], w[inside], atol=1e-5, rtol=0)


def test_hard_codes_stay_in_range_and_alpha_is_gone():
    """After hardening, codes are floor(w / scale) + [alpha >= 0] + zero_point clamped to [0, 2^b - 1]; alpha and
    w_floor are None again and the state dict holds exactly what a fresh quantizer holds."""
    w = torch.randn(6, 9, 3, 3) * 2
    q = qlayers.WeightQuantizer(w.shape, 4)
    q.init_rtn(w)
    q.start_adaround(w * 1.5)                                    # pushes some codes past the range
    with torch.no_grad():
        q.alpha.copy_(torch.randn_like(q.alpha) * 3)
    want = torch.clamp(q.w_floor + (q.alpha >= 0).float() + q.zero_point, 0, 15)
    q.harden()
    codes = q.codes()
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and (want == 15).any() and (want == 0).any()
    assert torch.equal(codes.float(), want)
    assert q.alpha is None and q.w_floor is None and not list(q.parameters())[1:]   # only scale is left
    assert q.state_dict().keys() == qlayers.WeightQuantizer(w.shape, 4).state_dict().keys()


def test_split_layer_equals_unsplit_math():
    """A split conv whose two input slices use the same quantizer values (weights and activations) computes what the
    unsplit conv computes, in the inference path and in the training path."""
    conv = nn.Conv2d(10, 6, 3, padding=1)
    x = torch.randn(2, 10, 5, 5)
    whole, split = qlayers.QuantConv2d.from_float(conv, 4, 8), qlayers.QuantConv2d.from_float(conv, 4, 8, split=4)
    codes = whole.weight_quantizer.codes().view(6, 10, 9)
    for q, c in zip(split.weight_quantizers(), (codes[:, :4], codes[:, 4:])):
        q.w_int.copy_(qlayers.pack(c.flatten(1), 4))
        q.scale.data.copy_(whole.weight_quantizer.scale)
        q.zero_point.copy_(whole.weight_quantizer.zero_point)
    quant.init_activation_quantizers(whole, [x], 2)
    for a in (split.act_quantizer, split.act_quantizer_skip):
        a.load_state_dict(whole.act_quantizer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(split(x), whole(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(split(x.requires_grad_()), whole(x), atol=1e-5, rtol=0)


def test_quantize_swaps_every_layer_and_matches_the_skeleton(w4a8):
    """No float Conv2d/Linear is left, every attention quantizes q, k, v and probabilities, and the skeleton built from
    the config alone (no forward) has the same keys, shapes and dtypes; split layers are the concat_splits ones."""
    qunet = w4a8.unet
    assert not [n for n, m in qunet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert not [n for n, m in qunet.named_modules() if type(m) is unet_lib.CrossAttention]
    assert {n for n, m in qunet.named_modules() if getattr(m, "split", None)} == set(unet_lib.concat_splits(CFG))
    assert {"time_embed.0", "input_blocks.0.0", "out.2"} <= {n for n, m in qunet.named_modules()
                                                             if isinstance(m, qlayers.QuantLayer)}
    got, want = qunet.state_dict(), qlayers.quant_skeleton(CFG, 4, 8, 16).state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in got)
    assert all(v.dtype == torch.uint8 for k, v in got.items() if k.endswith("w_int"))


def test_inference_path_equals_the_dequantized_weight():
    """The fast path (scratch buffer, bit ops) writes exactly scale * (codes - zero_point), odd lengths included, and
    times in_scale once a layer has per-input-channel scales (each part of a split layer its own)."""
    for layer in (qlayers.QuantLinear.from_float(nn.Linear(7, 5), 4, 32),
                  qlayers.QuantConv2d.from_float(nn.Conv2d(6, 4, 3), 4, 32, split=2),
                  qlayers.QuantConv2d.from_float(nn.Conv2d(6, 4, 1), 8, 32)):
        for multi in (False, True):
            if multi:
                qlayers.add_in_scales(layer)
                for q in layer.weight_quantizers():
                    assert q.in_scale.shape == (1, q.shape[1]) + (1,) * (len(q.shape) - 2)
                    q.in_scale.data.uniform_(0.5, 1.5)
            want = torch.cat([q.weight() for q in layer.weight_quantizers()], dim=1)
            assert torch.equal(layer.fast_weight(), want)


# --------------------------------------------------------------------------------------------------------------------
# the autograd Function


@pytest.mark.parametrize("multi", [False, True], ids=["scale", "in_scale"])
@pytest.mark.parametrize("kind", ["conv", "conv_stride2", "linear"])
def test_function_gradients_match_autograd(kind, multi):
    """QuantWeightFn's grads for x, scale, bias and (multi-channel) in_scale pass gradcheck in float64 and equal
    autograd's through the plain dequantize-then-conv path; it saves the codes, never a float weight."""
    shape, conv, x = {"conv": ((3, 2, 3, 3), ((1, 1), (1, 1)), (2, 2, 5, 5)),
                      "conv_stride2": ((3, 2, 3, 3), ((2, 2), (0, 0)), (2, 2, 6, 6)),
                      "linear": ((4, 5), None, (2, 3, 5))}[kind]
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (shape[0], torch.Size(shape[1:]).numel()), generator=g, dtype=torch.uint8)
    w_int, zp = qlayers.pack(codes, 4), torch.randint(0, 16, (shape[0], 1), generator=g).double()
    x = torch.randn(x, generator=g, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(shape[0], 1, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    bias = torch.randn(shape[0], generator=g, dtype=torch.float64, requires_grad=True)
    in_shape = (1, shape[1]) + (1,) * (len(shape) - 2)
    in_scale = (torch.rand(in_shape, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    args = (x, scale, bias, in_scale) if multi else (x, scale, bias)
    fn = lambda x, scale, bias, in_scale=None: qlayers.QuantWeightFn.apply(x, w_int, scale, zp, in_scale, bias, 4,
                                                                          shape, conv)
    assert torch.autograd.gradcheck(fn, args)
    out = fn(*args)
    assert not [t for t in out.grad_fn.saved_tensors
                if t is not None and t.is_floating_point() and t.numel() == codes.numel()]
    w = (scale * (codes.double() - zp)).view(shape) * (in_scale if multi else 1)
    ref = F.linear(x, w, bias) if conv is None else F.conv2d(x, w, bias, *conv)
    gout = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, args, gout), torch.autograd.grad(ref, args, gout))


def test_layer_trains_only_scale_through_the_function():
    """With scale requiring grad (PEQA), the layer's forward goes through QuantWeightFn, matches the inference output,
    and gives scale a gradient while the codes stay uint8 buffers."""
    layer = qlayers.QuantConv2d.from_float(nn.Conv2d(4, 3, 3, padding=1), 4, 32)
    layer.bias.requires_grad_(False)
    x = torch.randn(2, 4, 6, 6)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "QuantWeightFnBackward"
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x), atol=1e-6, rtol=0)
    out.square().sum().backward()
    assert layer.weight_quantizer.scale.grad.abs().sum() > 0 and layer.weight_quantizer.w_int.grad is None


# --------------------------------------------------------------------------------------------------------------------
# reconstruction


def test_reconstruction_beats_round_to_nearest(tiny_sd, calib):
    """AdaRound + BRECQ lowers a ResBlock's output MSE against the FP block's output (each model feeding the block
    from its own quantized layers, as reconstruction sees it) and the whole UNet's eps MSE, compared with RTN."""
    fp = tiny_sd.unet
    rtn = quant.quantize_(copy.deepcopy(fp), 4)
    ada = quant.reconstruct(copy.deepcopy(rtn), fp, calib, iters=40, act_iters=0, batch_size=8, lr=3e-2)
    data, block = [calib["x"], calib["t"], calib["ctx"]], "middle_block.0"
    y = quant.capture(fp, [block], data, 8)[block][0]
    err, eps = {}, {}
    with torch.no_grad():
        for name, m in (("rtn", rtn), ("ada", ada)):
            err[name] = quant.recon_loss(m.get_submodule(block)(*quant.capture(m, [block], data, 8, True)[block]), y)
            eps[name] = (m(*data) - fp(*data)).square().mean()
    assert err["ada"] < 0.7 * err["rtn"] and eps["ada"] < 0.7 * eps["rtn"]
    assert not [n for n, _ in ada.named_parameters() if "alpha" in n]


def test_carried_inputs_equal_a_whole_forward(tiny_sd, calib):
    """Reconstruction's inputs from a Carry (one top-level module's forward per unit) are bit-identical to those of a
    whole forward per unit, and so is the model it makes, W4A8 with 7-row batches over 4 x 4 x 2 rows."""
    fp = tiny_sd.unet
    rtn = quant.quantize_(copy.deepcopy(fp), 4, 8)
    data = [calib["x"], calib["t"], calib["ctx"]]
    carry = quant.Carry(rtn, data, 7)
    for name, _ in quant.recon_units(rtn):
        got, want = carry.at(name), quant.capture(rtn, [name], data, 7, inputs=True)[name]
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), name
    made = {budget: quant.reconstruct(copy.deepcopy(rtn), fp, calib, iters=4, act_iters=2, batch_size=7,
                                      carry_budget=budget).state_dict() for budget in (0, 2**32)}
    assert made[0].keys() == made[2**32].keys()
    assert all(torch.equal(made[0][k], made[2**32][k]) for k in made[0])


# --------------------------------------------------------------------------------------------------------------------
# files and the command line


def test_save_load_is_bit_identical(w4a8, calib, tmp_path):
    """A W4A8 file loads (through ckpt.load_sd, into a skeleton, with no forward first) to the same state dict and the
    same outputs bit for bit; the state dict loads strictly into quant_skeleton too."""
    path = tmp_path / "q.safetensors"
    ckpt.save_quantized(w4a8, path, {"method": "rtn"})
    loaded = ckpt.load_sd(path)
    assert isinstance(loaded.unet.get_submodule("out.2"), qlayers.QuantConv2d)
    skeleton = qlayers.quant_skeleton(CFG, 4, 8, 16)
    skeleton.load_state_dict(w4a8.unet.state_dict())
    x, t, ctx = calib["x"][:4], calib["t"][:4], calib["ctx"][:4]
    with torch.no_grad():
        want = w4a8.unet(x, t, ctx)
        assert torch.equal(loaded.unet(x, t, ctx), want) and torch.equal(skeleton(x, t, ctx), want)
    for k, v in w4a8.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v), k


def test_in_scales_save_and_load(w4a8, calib, tmp_path):
    """Per-input-channel scales are written only when a model has them, and a file with them loads (the skeleton grows
    them from the file's keys) to the same tensors and outputs."""
    assert not [k for k in w4a8.unet.state_dict() if "in_scale" in k]
    unet = qlayers.add_in_scales(copy.deepcopy(w4a8.unet))
    for m in unet.modules():
        if isinstance(m, qlayers.WeightQuantizer):
            m.in_scale.data.uniform_(0.5, 1.5)
    path = tmp_path / "q.safetensors"
    ckpt.save_quantized(ckpt.StableDiffusion(unet, w4a8.vae, w4a8.text_encoder, w4a8.tokenizer), path)
    loaded = ckpt.load_sd(path).unet
    want, got = unet.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    x, t, ctx = calib["x"][:2], calib["t"][:2], calib["ctx"][:2]
    with torch.no_grad():
        out = unet(x, t, ctx)
        assert torch.equal(loaded(x, t, ctx), out) and not torch.equal(w4a8.unet(x, t, ctx), out)


def test_load_errors_are_one_line(w4a8, tmp_path):
    """A truncated file, a missing tensor (named), a zero point out of range and float codes each give a one-line
    CheckpointError; so do flipped bits in the integer codes, which only the stored checksum can tell. The edits
    but the last drop the checksum, as a file edited by another tool would, to reach the checks behind it."""
    path = tmp_path / "q.safetensors"
    ckpt.save_quantized(w4a8, path)
    data, meta = path.read_bytes(), safe_open(str(path), "pt").metadata()
    cases = {"truncated": data[:len(data) // 2]}
    tensors, key = load_file(path), "model.diffusion_model.out.2.weight_quantizer.w_int"
    unsummed = {k: v for k, v in meta.items() if k != "qdp.unet_sha256"}
    for name, edit in [("missing", lambda d: d.pop(key)),
                       ("zero_point", lambda d: d["model.diffusion_model.out.2.weight_quantizer.zero_point"].fill_(16)),
                       ("dtype", lambda d: d.__setitem__(key, d[key].float())),
                       ("bitflip", lambda d: d[key].view(-1)[:8].bitwise_xor_(0x11))]:
        broken = {k: v.clone() for k, v in tensors.items()}
        edit(broken)
        save_file(broken, str(tmp_path / "b.safetensors"), metadata=meta if name == "bitflip" else unsummed)
        cases[name] = (tmp_path / "b.safetensors").read_bytes()
    for name, blob in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.load_quantized(tmp_path / f"{name}.safetensors")
        message = str(e.value)
        assert "\n" not in message
        assert {"truncated": "truncated", "missing": key[len("model.diffusion_model."):],
                "zero_point": "[0, 15]", "dtype": "wrong shape or dtype", "bitflip": "checksum"}[name] in message


@pytest.mark.parametrize("flags,message", [
    (["--iters", "-1"], "--iters must be at least 0"),
    (["--method", "rtn", "--iters", "5"], "only apply to --method adaround"),
    (["--calib_prompts", "missing.txt"], "no such file"),
    (["--out", "q.pt"], "must end in .safetensors"),
    (["--softmax_bits", "32"], "--softmax_bits must be in"),
])
def test_cli_rejects_bad_flags(flags, message, capsys):
    """A bad flag stops the CLI before anything loads, with a one-line message that says what to fix."""
    with pytest.raises(SystemExit) as e:
        quant.main(["--ckpt", "missing.safetensors", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_end_to_end_and_sample(tiny_file, tmp_path, capsys):
    """quant.py runs on a tiny model (fast preset, a few iterations, W4A8), its file is much smaller than FP32 and
    records its settings, and sample.py draws from it."""
    out = tmp_path / "q.safetensors"
    quant.main(["--ckpt", str(tiny_file), "--preset", "fast", "--n_prompts", "2", "--num_inference_steps", "4",
                "--iters", "4", "--act_iters", "2", "--batch_size", "4", "--device", "cpu", "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        info = json.loads(f.metadata()["qdp.quant"])
        unet_bytes = sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith("model.diffusion_model."))
    fp_bytes = sum(p.numel() for p in unet_lib.UNet(CFG).parameters()) * 4
    assert unet_bytes < 0.2 * fp_bytes
    assert info["wbits"] == 4 and info["abits"] == 8 and info["iters"] == 4 and len(info["base_sha256"]) == 64
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__   # its float order
    image = tmp_path / "cat.png"
    sample.main(["--ckpt", str(out), "--prompt", "a cat", "--num_inference_steps", "2", "--device", "cpu",
                 "--out", str(image)])
    assert Image.open(image).size == (64, 64)


def test_mixed_precision_quantizes_as_float32_does(tiny_file, tmp_path):
    """--mixed_precision bf16 (it runs on a CPU too): the same file format, every stored tensor in the float32 run's
    dtype (codes uint8, scales and steps float32), and a model whose eps error against the FP model is within 10% of
    the float32-calibrated one's."""
    runs = {}
    for precision in ("no", "bf16"):
        out = tmp_path / f"{precision}.safetensors"
        quant.quantize(ckpt=str(tiny_file), preset="fast", n_prompts=2, num_inference_steps=4, iters=30, act_iters=10,
                       batch_size=4, device="cpu", mixed_precision=precision, out=str(out))
        runs[precision] = out
    a, b = load_file(runs["no"]), load_file(runs["bf16"])
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)
    with safe_open(str(runs["bf16"]), "pt") as f:
        assert json.loads(f.metadata()["qdp.quant"])["mixed_precision"] == "bf16"
    fp = ckpt.load_sd(tiny_file).unet
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)
    ctx = torch.randn(8, 77, 32, generator=g)
    with torch.no_grad():
        err = {p: (ckpt.load_sd(f).unet(x, t, ctx) - fp(x, t, ctx)).square().mean().item() for p, f in runs.items()}
    assert err["bf16"] < 1.1 * err["no"], err
