"""
LoRA and VeRA for the UNet's Linear layers (README "Where things live"; examples/README.md, "VeRA adapters").

A wrapped Linear computes  y = W x + b + sum_n ΔW_n x  over its enabled adapters n. Several named adapters can sit
on one layer (C-LoRA keeps one per task and sums them).
  LoRA (Hu et al. 2022):       ΔW = (alpha / r) B A, with A in R^{r x in} (kaiming-uniform init, as nn.Linear) and
                               B in R^{out x r} (zero init) trained per layer.
  VeRA (Kopiczko et al. 2024): ΔW = Λ_b B Λ_d A, with A in R^{r x in} and B in R^{out x r} frozen and random, one pair
                               for the whole UNet (sized to the largest in/out of the targets, each layer takes its
                               top-left block), and only the vectors d in R^r (init 0.1) and b in R^out (init 0)
                               trained per layer: r + out numbers instead of r (in + out).
A fresh adapter (B = 0, or b = 0) does not change the output.

The wrapper is a subclass of nn.Linear that keeps the original weight and bias Parameters, so the base keys of
`unet.state_dict()` stay `...to_k.weight` / `...to_k.bias`; each adapter adds `...to_k.lora_A.<name>` and
`...to_k.lora_B.<name>` (VeRA: `...to_k.vera_lambda_d.<name>`, `...to_k.vera_lambda_b.<name>`; the shared projection
is not a buffer, so the state dict does not repeat it in every layer).

Files (safetensors, LoRA tensors only):
  diffusers/PEFT: `unet.<module>.lora_A.weight`, `unet.<module>.lora_B.weight`, and the header entry
                  `lora_adapter_metadata` = JSON {"unet.r", "unet.lora_alpha", "unet.target_modules",
                  "unet.rank_pattern", "unet.alpha_pattern"}, which diffusers turns into a peft LoraConfig.
                  Without that entry diffusers uses alpha = r, so does `load_lora`.
  kohya:          `lora_unet_<module with . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha`; token
                  embeddings may ride along as `bundle_emb.<name>.string_to_param.*` [1, dim] (the bundle that
                  AUTOMATIC1111's LoRA loader reads; `<name>` is the word that calls it in a prompt; diffusers'
                  load_lora_weights refuses a file that holds it, ComfyUI does not read it).
  PEFT VeRA:      `base_model.model.<module>.vera_lambda_d` / `.vera_lambda_b`, and the shared projection as
                  `base_model.vera_A` / `base_model.vera_B` (PEFT's save_projection=True; without them PEFT and
                  `load_vera` regenerate it from `projection_prng_key`), beside PEFT's adapter_config.json (a folder,
                  as PEFT's save_pretrained writes) or with that JSON in the safetensors header (a single file).
"""
import contextlib
import json
import math
import os
import re
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save

KV = ("attn2.to_k", "attn2.to_v")  # cross-attention keys and values (C-LoRA / Custom Diffusion)
ATTN = tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0"))
FF = ("ff.net.0.proj", "ff.net.2")  # the transformer blocks' feed-forward (GEGLU in, Linear out)
TARGETS = {"kv": KV, "attn": ATTN, "kv+ff": KV + FF}
METADATA_KEY = "lora_adapter_metadata"
ADAPTERS = ("lora", "vera")
VERA_D_INITIAL = 0.1  # PEFT's default d_initial
VERA_WEIGHTS, VERA_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # PEFT's file names


