"""Command line: convert checkpoints between PyTorch (official naming) and amd_jax.

  # PyTorch -> Flax: an official VideoMAE ViT-L checkpoint into DIR/params.npz (+ DIR/conversion.json)
  python -m amd_jax.convert to_flax --arch vit_l --layout videomae --input vit_l_k400.pth --output DIR

  # Flax -> PyTorch: the student encoder of an amd_jax run, in VideoMAE naming
  python -m amd_jax.convert to_torch --workdir RUN_DIR --output student.pth
  python -m amd_jax.convert to_torch --workdir RUN_DIR --arch vit_s --layout videomae --output s.safetensors

The architecture is always named (--arch, optionally --width/--depth/--num_heads) or,
for to_torch, read from the run's config.json; head counts are never guessed from
shapes. Layouts: mae, videomae, amd, hf_vitmae, hf_videomae (to_flax also: auto).
Existing outputs are never replaced without --overwrite.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from amd_jax import progress
from amd_jax.convert import mapping

PARAMS_FILE = "params.npz"


class UsageError(Exception):
  """A command-line mistake: printed as one sentence, exit status 2."""


REPORT_FILE = "conversion.json"


def _bool_or_auto(text: str) -> bool | None:
  t = text.lower()
  if t in ("auto", "none", ""):
    return None
  if t in ("1", "true", "yes"):
    return True
  if t in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}")


def _add_arch_flags(p: argparse.ArgumentParser, required: bool):
  p.add_argument("--arch", required=required, choices=sorted(mapping.ARCH_NAMES),
                 help="encoder size: width, depth and heads of amd_jax.models.vit.VARIANTS")
  p.add_argument("--width", type=int, default=0, help="override the architecture's width")
  p.add_argument("--depth", type=int, default=0, help="override the architecture's depth")
  p.add_argument("--num_heads", type=int, default=0,
                 help="override the head count (e.g. 12 for MAE-lite's ViT-Ti); never inferred from shapes")
  p.add_argument("--patch_size", type=int, default=None, help="default 16")
  p.add_argument("--tubelet_size", type=int, default=None, help="videos; default 2")
  p.add_argument("--image_size", type=int, default=None, help="input size the fixed tables are for; default 224")
  p.add_argument("--num_frames", type=int, default=None, help="videos; default 16")
  p.add_argument("--in_chans", type=int, default=None, help="default 3")
  p.add_argument("--mlp_ratio", type=float, default=None, help="default 4")
  p.add_argument("--decoder_width", type=int, default=0, help="default: the official decoder of the layout")
  p.add_argument("--decoder_depth", type=int, default=0)
  p.add_argument("--decoder_heads", type=int, default=0)


def _pick(value, default):
  return default if value is None else value


def _arch(args, layout: str, final_norm, run_config: dict | None = None) -> mapping.Arch:
  """Architecture from the named flags, or from a run's config.json (flags override it)."""
  if args.arch is None and run_config is None:
    raise UsageError("name the architecture with --arch (or give a --workdir holding config.json)")
  if args.arch is not None:
    arch = mapping.named_arch(
        args.arch, layout, num_heads=args.num_heads, patch_size=_pick(args.patch_size, 16),
        tubelet_size=_pick(args.tubelet_size, 2), image_size=_pick(args.image_size, 224),
        num_frames=_pick(args.num_frames, 16), in_chans=_pick(args.in_chans, 3),
        decoder_width=args.decoder_width, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
        final_norm=final_norm)
    changes = {k: v for k, v in (("width", args.width), ("depth", args.depth)) if v}
    if args.mlp_ratio is not None:
      changes["mlp_ratio"] = args.mlp_ratio
    arch = dataclasses.replace(arch, **changes)
    if run_config is not None:
      theirs = _arch_from_run_config(run_config, layout, final_norm)
      diffs = [f"{f}: --arch gives {getattr(arch, f)}, the run has {getattr(theirs, f)}"
               for f in ("width", "depth", "num_heads", "patch_size", "cls_token", "qkv_bias", "tubelet_size")
               if getattr(arch, f) != getattr(theirs, f)]
      if diffs:
        raise UsageError("the named architecture differs from the run's config.json: " + "; ".join(diffs))
    return arch
  return _arch_from_run_config(run_config, layout, final_norm, args)


def _arch_from_run_config(cfg: dict, layout: str, final_norm, args=None) -> mapping.Arch:
  import ml_collections  # pylint: disable=g-import-not-at-top
  model = ml_collections.ConfigDict(cfg["model"])
  if args is not None:
    for field in ("width", "depth", "num_heads"):
      if getattr(args, field):
        model[field] = getattr(args, field)
  decoder = ml_collections.ConfigDict(cfg["decoder"]) if "decoder" in cfg else None
  data = cfg.get("data", {})
  return mapping.arch_from_config(
      model, decoder_cfg=decoder, image_size=data.get("image_size", 224), num_frames=data.get("num_frames", 16),
      in_chans=data.get("channels", 3), video=data.get("modality", mapping.family(layout)) == "video",
      final_norm=final_norm)


