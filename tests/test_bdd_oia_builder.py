"""The BDD-OIA builder on hand-written files in the released `lastframe` format.

The expected labels come from `bdd_oia_reference.official_labels`, a few lines that follow the
dataset's own loader, not from the builder's code.
"""
import io
import json
import logging
import os
import re
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data_builders  # noqa: F401
from data_builders import __main__ as build_cli
from data_builders.common import BuildError
from tests.bdd_oia_reference import official_labels

# Listed in the actions file in this (not sorted) order; ids are positions in a longer
# annotations list, not 0..N-1 in image order.
NAMES = ["c3ac7be6-02af5a2e.jpg", "b1c9c847-3bda4659.jpg", "d41f8a2e-7c3b9e01.jpg",
         "b2d502aa-f0b28e3e.jpg", "c0a26a3e-4a1c2ab1.jpg", "a7e3b1c9-0f2d4e6a.jpg"]
IDS = [5, 0, 7, 2, 3, 6]
CATEGORIES = {   # by name; a 5th value is "confusing" (not 0: drop the frame, 0: keep it);
    # the loader reads no value after it (test.py's default file has 6)
    NAMES[0]: [0, 1, 0, 0, 1], NAMES[1]: [1, 0, 0, 0], NAMES[2]: [1, 0, 1, 0, 0],
    NAMES[3]: [0, 1, 0, 0], NAMES[4]: [1, 0, 0, 1, 0, 1], NAMES[5]: [0, 0, 1, 0]}
REASONS = {n: [int(j in (i, 20 - i)) for j in range(21)] for i, n in enumerate(NAMES)}
MISSING = NAMES[5]   # its image file is not in the archive
SPARE = {"category": [1, 1, 0, 0]}   # annotations no image points at (ids 1 and 4)


def _jpeg(colour):
  buffer = io.BytesIO()
  Image.new("RGB", (64, 36), colour).save(buffer, format="JPEG")
  return buffer.getvalue()


def released_json():
  """(actions, reasons) in the released form: positional annotations, no ids."""
  annotations = [dict(SPARE) for _ in range(max(IDS) + 1)]
  for name, image_id in zip(NAMES, IDS):
    annotations[image_id] = {"category": CATEGORIES[name]}
  actions = {"images": [{"file_name": n, "id": i, "height": 36, "width": 64}
                        for n, i in zip(NAMES, IDS)],
             "annotations": annotations}
  reasons = [{"file_name": n, "reason": REASONS[n]} for n in reversed(NAMES)]
  return actions, reasons


def with_ids(actions, reasons):
  """Every annotation also carries an id: its own position (as the loader reads it)."""
  for row, ann in enumerate(actions["annotations"]):
    ann["id"] = row


def with_other_ids(actions, reasons):
  """Annotations carrying ids that name other images than their positions do."""
  for row, ann in enumerate(actions["annotations"]):
    ann["image_id"] = len(actions["annotations"]) - 1 - row


def write_archive(root, json_dir="lastframe", edit=None, missing=MISSING,
                  image_dir="lastframe/data"):
  """A tiny `lastframe` archive without the image `missing`; `edit(actions, reasons)` alters
  the JSON before writing."""
  os.makedirs(os.path.join(root, image_dir), exist_ok=True)
  os.makedirs(os.path.join(root, json_dir), exist_ok=True)
  for i, name in enumerate(NAMES):
    if name != missing:
      with open(os.path.join(root, image_dir, name), "wb") as f:
        f.write(_jpeg((40 * i, 80, 120)))
  actions, reasons = released_json()
  if edit:
    edit(actions, reasons)
  with open(os.path.join(root, json_dir, "train_25k_images_actions.json"), "w") as f:
    json.dump(actions, f)
  with open(os.path.join(root, json_dir, "train_25k_images_reasons.json"), "w") as f:
    json.dump(reasons, f)
  return str(root)


def _read(data_dir):
  source = tfds.data_source("bdd_oia", data_dir=data_dir, split="train")
  return {source[i]["file_name"].decode(): source[i] for i in range(len(source))}


