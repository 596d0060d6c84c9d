"""BDD-OIA from the released `lastframe` archive (manual download).

Reads `<split>_25k_images_actions.json` (COCO-like: `images` with file_name + id,
`annotations` whose `id` is the image's id and whose `category` holds the 4 actions, or 5
values where a 5th value of 1 marks a "confusing" frame that is dropped and counted) and
`<split>_25k_images_reasons.json` (`[{"file_name", "reason": [21]}]`, joined by file name),
from `lastframe/`, `lastframe/data/`, `lastframe/labels/`, `data/` or `labels/`; images from
`lastframe/data/` or `data/`. A sim-written `sim_<split>_extras.json` adds boxes and
instructions (the real archive has neither: its examples get none).
"""
import os

import numpy as np
import tensorflow_datasets as tfds

from data_builders import common

ACTIONS, REASONS = 4, 21
_JSON_DIRS = ("lastframe", "lastframe/data", "lastframe/labels", "data", "labels", ".")
_IMAGE_DIRS = ("lastframe/data", "data")


def find(manual_dir, name, dirs):
  for d in dirs:
    path = os.path.join(manual_dir, d, name)
    if os.path.exists(path):
      return path
  return None


class BddOia(tfds.core.GeneratorBasedBuilder):
  """BDD-OIA: driving actions and their explanations."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download BDD-OIA (the `lastframe` archive) and extract it so that the manual dir "
      "holds lastframe/data/*.jpg and lastframe/*_25k_images_{actions,reasons}.json, or run "
      "`python -m drivlm_jax.sim --layout bdd_oia ...` to write the same layout.")
  strict = False   # set True to turn counted skips into errors

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "file_name": tfds.features.Text(),
            "actions": tfds.features.Tensor(shape=(ACTIONS,), dtype=np.int32),
            "reasons": tfds.features.Tensor(shape=(REASONS,), dtype=np.int32),
            "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "box_categories": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "instruction": tfds.features.Text(),
        }),
        homepage="https://twizwei.github.io/bddoia_project/")

  def _split_generators(self, dl_manager):
    manual = str(dl_manager.manual_dir)
    self.skips = common.Skips(self.strict)
    splits = {}
    for split in ("train", "val", "test"):
      actions = find(manual, f"{split}_25k_images_actions.json", _JSON_DIRS)
      if actions is None:
        continue
      reasons = find(manual, f"{split}_25k_images_reasons.json", _JSON_DIRS)
      if reasons is None:
        raise common.BuildError(f"{actions} has no {split}_25k_images_reasons.json beside it")
      splits[split] = self._generate_examples(manual, split, actions, reasons)
    if not splits:
      raise common.BuildError(f"{manual}: no <split>_25k_images_actions.json in any of "
                              f"{', '.join(_JSON_DIRS)}")
    return splits

  def _generate_examples(self, manual, split, actions_path, reasons_path):
    skips = common.Skips(self.strict)
    images = read_split(actions_path, reasons_path, skips)
    extras_path = find(manual, f"sim_{split}_extras.json", _JSON_DIRS)
    extras = common.read_json(extras_path) if extras_path else {}
    image_dir = next((os.path.join(manual, d) for d in _IMAGE_DIRS
                      if os.path.isdir(os.path.join(manual, d))), None)
    if image_dir is None:
      raise common.BuildError(f"{manual}: no image folder ({' or '.join(_IMAGE_DIRS)})")
    for name, (actions, reasons, row) in images.items():
      jpeg, (width, height) = common.read_jpeg(os.path.join(image_dir, name), row)
      extra = extras.get(name, {})
      boxes = [b["box"] for b in extra.get("boxes", [])]
      yield name, {
          "image": jpeg, "file_name": name,
          "actions": np.asarray(actions, np.int32), "reasons": np.asarray(reasons, np.int32),
          "boxes": (np.asarray(boxes, np.float32).reshape(-1, 4)
                    / np.array([width, height, width, height], np.float32)),
          "box_categories": np.asarray([common.BOX_CATEGORIES.index(b["category"])
                                        for b in extra.get("boxes", [])], np.int32),
          "instruction": extra.get("instruction", ""),
      }
    skips.log(f"bdd_oia {split}")
    self.skips.merge(skips)


def read_split(actions_path, reasons_path, skips):
  """-> {file_name: (actions [4], reasons [21], row description)} of the usable images."""
  actions_json = common.read_json(actions_path)
  if not isinstance(actions_json, dict) or not {"images", "annotations"} <= set(actions_json):
    raise common.BuildError(f"{actions_path}: expected an object with 'images' and "
                            f"'annotations'")
  by_id = {}
  for i, image in enumerate(actions_json["images"]):
    if not isinstance(image, dict) or "file_name" not in image or "id" not in image:
      raise common.BuildError(f"{actions_path}: images[{i}] lacks 'file_name' or 'id'")
    if image["id"] in by_id:
      raise common.BuildError(f"{actions_path}: images[{i}] repeats id {image['id']}")
    by_id[image["id"]] = image["file_name"]
  labelled = {}
  for i, ann in enumerate(actions_json["annotations"]):
    where = f"{actions_path}: annotations[{i}]"
    if not isinstance(ann, dict) or "category" not in ann:
      raise common.BuildError(f"{where} lacks 'category'")
    image_id = ann.get("id", ann.get("image_id"))
    if image_id not in by_id:
      raise common.BuildError(f"{where}: id {image_id!r} matches no image")
    name, category = by_id[image_id], ann["category"]
    if isinstance(category, list) and len(category) == ACTIONS + 1:
      common.binary_labels(category, ACTIONS + 1, where)
      if category[-1] == 1:
        skips("confusing frame (5th action value 1)", name)
        labelled[name] = None
        continue
      category = category[:ACTIONS]
    labelled[name] = (common.binary_labels(category, ACTIONS, where), where)
  missing = sorted(set(by_id.values()) - set(labelled))
  if missing:
    raise common.BuildError(f"{actions_path}: {len(missing)} image(s) without an annotation, "
                            f"e.g. {missing[0]}")
  reasons_json = common.read_json(reasons_path)
  if not isinstance(reasons_json, list):
    raise common.BuildError(f"{reasons_path}: expected a list of {{file_name, reason}}")
  reasons = {}
  for i, row in enumerate(reasons_json):
    where = f"{reasons_path}: [{i}]"
    if not isinstance(row, dict) or "file_name" not in row or "reason" not in row:
      raise common.BuildError(f"{where} lacks 'file_name' or 'reason'")
    if row["file_name"] in reasons:
      raise common.BuildError(f"{where}: {row['file_name']} listed twice")
    if row["file_name"] not in labelled:
      raise common.BuildError(f"{where}: {row['file_name']} is not in {actions_path}")
    reasons[row["file_name"]] = common.binary_labels(row["reason"], REASONS, where)
  out = {}
  for name, value in labelled.items():
    if value is None:
      continue
    if name not in reasons:
      skips("no reasons row", name)
      continue
    out[name] = (value[0], reasons[name], value[1])
  return out