class LoRALinear(nn.Linear):
    """nn.Linear plus named LoRA / VeRA adapters; built from an existing Linear, sharing its Parameters."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.projection = None  # VeRA: the UNet's shared frozen (A, B), the same tensors in every layer
        self.alpha = {}       # name -> alpha (scale = alpha / rank)
        self.disabled = set()
        self.merged = []      # names whose delta is currently folded into self.weight (functions that change
                              # adapters unmerge first, so a merged delta is always the one that was added)

    def add(self, name, rank, alpha):
        w = self.weight
        A = torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.alpha[name] = float(alpha)

    def add_vera(self, name, projection):
        w = self.weight
        self.projection = projection
        self.vera_lambda_d[name] = nn.Parameter(torch.full((projection[0].shape[0],), VERA_D_INITIAL, device=w.device,
                                                           dtype=w.dtype))
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=w.dtype))

    def names(self):
        return [*self.lora_A, *self.vera_lambda_d]

    def params(self, name):
        """The trained pair: (A, B) of a LoRA, (d, b) of a VeRA adapter."""
        if name in self.lora_A:
            return self.lora_A[name], self.lora_B[name]
        return self.vera_lambda_d[name], self.vera_lambda_b[name]

    def factors(self, name):
        """(A', B', s) with ΔW = s B' A': LoRA (A, B, alpha / r); VeRA (Λ_d A, Λ_b B, 1), A and B cut to this layer."""
        if name in self.lora_A:
            return self.lora_A[name], self.lora_B[name], self.alpha[name] / self.lora_A[name].shape[0]
        d, b = self.params(name)
        A, B = (P.to(d) for P in self.projection)
        return d[:, None] * A[:, :self.in_features], b[:, None] * B[:self.out_features], 1.0

    def delta(self, name):
        """ΔW, shape [out, in]."""
        A, B, s = self.factors(name)
        return s * (B @ A)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        for n in self.names():
            if n not in self.disabled and n not in self.merged:
                A, B, s = self.factors(n)
                y = y + s * F.linear(F.linear(x, A), B)
        return y

    def extra_repr(self):
        return super().extra_repr() + ", adapters=" + ",".join(
            f"{n}({'vera ' * (n in self.vera_lambda_d)}r={self.params(n)[0].shape[0]})" for n in self.names())


def _layers(unet):
    return [(p, m) for p, m in unet.named_modules() if isinstance(m, LoRALinear)]


def _set_module(unet, path, module):
    parent, _, leaf = path.rpartition(".")
    setattr(unet.get_submodule(parent) if parent else unet, leaf, module)


def _check_name(name):
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_' or '-'")


def _wrap(unet, path, name):
    """The LoRALinear at `path` (wrapping the nn.Linear there if needed), checked not to hold `name` yet."""
    m = unet.get_submodule(path)
    if not isinstance(m, LoRALinear):
        m = LoRALinear(m)
        _set_module(unet, path, m)
    if name in m.names():
        raise ValueError(f"{path}: adapter {name!r} already exists")
    return m


def vera_projection(rank, n_in, n_out, seed=0):
    """VeRA's frozen A [rank, n_in] and B [n_out, rank], kaiming-uniform (bound √(6 / fan_in)) from one CPU generator
    seeded with `seed`, A drawn first: the numbers of PEFT's VeraConfig(projection_prng_key=seed)."""
    g = torch.Generator().manual_seed(seed)
    uniform = lambda shape, fan: torch.empty(shape).uniform_(-math.sqrt(6 / fan), math.sqrt(6 / fan), generator=g)
    return uniform((rank, n_in), n_in), uniform((n_out, rank), rank)


def get_projection(unet):
    """The (A, B) that the UNet's VeRA adapters share, or None."""
    return next((m.projection for _, m in _layers(unet) if m.projection is not None), None)


def target_modules(unet, targets=KV):
    """[(path, nn.Linear)] of every nn.Linear whose path ends with one of `targets` (a tuple, "kv" or "attn")."""
    targets = TARGETS.get(targets, (targets,)) if isinstance(targets, str) else tuple(targets)
    return [(p, m) for p, m in unet.named_modules()
            if isinstance(m, nn.Linear) and any(p == t or p.endswith("." + t) for t in targets)]


def inject(unet, targets=KV, rank=4, alpha=4.0, name="task0", adapter="lora", projection=None, seed=0):
    """Add adapter `name` to every nn.Linear whose path ends with one of `targets` (a tuple, "kv" or "attn").

    adapter="vera" ignores alpha; its layers use `projection` (A, B), else the UNet's existing one (all VeRA adapters
    of a UNet share one, as in PEFT), else a new one from `seed` sized to the largest in/out of the targets.
    """
    _check_name(name)
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r} (choose from {', '.join(ADAPTERS)})")
    found = target_modules(unet, targets)
    if not found:
        raise ValueError(f"no nn.Linear module matches {targets}")
    paths, linears = [p for p, _ in found], [m for _, m in found]
    if adapter == "vera":
        shared = get_projection(unet)
        projection = projection or shared or vera_projection(rank, max(m.in_features for m in linears),
                                                             max(m.out_features for m in linears), seed)
        projection = tuple(P.to(linears[0].weight) for P in projection)
        if shared is not None and not all(map(torch.equal, shared, projection)):
            raise ValueError("this UNet's VeRA adapters share another projection (one per UNet, as in PEFT)")
        A, B = projection = shared or projection
        small = [p for p, m in zip(paths, linears) if A.shape[1] < m.in_features or B.shape[0] < m.out_features]
        if A.shape[0] != rank or B.shape[1] != rank or small:
            raise ValueError(f"VeRA projection {tuple(A.shape)}, {tuple(B.shape)} does not fit rank {rank}"
                             + (f" and module {small[0]}" if small else ""))
    for p in paths:
        m = _wrap(unet, p, name)
        m.add(name, rank, alpha) if adapter == "lora" else m.add_vera(name, projection)
    return paths


