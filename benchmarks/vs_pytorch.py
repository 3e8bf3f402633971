"""amd_jax's train step against the same step in PyTorch (eager, CPU), timed side by side; appends docs/benchmarks.md.

The PyTorch side is written here from the official architectures, with plain torch modules:
pre-LN blocks (LayerNorm eps 1e-6, exact GELU), one fused qkv weight with the config's bias
layout (VideoMAE: learnable q and v biases, k bias a constant zero; ImageMAE: one bias),
attention as the official code writes it (q * scale @ k^T, softmax, @ v; `--torch_attention
sdpa` adds F.scaled_dot_product_attention as a second PyTorch variant), fixed sine-cosine
position tables, and
- VideoMAE: tube mask as a boolean [B, N] mask, encoder on x[~mask], encoder_to_decoder
  without bias, decoder input cat([x_vis + P[vis], mask_token + P[masked]]), head on the
  masked tokens, per-patch-per-channel normalised pixel target;
- ImageMAE (the quickstart): MAE's random_masking by argsort of noise, cls token,
  decoder_embed with bias, un-shuffle of the decoder input, head on every token, loss on
  the masked ones, per-patch normalised target;
- AMD: the nested mask (student-visible < diff < masked from one permutation), the frozen
  teacher (eval mode, no_grad, no final norm, only up to its deepest aligned block) on
  cat([x[student-visible], x[diff]]), bias-free projections of the student's pre-norm block
  outputs (one per layer pair, shared by both paths), generators of `generator_depth` blocks
  at the teacher width on cat([proj + P_t[vis], m_i + P_t[diff]]), L = L_rec + L_dir + L_gen;
- AdamW (torch.optim.AdamW, default implementation) with weight decay on weight matrices only,
  and global-norm clipping when the config clips.
Every size comes from the amd_jax config of the case, so both sides have the same shapes; the
script checks that both hold the same number of trainable parameters.

The JAX side is benchmarks/step.StepBench: the loop's own compiled step.

Timing: rounds of (PyTorch steps, JAX steps), each side's median step time per round; the
ratio JAX / PyTorch is taken per round and its median reported (< 1: amd_jax is faster).
float32 on both sides; torch.set_num_threads(the cores this process may run on).

  python benchmarks/vs_pytorch.py --cases quickstart_mae,quickstart_amd,small_mae_b256,small_mae_b32
  python benchmarks/vs_pytorch.py --cases official_videomae,official_amd --steps 2 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import einops  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from torch import nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,wrong-import-position

import step as step_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax import config_base, masking  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.models import posemb, vit  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# name -> (config spec, overrides, description)
CASES = {
    "official_videomae": ("configs/videomae_vit_s_ssv2.py", ["batch_size=2", "model.dtype=float32"],
                          "VideoMAE ViT-S, 16x224x224 clips, tube mask 0.9, decoder 192x4, batch 2"),
    "official_amd": ("configs/amd_vit_s_ssv2.py",
                     ["batch_size=2", "model.dtype=float32", "teacher.model.dtype=float32", "teacher.checkpoint=random"],
                     "AMD ViT-S student / ViT-L teacher, 16x224x224 clips, masks 0.9 / 0.75, batch 2"),
    "quickstart_mae": ("configs/quickstart.py:stage=mae", [],
                       "quickstart MAE student: 28x28x1, 49 tokens, 64 wide 4 deep, decoder 64x1, batch 256"),
    "quickstart_amd": ("configs/quickstart.py:stage=amd,teacher=random", [],
                       "quickstart AMD: student 64x4, teacher 128x4, masks 0.75 / 0.5, batch 256"),
    "small_mae_b256": ("configs/quickstart.py:stage=mae",
                       ["model.width=96", "model.depth=6", "model.num_heads=3", "data.image_size=32"],
                       "small MAE: 32x32x1, 64 tokens (mask 0.75), 96 wide 6 deep 3 heads, decoder 64x1, batch 256"),
    "small_mae_b32": ("configs/quickstart.py:stage=mae",
                      ["model.width=96", "model.depth=6", "model.num_heads=3", "data.image_size=32", "batch_size=32"],
                      "small MAE as above, batch 32"),
}


# ------------------------------------------------------------------------------------------------ modules
class Attention(nn.Module):
  def __init__(self, dim: int, heads: int, qkv_bias: str, sdpa: bool):
    super().__init__()
    self.heads, self.scale, self.sdpa = heads, (dim // heads) ** -0.5, sdpa
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias == "fused")
    if qkv_bias == "qv":
      self.q_bias = nn.Parameter(torch.zeros(dim))
      self.v_bias = nn.Parameter(torch.zeros(dim))
    else:
      self.q_bias = self.v_bias = None
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    if self.q_bias is not None:
      bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
      qkv = F.linear(x, self.qkv.weight, bias)
    else:
      qkv = self.qkv(x)
    qkv = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if self.sdpa:
      out = F.scaled_dot_product_attention(q, k, v)
    else:
      attn = (q * self.scale) @ k.transpose(-2, -1)
      out = attn.softmax(dim=-1) @ v
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: str, sdpa: bool):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads, qkv_bias, sdpa)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    hidden = int(dim * mlp_ratio)
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def _table(kind: str, dim: int, grid: tuple[int, ...], cls: bool) -> torch.Tensor:
  """Fixed position table [1, (1 if cls) + N, dim] (the cls row is zeros)."""
  return torch.from_numpy(posemb.make_table(kind, dim, grid, cls_token=cls)).float()[None]


class Encoder(nn.Module):
  """Patch embedding + fixed table, blocks, optional final norm; block outputs on request."""

  def __init__(self, spec: dict, width: int, depth: int, heads: int, mlp_ratio: float, sdpa: bool,
               final_norm: bool = True):
    super().__init__()
    p, t, c = spec["patch"], spec["tubelet"], spec["channels"]
    if spec["video"]:
      self.proj = nn.Conv3d(c, width, (t, p, p), stride=(t, p, p))
    else:
      self.proj = nn.Conv2d(c, width, p, stride=p)
    self.register_buffer("pos", _table(spec["pos_emb"], width, spec["grid"], False), persistent=False)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if spec["cls"] else None
    self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, spec["qkv_bias"], sdpa) for _ in range(depth)])
    self.norm = nn.LayerNorm(width, eps=1e-6) if final_norm else None

  def embed(self, x):
    return self.proj(x).flatten(2).transpose(1, 2) + self.pos

  def with_cls(self, x):
    if self.cls_token is None:
      return x
    return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

  def run(self, x, layers=(), depth=None):
    outs = {}
    for i, blk in enumerate(self.blocks[:depth]):
      x = blk(x)
      if i + 1 in layers:
        outs[i + 1] = x
    if self.norm is not None:
      x = self.norm(x)
    return x, outs


class MaskedDecoder(nn.Module):
  """VideoMAE's decoder layout: cat([x_vis + P[vis], mask_token + P[masked]]) -> blocks -> norm/head on the last M."""

  def __init__(self, spec: dict, in_dim: int, width: int, depth: int, heads: int, mlp_ratio: float, sdpa: bool,
               embed: str, out_dim: int, final_norm: bool = True):
    super().__init__()
    self.embed = nn.Linear(in_dim, width, bias=embed == "bias") if embed != "none" else None
    self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
    self.register_buffer("pos", _table(spec["pos_emb"], width, spec["grid"], False), persistent=False)
    self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, spec["qkv_bias"], sdpa) for _ in range(depth)])
    self.norm = nn.LayerNorm(width, eps=1e-6) if final_norm else None
    self.head = nn.Linear(width, out_dim) if out_dim else None

  def forward(self, x, vis, target, has_cls: bool = False):
    if self.embed is not None:
      x = self.embed(x)
    b, _, c = x.shape
    pos = self.pos.expand(b, -1, -1)
    pos_vis, pos_t = pos[vis].reshape(b, -1, c), pos[target].reshape(b, -1, c)
    parts = [x[:, :1]] if has_cls else []
    body = x[:, 1:] if has_cls else x
    parts += [body + pos_vis, self.mask_token + pos_t]
    h = torch.cat(parts, dim=1)
    for blk in self.blocks:
      h = blk(h)
    h = h[:, -pos_t.shape[1]:]
    if self.norm is not None:
      h = self.norm(h)
    return self.head(h) if self.head is not None else h


