"""Helpers shared by the builders: clear errors, counted skips, JSON and JPEG checks."""
import json
import logging
import os

from PIL import Image

# Coarse box categories shared by both datasets (nuScenes names map onto them).
BOX_CATEGORIES = ("car", "pedestrian", "rider", "obstacle")


class BuildError(ValueError):
  """Bad input: the message names the file and, where there is one, the row."""


class Skips:
  """Counted skips of rows the real datasets are known to contain; `strict` makes them errors."""

  def __init__(self, strict: bool):
    self.strict = strict
    self.counts, self.examples = {}, {}

  def __call__(self, reason: str, name: str):
    if self.strict:
      raise BuildError(f"{name}: {reason} (--strict turns skips into errors)")
    self.counts[reason] = self.counts.get(reason, 0) + 1
    examples = self.examples.setdefault(reason, [])
    if len(examples) < 5:
      examples.append(name)

  def merge(self, other: "Skips"):
    for reason, n in other.counts.items():
      self.counts[reason] = self.counts.get(reason, 0) + n
      self.examples.setdefault(reason, []).extend(other.examples[reason])

  def log(self, what: str):
    for reason, n in self.counts.items():
      logging.warning("%s: skipped %d example(s): %s (first: %s)", what, n, reason,
                      ", ".join(self.examples[reason]))


def read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise BuildError(f"{path}: file not found") from None
  except json.JSONDecodeError as e:
    raise BuildError(f"{path}: malformed JSON ({e})") from None


def read_jpeg(path, row: str):
  """-> (bytes, (width, height)); a missing or undecodable image is an error naming it."""
  if not os.path.exists(path):
    raise BuildError(f"{row}: image {path} is missing")
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(path) as image:
      size = image.size
      image.load()
  except Exception as e:  # PIL raises several types for corrupt files
    raise BuildError(f"{row}: image {path} cannot be decoded ({e})") from None
  return data, size


def binary_labels(values, length, where):
  if not isinstance(values, list) or len(values) != length:
    raise BuildError(f"{where}: expected a list of {length} labels, got {values!r}")
  if any(v not in (0, 1) for v in values):
    raise BuildError(f"{where}: labels must be 0 or 1, got {values!r}")
  return values