def cmd_to_flax(args) -> int:
  from amd_jax.convert import save_flax_params, torch_io  # pylint: disable=g-import-not-at-top
  out_params = os.path.join(args.output, PARAMS_FILE)
  out_report = os.path.join(args.output, REPORT_FILE)
  for path in (out_params, out_report):
    if os.path.exists(path) and not args.overwrite:
      raise UsageError(f"{path} exists; nothing was written (use --overwrite or another --output)")
  stages = progress.Stages(("reading", "converting", "writing"), desc="to_flax")
  state_dict, info = torch_io.read_state_dict(args.input)
  stages.done()
  layout = args.layout
  if layout == "auto":
    layout = mapping.detect_layout(state_dict)
    print(f"layout: {layout} (detected from the key names)")
  arch = _arch(args, layout, args.final_norm)
  parts = tuple(args.parts.split(",")) if args.parts else None
  params, report = mapping.torch_to_flax(state_dict, arch, layout, parts=parts, scan=args.scan, strict=args.strict)
  stages.done()
  if info["wrapper"]:
    report.notes.insert(0, f"weights read from the {info['wrapper']!r} entry of the checkpoint")
  meta = {"source": os.path.abspath(args.input), "layout": layout, "arch": arch.describe(), "scan": args.scan,
          "parts": report.parts}
  os.makedirs(args.output, exist_ok=True)
  save_flax_params(params, out_params, metadata=meta, overwrite=args.overwrite)
  tmp = out_report + ".tmp"
  with open(tmp, "w") as f:
    json.dump({**meta, "report": report.to_dict()}, f, indent=2)
  os.replace(tmp, out_report)
  stages.done()
  print(report.summary())
  print(f"wrote {out_params} and {out_report}")
  return 0


def cmd_to_torch(args) -> int:
  from amd_jax.convert import export_torch, load_flax_params  # pylint: disable=g-import-not-at-top
  if bool(args.workdir) == bool(args.params):
    raise UsageError("give exactly one of --workdir (an amd_jax run) and --params (an .npz from to_flax)")
  if os.path.exists(args.output) and not args.overwrite:
    raise UsageError(f"{args.output} exists; nothing was written (use --overwrite or another --output)")
  stages = progress.Stages(("reading", "writing"), desc="to_torch")
  run_config = None
  if args.workdir:
    from amd_jax.train.checkpoint import load_params  # pylint: disable=g-import-not-at-top
    cfg_path = os.path.join(args.workdir, "config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        run_config = json.load(f)
    params = load_params(args.workdir, step=args.step)
  else:
    params, meta = load_flax_params(args.params)
  layout = args.layout
  if layout is None:
    method = (run_config or {}).get("method")
    layout = {"mae": "mae", "videomae": "videomae", "amd": "amd"}.get(method)
    if layout is None:
      raise UsageError("name the output naming with --layout (mae, videomae or amd)")
  arch = _arch(args, layout, None, run_config)
  parts = ["encoder"]
  params = mapping.split_params(params)
  if "head" in params:
    parts.append("classifier")
  if args.include_decoder:
    parts.append("decoder")
  prefix = None if args.encoder_prefix == "auto" else args.encoder_prefix
  stages.done()
  state_dict = export_torch(params, args.output, arch, layout, parts=parts, wrap=args.wrap, encoder_prefix=prefix,
                            overwrite=args.overwrite)
  stages.done()
  print(f"layout {layout}; width {arch.width}, depth {arch.depth}, heads {arch.num_heads}; parts {', '.join(parts)}")
  print(f"wrote {len(state_dict)} tensors to {args.output}"
        + (f" under {args.wrap!r}" if args.wrap and not args.output.endswith(".safetensors") else ""))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m amd_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("to_flax", help="PyTorch checkpoint -> OUTPUT/params.npz")
  _add_arch_flags(p, required=True)
  p.add_argument("--layout", default="auto", choices=("auto",) + mapping.LAYOUTS)
  p.add_argument("--input", required=True, help=".pth/.pt/.bin or .safetensors")
  p.add_argument("--output", required=True, help="directory for params.npz and conversion.json")
  p.add_argument("--parts", default="", help="comma list of encoder,decoder,classifier; default: what the file has")
  p.add_argument("--final_norm", type=_bool_or_auto, default=None,
                 help="true: require the final norm; false: skip it; auto (default): convert it when present")
  p.add_argument("--scan", action="store_true", help="stack blocks for an nn.scan encoder (model.scan=True)")
  p.add_argument("--strict", action="store_true", help="unexpected keys are an error")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=cmd_to_flax)

  p = sub.add_parser("to_torch", help="amd_jax params -> official-naming .pth / .safetensors")
  _add_arch_flags(p, required=False)
  p.add_argument("--workdir", default="", help="an amd_jax run (its latest checkpoint)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--params", default="", help="or an .npz written by to_flax")
  p.add_argument("--layout", default=None, choices=mapping.OFFICIAL_LAYOUTS,
                 help="naming of the output; default: from the run's method")
  p.add_argument("--output", required=True, help="x.pth or x.safetensors")
  p.add_argument("--include_decoder", action="store_true", help="also export the pixel decoder")
  p.add_argument("--encoder_prefix", default="auto",
                 help="prefix of encoder keys; auto: 'encoder.' for videomae/amd with the decoder, else none")
  p.add_argument("--wrap", default="model", help="key the .pth state dict is saved under ('' for a bare one)")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=cmd_to_torch)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (UsageError, mapping.ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"amd_jax.convert: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
