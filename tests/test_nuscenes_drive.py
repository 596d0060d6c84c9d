"""nuScenes layout from the sim against nuscenes-devkit, and the nuScenes-Drive builder."""
import glob
import json
import os
import logging
import random
import re
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from nuscenes.nuscenes import NuScenes
from nuscenes.scripts import export_2d_annotations_as_json as export_2d
from nuscenes.utils.geometry_utils import view_points
from nuscenes.utils.splits import create_splits_scenes
from pyquaternion import Quaternion
from sklearn.metrics import average_precision_score

import data_builders  # noqa: F401  (registers the builders)
from configs import common
from data_builders import __main__ as build_cli
from data_builders.common import BuildError
from data_builders.nuscenes_drive import nuscenes_drive_dataset_builder as nuscenes_builder
from drivlm_jax.data import drivelm_questions, geometry, labels, pipeline
from drivlm_jax.evals import heads
from drivlm_jax.model import vlm
from drivlm_jax.sim import nuscenes as sim_nuscenes
from drivlm_jax.sim import tokenizer as sim_tokenizer
from tests import drivelm_reference


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("nuscenes"))
  sim_nuscenes.write(root, "night+rain", 3, seed=0, width=320, height=180,
                     location="singapore-onenorth")
  sim_nuscenes.write(root, "day", 1, seed=1, split="val", width=320, height=180)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  splits, skipped = build_cli.build("nuscenes_drive", root, data_dir, config="six_cam")
  nusc = NuScenes(version="v1.0-mini", dataroot=root, verbose=False)
  return root, data_dir, splits, skipped, nusc


def _devkit_box(nusc, ann_token, sd_token):
  """The 2D box as the devkit's `export_2d_annotations_as_json.get_2d_boxes` makes it
  (global -> ego -> camera, corners with z > 0, `post_process_coords`), normalised."""
  sd = nusc.get("sample_data", sd_token)
  cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
  pose = nusc.get("ego_pose", sd["ego_pose_token"])
  box = nusc.get_box(ann_token)
  box.translate(-np.array(pose["translation"]))
  box.rotate(Quaternion(pose["rotation"]).inverse)
  box.translate(-np.array(cs["translation"]))
  box.rotate(Quaternion(cs["rotation"]).inverse)
  corners = box.corners()
  corners = corners[:, corners[2] > 0]
  uv = view_points(corners, np.array(cs["camera_intrinsic"]), normalize=True)[:2]
  found = _devkit_post_process(uv.T.tolist(), (sd["width"], sd["height"]))
  if found is None:
    return None
  return np.array(found) / [sd["width"], sd["height"], sd["width"], sd["height"]]


def _devkit_post_process(corner_coords, imsize):
  """The devkit's `post_process_coords`, or None where it fails: a hull that is a point or a
  line, or one that only touches the image, has no `exterior`."""
  if len(corner_coords) == 0:
    return None
  try:
    return export_2d.post_process_coords(corner_coords, imsize)
  except AttributeError:
    return None


def test_2d_box_is_the_devkits():
  """`geometry.box_in_image` against the devkit's `post_process_coords` on random boxes around
  a nuScenes front camera: partly behind it, straddling the image's edges, outside it."""
  intrinsic = np.array([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]])
  rng = np.random.default_rng(0)
  outcomes = {"box": 0, "none": 0}
  for _ in range(400):
    centre = rng.uniform([-25, -6, -4], [25, 6, 30])
    corners = geometry.box_corners(centre, rng.uniform(0.5, 8, 3),
                                   Quaternion(axis=rng.normal(size=3), angle=rng.uniform(0, 6.3))
                                   .elements)
    front = corners[corners[:, 2] > 0].T
    want = _devkit_post_process(view_points(front, intrinsic, normalize=True)[:2].T.tolist(),
                                (1600, 900)) if front.size else None
    got = geometry.box_in_image(corners, intrinsic, 1600, 900)
    if want is None:
      assert got is None
    else:
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6)
    outcomes["none" if want is None else "box"] += 1
  assert min(outcomes.values()) > 50, outcomes


