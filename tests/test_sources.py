"""User folders as data: layout detection, content-fingerprint caching, training on them."""
import json
import os

import pytest

from configs import nuscenes_to_bdd_oia
from drivlm_jax import train
from drivlm_jax.data import sources
from drivlm_jax.sim import bdd_oia as sim_bdd
from drivlm_jax.sim import nuscenes as sim_nuscenes


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("folders")
  bdd, nus = str(root / "bdd"), str(root / "nus")
  for split, n in (("train", 24), ("test", 8)):
    sim_bdd.write(bdd, "night", n, seed=3 + len(split), split=split, width=128, height=72)
  sim_nuscenes.write(nus, "day", 2, seed=0, split="train", width=128, height=72)
  sim_nuscenes.write(nus, "day", 1, seed=1, split="val", width=128, height=72)
  return bdd, nus


def test_layouts_are_detected(folders, tmp_path):
  bdd, nus = folders
  assert sources.detect_layout(bdd) == "bdd_oia"
  assert sources.detect_layout(nus) == "nuscenes_drive"
  with pytest.raises(sources.SourceError, match="neither a nuScenes layout"):
    sources.detect_layout(str(tmp_path))
  with pytest.raises(sources.SourceError, match="no such data folder"):
    sources.detect_layout(str(tmp_path / "nope"))


def test_folders_build_once_and_rebuild_when_changed(folders, tmp_path):
  bdd, nus = folders
  specs = sources.build_folder(nus, str(tmp_path))
  assert specs["train"].name == "nuscenes_drive/front"
  assert specs["test"].split == "val"          # no test split in this layout: val evaluates
  first = sources.fingerprint(bdd)
  assert sources.build_folder(bdd, str(tmp_path))["test"].split == "test"
  assert sources.fingerprint(bdd) == first     # building leaves the folder alone
  extra = os.path.join(bdd, "lastframe", "note.txt")
  with open(extra, "w") as f:
    f.write("changed")
  try:
    assert sources.fingerprint(bdd) != first
  finally:
    os.remove(extra)
  assert sources.fingerprint(bdd) == first


def test_cross_dataset_config_trains_on_user_folders(folders, tmp_path):
  bdd, nus = folders
  config = nuscenes_to_bdd_oia.get_config("method=drivlm_teacher,model=tiny,steps=2")
  config.model.reweight_layer = 1
  config.mixed_precision = False
  config.data.update(source_dir=nus, target_dir=bdd, cache_dir=str(tmp_path / "cache"),
                     workers=0, max_len=128)
  config.batch_size, config.mesh.fsdp = 4, 1
  for evaluator in config.evals.values():
    evaluator.batch_size = 8
  for name in ("source_answers", "target_answers"):
    config.evals[name].update(num=2, max_new_tokens=4)
  train.train(config, str(tmp_path / "run"))
  result = json.load(open(tmp_path / "run" / "eval.json"))
  assert result["step"] == 2 and set(result["test"]) == {"source", "target"}
  assert os.listdir(tmp_path / "cache" / "tfds") and all(
      d.startswith(("nuscenes_drive-", "bdd_oia-")) for d in os.listdir(tmp_path / "cache" /
                                                                       "tfds"))
