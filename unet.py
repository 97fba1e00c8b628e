"""The Stable Diffusion v1 networks and their weights.

Everything a latent diffusion model needs besides the training loop:

- `UNet`: the noise predictor ε_θ(x_t, t, c) of SD v1 (down/mid/up blocks of ResNet blocks and
  cross-attention transformer blocks).
- `Conv2d`: nn.Conv2d with a faster path on a CPU for wide, small feature maps (one matmul over unfolded patches).
- `VAE`: the KL autoencoder that maps 8× (SD v1) or 4× (the toy model) downsampled latents to images.
- the noise schedule: x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε (DDPM eq. 4), with SD v1's scaled-linear β.
- `load_model`: a diffusers folder or a single-file LDM checkpoint, read offline, strictly.

Modules are named exactly as diffusers names them (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`),
so diffusers weight files load with no renaming and a LoRA key is just a module path. Original LDM checkpoints
are renamed through one rule table (`ldm_names`), which also runs backwards in the tests.
"""
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file

# ----------------------------------------------------------------------------------------------------------------
# configs (diffusers field names)

SD_V1_UNET = dict(
    in_channels=4, out_channels=4, sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5)
SD_V1_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD_V1_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu")
SD_V1_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1)

PRESETS = {
    "sd-v1": dict(unet=SD_V1_UNET, vae=SD_V1_VAE, text_encoder=SD_V1_TEXT, scheduler=SD_V1_SCHEDULER),
    # small enough for tests: same block types, two resolutions
    "tiny": dict(
        unet=dict(SD_V1_UNET, sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, norm_num_groups=8),
        vae=dict(SD_V1_VAE, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, sample_size=16),
        text_encoder=dict(SD_V1_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4),
        scheduler=SD_V1_SCHEDULER),
}

# ----------------------------------------------------------------------------------------------------------------
# building blocks shared by the UNet and the VAE


def conv2d_im2col(conv, x):
    """conv(x) as one matrix multiply: (Cout, Cin·k·k) weights times the unfolded k×k patches of every image."""
    b, _, h, w = x.shape
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)  # (B, Cin·k·k, L)
    cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (Cin·k·k, B·L): all images in a single matmul
    y = torch.addmm(conv.bias[:, None], conv.weight.flatten(1), cols)
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return y.view(-1, b, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1).transpose(0, 1).contiguous()


class Conv2d(nn.Conv2d):
    """nn.Conv2d, but on a CPU a wide convolution over a small feature map (SD's 8×8 and 4×4 levels) runs through
    `conv2d_im2col`: there oneDNN's direct convolution, PyTorch's CPU default, is 1.2-4.6× slower, forward and
    backward. Same weights, same result up to rounding. `python bench/speed.py --only conv` times both paths on
    every shape the UNet runs; the cut-offs below come from it (one AVX-512 core, torch 2.13)."""

    def uses_im2col(self, x):
        return x.device.type == "cpu" and self.in_channels >= 512 and x.shape[-2] * x.shape[-1] <= 64

    def forward(self, x):
        return conv2d_im2col(self, x) if self.uses_im2col(x) else super().forward(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → conv, twice, with the timestep embedding added in between (UNet only)."""

    def __init__(self, cin, cout, groups, eps, temb_dim=None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    def __init__(self, c, asymmetric_pad=False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad  # the VAE pads (0,1,0,1) then convolves without padding
        self.conv = Conv2d(c, c, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric_pad else x)


class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v projections, so each can carry its own LoRA."""

    def __init__(self, dim, heads, context_dim=None, bias=False):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x, context=None):
        b, n, c = x.shape
        plain = all(type(p) is nn.Linear and p.bias is None for p in (self.to_q, self.to_k, self.to_v))
        if context is None and plain:
            # self-attention: one matmul with the stacked weights is cheaper, forward and backward, than three
            w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            q, k, v = F.linear(x, w).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        else:
            context = x if context is None else context
            q, k, v = (p(y).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
                       for p, y in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text (attn2), feed-forward; each pre-normed and residual."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.attn2 = Attention(dim, heads, context_dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Image features → tokens → one transformer block → image features (SD v1: 1×1 conv projections)."""

    def __init__(self, c, heads, context_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.proj_in = nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(c, heads, context_dim)])
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        y = self.transformer_blocks[0](y, context)
        return x + self.proj_out(y.reshape(b, h, w, c).permute(0, 3, 1, 2))


