"""Official PyTorch state_dict names <-> amd_jax Flax parameters.

One table drives both directions. For an architecture (`Arch`: widths, depths,
patch/tubelet sizes, bias layout and which parts exist) and a naming `layout`,
`encoder_entries` / `decoder_entries` / `classifier_entries` list every official
key with its PyTorch shape, the Flax path it becomes and how the array is laid
out there:

  linear  torch (out, in)            <-> flax Dense kernel (in, out)
  conv    torch (O, I, [T,] H, W)    <-> flax Conv kernel ([T,] H, W, I, O)
  copy    same array (biases, LayerNorm weight -> scale, tokens, q_bias/v_bias)
  pos     a fixed sine-cosine table: no Flax parameter. Read to fold a non-zero
          cls row into cls_token and to check the table against amd_jax's;
          written on export so official models load strictly.
  idle    a parameter the official module registers but its forward never uses
          (the AMD generators' final `norm`): no Flax parameter; reported as not
          converted on import, written as an identity LayerNorm on export.

Layouts (naming families; what varies WITHIN a family, such as fused qkv bias vs
q_bias/v_bias, a cls token, Conv2d vs Conv3d, comes from the architecture):

  mae          facebookresearch/mae and timm: cls_token, pos_embed, blocks.N.*,
               norm, decoder_embed, mask_token, decoder_pos_embed,
               decoder_blocks.N.*, decoder_norm, decoder_pred; fine-tuned: fc_norm, head.
  videomae     MCG-NJU/VideoMAE: encoder weights under `encoder.` (pre-training),
               `backbone.` or no prefix (fine-tuning), encoder_to_decoder, mask_token,
               decoder.blocks.N.*, decoder.norm, decoder.head; fine-tuned: fc_norm, head.
  amd          MCG-NJU/AMD: videomae naming plus the student's projection heads
               (encoder.projection_heads.N, one per aligned layer pair) and feature
               generators (generators.N.blocks.M.*), the 'amd' part (Arch.amd). The
               official model keeps the generators' mask tokens in a plain list, so
               its state dict has none: they come from a file or amd_jax's init.
  hf_vitmae    transformers ViTMAE (4.x and 5.x names): renamed to `mae` first,
               separate q/k/v Linear layers fused into qkv.
  hf_videomae  transformers VideoMAE: renamed to `videomae` first.

Flax side: {'encoder': Encoder params, 'decoder': MaskedTokenDecoder params,
'fc_norm': LayerNorm params, 'head': Dense params, 'projections': {'proj_i'},
'generators': {'gen_i': MaskedTokenDecoder params}}; fc_norm and head are the
classifier's top-level names, projections and generators AMD's (the tree
amd_jax.methods.amd.AMD.init makes). Encoder blocks are `blocks_{i}`
(scan=False) or stacked under `blocks/block` with a leading layer axis (scan=True).

Head counts never enter a weight layout (qkv output features are ordered
(3, heads, head_dim) in both frameworks); they come from the architecture the
user names and are recorded in reports, never inferred from shapes.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from amd_jax.models import decoders, posemb, vit

LAYOUTS = ("mae", "videomae", "amd", "hf_vitmae", "hf_videomae")
OFFICIAL_LAYOUTS = ("mae", "videomae", "amd")
HF_LAYOUTS = ("hf_vitmae", "hf_videomae")
PARTS = ("encoder", "decoder", "classifier", "amd")
# The top-level Flax names each part owns.
PART_TOPS = {"encoder": ("encoder",), "decoder": ("decoder",), "classifier": ("fc_norm", "head"),
             "amd": ("projections", "generator_projections", "generators")}

# Tolerance above which a checkpoint's fixed position table is reported as differing from amd_jax's.
POS_TABLE_TOL = 1e-5


class ConversionError(ValueError):
  """A checkpoint does not fit the named architecture (missing keys, wrong shapes)."""


class ShapeMismatchError(ConversionError):
  pass


# ----------------------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DecoderArch:
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class AMDArch:
  """The AMD student's parts beyond MAE's: per aligned layer pair, a projection head to the teacher width and
  a feature generator (blocks at the teacher width, qkv bias layout of the student)."""
  teacher_width: int
  num_pairs: int
  generator_depth: int = 2
  generator_heads: int = 0     # 0: teacher_width // 64, the official rule
  mlp_ratio: float = 4.0
  shared_heads: bool = True    # False: amd_jax's separate generator projections (the official model has none)
  init_scheme: str = "videomae"  # how amd_jax draws mask tokens the official state dict lacks (models.vit)

  def __post_init__(self):
    if self.num_pairs < 1 or self.generator_depth < 1:
      raise ValueError(f"AMD parts need num_pairs >= 1 and generator_depth >= 1, got {self.num_pairs} and "
                       f"{self.generator_depth}")
    if self.heads < 1 or self.teacher_width % self.heads:
      raise ValueError(f"generator heads {self.heads} must divide the teacher width {self.teacher_width}")

  @property
  def heads(self) -> int:
    return self.generator_heads or self.teacher_width // 64

  @classmethod
  def from_config(cls, config) -> "AMDArch":
    """From an AMD run's config (ConfigDict, or the dict of its config.json): config.amd, config.teacher.model."""
    a, t = config["amd"], config["teacher"]["model"]
    teacher_width, _, _ = vit.resolve_variant(t["variant"], t.get("width", 0), t.get("depth", 0),
                                              t.get("num_heads", 0))
    pairs = [x for x in str(a["student_layers"]).split(",") if x.strip()]
    return cls(teacher_width=teacher_width, num_pairs=len(pairs), generator_depth=int(a["generator_depth"]),
               generator_heads=int(a["generator_heads"]), shared_heads=bool(a["shared_heads"]),
               init_scheme=config["model"].get("init_scheme", "mae"))


