"""Command line: convert checkpoints between PyTorch (official or transformers naming) and amd_jax.

  # PyTorch -> Flax: an official VideoMAE ViT-L checkpoint into DIR/params.npz (+ DIR/conversion.json)
  python -m amd_jax.convert to_flax --arch vit_l --layout videomae --input vit_l_k400.pth --output DIR
  # a file amd_jax exported, or a transformers save_pretrained directory: no architecture flags needed
  python -m amd_jax.convert to_flax --input student.pth --output DIR
  python -m amd_jax.convert to_flax --input hf_model_dir --output DIR
  # an official AMD student, whole (projection heads and generators too: name the teacher)
  python -m amd_jax.convert to_flax --arch vit_s --layout amd --teacher_arch vit_l --input amd.pth --output DIR

  # Flax -> PyTorch: the student encoder of an amd_jax run, in its official naming
  python -m amd_jax.convert to_torch --workdir RUN_DIR --output student.pth
  python -m amd_jax.convert to_torch --workdir RUN_DIR --parts all --output whole.pth    # every part
  # ... or as a transformers directory (ViTMAEModel / VideoMAEModel.from_pretrained(DIR))
  python -m amd_jax.convert to_torch --workdir RUN_DIR --layout hf_vitmae --output DIR

The architecture comes from what the input records (amd_jax's export record beside a file
it wrote, a transformers config.json, a run's config.json, a to_flax params file) or is named
(--arch, optionally --width/--depth/--num_heads ...); head counts are never guessed from shapes.
Layouts: mae, videomae, amd, hf_vitmae, hf_videomae (to_flax also: auto). Inputs and outputs
may be gs:// URLs. Existing outputs are never replaced without --overwrite.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from amd_jax import convert, paths, progress, weights
from amd_jax.convert import mapping, torch_io
from amd_jax.models import vit

PARAMS_FILE = "params.npz"
REPORT_FILE = "conversion.json"
# Fields a named architecture must share with what the input records.
ARCH_FIELDS = ("width", "depth", "num_heads", "patch_size", "cls_token", "qkv_bias", "tubelet_size")


class UsageError(Exception):
  """A command-line mistake: printed as one sentence, exit status 2."""


def _bool_or_auto(text: str) -> bool | None:
  t = text.lower()
  if t in ("auto", "none", ""):
    return None
  if t in ("1", "true", "yes"):
    return True
  if t in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}")


def _add_arch_flags(p: argparse.ArgumentParser):
  p.add_argument("--arch", default=None, choices=sorted(mapping.ARCH_NAMES),
                 help="encoder size: width, depth and heads of amd_jax.models.vit.VARIANTS (default: what the "
                      "input records)")
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
  p.add_argument("--teacher_arch", default=None, choices=sorted(mapping.ARCH_NAMES),
                 help="AMD: the teacher the student was distilled from (its width sizes the projection heads and "
                      "generators); needed to convert an official AMD student whole")
  p.add_argument("--teacher_width", type=int, default=0, help="AMD: override the teacher width")
  p.add_argument("--amd_pairs", type=int, default=2, help="AMD: aligned layer pairs (projection heads, generators)")
  p.add_argument("--generator_depth", type=int, default=2, help="AMD: blocks per generator")
  p.add_argument("--generator_heads", type=int, default=0, help="AMD: generator heads (0: teacher width / 64)")


def _pick(value, default):
  return default if value is None else value


def _named_amd(args) -> mapping.AMDArch | None:
  if args.teacher_arch is None and not args.teacher_width:
    return None
  width = args.teacher_width
  if not width:
    width, _, _ = vit.resolve_variant(mapping.ARCH_NAMES[args.teacher_arch])
  return mapping.AMDArch(teacher_width=width, num_pairs=args.amd_pairs, generator_depth=args.generator_depth,
                         generator_heads=args.generator_heads)


def _named_arch(args, layout: str, final_norm) -> mapping.Arch:
  arch = mapping.named_arch(
      args.arch, layout, num_heads=args.num_heads, patch_size=_pick(args.patch_size, 16),
      tubelet_size=_pick(args.tubelet_size, 2), image_size=_pick(args.image_size, 224),
      num_frames=_pick(args.num_frames, 16), in_chans=_pick(args.in_chans, 3),
      decoder_width=args.decoder_width, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
      final_norm=final_norm, amd=_named_amd(args))
  changes = {k: v for k, v in (("width", args.width), ("depth", args.depth)) if v}
  if args.mlp_ratio is not None:
    changes["mlp_ratio"] = args.mlp_ratio
  return dataclasses.replace(arch, **changes)


def _arch(args, layout: str, final_norm, recorded: mapping.Arch | None, where: str) -> mapping.Arch:
  """The named architecture (checked against the recorded one), else the recorded one with flags applied."""
  if args.arch is not None:
    arch = _named_arch(args, layout, final_norm)
    if recorded is not None:
      diffs = [f"{f}: --arch gives {getattr(arch, f)}, {where} has {getattr(recorded, f)}"
               for f in ARCH_FIELDS if getattr(arch, f) != getattr(recorded, f)]
      if diffs:
        raise UsageError(f"the named architecture differs from {where}: " + "; ".join(diffs))
    return arch
  if recorded is None:
    raise UsageError("name the architecture with --arch: the input records none (no amd_jax export record, "
                     "transformers config.json, run config.json or to_flax params file)")
  changes = {k: getattr(args, k) for k in ("width", "depth", "num_heads") if getattr(args, k)}
  if final_norm is not None:
    changes["final_norm"] = final_norm
  if recorded.amd is None and _named_amd(args) is not None:
    changes["amd"] = _named_amd(args)
  return dataclasses.replace(recorded, **changes)


def _parts(text: str) -> tuple[str, ...] | None:
  """A --parts value: None for '' and 'all' (every part the input holds), else the named parts."""
  if text in ("", "all"):
    return None
  parts = tuple(p.strip() for p in text.split(",") if p.strip())
  unknown = sorted(set(parts) - set(mapping.PARTS))
  if unknown:
    raise UsageError(f"--parts: unknown {', '.join(unknown)}; allowed: all or a comma list of "
                     f"{', '.join(mapping.PARTS)}")
  return parts


# ------------------------------------------------------------------------------------------------------------
# to_flax
# ------------------------------------------------------------------------------------------------------------
def cmd_to_flax(args) -> int:
  out_params = paths.join(args.output, PARAMS_FILE)
  out_report = paths.join(args.output, REPORT_FILE)
  for path in (out_params, out_report):
    if paths.exists(path) and not args.overwrite:
      raise UsageError(f"{path} exists; nothing was written (use --overwrite or another --output)")
  stages = progress.Stages(("reading", "converting", "writing"), desc="to_flax")
  state_dict, info = torch_io.read_state_dict(args.input)
  stages.done()
  layout = args.layout
  if layout == "auto":
    layout = convert.detect_layout(state_dict, info["record"], info["hf_config"])
    told_by = ("amd_jax's export record" if info["record"] else "config.json" if info["hf_config"]
               else "the key names")
    print(f"layout: {layout} (from {told_by})")
  recorded, where = convert.recorded_arch(info)
  arch = _arch(args, layout, args.final_norm, recorded, where)
  scan = args.scan if args.scan is not None else bool((info["record"] or {}).get("scan", False))
  try:
    params, report = convert.convert_state_dict(
        state_dict, info, arch, layout, parts=_parts(args.parts), scan=scan, strict=args.strict, log=False,
        generator_mask_tokens=args.generator_mask_tokens, seed=args.seed)
  except mapping.ConversionError as e:
    if "AMD parts were asked for" in str(e):
      raise UsageError(f"{e}; name the teacher with --teacher_arch (and --amd_pairs / --generator_depth)") from None
    raise
  stages.done()
  meta = {"source": info["path"], "layout": layout, "arch": arch.describe(), "scan": scan, "parts": report.parts}
  paths.makedirs(args.output)
  convert.save_flax_params(params, out_params, metadata=meta, overwrite=args.overwrite)
  paths.write_text(out_report, json.dumps({**meta, "report": report.to_dict()}, indent=2) + "\n")
  stages.done()
  print(report.summary())
  if layout == "amd" and "amd" not in report.parts:
    print("the AMD projection heads and generators were not converted: name the teacher with --teacher_arch "
          "(and --amd_pairs / --generator_depth if not 2 / 2) to convert the student whole")
  print(f"wrote {out_params} and {out_report}")
  return 0


# ------------------------------------------------------------------------------------------------------------
# to_torch
# ------------------------------------------------------------------------------------------------------------
def _read_source(args):
  """(params, run config or None, recorded arch or None, where it is recorded, record entries, default layout)."""
  if args.workdir:
    run_config = weights.read_run_config(args.workdir)
    params = weights.load_params(args.workdir, args.step)
    record = {"source": paths.resolve(args.workdir), "step": "latest" if args.step is None else args.step}
    if run_config is None:
      return params, None, None, "", record, None
    record.update(method=run_config.get("method"), scan=bool(run_config.get("model", {}).get("scan", False)))
    layout = mapping.run_layout(run_config)
    arch = mapping.arch_from_run_config(run_config, final_norm=None)
    return params, run_config, arch, "the run's config.json", record, layout
  params, meta = convert.load_flax_params(args.params)
  record = {"source": paths.resolve(args.params), "scan": bool(meta.get("scan", False))}
  arch = mapping.Arch.from_dict(meta["arch"]) if meta.get("arch") else None
  return params, None, arch, "the params file's metadata", record, meta.get("layout")


def cmd_to_torch(args) -> int:
  if bool(args.workdir) == bool(args.params):
    raise UsageError("give exactly one of --workdir (an amd_jax run) and --params (an .npz from to_flax)")
  stages = progress.Stages(("reading", "writing"), desc="to_torch")
  params, run_config, recorded, where, record, default_layout = _read_source(args)
  layout = args.layout or default_layout
  if layout is None:
    raise UsageError(f"name the output naming with --layout ({', '.join(mapping.LAYOUTS[:3])} or a transformers "
                     f"one: {', '.join(mapping.HF_LAYOUTS)})")
  arch = _arch(args, layout, None, recorded, where)
  params = mapping.split_params(params)
  parts = _parts(args.parts)
  if args.parts == "all":
    parts = tuple(p for p in mapping.PARTS if p in mapping.export_parts(params, arch, None))
  elif parts is None:   # the encoder (a fine-tuned run's classifier too, where the naming has one)
    classifier = "head" in params and layout not in mapping.HF_LAYOUTS
    parts = ("encoder",) + (("classifier",) if classifier else ()) + (("decoder",) if args.include_decoder else ())
  elif args.include_decoder and "decoder" not in parts:
    parts += ("decoder",)
  hf_options = {}
  if run_config is not None:
    hf_options = dict(mask_ratio=run_config.get("mask", {}).get("ratio"), norm_pix_loss=run_config.get("norm_pix_loss"))
  prefix = None if args.encoder_prefix == "auto" else args.encoder_prefix
  stages.done()
  state_dict = convert.export_torch(params, args.output, arch, layout, parts=parts, wrap=args.wrap,
                                    encoder_prefix=prefix, overwrite=args.overwrite, record=record,
                                    hf_options=hf_options if layout in mapping.HF_LAYOUTS else None)
  stages.done()
  print(f"layout {layout}; width {arch.width}, depth {arch.depth}, heads {arch.num_heads}; parts {', '.join(parts)}")
  if layout in mapping.HF_LAYOUTS:
    print(f"wrote {len(state_dict)} tensors to {args.output}/ (config.json, model.safetensors): load with "
          f"transformers' {'ViTMAE' if layout == 'hf_vitmae' else 'VideoMAE'}"
          f"{'ForPreTraining' if 'decoder' in parts else 'Model'}.from_pretrained")
  else:
    print(f"wrote {len(state_dict)} tensors to {args.output}"
          + (f" under {args.wrap!r}" if args.wrap and not args.output.endswith(".safetensors") else "")
          + (f"; generator mask tokens to {args.output}{convert.MASK_TOKENS_SUFFIX}" if "amd" in parts else ""))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m amd_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("to_flax", help="PyTorch checkpoint or transformers directory -> OUTPUT/params.npz")
  _add_arch_flags(p)
  p.add_argument("--layout", default="auto", choices=("auto",) + mapping.LAYOUTS)
  p.add_argument("--input", required=True, help=".pth/.pt/.bin or .safetensors, or a save_pretrained directory")
  p.add_argument("--output", required=True, help="directory for params.npz and conversion.json")
  p.add_argument("--parts", default="",
                 help="all, or a comma list of encoder,decoder,classifier,amd; default: what the file has")
  p.add_argument("--final_norm", type=_bool_or_auto, default=None,
                 help="true: require the final norm; false: skip it; auto (default): convert it when present")
  p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                 help="stack blocks for an nn.scan encoder (model.scan=True); default: as recorded, else no")
  p.add_argument("--generator_mask_tokens", default="auto",
                 help="AMD: the generators' mask tokens, which official checkpoints lack: auto (the file amd_jax "
                      "wrote beside its export, else amd_jax's init), init, or an .npy/.npz file")
  p.add_argument("--seed", type=int, default=0, help="PRNG seed of initialised generator mask tokens")
  p.add_argument("--strict", action="store_true", help="unexpected keys are an error")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=cmd_to_flax)

  p = sub.add_parser("to_torch", help="amd_jax params -> official-naming .pth / .safetensors, or a transformers "
                                      "directory")
  _add_arch_flags(p)
  p.add_argument("--workdir", default="", help="an amd_jax run (its latest checkpoint)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--params", default="", help="or an .npz written by to_flax")
  p.add_argument("--layout", default=None, choices=mapping.LAYOUTS,
                 help="naming of the output; default: the run's (amd for a video AMD run, else videomae or mae), "
                      "or what the params file records")
  p.add_argument("--output", required=True,
                 help="x.pth or x.safetensors; a directory for the transformers layouts (hf_vitmae, hf_videomae)")
  p.add_argument("--parts", default="",
                 help="all, or a comma list of encoder,decoder,classifier,amd; default: the encoder (and the "
                      "classifier of a fine-tuned run)")
  p.add_argument("--include_decoder", action="store_true", help="also export the pixel decoder")
  p.add_argument("--encoder_prefix", default="auto",
                 help="prefix of encoder keys; auto: 'encoder.' for videomae/amd with the decoder, else none")
  p.add_argument("--wrap", default="model", help="key the .pth state dict is saved under ('' for a bare one)")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=cmd_to_torch)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  paths.quiet_cloud_logs()
  try:
    return args.func(args)
  except (UsageError, mapping.ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"amd_jax.convert: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
