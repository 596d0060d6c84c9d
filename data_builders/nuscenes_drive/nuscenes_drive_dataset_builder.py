"""nuScenes-Drive: one example per nuScenes keyframe, read from the `v1.0-*` JSON tables.

Actions come from the ego's future path (`drivlm_jax.data.labels.actions_from_ego_path`);
keyframes without 3 s of future are dropped and counted, unless DriveLM asks about them: the
challenge scores every frame of its QA file, so those stay, `has_actions` False (their
`actions` zeros, which no action loss or metric reads). Boxes are the sample_annotations
projected into each camera. `location`, `night` and `rain` come from the log and the scene
description; DriveLM QA (`*_nus.json`, `*_nus_q_only.json` or `drivelm*.json` in the
manual dir or a folder in it, e.g. DriveLM's `QA_dataset_nus/`) is joined by sample token.
Splits: `splits.json` ({split: [scene names]}) in `<version>/` (where the devkit reads custom
splits) or the manual dir, else the devkit's official scene splits of the table version
(v1.0-mini: mini_train / mini_val; nuScenes' own scenes need nuscenes-devkit for them), else
(scenes the devkit does not list) 85/15 train/val by scene-name hash, with a warning.
"""
import glob
import hashlib
import json
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from data_builders import common
from drivlm_jax.data import geometry
from drivlm_jax.data import labels

SIX_CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT",
               "CAM_FRONT_LEFT")
TABLES = ("scene", "sample", "sample_data", "sensor", "calibrated_sensor", "ego_pose",
          "sample_annotation", "instance", "category", "log")


def coarse_category(name: str) -> int:
  if name.startswith("vehicle.bicycle") or name.startswith("vehicle.motorcycle"):
    return common.BOX_CATEGORIES.index("rider")
  if name.startswith("vehicle."):
    return common.BOX_CATEGORIES.index("car")
  if name.startswith("human."):
    return common.BOX_CATEGORIES.index("pedestrian")
  return common.BOX_CATEGORIES.index("obstacle")


class Tables:
  """The tables of one `v1.0-*` folder, indexed by token."""

  def __init__(self, root):
    versions = sorted(d for d in os.listdir(root) if d.startswith("v1.0-")
                      and os.path.isdir(os.path.join(root, d)))
    if not versions:
      raise common.BuildError(f"{root}: no v1.0-* table folder")
    preferred = [v for v in ("v1.0-trainval", "v1.0-mini", "v1.0-test") if v in versions]
    self.version = preferred[0] if preferred else versions[0]
    if len(versions) > 1:   # e.g. the full download: trainval and test side by side
      logging.warning("%s: reading the tables of %s only (also here: %s); the devkit too reads "
                      "one version at a time", root, self.version,
                      ", ".join(v for v in versions if v != self.version))
    self.root = root
    for name in TABLES:
      rows = common.read_json(os.path.join(root, self.version, f"{name}.json"))
      if not isinstance(rows, list):
        raise common.BuildError(f"{root}/{self.version}/{name}.json: expected a list")
      setattr(self, name, {r["token"]: r for r in rows})
    self.channel = {cs: self.sensor[r["sensor_token"]]["channel"]
                    for cs, r in self.calibrated_sensor.items()}
    self.keyframe_data = {}   # sample token -> {channel: sample_data}
    for sd in self.sample_data.values():
      if sd["is_key_frame"]:
        self.keyframe_data.setdefault(sd["sample_token"], {})[
            self.channel[sd["calibrated_sensor_token"]]] = sd
    self.annotations = {}
    for ann in self.sample_annotation.values():
      self.annotations.setdefault(ann["sample_token"], []).append(ann)

  def scene_samples(self, scene):
    samples, token = [], scene["first_sample_token"]
    while token:
      if token not in self.sample:
        raise common.BuildError(f"{self.version}/scene.json: scene {scene['name']} links to "
                                f"missing sample {token}")
      samples.append(self.sample[token])
      token = self.sample[token]["next"]
    return samples


# The devkit's official scene lists per table version, as its loaders pair them
# (`nuscenes.utils.splits`: v1.0-mini takes only mini_train / mini_val).
OFFICIAL_SPLITS = {"mini": {"mini_train": "train", "mini_val": "val"},
                   "trainval": {"train": "train", "val": "val"}, "test": {"test": "test"}}


