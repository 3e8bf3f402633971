"""Vision transformer encoder for images (2-D patches) and videos (3-D tubelets).

Pure flax.linen: no PRNG state of its own, no I/O, no config parsing. The encoder
runs on a SUBSET of tokens given by `keep` indices (ascending, from
amd_jax.masking), which is how every masked method feeds it; `keep=None` means all.

Intermediates: `Encoder.__call__` returns (tokens, out) where `out` holds, on
request, the raw (pre-final-norm) residual stream after chosen blocks
('block_{l}', l 1-based) and attention logits / q / k / v of chosen blocks
('attn_logits_{l}', 'q_{l}', 'k_{l}', 'v_{l}'; [B, heads, N, head_dim]) and the LayerNorm-ed
input of chosen blocks' attention ('norm1_{l}', [B, N, width]: MAE-lite's hidden states).
A TinyMIM student's last block may use its own head count (`last_block_num_heads`).

Parameter names follow the official PyTorch modules (patch_embed.proj, blocks_i.
norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2, norm) so conversion is a rename.
Every parameter is created with the logical names of its axes (models/logical.py):
`init` returns them boxed, `logical.unbox` gives the plain arrays.

Initialisation (`init_scheme`): 'mae' is MAE's (xavier-uniform patch projection, zero
bias); 'videomae' leaves the patch projection as the official VideoMAE/AMD code does,
at PyTorch's default Conv3d init: weight and bias uniform in +-1/sqrt(fan_in) (for
2x16x16 RGB tubelets into ViT-S, 2.2x narrower than xavier, and a non-zero bias).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amd_jax.models import logical, platform, posemb
from amd_jax.models.logical import Axis

# (width, depth, heads). Heads are explicit: the MAE-family repositories disagree
# on ViT-Ti's head count (3 in DeiT/MAE, 12 in MAE-lite), and attention or
# relation targets change meaning with it, so it must never be inferred.
VARIANTS: dict[str, tuple[int, int, int]] = {
    "tiny": (32, 2, 2),        # tests only
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}

# Linear layers: xavier-uniform weights and zero biases, as the MAE family does.
dense_init = nn.initializers.xavier_uniform()
LN_EPS = 1e-6

# How parameters are initialised where the MAE family's codebases differ (see the module docstring).
INIT_SCHEMES = ("mae", "videomae")


def check_init_scheme(init_scheme: str) -> None:
  if init_scheme not in INIT_SCHEMES:
    raise ValueError(f"init_scheme={init_scheme!r} is not known; allowed: {', '.join(INIT_SCHEMES)}")


def torch_default_init(fan_in_axes=(-2,)):
  """PyTorch's default Linear/Conv weight init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=fan_in_axes, out_axis=-1)