def _build_as_the_loader(manual, data_dir):
  """Builds `manual` and checks every example against the loader's labels -> the skips."""
  expected = official_labels(manual)
  splits, skipped = build_cli.build("bdd_oia", manual, data_dir)
  got = _read(data_dir)
  assert splits == {"train": len(expected)} and sorted(got) == sorted(expected)
  for name, (actions, reasons) in expected.items():
    np.testing.assert_array_equal(got[name]["actions"], actions)
    np.testing.assert_array_equal(got[name]["reasons"], reasons)
  return skipped


@pytest.mark.parametrize("json_dir,image_dir", [
    ("lastframe", "lastframe/data"), ("lastframe/data", "lastframe/data"),
    ("lastframe/labels", "lastframe/data"), ("data", "lastframe/data"),
    ("labels", "lastframe/data"), ("annotations", "data"),
    ("info", "lastframe")])   # the authors' test.py: info/*.json, images in lastframe/
def test_released_form_gives_the_official_labels(tmp_path, json_dir, image_dir):
  manual = write_archive(tmp_path / "m", json_dir, image_dir=image_dir)
  expected = official_labels(manual, json_dir, image_dir=image_dir)
  assert sorted(expected) == sorted([NAMES[1], NAMES[2], NAMES[3], NAMES[4]])   # the fixture
  splits, skipped = build_cli.build("bdd_oia", manual, str(tmp_path / "d"))
  assert splits == {"train": len(expected)}
  assert skipped == {"confusing frame (5th action value not 0)": 1, "image file missing": 1}
  got = _read(str(tmp_path / "d"))
  assert sorted(got) == sorted(expected)
  for name, (actions, reasons) in expected.items():
    np.testing.assert_array_equal(got[name]["actions"], actions)
    np.testing.assert_array_equal(got[name]["reasons"], reasons)
    assert got[name]["image"].shape == (36, 64, 3)
    assert got[name]["boxes"].shape == (0, 4)


@pytest.mark.parametrize("flag", [2, None])   # None: a null in the JSON (None == 0 is false)
def test_any_5th_value_but_0_drops_the_frame_as_the_loader_does(tmp_path, monkeypatch, flag):
  def flag_frame(actions, reasons):
    actions["annotations"][IDS[NAMES.index(NAMES[2])]]["category"] = [1, 0, 1, 0, flag]
  manual = write_archive(tmp_path / "m", edit=flag_frame)
  expected = official_labels(manual)
  assert NAMES[2] not in expected and NAMES[4] in expected
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  splits, skipped = build_cli.build("bdd_oia", manual, str(tmp_path / "d"))
  assert not list(temp.iterdir())   # tfds's empty folder of the unprepared builder: removed
  assert sorted(_read(str(tmp_path / "d"))) == sorted(expected)
  assert skipped["confusing frame (5th action value not 0)"] == 2


@pytest.mark.parametrize("edit,warned", [(with_ids, False), (with_other_ids, True)])
def test_annotation_ids_are_not_read_as_the_loader_does_not(tmp_path, caplog, edit, warned):
  """Labels by position whatever ids the annotations carry (the official loader ignores
  them); ids that disagree with the position are counted in a warning."""
  manual = write_archive(tmp_path / "m", edit=edit)
  with caplog.at_level(logging.WARNING):
    _build_as_the_loader(manual, str(tmp_path / "d"))
  warning = [r.getMessage() for r in caplog.records if "other than their position" in
             r.getMessage()]
  assert bool(warning) == warned
  if warned:   # the 6 rows images read (of 8): 7 - row differs from row for each
    assert "6 annotation(s)" in warning[0]


def unread_rows_malformed(actions, reasons):
  """Rows the loader never reads, malformed: a spare annotation (no image points at it), a
  confusing frame's labels and its reasons row, and the reasons row of a missing image."""
  actions["annotations"][1], actions["annotations"][4] = {}, None
  actions["annotations"][IDS[0]]["category"] = [0, 0, 0, -1, 1]
  for row in reasons:
    if row["file_name"] in (NAMES[0], MISSING):
      row["reason"] = []