@pytest.mark.parametrize("points", [
    [(-3e15, 2e15), (800, 450), (810, 460)],          # a corner just in front of the camera
    [(-100, 50), (50, -100), (-100, -100)],           # a hull beside the image, missing it
    [(-50, 100), (0, 100), (0, 400), (-50, 400)],     # touching the left edge only
    [(100, 100), (200, 200), (300, 300)],             # collinear
    [(100, 100), (100, 100), (400, 100), (400, 100), (250, 300)],   # repeated corners
    [(-10, -10), (1700, -10), (1700, 1000), (-10, 1000)],           # covering the image
    [(0, 0), (1600, 0), (800, 900)],                  # on the border
    [(1599.5, 300), (1700, 300), (1700, 301)],        # a sliver inside the right edge
])
def test_2d_box_corner_cases_are_the_devkits(points):
  want = _devkit_post_process([list(p) for p in points], (1600, 900))
  got = geometry.hull_in_image(np.array(points, np.float64), 1600, 900)
  if want is None:
    assert got is None
  else:
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)


def test_devkit_loads_and_builder_agrees(dataset):
  root, data_dir, splits, skipped, nusc = dataset
  assert len(nusc.scene) == 4 and len(nusc.sample) == 4 * sim_nuscenes.KEYFRAMES
  # DriveLM asks about every sim keyframe, so those in a scene's last 3 s (6 at 2 Hz) stay,
  # without actions: the challenge scores every frame of its file.
  assert splits == {"train": 3 * sim_nuscenes.KEYFRAMES, "val": sim_nuscenes.KEYFRAMES}
  assert skipped == {}
  asked = set()
  for path in glob.glob(os.path.join(root, "*_nus.json")):
    with open(path) as f:
      asked |= {frame for scene in json.load(f).values() for frame in scene["key_frames"]}
  built = set()
  checked_boxes = 0
  for split in splits:
    source = tfds.data_source("nuscenes_drive/six_cam", data_dir=data_dir, split=split)
    for i in range(len(source)):
      ex = source[i]
      built.add(ex["sample_token"].decode())
      sample = nusc.get("sample", ex["sample_token"].decode())
      ahead, token = 0, sample["next"]
      while token and ahead < 6:
        ahead, token = ahead + 1, nusc.get("sample", token)["next"]
      assert bool(ex["has_actions"]) == (ahead == 6)
      assert ex["has_actions"] or not ex["actions"].any()
      cameras = [c.decode() for c in ex["cameras"]]
      assert len(cameras) == 6
      for c, (channel, name) in enumerate(zip(cameras, ex["file_names"])):
        path = nusc.get_sample_data_path(sample["data"][channel])
        assert path == f"{root}/{name.decode()}"
        expected = []
        for ann in sample["anns"]:
          box = _devkit_box(nusc, ann, sample["data"][channel])
          if box is not None:
            expected.append(box)
        got = ex["boxes"][ex["box_camera"] == c]
        assert len(got) == len(expected)
        if expected:
          scale = np.array([320, 180, 320, 180])
          np.testing.assert_allclose(np.sort(got * scale, 0),
                                     np.sort(np.array(expected) * scale, 0), atol=1e-3)
          checked_boxes += len(expected)
      scene = nusc.get("scene", sample["scene_token"])
      log = nusc.get("log", scene["log_token"])
      assert ex["location"].decode() == log["location"]
      assert bool(ex["night"]) == ("night" in scene["description"])
      assert bool(ex["rain"]) == ("rain" in scene["description"])
      assert len(ex["qa"]["question"]) >= 3
  assert checked_boxes > 20
  assert asked <= built       # every frame the DriveLM file asks about is there to answer


def test_actions_follow_the_manoeuvre(dataset):
  root, data_dir, splits, _, nusc = dataset
  source = tfds.data_source("nuscenes_drive/six_cam", data_dir=data_dir, split="train")
  for i in range(len(source)):
    ex = source[i]
    scene = nusc.get("scene", nusc.get("sample", ex["sample_token"].decode())["scene_token"])
    a = ex["actions"]
    if not ex["has_actions"]:
      continue
    if "turning left" in scene["description"]:
      assert a[2] and not a[3]
    elif "turning right" in scene["description"]:
      assert a[3] and not a[2]
    elif "slowing down" in scene["description"]:
      assert a[1] and not a[0]
    else:
      assert a[0] and not a[1] and not a[2] and not a[3]


def _path(speeds, yaw_rate, dt=0.5, yaw0=0.7):
  """Hand-made ego path: positions at 2 Hz from per-step speeds and a constant yaw rate."""
  x, y, yaw, out = 10.0, -3.0, yaw0, []
  for v in speeds:
    out.append((x, y))
    x, y, yaw = x + v * np.cos(yaw) * dt, y + v * np.sin(yaw) * dt, yaw + yaw_rate * dt
  return np.array(out), yaw0


