"""The hand-written UNet against diffusers.UNet2DConditionModel, and the facts its loader relies on."""
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel

import unet as unet_lib
from unet import UNet, UNetConfig
from refs import diffusers_unet

CONFIGS = {
    "tiny": unet_lib.tiny(),
    "sd_like": UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                          num_heads=4, context_dim=24, norm_groups=8),
    "deep_attn_low": UNetConfig(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                                num_heads=2, transformer_depth=2, context_dim=24, norm_groups=8),
}


def ours_from(ref, cfg):
    sd = ref.state_dict()
    model = UNet(cfg).eval()
    model.load_state_dict({k: sd[v] for k, v in unet_lib.diffusers_key_map(cfg).items()}, strict=True)
    return model


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("size", [(16, 16), (16, 24), (13, 9)])
def test_forward_matches_diffusers(name, size):
    """Same weights, same inputs: eps agrees with diffusers to 1e-4 (odd latent sizes included)."""
    cfg = CONFIGS[name]
    ref = diffusers_unet(cfg)
    ours = ours_from(ref, cfg)
    x = torch.randn(2, cfg.in_channels, *size)
    t, ctx = torch.tensor([3, 977]), torch.randn(2, 7, cfg.context_dim)
    with torch.no_grad():
        got, want = ours(x, t, ctx), ref(x, t, ctx).sample
    assert want.abs().max() > 0.1  # a real signal, not a degenerate net
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_scalar_timestep_broadcasts():
    """A scalar t means the same timestep for every sample in the batch."""
    cfg = unet_lib.tiny()
    model = UNet(cfg).eval()
    x, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 5, cfg.context_dim)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 250, ctx), model(x, torch.full((3,), 250), ctx))


@pytest.mark.parametrize("name", ["sd_v1", "tiny"])
def test_key_map_is_a_bijection_onto_diffusers(name):
    """Every one of our tensors has exactly one diffusers name, and every diffusers tensor is named once."""
    cfg = unet_lib.PRESETS[name]()
    with torch.device("meta"):
        theirs = set(UNet2DConditionModel(**unet_lib.diffusers_config(cfg)).state_dict())
        ours = set(UNet(cfg).state_dict())
    m = unet_lib.diffusers_key_map(cfg)
    assert set(m) == ours
    assert len(set(m.values())) == len(m) and set(m.values()) == theirs


def test_sd_v1_parameter_count():
    """The sd_v1 preset is the 859,520,964-parameter SD v1 UNet."""
    with torch.device("meta"):
        model = UNet(unet_lib.sd_v1())
    assert sum(p.numel() for p in model.parameters()) == 859_520_964


@pytest.mark.parametrize("cfg", [unet_lib.sd_v1(), *CONFIGS.values()])
def test_config_is_read_back_from_shapes(cfg):
    """from_state_dict recovers every field the shapes determine (heads and groups are not in the shapes)."""
    with torch.device("meta"):
        sd = UNet(cfg).state_dict()
    got = UNetConfig.from_state_dict(sd)
    assert replace(got, num_heads=cfg.num_heads, norm_groups=cfg.norm_groups) == cfg
    assert cfg.model_channels % got.norm_groups == 0


def test_concat_splits_are_the_channels_of_h():
    """For each decoder layer fed [h, skip], the recorded split is h's channel count at run time."""
    cfg = CONFIGS["sd_like"]
    model = UNet(cfg).eval()
    splits, seen = unet_lib.concat_splits(cfg), {}
    prev = [model.middle_block] + list(model.output_blocks[:-1])
    hooks = [p.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape[1])) for n, p in enumerate(prev)]
    with torch.no_grad():
        model(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 3, cfg.context_dim))
    for h in hooks:
        h.remove()
    assert len(splits) == 2 * len(model.output_blocks) - sum(
        isinstance(b[0].skip_connection, torch.nn.Identity) for b in model.output_blocks)
    for i, block in enumerate(model.output_blocks):
        assert splits[f"output_blocks.{i}.0.in_layers.2"] == seen[i]
        assert block[0].in_layers[2].in_channels > seen[i]
