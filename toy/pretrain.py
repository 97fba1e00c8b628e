"""Pretrains the tiny default model from scratch on the toy world (toy/world.py) and writes it in diffusers
folder layout (toy/model/). Stages, each cached in the work dir so an interrupted run resumes where it stopped:

  data      render N captioned images (toy/world.py: plain and patterned shapes), horizontal flips double them
            (every shape is symmetric), and when a stage needs them M uncaptioned "clutter" images (random
            patterned blobs) for the VAE (and with --clutter-share, the UNet under the empty prompt)
  tokenizer CLIP-style BPE (`</w>` end-of-word suffix, <|startoftext|>/<|endoftext|>) trained on the caption corpus
  vae       AutoencoderKL 64x64x3 -> 16x16x4 on half captioned, half clutter images: L1 + MSE reconstruction
            + small KL; scaling_factor = 1 / std(latents of the captioned images); then the oracle judges its
            reconstructions of every concept (a concept it cannot reconstruct cannot be learned)
  text      (--text pretrained only) the text encoder alone, taught to name what each caption says
  unet      UNet + CLIP text encoder trained jointly on the diffusion loss (--text pretrained: UNet alone)
            E || eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, c) ||^2, weighted min(SNR_t, 5) / SNR_t,
            SD v1 scaled_linear schedule (beta 0.00085 -> 0.012, T = 1000), captions dropped to "" 10% of the time (CFG)
  export    EMA weights -> toy/model/

    python -m toy.pretrain --vae-from toy/model --work W --out W/model   # the shipped model (a16, 20,000 UNet steps,
                                            # text stage, and the v2 VAE it ships, which the defaults would train again)
    python -m toy.pretrain [--work /tmp/cp/pretrain] [--out toy/model]     # all from scratch (a16 + v2, text stage)
    python -m toy.pretrain --unet a8 --vae v1 --vae-steps 2000 --text joint --unet-steps 7000 --work W --out W/model
                                            # the first one (the second and third: 7,000 UNet steps too,
                                            # the fourth 14,000)
    python -m toy.pretrain --unet a16w48 --unet-steps 900 --vae-from toy/model --work /tmp/probe --out /tmp/probe/model
                                            # a probe: another UNet candidate, a short run, the shipped VAE
    python -m toy.pretrain --stop-after tokenizer --work W     # then, on a CUDA machine, with W copied there (13 MB):
    python -m toy.pretrain --device cuda --unet-batch 128 --vae-from toy/model --work W --out W/model
"""
import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import unet as U
from toy import oracle, world

SEED = 0
N_IMAGES, N_CLUTTER = 12000, 4000
VAE_STEPS, VAE_BATCH, VAE_CROP = 6000, 16, 32
UNET_STEPS, UNET_BATCH, UNET_LR = 20000, 32, 8e-4
TEXT_STEPS, TEXT_BATCH, TEXT_LR = 1500, 128, 1e-3
T = 1000