@pytest.mark.parametrize("speeds,yaw_rate,expected", [
    ([8.0] * 10, 0.0, [1, 0, 0, 0]),                      # straight
    ([6.0] * 10, 0.3, [1, 0, 1, 0]),                      # curving left
    ([6.0] * 10, -0.3, [1, 0, 0, 1]),                     # curving right
    ([8, 6, 4, 2, 0.5, 0, 0, 0, 0, 0], 0.0, [0, 1, 0, 0]),  # stopping
    ([0.0] * 10, 0.0, [0, 1, 0, 0]),                      # standing still
    ([6.0] * 10, 0.05, [1, 0, 0, 0]),                     # gentle bend: < 2 m at 3 s
])
def test_action_rule_on_hand_made_paths(speeds, yaw_rate, expected):
  positions, yaw = _path(speeds, yaw_rate)
  np.testing.assert_array_equal(labels.actions_from_ego_path(positions, yaw, 0), expected)
  assert labels.actions_from_ego_path(positions, yaw, len(positions) - 6) is None


_CTAG = re.compile(r"<c(\d+),(CAM_[A-Z_]+),(\d+\.\d),(\d+\.\d)>")
_QA_KEYS = {"Q", "A", "C", "con_up", "con_down", "cluster", "layer"}


def test_drivelm_qa_follows_the_documented_schema_and_the_builder_keeps_it(dataset):
  """DriveLM's docs/data_prep_nus.md layout, which v1_1_train_nus.json keeps (its challenge's
  train_sample.json: no tags; the challenge's scripts add them to the test questions they
  derive): {scene_token: {"scene_description", "key_frames": {sample_token:
  {"key_object_infos": {c-tag: {"Category", "Status", "Visual_description", "2d_bbox"}},
  "QA": {stage: [{"Q", "A", "C", "con_up", "con_down", "cluster", "layer"}]},
  "image_paths": {camera: file}}}}}."""
  root, data_dir, *_, nusc = dataset
  with open(os.path.join(root, "v1_1_train_nus.json")) as f:
    drivelm = json.load(f)
  with_objects = 0
  for scene_token, scene in drivelm.items():
    assert nusc.get("scene", scene_token) and isinstance(scene["scene_description"], str)
    for sample_token, frame in scene["key_frames"].items():
      assert nusc.get("sample", sample_token)["scene_token"] == scene_token
      assert set(frame) == {"key_object_infos", "QA", "image_paths"}
      assert set(frame["image_paths"]) == set(sim_nuscenes.CAMERAS)
      assert list(frame["QA"]) == ["perception", "prediction", "planning", "behavior"]
      objects = frame["key_object_infos"]
      assert len(objects) <= 6
      with_objects += bool(objects)
      for k, (tag, info) in enumerate(objects.items()):
        c, camera, x, y = _CTAG.fullmatch(tag).groups()
        assert int(c) == k + 1 and camera in sim_nuscenes.CAMERAS
        assert set(info) == {"Category", "Status", "Visual_description", "2d_bbox"}
        x1, y1, x2, y2 = info["2d_bbox"]
        assert 0 <= x1 <= float(x) <= x2 <= 320 and 0 <= y1 <= float(y) <= y2 <= 180
      for stage, qas in frame["QA"].items():
        for qa in qas:
          assert set(qa) == _QA_KEYS
          for tag in _CTAG.findall(qa["Q"] + qa["A"]):   # every c-tag is a key object
            assert f"<c{tag[0]},{tag[1]},{tag[2]},{tag[3]}>" in objects
      first = frame["QA"]["perception"][0]
      assert all(t in first["A"] for t in objects)
  assert with_objects > 10
  # The builder keeps every QA in the challenge's order (no tags), and the key objects.
  source = tfds.data_source("nuscenes_drive/six_cam", data_dir=data_dir, split="train")
  ex = source[0]
  frame = next(s["key_frames"][ex["sample_token"].decode()] for s in drivelm.values()
               if ex["sample_token"].decode() in s["key_frames"])
  ordered = [qa for stage in frame["QA"].values() for qa in stage]
  assert [q.decode() for q in ex["qa"]["question"]] == [qa["Q"] for qa in ordered]
  assert [labels.drivelm_tags(t) for t in ex["qa"]["tag"]] == [[]] * len(ordered)
  assert json.loads(ex["key_objects"]) == frame["key_object_infos"]