def timestep_embedding(t, dim):
    """Sinusoidal embedding of a per-sample timestep vector, ordered [cos, sin] as in SD."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# the UNet


class Block(nn.Module):
    """One down or up block of the UNet: ResNet blocks, each optionally followed by a transformer, then a resampler.

    Up blocks take one skip connection per ResNet block, so `skip_channels` lists their widths and `skips` holds
    those tensors (the last one is concatenated first).
    """

    def __init__(self, cin, cout, n, temb_dim, cfg, heads, cross_attn, resample=None, skip_channels=None):
        super().__init__()
        groups, eps = cfg["norm_num_groups"], cfg.get("norm_eps", 1e-5)
        skips = skip_channels or [0] * n
        self.resnets = nn.ModuleList(
            [ResnetBlock2D((cin if i == 0 else cout) + skips[i], cout, groups, eps, temb_dim) for i in range(n)])
        if cross_attn:
            self.attentions = nn.ModuleList(
                [Transformer2DModel(cout, heads, cfg["cross_attention_dim"], groups) for _ in range(n)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(cout)])
        if resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])

    def forward(self, x, temb, context, skips=None):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips[-1 - i]], dim=1)
            x = resnet(x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context)
            outputs.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            outputs.append(x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x, outputs


class MidBlock(nn.Module):
    """ResNet → transformer → ResNet at the lowest resolution (also the VAE's, with plain attention)."""

    def __init__(self, c, groups, eps, temb_dim=None, heads=None, context_dim=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, groups, eps, temb_dim) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(c, heads, context_dim, groups) if context_dim else VAEAttention(c, groups)])

    def forward(self, x, temb=None, context=None):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context) if context is not None else self.attentions[0](x)
        return self.resnets[1](x, temb)


class UNet(nn.Module):
    """ε_θ(x_t, t, c) of SD v1. `cfg` holds diffusers' `UNet2DConditionModel` config fields."""

    def __init__(self, cfg):
        super().__init__()
        self.config = dict(cfg)
        ch = list(cfg["block_out_channels"])
        n_levels, lpb = len(ch), cfg["layers_per_block"]
        heads = cfg["attention_head_dim"]  # SD v1 configs store the number of heads under this name
        heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n_levels
        temb_dim = ch[0] * 4
        self.conv_in = Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(ch[0], temb_dim)
        self.time_embedding.linear_2 = nn.Linear(temb_dim, temb_dim)

        self.down_blocks = nn.ModuleList()
        skip_channels = [ch[0]]
        for i, kind in enumerate(cfg["down_block_types"]):
            last = i == n_levels - 1
            self.down_blocks.append(Block(ch[max(i - 1, 0)], ch[i], lpb, temb_dim, cfg, heads[i],
                                          kind.startswith("CrossAttn"), None if last else "down"))
            skip_channels += [ch[i]] * (lpb + (0 if last else 1))

        self.mid_block = MidBlock(ch[-1], cfg["norm_num_groups"], cfg.get("norm_eps", 1e-5), temb_dim, heads[-1],
                                  cfg["cross_attention_dim"])

        self.up_blocks = nn.ModuleList()
        rch, rheads = ch[::-1], heads[::-1]
        for i, kind in enumerate(cfg["up_block_types"]):
            skips = [skip_channels.pop() for _ in range(lpb + 1)]
            self.up_blocks.append(Block(rch[max(i - 1, 0)], rch[i], lpb + 1, temb_dim, cfg, rheads[i],
                                        kind.startswith("CrossAttn"), None if i == n_levels - 1 else "up", skips))

        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], ch[0], eps=cfg.get("norm_eps", 1e-5))
        self.conv_out = Conv2d(ch[0], cfg["out_channels"], 3, padding=1)
        # gradient checkpointing: keep only each block's inputs and recompute its activations in the backward pass
        # (far less memory, about one more forward pass of time); only when gradients are being recorded
        self.gradient_checkpointing = False

    def forward(self, x, t, context):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = timestep_embedding(t, self.conv_in.out_channels).to(x.dtype)
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(temb)))
        run = checkpointed if self.gradient_checkpointing and torch.is_grad_enabled() else lambda f, *a: f(*a)
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = run(block, x, temb, context)
            skips += outputs
        x = run(self.mid_block, x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            x, _ = run(block, x, temb, context, skips[-n:])
            del skips[-n:]
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def checkpointed(module, *args):
    """module(*args), keeping only the inputs: the backward pass runs the module again for its activations."""
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)


