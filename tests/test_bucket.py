"""Run directories in a bucket: a real GCS API on 127.0.0.1 (tests/gcs.py) behind epath and
Orbax's tensorstore, and the refusal of dataset folders that the builders cannot read."""
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from drivlm_jax.data import sources
from tests import gcs


@pytest.fixture(scope="module")
def bucket():
  with gcs.emulator() as env:
    yield env


def test_epath_and_orbax_round_trip(bucket):
  del bucket
  folder = epath.Path(f"gs://{gcs.BUCKET}/roundtrip")
  (folder / "a.txt").write_text("hello")
  assert [p.name for p in folder.iterdir()] == ["a.txt"]
  manager = ocp.CheckpointManager(str(folder / "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(3, args=ocp.args.StandardSave({"w": jnp.arange(4.0)}))
  manager.wait_until_finished()
  restored = manager.restore(3, args=ocp.args.StandardRestore({"w": jnp.zeros(4)}))
  manager.close()
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))


def test_dataset_folders_in_a_bucket_are_refused_with_the_way_out(tmp_path):
  config = {"source_dir": "gs://bucket/bdd", "target_dir": "", "sim": True,
            "cache_dir": str(tmp_path)}
  with pytest.raises(sources.SourceError, match=r"source_dir=gs://bucket/bdd.*gcloud storage "
                                                r"cp -r gs://bucket/bdd"):
    sources.prepare(config, "gs://bucket/run")
  with pytest.raises(sources.SourceError, match="cache_dir=gs://b/c: .* local folder"):
    sources.cache_root({"cache_dir": "gs://b/c"}, "runs/x")
  assert sources.cache_root({}, "gs://bucket/run").startswith(os.path.expanduser("~"))
