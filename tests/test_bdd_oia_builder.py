"""The BDD-OIA builder on hand-written files in the real `lastframe` format."""
import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data_builders  # noqa: F401
from data_builders import __main__ as build_cli
from data_builders.common import BuildError

NAMES = ["b1c9c847-3bda4659.jpg", "b2d502aa-f0b28e3e.jpg", "c0a26a3e-4a1c2ab1.jpg",
         "c3ac7be6-02af5a2e.jpg"]
ACTIONS = [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0, 1]]   # last: confusing
REASONS = {n: [int(j == i) for j in range(21)] for i, n in enumerate(NAMES)}


def _jpeg(colour):
  buffer = io.BytesIO()
  Image.new("RGB", (64, 36), colour).save(buffer, format="JPEG")
  return buffer.getvalue()


def write_archive(root, json_dir="lastframe", edit=None):
  """A tiny `lastframe` archive; `edit(actions, reasons)` alters the JSON before writing."""
  os.makedirs(os.path.join(root, "lastframe", "data"), exist_ok=True)
  os.makedirs(os.path.join(root, json_dir), exist_ok=True)
  for i, name in enumerate(NAMES):
    with open(os.path.join(root, "lastframe", "data", name), "wb") as f:
      f.write(_jpeg((40 * i, 80, 120)))
  actions = {"images": [{"file_name": n, "id": 100 + i, "height": 36, "width": 64}
                        for i, n in enumerate(NAMES)],
             "annotations": [{"id": 100 + i, "category": c} for i, c in enumerate(ACTIONS)]}
  actions["annotations"].reverse()   # annotation order is not image order
  reasons = [{"file_name": n, "reason": REASONS[n]} for n in reversed(NAMES)]
  if edit:
    edit(actions, reasons)
  with open(os.path.join(root, json_dir, "train_25k_images_actions.json"), "w") as f:
    json.dump(actions, f)
  with open(os.path.join(root, json_dir, "train_25k_images_reasons.json"), "w") as f:
    json.dump(reasons, f)
  return str(root)


@pytest.mark.parametrize("json_dir", ["lastframe", "lastframe/data", "lastframe/labels", "data",
                                      "labels"])
def test_reads_the_real_format(tmp_path, json_dir):
  manual = write_archive(tmp_path / "m", json_dir)
  splits, skipped = build_cli.build("bdd_oia", manual, str(tmp_path / "d"))
  assert splits == {"train": 3}
  assert skipped == {"confusing frame (5th action value 1)": 1}
  source = tfds.data_source("bdd_oia", data_dir=str(tmp_path / "d"), split="train")
  got = {source[i]["file_name"].decode(): source[i] for i in range(len(source))}
  assert sorted(got) == NAMES[:3]
  for i, name in enumerate(NAMES[:3]):
    np.testing.assert_array_equal(got[name]["actions"], ACTIONS[i])
    np.testing.assert_array_equal(got[name]["reasons"], REASONS[name])
    assert got[name]["image"].shape == (36, 64, 3)
    assert got[name]["boxes"].shape == (0, 4)


def _drop_image(root):
  os.remove(os.path.join(root, "lastframe", "data", NAMES[1]))


def _corrupt_image(root):
  with open(os.path.join(root, "lastframe", "data", NAMES[2]), "wb") as f:
    f.write(b"\xff\xd8 not a jpeg")


def _malformed_json(root):
  with open(os.path.join(root, "lastframe", "train_25k_images_reasons.json"), "w") as f:
    f.write('[{"file_name": "x.jpg", "reason": [0, 1')


@pytest.mark.parametrize("edit,after,pattern", [
    (lambda a, r: a["annotations"][0].update(category=[1, 0, 0]), None,
     r"actions\.json: annotations\[0\]: expected a list of 4 labels"),
    (lambda a, r: r[1].update(reason=[0] * 20), None,
     r"reasons\.json: \[1\]: expected a list of 21 labels"),
    (lambda a, r: a["annotations"][1].update(id=999), None,
     r"annotations\[1\]: id 999 matches no image"),
    (lambda a, r: a["annotations"][2].update(category=[1, 0, 2, 0]), None,
     r"annotations\[2\]: labels must be 0 or 1"),
    (lambda a, r: r.append({"file_name": "unknown.jpg", "reason": [0] * 21}), None,
     r"reasons\.json: \[4\]: unknown\.jpg is not in"),
    (None, _drop_image, rf"image .*{NAMES[1]} is missing"),
    (None, _corrupt_image, rf"image .*{NAMES[2]} cannot be decoded"),
    (None, _malformed_json, r"reasons\.json: malformed JSON"),
])
def test_bad_input_names_the_file_and_row(tmp_path, edit, after, pattern):
  manual = write_archive(tmp_path / "m", edit=edit)
  if after:
    after(manual)
  with pytest.raises(BuildError, match=pattern):
    build_cli.build("bdd_oia", manual, str(tmp_path / "d"))


def test_missing_reasons_row_is_a_counted_skip_or_strict_error(tmp_path):
  drop = lambda a, r: r.pop(0)   # the reasons of NAMES[3] (the confusing one) go first
  drop_real = lambda a, r: r.pop(1)   # NAMES[2]
  manual = write_archive(tmp_path / "m", edit=drop_real)
  splits, skipped = build_cli.build("bdd_oia", manual, str(tmp_path / "d"))
  assert splits == {"train": 2} and skipped["no reasons row"] == 1
  with pytest.raises(BuildError, match=r"confusing frame.*--strict"):
    build_cli.build("bdd_oia", write_archive(tmp_path / "s", edit=drop), str(tmp_path / "e"),
                    strict=True)


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
  manual = write_archive(tmp_path / "m")
  _drop_image(manual)
  with pytest.raises(SystemExit) as e:
    build_cli.main(["build", "bdd_oia", "--manual_dir", manual, "--data_dir",
                    str(tmp_path / "d")])
  assert e.value.code == 1
  assert "is missing" in capsys.readouterr().err