def adapter_names(unet):
    names = {}
    for _, m in _layers(unet):
        names.update(dict.fromkeys(m.names()))
    return list(names)


def lora_parameters(unet, names=None):
    """The trained Parameters of the given adapters (all when None), in module order: (A, B) of a LoRA, (d, b) of a
    VeRA adapter."""
    return [t for _, m in _layers(unet) for n in m.names() if names is None or n in names for t in m.params(n)]


def set_trainable(unet, names):
    """Train exactly the adapters in `names`: every other parameter of `unet` is frozen. Returns their parameters."""
    names = [names] if isinstance(names, str) else list(names)
    for p in unet.parameters():
        p.requires_grad_(False)
    params = lora_parameters(unet, names)
    for p in params:
        p.requires_grad_(True)
    return params


def set_enabled(unet, name, enabled=True):
    unmerge(unet)
    for _, m in _layers(unet):
        if name in m.names():
            (m.disabled.discard if enabled else m.disabled.add)(name)


def enable_only(unet, name):
    """Switch adapter `name` on and every other adapter off (None: the base model alone)."""
    for n in adapter_names(unet):
        set_enabled(unet, n, n == name)


@torch.no_grad()
def merge(unet):
    """Fold every enabled adapter into W (for fast inference); `unmerge` takes them out again."""
    for _, m in _layers(unet):
        for n in m.names():
            if n not in m.disabled and n not in m.merged:
                m.weight += m.delta(n).to(m.weight.dtype)
                m.merged.append(n)


@torch.no_grad()
def unmerge(unet):
    for _, m in _layers(unet):
        while m.merged:
            m.weight -= m.delta(m.merged.pop()).to(m.weight.dtype)


def remove(unet, name=None):
    """Delete adapter `name` (all when None); a layer left without adapters becomes a plain nn.Linear again."""
    unmerge(unet)
    for p, m in _layers(unet):
        for n in [n for n in m.names() if name is None or n == name]:
            for d in (m.lora_A, m.lora_B, m.vera_lambda_d, m.vera_lambda_b, m.alpha):
                if n in d:
                    del d[n]
            m.disabled.discard(n)
        if not m.vera_lambda_d:
            m.projection = None
        if not m.names():
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            _set_module(unet, p, plain)


@torch.no_grad()
def scale(unet, factor):
    """Multiply every adapter's ΔW by `factor` (through B, or b: ΔW is linear in each)."""
    unmerge(unet)
    for _, m in _layers(unet):
        for n in m.names():
            m.params(n)[1].mul_(factor)


def get_adapter(unet, name):
    """{module path: (A, B)} of adapter `name`: the live Parameters (A [r, in], B [out, r]; VeRA: d [r], b [out]),
    not copies."""
    return {p: m.params(name) for p, m in _layers(unet) if name in m.names()}


def snapshot(unet, name):
    """{module path: (A, B)} of adapter `name`, detached copies (VeRA: (d, b))."""
    return {p: tuple(t.detach().clone() for t in pair) for p, pair in get_adapter(unet, name).items()}


def deltas(unet, name):
    """{module path: ΔW} of adapter `name`."""
    return {p: m.delta(name) for p, m in _layers(unet) if name in m.names()}


def get_alpha(unet, name):
    return {p: m.alpha[name] for p, m in _layers(unet) if name in m.lora_A}


@torch.no_grad()
def set_adapter(unet, name, weights):
    """Copy {path: (A, B)} (VeRA: (d, b); e.g. from `get_adapter`) into the existing adapter `name`; paths and shapes
    must match."""
    unmerge(unet)
    have = get_adapter(unet, name)
    if not have:
        raise ValueError(f"no adapter named {name!r}")
    if set(weights) != set(have):
        diff = sorted(set(weights) ^ set(have))
        raise ValueError(f"adapter {name!r}: module sets differ, e.g. {diff[0]}")
    for p, (A, B) in weights.items():
        if A.shape != have[p][0].shape or B.shape != have[p][1].shape:
            raise ValueError(f"{p}: shapes {tuple(A.shape)}, {tuple(B.shape)} do not match adapter {name!r} "
                             f"({tuple(have[p][0].shape)}, {tuple(have[p][1].shape)})")
    for p, (A, B) in weights.items():
        have[p][0].copy_(A)
        have[p][1].copy_(B)


