"""Run directories in a bucket: a real GCS API on 127.0.0.1 (tests/gcs.py) behind epath,
google-cloud-storage and Orbax's tensorstore. A run with `--workdir gs://...` keeps
everything in the bucket, resumes from it after SIGTERM, and evaluate and export read it;
ablations and reports run there too; dataset folders in a bucket are refused with the way
out."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from google.cloud import storage

from drivlm_jax import hf, pretrained
from drivlm_jax.data import sources
from tests import gcs
from tests.test_train import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10
DATA = ["--config.data.width=128", "--config.data.height=72", "--config.data.source.train=48",
        "--config.data.target.train=48", "--config.data.source.test=16",
        "--config.data.target.test=16", "--config.evals.source_answers.num=0",
        "--config.evals.target_answers.num=0"]


@pytest.fixture(scope="module")
def bucket():
  with gcs.emulator() as env:
    yield env


def _cli(module, args, cwd, log, env=None):
  """`python -m module args` with one CPU device; its output goes to the file `log`."""
  with open(log, "w") as out:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, stdout=out,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_NUM_CPU_DEVICES": "1", **(env or {})})


def _finish(proc, log, status=0) -> None:
  assert proc.wait(timeout=600) == status, pathlib.Path(log).read_text()[-4000:]


def _train(workdir, cache, cwd, log):
  return _cli("drivlm_jax.train",
              ["--config", f"{ROOT}/configs/demo.py:steps={STEPS}", "--workdir", str(workdir),
               f"--config.data.cache_dir={cache}", *DATA, "--config.batch_size=8",
               "--config.log_every_steps=1", "--config.checkpoint_every_steps=1000",
               "--config.eval_every_steps=1000"], cwd, log)


def _names(folder: str) -> list[str]:
  """What is in `folder` (under the bucket) now, read with google-cloud-storage: epath's
  gcsfs caches listings, and other processes wrote since."""
  blobs = storage.Client().list_blobs(gcs.BUCKET, prefix=f"{folder}/")
  return sorted({b.name[len(folder) + 1:].split("/")[0] for b in blobs})


def _bucket_metrics(path: epath.Path) -> dict:
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  return {row["step"]: row for row in rows}


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


def test_a_bucket_run_resumes_and_keeps_everything_in_the_bucket(bucket, tmp_path):
  del bucket
  cache, cwd, log = tmp_path / "cache", tmp_path / "cwd", tmp_path / "log.txt"
  cwd.mkdir()
  _finish(_train(tmp_path / "local", cache, cwd, log), log)
  run = "runs/demo"
  workdir = f"gs://{gcs.BUCKET}/{run}"
  remote = epath.Path(workdir)
  first = _train(workdir, cache, cwd, log)
  deadline = time.time() + 600
  while time.time() < deadline and first.poll() is None:
    if (remote / "metrics.jsonl").exists() and len(_bucket_metrics(remote / "metrics.jsonl")) >= 3:
      first.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  _finish(first, log, 128 + signal.SIGTERM)
  stopped_at = max(_bucket_metrics(remote / "metrics.jsonl"))
  assert 3 <= stopped_at < STEPS, f"not preempted mid-run (stopped at {stopped_at})"
  assert _names(f"{run}/checkpoints") == [str(stopped_at)]
  _finish(_train(workdir, cache, cwd, log), log)

  a, b = read_metrics(tmp_path / "local"), _bucket_metrics(remote / "metrics.jsonl")
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  for step in a:
    for key in ("loss", "loss_action", "loss_reason", "loss_lm", "grad_norm", "learning_rate"):
      assert a[step][key] == b[step][key], (step, key)   # bitwise, fp32 on CPU
  assert {"config.json", "metrics.jsonl", "eval.json", "checkpoints", "tb"} <= set(_names(run))
  assert str(STEPS) in _names(f"{run}/checkpoints")
  assert _names(f"{run}/tb")
  local_eval = json.loads((tmp_path / "local" / "eval.json").read_text())
  assert json.loads((remote / "eval.json").read_text()) == local_eval
  # Nothing of the run landed on local disk (the old `<cwd>/gs:/...`).
  assert not list(cwd.rglob("*")) and not (ROOT / "gs:").exists()

  (remote / "eval.json").unlink()
  _finish(_cli("drivlm_jax.evaluate", ["--config", f"{ROOT}/configs/demo.py", "--workdir",
                                       workdir, f"--config.data.cache_dir={cache}", *DATA],
               cwd, log), log)
  assert json.loads((remote / "eval.json").read_text()) == local_eval

  out = tmp_path / "deploy" / "student.onnx"
  _finish(_cli("export.to_onnx", ["--workdir", workdir, "--out", str(out)], ROOT, log), log)
  assert out.exists() and json.loads(out.with_suffix(".json").read_text())["run"] == workdir


def test_dataset_folders_in_a_bucket_are_refused_with_the_way_out(tmp_path):
  config = {"source_dir": "gs://bucket/bdd", "target_dir": "", "sim": True,
            "cache_dir": str(tmp_path)}
  with pytest.raises(sources.SourceError, match=r"source_dir=gs://bucket/bdd.*gcloud storage "
                                                r"cp -r gs://bucket/bdd"):
    sources.prepare(config, "gs://bucket/run")
  with pytest.raises(sources.SourceError, match="cache_dir=gs://b/c: .* local folder"):
    sources.cache_root({"cache_dir": "gs://b/c"}, "runs/x")
  assert sources.cache_root({}, "gs://bucket/run").startswith(os.path.expanduser("~"))


_SMALL_DEMO = """
from configs import demo
from experiments.demo import smoke_config


