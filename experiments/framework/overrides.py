"""Dotted config overrides: a variant's `{"train.bias_update_rate": 0.0}` and the command line's
`--config.train.num_steps=50`, applied to an ml_collections.ConfigDict with the field's own type."""

from __future__ import annotations

import ast
import difflib
from typing import Any

import ml_collections


def _fields(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in cfg.items():
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out += _fields(v, prefix + k + ".")
  return out


def _unknown(cfg: ml_collections.ConfigDict, field: str) -> ValueError:
  near = difflib.get_close_matches(field, _fields(cfg), n=3)
  hint = f"; did you mean {' or '.join('config.' + n for n in near)}?" if near else ""
  return ValueError(f"unknown config field config.{field}{hint}")


def _parent(cfg: ml_collections.ConfigDict, field: str):
  *path, leaf = field.split(".")
  node = cfg
  for p in path:
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      raise _unknown(cfg, field)
    node = node[p]
  if leaf not in node:
    raise _unknown(cfg, field)
  return node, leaf


def parse_value(current: Any, text: str, field: str) -> Any:
  """`text` as the type of the field's current value (bool, int, float, str); a Python literal otherwise."""
  try:
    if isinstance(current, bool):
      low = text.strip().lower()
      if low not in ("true", "false", "1", "0"):
        raise ValueError
      return low in ("true", "1")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
  except ValueError:
    raise ValueError(f"--config.{field}={text!r}: expected a {type(current).__name__} like the default "
                     f"{current!r}") from None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word for a field whose default is None


def apply(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `cfg` with each dotted field set; raises ValueError naming an unknown field."""
  out = ml_collections.ConfigDict(cfg.to_dict())
  for field, value in overrides.items():
    node, leaf = _parent(out, field)
    if isinstance(value, dict) and value is not None:
      value = ml_collections.ConfigDict(value)
    try:
      node[leaf] = value
    except TypeError:  # ConfigDict keeps a field's type: say which field and value
      raise ValueError(f"config.{field}={value!r} does not fit the field's type "
                       f"({type(node[leaf]).__name__})") from None
  return out


def parse_flags(cfg: ml_collections.ConfigDict, args: list[str]) -> dict[str, Any]:
  """`--config.a.b=v` (or `--config.a.b v`) arguments -> {"a.b": value}, typed against `cfg`."""
  out, i = {}, 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith("--config."):
      raise ValueError(f"unexpected argument {arg!r} (config overrides are --config.<field>=<value>)")
    if "=" in arg:
      field, text = arg[len("--config."):].split("=", 1)
    else:
      if i + 1 >= len(args):
        raise ValueError(f"{arg} needs a value")
      field, text = arg[len("--config."):], args[i + 1]
      i += 1
    node, leaf = _parent(cfg, field)
    out[field] = parse_value(node[leaf], text, field)
    i += 1
  return out