def test_a_missing_camera_image_is_a_counted_skip_or_strict_error(tmp_path):
  """A partial download (some images absent): the devkit loads the tables all the same; the
  sample is skipped and counted, or with --strict an error naming it."""
  root = str(tmp_path / "nus")
  sim_nuscenes.write(root, "day", 1, seed=2, width=64, height=36)
  nusc = NuScenes(version="v1.0-mini", dataroot=root, verbose=False)
  sample = nusc.sample[0]
  gone = nusc.get("sample_data", sample["data"]["CAM_BACK_LEFT"])["filename"]
  os.remove(os.path.join(root, gone))
  full, _ = build_cli.build("nuscenes_drive", root, str(tmp_path / "front"), config="front")
  splits, skipped = build_cli.build("nuscenes_drive", root, str(tmp_path / "six"),
                                    config="six_cam")
  assert skipped["image file missing"] == 1 and splits["train"] == full["train"] - 1
  with pytest.raises(BuildError, match=rf"{sample['token']} \({re.escape(gone)}\): image file "
                                       rf"missing"):
    build_cli.build("nuscenes_drive", root, str(tmp_path / "strict"), config="six_cam",
                    strict=True)


def test_a_frame_without_future_or_drivelm_qa_is_a_counted_skip(tmp_path, caplog):
  """Kept without actions only where DriveLM asks about it; otherwise skipped and counted. A
  DriveLM frame that is no sample of the tables (DriveLM's trainval file beside the mini
  tables) is counted in a warning, also under --strict: the challenge would score it."""
  root = str(tmp_path / "nus")
  sim_nuscenes.write(root, "day", 1, seed=3, width=64, height=36)
  nusc = NuScenes(version="v1.0-mini", dataroot=root, verbose=False)
  last = [s["token"] for s in nusc.sample if not s["next"]]
  path, = glob.glob(os.path.join(root, "*_nus.json"))
  with open(path) as f:
    qa = json.load(f)
  for scene in qa.values():
    for token in last:
      scene["key_frames"].pop(token, None)
  frame = {"QA": {"perception": [{"Q": "Is it moving?", "A": "No.", "tag": [0]}]}}
  qa["scene-of-trainval"] = {"key_frames": {"sample-of-trainval": frame}}
  with open(path, "w") as f:
    json.dump(qa, f)
  with caplog.at_level(logging.WARNING):
    splits, skipped = build_cli.build("nuscenes_drive", root, str(tmp_path / "tfds"),
                                      config="front")
  assert skipped == {"less than 3 s of future": 1}
  assert re.search(r"1 of the \d+ DriveLM frames are no sample of v1.0-mini.*"
                   r"\(first: sample-of-trainval\)", caplog.text)
  assert splits["train"] == sim_nuscenes.KEYFRAMES - 1


def test_training_questions_in_the_challenges_form(dataset):
  """`Features.drivelm_questions`: "released" trains on every QA of the frame, "challenge" on
  the questions the challenge's extract_data.py + convert_data.py derive from them (run by
  tests/drivelm_reference.py on the released file), multiple choice included."""
  root, data_dir, _, _, _ = dataset
  frames = {}
  for path in glob.glob(os.path.join(root, "*_nus.json")):
    with open(path) as f:
      for scene in json.load(f).values():
        frames.update(scene["key_frames"])
  source = tfds.data_source("nuscenes_drive/six_cam", data_dir=data_dir, split="train")
  multiple_choice = 0
  for i in range(len(source)):
    ex = source[i]
    token = ex["sample_token"].decode()
    frame = frames[token]
    released = [(q["Q"], q["A"]) for stage in ("perception", "prediction", "planning",
                                               "behavior") for q in frame["QA"].get(stage, [])]
    assert pipeline.qa_pairs(ex, "released") == released
    official = drivelm_reference.convert_frame(
        drivelm_reference.extract_frame(frame),
        random.Random(drivelm_questions.frame_seed(token)))
    want = [(q["Q"], q["A"]) for qas in official.values() for q in qas]
    got = pipeline.qa_pairs(ex, "challenge")
    assert got == want, token
    multiple_choice += sum(a in ("A", "B", "C", "D") for _, a in got)
  assert multiple_choice >= len(source)   # a behaviour question per frame at least


