"""User folders as data: layout detection, content-fingerprint caching, training on them."""
import json
import os
import pathlib
import subprocess
import sys
import time

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


_PREPARE = """
import json, os, sys, time
from configs import demo
from drivlm_jax.data import sources
config = demo.get_config("steps=1").data
config.update(width=64, height=36, cache_dir=sys.argv[1])
config.source.update(train=8, test=4)
config.target.update(train=8, test=4)
open(sys.argv[2] + "." + sys.argv[3], "w").close()     # ready
while not os.path.exists(sys.argv[2]):
  time.sleep(0.01)
data = sources.prepare(config, "unused")
print(json.dumps({str(k): str(v) for k, v in data.items()}))
"""


def test_processes_sharing_a_cache_build_it_once(tmp_path):
  """Hosts of one run on a shared filesystem prepare the same cache at the same moment: all
  succeed with the same datasets (without the lock, the later ones find a half-written sim)."""
  cache, go = tmp_path / "cache", tmp_path / "go"
  root = pathlib.Path(__file__).resolve().parents[1]
  procs = [subprocess.Popen([sys.executable, "-c", _PREPARE, str(cache), str(go), str(i)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(3)]
  deadline = time.time() + 300
  while time.time() < deadline and not all(os.path.exists(f"{go}.{i}") for i in range(3)):
    time.sleep(0.01)
  go.touch()                                   # all three start preparing at once
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n---\n".join(o[-2000:] for o in outputs)
  lines = [o.strip().splitlines()[-1] for o in outputs]
  assert lines[0] == lines[1] == lines[2]
  assert sum("waiting for another process" in o for o in outputs) >= 1
  for role in ("source", "target"):
    assert (cache / "sim" / role / ".done").exists()


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