# ---- files -------------------------------------------------------------------------------------------------------

def _kohya(path):
    return "lora_unet_" + path.replace(".", "_")


def _common(values):
    """diffusers/peft style: the most common value, and {"^path": value} for the modules that differ."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {"^" + p: v for p, v in values.items() if v != common}


def write_safetensors(tensors, path, metadata=None):
    """Write a .safetensors file with Python's own file calls, so that a full disk or a folder that cannot be written
    is an OSError (safetensors' save_file raises its own error type); a failed write leaves no partial file."""
    data = save(tensors, metadata=metadata)
    f = open(path, "wb")
    try:
        with f:
            f.write(data)
    except OSError:
        with contextlib.suppress(OSError):
            if os.path.isfile(path):  # not a device or pipe named as the file
                os.remove(path)
        raise


def save_lora(unet, path, name, format="diffusers"):
    """Write adapter `name` to a .safetensors file in diffusers (peft) or kohya format."""
    layers = get_adapter(unet, name)
    if not layers:
        raise ValueError(f"no adapter named {name!r}")
    write_lora_file(layers, get_alpha(unet, name), path, format)


def write_lora_file(layers, alphas, path, format="diffusers", embeddings=None):
    """Write {module path: (A, B)} with {module path: alpha} to a .safetensors file (no UNet needed); kohya format
    only: {name: embedding row} bundled in."""
    t = lambda x: x.detach().to("cpu").contiguous().clone()
    out, meta = {}, None
    if embeddings and format != "kohya":
        raise ValueError("only the kohya format bundles token embeddings")
    for name, row in (embeddings or {}).items():
        out[f"bundle_emb.{name}.string_to_param.*"] = t(row).reshape(1, -1)
    for p, (A, B) in layers.items():
        if format == "diffusers":
            out[f"unet.{p}.lora_A.weight"], out[f"unet.{p}.lora_B.weight"] = t(A), t(B)
        elif format == "kohya":
            k = _kohya(p)
            out[k + ".lora_down.weight"], out[k + ".lora_up.weight"] = t(A), t(B)
            out[k + ".alpha"] = torch.tensor(alphas[p], dtype=torch.float32)
        else:
            raise ValueError(f"unknown LoRA format {format!r} (diffusers or kohya)")
    if format == "diffusers":
        r, rank_pattern = _common({p: A.shape[0] for p, (A, _) in layers.items()})
        alpha, alpha_pattern = _common(alphas)
        cfg = dict(target_modules=sorted(layers), r=r, lora_alpha=alpha, rank_pattern=rank_pattern,
                   alpha_pattern=alpha_pattern)
        meta = {METADATA_KEY: json.dumps({"unet." + k: v for k, v in cfg.items()}, sort_keys=True)}
    write_safetensors(out, path, meta)


def read_lora_file(path):
    """A diffusers-format file written by `write_lora_file` as {module path: (A, B, alpha)} (no UNet needed)."""
    sd, header = _read(path)
    mods = _parse(sd, header)
    if any(p.startswith("lora_unet_") for p in mods):
        raise ValueError(f"{path}: kohya files need the UNet to map names; use load_lora")
    return {p: (A, B, alpha) for p, (A, B, alpha, _) in mods.items()}


@torch.no_grad()
def magnitude_merge(old, new, scale, rank):
    """Two LoRAs {path: (A, B)}, each ΔW = scale·B·A, as one of rank `rank` (magnitude merging, after Staniszewski et
    al., "Low-Rank Continual Personalization of Diffusion Models", arXiv 2410.04891): per element of each layer's ΔW
    the one of larger magnitude (`old`'s on a tie), re-factored by a truncated SVD, ΔW ≈ U_r S_r V_rᵀ as
    B = U_r √(S_r/scale), A = √(S_r/scale) V_rᵀ. `old` None: `new` alone, re-factored."""
    out = {}
    for p, (A, B) in new.items():
        d_new = scale * B.double() @ A.double()
        d_old = scale * old[p][1].double() @ old[p][0].double() if old else torch.zeros_like(d_new)
        U, S, Vh = torch.linalg.svd(torch.where(d_old.abs() >= d_new.abs(), d_old, d_new), full_matrices=False)
        k = min(rank, len(S))
        root = (S[:k] / scale).sqrt()
        A_m, B_m = A.new_zeros(rank, A.shape[1]), B.new_zeros(B.shape[0], rank)
        A_m[:k], B_m[:, :k] = root[:, None] * Vh[:k], U[:, :k] * root
        out[p] = (A_m, B_m)
    return out


def stack(adapters):
    """Several adapters of equal rank and alpha as one: Σ_m B_m A_m = [B_1 … B_n][A_1; …; A_n] (rank n·r)."""
    return {p: (torch.cat([a[p][0] for a in adapters]), torch.cat([a[p][1] for a in adapters], dim=1))
            for p in adapters[0]}


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def _pattern_value(pattern, path, default):
    for k, v in (pattern or {}).items():
        if re.match(rf"(.*\.)?({k})$", path):
            return v
    return default


def _parse(sd, header):
    """File tensors -> {module path (kohya: its stem): (A, B, alpha, key of A)}; the key is for error messages.
    Bundled token embeddings are left out."""
    sd = {k: v for k, v in sd.items() if not k.startswith("bundle_emb.")}
    kohya = any(k.startswith("lora_unet_") for k in sd)
    down, up = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
    pattern = (r"(lora_unet_\w+)\.(lora_down|lora_up|alpha)(\.weight)?" if kohya else
               r"(?:unet\.)?([\w.]+)\.(lora_A|lora_B)(\.weight)")
    groups = {}
    for k in sd:
        m = re.fullmatch(pattern, k)
        if not m or k.startswith(("text_encoder", "lora_te")) or (m.group(2) == "alpha") == bool(m.group(3)):
            raise ValueError(f"{k}: not a UNet LoRA key of the {'kohya' if kohya else 'diffusers'} format")
        groups.setdefault(m.group(1), {})[m.group(2)] = k
    meta = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
    meta = {k.removeprefix("unet."): v for k, v in meta.items()}
    for flag in ("use_dora", "use_rslora"):
        if meta.get(flag):
            raise ValueError(f"LoRA metadata sets {flag}, which is not supported")
    mods = {}
    for stem, g in groups.items():
        if down not in g or up not in g:
            raise ValueError(f"{next(iter(g.values()))}: no matching {up if down in g else down} tensor")
        A, B = sd[g[down]], sd[g[up]]
        if kohya:  # kohya's convention: no alpha tensor means alpha = rank
            alpha = sd[g["alpha"]].item() if "alpha" in g else A.shape[0]
        else:
            alpha = _pattern_value(meta.get("alpha_pattern"), stem, meta.get("lora_alpha", A.shape[0]))
        mods[stem] = (A, B, float(alpha), g[down])
    return mods


def load_lora(unet, path, name):
    """Load a diffusers or kohya LoRA file (format detected from the keys) into adapter `name`.

    If `name` already exists it must cover the same modules with the same ranks (its weights and alpha are
    replaced); otherwise it is created. Everything is checked before the UNet is touched. Returns the module paths.
    """
    _check_name(name)
    unmerge(unet)
    sd, header = _read(path)
    if not sd:
        raise ValueError(f"{path}: no tensors")
    mods = _parse(sd, header)
    linears = {p: m for p, m in unet.named_modules() if isinstance(m, nn.Linear)}
    if next(iter(mods)).startswith("lora_unet_"):
        by_kohya = {_kohya(p): p for p in linears}
        mods = {by_kohya.get(s, s): v for s, v in mods.items()}
    existing = get_adapter(unet, name)
    for p, (A, B, _, key) in mods.items():
        if p not in linears:
            raise ValueError(f"{key}: module {p!r} is not a Linear layer of this UNet (LoRA made for another model?)")
        m = linears[p]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{key}: bad LoRA shapes {tuple(A.shape)}, {tuple(B.shape)}")
        if A.shape[1] != m.in_features or B.shape[0] != m.out_features:
            raise ValueError(f"{key}: LoRA is {B.shape[0]}x{A.shape[1]} but {p} is {m.out_features}x{m.in_features} "
                             "(LoRA made for another model?)")
        if p in existing and existing[p][0].shape[0] != A.shape[0]:
            raise ValueError(f"{key}: rank {A.shape[0]} in file but adapter {name!r} has rank "
                             f"{existing[p][0].shape[0]}")
    if existing and set(existing) != set(mods):
        diff = sorted(set(existing) ^ set(mods))
        raise ValueError(f"adapter {name!r} covers other modules than {path}, e.g. {diff[0]}")
    with torch.no_grad():
        for p, (A, B, alpha, _) in mods.items():
            m = linears[p]
            if not existing:
                m = _wrap(unet, p, name)
                m.add(name, A.shape[0], alpha)
            m.alpha[name] = alpha
            m.lora_A[name].copy_(A)
            m.lora_B[name].copy_(B)
    return sorted(mods)


def write_vera(layers, path, projection=None, seed=0):
    """Write {module path: (d, b)} in PEFT's VeRA format, with the shared `projection` (A, B) when given (PEFT's
    save_projection=True), else only `seed` to regenerate it. An existing folder gets PEFT's save_pretrained layout
    (adapter_model.safetensors, adapter_config.json); any other path is one file with that JSON in its header."""
    t = lambda x: x.detach().to("cpu").contiguous().clone()
    out = {f"base_model.model.{p}.vera_lambda_{k}": t(v) for p, pair in layers.items() for k, v in zip("db", pair)}
    if projection is not None:
        out["base_model.vera_A"], out["base_model.vera_B"] = map(t, projection)
    cfg = dict(peft_type="VERA", r=next(iter(layers.values()))[0].shape[0], target_modules=sorted(layers),
               projection_prng_key=seed, save_projection=projection is not None, d_initial=VERA_D_INITIAL,
               vera_dropout=0.0, bias="none", fan_in_fan_out=False, inference_mode=True)
    config = json.dumps(cfg, indent=2, sort_keys=True)
    if not os.path.isdir(path):
        write_safetensors(out, path, {VERA_CONFIG: config})
        return
    write_safetensors(out, os.path.join(path, VERA_WEIGHTS), {"format": "pt"})
    with open(os.path.join(path, VERA_CONFIG), "w") as f:
        f.write(config)


def read_vera(path):
    """A PEFT VeRA adapter (a folder, or one file from `write_vera`) as ({module path: (d, b)}, projection or None,
    config), no UNet needed."""
    folder = os.path.isdir(path)
    sd, header = _read(os.path.join(path, VERA_WEIGHTS) if folder else path)
    if folder:
        with open(os.path.join(path, VERA_CONFIG)) as f:
            cfg = json.load(f)
    elif VERA_CONFIG in header:
        cfg = json.loads(header[VERA_CONFIG])
    else:
        raise ValueError(f"{path}: no {VERA_CONFIG} in the header (not a VeRA file?)")
    if cfg.get("peft_type") != "VERA" or cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: not a VeRA adapter without bias (peft_type {cfg.get('peft_type')!r})")
    projection = (sd.pop("base_model.vera_A"), sd.pop("base_model.vera_B")) if "base_model.vera_A" in sd else None
    groups = {}
    for k, v in sd.items():
        m = re.fullmatch(r"base_model\.model\.([\w.]+)\.vera_lambda_(d|b)", k)
        if not m:
            raise ValueError(f"{k}: not a UNet VeRA key of PEFT's format")
        groups.setdefault(m.group(1), {})[m.group(2)] = v
    for p, g in groups.items():
        if len(g) != 2:
            raise ValueError(f"{path}: module {p} has vera_lambda_{''.join(g)} only")
    return {p: (g["d"], g["b"]) for p, g in groups.items()}, projection, cfg


def load_vera(unet, path, name):
    """Load a PEFT VeRA adapter (folder or file) into the new adapter `name`; a file without the projection gets it
    from its projection_prng_key. Everything is checked before the UNet is touched. Returns the module paths."""
    layers, projection, cfg = read_vera(path)
    linears = {p: m for p, m in unet.named_modules() if isinstance(m, nn.Linear)}
    for p, (d, b) in layers.items():
        if p not in linears:
            raise ValueError(f"{path}: module {p!r} is not a Linear layer of this UNet (VeRA made for another model?)")
        if d.shape != (cfg["r"],) or b.shape != (linears[p].out_features,):
            raise ValueError(f"{p}: VeRA vectors {tuple(d.shape)}, {tuple(b.shape)} do not fit r={cfg['r']} and "
                             f"{linears[p].out_features} outputs")
    paths = inject(unet, tuple(layers), cfg["r"], 0.0, name, "vera", projection, cfg.get("projection_prng_key", 0))
    set_adapter(unet, name, layers)
    return sorted(paths)