# ----------------------------------------------------------------------------------------------------------------
# the VAE


class VAEAttention(nn.Module):
    """Single-head self-attention over pixels in the VAE's middle block (diffusers' names, biases on q/k/v)."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        q, k, v = self.to_q(y)[:, None], self.to_k(y)[:, None], self.to_v(y)[:, None]
        y = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class Coder(nn.Module):
    """The VAE's encoder (down) or decoder (up): conv_in, resolution blocks, mid block, norm, conv_out."""

    def __init__(self, cfg, cin, cout, direction):
        super().__init__()
        ch, lpb, groups = list(cfg["block_out_channels"]), cfg["layers_per_block"], cfg["norm_num_groups"]
        if direction == "up":
            ch = ch[::-1]
        self.conv_in = Conv2d(cin, ch[0], 3, padding=1)
        blocks = nn.ModuleList()
        for i in range(len(ch)):
            block = nn.Module()
            n = lpb if direction == "down" else lpb + 1
            block.resnets = nn.ModuleList(
                [ResnetBlock2D(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], groups, 1e-6) for j in range(n)])
            if i < len(ch) - 1 and direction == "down":
                block.downsamplers = nn.ModuleList([Downsample2D(ch[i], asymmetric_pad=True)])
            if i < len(ch) - 1 and direction == "up":
                block.upsamplers = nn.ModuleList([Upsample2D(ch[i])])
            blocks.append(block)
        self.mid_block = MidBlock(ch[-1] if direction == "down" else ch[0], groups, 1e-6)
        setattr(self, "down_blocks" if direction == "down" else "up_blocks", blocks)
        self.direction = direction
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = Conv2d(ch[-1], cout, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        if self.direction == "up":
            x = self.mid_block(x)
        for block in self.down_blocks if self.direction == "down" else self.up_blocks:
            for resnet in block.resnets:
                x = resnet(x)
            for resample in getattr(block, "downsamplers", []) or getattr(block, "upsamplers", []):
                x = resample(x)
        if self.direction == "down":
            x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """KL autoencoder. `encode` returns the diagonal Gaussian posterior (mean, std); `decode` maps latents back."""

    def __init__(self, cfg):
        super().__init__()
        self.config = dict(cfg)
        z = cfg["latent_channels"]
        self.encoder = Coder(cfg, cfg["in_channels"], 2 * z, "down")
        self.decoder = Coder(cfg, z, cfg["out_channels"], "up")
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def encode(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


# ----------------------------------------------------------------------------------------------------------------
# noise schedule


def alphas_cumprod_from_config(cfg):
    """ᾱ_t for t = 0..T−1 from a diffusers scheduler config (SD v1: scaled_linear, 0.00085 → 0.012, T = 1000)."""
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError("only epsilon-prediction models are supported, "
                         f"got prediction_type={cfg['prediction_type']!r}")
    n, b0, b1 = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
    kind = cfg.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r} (expected scaled_linear or linear)")
    return torch.cumprod(1.0 - betas, dim=0).float()


def add_noise(x0, noise, t, alphas_cumprod):
    """x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε with a per-sample timestep vector t."""
    a = alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# ----------------------------------------------------------------------------------------------------------------
# loading


class LoadError(ValueError):
    """A model or weight file that cannot be loaded as asked; the message names the problem."""


def _names(keys, limit=5):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_dict_strict(module, sd, what):
    """Copy `sd` into `module`, refusing missing, unexpected or mis-shaped keys (named in the error)."""
    own = module.state_dict()
    missing, unexpected = own.keys() - sd.keys(), sd.keys() - own.keys()
    misshaped = [f"{k} (expected {tuple(own[k].shape)}, got {tuple(sd[k].shape)})"
                 for k in own.keys() & sd.keys() if own[k].shape != sd[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_names(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped keys: {_names(misshaped, 3)}")
    if problems:
        raise LoadError(f"{what}: " + "; ".join(problems))
    module.load_state_dict(sd, strict=True)


def read_weights(path):
    """A flat name → tensor dict from .safetensors, or from a pickle checkpoint read with weights_only=True."""
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:
            raise LoadError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(f"{path}: refused to unpickle (only plain tensors are loaded; {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise LoadError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LoadError(f"{path}: {len(bad)} entries are not tensors: {_names(map(str, bad))}")
    return sd


# Original LDM names ↔ diffusers names. One table serves both directions: `ldm_names(cfg)` lists, for every
# diffusers key of a UNet/VAE with this config, the key an original SD v1 checkpoint uses.
RESNET_RULES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_RESNET_RULES = [("conv_shortcut", "nin_shortcut")]
VAE_ATTN_RULES = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def unet_ldm_map(cfg):
    """diffusers module prefix → LDM module prefix for the UNet (+ the sub-rules to apply inside it)."""
    lpb, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    m = {"time_embedding.linear_1": ("time_embed.0", []), "time_embedding.linear_2": ("time_embed.2", []),
         "conv_in": ("input_blocks.0.0", []), "conv_norm_out": ("out.0", []), "conv_out": ("out.2", []),
         "mid_block.resnets.0": ("middle_block.0", RESNET_RULES), "mid_block.attentions.0": ("middle_block.1", []),
         "mid_block.resnets.1": ("middle_block.2", RESNET_RULES)}
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(lpb):
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{1 + i * (lpb + 1) + j}.0", RESNET_RULES)
            m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{1 + i * (lpb + 1) + j}.1", [])
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * (lpb + 1)}.0.op", [])
    for i, kind in enumerate(cfg["up_block_types"]):
        for j in range(lpb + 1):
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{i * (lpb + 1) + j}.0", RESNET_RULES)
            m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{i * (lpb + 1) + j}.1", [])
        if i < n - 1:
            slot = 2 if kind.startswith("CrossAttn") else 1
            m[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.conv", [])
    return m


def vae_ldm_map(cfg):
    lpb, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    m = {"quant_conv": ("quant_conv", []), "post_quant_conv": ("post_quant_conv", [])}
    for part in ("encoder", "decoder"):
        m.update({f"{part}.conv_in": (f"{part}.conv_in", []), f"{part}.conv_out": (f"{part}.conv_out", []),
                  f"{part}.conv_norm_out": (f"{part}.norm_out", []),
                  f"{part}.mid_block.resnets.0": (f"{part}.mid.block_1", VAE_RESNET_RULES),
                  f"{part}.mid_block.resnets.1": (f"{part}.mid.block_2", VAE_RESNET_RULES),
                  f"{part}.mid_block.attentions.0": (f"{part}.mid.attn_1", VAE_ATTN_RULES)})
    for i in range(n):
        for j in range(lpb):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET_RULES)
        for j in range(lpb + 1):  # the decoder's LDM levels count from the lowest resolution
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", VAE_RESNET_RULES)
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", [])
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", [])
    return m


def ldm_names(keys, prefix_map, ldm_prefix):
    """diffusers key → original LDM key, for each key of a diffusers-named state dict."""
    out = {}
    for key in keys:
        module = max((p for p in prefix_map if key.startswith(p + ".")), key=len, default=None)
        if module is None:
            raise LoadError(f"no LDM name rule for {key}")
        ldm, rules = prefix_map[module]
        rest = key[len(module) + 1:]
        for ours, theirs in rules:
            if rest.startswith(ours + "."):
                rest = theirs + rest[len(ours):]
                break
        out[key] = f"{ldm_prefix}{ldm}.{rest}"
    return out


LEGACY_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def fix_vae_keys(sd):
    """Accept old diffusers VAE attention names (query/key/value/proj_attn) and LDM's 1×1-conv attention weights."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"attentions\.0\.(query|key|value|proj_attn)\.",
                   lambda m: f"attentions.0.{LEGACY_VAE_ATTN[m[1]]}.", k)
        if "mid_block.attentions.0.to_" in k and k.endswith(".weight") and v.dim() == 4:
            v = v[:, :, 0, 0]
        out[k] = v
    return out


def fix_text_keys(sd):
    """transformers ≥ 5 drops the `text_model.` prefix; position_ids is a buffer, not a weight."""
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}


def split_ldm_checkpoint(sd, cfg):
    """Cut an original SD v1 checkpoint into diffusers-named UNet, VAE and text-encoder state dicts."""
    parts = {}
    for name, prefix, make_map in (("unet", "model.diffusion_model.", unet_ldm_map),
                                   ("vae", "first_stage_model.", vae_ldm_map)):
        net = UNet(cfg["unet"]) if name == "unet" else VAE(cfg["vae"])
        ours_to_ldm = ldm_names(net.state_dict().keys(), make_map(cfg[name]), prefix)
        ldm_to_ours = {v: k for k, v in ours_to_ldm.items()}
        given = {k for k in sd if k.startswith(prefix)}
        unexpected = given - ldm_to_ours.keys()
        if unexpected:
            raise LoadError(f"{name}: {len(unexpected)} unexpected keys: {_names(unexpected)}")
        parts[name] = {ldm_to_ours[k]: sd[k] for k in given}
    text_prefix = "cond_stage_model.transformer."
    parts["text_encoder"] = {k[len(text_prefix):]: v for k, v in sd.items() if k.startswith(text_prefix)}
    parts["vae"] = fix_vae_keys(parts["vae"])
    return parts


# ----------------------------------------------------------------------------------------------------------------
# the whole model


@dataclass
class Model:
    unet: UNet
    vae: VAE
    text_encoder: nn.Module
    tokenizer: object
    alphas_cumprod: torch.Tensor
    scaling_factor: float
    scheduler_config: dict
    path: str
    fingerprint: str           # the base weights' identity, which a state records (`fingerprint`)

    @property
    def device(self):
        return self.unet.conv_in.weight.device

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    @property
    def resolution(self):
        """Image side in pixels: latent side × the VAE's downsampling factor."""
        return self.unet.config["sample_size"] * 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    def encode_text(self, prompts):
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0].to(self.dtype)

    def encode_images(self, x):
        return self.vae.encode(x.to(self.device, self.dtype))[0] * self.scaling_factor

    def decode_latents(self, z):
        return self.vae.decode(z / self.scaling_factor)


def read_config(path):
    """A JSON object from a model's config file; a missing, unreadable or malformed file is a LoadError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise LoadError(f"{path}: missing") from None
    except OSError as e:
        raise LoadError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # json.JSONDecodeError, or UnicodeDecodeError
        raise LoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LoadError(f"{path}: not a JSON object (holds a {type(cfg).__name__})")
    return cfg


CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json"}
WEIGHT_FILES = {"unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"],
                "vae": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"],
                "text_encoder": ["model.safetensors", "pytorch_model.bin"]}
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # the folders of a diffusers model


def _model_configs(path):
    """Configs from a diffusers folder, or a preset name."""
    if path in PRESETS:
        return PRESETS[path]
    return {part: read_config(os.path.join(path, part, name)) for part, name in CONFIG_FILES.items()}


def _weights_file(folder, names):
    for name in names:
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise LoadError(f"{folder}: no weights file (looked for {', '.join(names)})")


def check_folder(path, weights=True):
    """Check a diffusers folder before any weight is read: its five part folders, their configs (each a JSON
    object), its tokenizer's files and, with `weights`, a weights file for each network. Returns (configs, weight
    files); the first part missing or malformed is a LoadError naming it."""
    if not os.path.exists(os.path.join(path, "unet", "config.json")):
        raise LoadError(f"{path}: not a diffusers model folder (no unet/config.json)")
    for part in PARTS:
        if not os.path.isdir(os.path.join(path, part)):
            raise LoadError(f"{path}: no {part}/ folder (a diffusers model folder holds "
                            f"{', '.join(p + '/' for p in PARTS)})")
    cfg = _model_configs(path)
    check_tokenizer(os.path.join(path, "tokenizer"))
    if not weights:
        return cfg, {}
    return cfg, {part: _weights_file(os.path.join(path, part), names) for part, names in WEIGHT_FILES.items()}


def _build_text_encoder(cfg, sd):
    from transformers import CLIPTextConfig, CLIPTextModel
    skip = ("architectures", "transformers_version")
    fields = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in skip}
    te = CLIPTextModel(CLIPTextConfig(**fields))
    own = te.state_dict()
    prefix = "text_model." if next(iter(own)).startswith("text_model.") else ""  # transformers < 5 nests the model
    sd = {prefix + k: v for k, v in fix_text_keys(sd).items()}
    if prefix + "embeddings.position_ids" in own:
        sd[prefix + "embeddings.position_ids"] = own[prefix + "embeddings.position_ids"]
    load_state_dict_strict(te, sd, "text_encoder")
    return te


TOKENIZER_JSON = ("vocab.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json")


def check_tokenizer(folder):
    """A tokenizer folder's files, before any weight is read: a vocabulary, and every JSON file there valid."""
    if not os.path.isdir(folder):
        raise LoadError(f"{folder}: no tokenizer folder")
    if not any(os.path.exists(os.path.join(folder, f)) for f in ("vocab.json", "tokenizer.json")):
        raise LoadError(f"{folder}: no tokenizer (needs vocab.json + merges.txt, or tokenizer.json)")
    for name in TOKENIZER_JSON:
        if os.path.exists(os.path.join(folder, name)):
            read_config(os.path.join(folder, name))


def load_tokenizer(folder):
    from transformers import CLIPTokenizer
    check_tokenizer(folder)
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers' own checks of the files: any of its errors means a damaged tokenizer
        raise LoadError(f"{folder}: not a readable CLIP tokenizer "
                        f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None


def token_ids(tokenizer, text):
    """The ids the tokenizer reads `text` as, without the start and end tokens. Texts with the same ids are one
    text to the model: CLIP's tokenizer lowercases, so `<Pine_Tree>` reads as `<pine_tree>`."""
    return tokenizer(text, add_special_tokens=False).input_ids


def reads_as(tokenizer, text, tokens):
    """The first of `tokens` that the tokenizer reads exactly as `text` (the same ids), else None; `text` itself if
    it is among them. A prompt's `<token>` that reads as no learned token is not learned; a new concept's token that
    reads as a learned one (`<Pine_Tree>` beside `<pine_tree>`) would share its embedding row."""
    ids = token_ids(tokenizer, text)
    return next((t for t in tokens if token_ids(tokenizer, t) == ids), None)


def add_tokens(model, tokens):
    """Make each token one vocabulary entry with its own embedding row; set the rows given as tensors.

    Returns the id of every token. A token that is not yet in the vocabulary gets a row initialised at the mean
    embedding (a neutral start for textual inversion).
    """
    new = [t for t in tokens if t not in model.tokenizer.get_vocab()]
    if new:
        model.tokenizer.add_tokens(new)
        emb = model.text_encoder.get_input_embeddings().weight
        mean = emb.detach().mean(0)
        model.text_encoder.resize_token_embeddings(len(model.tokenizer), mean_resizing=False)
        emb = model.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for t in new:
                emb[model.tokenizer.convert_tokens_to_ids(t)] = mean
    ids = {t: model.tokenizer.convert_tokens_to_ids(t) for t in tokens}
    with torch.no_grad():
        emb = model.text_encoder.get_input_embeddings().weight
        for t, row in tokens.items():
            if row is not None:
                emb[ids[t]] = row.to(emb)
    return ids


def trainable_row(model, token_id):
    """A trainable copy of one token's embedding row, spliced into the embedding lookup by a forward hook.

    The optimizer then holds this row alone: training the whole matrix under a gradient mask would carry its
    gradient and AdamW's two moments, about 450 MB at SD's 49,408 × 768 in fp32, for one row. Remove the hook
    and write the row back when done.
    """
    emb = model.text_encoder.get_input_embeddings()
    row = torch.nn.Parameter(emb.weight[token_id].detach().clone())

    def splice(module, args, out):
        return torch.where((args[0] == token_id).unsqueeze(-1), row.to(out.dtype), out)

    return row, emb.register_forward_hook(splice)


def cache_dir():
    """Where derived values are kept between runs: $CP_CACHE_DIR, else $XDG_CACHE_HOME/cp, else ~/.cache/cp."""
    return os.environ.get("CP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cp")


def stamp_files(path, files):
    """What a cached fingerprint of the model at `path` is valid for: its resolved path and the size and mtime (ns)
    of each weight file. Taken before the files are read, so a file rewritten during a load is hashed again later."""
    stats = [(os.path.realpath(f), os.stat(f)) for f in files]
    return {"path": os.path.realpath(path), "files": [[f, s.st_size, s.st_mtime_ns] for f, s in stats]}


def hash_weights(nets):
    """SHA-256 over every tensor of {network name: state dict}: name, dtype, shape and bytes, in sorted order.

    Each tensor is hashed as float32, little-endian: the dtype `load_model` builds and loads every network in, before
    it casts them. So the digest is that of the weights the model computes with: the device and dtype it is loaded
    to do not change it, nor does the file's encoding (an fp16 file, or the same values in fp32)."""
    h = hashlib.sha256()
    for net in sorted(nets):
        for name in sorted(nets[net]):
            t = nets[net][name].detach().to("cpu", torch.float32).contiguous()
            h.update(f"{net}.{name} {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(t.numpy().astype("<f4", copy=False))
    return h.hexdigest()


def _cached_digest(file, stamp):
    """The digest a cache file holds if it was made for `stamp`; None for another stamp, or no readable file."""
    try:
        entry = read_config(file)
        return entry["weights"] if entry["stamp"] == stamp and re.fullmatch("[0-9a-f]{64}", entry["weights"]) else None
    except Exception:  # missing, unreadable, or not a cache entry: the digest is computed
        return None


def _write_cache(file, entry):
    """Write a JSON file whole or not at all (a temp file renamed over it); a folder that cannot be written: skip."""
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(file), suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, file)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass


def fingerprint(unet, vae, text_encoder, stamp):
    """The base model's identity: 32 hex digits hashing the UNet config and every UNet, VAE and text-encoder weight.

    A state records it and `cp_state.check_model` refuses a model whose fingerprint differs. Hashing every weight of
    SD v1 (~1 B parameters) takes seconds, so the weights' digest is cached in `cache_dir()`, one file per model path,
    valid for its `stamp` (`stamp_files`); with a cache that cannot be read or written, the digest is computed."""
    cache = os.path.join(cache_dir(), f"fingerprint-{hashlib.sha256(stamp['path'].encode()).hexdigest()[:16]}.json")
    weights = _cached_digest(cache, stamp)
    if weights is None:
        weights = hash_weights({"unet": unet.state_dict(), "vae": vae.state_dict(),
                                "text_encoder": fix_text_keys(text_encoder.state_dict())})
        _write_cache(cache, {"stamp": stamp, "weights": weights})
    return hashlib.sha256((json.dumps(unet.config, sort_keys=True) + weights).encode()).hexdigest()[:32]


def _single_file_configs(path, config):
    """(configs, tokenizer folder) of a single-file checkpoint: from the diffusers folder `config`, checked before
    the weights are read, or a preset with the `tokenizer/` folder beside the file."""
    if config in PRESETS:
        return PRESETS[config], os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
    if not os.path.isdir(config):
        raise LoadError(f"{config}: no such config folder (nor a preset: {', '.join(PRESETS)})")
    return check_folder(config, weights=False)[0], os.path.join(config, "tokenizer")


def load_model(path, device="cpu", dtype=torch.float32, config=None):
    """Load UNet, VAE, text encoder, tokenizer and noise schedule, offline.

    `path` is a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a single-file SD v1
    checkpoint (.safetensors, or .ckpt read with weights_only=True). A single file carries no configs or
    tokenizer: `config` names a diffusers folder (or preset) to take them from; by default a `tokenizer/`
    folder beside the file and the `sd-v1` preset are used.
    """
    path = str(path)
    if os.path.isdir(path):
        cfg, files = check_folder(path)
        stamp = stamp_files(path, files.values())
        parts = {name: read_weights(f) for name, f in files.items()}
        parts["vae"] = fix_vae_keys(parts["vae"])
        tokenizer_dir = os.path.join(path, "tokenizer")
    elif os.path.isfile(path):
        if not path.endswith((".safetensors", ".ckpt", ".pt", ".pth")):
            raise LoadError(f"{path}: not a model (expected a diffusers folder, .safetensors or .ckpt)")
        cfg, tokenizer_dir = _single_file_configs(path, str(config or "sd-v1"))
        stamp = stamp_files(path, [path])
        parts = split_ldm_checkpoint(read_weights(path), cfg)
    else:
        raise LoadError(f"{path}: no such model folder or checkpoint file")

    unet, vae = UNet(cfg["unet"]), VAE(cfg["vae"])
    load_state_dict_strict(unet, parts["unet"], "unet")
    load_state_dict_strict(vae, parts["vae"], "vae")
    text_encoder = _build_text_encoder(cfg["text_encoder"], parts["text_encoder"])
    tokenizer = load_tokenizer(tokenizer_dir)
    fp = fingerprint(unet, vae, text_encoder, stamp)  # hashed as float32, before the cast
    for net in (unet, vae, text_encoder):
        net.to(device, dtype).eval().requires_grad_(False)
    return Model(unet, vae, text_encoder, tokenizer, alphas_cumprod_from_config(cfg["scheduler"]),
                 float(cfg["vae"].get("scaling_factor", 0.18215)), dict(cfg["scheduler"]), path, fp)