def vae_config(channels, layers_per_block):
    """A KL autoencoder 64x64x3 -> 16x16x4 (two downsamplings), SD v1's block types."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=list(channels),
                layers_per_block=layers_per_block, down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, act_fn="silu", norm_num_groups=16, sample_size=64,
                scaling_factor=1.0)


# candidates by name; the shipped model's VAE is "v2" (6,000 steps); bench/TOY.md says how they compare
VAES = {"v1": vae_config([32, 64, 64], 1), "v2": vae_config([32, 64, 64], 2), "v3": vae_config([64, 128, 128], 2)}
VAE_CFG = VAES["v2"]


def unet_config(channels, attention_levels):
    """An SD-v1-style tiny UNet over three latent levels (16x16, 8x8, 4x4): `channels` per level, cross-attention
    blocks at the levels named in `attention_levels` (0 = 16x16, 1 = 8x8), none at 4x4 but in the mid block, as in
    SD v1."""
    down = ["CrossAttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(3)]
    up = ["CrossAttnUpBlock2D" if 2 - i in attention_levels else "UpBlock2D" for i in range(3)]
    return dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=list(channels), layers_per_block=1,
                down_block_types=down, up_block_types=up, cross_attention_dim=128, attention_head_dim=2,
                norm_num_groups=16, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
                mid_block_scale_factor=1.0, norm_eps=1e-5, center_input_sample=False)


# Candidates compared by pretraining runs (bench/TOY.md); the shipped model's UNet is "a16".
UNETS = {"a8": unet_config([32, 64, 64], {1}),            # attention at 8x8 only
         "a16": unet_config([32, 64, 64], {0, 1}),        # attention at 16x16 and 8x8, as SD v1
         "a16w48": unet_config([48, 96, 96], {0, 1})}     # the same, 1.5x wider
UNET_CFG = UNETS["a16"]
TEXT_CFG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=128)
SCHEDULER_CFG = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": T, "clip_sample": False,
                 "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon", "trained_betas": None}


def lr_at(base, step, total, warmup):
    """Linear warmup, then cosine decay to a tenth."""
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * (1 + math.cos(math.pi * step / total)) / 2)


class Progress:
    """One updating line: stage, step, smoothed loss, it/s, eta."""

    def __init__(self, stage, total, start):
        self.stage, self.total, self.start, self.t0, self.loss = stage, total, start, time.time(), None

    def __call__(self, step, loss):
        self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss
        rate = (step + 1 - self.start) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step - 1) / max(rate, 1e-9)
        print(f"\r{self.stage} {step + 1}/{self.total} loss {self.loss:.4f} {rate:.2f} it/s eta {eta / 60:.1f} min ",
              end="", flush=True)
        if step + 1 == self.total:
            print(flush=True)


def stage_data(work):
    """The captioned images, compressed (12 MB: flat colors compress well, so a work dir can travel to a GPU)."""
    path = os.path.join(work, "data.npz")
    if not os.path.exists(path):
        t0 = time.time()
        images, captions, labels = world.sample_caption_batch(N_IMAGES, np.random.default_rng(SEED))
        np.savez_compressed(path, images=images, captions=np.array(captions), labels=np.array(labels))
        print(f"data: rendered {N_IMAGES} images in {time.time() - t0:.0f} s", flush=True)
    d = np.load(path)
    return d["images"], [str(c) for c in d["captions"]], d["labels"]


def stage_clutter(work):
    """The uncaptioned clutter images, rendered only when a stage needs them (the VAE, --clutter-share)."""
    path = os.path.join(work, "clutter.npy")
    if not os.path.exists(path):
        t0 = time.time()
        rng = np.random.default_rng([SEED, 4])
        np.save(path, np.stack([world.render_clutter(rng) for _ in range(N_CLUTTER)]))
        print(f"data: rendered {N_CLUTTER} clutter images in {time.time() - t0:.0f} s", flush=True)
    return np.load(path)


def caption_corpus():
    """Every caption the world can produce (plus the concept names), for the tokenizer."""
    out = []
    for shape in world.SHAPES:
        for color in world.COLORS:
            looks = [("plain", None)] + [(p, c) for p in world.PATTERNS[1:] for c in world.SECOND_COLORS if c != color]
            for pattern, color2 in looks:
                for bg in world.BACKGROUNDS:
                    for size in ["any", *world.SIZES]:
                        obj = world.describe(shape, color, size, pattern, color2)
                        out += [p.format(obj=obj, bg=bg) for p in world.PHRASES]
    return out + [n.replace("_", " ") for n in world.CONCEPTS]


def stage_tokenizer(work):
    """BPE with CLIP's conventions, saved as vocab.json + merges.txt that transformers.CLIPTokenizer reads.
    The trainer breaks ties between equally frequent pairs in a run-dependent order, so a rerun may number a few
    tokens differently: the shipped toy/model/tokenizer is the reference, and a rerun is consistent with itself."""
    out = os.path.join(work, "tokenizer")
    if not os.path.exists(os.path.join(out, "merges.txt")):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        # the byte alphabet CLIP starts from (printable ascii, alone and word-final) keeps any prompt encodable
        alphabet = [chr(c) for c in range(33, 127)]
        trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, initial_alphabet=alphabet,
                                      end_of_word_suffix="</w>", show_progress=False)
        tok.train_from_iterator(caption_corpus(), trainer)
        trained = json.loads(tok.to_str())["model"]
        vocab = {}
        for ch in alphabet:
            vocab.setdefault(ch, len(vocab))
        for ch in alphabet:
            vocab.setdefault(ch + "</w>", len(vocab))
        merges = [m if isinstance(m, str) else " ".join(m) for m in trained["merges"]]
        for m in merges:
            vocab.setdefault(m.replace(" ", ""), len(vocab))
        vocab["<|startoftext|>"] = len(vocab)
        vocab["<|endoftext|>"] = len(vocab)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "vocab.json"), "w") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(out, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
            json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>"}, f, indent=2)
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                       "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": True}, f, indent=2)
    from transformers import CLIPTokenizer
    return CLIPTokenizer(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"),
                         pad_token="<|endoftext|>")


def _ckpt(work, name, state=None):
    """Save state (atomically) or load the last saved state (None if none)."""
    path = os.path.join(work, f"{name}.pt")
    if state is not None:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    elif os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=True)


def _batch_images(images, idx, rng):
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
    flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def stage_vae(work, images, clutter, cfg=VAE_CFG, total=VAE_STEPS, device="cpu"):
    torch.manual_seed(SEED)
    vae = U.VAE(cfg)
    done = _ckpt(work, "vae_final")
    if done is not None:
        vae.load_state_dict(done["model"])
        return vae, done["scaling_factor"]
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start, state = 0, _ckpt(work, "vae")
    if state is not None:
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        start = state["step"]
    prog, last = Progress("vae", total, start), time.time()
    for step in range(start, total):
        rng = np.random.default_rng([SEED, 1, step])
        g = torch.Generator().manual_seed(SEED * 100003 + step)
        half = VAE_BATCH // 2
        x = torch.cat([_batch_images(images, rng.integers(len(images), size=half), rng),
                       _batch_images(clutter, rng.integers(len(clutter), size=VAE_BATCH - half), rng)])
        # random crops: the network is convolutional, and a quarter of the pixels cost a quarter of the time
        i, j = rng.integers(0, 64 - VAE_CROP + 1, size=2) // 4 * 4
        x = x[:, :, i:i + VAE_CROP, j:j + VAE_CROP].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(1e-3, step, total, warmup=100)
        mean, std = vae.encode(x)
        z = mean + std * torch.randn(mean.shape, generator=g).to(device)
        rec = vae.decode(z)
        kl = 0.5 * (mean ** 2 + std ** 2 - 1 - 2 * torch.log(std)).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        prog(step, loss.item())
        if time.time() - last > 120 or step + 1 == total:
            _ckpt(work, "vae", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
            last = time.time()
    vae.cpu().eval()
    with torch.no_grad():
        x = _batch_images(images, np.arange(min(512, len(images))), np.random.default_rng([SEED, 2]))
        mean, _ = vae.encode(x)
        scaling_factor = float(1 / mean.std())
        err = (vae.decode(mean) - x).abs().mean().item()
    concepts = oracle.eval_vae(vae)  # concepts it never saw: can it carry them?
    print(f"vae: scaling_factor {scaling_factor:.4f}, reconstruction L1 {err:.4f} on pretraining images (in [-1, 1]); "
          f"oracle concept accuracy on reconstructions of 64 renders per concept: "
          + ", ".join(f"{k} {v['reconstructions']:.3f}" for k, v in concepts.items()), flush=True)
    _ckpt(work, "vae_final", {"model": vae.state_dict(), "scaling_factor": scaling_factor})
    return vae, scaling_factor


def encode_dataset(work, vae, images, name="latents", flips=(False, True), device="cpu"):
    """Posterior mean and std of every image, then (flip True) of every mirror: [len(flips) * N, 4, 16, 16] each,
    cached as WORK/name.pt."""
    path = os.path.join(work, f"{name}.pt")
    if not os.path.exists(path):
        means, stds = [], []
        vae.to(device)
        with torch.no_grad():
            for flip in flips:
                for i in range(0, len(images), 256):
                    x = torch.from_numpy(images[i:i + 256]).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1
                    m, s = vae.encode(x.flip(3) if flip else x)
                    means.append(m.cpu()), stds.append(s.cpu())
        vae.cpu()
        torch.save({"mean": torch.cat(means), "std": torch.cat(stds)}, path)
    d = torch.load(path, weights_only=True)
    return d["mean"], d["std"]


def text_encoder_from(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel
    vocab = tokenizer.get_vocab()
    cfg = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **TEXT_CFG)
    return CLIPTextModel(cfg)


def caption_targets(captions, labels):
    """What each caption says, as class indices per head (-100 where it says nothing: the background of a caption
    that names none, the second color of a plain object)."""
    heads = {"shape": world.SHAPES, "color": list(world.COLORS), "background": list(world.BACKGROUNDS),
             "pattern": world.PATTERNS, "color2": list(world.SECOND_COLORS)}
    out = torch.full((len(captions), len(heads)), -100)
    for i, (cap, (shape, color, bg, pattern, color2)) in enumerate(zip(captions, labels)):
        said = [shape, color, bg if f"{bg} background" in cap else None, pattern, color2 or None]
        out[i] = torch.tensor([-100 if v is None else values.index(v) for v, values in zip(said, heads.values())])
    return out, [len(v) for v in heads.values()]


def stage_text(work, tokenizer, captions, labels, total=TEXT_STEPS, device="cpu"):
    """`--text pretrained`: the text encoder alone first learns to say what a caption names (shape, color,
    background, pattern, second color: one linear head each on its pooled output), so that the words are told apart
    before the UNet conditions on them, as SD v1 starts from a CLIP text encoder trained on its own."""
    torch.manual_seed(SEED)
    text = text_encoder_from(tokenizer)
    done = _ckpt(work, "text")
    if done is not None:
        text.load_state_dict(done["text"])
        return text
    targets, sizes = caption_targets(captions, labels)
    heads = torch.nn.ModuleList(torch.nn.Linear(text.config.hidden_size, n) for n in sizes)
    text.to(device), heads.to(device)
    targets = targets.to(device)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    opt = torch.optim.AdamW(list(text.parameters()) + list(heads.parameters()), lr=TEXT_LR, weight_decay=0.01)
    prog = Progress("text", total, 0)
    for step in range(total):
        rng = np.random.default_rng([SEED, 5, step])
        idx = torch.from_numpy(rng.integers(len(captions), size=TEXT_BATCH)).to(device)
        pooled = text(ids[idx]).pooler_output
        for group in opt.param_groups:
            group["lr"] = lr_at(TEXT_LR, step, total, warmup=100)
        loss = sum(F.cross_entropy(h(pooled), targets[idx, k], ignore_index=-100) for k, h in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        prog(step, loss.item())
    _ckpt(work, "text", {"text": text.state_dict()})
    return text.cpu()


def stage_unet(work, tokenizer, lat_mean, lat_std, captions, scaling_factor, cfg=UNET_CFG, total=UNET_STEPS,
               pretrained_text=None, clutter=None, clutter_share=0.0, batch=UNET_BATCH, device="cpu"):
    """The UNet and the text encoder trained together on the diffusion loss; with a pretrained text encoder, the
    UNet alone on top of it (frozen). With `clutter` = (mean, std) latents, a `clutter_share` of every batch are
    clutter images under the empty prompt: unconditional data that shows the UNet more ways to draw than the
    captions' single shapes. Batches and noise are drawn on the CPU, so every device trains on the same ones."""
    torch.manual_seed(SEED)
    unet = U.UNet(cfg)
    text = text_encoder_from(tokenizer) if pretrained_text is None else pretrained_text.requires_grad_(False)
    unet.to(device), text.to(device)
    params = list(unet.parameters()) + list(text.parameters())
    ema = [p.detach().clone() for p in params]  # a frozen parameter's average stays itself
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=UNET_LR, weight_decay=0.01)
    start, state = 0, _ckpt(work, "unet")
    if state is not None:
        unet.load_state_dict(state["unet"]), text.load_state_dict(state["text"]), opt.load_state_dict(state["opt"])
        ema, start = [e.to(device) for e in state["ema"]], state["step"]
    if start >= total:
        return unet.cpu(), text.cpu(), [e.cpu() for e in ema]
    ids = tokenizer(captions + [""], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    abar = U.alphas_cumprod_from_config(SCHEDULER_CFG)
    snr = abar / (1 - abar)
    weight = (torch.clamp(snr, max=5.0) / snr).to(device)
    n = len(captions)
    prog, last = Progress("unet", total, start), time.time()
    for step in range(start, total):
        rng = np.random.default_rng([SEED, 3, step])
        g = torch.Generator().manual_seed(SEED * 100019 + step)
        idx = torch.from_numpy(rng.integers(2 * n, size=batch))
        mean, std = lat_mean[idx], lat_std[idx]
        cap = torch.where(torch.from_numpy(rng.random(batch) < 0.1), n, idx % n)  # 10% empty prompt
        if clutter_share > 0:
            k = int(round(clutter_share * batch))
            j = torch.from_numpy(rng.integers(len(clutter[0]), size=k))
            mean, std = torch.cat([mean[k:], clutter[0][j]]), torch.cat([std[k:], clutter[1][j]])
            cap = torch.cat([cap[k:], torch.full((k,), n)])
        z0 = (mean + std * torch.randn(mean.shape, generator=g)) * scaling_factor
        t = torch.randint(0, T, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt, noise, t = (a.sqrt() * z0 + (1 - a).sqrt() * noise).to(device), noise.to(device), t.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(UNET_LR, step, total, warmup=200)
        pred = unet(xt, t, text(ids[cap.to(device)]).last_hidden_state)
        loss = (weight[t] * ((pred - noise) ** 2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - decay)
        prog(step, loss.item())
        if time.time() - last > 180 or step + 1 == total:
            _ckpt(work, "unet", {"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                                 "ema": ema, "step": step + 1})
            last = time.time()
    return unet.cpu(), text.cpu(), [e.cpu() for e in ema]


def export(out, work, vae, scaling_factor, unet, text, ema):
    """Write the diffusers folder layout that unet.load_model and StableDiffusionPipeline both read."""
    with torch.no_grad():
        for e, p in zip(ema, list(unet.parameters()) + list(text.parameters())):
            p.copy_(e)
    shutil.rmtree(out, ignore_errors=True)
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]:
        os.makedirs(os.path.join(out, sub))

    def dump(obj, *path):
        with open(os.path.join(out, *path), "w") as f:
            json.dump(obj, f, indent=2)

    dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
          "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
          "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
          "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
          "vae": ["diffusers", "AutoencoderKL"]}, "model_index.json")
    dump({**unet.config, "_class_name": "UNet2DConditionModel"}, "unet", "config.json")
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
              os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    dump({**vae.config, "_class_name": "AutoencoderKL", "scaling_factor": scaling_factor}, "vae", "config.json")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    text.save_pretrained(os.path.join(out, "text_encoder"))
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(os.path.join(work, "tokenizer", f), os.path.join(out, "tokenizer", f))
    dump(SCHEDULER_CFG, "scheduler", "scheduler_config.json")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"export: wrote {out} ({size / 2 ** 20:.1f} MiB)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/cp/pretrain")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "model"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--device", default="cpu", help="where the VAE, text and UNet stages train (e.g. cuda)")
    ap.add_argument("--stop-after", choices=["data", "tokenizer", "vae", "unet"], default=None)
    ap.add_argument("--unet", choices=list(UNETS), default="a16", help="UNet candidate (default: the shipped one)")
    ap.add_argument("--unet-steps", type=int, default=UNET_STEPS, help="UNet training steps (shorter: a probe run)")
    ap.add_argument("--unet-batch", type=int, default=UNET_BATCH, help="images per UNet step")
    ap.add_argument("--vae", choices=list(VAES), default="v2", help="VAE candidate (default: the shipped one)")
    ap.add_argument("--vae-steps", type=int, default=VAE_STEPS, help="VAE training steps")
    ap.add_argument("--vae-from", default=None, help="take the VAE of this model folder instead of training one")
    ap.add_argument("--text", choices=["joint", "pretrained"], default="pretrained", help="pretrained (the shipped "
                    "model): first on its own to name what captions say, then frozen under the UNet; joint: the text "
                    "encoder trains with the UNet (the first generation)")
    ap.add_argument("--text-steps", type=int, default=TEXT_STEPS, help="steps of the --text pretrained stage")
    ap.add_argument("--clutter-share", type=float, default=0.0, help="share of every UNet batch drawn from the "
                    "clutter images under the empty prompt (default 0: captioned images only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()
    images, captions, labels = stage_data(args.work)
    tokenizer = stage_tokenizer(args.work)
    if args.stop_after in ("data", "tokenizer"):
        return
    if args.vae_from:
        model = U.load_model(args.vae_from)
        vae, scaling_factor = model.vae, model.scaling_factor
    else:
        vae_cfg = VAES[args.vae]
        vae, scaling_factor = stage_vae(args.work, images, stage_clutter(args.work), vae_cfg, args.vae_steps,
                                        args.device)
    if args.stop_after == "vae":
        return
    lat_mean, lat_std = encode_dataset(args.work, vae, images, device=args.device)
    text = (stage_text(args.work, tokenizer, captions, labels, args.text_steps, args.device)
            if args.text == "pretrained" else None)
    clutter_lat = (encode_dataset(args.work, vae, stage_clutter(args.work), "clutter_latents", (False,), args.device)
                   if args.clutter_share else None)
    unet, text, ema = stage_unet(args.work, tokenizer, lat_mean, lat_std, captions, scaling_factor, UNETS[args.unet],
                                 args.unet_steps, text, clutter_lat, args.clutter_share, args.unet_batch, args.device)
    if args.stop_after == "unet":
        return
    export(args.out, args.work, vae, scaling_factor, unet, text, ema)
    print(f"pretrain: done in {(time.time() - t0) / 60:.1f} min (this invocation)", flush=True)


if __name__ == "__main__":
    main()
