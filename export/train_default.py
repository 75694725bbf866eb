"""Train cpuflow's default model: a tiny Stable Diffusion on the toy world.

The whole SD architecture, small, trained from scratch on CPU:

1. an ``AutoencoderKL`` (64x64x3 <-> 8x8x4) trained as an autoencoder
   (MSE + a small KL term); its ``scaling_factor`` is 1/std of its latents;
2. a CLIP-format byte-level BPE tokenizer built for the world's words;
3. a ``CLIPTextModel`` and a ``UNet2DConditionModel`` (cross-attention)
   trained jointly on cached VAE latents with the SD noise schedule
   (scaled_linear 0.00085..0.012, 1000 steps), epsilon prediction, 10%
   caption dropout (the empty prompt) for classifier-free guidance, AdamW,
   min-SNR(5) loss weighting and an EMA of the weights.

It writes a complete diffusers folder (PNDM scheduler with SD 1.5 values),
reloads it and checks every tensor, and evaluates it with diffusers'
``StableDiffusionPipeline`` on ``cpuflow.toyworld.held_out_prompts()``.

    python export/train_default.py --out .cache/default-model [--minutes 40] [--seed 0]
    python export/train_default.py --out .cache/default-model --eval-only

Fine-tuning an existing model (VAE kept, so the latent space is unchanged):
``--init-from DIR`` with ``--caption-dropout``, ``--guidance-distill K`` (distil the
loaded model into one whose guidance w samples like the original's w / K) and
``--extrap-prob/--extrap-max/--extrap-k`` (latent-extrapolation augmentation);
see bench/default_model_training.md (v2).

A guidance-friendly latent space (v3 attempt, off by default): ``--vae-radial``,
``--vae-radial-max``, ``--vae-pixel-anchor``; stages can run separately with
``--vae-only`` then ``--vae-from DIR``; see bench/default_model_training.md (v3).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cpuflow import toyworld as tw  # noqa: E402

# ---------------------------------------------------------------- sizes ----
VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),
    # few groups: GroupNorm with 1 channel per group wipes out flat colours
    layers_per_block=1, latent_channels=4, norm_num_groups=2,
    sample_size=64,
)
TEXT_HIDDEN = 64
TEXT_CONFIG = dict(
    hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
    num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
    hidden_act="quick_gelu", projection_dim=TEXT_HIDDEN,
)
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64), layers_per_block=1,
    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=8,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", trained_betas=None, skip_prk_steps=True,
    set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    timestep_spacing="leading",
)
SEEDS_PER_KIND = 16  # geometry seeds per (colour, shape, background): 2688 images


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------ tokenizer ----
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE learning (deterministic ties) until every word is one token."""
    b2u = bytes_to_unicode()
    segs = {}
    for w in words:
        chars = [b2u[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        segs[w] = list(chars)
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in segs.values():
            for p in zip(s, s[1:]):
                counts[p] = counts.get(p, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out


def write_tokenizer(path: Path) -> None:
    """CLIP-format tokenizer files: vocab.json, merges.txt, configs."""
    path.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(tw.vocabulary())
    base = list(bytes_to_unicode().values())
    vocab_list = base + [v + "</w>" for v in base]
    for a, b in merges:
        if a + b not in vocab_list:
            vocab_list.append(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps({
        **special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "do_lower_case": True, "add_prefix_space": False, "errors": "replace",
        "clean_up_tokenization_spaces": True,
    }, indent=2))


def load_tokenizer(path: Path):
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(path))
    ids = tok("a red circle on a blue background").input_ids
    words = [tok.convert_ids_to_tokens(i) for i in ids]
    assert words == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "on</w>",
                     "a</w>", "blue</w>", "background</w>", "<|endoftext|>"], words
    return tok


def tokenize(tok, prompts: list[str]) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length,
               truncation=True, return_tensors="pt").input_ids


# ------------------------------------------------------------- dataset ----
def build_images(seeds_per_kind: int) -> tuple[torch.Tensor, list[tw.Attrs]]:
    kinds = tw.all_attrs()
    imgs, attrs = [], []
    for k, a in enumerate(kinds):
        for s in range(seeds_per_kind):
            imgs.append(tw.render_array(a, seed=k * 1000 + s))
            attrs.append(a)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, attrs


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def to_pil(x: torch.Tensor):
    from PIL import Image
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(a)