NUSCENES_SCENE = re.compile(r"scene-\d{4}$")   # nuScenes' own scene names


def scene_splits(root, version, scenes):
  """{scene name: split}. A custom `splits.json` ({split: [scene names]}) where the devkit
  reads one (`<root>/<version>/splits.json`) or in the manual dir itself; else the devkit's
  official splits of this table version when nuscenes-devkit is installed and names every
  scene; else 85/15 train/val by scene-name hash, with a warning. nuScenes' own scenes
  (scene-0001 ...) without the devkit are an error: a hash split of them would not be the
  published one (all ten of v1.0-mini's would land in train)."""
  for path in (os.path.join(root, version, "splits.json"), os.path.join(root, "splits.json")):
    if os.path.exists(path):
      return {name: split for split, names in common.read_json(path).items() for name in names}
  names = [s["name"] for s in scenes]
  try:
    from nuscenes.utils.splits import create_splits_scenes
  except ImportError as e:
    if names and all(NUSCENES_SCENE.match(n) for n in names):
      raise common.BuildError(
          f"{os.path.join(root, version)}: nuScenes' scenes take the devkit's official split, "
          f"and nuscenes-devkit does not import ({e}): `pip install --no-deps "
          f"nuscenes-devkit==1.2.0` (as `make test` does), or write {root}/splits.json "
          f"({{split: [scene names]}})") from None
  else:
    ours = OFFICIAL_SPLITS.get(version.rsplit("-", 1)[-1], {})
    official = {name: ours[split] for split, names in create_splits_scenes(verbose=False).items()
                if split in ours for name in names}
    if official and all(n in official for n in names):
      return official
  logging.warning("%s: %d scene(s) without an official split of %s from nuscenes-devkit: "
                  "split 85/15 train/val by scene-name hash; a splits.json ({split: [scene "
                  "names]}) in %s sets the split", os.path.join(root, version), len(names),
                  version, root)
  return {n: "val" if int(hashlib.md5(n.encode()).hexdigest(), 16) % 100 < 15 else "train"
          for n in names}


QA_STAGES = ("perception", "prediction", "planning", "behavior")


DRIVELM_FILES = ("*_nus.json", "*_nus_q_only.json", "drivelm*.json")
_RELEASE = re.compile(r"(^|_)v(\d+)_(\d+)_")   # v1_1_train_nus.json, drivelm_v1_0_x.json


def drivelm_files(root):
  """The DriveLM-nuScenes QA files in the manual dir or a folder in it (DriveLM's own layout
  keeps them in `QA_dataset_nus/`), sorted. Of the files that differ only in their release
  (v1_0_ / v1_1_) or folder, one is read: the latest release, then the one in the manual dir
  itself; a warning names the others."""
  paths = sorted({p for folder in ("", "*") for pattern in DRIVELM_FILES
                  for p in glob.glob(os.path.join(root, folder, pattern))})
  best = {}   # file name without its release -> (rank, path)
  for path in paths:
    name = os.path.basename(path)
    match = _RELEASE.search(name)
    release = (int(match[2]), int(match[3])) if match else ()
    rank = (release, os.path.dirname(path) == os.path.normpath(root))
    key = _RELEASE.sub(r"\1", name, count=1)
    if key not in best or rank > best[key][0]:
      best[key] = (rank, path)
  keep = {path for _, path in best.values()}
  others = [p for p in paths if p not in keep]
  if others:
    logging.warning("DriveLM QA: reading the latest release of each file (in the manual dir "
                    "itself where it is also in a folder), not %s", ", ".join(others))
  return [p for p in paths if p in keep]