def get_config(arg=None):
  config = demo.get_config(arg)
  smoke_config(config)
  return config
"""


def test_ablations_and_their_report_run_in_a_bucket(bucket, tmp_path):
  """experiments.ablate with a gs:// workdir: runs, ablation report in the bucket; logs and
  data on local disk (~/.cache/drivlm_jax/<bucket>/<path>); experiments.report expands a
  quoted gs:// glob."""
  del bucket
  config, log = tmp_path / "small_demo.py", tmp_path / "log.txt"
  config.write_text(_SMALL_DEMO)
  workdir = f"gs://{gcs.BUCKET}/ablate"
  home = {"HOME": str(tmp_path / "home")}
  _finish(_cli("experiments.ablate", ["--config", str(config), "--workdir", workdir,
                                      "--seeds", "1", "--steps", "2", "--parallel", "2",
                                      "--only", "source_only,dann"], ROOT, log, home), log)
  remote = epath.Path(workdir)
  for name in ("source_only", "dann"):
    assert {"config.json", "metrics.jsonl", "eval.json"} <= set(_names(f"ablate/seed0/{name}"))
    local = tmp_path / "home" / ".cache" / "drivlm_jax" / gcs.BUCKET / "ablate" / "seed0" / name
    assert "target" in (local / "log.txt").read_text()        # its evaluation table
  assert (tmp_path / "home" / ".cache" / "drivlm_jax" / gcs.BUCKET / "ablate" / "data" / "sim"
          / "target" / ".done").exists()
  ablation = json.loads((remote / "ablation" / "results.json").read_text())
  assert set(ablation["methods"]) == {"source_only", "dann"}   # no teacher: none needed

  out = f"{workdir}/report"
  _finish(_cli("experiments.report", [f"{workdir}/seed*/*", "--out", out], ROOT, log), log)
  results = json.loads((epath.Path(out) / "results.json").read_text())
  assert results["methods"] == ablation["methods"]
  evaluation = json.loads((remote / "seed0" / "dann" / "eval.json").read_text())["test"]
  assert results["methods"]["dann"]["target"] == {k: [v] for k, v in
                                                     evaluation["target"].items()}


def test_hf_checkpoints_in_a_bucket_are_refused_with_the_way_out(bucket):
  """A LLaVA or a vision tower in a bucket (init_from, init_vision, a teacher) is named, with
  the command that copies it, not read as a run directory."""
  del bucket
  for name, model_type in (("llava", "llava"), ("clip", "clip_vision_model")):
    (epath.Path(f"gs://{gcs.BUCKET}/models/{name}") / "config.json").write_text(
        json.dumps({"model_type": model_type}))
  llava, clip = f"gs://{gcs.BUCKET}/models/llava", f"gs://{gcs.BUCKET}/models/clip"
  assert hf.model_type(llava) == "llava" and pretrained.is_llava(llava)
  way_out = r"read from a local folder.*gcloud storage cp -r {}"
  with pytest.raises(hf.CheckpointError, match=way_out.format(llava)):
    pretrained.model_fields(init_from=llava)
  with pytest.raises(hf.CheckpointError, match=way_out.format(clip)):
    pretrained.model_fields(init_vision=clip)