@pytest.mark.parametrize("version", ["v1.0-mini", "v1.0-trainval"])
def test_scene_splits_are_the_devkits_for_the_table_version(version, tmp_path):
  """The devkit pairs v1.0-mini with its mini_train / mini_val only (whose scenes are also in
  trainval's lists, some of them in another split there), v1.0-trainval with train / val."""
  official = create_splits_scenes(verbose=False)
  pairs = ({"mini_train": "train", "mini_val": "val"} if version.endswith("mini")
           else {"train": "train", "val": "val"})
  want = {name: ours for theirs, ours in pairs.items() for name in official[theirs]}
  scenes = [{"name": name} for name in want]
  assert nuscenes_builder.scene_splits(str(tmp_path), version, scenes) == want
  if version.endswith("mini"):   # the devkit's mini scenes that trainval puts elsewhere
    assert any(want[n] != ("val" if n in official["val"] else "train") for n in want)
  # A custom splits.json where the devkit reads one (<dataroot>/<version>/) wins.
  os.makedirs(tmp_path / version)
  (tmp_path / version / "splits.json").write_text(json.dumps(
      {"train": [scenes[0]["name"]], "val": [s["name"] for s in scenes[1:]]}))
  custom = nuscenes_builder.scene_splits(str(tmp_path), version, scenes)
  assert custom == {s["name"]: "train" if i == 0 else "val" for i, s in enumerate(scenes)}


def test_without_the_devkit_nuscenes_scenes_are_an_error_and_other_scenes_a_warned_hash(
    tmp_path, monkeypatch, caplog):
  """A hash split of v1.0-mini's real scenes puts all ten in train (no val, so no build):
  without nuscenes-devkit they are an error naming the fix. Scenes the official lists do not
  name are split by hash, with or without the devkit, and a warning says so."""
  mini = [{"name": n} for n in create_splits_scenes(verbose=False)["mini_train"]
          + create_splits_scenes(verbose=False)["mini_val"]]
  custom = [{"name": f"drive-{i:03d}"} for i in range(40)]
  with caplog.at_level(logging.WARNING):
    hashed = nuscenes_builder.scene_splits(str(tmp_path), "v1.0-mini", custom)
  assert set(hashed.values()) == {"train", "val"}
  assert any("by scene-name hash" in r.getMessage() for r in caplog.records)
  monkeypatch.setitem(sys.modules, "nuscenes.utils.splits", None)   # not installed
  with pytest.raises(BuildError, match=r"v1.0-mini: nuScenes' scenes take the devkit's "
                                       r"official split.*nuscenes-devkit.*splits.json"):
    nuscenes_builder.scene_splits(str(tmp_path), "v1.0-mini", mini)
  assert nuscenes_builder.scene_splits(str(tmp_path), "v1.0-mini", custom) == hashed


def test_drivelm_files_in_a_folder_and_of_two_releases(tmp_path, caplog):
  """DriveLM's own layout keeps its QA in QA_dataset_nus/; of two releases of one file the
  latest is read, and a warning names the other; no QA file at all is a warning too."""
  def write(path, answer):
    frame = {"QA": {"perception": [{"Q": "Is it moving?", "A": answer}]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"scene": {"key_frames": {"frame": frame}}}))

  with caplog.at_level(logging.WARNING):
    assert nuscenes_builder.drivelm_qa(str(tmp_path)) == {}
  assert any("no DriveLM QA file" in r.getMessage() for r in caplog.records)
  write(tmp_path / "QA_dataset_nus" / "v1_0_train_nus.json", "Yes.")
  assert nuscenes_builder.drivelm_qa(str(tmp_path))["frame"][0][0]["answer"] == "Yes."
  write(tmp_path / "QA_dataset_nus" / "v1_1_train_nus.json", "No.")
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert nuscenes_builder.drivelm_qa(str(tmp_path))["frame"][0][0]["answer"] == "No."
  assert any("latest release" in r.getMessage() and "v1_0_train_nus.json" in r.getMessage()
             for r in caplog.records)
  write(tmp_path / "v1_1_train_nus.json", "Maybe.")   # a copy in the manual dir itself wins
  assert nuscenes_builder.drivelm_qa(str(tmp_path))["frame"][0][0]["answer"] == "Maybe."
  write(tmp_path / "drivelm_v1_0_extra.json", "Old.")   # a release inside another name
  write(tmp_path / "drivelm_v1_2_extra.json", "New.")
  with pytest.raises(BuildError, match=r"drivelm_v1_2_extra.json.*both with answers"):
    nuscenes_builder.drivelm_qa(str(tmp_path))   # the latest, beside v1_1_train_nus.json
  assert [os.path.basename(p) for p in nuscenes_builder.drivelm_files(str(tmp_path))] == [
      "drivelm_v1_2_extra.json", "v1_1_train_nus.json"]