def drivelm_qa(root):
  """{sample token: (QA pairs, key_object_infos JSON)} of the DriveLM-nuScenes files
  (`drivelm_files`): the released names (v1_1_train_nus.json; v1_1_val_nus_q_only.json, the
  challenge's questions with empty answers) or drivelm*.json. A frame in two files is taken
  from the one with answers; in two with answers, an error naming both. None found is a
  warning (nuScenes without DriveLM builds; its QA evaluation then has nothing to score)."""
  qa, source = {}, {}
  paths = drivelm_files(root)
  if not paths:
    logging.warning("%s: no DriveLM QA file (%s, here or in a folder in it): the frames get no "
                    "QA; link a QA file of another name here as drivelm_<name>.json", root,
                    ", ".join(DRIVELM_FILES))
  for path in paths:
    scenes = common.read_json(path)
    if not isinstance(scenes, dict) or not all(
        isinstance(scene, dict) and isinstance(scene.get("key_frames", {}), dict)
        for scene in scenes.values()):
      raise common.BuildError(f"{path}: expected DriveLM-nuScenes QA, {{scene token: "
                              f"{{\"key_frames\": {{sample token: {{\"QA\": ...}}}}}}}}")
    for scene in scenes.values():
      for sample_token, frame in scene.get("key_frames", {}).items():
        # The challenge's order (perception, prediction, planning, behavior), its tags
        # (v1.1; none in v1.0) and the frame's key objects by c-tag.
        pairs = [{"type": kind, "question": p["Q"], "answer": p.get("A") or "",
                  "tag": labels.drivelm_tag_mask(p.get("tag") or [])}
                 for kind in QA_STAGES for p in frame.get("QA", {}).get(kind, [])]
        answered = any(p["answer"] for p in pairs)
        if sample_token in qa:
          if answered and source[sample_token][1]:
            raise common.BuildError(f"{path}: frame {sample_token} is also in "
                                    f"{source[sample_token][0]}, both with answers")
          if not answered:
            continue
        qa[sample_token] = (pairs, json.dumps(frame.get("key_object_infos", {})))
        source[sample_token] = (path, answered)
  return qa