def torch_default_bias_init(fan_in: int):
  """PyTorch's default Linear/Conv bias init: U(+-1/sqrt(fan_in)), fan_in of the layer's weight."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def named_dense(axes: tuple[str, str], kernel_init=dense_init) -> dict:
  """kernel_init / bias_init for a Dense layer [in, out] whose axes carry the logical names `axes`."""
  return dict(kernel_init=logical.with_axes(kernel_init, axes),
              bias_init=logical.with_axes(nn.initializers.zeros, axes[-1:]))


def layer_norm(name: str) -> nn.LayerNorm:
  """The MAE family's LayerNorm (eps 1e-6, float32), its scale and bias named by the residual width."""
  return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32,
                      scale_init=logical.with_axes(nn.initializers.ones, (Axis.EMBED,)),
                      bias_init=logical.with_axes(nn.initializers.zeros, (Axis.EMBED,)), name=name)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def resolve_variant(variant: str, width: int = 0, depth: int = 0, num_heads: int = 0) -> tuple[int, int, int]:
  """(width, depth, heads) of a named variant, with non-zero overrides applied."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; allowed: {', '.join(VARIANTS)}")
  w, d, h = VARIANTS[variant]
  return (width or w, depth or d, num_heads or h)


class Dense(nn.Dense):
  """nn.Dense (same parameters and init) that multiplies [..., in] inputs as one [rows, in] matrix on CPU.

  Differentiating a dot over [B, N, in] gives weight-gradient dots that contract two axes;
  XLA:CPU lays those out with a transposed copy of the gradient and runs them outside its
  fast matmul path. Flattening the rows first made the quickstart step ~15% faster. Other
  backends keep the [B, N, in] dot, whose axes the sharding rules name.
  """

  @nn.compact
  def __call__(self, inputs):
    if inputs.ndim <= 2 or platform.target() != "cpu":
      return super().__call__(inputs)
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return y.reshape(inputs.shape[:-1] + (y.shape[-1],))


_SQRT_HALF = float(np.sqrt(0.5))


def gelu_exact(x):
  # The official models use nn.GELU() (erf form), not the tanh approximation.
  # Written with erf, as PyTorch computes it, rather than jax.nn.gelu's erfc: XLA
  # expands erfc into two branches with an exp each, which made the forward GELU
  # ~5x slower on CPU. Both are exact GELU to float32 rounding (~1e-6 absolute).
  return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


@jax.custom_jvp
def softmax_last(logits):
  """Softmax over the last axis whose derivatives need only its output y.

  Forward mode: t -> y * t - y * sum(y * t). Reverse mode is JAX's transpose of that linear
  map (the same map: it is symmetric): the backward pass keeps y alone, as a hand-written
  VJP would, and jax.jvp / jax.linearize work too (a custom VJP has no forward mode).
  Written as two products rather than y * (t - sum): its transpose then compiles, on
  XLA:CPU, to the same bytes accessed and temporaries as the custom VJP it replaced (the
  factored form, and jax.nn.softmax's own rule, cost 0.6% and 2% more bytes in the
  quickstart MAE step).
  """
  return jax.nn.softmax(logits, axis=-1)


@softmax_last.defjvp
def _softmax_last_jvp(primals, tangents):
  (logits,), (t,) = primals, tangents
  y = jax.nn.softmax(logits, axis=-1)
  return y, y * t - y * jnp.sum(y * t, axis=-1, keepdims=True)


def attention_per_head(q, k, v):
  """softmax(q k^T / sqrt(Dh)) v on [B, N, H, Dh], one head at a time (the CPU path).

  On XLA:CPU, jax.nn.dot_product_attention's XLA path transposes [B, H, N, N] tensors,
  fuses its softmax into the batched dots and saves several [B, H, N, N] intermediates
  for the backward pass. Plain [B, N, Dh] matmuls per head and a softmax whose backward
  needs only its output made attention forward + backward 1.5-3x faster at ViT shapes
  (and the official-size AMD step ~15-20% faster). Same numbers up to float rounding;
  the softmax runs in float32. Differentiable in both modes (softmax_last's custom JVP).
  """
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  outs = []
  for h in range(q.shape[2]):
    logits = jnp.einsum("bqd,bkd->bqk", q[:, :, h] * scale, k[:, :, h])
    weights = softmax_last(logits.astype(jnp.float32)).astype(v.dtype)
    outs.append(jnp.einsum("bqk,bkd->bqd", weights, v[:, :, h]))
  return jnp.stack(outs, axis=2)


def attention_heads_major(q, k, v):
  """softmax(q k^T / sqrt(Dh)) v on head-major [B, H, N, Dh] (the TPU path).

  Logits in the inputs' dtype (bfloat16 in the official recipes), the softmax in float32 with
  softmax_last's output-only derivative, probabilities back in the inputs' dtype. Without a fused
  attention kernel every [B, H, N, N] tensor is a round trip through HBM; this keeps them at 2
  bytes and the backward pass to the softmax's output alone. XLA's TPU cost model prices the
  forward and backward of a ViT-B decoder's attention (8 x 1568 tokens, 6 heads per chip) at
  3.3 ms against 4.7 ms for jax.nn.dot_product_attention's XLA path (float32 logits) and 5.1 ms
  for the per-head CPU path (benchmarks/aot_attention.py).
  """
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k)
  weights = softmax_last(logits.astype(jnp.float32)).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


class EinsumDense(nn.Module):
  """nn.Dense's parameters (kernel [in, out] and bias [out]: same names, inits, axes and creation order)
  applied as an einsum over a reshaped kernel, so that a layer can read or write head-major
  activations directly: q/k/v come out as [3, B, H, N, Dh] and the output projection reads
  [B, H, N, Dh], where a Dense would need a [B, N, H, Dh] <-> [B, H, N, Dh] transpose copy on each side
  of the attention (on TPU those copies cost 5-8% of the official AMD ViT-B SSv2 step's modeled time)."""
  in_features: int
  features: int
  equation: str
  kernel_shape: tuple[int, ...]
  bias_shape: tuple[int, ...]
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = dense_init
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (self.in_features, self.features), jnp.float32)
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype).reshape(self.kernel_shape))
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype).reshape(self.bias_shape)
    return y


