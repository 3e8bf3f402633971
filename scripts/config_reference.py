"""Generates docs/config_reference.md: every config field, its default and its meaning.

  python scripts/config_reference.py           # (re)write docs/config_reference.md
  python scripts/config_reference.py --check   # exit 1 when the committed file is out of date

Fields and defaults come from the code itself: amd_jax.config_base.base_config() (what every
run has) and, per method, what its extra_config() adds (amd_jax.config_validation.known_fields).
Meanings come from the trailing comments next to each field in the source (config_base.py and
the method files, read with ast and tokenize), and, for fields without one, from DESCRIPTIONS
below. A field with neither shows as "(undocumented)": give it a comment where it is defined.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import io
import os
import sys
import tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(REPO, "docs", "config_reference.md")
UNDOCUMENTED = "(undocumented)"

# Meanings of fields whose definition carries no comment.
DESCRIPTIONS = {
    "seed": "seeds parameter init, masks, dropout and the data order",
    "batch_size": "global batch size (all devices and processes together)",
    "total_steps": "training length in steps; give this or num_epochs (the other -1)",
    "num_epochs": "training length in epochs of config.data.split; give this or total_steps (the other -1)",
    "log_every_steps": "metrics (losses, throughput, ETA) are averaged and written every N steps",
    "checkpoint_every_steps": "an orbax checkpoint (state + data iterator position) every N steps, and at the end",
    "keep_checkpoints": "how many recent checkpoints are kept",
    "norm_pix_loss": "normalise the pixel target per patch (MAE) / per patch and channel (VideoMAE)",
    "model.mlp_ratio": "MLP hidden width / model width",
    "model.patch_size": "patch side in pixels",
    "model.drop_path": "stochastic depth: rate of the last block, linear from 0 over the blocks",
    "data.crop_scale_max": "random resized crop: largest area fraction",
    "data.hflip": "random horizontal flips in training",
    "data.std": "per-channel, comma-separated (inputs are (x / 255 - mean) / std)",
    "data.prefetch": "batches prepared ahead of the training step",
    "decoder.width": "pixel decoder width (MAE / VideoMAE / AMD / D-MAE; G2SD's student decoder)",
    "decoder.depth": "pixel decoder blocks",
    "decoder.num_heads": "pixel decoder attention heads",
    "decoder.mlp_ratio": "pixel decoder MLP hidden width / decoder width",
    "data.split": "training split",
    "data.eval_split": "split for evaluation (probe test features, fine-tuning top-1, pictures)",
    "data.image_size": "input side in pixels after cropping (square)",
    "data.num_classes": "number of classes (probes, fine-tuning)",
    "optim.b1": "AdamW beta1",
    "optim.b2": "AdamW beta2",
    "optim.eps": "AdamW epsilon",
    "optim.weight_decay": "AdamW decoupled weight decay (not on biases, norms, tokens)",
    "optim.min_lr": "the cosine schedule's final learning rate",
    "optim.warmup_steps": "linear warmup length in steps; give this or warmup_epochs (the other -1)",
    "optim.warmup_epochs": "linear warmup length in epochs; give this or warmup_steps (the other -1)",
    "eval.knn_k": "neighbours that vote in the kNN evaluation",
    "eval.knn_temperature": "temperature T of the kNN vote weights exp(similarity / T)",
    "eval.probe_epochs": "linear-probe training epochs on frozen features",
    "eval.probe_lr": "linear-probe peak learning rate (SGD, momentum 0.9, cosine)",
    "eval.probe_batch_size": "batch size of feature extraction and of the linear probe",
    "teacher.mask_ratio": "the teacher's mask ratio (lower than mask.ratio: it sees more)",
    "amd.factor_rec": "weight of the pixel reconstruction loss",
    "amd.factor_dir": "weight of the direct alignment loss",
    "amd.factor_gen": "weight of the generation alignment loss",
    "amd.smooth_l1_beta": "beta of the smooth-L1 alignment loss",
    "amd.shared_heads": "one projection per layer pair feeds both alignment paths (official); False: the "
                        "generator gets its own",
    "amd.generator_depth": "blocks of each feature generator",
    "amd.train_generator_mask_tokens": "learn the generators' mask tokens; False freezes them (official parity)",
    "dmae.factor_attn": "weight of the attention-logit distillation loss (pairs summed)",
    "dmae.hidden_teacher_layers": "the teacher layers the hidden states are matched to, pairwise",
    "dmae.factor_hidden": "weight of the hidden-state distillation loss (pairs summed)",
    "dmae.factor_rec": "weight of the pixel reconstruction loss",
    "tinymim.factor_qk": "weight of the Q-K relation KL",
    "tinymim.factor_vv": "weight of the V-V relation KL",
    "g2sd.smooth_l1_beta": "beta of the smooth-L1 feature loss",
    "finetune.label_smoothing": "label smoothing of the classification targets",
}

# Subtrees built by these helpers are shown as one row ("the fields of model.*"), with the defaults that differ.
SUBTREE_HELPERS = {"model_config": "model", "decoder_config": "decoder"}


# ------------------------------------------------------------------------------------ source comments


def line_comments(source: str) -> dict[int, str]:
  """{line: trailing comment} with continuation lines (a comment alone on the next line, at the same column)
  joined to the comment they continue."""
  comments, code_lines = {}, set()
  tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
  for tok in tokens:
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
      code_lines.add(tok.start[0])
  out, owner = {}, None
  for line in sorted(comments):
    col, text = comments[line]
    if line not in code_lines and owner is not None and line - 1 in comments and comments[owner][0] == col \
        and (line - 1 == owner or line - 1 not in code_lines):
      out[owner] += " " + text
      continue
    owner = line if line in code_lines else None
    if owner is not None:
      out[line] = text
  return out


def _call_name(node) -> str | None:
  if isinstance(node, ast.Call):
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
  return None


class FunctionFields:
  """Comments and helper references of one config-building function, by dotted field path."""

  def __init__(self, node: ast.FunctionDef, comments: dict[int, str]):
    self.comments = comments
    self.fields: dict[str, str | None] = {}
    self.refs: dict[str, str] = {}       # path prefix -> helper function name
    self.locals: dict[str, tuple[dict, dict]] = {}
    for stmt in ast.walk(node):
      if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        self._assign(stmt.targets[0], stmt.value, stmt.lineno)
      elif isinstance(stmt, ast.Return) and stmt.value is not None:
        self._value(stmt.value, "", self.fields, self.refs)

  def _assign(self, target, value, line):
    if isinstance(target, ast.Name):  # var = helper(...): its fields join wherever `var` is used
      fields, refs = {}, {}
      self._value(value, "", fields, refs)
      self.locals[target.id] = (fields, refs)
      return
    chain = []
    while isinstance(target, ast.Attribute):
      chain.append(target.attr)
      target = target.value
    if not isinstance(target, ast.Name):
      return
    path = ".".join(reversed(chain))
    fields, refs = self.fields, self.refs
    if target.id in self.locals:
      fields, refs = self.locals[target.id]
    fields[path] = self.comments.get(line)
    self._value(value, path + ".", fields, refs)

  def _value(self, node, prefix: str, fields, refs):
    name = _call_name(node)
    if name == "ConfigDict" and node.args:
      self._value(node.args[0], prefix, fields, refs)
    elif name == "dict":
      for kw in node.keywords:
        if kw.arg is None:
          continue
        fields[prefix + kw.arg] = self.comments.get(kw.value.lineno)
        self._value(kw.value, prefix + kw.arg + ".", fields, refs)
    elif name is not None:
      refs[prefix.rstrip(".")] = name
    elif isinstance(node, ast.Name) and node.id in self.locals:
      sub_fields, sub_refs = self.locals[node.id]
      for k, v in sub_fields.items():
        fields[prefix + k] = v
      for k, v in sub_refs.items():
        refs[(prefix + k).rstrip(".")] = v


class SourceIndex:
  """Every config-building function of the parsed files: module functions by name, methods by Class.name."""

  def __init__(self, paths):
    self.functions: dict[str, FunctionFields] = {}
    for path in paths:
      with open(path) as f:
        source = f.read()
      tree = ast.parse(source)
      comments = line_comments(source)
      for node in tree.body:
        if isinstance(node, ast.FunctionDef):
          self.functions[node.name] = FunctionFields(node, comments)
        elif isinstance(node, ast.ClassDef):
          for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "extra_config":
              self.functions[f"{node.name}.extra_config"] = FunctionFields(item, comments)

  def comments(self, function: str, prefix: str = "", seen=()) -> dict[str, str | None]:
    """{full dotted path: comment} of everything `function` builds, helpers followed."""
    fn = self.functions.get(function)
    if fn is None or function in seen:
      return {}
    out = {}
    for ref_path, helper in fn.refs.items():
      sub = prefix + ref_path + "." if ref_path else prefix
      out.update(self.comments(helper, sub, seen + (function,)))
    for path, text in fn.fields.items():
      if text or prefix + path not in out:
        out[prefix + path] = text
    return out

  def helper_of(self, function: str, path: str) -> str | None:
    """The helper function that builds the subtree at `path` (e.g. 'teacher.model' -> 'model_config')."""
    fn = self.functions.get(function)
    if fn is None:
      return None
    if path in fn.refs:
      return fn.refs[path]
    for ref_path, helper in fn.refs.items():
      if ref_path and path.startswith(ref_path + "."):
        return self.helper_of(helper, path[len(ref_path) + 1:])
      if not ref_path:
        found = self.helper_of(helper, path)
        if found:
          return found
    return None


# -------------------------------------------------------------------------------------------- render


def _flat(cfg, prefix=""):
  out = {}
  for key, value in cfg.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _cell(text) -> str:
  return str(text).replace("|", "\\|")


def _default(value) -> str:
  return f"`{value!r}`"


def _rows(flat_defaults: dict, comments: dict, index: SourceIndex, function: str, base_defaults: dict) -> list[str]:
  rows, folded = [], set()
  for path, value in flat_defaults.items():
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    helper = index.helper_of(function, parent) if parent else None
    if parent and helper in SUBTREE_HELPERS and parent != SUBTREE_HELPERS[helper]:
      if parent in folded:
        continue
      folded.add(parent)
      section = SUBTREE_HELPERS[helper]
      mine = {p[len(parent) + 1:]: v for p, v in flat_defaults.items() if p.startswith(parent + ".")}
      differ = ", ".join(f"{k}={v!r}" for k, v in mine.items() if base_defaults.get(f"{section}.{k}") != v)
      meaning = comments.get(parent) or f"the fields of `{section}.*`"
      if not comments.get(parent):
        meaning += f" (see above), for {parent.split('.')[0]}"
      rows.append(f"| `{parent}.*` | {_cell(differ) or 'as `' + section + '.*`'} | {_cell(meaning)} |")
      continue
    meaning = comments.get(path) or DESCRIPTIONS.get(path) or UNDOCUMENTED
    rows.append(f"| `{path}` | {_cell(_default(value))} | {_cell(meaning)} |")
  return rows


def render() -> str:
  sys.path.insert(0, REPO)
  from amd_jax import config_base, config_validation, methods  # pylint: disable=g-import-not-at-top
  files = [os.path.join(REPO, "amd_jax", "config_base.py")]
  for module, _ in methods.REGISTRY.values():
    path = importlib.import_module(module).__file__
    if path not in files:
      files.append(path)
  index = SourceIndex(files)
  base = _flat(config_base.base_config())
  lines = [
      "# Config reference",
      "",
      "Generated by `python scripts/config_reference.py` from the code (`amd_jax/config_base.py` and each",
      "method's `extra_config`); do not edit by hand: change the comment next to the field and regenerate.",
      "`tests/test_examples.py` fails when this page and the code disagree.",
      "",
      "Defaults are the base values every config file starts from; the files in `configs/` (and",
      "`amd_jax/recipes.py`) set each recipe's own values. Any field can be overridden on the command line,",
      "`--config.mask.ratio=0.9`, and every field is validated before anything is compiled (a misspelt or unknown",
      "field stops the run). Sequences are comma-separated strings (`'6,12'`), so they survive the command line.",
      "",
      "## Every run (`amd_jax.config_base.base_config()`)",
      "",
      "| field | default | meaning |",
      "|---|---|---|",
  ]
  lines += _rows(base, index.comments("base_config"), index, "base_config", base)
  for name, (module, cls) in methods.REGISTRY.items():
    known = _flat(config_validation.known_fields(name))
    extra = {p: v for p, v in known.items() if p not in base}
    short = os.path.relpath(importlib.import_module(module).__file__, REPO)
    lines += ["", f"## `method='{name}'` ({cls}, `{short}`)", ""]
    if not extra:
      lines.append("No fields beyond the base config.")
      continue
    function = f"{cls}.extra_config"
    if function not in index.functions:  # inherited from a parent class
      parent = getattr(importlib.import_module(module), cls).__mro__[1].__name__
      function = f"{parent}.extra_config"
    lines += ["| field | default | meaning |", "|---|---|---|"]
    lines += _rows(extra, index.comments(function), index, function, base)
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="exit 1 if docs/config_reference.md is out of date")
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    with open(OUTPUT) as f:
      current = f.read()
    if current != text:
      print(f"{OUTPUT} is out of date: run python scripts/config_reference.py", file=sys.stderr)
      return 1
    print(f"{OUTPUT} is up to date")
    return 0
  with open(OUTPUT, "w") as f:
    f.write(text)
  print(f"wrote {OUTPUT} ({text.count(UNDOCUMENTED)} undocumented fields)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