def _spec(config) -> dict:
  m, d = config.model, config.data
  video = d.modality == "video"
  shape = (d.num_frames, d.image_size, d.image_size, d.channels) if video else (d.image_size, d.image_size, d.channels)
  grid = vit.token_grid(shape, m.patch_size, m.tubelet_size if video else 0)
  return dict(video=video, patch=m.patch_size, tubelet=m.tubelet_size if video else 1, channels=d.channels,
              grid=grid.shape, num_tokens=grid.num_tokens, tokens_per_frame=grid.tokens_per_frame, cls=m.cls_token,
              qkv_bias=m.qkv_bias, pos_emb=m.pos_emb, mean=config_base.parse_floats(d.mean),
              std=config_base.parse_floats(d.std), norm_pix=config.norm_pix_loss, kind=config.mask.kind)


def _pixel_target(x, spec: dict):
  """Normalised pixel targets of every token: images per patch, videos per patch and channel."""
  p, t = spec["patch"], spec["tubelet"]
  with torch.no_grad():
    if spec["video"]:
      mean = torch.tensor(spec["mean"]).view(1, -1, 1, 1, 1)
      std = torch.tensor(spec["std"]).view(1, -1, 1, 1, 1)
      raw = x * std + mean
      tok = einops.rearrange(raw, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=t, p1=p, p2=p)
      if spec["norm_pix"]:
        tok = (tok - tok.mean(dim=-2, keepdim=True)) / (tok.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
      return einops.rearrange(tok, "b n p c -> b n (p c)")
    tok = einops.rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)
    if spec["norm_pix"]:
      tok = (tok - tok.mean(dim=-1, keepdim=True)) / (tok.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    return tok


def _draw_masks(spec: dict, b: int, ratios: list[float]) -> list[torch.Tensor]:
  """Boolean [B, N] masks of consecutive groups of one random permutation (tube: per frame, repeated).

  Returns one mask per group: ratios r1 > r2 > ... give visible counts k1 < k2; the groups
  are [0, k1), [k1, k2), ..., [k_last, P) of the permutation.
  """
  s = masking.MaskSpec(spec["num_tokens"], spec["tokens_per_frame"], spec["kind"])
  positions = spec["tokens_per_frame"] if spec["kind"] == "tube" else spec["num_tokens"]
  bounds = [masking.num_visible(s, r) // (s.num_frames if spec["kind"] == "tube" else 1) for r in ratios]
  order = torch.argsort(torch.rand(b, positions), dim=1)
  rank = torch.argsort(order, dim=1)   # rank[b, pos]: where pos falls in the permutation
  edges = [0] + bounds + [positions]
  masks = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    m = (rank >= lo) & (rank < hi)
    if spec["kind"] == "tube":
      m = m.repeat(1, s.num_frames)
    masks.append(m)
  return masks


class TorchVideoMAE(nn.Module):
  """VideoMAE pre-training (official layout); also AMD's student when `amd` is given."""

  def __init__(self, config, sdpa: bool, amd: bool = False):
    super().__init__()
    self.config, self.spec = config, _spec(config)
    m, d = config.model, config.decoder
    w, depth, heads = vit.resolve_variant(m.variant, m.width, m.depth, m.num_heads)
    spec = self.spec
    self.encoder = Encoder(spec, w, depth, heads, m.mlp_ratio, sdpa)
    patch_dim = spec["patch"] ** 2 * spec["tubelet"] * spec["channels"]
    self.decoder = MaskedDecoder(spec, w, d.width, d.depth, d.num_heads, d.mlp_ratio, sdpa,
                                 embed="nobias" if spec["video"] else "bias", out_dim=patch_dim)
    self.amd = amd
    if amd:
      a, t = config.amd, config.teacher.model
      tw, tdepth, theads = vit.resolve_variant(t.variant, t.width, t.depth, t.num_heads)
      self.s_layers, self.t_layers = config_base.parse_ints(a.student_layers), config_base.parse_ints(a.teacher_layers)
      tspec = dict(spec, qkv_bias=t.qkv_bias, pos_emb=t.pos_emb, cls=t.cls_token)
      teacher = Encoder(tspec, tw, tdepth, theads, t.mlp_ratio, sdpa, final_norm=False)
      teacher.eval().requires_grad_(False)
      self.__dict__["teacher"] = teacher   # not a submodule: frozen, outside the optimizer
      self.projections = nn.ModuleList([nn.Linear(w, tw, bias=False) for _ in self.s_layers])
      gspec = dict(spec, qkv_bias=m.qkv_bias, pos_emb=m.pos_emb)
      gheads = a.generator_heads or tw // 64
      self.generators = nn.ModuleList([
          MaskedDecoder(gspec, tw, tw, a.generator_depth, gheads, 4.0, sdpa, embed="none", out_dim=0,
                        final_norm=False) for _ in self.s_layers])

  def forward(self, x):
    spec, b = self.spec, x.shape[0]
    cls = spec["cls"]
    if self.amd:
      vis, diff, rest = _draw_masks(spec, b, [self.config.mask.ratio, self.config.teacher.mask_ratio])
      masked = diff | rest
    else:
      vis, masked = _draw_masks(spec, b, [self.config.mask.ratio])
    tokens = self.encoder.embed(x)
    c = tokens.shape[-1]
    x_vis = self.encoder.with_cls(tokens[vis].reshape(b, -1, c))
    latent, outs = self.encoder.run(x_vis, self.s_layers if self.amd else ())
    pred = self.decoder(latent, vis, masked, has_cls=cls)
    target = _pixel_target(x, spec)[masked].reshape(b, -1, pred.shape[-1])
    loss = F.mse_loss(pred, target)
    if not self.amd:
      return loss
    with torch.no_grad():
      t_tok = self.teacher.embed(x)
      tc = t_tok.shape[-1]
      ks = int(vis[0].sum())
      t_in = self.teacher.with_cls(torch.cat([t_tok[vis].reshape(b, -1, tc), t_tok[diff].reshape(b, -1, tc)], 1))
      _, t_outs = self.teacher.run(t_in, self.t_layers, depth=max(self.t_layers))
    l_dir = l_gen = 0.0
    drop = 1 if cls else 0
    for i, (ls, lt) in enumerate(zip(self.s_layers, self.t_layers)):
      z = self.projections[i](outs[ls][:, drop:])
      h_t = t_outs[lt][:, int(self.teacher.cls_token is not None):]
      gen = self.generators[i](z, vis, diff)
      l_dir = l_dir + F.mse_loss(z, h_t[:, :ks])
      l_gen = l_gen + F.mse_loss(gen, h_t[:, ks:])
    n = len(self.s_layers)
    return loss + l_dir / n + l_gen / n


class TorchImageMAE(nn.Module):
  """ImageMAE pre-training as the official MAE code writes it (shuffle / un-shuffle, head on all tokens)."""

  def __init__(self, config, sdpa: bool):
    super().__init__()
    self.config, self.spec = config, _spec(config)
    m, d = config.model, config.decoder
    w, depth, heads = vit.resolve_variant(m.variant, m.width, m.depth, m.num_heads)
    self.encoder = Encoder(self.spec, w, depth, heads, m.mlp_ratio, sdpa)
    self.decoder_embed = nn.Linear(w, d.width)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, d.width))
    self.register_buffer("decoder_pos", _table(m.pos_emb, d.width, self.spec["grid"], True), persistent=False)
    self.decoder_blocks = nn.ModuleList([Block(d.width, d.num_heads, d.mlp_ratio, m.qkv_bias, sdpa)
                                         for _ in range(d.depth)])
    self.decoder_norm = nn.LayerNorm(d.width, eps=1e-6)
    self.decoder_pred = nn.Linear(d.width, self.spec["patch"] ** 2 * self.spec["channels"])

  def forward(self, imgs):
    x = self.encoder.embed(imgs)
    n, length, dim = x.shape
    keep = masking.num_visible(masking.MaskSpec(length, length, "random"), self.config.mask.ratio)
    noise = torch.rand(n, length)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x, _ = self.encoder.run(self.encoder.with_cls(x))
    x = self.decoder_embed(x)
    tokens = torch.cat([x[:, 1:], self.mask_token.repeat(n, length + 1 - x.shape[1], 1)], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos
    for blk in self.decoder_blocks:
      x = blk(x)
    pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
    target = _pixel_target(imgs, self.spec)
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


class TorchStep:
  """model + AdamW (decay on weight matrices) + optional clipping; step() returns its wall time."""

  def __init__(self, config, batch: dict, sdpa: bool):
    torch.manual_seed(0)
    spec = _spec(config)
    if config.method == "amd":
      self.model = TorchVideoMAE(config, sdpa, amd=True)
    elif spec["video"]:
      self.model = TorchVideoMAE(config, sdpa)
    else:
      self.model = TorchImageMAE(config, sdpa)
    self.model.train()
    decay = [p for n, p in self.model.named_parameters() if n.endswith("weight") and p.ndim >= 2]
    no_decay = [p for n, p in self.model.named_parameters() if not (n.endswith("weight") and p.ndim >= 2)]
    o = config.optim
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=1e-4, betas=(o.b1, o.b2), eps=o.eps)
    self.clip = o.grad_clip
    x = np.asarray(batch["video" if spec["video"] else "image"])
    x = np.moveaxis(x, -1, 1)   # channel-last -> channel-first (NCHW / NCTHW)
    self.x = torch.from_numpy(np.ascontiguousarray(x))

  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

  def step(self) -> float:
    t0 = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    loss = self.model(self.x)
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    self.loss = float(loss.detach())
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ comparison
def compare(name: str, *, steps: int, repeats: int, warmup: int, torch_variants: list[str],
            quiet_timeout: float = 0.0) -> dict:
  spec, overrides, desc = CASES[name]
  config = step_bench.load_config(os.path.join(ROOT, spec), overrides)
  load_before = step_bench.load_average()
  t0 = time.perf_counter()
  jx = step_bench.StepBench(config)
  jax_build = time.perf_counter() - t0
  torch_sides = {v: TorchStep(config, jx.batch, sdpa=v == "sdpa") for v in torch_variants}
  n_jax = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(jx.state.params))
  n_torch = {v: s.num_params() for v, s in torch_sides.items()}
  for _ in range(warmup):
    jx.step()
    for s in torch_sides.values():
      s.step()
  rounds = []
  for _ in range(repeats):
    step_bench.wait_quiet(timeout_s=quiet_timeout)
    r = {"runnable": step_bench.runnable_tasks()}
    for v, s in torch_sides.items():
      r[v] = statistics.median([s.step() for _ in range(steps)])
    r["jax"] = statistics.median([jx.step() for _ in range(steps)])
    rounds.append(r)
  out = dict(name=name, desc=desc, batch=config.batch_size, compile_s=jx.lower_s + jx.compile_s,
             jax_build_s=jax_build, params_jax=n_jax, params_torch=n_torch, rounds=rounds,
             load=f"{load_before} -> {step_bench.load_average()}",
             jax_s=statistics.median(r["jax"] for r in rounds), flops_per_step=jx.flops_per_step)
  for v in torch_variants:
    out[f"torch_{v}_s"] = statistics.median(r[v] for r in rounds)
    out[f"ratio_{v}"] = statistics.median(r["jax"] / r[v] for r in rounds)
  return out