def test_frames_without_actions_train_and_score_no_action(tmp_path):
  """A scene's last 3 s, kept for DriveLM: the batch masks their action loss, and the heads'
  action metrics are those of the other frames alone (sklearn's average precision)."""
  root, data_dir = str(tmp_path / "nus"), str(tmp_path / "tfds")
  sim_nuscenes.write(root, "day", 1, seed=4, split="val", width=64, height=36)
  build_cli.build("nuscenes_drive", root, data_dir, config="front")
  cfg = vlm.config_from_dict(common.model_config("tiny"))
  feats = pipeline.Features(tokenizer=sim_tokenizer.write(str(tmp_path)),
                            image_size=cfg.vision.image_size,
                            num_image_tokens=cfg.num_visual_tokens, max_len=160)
  spec = pipeline.SourceSpec("nuscenes_drive/front", data_dir, "val")
  batch = pipeline.batch_dataset(spec, feats, 64, train=False, shard_index=0, shard_count=1)[0]
  source = tfds.data_source("nuscenes_drive/front", data_dir=data_dir, split="val")
  has = np.array([bool(source[i]["has_actions"]) for i in range(len(source))])
  assert 0 < has.sum() < len(has)
  np.testing.assert_array_equal(batch["action_mask"], has.astype(np.float32))
  params = vlm.init(cfg, jax.random.key(0))
  result = heads.Heads(name="heads", every=1, role="target", batch_size=64).run(
      cfg, params, {("target", "test"): spec}, feats)
  probs = np.asarray(heads.probabilities(cfg, params, batch["image"], batch["instruction_ids"],
                                         batch["instruction_mask"])[0])[has]
  labels_ = batch["actions"][has]
  aps = [average_precision_score(labels_[:, c], probs[:, c]) for c in range(4)
         if labels_[:, c].any()]
  assert result["action_mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-4)


def test_drivelm_files_a_frame_in_two_and_a_file_of_another_form(tmp_path):
  """A frame in the answered file and the questions-only one keeps its answers (whatever
  the order the files sort in); answered in two files is an error naming both; a file of
  another form (DriveLM's llama-format list) under a QA file's name is an error naming it."""
  def write(name, answer):
    frame = {"QA": {"perception": [{"Q": "Is it moving?", "A": answer}]}}
    (tmp_path / name).write_text(json.dumps({"scene": {"key_frames": {"frame": frame}}}))

  write("v1_1_val_nus.json", "Yes.")
  write("v1_1_val_nus_q_only.json", "")
  assert nuscenes_builder.drivelm_qa(str(tmp_path))["frame"][0][0]["answer"] == "Yes."
  (tmp_path / "v1_1_val_nus.json").rename(tmp_path / "z_nus.json")
  assert nuscenes_builder.drivelm_qa(str(tmp_path))["frame"][0][0]["answer"] == "Yes."
  write("drivelm_extra.json", "No.")
  with pytest.raises(BuildError, match=r"z_nus.json: frame frame is also in "
                                       r".*drivelm_extra.json, both with answers"):
    nuscenes_builder.drivelm_qa(str(tmp_path))
  for name in ("drivelm_extra.json", "z_nus.json"):
    (tmp_path / name).unlink()
  (tmp_path / "v1_0_train_nus.json").write_text(json.dumps([{"id": 0, "conversations": []}]))
  with pytest.raises(BuildError, match=r"v1_0_train_nus.json: expected DriveLM-nuScenes QA"):
    nuscenes_builder.drivelm_qa(str(tmp_path))


def test_one_table_version_is_read_and_the_others_named(dataset, tmp_path, caplog):
  """As the devkit (one version per `NuScenes`): beside v1.0-mini, a v1.0-test folder is not
  read, and a warning says so."""
  root = tmp_path / "two"
  (root / "v1.0-test").mkdir(parents=True)
  os.symlink(os.path.join(dataset[0], "v1.0-mini"), root / "v1.0-mini")
  with caplog.at_level(logging.WARNING):
    tables = nuscenes_builder.Tables(str(root))
  assert tables.version == "v1.0-mini" and len(tables.scene) == len(dataset[4].scene)
  assert "reading the tables of v1.0-mini only (also here: v1.0-test)" in caplog.text
