"""BDD-OIA from the released `lastframe` archive (manual download).

The format is the one the dataset's own loader reads (`action_prediction/
DataLoader_together.py` of the BDD-OIA project):
- `<split>_25k_images_actions.json`: `{"images": [{"file_name", "id", ...}], "annotations":
  [{"category": [4 or more ints]}]}`. The annotations carry no id: the list is indexed by the
  image's id, so an image's actions are `annotations[image["id"]]["category"]`, by position
  also where annotations carry ids (a warning counts ids that disagree with the position), and
  also for images that share an id (each reads the same row; a warning counts them). A 5th
  value other than 0 (null included) marks a "confusing" frame: it is dropped and counted (a
  5th value of 0 keeps the frame; values after the 5th are not read, as the loader reads none).
- `<split>_25k_images_reasons.json`: `[{"file_name", "reason": [21 ints]}]`, joined by file
  name. The loader pairs both lists sorted by file name, which is the same where they name the
  same images. Where they do not, we differ on purpose: a reasons row of an image the actions
  file does not list, and an image without a reasons row, are skipped and counted (the loader
  would pair by position and shift every later image's reasons by one).
- images: `lastframe/data/<file_name>` (or `data/`, or `lastframe/` itself as the authors'
  `test.py` reads them: the first of these that holds any of the split's images). An image
  whose file is missing is skipped and counted, as the loader skips it; a split none of whose
  images is there (e.g. the test JSON without the test images) is left out with a warning.
The JSON files may sit in `lastframe/`, `lastframe/data/`, `lastframe/labels/`, `data/`,
`labels/`, `info/` (`test.py`'s default) or `annotations/`. `strict` (`--strict`) turns
every counted skip into an error. A sim-written `sim_<split>_extras.json` adds boxes and
instructions (the real archive has neither: its examples get none).
"""
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from data_builders import common

ACTIONS, REASONS = 4, 21
_JSON_DIRS = ("lastframe", "lastframe/data", "lastframe/labels", "data", "labels", "info",
              "annotations", ".")
_IMAGE_DIRS = ("lastframe/data", "data", "lastframe")


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
    image_dirs = [os.path.join(manual, d) for d in _IMAGE_DIRS]
    splits, imageless = {}, []
    for split in ("train", "val", "test"):
      actions = find(manual, f"{split}_25k_images_actions.json", _JSON_DIRS)
      if actions is None:
        continue
      reasons = find(manual, f"{split}_25k_images_reasons.json", _JSON_DIRS)
      if reasons is None:
        raise common.BuildError(f"{actions} has no {split}_25k_images_reasons.json beside it")
      skips = common.Skips(self.strict)
      images, image_dir, listed = read_split(actions, reasons, image_dirs, skips)
      if image_dir is None:   # the loader skips each missing image: this split has none
        imageless.append(f"{actions}: none of its {listed} images is in "
                         f"{' or '.join(image_dirs)}")
        continue
      splits[split] = self._generate_examples(manual, split, images, image_dir, skips)
    if not splits and not imageless:
      raise common.BuildError(f"{manual}: no <split>_25k_images_actions.json in any of "
                              f"{', '.join(_JSON_DIRS)}")
    if imageless and (self.strict or not splits):
      raise common.BuildError("; ".join(imageless) + (" (--strict turns skips into errors)"
                                                      if splits else ""))
    for message in imageless:
      logging.warning("%s: the split is left out, as the dataset's loader skips every image "
                      "whose file is missing", message)
    return splits

  def _generate_examples(self, manual, split, images, image_dir, skips):
    extras_path = find(manual, f"sim_{split}_extras.json", _JSON_DIRS)
    extras = common.read_json(extras_path) if extras_path else {}
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