@dataclasses.dataclass(frozen=True)
class Arch:
  """What a checkpoint must contain. Heads are explicit (never read from shapes)."""
  width: int
  depth: int
  num_heads: int
  patch_size: int = 16
  tubelet_size: int = 0        # 0: images (Conv2d patches); > 0: videos (Conv3d tubelets)
  in_chans: int = 3
  mlp_ratio: float = 4.0
  cls_token: bool = True
  qkv_bias: str = "fused"      # fused | qv | none
  pos_emb: str = "sincos2d"    # sincos2d | sincos1d
  image_size: int = 224        # only for the exported MAE pos_embed and the table check
  num_frames: int = 16         # videos only, same use
  final_norm: bool | None = True   # None: convert `norm` if the checkpoint has it
  decoder: DecoderArch | None = None
  num_classes: int = 0         # classifier head size; 0: take it from the checkpoint
  amd: AMDArch | None = None   # the AMD student's projection heads and generators

  def __post_init__(self):
    if self.qkv_bias not in ("fused", "qv", "none"):
      raise ValueError(f"qkv_bias={self.qkv_bias!r}; allowed: fused, qv, none")
    if self.width % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} does not divide width={self.width}")

  @property
  def is_video(self) -> bool:
    return self.tubelet_size > 0

  @property
  def grid(self) -> tuple[int, ...]:
    g = self.image_size // self.patch_size
    return (self.num_frames // self.tubelet_size, g, g) if self.is_video else (g, g)

  @property
  def num_patches(self) -> int:
    return int(np.prod(self.grid))

  @property
  def patch_dim(self) -> int:
    return self.patch_size**2 * self.in_chans * (self.tubelet_size or 1)

  @property
  def mlp_hidden(self) -> int:
    return int(self.width * self.mlp_ratio)

  def describe(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> "Arch":
    """The inverse of describe() (what conversion records and exported files hold)."""
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConversionError(f"the recorded architecture has fields amd_jax does not know: {', '.join(sorted(unknown))}")
    if d.get("decoder") is not None:
      d["decoder"] = DecoderArch(**d["decoder"])
    if d.get("amd") is not None:
      d["amd"] = AMDArch(**d["amd"])
    return cls(**d)


# Named architectures for the CLI: encoder (width, depth, heads) from amd_jax.models.vit.VARIANTS.
ARCH_NAMES = {"vit_tiny": "tiny", "vit_ti": "Ti", "vit_s": "S", "vit_b": "B", "vit_l": "L", "vit_h": "H"}
# Official decoders per naming family and size: (width, depth, heads).
MAE_DECODER = (512, 8, 16)                 # facebookresearch/mae, every size
VIDEOMAE_DECODERS = {"Ti": (96, 4, 3), "S": (192, 4, 3), "B": (384, 4, 6), "L": (512, 4, 8),
                     "H": (640, 4, 8), "tiny": (32, 1, 2)}


def family(layout: str) -> str:
  """'image' for MAE-style namings, 'video' for VideoMAE/AMD ones."""
  _check_layout(layout)
  return "image" if layout in ("mae", "hf_vitmae") else "video"


def named_arch(name: str, layout: str, *, num_heads: int = 0, patch_size: int = 16, tubelet_size: int = 2,
               image_size: int = 224, num_frames: int = 16, in_chans: int = 3, decoder: bool = True,
               decoder_width: int = 0, decoder_depth: int = 0, decoder_heads: int = 0,
               final_norm: bool | None = None, amd: AMDArch | None = None) -> Arch:
  """The architecture of an official checkpoint, e.g. named_arch('vit_l', 'videomae')."""
  if name not in ARCH_NAMES:
    raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(ARCH_NAMES)}")
  variant = ARCH_NAMES[name]
  width, depth, heads = vit.resolve_variant(variant, num_heads=num_heads)
  if family(layout) == "image":
    kw = dict(tubelet_size=0, cls_token=True, qkv_bias="fused", pos_emb="sincos2d")
    dw, dd, dh = MAE_DECODER
  else:
    kw = dict(tubelet_size=tubelet_size, cls_token=False, qkv_bias="qv", pos_emb="sincos1d")
    dw, dd, dh = VIDEOMAE_DECODERS[variant]
  dec = DecoderArch(decoder_width or dw, decoder_depth or dd, decoder_heads or dh) if decoder else None
  return Arch(width=width, depth=depth, num_heads=heads, patch_size=patch_size, in_chans=in_chans,
              image_size=image_size, num_frames=num_frames, decoder=dec, final_norm=final_norm, amd=amd, **kw)


def arch_from_config(model_cfg, *, decoder_cfg=None, image_size: int = 224, num_frames: int = 16,
                     in_chans: int = 3, video: bool | None = None, final_norm: bool | None = True,
                     amd: AMDArch | None = None) -> Arch:
  """Arch of an amd_jax config.model (and optionally config.decoder and the AMD parts).

  `video` defaults to 'the model has no cls token' (VideoMAE/AMD); pass it to override.
  """
  width, depth, heads = vit.resolve_variant(model_cfg.variant, model_cfg.width, model_cfg.depth,
                                            model_cfg.num_heads)
  if video is None:
    video = not model_cfg.cls_token
  dec = None
  if decoder_cfg is not None:
    dec = DecoderArch(decoder_cfg.width, decoder_cfg.depth, decoder_cfg.num_heads, decoder_cfg.mlp_ratio)
  return Arch(width=width, depth=depth, num_heads=heads, patch_size=model_cfg.patch_size,
              tubelet_size=model_cfg.tubelet_size if video else 0, in_chans=in_chans,
              mlp_ratio=model_cfg.mlp_ratio, cls_token=model_cfg.cls_token, qkv_bias=model_cfg.qkv_bias,
              pos_emb=model_cfg.pos_emb, image_size=image_size, num_frames=num_frames,
              final_norm=final_norm, decoder=dec, amd=amd)


def arch_from_run_config(config, *, final_norm: bool | None = True) -> Arch:
  """The whole architecture of an amd_jax run from its config (ConfigDict, or the dict of its config.json):
  encoder, pixel decoder when the config has one, and for an AMD run its projection heads and generators."""
  cfg = config if isinstance(config, ml_collections.ConfigDict) else ml_collections.ConfigDict(dict(config))
  data = cfg.get("data") or ml_collections.ConfigDict()
  amd = AMDArch.from_config(cfg) if cfg.get("method") == "amd" and "amd" in cfg else None
  return arch_from_config(cfg.model, decoder_cfg=cfg.get("decoder"), image_size=data.get("image_size", 224),
                          num_frames=data.get("num_frames", 16), in_chans=data.get("channels", 3),
                          video=data.get("modality", "image") == "video", final_norm=final_norm, amd=amd)


def run_layout(config) -> str:
  """The official naming an amd_jax run exports to by default: amd (video AMD), videomae or mae."""
  data = config.get("data") or {}
  video = data.get("modality", "image") == "video"
  if config.get("method") == "amd" and video:
    return "amd"
  return "videomae" if video else "mae"


def _check_layout(layout: str):
  if layout not in LAYOUTS:
    raise ValueError(f"unknown checkpoint layout {layout!r}; allowed: {', '.join(LAYOUTS)}")


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
  torch_key: str
  flax_path: tuple[str, ...] | None   # None for `pos`
  torch_shape: tuple[int, ...]
  kind: str                            # linear | conv | copy | pos | idle
  part: str                            # encoder | decoder | classifier | amd
  optional: bool = False               # absence is not an error (fixed tables, a norm that may be absent)


def _linear(entries, tkey, fpath, out_dim, in_dim, part, bias=True):
  entries.append(Entry(f"{tkey}.weight", fpath + ("kernel",), (out_dim, in_dim), "linear", part))
  if bias:
    entries.append(Entry(f"{tkey}.bias", fpath + ("bias",), (out_dim,), "copy", part))


def _norm(entries, tkey, fpath, dim, part, optional=False):
  entries.append(Entry(f"{tkey}.weight", fpath + ("scale",), (dim,), "copy", part, optional))
  entries.append(Entry(f"{tkey}.bias", fpath + ("bias",), (dim,), "copy", part, optional))


def _block(entries, tkey, fpath, width, hidden, qkv_bias, part):
  _norm(entries, f"{tkey}.norm1", fpath + ("norm1",), width, part)
  _linear(entries, f"{tkey}.attn.qkv", fpath + ("attn", "qkv"), 3 * width, width, part, bias=qkv_bias == "fused")
  if qkv_bias == "qv":
    entries.append(Entry(f"{tkey}.attn.q_bias", fpath + ("attn", "q_bias"), (width,), "copy", part))
    entries.append(Entry(f"{tkey}.attn.v_bias", fpath + ("attn", "v_bias"), (width,), "copy", part))
  _linear(entries, f"{tkey}.attn.proj", fpath + ("attn", "proj"), width, width, part)
  _norm(entries, f"{tkey}.norm2", fpath + ("norm2",), width, part)
  _linear(entries, f"{tkey}.mlp.fc1", fpath + ("mlp", "fc1"), hidden, width, part)
  _linear(entries, f"{tkey}.mlp.fc2", fpath + ("mlp", "fc2"), width, hidden, part)


def encoder_entries(arch: Arch, layout: str, prefix: str = "", *, export: bool = False,
                    root: tuple[str, ...] = ("encoder",), depth: int = 0) -> list[Entry]:
  """Official encoder keys (under `prefix`) and their Flax paths under `root`."""
  e: list[Entry] = []
  w = arch.width
  kernel = ((arch.tubelet_size,) if arch.is_video else ()) + (arch.patch_size, arch.patch_size)
  e.append(Entry(f"{prefix}patch_embed.proj.weight", root + ("patch_embed", "proj", "kernel"),
                 (w, arch.in_chans) + kernel, "conv", "encoder"))
  e.append(Entry(f"{prefix}patch_embed.proj.bias", root + ("patch_embed", "proj", "bias"), (w,), "copy", "encoder"))
  if arch.cls_token:
    e.append(Entry(f"{prefix}cls_token", root + ("cls_token",), (1, 1, w), "copy", "encoder"))
  # MAE/timm keep the fixed table as a (frozen) parameter; VideoMAE/AMD never save it.
  if family(layout) == "image" or not export:
    e.append(Entry(f"{prefix}pos_embed", None, (1, arch.num_patches + int(arch.cls_token), w), "pos", "encoder",
                   optional=True))
  for i in range(depth or arch.depth):
    _block(e, f"{prefix}blocks.{i}", root + (f"blocks_{i}",), w, arch.mlp_hidden, arch.qkv_bias, "encoder")
  if arch.final_norm is not False:
    _norm(e, f"{prefix}norm", root + ("norm",), w, "encoder", optional=arch.final_norm is None)
  return e


def decoder_entries(arch: Arch, layout: str, root: tuple[str, ...] = ("decoder",)) -> list[Entry]:
  """Official decoder keys of the layout's family and their Flax paths under `root` (MaskedTokenDecoder)."""
  d = arch.decoder
  if d is None:
    return []
  e: list[Entry] = []
  hidden = int(d.width * d.mlp_ratio)
  if family(layout) == "image":
    _linear(e, "decoder_embed", root + ("embed",), d.width, arch.width, "decoder")
    e.append(Entry("mask_token", root + ("mask_token",), (1, 1, d.width), "copy", "decoder"))
    e.append(Entry("decoder_pos_embed", None, (1, arch.num_patches + int(arch.cls_token), d.width), "pos",
                   "decoder", optional=True))
    for i in range(d.depth):
      _block(e, f"decoder_blocks.{i}", root + (f"blocks_{i}",), d.width, hidden, arch.qkv_bias, "decoder")
    _norm(e, "decoder_norm", root + ("norm",), d.width, "decoder")
    _linear(e, "decoder_pred", root + ("head",), arch.patch_dim, d.width, "decoder")
  else:
    _linear(e, "encoder_to_decoder", root + ("embed",), d.width, arch.width, "decoder", bias=False)
    e.append(Entry("mask_token", root + ("mask_token",), (1, 1, d.width), "copy", "decoder"))
    for i in range(d.depth):
      _block(e, f"decoder.blocks.{i}", root + (f"blocks_{i}",), d.width, hidden, arch.qkv_bias, "decoder")
    _norm(e, "decoder.norm", root + ("norm",), d.width, "decoder")
    _linear(e, "decoder.head", root + ("head",), arch.patch_dim, d.width, "decoder")
  return e


def classifier_entries(arch: Arch, num_classes: int, root: tuple[str, ...] = ()) -> list[Entry]:
  """fc_norm + head, at the top level of a classifier's params (generic: any pooling before them)."""
  e: list[Entry] = []
  _norm(e, "fc_norm", root + ("fc_norm",), arch.width, "classifier", optional=True)
  _linear(e, "head", root + ("head",), num_classes, arch.width, "classifier")
  return e


def amd_entries(arch: Arch, prefix: str = "encoder.") -> list[Entry]:
  """The official AMD student's projection heads and generators, and their Flax paths (AMD.init's tree).

  The generators' mask tokens are not here: the official state dict has none (see torch_to_flax)."""
  a = arch.amd
  if a is None:
    return []
  if not arch.is_video:
    raise ConversionError("the 'amd' part exists in the official AMD naming only, which is for video students "
                          "(tubelets, no cls token); an image AMD run exports its encoder and decoder in MAE naming")
  e: list[Entry] = []
  tw = a.teacher_width
  for i in range(a.num_pairs):
    _linear(e, f"{prefix}projection_heads.{i}", ("projections", f"proj_{i}"), tw, arch.width, "amd", bias=False)
  for i in range(a.num_pairs):
    root = ("generators", f"gen_{i}")
    for j in range(a.generator_depth):
      _block(e, f"generators.{i}.blocks.{j}", root + (f"blocks_{j}",), tw, int(tw * a.mlp_ratio), arch.qkv_bias, "amd")
    # Registered by the official Generator, never applied in its forward; amd_jax's generator has no final norm.
    e.append(Entry(f"generators.{i}.norm.weight", None, (tw,), "idle", "amd", optional=True))
    e.append(Entry(f"generators.{i}.norm.bias", None, (tw,), "idle", "amd", optional=True))
  return e


# Why the AMD generators' norm is not converted (report text).
IDLE_REASON = "AMD generator final norm (registered by the official Generator, never used in its forward)"

# Keys of official checkpoints that are known and deliberately not converted, with the reason.
KNOWN_UNUSED = (
    (r"^(encoder\.)?projection_heads\.", "AMD student projection heads (the 'amd' part: not asked for, or "
     "no AMD architecture given)"),
    (r"^generators\.", "AMD feature generators (the 'amd' part: not asked for, or no AMD architecture given)"),
    (r"^generator_mask_tokens", "AMD generator mask tokens"),
    (r"^(encoder\.|backbone\.)?head\.(weight|bias)$", "an encoder-side Identity/unused head"),
    (r"pos_embed$|position_embeddings$", "fixed position table"),
)


# Keys of the AMD parts (projection heads and generators).
AMD_KEYS = r"^((encoder\.)?projection_heads\.|generators\.)"

# Decoder keys of each naming family (reported as such when no decoder is converted).
DECODER_KEYS = {"mae": r"^(decoder_|mask_token$)", "videomae": r"^(decoder\.|encoder_to_decoder\.|mask_token$)"}


# ----------------------------------------------------------------------------------------------------------
# Layout conversion: transforms
# ----------------------------------------------------------------------------------------------------------
def torch_to_flax_array(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(a.T)
  if kind == "conv":  # (O, I, *k) -> (*k, I, O)
    nk = a.ndim - 2
    return np.ascontiguousarray(np.transpose(a, tuple(range(2, 2 + nk)) + (1, 0)))
  if kind == "copy":
    return np.ascontiguousarray(a)
  raise ValueError(kind)


def flax_to_torch_array(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(a.T)
  if kind == "conv":  # (*k, I, O) -> (O, I, *k)
    nk = a.ndim - 2
    return np.ascontiguousarray(np.transpose(a, (nk + 1, nk) + tuple(range(nk))))
  if kind == "copy":
    return np.ascontiguousarray(a)
  raise ValueError(kind)


def flax_shape(entry: Entry) -> tuple[int, ...]:
  s = entry.torch_shape
  if entry.kind == "linear":
    return (s[1], s[0])
  if entry.kind == "conv":
    return tuple(s[2:]) + (s[1], s[0])
  return tuple(s)


def fixed_table(arch: Arch, width: int) -> np.ndarray:
  """amd_jax's fixed table for this architecture, shaped like the official parameter (1, [1+]N, width)."""
  table = posemb.make_table(arch.pos_emb, width, arch.grid, cls_token=arch.cls_token)
  return table[None].astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# transformers -> official names
# ----------------------------------------------------------------------------------------------------------
_HF_LAYER_RULES = (
    # transformers 5.x ViTMAE
    (r"attention\.q_proj\.(weight|bias)", r"attn.q.\1"),
    (r"attention\.k_proj\.(weight|bias)", r"attn.k.\1"),
    (r"attention\.v_proj\.(weight|bias)", r"attn.v.\1"),
    (r"attention\.o_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"mlp\.fc1\.(weight|bias)", r"mlp.fc1.\1"),
    (r"mlp\.fc2\.(weight|bias)", r"mlp.fc2.\1"),
    # transformers 4.x ViTMAE and 4.x/5.x VideoMAE
    (r"attention\.attention\.query\.(weight|bias)", r"attn.q.\1"),
    (r"attention\.attention\.key\.(weight|bias)", r"attn.k.\1"),
    (r"attention\.attention\.value\.(weight|bias)", r"attn.v.\1"),
    (r"attention\.attention\.q_bias", r"attn.q_bias"),
    (r"attention\.attention\.v_bias", r"attn.v_bias"),
    (r"attention\.output\.dense\.(weight|bias)", r"attn.proj.\1"),
    (r"intermediate\.dense\.(weight|bias)", r"mlp.fc1.\1"),
    (r"output\.dense\.(weight|bias)", r"mlp.fc2.\1"),
    # both
    (r"layernorm_before\.(weight|bias)", r"norm1.\1"),
    (r"layernorm_after\.(weight|bias)", r"norm2.\1"),
)

_HF_VITMAE_RULES = (
    (r"(?:vit\.)?embeddings\.cls_token", "cls_token"),
    (r"(?:vit\.)?embeddings\.position_embeddings", "pos_embed"),
    (r"(?:vit\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(?:vit\.)?(?:layers|encoder\.layer)\.(\d+)\.(.+)", r"blocks.\1.<\2>"),
    (r"(?:vit\.)?layernorm\.(weight|bias)", r"norm.\1"),
    (r"decoder\.decoder_embed\.(weight|bias)", r"decoder_embed.\1"),
    (r"decoder\.mask_token", "mask_token"),
    (r"decoder\.decoder_pos_embed", "decoder_pos_embed"),
    # transformers 5.x writes its decoder layers as decoder_encoder.layer.N (4.x: decoder_layers.N).
    (r"decoder\.decoder_(?:layers|encoder\.layer)\.(\d+)\.(.+)", r"decoder_blocks.\1.<\2>"),
    (r"decoder\.decoder_norm\.(weight|bias)", r"decoder_norm.\1"),
    (r"decoder\.decoder_pred\.(weight|bias)", r"decoder_pred.\1"),
)

_HF_VIDEOMAE_RULES = (
    (r"(?:videomae\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)", r"encoder.patch_embed.proj.\1"),
    (r"(?:videomae\.)?encoder\.layer\.(\d+)\.(.+)", r"encoder.blocks.\1.<\2>"),
    (r"(?:videomae\.)?layernorm\.(weight|bias)", r"encoder.norm.\1"),
    (r"encoder_to_decoder\.weight", "encoder_to_decoder.weight"),
    (r"mask_token", "mask_token"),
    (r"decoder\.decoder_layers\.(\d+)\.(.+)", r"decoder.blocks.\1.<\2>"),
    (r"decoder\.norm\.(weight|bias)", r"decoder.norm.\1"),
    (r"decoder\.head\.(weight|bias)", r"decoder.head.\1"),
    (r"fc_norm\.(weight|bias)", r"fc_norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
)


def _rename_layer(rest: str) -> str | None:
  for pat, rep in _HF_LAYER_RULES:
    if re.fullmatch(pat, rest):
      return re.sub(pat, rep, rest)
  return None


def hf_key_to_official(key: str, layout: str) -> str | None:
  """One transformers ViTMAE / VideoMAE name -> its official name, with separate projections still separate
  (`blocks.N.attn.q.weight`, `.k.`, `.v.`); None for a name the layout does not know."""
  rules = {"hf_vitmae": _HF_VITMAE_RULES, "hf_videomae": _HF_VIDEOMAE_RULES}[layout]
  for pat, rep in rules:
    m = re.fullmatch(pat, key)
    if m:
      new = m.expand(rep)
      inner = re.search(r"<(.+)>$", new)
      if inner:
        layer = _rename_layer(inner.group(1))
        return None if layer is None else new[:inner.start()] + layer
      return new
  return None


def hf_to_official(state_dict: Mapping[str, np.ndarray], layout: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """transformers ViTMAE / VideoMAE names -> official names; returns (renamed, keys not recognised).

  Separate q/k/v projections are fused into attn.qkv.weight (rows q, k, v). Biases:
  all three present -> attn.qkv.bias (ViTMAE); q and v only -> attn.q_bias / attn.v_bias
  (VideoMAE, whose k has no bias).
  """
  out: dict[str, np.ndarray] = {}
  unknown: list[str] = []
  for key, value in state_dict.items():
    new = hf_key_to_official(key, layout)
    if new is None:
      unknown.append(key)
    else:
      out[new] = value
  # Fuse q/k/v.
  for key in [k for k in out if k.endswith(".attn.q.weight")]:
    base = key[: -len("q.weight")]
    parts = [base + f"{n}.weight" for n in "qkv"]
    if not all(p in out for p in parts):
      continue  # reported as missing qkv later
    out[base + "qkv.weight"] = np.concatenate([out.pop(p) for p in parts], axis=0)
    biases = [base + f"{n}.bias" for n in "qkv"]
    if all(b in out for b in biases):
      out[base + "qkv.bias"] = np.concatenate([out.pop(b) for b in biases], axis=0)
    else:
      if biases[0] in out:
        out[base + "q_bias"] = out.pop(biases[0])
      if biases[2] in out:
        out[base + "v_bias"] = out.pop(biases[2])
  return out, unknown


def official_to_hf_value(official: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray | None, tuple[str, ...]]:
  """The value of one official-named tensor as transformers holds it, and the official keys it came from.

  `name` is hf_key_to_official's answer: separate `attn.q/k/v.weight|bias` (and 4.x VideoMAE's
  `attn.q_bias / v_bias`) are cut from the fused `attn.qkv` (rows q, k, v) when the official
  layout fuses them; a k bias the official layout lacks (q_bias / v_bias) is zero, which is what
  the official forward adds. (None, ()) when the official dict has nothing for it.
  """
  m = re.fullmatch(r"(.+\.attn\.)(?:([qkv])\.(weight|bias)|([qv])_bias)", name)
  if m is None:
    return (official[name], (name,)) if name in official else (None, ())
  base, which, kind = m.group(1), m.group(2) or m.group(4), m.group(3) or "bias"
  fused = official.get(base + f"qkv.{kind}")
  if fused is not None:
    size = fused.shape[0] // 3
    row = "qkv".index(which)
    return fused[row * size:(row + 1) * size], (base + f"qkv.{kind}",)
  if kind == "weight":
    return None, ()
  if which == "k":
    weight = official.get(base + "qkv.weight")
    return (None, ()) if weight is None else (np.zeros(weight.shape[0] // 3, weight.dtype), ())
  key = base + f"{which}_bias"
  return (official[key], (key,)) if key in official else (None, ())


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
  layout: str
  arch: dict
  prefix: str = ""
  converted: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)       # expected, absent (optional ones only)
  unexpected: list[str] = dataclasses.field(default_factory=list)    # present, not recognised
  unused: dict[str, str] = dataclasses.field(default_factory=dict)   # present, known, deliberately skipped
  parts: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  pos_table_max_abs_diff: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    lines = [f"layout {self.layout}, parts {', '.join(self.parts) or '-'}; "
             f"width {self.arch['width']}, depth {self.arch['depth']}, heads {self.arch['num_heads']} "
             f"(from the architecture); {len(self.converted)} tensors converted"]
    if self.prefix:
      lines.append(f"encoder prefix {self.prefix!r} stripped")
    if self.missing:
      lines.append(f"missing (optional): {', '.join(self.missing)}")
    if self.unexpected:
      lines.append(f"unexpected ({len(self.unexpected)}): {', '.join(self.unexpected[:20])}"
                   + (" ..." if len(self.unexpected) > 20 else ""))
    if self.unused:
      reasons: dict[str, list[str]] = {}
      for k, why in self.unused.items():
        reasons.setdefault(why, []).append(k)
      for why, keys in reasons.items():
        lines.append(f"not converted ({why}): {len(keys)} keys, e.g. {keys[0]}")
    for k, v in self.pos_table_max_abs_diff.items():
      lines.append(f"{k}: max |checkpoint - amd_jax fixed table| = {v:.3g}")
    lines.extend(self.notes)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Tree helpers (nested dicts, block stacking for scan)
# ----------------------------------------------------------------------------------------------------------
def _set(tree: dict, path: tuple[str, ...], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def _has(tree: Mapping, path: tuple[str, ...]) -> bool:
  try:
    _get(tree, path)
    return True
  except (KeyError, TypeError):
    return False


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    _set(out, path, v)
  return out


def is_scanned(encoder_params: Mapping) -> bool:
  return "blocks" in encoder_params and "block" in encoder_params["blocks"]


def stack_blocks(encoder_params: Mapping, depth: int | None = None) -> dict:
  """blocks_0..blocks_{L-1} -> blocks/block with a leading layer axis (nn.scan's layout)."""
  params = dict(encoder_params)
  names = sorted((k for k in params if re.fullmatch(r"blocks_\d+", k)), key=lambda k: int(k[7:]))
  depth = len(names) if depth is None else depth
  if [f"blocks_{i}" for i in range(depth)] != names:
    raise ConversionError(f"cannot stack blocks {names}: expected blocks_0..blocks_{depth - 1}")
  per_block = [flatten(params.pop(n)) for n in names]
  stacked = {path: np.stack([np.asarray(b[path]) for b in per_block]) for path in per_block[0]}
  params["blocks"] = {"block": unflatten(stacked)}
  return params


def unstack_blocks(encoder_params: Mapping) -> dict:
  """blocks/block (leading layer axis) -> blocks_0..blocks_{L-1}."""
  params = dict(encoder_params)
  flat = flatten(params.pop("blocks")["block"])
  depth = {np.shape(v)[0] for v in flat.values()}
  if len(depth) != 1:
    raise ConversionError(f"stacked blocks disagree on the layer count: {sorted(depth)}")
  for i in range(depth.pop()):
    params[f"blocks_{i}"] = unflatten({p: np.asarray(v)[i] for p, v in flat.items()})
  return params


# ----------------------------------------------------------------------------------------------------------
# torch -> flax
# ----------------------------------------------------------------------------------------------------------
def _strip_wrappers(sd: Mapping[str, Any]) -> dict[str, Any]:
  keys = list(sd)
  if keys and all(k.startswith("module.") for k in keys):  # DistributedDataParallel
    return {k[len("module."):]: v for k, v in sd.items()}
  return dict(sd)


def _encoder_prefix(sd: Mapping[str, Any], layout: str) -> str:
  if family(layout) == "image":
    candidates = ("", "encoder.", "backbone.")
  else:
    candidates = ("encoder.", "backbone.", "")
  for p in candidates:
    if f"{p}patch_embed.proj.weight" in sd:
      return p
  return candidates[0]


# transformers model_type -> layout (a save_pretrained directory's config.json).
HF_MODEL_TYPES = {"vit_mae": "hf_vitmae", "videomae": "hf_videomae"}


def detect_layout(state_dict: Mapping[str, Any], record: Mapping | None = None,
                  hf_config: Mapping | None = None) -> str:
  """A naming family (never sizes or heads): from what amd_jax recorded when it wrote the file (`record`),
  else a transformers config.json's model_type, else the key names alone."""
  if record and record.get("layout") in LAYOUTS:
    return record["layout"]
  if hf_config and hf_config.get("model_type") in HF_MODEL_TYPES:
    return HF_MODEL_TYPES[hf_config["model_type"]]
  keys = list(_strip_wrappers(state_dict))
  starts = lambda *prefixes: any(k.startswith(prefixes) for k in keys)
  if starts("videomae."):
    return "hf_videomae"
  if starts("vit.embeddings", "vit.layers", "vit.encoder.layer"):
    return "hf_vitmae"
  # A transformers base model saved on its own (ViTMAEModel / VideoMAEModel.save_pretrained): no model prefix.
  if starts("embeddings.patch_embeddings."):
    return "hf_vitmae" if starts("embeddings.cls_token", "embeddings.position_embeddings") else "hf_videomae"
  if starts("generators.", "encoder.projection_heads"):
    return "amd"
  if starts("encoder.blocks", "backbone.blocks", "encoder_to_decoder", "decoder.blocks"):
    return "videomae"
  if any(".attn.q_bias" in k for k in keys) and not starts("cls_token"):
    return "videomae"
  if any(k.endswith("attn.qkv.weight") for k in keys):
    return "mae"
  raise ConversionError("cannot tell the checkpoint's naming from its keys (first keys: "
                        f"{', '.join(keys[:5])}); name it with layout=")


def torch_to_flax(state_dict: Mapping[str, Any], arch: Arch, layout: str, *,
                  parts: Iterable[str] | None = None, scan: bool = False, max_depth: int = 0,
                  strict: bool = False, generator_mask_tokens=None, mask_tokens_source: str = "",
                  seed: int = 0) -> tuple[dict, Report]:
  """Official (or transformers) state dict -> Flax params {'encoder', ['decoder'], ['fc_norm', 'head'],
  ['projections', 'generators']}.

  Args:
    state_dict: name -> array (numpy or anything np.asarray takes); wrappers such as
      {'model': ...} must be removed first (amd_jax.convert.torch_io.read_state_dict does).
    arch: the architecture the checkpoint must have. Every expected tensor's shape is
      checked; a mismatch raises ShapeMismatchError naming the key and both shapes.
    layout: one of LAYOUTS, or 'auto' (detect_layout).
    parts: which parts to convert. None: the encoder always, the decoder when
      arch.decoder is set and the checkpoint has decoder keys, the classifier when it has
      `head.weight`, the AMD parts when arch.amd is set and it has projection heads. A
      part asked for by name must be complete.
    scan: stack encoder blocks for an nn.scan encoder.
    max_depth: > 0 converts only the first blocks (the rest are reported unused).
    strict: unexpected keys raise instead of being reported.
    generator_mask_tokens: the AMD generators' mask tokens, which the official state dict
      lacks: an array [num_pairs, ...] or {'gen_i': array}; None draws them with amd_jax's
      generator init (PRNG seed `seed`). mask_tokens_source names where given ones came
      from, for the report.

  Returns (params, report). Encoder keys that are missing always raise: a model must
  never run with silently random weights.
  """
  if layout == "auto":
    layout = detect_layout(state_dict)
  _check_layout(layout)
  sd = _strip_wrappers(state_dict)
  report = Report(layout=layout, arch=arch.describe())
  if layout.startswith("hf_"):
    sd, unknown = hf_to_official(sd, layout)
    report.unexpected.extend(unknown)
  naming = "mae" if family(layout) == "image" else "videomae"
  prefix = _encoder_prefix(sd, naming)
  report.prefix = prefix

  depth = min(max_depth, arch.depth) if max_depth else arch.depth
  entries = {"encoder": encoder_entries(arch, naming, prefix, depth=depth)}
  has = lambda key: key in sd
  wanted = set(parts) if parts is not None else None
  if wanted is not None and not wanted <= set(PARTS):
    raise ValueError(f"unknown parts {sorted(wanted - set(PARTS))}; allowed: {', '.join(PARTS)}")
  dec = decoder_entries(arch, naming)
  if dec and (wanted is None and any(has(e.torch_key) for e in dec if not e.optional)
              or wanted is not None and "decoder" in wanted):
    entries["decoder"] = dec
  elif wanted is not None and "decoder" in wanted:
    raise ConversionError("the decoder was asked for, but the architecture names no decoder (Arch.decoder)")
  if wanted is None and has("head.weight") or wanted is not None and "classifier" in wanted:
    num_classes = arch.num_classes or (int(np.shape(sd["head.weight"])[0]) if has("head.weight") else 0)
    if not num_classes:
      raise ConversionError("the classifier was asked for, but the checkpoint has no head.weight")
    entries["classifier"] = classifier_entries(arch, num_classes)
  if wanted is not None and "amd" in wanted and arch.amd is None:
    raise ConversionError("the AMD parts were asked for, but the architecture names none (Arch.amd: teacher "
                          "width, layer pairs, generator depth)")
  if arch.amd is not None and (wanted is None and has(f"{prefix}projection_heads.0.weight")
                               or wanted is not None and "amd" in wanted):
    entries["amd"] = amd_entries(arch, prefix)
  if wanted is not None:
    entries = {k: v for k, v in entries.items() if k in wanted or k == "encoder"}
  report.parts = list(entries)

  params: dict = {}
  used: set[str] = set()
  missing_required: list[str] = []
  for part_entries in entries.values():
    for entry in part_entries:
      if entry.kind == "idle":
        if has(entry.torch_key):
          used.add(entry.torch_key)
          report.unused[entry.torch_key] = IDLE_REASON
        continue
      if not has(entry.torch_key):
        if entry.kind == "pos" and naming == "videomae":
          continue  # VideoMAE / AMD never save their fixed tables
        if entry.optional:
          report.missing.append(entry.torch_key)
        else:
          missing_required.append(entry.torch_key)
        continue
      value = np.asarray(sd[entry.torch_key])
      if entry.kind == "pos" and tuple(value.shape) != entry.torch_shape:
        # A table for another input size: nothing to convert (amd_jax computes its own table).
        used.add(entry.torch_key)
        report.notes.append(f"{entry.torch_key} has shape {tuple(value.shape)}, not {entry.torch_shape}: a table "
                            "for another input size; not compared (amd_jax computes the table for its input)")
        continue
      if tuple(value.shape) != entry.torch_shape:
        raise ShapeMismatchError(
            f"{entry.torch_key}: the checkpoint has shape {tuple(value.shape)}, the architecture expects "
            f"{entry.torch_shape} (width {arch.width}, depth {arch.depth}, patch {arch.patch_size}"
            f"{f', tubelet {arch.tubelet_size}' if arch.is_video else ''}"
            f"{f', decoder width {arch.decoder.width}' if arch.decoder else ''})")
      used.add(entry.torch_key)
      value = value.astype(np.float32)
      if entry.kind == "pos":
        table = fixed_table(arch, entry.torch_shape[-1])
        diff = float(np.max(np.abs(value[:, int(arch.cls_token):] - table[:, int(arch.cls_token):])))
        report.pos_table_max_abs_diff[entry.torch_key] = diff
        if diff > POS_TABLE_TOL:
          report.notes.append(
              f"WARNING: {entry.torch_key} differs from amd_jax's fixed {arch.pos_emb} table by up to {diff:.3g} "
              "(a learned, fine-tuned or zero table?); amd_jax always uses the fixed table, so outputs will differ")
        continue
      _set(params, entry.flax_path, torch_to_flax_array(entry.kind, value))
      report.converted.append(entry.torch_key)

  if missing_required:
    by_part = {p: [e.torch_key for e in es if e.torch_key in missing_required] for p, es in entries.items()}
    detail = "; ".join(f"{p}: {', '.join(ks[:8])}{' ...' if len(ks) > 8 else ''} ({len(ks)} keys)"
                       for p, ks in by_part.items() if ks)
    hint = ""
    if f"{prefix}norm.weight" in missing_required:
      hint = (" A fine-tuned checkpoint with mean pooling has no final `norm` (it has fc_norm): "
              "convert it with final_norm=None or False.")
    raise ConversionError(f"the checkpoint lacks keys the architecture needs ({detail}). Layout {layout!r}, "
                          f"encoder prefix {prefix!r}; check --layout/--arch.{hint}")

  # Fold a non-zero cls row of pos_embed into cls_token (fine-tuned timm models learn it).
  pos_key = f"{prefix}pos_embed"
  if arch.cls_token and pos_key in used:
    cls_pos = np.asarray(sd[pos_key], np.float32)[:, :1]
    if np.any(cls_pos != 0):
      params["encoder"]["cls_token"] = params["encoder"]["cls_token"] + cls_pos
      report.notes.append(f"{pos_key}[:, 0] (non-zero) was added into cls_token")

  for key in sd:
    if key in used:
      continue
    reason = None
    if max_depth and re.match(rf"^{re.escape(prefix)}blocks\.(\d+)\.", key) and \
        int(re.match(rf"^{re.escape(prefix)}blocks\.(\d+)\.", key).group(1)) >= depth:
      reason = f"blocks past max_depth={depth}"
    elif "decoder" not in entries and re.match(DECODER_KEYS[naming], key):
      reason = "decoder (not asked for)" if wanted is not None and arch.decoder else \
          "decoder (no decoder architecture given)"
    elif "classifier" not in entries and key in ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"):
      reason = "classifier (not asked for)"
    elif arch.final_norm is False and key in (f"{prefix}norm.weight", f"{prefix}norm.bias"):
      reason = "final norm (final_norm=False)"
    elif "amd" in entries and re.match(AMD_KEYS, key):
      reason = None   # the AMD parts were converted: a key they have no place for is unexpected
    else:
      for pat, why in KNOWN_UNUSED:
        if re.search(pat, key):
          reason = why
          break
    if reason is not None:
      report.unused[key] = reason
    else:
      report.unexpected.append(key)
  in_blocks = [k for k in report.unexpected if re.match(rf"^{re.escape(prefix)}blocks\.\d+\.", k)]
  if in_blocks:
    raise ConversionError(
        f"the checkpoint's encoder blocks hold tensors amd_jax's Block has no place for: {', '.join(in_blocks[:6])}"
        " (layer scale gamma_1/gamma_2, or a different bias layout than qkv_bias="
        f"{arch.qkv_bias!r}?); converting without them would change the model's outputs")
  if arch.final_norm is None and not _has(params, ("encoder", "norm")):
    report.notes.append("the checkpoint has no final encoder `norm` (e.g. fine-tuned with mean pooling): "
                        "build the encoder with final_norm=False")
  if report.unexpected and strict:
    raise ConversionError(f"unexpected keys in the checkpoint: {', '.join(report.unexpected[:20])}")
  if "amd" in entries:
    _complete_amd_parts(params, arch, report, generator_mask_tokens, mask_tokens_source, seed)
  if scan:
    params["encoder"] = stack_blocks(params["encoder"], depth)
  return params, report


def _complete_amd_parts(params: dict, arch: Arch, report: "Report", tokens, source: str, seed: int):
  """Give the converted AMD parts what the official state dict cannot hold: the generators' mask tokens, and
  (for amd.shared_heads=False) the generator projections."""
  a = arch.amd
  if tokens is None:
    tokens = init_generator_mask_tokens(arch, seed)
    report.notes.append(f"generator mask tokens: drawn with amd_jax's generator init ({a.init_scheme} scheme, "
                        f"PRNG seed {seed}); the "
                        "official checkpoint has none (its model never registers them, so they stay at their "
                        "random init and are not saved)")
  else:
    tokens = _mask_token_list(tokens, a)
    report.notes.append(f"generator mask tokens: from {source or 'the given arrays'}")
  for i, token in enumerate(tokens):
    params["generators"][f"gen_{i}"]["mask_token"] = token
  if not a.shared_heads:
    # The official model feeds one projection to both alignment paths: the same weights reproduce it exactly.
    params["generator_projections"] = {k: {"kernel": np.array(v["kernel"])} for k, v in params["projections"].items()}
    report.notes.append("generator projections (amd.shared_heads=False): copies of the projection heads, which "
                        "the official model shares between both alignment paths")


def init_generator_mask_tokens(arch: Arch, seed: int = 0) -> list[np.ndarray]:
  """One (1, 1, teacher_width) mask token per generator, drawn by amd_jax's own generator module under the
  architecture's init_scheme ('videomae': the official AMD rule, truncated normal, std 0.02 cut at +-0.02)."""
  a = arch.amd
  gen = decoders.MaskedTokenDecoder(width=a.teacher_width, depth=0, num_heads=a.heads, grid=(2,), out_dim=0,
                                    embed="none", final_norm=False, pos_emb="sincos1d", init_scheme=a.init_scheme)
  x = np.zeros((1, 1, a.teacher_width), np.float32)
  keep, target = np.zeros((1, 1), np.int32), np.ones((1, 1), np.int32)
  out = []
  for i in range(a.num_pairs):
    variables = gen.init(jax.random.fold_in(jax.random.PRNGKey(seed), i), x, keep, target)
    out.append(np.asarray(nn.meta.unbox(variables["params"])["mask_token"], np.float32))
  return out


def _mask_token_list(tokens, a: AMDArch) -> list[np.ndarray]:
  """[num_pairs] arrays of shape (1, 1, teacher_width) from an array or a {'gen_i': array} mapping."""
  if isinstance(tokens, Mapping):
    missing = [f"gen_{i}" for i in range(a.num_pairs) if f"gen_{i}" not in tokens]
    if missing:
      raise ConversionError(f"generator mask tokens: no {', '.join(missing)} among {', '.join(sorted(tokens))}")
    tokens = [tokens[f"gen_{i}"] for i in range(a.num_pairs)]
  tokens = [np.asarray(t, np.float32) for t in tokens]
  if len(tokens) != a.num_pairs or any(t.size != a.teacher_width for t in tokens):
    raise ConversionError(f"generator mask tokens: expected {a.num_pairs} of size {a.teacher_width} (teacher width),"
                          f" got shapes {[t.shape for t in tokens]}")
  return [t.reshape(1, 1, a.teacher_width) for t in tokens]


def generator_mask_tokens(params: Mapping) -> np.ndarray:
  """The AMD generators' mask tokens of a params tree, stacked: [num_pairs, 1, 1, teacher_width]."""
  gens = params["generators"]
  return np.stack([np.asarray(gens[f"gen_{i}"]["mask_token"], np.float32) for i in range(len(gens))])


# ----------------------------------------------------------------------------------------------------------
# flax -> torch
# ----------------------------------------------------------------------------------------------------------
def split_params(params: Mapping) -> dict:
  """Accept a bare encoder, {'encoder': ...} (+ 'decoder'), or a classifier's params; return the nested form."""
  params = dict(params)
  if "patch_embed" in params:  # a bare encoder
    return {"encoder": params}
  if "encoder" not in params:
    raise ConversionError(f"no encoder in these params (top-level names: {', '.join(params)})")
  return params


def flax_to_torch(params: Mapping, arch: Arch, layout: str, *, parts: Iterable[str] | None = None,
                  encoder_prefix: str | None = None) -> dict[str, np.ndarray]:
  """Flax params -> state dict in the official naming of `layout` (mae | videomae | amd).

  parts: None exports every part the params hold (encoder, decoder when arch.decoder is
  set, classifier when they hold 'head', the AMD parts when arch.amd is set and they hold
  'projections'). encoder_prefix: None uses 'encoder.' for a videomae/amd export that
  includes the decoder or the AMD parts (the pre-training checkpoint layout) and no prefix
  otherwise (what the official fine-tuning and encoder models load strictly).
  The final norm is written when the encoder params have one. MAE exports include the
  fixed pos_embed (and decoder_pos_embed) that the official models keep as parameters;
  AMD exports the generators' norm as the identity (the official forward never uses it).
  The generators' mask tokens have no official key: see generator_mask_tokens().
  """
  if layout not in OFFICIAL_LAYOUTS:
    raise ValueError(f"export layout {layout!r}; allowed: {', '.join(OFFICIAL_LAYOUTS)}")
  params = split_params(nn.meta.unbox(params))   # a module's own init keeps logical-axis metadata on each leaf
  enc = params["encoder"]
  if is_scanned(enc):
    enc = unstack_blocks(enc)
  params = dict(params, encoder=enc)
  wanted = export_parts(params, arch, parts)
  if "decoder" in wanted and (arch.decoder is None or "decoder" not in params):
    raise ConversionError("decoder export asked for, but "
                          + ("the architecture names no decoder" if arch.decoder is None else "the params have none"))
  if "classifier" in wanted and "head" not in params:
    raise ConversionError("classifier export asked for, but the params have no 'head'")
  naming = "mae" if family(layout) == "image" else "videomae"
  if "amd" in wanted:
    _check_amd_export(params, arch, layout, encoder_prefix)
  if encoder_prefix is None:
    encoder_prefix = "encoder." if naming == "videomae" and wanted & {"decoder", "amd"} else ""
  export_arch = dataclasses.replace(arch, final_norm="norm" in enc)
  entries = encoder_entries(export_arch, naming, encoder_prefix, export=True)
  if "decoder" in wanted:
    entries += decoder_entries(arch, naming)
  if "classifier" in wanted:
    entries += classifier_entries(arch, int(np.shape(params["head"]["kernel"])[1]))
    if "fc_norm" not in params:
      entries = [e for e in entries if not e.torch_key.startswith("fc_norm.")]
  consumed: set[tuple[str, ...]] = set()
  if "amd" in wanted:
    entries += amd_entries(arch, encoder_prefix)
    consumed |= {("generators", f"gen_{i}", "mask_token") for i in range(arch.amd.num_pairs)}
    consumed |= {("generator_projections",) + p for p in flatten(params.get("generator_projections", {}))}
  out: dict[str, np.ndarray] = {}
  for entry in entries:
    if entry.kind == "pos":
      out[entry.torch_key] = fixed_table(arch, entry.torch_shape[-1])
      continue
    if entry.kind == "idle":  # an identity LayerNorm: weight 1, bias 0
      out[entry.torch_key] = np.full(entry.torch_shape, float(entry.torch_key.endswith(".weight")), np.float32)
      continue
    consumed.add(entry.flax_path)
    if not _has(params, entry.flax_path):
      raise ConversionError(f"the Flax params lack {'/'.join(entry.flax_path)} (for {entry.torch_key}); "
                            "do they match the architecture (bias layout, cls token, depth)?")
    value = np.asarray(_get(params, entry.flax_path))
    if tuple(value.shape) != flax_shape(entry):
      raise ShapeMismatchError(f"{'/'.join(entry.flax_path)} (-> {entry.torch_key}): the params have shape "
                               f"{tuple(value.shape)}, the architecture expects {flax_shape(entry)}")
    out[entry.torch_key] = flax_to_torch_array(entry.kind, value.astype(np.float32))
  # Everything in an exported part must have gone somewhere: leftovers mean a different architecture.
  leftovers = []
  for part in wanted:
    for top in PART_TOPS[part]:
      if top in params:
        leftovers += ["/".join((top,) + p) for p in flatten(params[top], ()) if (top,) + p not in consumed]
  if leftovers:
    raise ConversionError(f"the Flax params hold tensors the architecture does not have: {', '.join(leftovers[:8])}"
                          f"{' ...' if len(leftovers) > 8 else ''} (depth {arch.depth}"
                          f"{f', decoder depth {arch.decoder.depth}' if arch.decoder else ''}"
                          f"{f', {arch.amd.num_pairs} AMD pairs' if arch.amd else ''}?)")
  return out


def export_parts(params: Mapping, arch: Arch, parts: Iterable[str] | None = None) -> set[str]:
  """The parts an export writes: `parts`, or (None) every part the params hold that the architecture names."""
  if parts is not None:
    wanted = set(parts) | {"encoder"}
    if not wanted <= set(PARTS):
      raise ValueError(f"unknown parts {sorted(wanted - set(PARTS))}; allowed: {', '.join(PARTS)}")
    return wanted
  params = split_params(params)
  return {p for p in PARTS if p == "encoder" or p == "decoder" and "decoder" in params and arch.decoder
          or p == "classifier" and "head" in params or p == "amd" and "projections" in params and arch.amd}


def _check_amd_export(params: Mapping, arch: Arch, layout: str, encoder_prefix: str | None):
  if arch.amd is None:
    raise ConversionError("AMD export asked for, but the architecture names no AMD parts (Arch.amd)")
  if layout != "amd":
    raise ConversionError(f"the AMD parts have official names only in the 'amd' layout, not {layout!r}")
  missing = [top for top in ("projections", "generators") if top not in params]
  if missing:
    raise ConversionError(f"AMD export asked for, but the params have no {' or '.join(missing)}")
  if encoder_prefix not in (None, "encoder."):
    raise ConversionError(f"the official AMD model keeps its projection heads under 'encoder.', not "
                          f"{encoder_prefix!r}")
  separate = params.get("generator_projections")
  if separate is not None:
    same = all(np.array_equal(np.asarray(separate[k]["kernel"]), np.asarray(params["projections"][k]["kernel"]))
               for k in params["projections"])
    if not same:
      raise ConversionError("the params hold separate generator projections (amd.shared_heads=False) that differ "
                            "from the projection heads; the official AMD model has one projection per layer pair "
                            "for both alignment paths, so they have no place in its state dict")