# ----------------------------------------------------------------- VAE ----
def train_vae(images: torch.Tensor, steps: int, batch: int, lr: float, deadline: float,
              radial_prob: float = 0.0, radial_max: float = 5.0, pixel_anchor: float = 0.0,
              stop_after: int = 0):
    """Train the autoencoder (MSE + 1e-6 KL).

    Guidance-friendly latent space (both off by default; see
    bench/default_model_training.md, v3):

    * ``radial_prob``: that fraction of each batch is decoded from the
      extrapolated latent ``m + s (z - m)`` (m: EMA of the mean latent,
      s ~ U[1, radial_max]) and must still reconstruct the image, so what
      classifier-free guidance does to an x0 estimate keeps the same picture;
    * ``pixel_anchor``: weight of an MSE pulling latent channels 0-2 towards
      the 8x8 average colour of the image, so the latent space is nearly
      linear in colour (extrapolating a colour stays nearest that colour).
    """
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():  # start near-deterministic: posterior std e^-4, not 1
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"]:].fill_(-8.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    n = images.shape[0]
    t0, run = time.time(), []
    vae.train()
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, steps, lr, 50)
        idx = torch.randint(0, n, (batch,), generator=g)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        if radial_prob > 0:
            with torch.no_grad():
                bm = post.mean.mean(0, keepdim=True)
                lat_m = bm if step == 0 else lat_m.lerp_(bm, 0.05)
            pick = (torch.rand(batch, generator=g) < radial_prob).float()
            sc = 1 + pick * torch.rand(batch, generator=g) * (radial_max - 1)
            z = lat_m + sc.view(-1, 1, 1, 1) * (z - lat_m)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean()  # summed over latent elements, mean over batch
        loss = mse + 1e-6 * kl
        if pixel_anchor > 0:
            loss = loss + pixel_anchor * F.mse_loss(post.mean[:, :3], F.avg_pool2d(x, 8))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        run.append((mse.item(), kl.item()))
        if (step + 1) % 50 == 0 or step == 0:
            m = np.mean(run[-50:], axis=0)
            log(f"vae step {step + 1}/{steps} mse {m[0]:.5f} kl {m[1]:.1f} "
                f"({(time.time() - t0) / (step + 1):.3f}s/step)")
        if time.time() > deadline:
            log(f"vae: time budget reached at step {step + 1}")
            break
        if step + 1 == stop_after:  # replay a budget-cut run step for step
            log(f"vae: stopping after step {step + 1} (--vae-stop-after)")
            break
    vae.eval()
    return vae, {"steps": step + 1, "seconds": time.time() - t0,
                 "final_mse": float(np.mean([r[0] for r in run[-100:]])),
                 "final_kl": float(np.mean([r[1] for r in run[-100:]]))}


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 128):
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(images[i:i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_roundtrip_accuracy(vae, mean, attrs, n: int = 336) -> dict:
    idx = list(range(0, mean.shape[0], max(1, mean.shape[0] // n)))[:n]
    rec = vae.decode(mean[idx]).sample
    res = [tw.evaluate(to_pil(rec[j]), attrs[i]) for j, i in enumerate(idx)]
    return tw.accuracy(res)


@torch.no_grad()
def vae_extrap_check(vae, mean, attrs, scales=(1.0, 2.0, 3.0, 5.0), n: int = 336) -> dict:
    """Guidance-friendliness of the latent space, per extrapolation scale s
    around the mean latent m (z' = m + s (z - m)):

    * ``decoded``: evaluator accuracy of decode(z') against z's picture;
    * ``nearest``: how often the data latent nearest to z' (L2) has z's
      attributes, for per-image latents and per-kind mean latents (what the
      UNet's x0 estimate is early on): a proxy for where the sampler goes.
    """
    kinds = tw.all_attrs()
    ki = {a: i for i, a in enumerate(kinds)}
    kid = torch.tensor([ki[a] for a in attrs])
    flat = mean.reshape(mean.shape[0], -1)
    m = flat.mean(0, keepdim=True)
    mu = torch.stack([flat[kid == k].mean(0) for k in range(len(kinds))])
    idx = list(range(0, mean.shape[0], max(1, mean.shape[0] // n)))[:n]
    out = {}
    for s in scales:
        rec = vae.decode((m + s * (flat[idx] - m)).view(-1, *mean.shape[1:])).sample
        dec = tw.accuracy([tw.evaluate(to_pil(rec[j]), attrs[i]) for j, i in enumerate(idx)])
        near = {}
        for name, src, want in (("image", flat, list(attrs)), ("kind_mean", mu, kinds)):
            nn_ = torch.cdist(m + s * (src - m), flat).argmin(1).tolist()
            near[name] = {f: float(np.mean([getattr(attrs[j], f) == getattr(w, f)
                                            for j, w in zip(nn_, want)])) for f in tw.ATTRIBUTES}
        out[str(s)] = {"decoded": dec, "nearest": near}
        log(f"latent extrapolation s={s}: decoded {dec} nearest {near}")
    return out


# ---------------------------------------------------------- UNet + CLIP ----
def train_unet(lat_mean, lat_std, attrs, tok, text_vocab, steps, batch, lr, deadline,
               scaling, dropout=0.1, ema_decay=0.999, snr_gamma=5.0, out=None,
               save_fn=None, init=None, extrap_prob=0.0, extrap_max=3.0, extrap_k=1.0,
               warmup=300, save_every=2000, teacher=None, guidance_div=1.0, pair_guidance=0.0):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    bos = tok.convert_tokens_to_ids("<|startoftext|>")
    if init is not None:  # fine-tune: start from a trained (unet, text encoder)
        unet, text = init
    else:
        text_cfg = CLIPTextConfig(vocab_size=text_vocab, bos_token_id=bos, eos_token_id=eos,
                                  pad_token_id=eos, **TEXT_CONFIG)
        text = CLIPTextModel(text_cfg)
        unet = UNet2DConditionModel(**UNET_CONFIG)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type="epsilon")
    ac = sched.alphas_cumprod.float()
    snr = ac / (1 - ac)
    w_t = torch.clamp(snr, max=snr_gamma) / snr  # min-SNR weighting, epsilon target
    # latent-extrapolation augmentation (guidance robustness): the UNet input is
    # built from an over-saturated latent m + s (x0 - m) (m = mean latent, s > 1:
    # what classifier-free guidance does to the x0 estimate), but the target is
    # the epsilon that points back to the clean x0, so off-manifold states drift
    # back to the data.  The extra epsilon is capped: s - 1 <= k / sqrt(snr_t).
    s_cap = torch.clamp(extrap_k / snr.sqrt(), max=extrap_max - 1.0)
    sqrt_ac, sqrt_1m = ac.sqrt(), (1 - ac).sqrt()
    lat_m = (lat_mean * scaling).mean(0, keepdim=True)

    # token ids for every (picture kind, training template) + the empty prompt
    kinds = tw.all_attrs()
    kind_index = {a: i for i, a in enumerate(kinds)}
    nt = len(tw.TRAIN_TEMPLATES)
    prompts = [tw.format_prompt(a, t) for a in kinds for t in tw.TRAIN_TEMPLATES]
    table = tokenize(tok, prompts).view(len(kinds), nt, -1)
    empty = tokenize(tok, [""])[0]
    kind_of = torch.tensor([kind_index[a] for a in attrs])

    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    for p in list(ema_unet.parameters()) + list(ema_text.parameters()):
        p.requires_grad_(False)
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))

    g = torch.Generator().manual_seed(2)
    n = lat_mean.shape[0]
    unet.train()
    text.train()
    t0, run, curve = time.time(), [], []
    warmup = min(warmup, steps // 10)
    paired = teacher is not None and pair_guidance > 0
    for step in range(10 ** 9):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, n, (batch,), generator=g)
        lat = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * scaling
        tsel = torch.randint(0, nt, (batch,), generator=g)
        ids = table[kind_of[idx], tsel]
        drop = torch.rand(batch, generator=g) < dropout
        ids[drop] = empty
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        if extrap_prob > 0:
            aug = (torch.rand(batch, generator=g) < extrap_prob).float()
            s = 1 + aug * torch.rand(batch, generator=g) * s_cap[t]
            a_, b_ = sqrt_ac[t].view(-1, 1, 1, 1), sqrt_1m[t].view(-1, 1, 1, 1)
            noisy = a_ * (lat_m + s.view(-1, 1, 1, 1) * (lat - lat_m)) + b_ * noise
            target = (noisy - a_ * lat) / b_
        else:
            noisy = sched.add_noise(lat, noise, t)
            target = noise
        if paired:
            # paired guidance distillation: both branches of the student run on
            # the same noisy latent and the loss also checks their guided
            # combination at w = pair_guidance against the teacher's at
            # w / guidance_div: what sampling uses, so errors the two branches
            # share cancel instead of being amplified w times
            prompt_ids = table[kind_of[idx], tsel]   # no caption dropout: "" runs on every latent
            with torch.no_grad():
                t_unet, t_text = teacher
                eu = t_unet(noisy, t, t_text(empty.expand_as(ids))[0]).sample
                ec = t_unet(noisy, t, t_text(prompt_ids)[0]).sample
                tc = eu + (ec - eu) / guidance_div
                tg = eu + pair_guidance * (tc - eu)
            both = text(torch.cat([prompt_ids, empty.expand_as(ids)]))[0]
            sc, su = unet(torch.cat([noisy, noisy]), torch.cat([t, t]), both).sample.chunk(2)
            sg = su + pair_guidance * (sc - su)
            per = (F.mse_loss(sg, tg, reduction="none").mean(dim=(1, 2, 3)) / pair_guidance
                   + F.mse_loss(sc, tc, reduction="none").mean(dim=(1, 2, 3))
                   + F.mse_loss(su, eu, reduction="none").mean(dim=(1, 2, 3)))
            loss = (per * w_t[t]).mean()
        elif teacher is not None:
            # guidance-scale distillation: the student's conditional branch
            # learns teacher_u + (teacher_c - teacher_u) / guidance_div and its
            # unconditional branch teacher_u, so the student at guidance w
            # samples like the teacher at w / guidance_div
            with torch.no_grad():
                t_unet, t_text = teacher
                eu = t_unet(noisy, t, t_text(empty.expand_as(ids))[0]).sample
                ec = t_unet(noisy, t, t_text(ids)[0]).sample
                target = eu + (ec - eu) / guidance_div
        if not paired:
            cond = text(ids)[0]
            pred = unet(noisy, t, cond).sample
            per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
            loss = (per * w_t[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in ema_pairs:
                pe.lerp_(p.detach(), 1 - d)
        run.append((loss.item(), per.mean().item()))
        if (step + 1) % 100 == 0 or step == 0:
            m = np.mean(run[-100:], axis=0)
            curve.append({"step": step + 1, "loss": float(m[0]), "mse": float(m[1]),
                          "seconds": time.time() - t0})
            log(f"unet step {step + 1}/{steps} loss {m[0]:.4f} mse {m[1]:.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} ({(time.time() - t0) / (step + 1):.3f}s/step)")
        if save_fn is not None and (step + 1) % save_every == 0 and step + 1 < steps:
            save_fn(ema_unet, ema_text, f"step {step + 1}")
        if step + 1 == 300:
            # fit the schedule to the wall-clock budget (logged; with a
            # generous --minutes the run is step-for-step reproducible)
            per = (time.time() - t0) / (step + 1)
            fit = step + 1 + int(0.97 * (deadline - time.time()) / per)
            if fit < steps:
                log(f"unet: {steps} steps would not fit the budget "
                    f"({per:.3f}s/step); shortening the schedule to {fit}")
                steps = fit
        if step + 1 >= steps:
            break
        if time.time() > deadline:
            log(f"unet: time budget reached at step {step + 1}")
            break
    info = {"steps": step + 1, "seconds": time.time() - t0,
            "final_loss": float(np.mean([r[0] for r in run[-200:]])),
            "final_mse": float(np.mean([r[1] for r in run[-200:]])), "curve": curve}
    return ema_unet, ema_text, info


# ------------------------------------------------------------- export ----
def save_pipeline(out: Path, vae, text, unet, tok_dir: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # the CLIP tokenizer files, exactly as built (vocab.json + merges.txt)
    for f in tok_dir.iterdir():
        (out / "tokenizer" / f.name).write_bytes(f.read_bytes())
    # transformers 5 drops the "text_model." prefix; write the classic SD
    # layout, which every transformers version (and other loaders) reads.
    te = out / "text_encoder" / "model.safetensors"
    sd = load_file(str(te))
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v.contiguous()
          for k, v in sd.items()}
    save_file(sd, str(te), metadata={"format": "pt"})


def verify_reload(out: Path, vae, text, unet) -> None:
    """Reload every component and assert each tensor equals the saved one."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    checks = [(AutoencoderKL, "vae", vae), (UNet2DConditionModel, "unet", unet),
              (CLIPTextModel, "text_encoder", text)]
    for cls, sub, ref in checks:
        m, info = cls.from_pretrained(str(out / sub), output_loading_info=True)
        for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            assert not info.get(k), f"{sub}: {k} = {info.get(k)}"
        a, b = ref.state_dict(), m.state_dict()
        assert set(a) == set(b), f"{sub}: key sets differ"
        for k in a:
            assert torch.equal(a[k], b[k]), f"{sub}: tensor {k} differs"
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None,
                                                   requires_safety_checker=False)
    for sub, ref in [("vae", vae), ("unet", unet), ("text_encoder", text)]:
        a, b = ref.state_dict(), getattr(pipe, sub).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b), sub
    log("reload check: every tensor of vae, unet, text_encoder equal after reload")


# ----------------------------------------------------------- evaluate ----
@torch.no_grad()
def evaluate_pipeline(out: Path, steps: int = 20, guidance: float = 5.0,
                      samples_dir: Path | None = None, batch: int = 24, limit: int = 0) -> dict:
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    train_prompts = []
    r = random.Random(5)
    for i, a in enumerate(r.sample(tw.all_attrs(), 48)):
        train_prompts.append((tw.format_prompt(a, tw.TRAIN_TEMPLATES[i % len(tw.TRAIN_TEMPLATES)]), a))
    sets = {"held_out": tw.held_out_prompts(), "train_wordings": train_prompts}
    if limit:  # a quick look (smoke tests), not the documented figures
        sets = {k: v[:limit] for k, v in sets.items()}
    t0 = time.time()
    for name, items in sets.items():
        res, rows = [], []
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            gens = [torch.Generator().manual_seed(1000 + i + j) for j in range(len(chunk))]
            imgs = pipe([p for p, _ in chunk], height=64, width=64, num_inference_steps=steps,
                        guidance_scale=guidance, generator=gens).images
            for j, ((p, a), im) in enumerate(zip(chunk, imgs)):
                e = tw.evaluate(im, a)
                res.append(e)
                rows.append({"prompt": p, **e, "read": {k: v for k, v in tw.analyze(im).items()
                                                        if k in tw.ATTRIBUTES}})
                if samples_dir is not None:
                    samples_dir.mkdir(parents=True, exist_ok=True)
                    im.save(samples_dir / f"{name}_{i + j:03d}.png")
        results[name] = {"accuracy": tw.accuracy(res), "rows": rows}
        log(f"eval {name}: {results[name]['accuracy']}")
    results["seconds"] = time.time() - t0
    return results


def model_sizes(out: Path) -> dict:
    sizes = {}
    for sub in ("vae", "text_encoder", "unet"):
        f = next((out / sub).glob("*.safetensors"))
        sizes[sub] = f.stat().st_size
    return sizes


# ---------------------------------------------------------------- main ----
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "default-model")
    ap.add_argument("--minutes", type=float, default=40.0,
                    help="wall-clock budget; training stops early (logged) past it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1100)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=3e-3)
    ap.add_argument("--unet-steps", type=int, default=8000)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is far faster than 2 on a shared 2-core box (OpenMP spin)")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--guidance", type=float, default=5.0, help="CFG scale for the evaluation")
    ap.add_argument("--samples", type=Path, default=None, help="save eval PNGs here")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="fine-tune: load vae/tokenizer/text encoder/unet from this diffusers "
                         "folder; the VAE (and so the latent space) is kept as is")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--unet-warmup", type=int, default=300)
    ap.add_argument("--extrap-prob", type=float, default=0.0,
                    help="fraction of UNet samples built from an extrapolated latent "
                         "(guidance-robustness augmentation; 0 = off)")
    ap.add_argument("--extrap-max", type=float, default=3.0, help="largest extrapolation s")
    ap.add_argument("--extrap-k", type=float, default=1.0, help="cap s - 1 <= k / sqrt(snr)")
    ap.add_argument("--save-every", type=int, default=2000)
    ap.add_argument("--guidance-distill", type=float, default=0.0,
                    help="with --init-from: distil the loaded model (teacher) into a student "
                         "whose guidance w samples like the teacher's w / this (0 = off)")
    ap.add_argument("--distill-pair-guidance", type=float, default=0.0,
                    help="with --guidance-distill: run both student branches on each latent and also "
                         "fit their guided combination at this guidance (e.g. 5) (0 = off)")
    ap.add_argument("--vae-radial", type=float, default=0.0,
                    help="fraction of each VAE batch decoded from m + s (z - m), s ~ U[1, "
                         "--vae-radial-max], that must still reconstruct the image (0 = off)")
    ap.add_argument("--vae-radial-max", type=float, default=5.0)
    ap.add_argument("--vae-pixel-anchor", type=float, default=0.0,
                    help="weight of an MSE pulling latent channels 0-2 to the image's 8x8 "
                         "average colour (a colour-linear latent space; 0 = off)")
    ap.add_argument("--vae-stop-after", type=int, default=0,
                    help="stop the VAE stage after this step of its --vae-steps schedule "
                         "(replays a run the time budget cut, step for step; 0 = off)")
    ap.add_argument("--vae-only", action="store_true",
                    help="stop after the VAE stage: write OUT/vae and its latent checks")
    ap.add_argument("--vae-from", type=Path, default=None,
                    help="skip the VAE stage: load OUT-style DIR/vae (from --vae-only) and train "
                         "the tokenizer, text encoder and UNet from scratch on its latents")
    ap.add_argument("--eval-n", type=int, default=0,
                    help="evaluate only the first N prompts of each set (0 = all 72 + 48: the documented figures)")
    ap.add_argument("--eval-guidances", default="",
                    help="comma list of extra guidance scales evaluated after training, e.g. 1,2,3,7.5")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    if args.eval_only:
        res = evaluate_pipeline(out, guidance=args.guidance, samples_dir=args.samples, limit=args.eval_n)
        print(json.dumps({k: v["accuracy"] for k, v in res.items() if isinstance(v, dict)}, indent=1))
        return 0

    t_start = time.time()
    deadline = t_start + args.minutes * 60
    if args.init_from is not None:
        return finetune(args, out, t_start, deadline)
    seed_all(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="cpuflow-tok-"))
    write_tokenizer(tmp)
    tok = load_tokenizer(tmp)
    text_vocab = len(json.loads((tmp / "vocab.json").read_text()))
    log(f"tokenizer: {text_vocab} ids, {sum(1 for _ in open(tmp / 'merges.txt')) - 1} merges")

    images, attrs = build_images(SEEDS_PER_KIND)
    log(f"dataset: {images.shape[0]} images of {len(tw.all_attrs())} kinds")

    # stage 1: VAE (at most 25% of the budget)
    seed_all(args.seed)
    if args.vae_from is not None:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(str(args.vae_from.resolve() / "vae")).eval()
        vae_info = json.loads((args.vae_from.resolve() / "vae_summary.json").read_text())
        lat_mean, lat_std = encode_all(vae, images)
        scaling = float(vae.config.scaling_factor)
        log(f"vae loaded from {args.vae_from} (trained in {vae_info['seconds']:.0f}s)")
    else:
        vae, vae_info = train_vae(images, args.vae_steps, args.vae_batch, args.vae_lr,
                                  t_start + 0.25 * args.minutes * 60, radial_prob=args.vae_radial,
                                  radial_max=args.vae_radial_max, pixel_anchor=args.vae_pixel_anchor,
                                  stop_after=args.vae_stop_after)
        lat_mean, lat_std = encode_all(vae, images)
        g = torch.Generator().manual_seed(3)
        sampled = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=g)
        scaling = float(1.0 / sampled.std())
        vae.register_to_config(scaling_factor=scaling)
        vae_info["scaling_factor"] = scaling
        vae_info["roundtrip_accuracy"] = vae_roundtrip_accuracy(vae, lat_mean, attrs)
        log(f"vae done: {vae_info}")
        if args.vae_radial > 0 or args.vae_pixel_anchor > 0 or args.vae_only:
            vae_info["extrapolation"] = vae_extrap_check(vae, lat_mean, attrs)
        if args.vae_only:
            out.mkdir(parents=True, exist_ok=True)
            vae.save_pretrained(str(out / "vae"), safe_serialization=True)
            (out / "vae_summary.json").write_text(json.dumps(vae_info, indent=1))
            log(f"vae written to {out / 'vae'}; total {time.time() - t_start:.0f}s")
            return 0

    # stage 2: UNet + text encoder
    def save_fn(u, t, why):
        save_pipeline(out, vae, t, u, tmp)
        log(f"saved {why} to {out}")

    seed_all(args.seed + 1)
    unet, text, unet_info = train_unet(
        lat_mean, lat_std, attrs, tok, text_vocab, args.unet_steps, args.unet_batch,
        args.unet_lr, deadline, scaling, save_fn=save_fn, dropout=args.caption_dropout,
        extrap_prob=args.extrap_prob, extrap_max=args.extrap_max, extrap_k=args.extrap_k,
        warmup=args.unet_warmup, save_every=args.save_every)
    train_seconds = time.time() - t_start
    log(f"unet done: steps {unet_info['steps']} loss {unet_info['final_loss']:.4f}")

    save_pipeline(out, vae, text, unet, tmp)
    verify_reload(out, vae, text, unet)
    sizes = model_sizes(out)
    params = {"vae": sum(p.numel() for p in vae.parameters()),
              "text_encoder": sum(p.numel() for p in text.parameters()),
              "unet": sum(p.numel() for p in unet.parameters())}
    log(f"params {params} file bytes {sizes}")

    res = evaluate_pipeline(out, guidance=args.guidance, samples_dir=args.samples, limit=args.eval_n)
    sweep = {}
    for gs in [float(v) for v in args.eval_guidances.split(",") if v.strip()]:
        log(f"eval at guidance {gs}")
        sweep[str(gs)] = evaluate_pipeline(
            out, guidance=gs, samples_dir=(args.samples / f"g{gs}") if args.samples else None, limit=args.eval_n)
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_seconds": train_seconds, "vae": vae_info, "unet": unet_info,
        "params": params, "file_bytes": sizes,
        "eval": {k: v for k, v in res.items()}, "eval_sweep": sweep,
        "configs": {"vae": VAE_CONFIG, "text": TEXT_CONFIG, "unet": UNET_CONFIG},
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log(f"total {time.time() - t_start:.0f}s; summary in {out / 'train_summary.json'}")
    return 0


def finetune(args, out: Path, t_start: float, deadline: float) -> int:
    """Continue training the UNet + text encoder of an existing model (VAE kept)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src = args.init_from.resolve()
    assert src != out, "--init-from and --out must differ"
    tok_dir = Path(tempfile.mkdtemp(prefix="cpuflow-tok-"))
    for f in (src / "tokenizer").iterdir():
        (tok_dir / f.name).write_bytes(f.read_bytes())
    tok = load_tokenizer(tok_dir)
    text_vocab = len(json.loads((tok_dir / "vocab.json").read_text()))
    vae = AutoencoderKL.from_pretrained(str(src / "vae")).eval()
    unet = UNet2DConditionModel.from_pretrained(str(src / "unet"))
    text = CLIPTextModel.from_pretrained(str(src / "text_encoder"))
    scaling = float(vae.config.scaling_factor)
    log(f"fine-tuning from {src} (vae kept, scaling_factor {scaling:.5f})")

    images, attrs = build_images(SEEDS_PER_KIND)
    lat_mean, lat_std = encode_all(vae, images)

    def save_fn(u, t, why):
        save_pipeline(out, vae, t, u, tok_dir)
        log(f"saved {why} to {out}")

    teacher = None
    if args.guidance_distill > 0:
        teacher = (copy.deepcopy(unet).eval().requires_grad_(False),
                   copy.deepcopy(text).eval().requires_grad_(False))
    seed_all(args.seed + 1)
    unet, text, unet_info = train_unet(
        lat_mean, lat_std, attrs, tok, text_vocab, args.unet_steps, args.unet_batch,
        args.unet_lr, deadline, scaling, dropout=args.caption_dropout, save_fn=save_fn,
        init=(unet, text), teacher=teacher, guidance_div=args.guidance_distill or 1.0,
        pair_guidance=args.distill_pair_guidance, extrap_prob=args.extrap_prob, extrap_max=args.extrap_max,
        extrap_k=args.extrap_k, warmup=args.unet_warmup, save_every=args.save_every)
    train_seconds = time.time() - t_start
    log(f"unet done: steps {unet_info['steps']} loss {unet_info['final_loss']:.4f}")
    save_pipeline(out, vae, text, unet, tok_dir)
    verify_reload(out, vae, text, unet)
    evals = {}
    for gs in (1.0, 2.0, 3.0, 5.0, 7.5):
        res = evaluate_pipeline(out, guidance=gs, limit=args.eval_n,
                                samples_dir=(args.samples / f"g{gs}") if args.samples else None)
        evals[str(gs)] = {k: v for k, v in res.items()}
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_seconds": train_seconds, "unet": unet_info, "eval": evals,
        "file_bytes": model_sizes(out),
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log(f"total {time.time() - t_start:.0f}s; summary in {out / 'train_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