class NuscenesDrive(tfds.core.GeneratorBasedBuilder):
  """nuScenes keyframes with driving actions from the ego's future path."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.1.0": "DriveLM QA in the challenge's order with its tags, and the "
                            "frame's key_object_infos (JSON text).",
                   "1.2.0": "Keyframes without 3 s of future that DriveLM asks about, "
                            "has_actions False."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="front", description="CAM_FRONT only"),
      tfds.core.BuilderConfig(name="six_cam", description="all six cameras"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Extract nuScenes (v1.0-mini or v1.0-trainval: tables + samples/) into the manual dir, "
      "optionally with DriveLM-nuScenes QA (*_nus.json, *_nus_q_only.json or drivelm*.json, "
      "there or in a folder in it such as QA_dataset_nus/), or run "
      "`python -m drivlm_jax.sim --layout nuscenes ...` to write the same layout.")
  strict = False

  def _info(self):
    qa = tfds.features.Sequence({"type": tfds.features.Text(),
                                 "question": tfds.features.Text(),
                                 "answer": tfds.features.Text(),
                                 # DriveLM's tag list as bits: tag t -> 1 << t
                                 "tag": tfds.features.Scalar(dtype=np.int32)})
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "images": tfds.features.Sequence(
                tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")),
            "cameras": tfds.features.Sequence(tfds.features.Text()),
            "file_names": tfds.features.Sequence(tfds.features.Text()),
            "sample_token": tfds.features.Text(),
            "scene_token": tfds.features.Text(),
            "ego_speed": tfds.features.Scalar(dtype=np.float32),
            "actions": tfds.features.Tensor(shape=(4,), dtype=np.int32),
            "has_actions": tfds.features.Scalar(dtype=np.bool_),
            "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "box_camera": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "box_categories": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "location": tfds.features.Text(),
            "night": tfds.features.Scalar(dtype=np.bool_),
            "rain": tfds.features.Scalar(dtype=np.bool_),
            "qa": qa,
            "key_objects": tfds.features.Text(),   # DriveLM key_object_infos, JSON
        }),
        homepage="https://www.nuscenes.org/")

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    self.skips = common.Skips(self.strict)
    tables = Tables(root)
    splits = scene_splits(root, tables.version, tables.scene.values())
    names = sorted({splits.get(s["name"], "train") for s in tables.scene.values()})
    qa = drivelm_qa(tables.root)
    # DriveLM's files cover v1.0-trainval; beside the mini tables most of their frames have
    # no sample here. Expected, so a warning (also under --strict), never silent: the
    # challenge scores every frame of its file.
    unmatched = sorted(t for t in qa if t not in tables.sample)
    if unmatched:
      logging.warning("%s: %d of the %d DriveLM frames are no sample of %s; their QAs are left "
                      "out (first: %s)", root, len(unmatched), len(qa), tables.version,
                      ", ".join(unmatched[:3]))
    return {split: self._generate_examples(tables, splits, split, qa) for split in names}

  def _generate_examples(self, tables, splits, split, qa):
    cameras = ("CAM_FRONT",) if self.builder_config.name == "front" else SIX_CAMERAS
    skips = common.Skips(self.strict)
    for scene in sorted(tables.scene.values(), key=lambda s: s["name"]):
      if splits.get(scene["name"], "train") != split:
        continue
      log = tables.log[scene["log_token"]]
      description = scene.get("description", "").lower()
      samples = tables.scene_samples(scene)
      poses = [tables.ego_pose[self._data(tables, s, "CAM_FRONT")["ego_pose_token"]]
               for s in samples]
      positions = np.array([p["translation"][:2] for p in poses])
      for i, sample in enumerate(samples):
        yaw = labels.yaw_from_quaternion(poses[i]["rotation"])
        actions = labels.actions_from_ego_path(positions, yaw, i)
        if actions is None and not qa.get(sample["token"], ([],))[0]:
          skips("less than 3 s of future", f"{scene['name']}/{sample['token']}")
          continue
        # Partial downloads are common (the tables with some of the blob archives, or
        # DriveLM's keyframe images only): the devkit never checks files; we count the skip.
        files = [self._data(tables, sample, c)["filename"] for c in cameras]
        missing = [f for f in files if not os.path.exists(os.path.join(tables.root, f))]
        if missing:
          skips("image file missing", f"{scene['name']}/{sample['token']} ({missing[0]})")
          continue
        yield sample["token"], self._example(tables, sample, scene, log, cameras, actions,
                                             labels.ego_speed(positions, i), description, qa)
    skips.log(f"nuscenes_drive {split}")
    self.skips.merge(skips)

  def _data(self, tables, sample, channel):
    data = tables.keyframe_data.get(sample["token"], {})
    if channel not in data:
      raise common.BuildError(f"{tables.version}/sample_data.json: sample {sample['token']} "
                              f"has no {channel} keyframe")
    return data[channel]

  def _example(self, tables, sample, scene, log, cameras, actions, speed, description, qa):
    images, files, boxes, box_camera, box_categories = [], [], [], [], []
    for c, channel in enumerate(cameras):
      sd = self._data(tables, sample, channel)
      path = os.path.join(tables.root, sd["filename"])
      jpeg, (width, height) = common.read_jpeg(path, f"sample_data {sd['token']}")
      images.append(jpeg)
      files.append(sd["filename"])
      pose = tables.ego_pose[sd["ego_pose_token"]]
      cs = tables.calibrated_sensor[sd["calibrated_sensor_token"]]
      for ann in tables.annotations.get(sample["token"], []):
        corners = geometry.box_corners(ann["translation"], ann["size"], ann["rotation"])
        box = geometry.project_box(corners, pose, cs, width, height)
        if box is None:
          continue
        category = tables.category[tables.instance[ann["instance_token"]]["category_token"]]
        boxes.append(np.array(box) / [width, height, width, height])
        box_camera.append(c)
        box_categories.append(coarse_category(category["name"]))
    return {
        "images": images, "cameras": list(cameras), "file_names": files,
        "sample_token": sample["token"], "scene_token": scene["token"],
        "ego_speed": np.float32(speed), "has_actions": actions is not None,
        "actions": np.zeros(4, np.int32) if actions is None else actions,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "box_camera": np.asarray(box_camera, np.int32),
        "box_categories": np.asarray(box_categories, np.int32),
        "location": log["location"], "night": "night" in description,
        "rain": "rain" in description, "qa": qa.get(sample["token"], ([], "{}"))[0],
        "key_objects": qa.get(sample["token"], ([], "{}"))[1],
    }
