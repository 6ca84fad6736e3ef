"""Tests for vae.py: parity with diffusers' AutoencoderKL, the key map, config inference and shapes."""
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from vae import AutoencoderKL, VAEConfig, diffusers_config, diffusers_key_map, sd_v1, tiny


def odd():
    """Three levels with a width (144) that 32 does not divide, so from_state_dict has to fall back to 16 groups."""
    return VAEConfig(in_channels=1, ch=48, ch_mult=(1, 2, 3), num_res_blocks=2, z_channels=3, norm_groups=16)


def randomized_diffusers_vae(cfg):
    """A diffusers AutoencoderKL with every tensor (weights, biases, norm affines) drawn at random, so a swapped,
    missing or zero-initialised tensor shows up as a difference. With std 0.05 the GroupNorm inputs have a small
    variance, so a norm eps of 1e-5 instead of 1e-6 moves the outputs by several times the tolerance. The attention
    norm and q/k get larger weights: with logits near zero, softmax is a plain average whatever its scale."""
    ref = DiffusersAutoencoderKL(**diffusers_config(cfg)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "attentions.0.group_norm.weight" in name:
                p.normal_(0.0, 1.0)
            elif "attentions.0.to_q." in name or "attentions.0.to_k." in name:
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.05)
    return ref


def load_from_diffusers(cfg, ref):
    """Our AutoencoderKL with the diffusers weights, loaded strictly through diffusers_key_map."""
    model = AutoencoderKL(cfg).eval()
    theirs, shapes = ref.state_dict(), {k: v.shape for k, v in model.state_dict().items()}
    # diffusers keeps the mid-attention projections as Linear (C,C); ours are 1x1 convs (C,C,1,1)
    sd = {ours: theirs[name].reshape(shapes[ours]) for ours, name in diffusers_key_map(cfg).items()}
    model.load_state_dict(sd, strict=True)
    return model


def assert_matches(ours, ref):
    """Max abs diff <= 1e-4 times the reference's largest magnitude (below 1 here, so also <= 1e-4 absolute)."""
    assert ref.abs().max() > 1e-3  # not a comparison of two near-zero tensors
    torch.testing.assert_close(ours, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("hw", [(32, 32), (32, 48)])
def test_parity_with_diffusers(hw):
    """From the same random weights, encode (posterior mean and clamped logvar), sampling with the same generator,
    and decode all match diffusers' AutoencoderKL to 1e-4 of their scale in fp32, on square and non-square images."""
    cfg = tiny()
    ref = randomized_diffusers_vae(cfg)
    model = load_from_diffusers(cfg, ref)
    x = torch.rand(2, cfg.in_channels, *hw) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        mean, logvar = model.encode(x)
        assert_matches(mean, posterior.mean)
        assert_matches(logvar, posterior.logvar)
        latents = model.encode_latents(x, generator=torch.Generator().manual_seed(1))
        expected = posterior.sample(generator=torch.Generator().manual_seed(1)) * ref.config.scaling_factor
        assert_matches(latents, expected)
        z = torch.randn_like(mean)
        out = model.decode(z)
        assert_matches(out, ref.decode(z).sample)
    assert out.shape == x.shape


@pytest.mark.parametrize("preset", [tiny, sd_v1, odd])
def test_key_map_is_a_bijection(preset):
    """diffusers_key_map pairs every key of our state dict with a distinct key of diffusers' AutoencoderKL built from
    diffusers_config, covering both key sets exactly, with the same number of elements on each side."""
    cfg = preset()
    with torch.device("meta"):
        ours = AutoencoderKL(cfg).state_dict()
        theirs = DiffusersAutoencoderKL(**diffusers_config(cfg)).state_dict()
    key_map = diffusers_key_map(cfg)
    assert set(key_map) == set(ours)
    assert sorted(key_map.values()) == sorted(theirs)
    assert all(ours[k].numel() == theirs[v].numel() for k, v in key_map.items())


@pytest.mark.parametrize("preset", [tiny, sd_v1, odd])
def test_config_from_state_dict(preset):
    """VAEConfig.from_state_dict recovers the config a model was built with (scale_factor is not in the weights)."""
    cfg = preset()
    with torch.device("meta"):
        sd = AutoencoderKL(cfg).state_dict()
    assert VAEConfig.from_state_dict(sd) == cfg


def test_shapes_and_latent_scaling():
    """A 4-level config downsamples 64x64 by 8 to (B,4,8,8); encode_latents(sample=False) is scale_factor * mean;
    the same generator gives the same sample; decode_latents undoes the scale and returns the image shape."""
    cfg = VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8)
    model = AutoencoderKL(cfg).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.encode(x)
        assert mean.shape == logvar.shape == (2, 4, 8, 8)
        latents = model.encode_latents(x, sample=False)
        torch.testing.assert_close(latents, cfg.scale_factor * mean)
        a = model.encode_latents(x, generator=torch.Generator().manual_seed(0))
        b = model.encode_latents(x, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and not torch.equal(a, latents)
        out = model.decode_latents(latents)
        assert out.shape == x.shape
        torch.testing.assert_close(out, model.decode(mean))


def test_diffusers_config_rejects_what_diffusers_cannot_build():
    """diffusers' encoder feeds conv_in (width ch * ch_mult[0]) straight into level 0, so ch_mult[0] != 1 is refused."""
    with pytest.raises(ValueError, match="ch_mult"):
        diffusers_config(VAEConfig(ch_mult=(2, 4)))