def test_rows_the_loader_never_reads_are_not_checked(tmp_path):
  manual = write_archive(tmp_path / "m", edit=unread_rows_malformed)
  skipped = _build_as_the_loader(manual, str(tmp_path / "d"))
  assert skipped == {"confusing frame (5th action value not 0)": 1, "image file missing": 1}


def test_missing_image_is_a_counted_skip_or_strict_error(tmp_path):
  manual = write_archive(tmp_path / "m")
  with pytest.raises(BuildError, match=rf"{MISSING}: image file missing.*--strict"):
    build_cli.build("bdd_oia", manual, str(tmp_path / "d"), strict=True)


def _corrupt_image(root):
  with open(os.path.join(root, "lastframe", "data", NAMES[2]), "wb") as f:
    f.write(b"\xff\xd8 not a jpeg")


def _malformed_json(root):
  with open(os.path.join(root, "lastframe", "train_25k_images_reasons.json"), "w") as f:
    f.write('[{"file_name": "x.jpg", "reason": [0, 1')


@pytest.mark.parametrize("edit,after,pattern", [
    (lambda a, r: a["annotations"][IDS[1]].update(category=[1, 0, 0]), None,
     rf"actions\.json: annotations\[{IDS[1]}\]: expected a list of 4 labels"),
    (lambda a, r: r[1].update(reason=[0] * 20), None,
     r"reasons\.json: \[1\]: expected a list of 21 labels"),
    (lambda a, r: a["annotations"][IDS[2]].update(category=[1, 0, 2, 0]), None,
     rf"annotations\[{IDS[2]}\]: labels must be 0 or 1"),
    (lambda a, r: a["annotations"][IDS[1]].pop("category"), None,
     rf"annotations\[{IDS[1]}\] lacks 'category' \(read for {NAMES[1]}\)"),
    # Released form: an id outside the list, and a list shorter than the largest id.
    (lambda a, r: a["images"][3].update(id=-1), None,
     rf"images\[3\] \({NAMES[3]}\) has id -1, outside the 'annotations' list of length 8"),
    (lambda a, r: a["annotations"].pop(), None,
     rf"images\[2\] \({NAMES[2]}\) has id 7, outside the 'annotations' list of length 7"),
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
  drop_confusing = lambda a, r: r.pop(5)   # reasons are reversed: [5] is NAMES[0], confusing
  drop_real = lambda a, r: r.pop(3)   # NAMES[2]
  manual = write_archive(tmp_path / "m", edit=drop_real)
  splits, skipped = build_cli.build("bdd_oia", manual, str(tmp_path / "d"))
  assert splits == {"train": 3} and skipped["no reasons row"] == 1
  with pytest.raises(BuildError, match=r"confusing frame.*--strict"):
    build_cli.build("bdd_oia", write_archive(tmp_path / "s", edit=drop_confusing, missing=None),
                    str(tmp_path / "e"), strict=True)


def test_a_reasons_row_of_an_unlisted_image_is_a_counted_skip_or_strict_error(tmp_path):
  """The loader never looks a reasons row up by name: one for an image the actions file does
  not list (sorted after every listed name, so its positional pairing is unchanged) leaves
  the labels as the loader gives them."""
  extra = lambda a, r: r.append({"file_name": "unlisted.jpg", "reason": [1] * 21})
  manual = write_archive(tmp_path / "m", edit=extra)
  skipped = _build_as_the_loader(manual, str(tmp_path / "d"))
  assert skipped["reasons row of an image not in train_25k_images_actions.json"] == 1
  with pytest.raises(BuildError, match=r"\[6\] \(unlisted\.jpg\): reasons row of an image "
                     r"not in train_25k_images_actions\.json.*--strict"):
    build_cli.build("bdd_oia", write_archive(tmp_path / "s", edit=extra, missing=None),
                    str(tmp_path / "e"), strict=True)


def test_images_sharing_an_id_each_take_its_row_as_the_loader_does(tmp_path, caplog):
  share = lambda a, r: a["images"][3].update(id=IDS[1])   # NAMES[3] reads NAMES[1]'s row
  manual = write_archive(tmp_path / "m", edit=share)
  expected = official_labels(manual)
  assert expected[NAMES[3]][0] == expected[NAMES[1]][0] == CATEGORIES[NAMES[1]]
  with caplog.at_level(logging.WARNING):
    _build_as_the_loader(manual, str(tmp_path / "d"))
  assert any("1 image(s) share an id" in r.getMessage() for r in caplog.records)


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
  manual = write_archive(tmp_path / "m")
  with pytest.raises(SystemExit) as e:
    build_cli.main(["build", "bdd_oia", "--manual_dir", manual, "--data_dir",
                    str(tmp_path / "d"), "--strict"])
  assert e.value.code == 1
  assert "image file missing" in capsys.readouterr().err


def test_the_image_folder_is_the_one_holding_the_splits_images(tmp_path):
  """A stray .jpg in an earlier candidate folder (data/) does not win over lastframe/, which
  holds the split's images; no folder holding any is an error naming the JSON."""
  manual = write_archive(tmp_path / "m", "info", image_dir="lastframe")
  os.makedirs(os.path.join(manual, "data"))
  with open(os.path.join(manual, "data", "stray.jpg"), "wb") as f:
    f.write(_jpeg((1, 2, 3)))
  splits, _ = build_cli.build("bdd_oia", manual, str(tmp_path / "d"))
  assert splits == {"train": len(official_labels(manual, "info", image_dir="lastframe"))}
  empty = write_archive(tmp_path / "e", "info", image_dir="elsewhere")
  with pytest.raises(BuildError,
                     match=rf"train_25k_images_actions.json: none of its {len(NAMES)} images"):
    build_cli.build("bdd_oia", empty, str(tmp_path / "d2"))


def test_a_split_without_any_of_its_images_is_left_out_as_the_loader_finds_none(tmp_path,
                                                                                caplog):
  """The official loader skips each image whose file is missing, so a test JSON whose images
  are not in the archive gives an empty test set, not a failed build; --strict refuses it."""
  no_skips = lambda a, r: a["annotations"][IDS[0]].update(category=[0, 1, 0, 0, 0])
  manual = write_archive(tmp_path / "m", edit=no_skips, missing=None)
  actions, reasons = released_json()
  for image in actions["images"]:
    image["file_name"] = "test-" + image["file_name"]
  for row in reasons:
    row["file_name"] = "test-" + row["file_name"]
  for kind, rows in (("actions", actions), ("reasons", reasons)):
    with open(os.path.join(manual, "lastframe", f"test_25k_images_{kind}.json"), "w") as f:
      json.dump(rows, f)
  with caplog.at_level(logging.WARNING):
    splits, _ = build_cli.build("bdd_oia", manual, str(tmp_path / "d"))
  assert splits == {"train": len(official_labels(manual, "lastframe"))}
  assert any(f"test_25k_images_actions.json: none of its {len(NAMES)} images" in r.getMessage()
             and "left out" in r.getMessage() for r in caplog.records)
  with pytest.raises(BuildError, match=r"test_25k_images_actions.json: none of its.*--strict"):
    build_cli.build("bdd_oia", manual, str(tmp_path / "s"), strict=True)


def test_a_data_dir_built_from_one_folder_refuses_another(tmp_path, capsys):
  """tfds reuses whatever a data_dir holds: `build` from another folder into it would
  silently print the first folder's dataset."""
  build = lambda folder: build_cli.main(["build", "bdd_oia", "--manual_dir", folder,
                                         "--data_dir", str(tmp_path / "d")])
  first, other = write_archive(tmp_path / "a"), write_archive(tmp_path / "b")
  build(first)
  build(first)                                  # the same folder: reused
  assert capsys.readouterr().out.count('"splits": {"train": 4}') == 2
  with pytest.raises(SystemExit) as e:
    build(other)
  assert e.value.code == 1
  assert re.search(r"holds bdd_oia built from .*/a, not .*/b", capsys.readouterr().err)


def test_a_missing_manual_dir_is_named(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    build_cli.main(["build", "bdd_oia", "--manual_dir", str(tmp_path / "no"), "--data_dir",
                    str(tmp_path / "d")])
  assert e.value.code == 2 and "no such folder" in capsys.readouterr().err