def table(results: list[dict], variants: list[str]) -> str:
  head = ["case", "batch", "JAX step s"] + [f"PyTorch ({v}) step s" for v in variants]
  head += [f"ratio JAX / PyTorch ({v})" for v in variants]
  head += ["JAX GFLOP/s", "JAX compile s", "params (JAX = PyTorch)", "load before -> after"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    same = all(n == r["params_jax"] for n in r["params_torch"].values())
    cells = [r["name"], str(r["batch"]), f"{r['jax_s']:.4f}"] + [f"{r[f'torch_{v}_s']:.4f}" for v in variants]
    cells += [f"**{r[f'ratio_{v}']:.2f}**" for v in variants]
    cells += [f"{r['flops_per_step'] / r['jax_s'] / 1e9:.1f}", f"{r['compile_s']:.1f}",
              f"{r['params_jax']:,}" + ("" if same else f" (PyTorch {r['params_torch']})"), r["load"]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default="quickstart_mae,quickstart_amd,small_mae_b256,small_mae_b32",
                      help=f"comma-separated, of: {', '.join(CASES)}")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--torch_attention", default="manual", help="manual (official) and/or sdpa, comma-separated")
  parser.add_argument("--out", default=step_bench.DOCS, help="markdown file to append to ('' : print only)")
  parser.add_argument("--quiet_timeout", type=float, default=0.0,
                      help="seconds to wait before each round for the machine's other users to go quiet")
  args = parser.parse_args()
  torch.set_num_threads(len(os.sched_getaffinity(0)))   # all usable cores (fewer under taskset)
  variants = args.torch_attention.split(",")
  results = []
  for name in args.cases.split(","):
    r = compare(name, steps=args.steps, repeats=args.repeats, warmup=args.warmup, torch_variants=variants,
                quiet_timeout=args.quiet_timeout)
    results.append(r)
    print(table([r], variants), flush=True)
    print("rounds:", [{k: round(v, 4) for k, v in rr.items()} for rr in r["rounds"]], flush=True)
  text = table(results, variants)
  print(text)
  notes = "\n".join(f"- {r['name']}: {r['desc']}; per-round JAX/PyTorch ratios "
                    + ", ".join(f"{v}: " + " ".join(f"{rr['jax'] / rr[v]:.2f}" for rr in r["rounds"])
                                for v in variants)
                    + "; runnable tasks at the round starts " + " ".join(str(rr["runnable"]) for rr in r["rounds"])
                    for r in results)
  notes += f"\n- torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}, float32."
  step_bench.append_markdown("amd_jax vs PyTorch eager", text, "python " + " ".join(sys.argv), args.out, notes)


if __name__ == "__main__":
  main()