class Attention(nn.Module):
  width: int
  num_heads: int
  qkv_bias: str = "fused"
  dtype: Any = jnp.float32
  # When True, compute logits explicitly and return them with q/k/v.
  return_internals: bool = False
  implementation: str | None = None  # jax.nn.dot_product_attention's: None (XLA) | 'cudnn'

  @nn.compact
  def __call__(self, x):
    if platform.target() == "tpu" and self.implementation is None and not self.return_internals:
      return self._heads_major(x), {}
    b, n, _ = x.shape
    head_dim = self.width // self.num_heads
    # Fused projection with one of the MAE family's bias layouts:
    # 'fused': one learnable bias over all 3*width outputs (ImageMAE / timm);
    # 'qv': learnable q_bias and v_bias, the k bias a constant zero (VideoMAE/AMD);
    # 'none': no bias.
    qkv = Dense(3 * self.width, use_bias=self.qkv_bias == "fused", dtype=self.dtype, name="qkv",
                **named_dense((Axis.EMBED, Axis.QKV)))(x)
    if self.qkv_bias == "qv":
      bias_init = logical.with_axes(nn.initializers.zeros, (Axis.HEADS,))
      q_bias = self.param("q_bias", bias_init, (self.width,))
      v_bias = self.param("v_bias", bias_init, (self.width,))
      qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, Dh]
    q, k, v = (logical.constrain(t, logical.HEADS) for t in (q, k, v))
    internals = {}
    if self.return_internals:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q * (head_dim**-0.5), k)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
      internals = {"attn_logits": logits,
                   "q": q.transpose(0, 2, 1, 3), "k": k.transpose(0, 2, 1, 3), "v": v.transpose(0, 2, 1, 3)}
    elif self.implementation is None and platform.target() == "cpu":
      out = attention_per_head(q, k, v)
    else:
      # XLA picks the fused kernel (cuDNN flash attention on GPUs where it applies).
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    out = logical.constrain(out, logical.HEADS).reshape(b, n, self.width)
    out = Dense(self.width, dtype=self.dtype, name="proj", **named_dense((Axis.HEADS, Axis.EMBED)))(out)
    return out, internals

  def _heads_major(self, x):
    """The same attention and parameters, computed head-major throughout (the TPU formulation)."""
    d, h = x.shape[-1], self.num_heads
    hd = self.width // h
    qkv = EinsumDense(d, 3 * self.width, "bnd,dthk->tbhnk", (d, 3, h, hd), (3, 1, h, 1, hd),
                      use_bias=self.qkv_bias == "fused", dtype=self.dtype, name="qkv",
                      **named_dense((Axis.EMBED, Axis.QKV)))(x)
    if self.qkv_bias == "qv":
      bias_init = logical.with_axes(nn.initializers.zeros, (Axis.HEADS,))
      q_bias = self.param("q_bias", bias_init, (self.width,))
      v_bias = self.param("v_bias", bias_init, (self.width,))
      qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype).reshape(3, 1, h, 1, hd)
    q, k, v = (logical.constrain(t, logical.HEADS_MAJOR) for t in (qkv[0], qkv[1], qkv[2]))
    out = logical.constrain(attention_heads_major(q, k, v), logical.HEADS_MAJOR)
    return EinsumDense(self.width, self.width, "bhnk,hko->bno", (h, hd, self.width), (self.width,),
                       dtype=self.dtype, name="proj", **named_dense((Axis.HEADS, Axis.EMBED)))(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = Dense(self.hidden, dtype=self.dtype, name="fc1", **named_dense((Axis.EMBED, Axis.MLP)))(x)
    x = logical.constrain(gelu_exact(x), logical.MLP_HIDDEN)
    return Dense(width, dtype=self.dtype, name="fc2", **named_dense((Axis.MLP, Axis.EMBED)))(x)


def drop_path(x, rate, deterministic: bool, rng_fn):
  """Per-sample stochastic depth; `rate` may be a traced scalar (scan) or None (off)."""
  if deterministic or rate is None or (isinstance(rate, float) and rate == 0.0):
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng_fn(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.maximum(keep, 1e-12), jnp.zeros_like(x))


class Block(nn.Module):
  """Pre-LN transformer block: x += attn(LN1 x); x += mlp(LN2 x)."""
  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: str = "fused"
  dtype: Any = jnp.float32
  return_internals: bool = False
  drop_path_rate: float = 0.0
  attention: str | None = None
  return_norm1: bool = False   # also return LN1(x) (the attention's input) as internals['norm1']
  use_mlp: bool = True         # False: skip the MLP branch (its params, if given, are left unused)

  @nn.compact
  def __call__(self, x, deterministic: bool = True, drop_rate=None):
    # Unscanned stacks give each block its static rate; a scanned stack passes
    # the per-layer rate in as a traced scalar.
    drop_rate = self.drop_path_rate if drop_rate is None else drop_rate
    x = logical.constrain(x, logical.TOKENS)   # the residual stream between blocks
    rng_fn = lambda: self.make_rng("dropout")
    normed = layer_norm("norm1")(x)
    h, internals = Attention(self.width, self.num_heads, self.qkv_bias, self.dtype,
                             self.return_internals, self.attention, name="attn")(normed.astype(self.dtype))
    if self.return_norm1:
      internals = {**internals, "norm1": normed}
    x = x + drop_path(h, drop_rate, deterministic, rng_fn).astype(x.dtype)
    if not self.use_mlp:
      return x, internals
    h = Mlp(int(self.width * self.mlp_ratio), self.dtype, name="mlp")(layer_norm("norm2")(x).astype(self.dtype))
    x = x + drop_path(h, drop_rate, deterministic, rng_fn).astype(x.dtype)
    return x, internals


class ScanBlock(nn.Module):
  """Block adapted to nn.scan's (carry, xs) -> (carry, ys) contract."""
  block_kwargs: dict
  deterministic: bool = True
  collect: bool = False

  @nn.compact
  def __call__(self, x, drop_rate):
    x, _ = Block(**self.block_kwargs, name="block")(x, self.deterministic, drop_rate)
    return x, (x if self.collect else None)


class _PatchProjection(nn.Module):
  """nn.Conv's parameters (kernel [*patch, C, width] and bias, created in its order, so initialised
  identically), applied as one matmul to patches flattened in the kernel's (*patch, C) order."""
  width: int
  patch: tuple[int, ...]
  dtype: Any = jnp.float32
  init_scheme: str = "mae"

  @nn.compact
  def __call__(self, patches):
    check_init_scheme(self.init_scheme)
    channels = patches.shape[-1] // int(np.prod(self.patch))
    fan_axes = tuple(range(len(self.patch) + 1))
    if self.init_scheme == "videomae":
      # The official VideoMAE/AMD code leaves its Conv3d at PyTorch's default init: weight and bias
      # U(+-1/sqrt(fan_in)), fan_in = tubelet x patch x patch x channels.
      kernel_init = torch_default_init(fan_axes)
      bias_init = torch_default_bias_init(int(np.prod(self.patch)) * channels)
    else:
      # MAE initialises the patch projection as a flattened Linear (xavier-uniform), bias zero.
      kernel_init = nn.initializers.xavier_uniform(in_axis=fan_axes, out_axis=-1)
      bias_init = nn.initializers.zeros
    patch_axes = (Axis.TUBELET, Axis.PATCH_HEIGHT, Axis.PATCH_WIDTH)[-len(self.patch):]
    kernel = self.param("kernel", logical.with_axes(kernel_init, patch_axes + (Axis.CHANNELS, Axis.EMBED)),
                        self.patch + (channels, self.width))
    bias = self.param("bias", logical.with_axes(bias_init, (Axis.EMBED,)), (self.width,))
    y = jnp.dot(patches.astype(self.dtype), kernel.reshape(-1, self.width).astype(self.dtype))
    return y + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping patches (images) or tubelets (videos) -> [B, N, width], or [B, K, width] for `keep`.

  The strided convolution of the official models, written as patchify + matmul so that a
  masked encoder embeds only the tokens it keeps: gathering raw patches first skips the
  projection of the masked ones and the scatter of their gradients (about 10% of an
  official-size VideoMAE step on CPU). Parameters are those of the nn.Conv it replaces.
  """
  width: int
  patch_size: int
  tubelet_size: int = 0  # 0: images
  dtype: Any = jnp.float32
  init_scheme: str = "mae"

  @nn.compact
  def __call__(self, x, keep=None):
    p = self.patch_size
    patch = (self.tubelet_size, p, p) if self.tubelet_size else (p, p)
    b, c = x.shape[0], x.shape[-1]
    grid = list(token_grid(x.shape[1:], p, self.tubelet_size).shape)
    # [B, g0, k0, g1, k1, ..., (k_last C)] -> [B, g0, g1, ..., k0, k1, ..., (k_last C)]: row-major
    # tokens, patches flattened in the conv kernel's (*patch, C) order. A patch row's pixels and
    # channels are contiguous, so they move as one axis: the transpose's minor dimension is then
    # patch_size * C (48) rather than C (3), which TPU tiles (8, 128) pad 2.7x instead of 43x
    # (the copy cost 3.5% of the official AMD ViT-B SSv2 step's modeled time on v5e).
    runs = patch[:-1] + (patch[-1] * c,)
    x = x.reshape([b] + [d for pair in zip(grid, runs) for d in pair])
    nd = len(patch)
    x = x.transpose([0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)])
    x = x.reshape(b, int(np.prod(grid)), -1)
    if keep is not None:
      x = gather_tokens(x, keep)
    return _PatchProjection(self.width, patch, self.dtype, self.init_scheme, name="proj")(x)


@dataclasses.dataclass(frozen=True)
class TokenGrid:
  """Token layout of an input: (h, w) for images or (t, h, w) for videos."""
  shape: tuple[int, ...]

  @property
  def num_tokens(self) -> int:
    return int(np.prod(self.shape))

  @property
  def tokens_per_frame(self) -> int:
    return int(np.prod(self.shape[-2:]))


def token_grid(input_shape: Sequence[int], patch_size: int, tubelet_size: int = 0) -> TokenGrid:
  """input_shape excludes batch: (H, W, C) or (T, H, W, C). Raises ValueError when the patches
  (tubelets) do not tile the input exactly: the official models never crop or pad."""
  if len(input_shape) not in (3, 4):
    raise ValueError(f"the encoder takes images [batch, height, width, channels] or videos [batch, frames, "
                     f"height, width, channels]; got an input whose shape without the batch is "
                     f"{tuple(input_shape)}")
  h, w = input_shape[-3:-1]
  if patch_size < 1 or h % patch_size or w % patch_size:
    raise ValueError(f"the input's height x width {h}x{w} is not divisible by patch_size={patch_size}: "
                     f"give images whose sides are multiples of {patch_size}, or a patch size that divides "
                     f"both")
  if len(input_shape) == 4:
    t = input_shape[0]
    if tubelet_size < 1 or t % tubelet_size:
      raise ValueError(f"the input's {t} frames are not divisible by tubelet_size={tubelet_size}: give a "
                       f"number of frames that is a multiple of {tubelet_size}, or a tubelet size that divides "
                       f"{t}")
    return TokenGrid((t // tubelet_size, h // patch_size, w // patch_size))
  return TokenGrid((h // patch_size, w // patch_size))


def gather_tokens(x, idx):
  """x [B, N, D], idx [B, K] -> [B, K, D] (jnp.take_along_axis; no boolean indexing)."""
  return jnp.take_along_axis(x, idx[..., None].astype(jnp.int32), axis=1)


class Encoder(nn.Module):
  """ViT encoder. Call: (inputs, keep=None, *, train) -> (tokens after final norm, out dict).

  `tokens` has the cls token first when cls_token=True. Blocks are numbered from 1.
  """
  width: int
  depth: int
  num_heads: int
  patch_size: int = 16
  tubelet_size: int = 2          # used for 5-D (video) inputs only
  mlp_ratio: float = 4.0
  cls_token: bool = True
  qkv_bias: str = "fused"
  pos_emb: str = "sincos2d"
  dtype: Any = jnp.float32
  drop_path: float = 0.0
  scan: bool = False
  remat: str = "none"
  final_norm: bool = True
  block_layers: tuple[int, ...] = ()   # which block outputs to return (1-based)
  attn_layers: tuple[int, ...] = ()    # which blocks' attention internals to return
  max_depth: int = 0                   # >0: stop after this block (teachers needing early layers only)
  norm1_layers: tuple[int, ...] = ()   # blocks whose LN1 output (attention input) to return as 'norm1_{l}'
  last_block_num_heads: int = 0        # >0: the last block uses this head count (TinyMIM students)
  last_block_mlp: bool = True          # False: the last block skips its MLP branch (TinyMIM features)
  drop_path_rates: tuple[float, ...] = ()  # explicit per-block rates (len == depth); () = linear 0 -> drop_path
  attention: str = "xla"               # xla | cudnn: jax.nn.dot_product_attention implementation
  dist_token: bool = False             # DeiT/G2SD distillation token, right after cls (needs cls_token)
  init_scheme: str = "mae"             # mae | videomae: the patch projection's init (module docstring)

  def _check_layers(self):
    check_init_scheme(self.init_scheme)
    for name, layers in (("block_layers", self.block_layers), ("attn_layers", self.attn_layers),
                         ("norm1_layers", self.norm1_layers)):
      for l in layers:
        if not 1 <= l <= self.depth:
          raise ValueError(f"{name} asks for block {l}, but the encoder has blocks 1..{self.depth}")
    if self.scan and (self.attn_layers or self.norm1_layers):
      raise ValueError("attention internals (attn_layers, norm1_layers) need scan=False: a scanned stack "
                       "returns block outputs only")
    if self.scan and not self.last_block_mlp:
      raise ValueError("last_block_mlp=False needs scan=False: a scanned stack has one block layout")
    if self.last_block_num_heads:
      if self.scan:
        raise ValueError("last_block_num_heads needs scan=False: a scanned stack has one head count")
      if self.width % self.last_block_num_heads:
        raise ValueError(f"last_block_num_heads={self.last_block_num_heads} must divide the width {self.width}")
    if self.drop_path_rates and len(self.drop_path_rates) != self.depth:
      raise ValueError(f"drop_path_rates has {len(self.drop_path_rates)} entries; the encoder has {self.depth} "
                       "blocks")

  def embed(self, inputs, keep=None):
    """Patch-embed, add fixed position embeddings, keep a subset of tokens, prepend cls."""
    is_video = inputs.ndim == 5
    grid = token_grid(inputs.shape[1:], self.patch_size, self.tubelet_size if is_video else 0)
    x = PatchEmbed(self.width, self.patch_size, self.tubelet_size if is_video else 0,
                   self.dtype, self.init_scheme, name="patch_embed")(inputs, keep)   # only kept tokens are embedded
    table = jnp.asarray(posemb.make_table(self.pos_emb, self.width, grid.shape, cls_token=False))
    x = x.astype(jnp.float32) + (table[None] if keep is None else jnp.take(table, keep.astype(jnp.int32), axis=0))
    if self.cls_token:
      cls = self.param("cls_token", logical.with_axes(nn.initializers.normal(0.02), logical.TOKEN_AXES),
                       (1, 1, self.width))
      # The cls row of MAE's table is zeros, so cls + pos = cls.
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    if self.dist_token:
      if not self.cls_token:
        raise ValueError("dist_token=True needs cls_token=True: the distillation token follows the cls token")
      # Added after the position embeddings, as DeiT does: it has no position of its own.
      dist = self.param("dist_token", logical.with_axes(nn.initializers.truncated_normal(0.02), logical.TOKEN_AXES),
                        (1, 1, self.width))
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(dist, (x.shape[0], 1, self.width)), x[:, 1:]], axis=1)
    return logical.constrain(x, logical.TOKENS)

  @nn.compact
  def __call__(self, inputs, keep=None, *, train: bool = False):
    self._check_layers()
    x = self.embed(inputs, keep)
    x, out = self.run_blocks(x, train=train)
    if self.final_norm:
      x = layer_norm("norm")(x)
    return x, out

  def run_blocks(self, x, *, train: bool):
    depth = self.max_depth or self.depth
    if self.drop_path_rates:
      rates = np.asarray(self.drop_path_rates, np.float64)[:depth]
    else:
      rates = np.linspace(0.0, self.drop_path, self.depth)[:depth]
    use_rates = bool(self.drop_path > 0 or any(r > 0 for r in rates))
    block_kwargs = dict(width=self.width, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                        qkv_bias=self.qkv_bias, dtype=self.dtype,
                        attention=None if self.attention == "xla" else self.attention)
    out = {}
    policy = REMAT_POLICIES[self.remat]
    if self.scan:
      body = ScanBlock
      if self.remat != "none":
        body = nn.remat(body, policy=policy, prevent_cse=False)
      stack = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=0 if use_rates else nn.broadcast, length=depth,
                      metadata_params={nn.PARTITION_NAME: Axis.LAYERS})   # the stacked axis's name
      x, ys = stack(block_kwargs, deterministic=not train, collect=bool(self.block_layers),
                    name="blocks")(x, jnp.asarray(rates, jnp.float32) if use_rates else None)
      for l in self.block_layers:
        if l <= depth:
          out[f"block_{l}"] = ys[l - 1]
      return x, out
    block_cls = Block
    if self.remat != "none":
      block_cls = nn.remat(Block, policy=policy, static_argnums=(2,))
    for i in range(depth):
      layer = i + 1
      kwargs = dict(block_kwargs)
      if self.last_block_num_heads and layer == self.depth:
        kwargs["num_heads"] = self.last_block_num_heads
      if not self.last_block_mlp and layer == self.depth:
        kwargs["use_mlp"] = False
      x, internals = block_cls(**kwargs, return_internals=layer in self.attn_layers,
                               return_norm1=layer in self.norm1_layers,
                               drop_path_rate=float(rates[i]), name=f"blocks_{i}")(x, not train)
      if layer in self.block_layers:
        out[f"block_{layer}"] = x
      for key, value in internals.items():
        out[f"{key}_{layer}"] = value
    return x, out


def encoder_from_config(model_cfg, **overrides) -> Encoder:
  """Build an Encoder from a config.model ConfigDict (see amd_jax.config_base.model_config)."""
  width, depth, heads = resolve_variant(model_cfg.variant, model_cfg.width, model_cfg.depth, model_cfg.num_heads)
  kwargs = dict(
      width=width, depth=depth, num_heads=heads, patch_size=model_cfg.patch_size,
      tubelet_size=model_cfg.tubelet_size, mlp_ratio=model_cfg.mlp_ratio, cls_token=model_cfg.cls_token,
      qkv_bias=model_cfg.qkv_bias, pos_emb=model_cfg.pos_emb, dtype=jnp.dtype(model_cfg.dtype),
      drop_path=model_cfg.drop_path, scan=model_cfg.scan, remat=model_cfg.remat, attention=model_cfg.attention,
      init_scheme=model_cfg.init_scheme)
  kwargs.update(overrides)
  return Encoder(**kwargs)


def stack_blocks(params: dict, depth: int) -> dict:
  """Unscanned encoder params (blocks_0..blocks_{depth-1}) -> the scanned layout (blocks/block, layer axis 0)."""
  blocks = [params[f"blocks_{i}"] for i in range(depth)]
  out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
  out["blocks"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
  return out


def unstack_blocks(params: dict) -> dict:
  """Scanned encoder params -> one blocks_i entry per layer."""
  stacked = params["blocks"]["block"]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(depth):
    out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


def match_layout(params: dict, scan: bool, depth: int) -> dict:
  """Bring encoder params into the scanned or unscanned layout a model was configured with."""
  is_scanned = "blocks" in params
  if scan and not is_scanned:
    return stack_blocks(params, depth)
  if not scan and is_scanned:
    return unstack_blocks(params)
  return params