def read_split(actions_path, reasons_path, image_dirs, skips):
  """-> ({file_name: (actions [4], reasons [21], row description)} of the usable images, the
  image folder: the first of `image_dirs` that holds any of the split's images, or None
  where none does (nothing is then read), the number of images the split lists).

  Follows the dataset's own loader (`action_prediction/DataLoader_together.py`): images in
  `file_name` order, the label of an image is `annotations[image["id"]]["category"]`, a row
  whose 5th value is not 0 ("confusing") is dropped, an image whose file is missing is skipped,
  and reasons are joined by `file_name` (rows of images on one side only: counted skips).
  """
  actions_json = common.read_json(actions_path)
  if (not isinstance(actions_json, dict) or not {"images", "annotations"} <= set(actions_json)
      or not isinstance(actions_json["images"], list)
      or not isinstance(actions_json["annotations"], list)):
    raise common.BuildError(f"{actions_path}: expected an object with lists 'images' and "
                            f"'annotations'")
  images = {}
  for i, image in enumerate(actions_json["images"]):
    if not isinstance(image, dict) or "file_name" not in image or "id" not in image:
      raise common.BuildError(f"{actions_path}: images[{i}] lacks 'file_name' or 'id'")
    if image["file_name"] in images:
      raise common.BuildError(f"{actions_path}: images[{i}] repeats {image['file_name']}")
    images[image["file_name"]] = (i, image["id"])
  image_dir = next((d for d in image_dirs
                    if any(os.path.isfile(os.path.join(d, name)) for name in images)), None)
  if image_dir is None:
    return {}, None, len(images)
  categories = _categories(actions_path, images, actions_json["annotations"])
  reasons = _reasons(reasons_path, actions_path, images, skips)
  out = {}
  for name in sorted(images):
    category, where = categories[name]
    if len(category) > ACTIONS:   # as the loader: kept only where the 5th value is 0
      if category[ACTIONS] != 0:
        skips("confusing frame (5th action value not 0)", name)
        continue
      category = category[:ACTIONS]
    if not os.path.isfile(os.path.join(image_dir, name)):
      skips("image file missing", os.path.join(image_dir, name))
      continue
    if name not in reasons:
      skips("no reasons row", name)
      continue
    # Labels are checked only for the frames kept: the loader never reads the others' (a
    # dropped frame's reasons row may be empty in a file it accepts).
    reason, reason_where = reasons[name]
    out[name] = (common.binary_labels(category, ACTIONS, where),
                 common.binary_labels(reason, REASONS, reason_where), where)
  return out, image_dir, len(images)


def _categories(path, images, annotations):
  """-> {file_name: (category [4 or more values], row description)}.

  As the dataset's own loader reads them: `annotations[image["id"]]`, always by position. Ids
  an annotation may carry (`image_id`, else `id`) are not read by that loader; where they name
  another image than the one their position gives, the labels still follow the position, and
  a warning counts those rows (re-packaged copies may have reordered the list). Only the rows
  images point at are read, and only their length here (the loader reads `category[4]` of
  every listed image); the labels themselves are checked for the frames `read_split` keeps.
  """
  seen, shared, out = set(), [], {}
  for name, (i, image_id) in images.items():
    if image_id in seen:
      shared.append(name)
    seen.add(image_id)
    if (not isinstance(image_id, int) or isinstance(image_id, bool)
        or not 0 <= image_id < len(annotations)):
      raise common.BuildError(
          f"{path}: images[{i}] ({name}) has id {image_id!r}, outside the 'annotations' list "
          f"of length {len(annotations)} (the dataset's loader reads annotations[image id])")
    where = f"{path}: annotations[{image_id}]"
    ann = annotations[image_id]
    if not isinstance(ann, dict) or "category" not in ann:
      raise common.BuildError(f"{where} lacks 'category' (read for {name})")
    category = ann["category"]
    # The loader reads [:4] as the actions and [4] as the "confusing" flag, compared with 0
    # (so a null flag drops the frame too); more values, as in test.py's default
    # val_25k_image_action_6.json, it never reads.
    if not isinstance(category, list) or len(category) < ACTIONS:
      raise common.BuildError(f"{where}: expected a list of {ACTIONS} labels (a 5th value "
                              f"flags a confusing frame), got {category!r}")
    out[name] = (category, where)
  if shared:
    logging.warning("%s: %d image(s) share an id with an earlier image (e.g. %s); each takes "
                    "annotations[id], as the dataset's loader reads it", path, len(shared),
                    shared[0])
  own_ids = ((row, ann.get("image_id", ann.get("id")) if isinstance(ann, dict) else None)
             for row, ann in enumerate(annotations))
  other = [(row, own) for row, own in own_ids if own is not None and own != row and row in seen]
  if other:
    row, own = other[0]
    logging.warning(
        "%s: %d annotation(s) carry an image id other than their position (e.g. annotations"
        "[%d] says %r); labels follow the position, as the dataset's loader "
        "(DataLoader_together.py) reads them", path, len(other), row, own)
  return out


def _reasons(path, actions_path, images, skips):
  """-> {file_name: (reasons as written, row description)} from `[{"file_name", "reason"}]`
  (`read_split` checks the labels of the frames it keeps). A row whose image the actions file
  does not list is a counted skip (the loader never reads it by name)."""
  rows = common.read_json(path)
  if not isinstance(rows, list):
    raise common.BuildError(f"{path}: expected a list of {{file_name, reason}}")
  reasons = {}
  for i, row in enumerate(rows):
    where = f"{path}: [{i}]"
    if not isinstance(row, dict) or "file_name" not in row or "reason" not in row:
      raise common.BuildError(f"{where} lacks 'file_name' or 'reason'")
    if row["file_name"] in reasons:
      raise common.BuildError(f"{where}: {row['file_name']} listed twice")
    if row["file_name"] not in images:
      skips(f"reasons row of an image not in {os.path.basename(actions_path)}",
            f"{where} ({row['file_name']})")
      continue
    reasons[row["file_name"]] = (row["reason"], where)
  return reasons
