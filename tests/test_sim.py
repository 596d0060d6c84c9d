"""The procedural world: label consistency, determinism, domains, and the BDD-OIA layout."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_builders import __main__ as build_cli
from drivlm_jax.data.labels import ACTIONS, REASONS
from drivlm_jax.sim import __main__ as sim_cli
from drivlm_jax.sim import bdd_oia, domains, labels, scene as scene_lib
from tests.bdd_oia_reference import official_labels

R = {name: i for i, name in enumerate(REASONS)}
A = {name: i for i, name in enumerate(ACTIONS)}


def _scenes(n=3000, require=None):
  for i in range(n):
    yield scene_lib.sample_scene(np.random.default_rng([7, i]), require=require)


def test_labels_follow_the_explanations_meaning():
  seen = np.zeros(len(REASONS), int)
  for scene in _scenes():
    a, r = labels.actions_and_reasons(scene)
    seen += r
    if scene.light == "red":
      assert a[A["stop_or_slow"]] and not a[A["forward"]] and r[R["traffic light"]]
      assert not a[A["turn_left"]] and not a[A["turn_right"]]
    if r[R["no lane on the left"]]:
      assert not a[A["turn_left"]]
    if r[R["no lane on the right"]]:
      assert not a[A["turn_right"]]
    assert a[A["forward"]] != a[A["stop_or_slow"]]
    if a[A["stop_or_slow"]]:
      assert r[R["traffic light"]] or r[R["traffic sign"]] or r[5:9].any()
    if r[R["traffic light is green"]]:
      assert scene.light == "green" and not r[R["traffic light"]]
    if r[R["road is clear"]] or r[R["follow traffic"]]:
      assert a[A["forward"]]
    if r[R["obstacles on the left lane"]] or r[R["solid line on the left"]]:
      assert not a[A["turn_left"]]
    if r[R["obstacles on the right lane"]] or r[R["solid line on the right"]]:
      assert not a[A["turn_right"]]
  assert (seen > 0).all(), [REASONS[i] for i in np.flatnonzero(seen == 0)]


@pytest.mark.parametrize("require,action", [("stop", "stop_or_slow"), ("forward", "forward"),
                                            ("left", "turn_left"), ("right", "turn_right")])
def test_required_manoeuvre_is_allowed(require, action):
  for scene in _scenes(300, require):
    assert labels.actions_and_reasons(scene)[0][A[action]]


def test_same_seed_same_bytes_and_domains_change_pixels_only():
  day = domains.parse_domain("day")
  a, rec_a = bdd_oia.frame(3, 11, day, 320, 180)
  b, _ = bdd_oia.frame(3, 11, day, 320, 180)
  assert a == b
  for name in ("night", "fog", "rain", "snow", "night+rain+cam_wide", "cam_tele"):
    jpeg, rec = bdd_oia.frame(3, 11, domains.parse_domain(name), 320, 180)
    assert jpeg != a
    assert rec["actions"] == rec_a["actions"] and rec["reasons"] == rec_a["reasons"]
  with pytest.raises(ValueError, match="unknown condition 'dusk'"):
    domains.parse_domain("dusk")


def test_bdd_oia_layout(tmp_path):
  sim_cli.main(["--layout", "bdd_oia", "--domain", "night", "--num", "120", "--out",
                str(tmp_path), "--seed", "4", "--width", "160", "--height", "90"])
  root = tmp_path / "lastframe"
  actions = json.load(open(root / "train_25k_images_actions.json"))
  reasons = json.load(open(root / "train_25k_images_reasons.json"))
  assert len(actions["images"]) == len(actions["annotations"]) == len(reasons) == 120
  # The released form: annotations carry no id and are indexed by the image's id, which
  # does not follow the image order.
  ids = [im["id"] for im in actions["images"]]
  assert sorted(ids) == list(range(120)) and ids != sorted(ids)
  assert all(set(ann) == {"category"} for ann in actions["annotations"])
  lengths = [len(ann["category"]) for ann in actions["annotations"]]
  assert set(lengths) <= {4, 5} and 5 in lengths   # a few "confusing" rows, like the real data
  assert [r["file_name"] for r in reasons] != [im["file_name"] for im in actions["images"]]
  assert all(len(r["reason"]) == 21 for r in reasons)
  for im in actions["images"]:
    assert os.path.exists(root / "data" / im["file_name"])
  assert (tmp_path / "tokenizer.json").exists()
  # A second domain appends to the split; the builder reads both as the official loader does.
  sim_cli.main(["--layout", "bdd_oia", "--domain", "day", "--num", "30", "--out",
                str(tmp_path), "--seed", "5", "--width", "160", "--height", "90"])
  expected = official_labels(str(tmp_path))
  splits, _ = build_cli.build("bdd_oia", str(tmp_path), str(tmp_path / "tfds"))
  assert splits == {"train": len(expected)} and len(expected) == 150 - 3
  source = tfds.data_source("bdd_oia", data_dir=str(tmp_path / "tfds"), split="train")
  for i in range(len(source)):
    name = source[i]["file_name"].decode()
    np.testing.assert_array_equal(source[i]["actions"], expected[name][0])
    np.testing.assert_array_equal(source[i]["reasons"], expected[name][1])
