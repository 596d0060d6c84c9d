"""The trainer: sharding equivalence, resume after SIGTERM, a non-finite loss, logs."""
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo
from drivlm_jax import pretrained, run as run_lib, train
from drivlm_jax.adapt import fourier
from drivlm_jax.data import sources
from drivlm_jax.model import vlm

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def small_config(cache, arg="steps=5", **overrides):
  config = demo.get_config(arg)
  config.unlock()
  config.data.cache_dir = cache
  config.data.width, config.data.height = 128, 72
  config.data.source.update(train=48, test=16)
  config.data.target.update(train=48, test=16)
  config.data.target_fraction = 0.25
  config.batch_size = 8
  config.log_every_steps = 1
  for name in ("source_answers", "target_answers"):   # no generation: the slow evaluator
    del config.evals[name]
  for evaluator in config.evals.values():
    evaluator.batch_size = 16
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return config


def read_metrics(workdir):
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows[row["step"]] = row   # a step logged twice (before and after a resume): keep last
  return rows


@pytest.fixture(scope="module")
def single_device_run(cache, tmp_path_factory):
  """The 5-step run on one device that every mesh is compared with (trained once)."""
  workdir = tmp_path_factory.mktemp("single")
  train.train(small_config(cache, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}),
              str(workdir))
  return workdir


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_training_equals_single_device(cache, single_device_run, tmp_path, mesh):
  assert jax.device_count() == 8
  sharded = small_config(cache, **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1],
                                   "mesh.tensor": mesh[2]})
  train.train(sharded, str(tmp_path / "sharded"))
  a, b = read_metrics(single_device_run), read_metrics(tmp_path / "sharded")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
  for step in a:
    assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, (step, a[step], b[step])


def test_fsdp_divides_parameter_bytes(cache):
  from drivlm_jax import parallel
  from drivlm_jax.model import vlm
  config = small_config(cache)
  cfg = run_lib.model_config(config)
  shapes = jax.eval_shape(lambda k: vlm.init(cfg, k), jax.random.key(0))
  total = sum(x.size * 4 for x in jax.tree.leaves(shapes))
  per_device = {}
  for mesh_shape in [(8, 1, 1), (1, 8, 1), (1, 4, 2)]:
    mesh = parallel.make_mesh(dict(zip(parallel.AXES, mesh_shape)))
    shardings = parallel.param_shardings(vlm.logical_axes(cfg), mesh, parallel.DEFAULT_RULES)
    params = jax.jit(lambda k: vlm.init(cfg, k), out_shardings=shardings)(jax.random.key(0))
    sizes = []
    for x, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
        shardings, is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))):
      split = np.prod([mesh.shape[a] for axes in spec.spec if axes
                       for a in ((axes,) if isinstance(axes, str) else axes)])
      shard = x.addressable_shards[0].data
      assert shard.size == x.size // split, (x.shape, spec.spec, shard.shape)
      sizes.append(shard.size * 4)
    per_device[mesh_shape] = sum(sizes)
  assert per_device[(8, 1, 1)] == total                     # pure data parallel: replicated
  assert per_device[(1, 8, 1)] < 0.2 * total                # FSDP over 8: about 1/8 each
  assert per_device[(1, 4, 2)] < 0.2 * total


def _run_cli(workdir, cache, steps, method="source_only"):
  args = [sys.executable, "-m", "drivlm_jax.train", "--config",
          f"configs/demo.py:steps={steps},method={method}",
          "--workdir", str(workdir), f"--config.data.cache_dir={cache}",
          "--config.data.width=128", "--config.data.height=72",
          "--config.data.source.train=48", "--config.data.target.train=48",
          "--config.data.source.test=16", "--config.data.target.test=16",
          "--config.batch_size=8", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=1000", "--config.eval_every_steps=1000",
          "--config.evals.source_answers.num=0", "--config.evals.target_answers.num=0"]
  return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "JAX_NUM_CPU_DEVICES": "1"})


def test_the_same_command_is_byte_identical_and_a_resumed_run_repeats_it(cache, tmp_path):
  """Two processes, side by side, run the same 30-step command (the DriVLM teacher: the
  discriminators, the gradient reversal and the gates too). The second is stopped by SIGTERM
  mid-run and run again: it resumes from its checkpoint, and the two runs' eval.json and
  logged rows (less wall-clock fields) are byte-identical."""
  steps, method = 30, "drivlm_teacher"
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  runs = [_run_cli(straight, cache, steps, method), _run_cli(interrupted, cache, steps, method)]
  metrics = interrupted / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and runs[1].poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      runs[1].send_signal(signal.SIGTERM)
      break
    time.sleep(0.005)
  assert runs[0].wait(timeout=600) == 0, runs[0].stdout.read()
  # Stopped, not finished: the exit status says so (a scheduler must not take it for done).
  assert runs[1].wait(timeout=600) == 128 + signal.SIGTERM, runs[1].stdout.read()
  stopped_at = max(read_metrics(interrupted))
  assert 5 <= stopped_at < steps, f"not preempted mid-run (stopped at {stopped_at})"
  assert sorted(os.listdir(interrupted / "checkpoints")) == [str(stopped_at)]
  assert not (interrupted / "eval.json").exists()
  again = _run_cli(interrupted, cache, steps, method)
  assert again.wait(timeout=600) == 0, again.stdout.read()

  first, second = ((d / "eval.json").read_bytes() for d in (straight, interrupted))
  assert first == second
  assert json.loads(first)["test"]["target"]["action_mAP"] > 0
  rows = [{step: {k: v for k, v in row.items() if k not in ("time", "examples_per_s")}
           for step, row in read_metrics(d).items()} for d in (straight, interrupted)]
  assert sorted(rows[0]) == list(range(1, steps + 1))
  assert rows[0] == rows[1]                                  # bitwise, fp32 on CPU
  assert {"loss_da_image", "loss_da_token", "grad_norm"} <= set(rows[0][steps])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cache, tmp_path,
                                                                  monkeypatch):
  real = train.train_batches

  def poisoned(config, data, feats, start):
    for step, batch in enumerate(real(config, data, feats, start), start=start + 1):
      if step == 6:
        batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
      yield batch

  monkeypatch.setattr(train, "train_batches", poisoned)
  config = small_config(cache, total_steps=10, checkpoint_every_steps=4)
  with pytest.raises(train.NonFiniteLoss,
                     match=r"non-finite loss or gradient \(loss nan\) at step 6.*step 4"):
    train.train(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
  rows = read_metrics(tmp_path)
  assert max(rows) == 5 and all(np.isfinite(r["loss"]) for r in rows.values())
  # The kept checkpoint is good: the run resumes from it (with clean data) to the end.
  monkeypatch.setattr(train, "train_batches", real)
  train.train(config, str(tmp_path))
  assert max(read_metrics(tmp_path)) == 10


@pytest.mark.parametrize("key,value,message", [
    ("total_steps", -5, r"config.total_steps is -5: at least 1"),
    ("checkpoint_every_steps", 0, r"config.checkpoint_every_steps is 0"),
    ("data.target_fraction", 1.5, r"config.data.target_fraction is 1.5: must be in \[0, 1\)"),
    ("batch_size", 7, r"config.batch_size 7 does not divide over the 8 devices"),
    ("data.target_fraction", 0.05, r"target_fraction 0.05 of a batch of 8 rounds to no target"),
])
def test_values_no_run_can_use_are_named_before_anything_is_written(cache, tmp_path, key, value,
                                                                     message):
  with pytest.raises(ValueError, match=message):
    train.train(small_config(cache, **{key: value}), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/demo.py", "--config.optimizer.learning_rat=0.1"],
     "error: --config.optimizer.learning_rat: the config has no key 'learning_rat'"),
    (["--config", "configs/demo.py:stpes=2"], "error: --config: unknown config arg 'stpes'"),
    (["--config", "configs/dmeo.py"], "error: --config: [Errno 2] No such file or directory: "
                                      "'configs/dmeo.py'"),
    (["--config", "configs/demo.py", "--config.total_steps=0"],
     "error: config.total_steps is 0: at least 1"),
    (["--config", "configs/demo.py", "--workdir", "README.md"],
     "error: --workdir README.md is a file"),
])
def test_a_wrong_config_is_one_line_naming_it(tmp_path, args, message):
  workdir = [] if "--workdir" in args else ["--workdir", str(tmp_path)]
  result = subprocess.run(
      [sys.executable, "-m", "drivlm_jax.train", *args, *workdir],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "checkpoints").exists()


def test_a_cut_run_file_is_an_error_naming_it(tmp_path):
  (tmp_path / "config.json").write_text('{"total_steps": 6, "mod')
  with pytest.raises(run_lib.RunError, match=r"config.json: not valid JSON"):
    run_lib.read_config(str(tmp_path))


def test_checkpoint_restores_onto_another_mesh(cache, tmp_path, monkeypatch):
  straight = small_config(cache, total_steps=8)
  train.train(straight, str(tmp_path / "straight"))
  real = train.train_batches

  def preempt_at_step_5(config, data, feats, start):
    for step, batch in enumerate(real(config, data, feats, start), start=start + 1):
      if step == 5:
        os.kill(os.getpid(), signal.SIGTERM)   # a real SIGTERM, handled after this step
      yield batch

  monkeypatch.setattr(train, "train_batches", preempt_at_step_5)
  with pytest.raises(train.Preempted, match="after step 5 of 8"):
    train.train(small_config(cache, total_steps=8, **{"mesh.data": 8}), str(tmp_path / "moved"))
  assert max(read_metrics(tmp_path / "moved")) == 5
  monkeypatch.setattr(train, "train_batches", real)
  train.train(small_config(cache, total_steps=8, **{"mesh.data": 1, "mesh.fsdp": 4,
                                                    "mesh.tensor": 2}), str(tmp_path / "moved"))
  a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "moved")
  assert sorted(b) == list(range(1, 9))
  for step in a:
    assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, step


def test_domain_adversarial_training_runs_on_mixed_batches(cache, tmp_path):
  config = small_config(cache, total_steps=6, **{
      "data.target_fraction": 0.5, "loss.da_image": 0.1, "loss.da_token": 0.1,
      "loss.da_instance": 0.1, "loss.da_consistency": 0.1, "da.focal_gamma": 2.0, "da.start": 0.0, "mesh.data": 2,
      "mesh.fsdp": 2, "mesh.tensor": 2})
  train.train(config, str(tmp_path))
  rows = read_metrics(tmp_path)
  assert sorted(rows) == list(range(1, 7))
  for key in ("loss_da_image", "loss_da_token", "loss_da_instance", "loss_da_consistency"):
    assert all(np.isfinite(r[key]) for r in rows.values()), key
  lams = [rows[s]["da_lambda"] for s in sorted(rows)]
  assert lams[0] == 0.0 and all(b > a for a, b in zip(lams, lams[1:]))   # DANN ramp
  assert rows[1]["loss_da_token"] == pytest.approx(math.log(2), abs=0.2)  # chance at the start


def test_clip_stage_then_a_warm_started_distilled_student(cache, tmp_path):
  """The stages chain: clip_finetune -> a student warm-started from it and distilled from a
  teacher run (here the same run, frozen)."""
  clip_dir = str(tmp_path / "clip")
  config = small_config(cache, "method=clip_finetune,steps=4", **{"data.target_fraction": 0.5})
  train.train(config, clip_dir)
  rows = read_metrics(clip_dir)
  # Contrastive loss only: the total is the clip term; the task terms have weight 0, so the
  # step neither computes nor logs them (and never runs the LM).
  assert all(r["loss"] == pytest.approx(r["loss_clip"], rel=1e-5) for r in rows.values())
  assert all(not {"loss_action", "loss_reason", "loss_lm"} & set(r) for r in rows.values())
  # The sim's instructions: five templates, on both domains.
  assert all(1 < r["clip_captions"] <= 5 and r["clip_cross_domain"] > 0.5
             for r in rows.values())

  cfg = run_lib.model_config(demo.get_config(f"method=drivlm,teacher={clip_dir},init={clip_dir}"))
  params = jax.jit(lambda k: vlm.init(cfg, k))(jax.random.key(5))
  warm = pretrained.start(params, cfg, {"init_from": clip_dir})
  source, _ = run_lib.load_params(clip_dir, run_lib.model_config(
      run_lib.read_config(clip_dir)))
  for a, b in zip(jax.tree.leaves(warm["vision"]), jax.tree.leaves(source["vision"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(warm["reweighting"]), jax.tree.leaves(params["reweighting"])):
    np.testing.assert_array_equal(a, b)        # not in the clip run: stays fresh

  student_dir = str(tmp_path / "student")
  config = small_config(cache, f"method=drivlm,teacher={clip_dir},init={clip_dir},steps=3",
                        **{"data.target_fraction": 0.5, "evals.target.keep_ratio": 0.25})
  train.train(config, student_dir)
  rows = read_metrics(student_dir)
  for key in ("loss_kd_heads", "loss_kd_relation", "loss_kd_pruned", "loss_kd_lm",
              "loss_kd_feature", "loss_da_token"):
    assert np.isfinite(rows[3][key]), key
  # The teacher and the student start from the same weights: logit KD starts near 0, and
  # their heads rank the batch's images alike.
  assert rows[1]["loss_kd_heads"] < 0.05 and rows[1]["loss_kd_lm"] < 0.05
  assert rows[1]["loss_kd_relation"] < 0.01
  assert rows[1]["loss_kd_pruned"] > 0.05   # the pruned student is not the teacher


def test_ema_is_the_moving_average_of_the_params(cache):
  config = small_config(cache)
  cfg = run_lib.model_config(config)
  params = vlm.init(cfg, jax.random.key(0))
  tx = optax.sgd(0.1)
  step = jax.jit(train.make_train_step(cfg, tx, dict(config.loss), ema_decay=0.75))
  ema = jax.tree.map(lambda x: x + 1.0, params)     # any earlier average
  state = {"step": jnp.int32(3), "params": params, "opt_state": tx.init(params), "ema": ema}
  data = sources.prepare(config.data, cache)
  feats = run_lib.features(config, cfg, data["tokenizer"])
  batch = next(iter(train.train_batches(config, data, feats, 0)))
  batch = {k: batch[k] for k in train.BATCH_KEYS}
  new, _ = step(state, batch, {})
  for e0, p1, e1 in zip(jax.tree.leaves(ema), jax.tree.leaves(new["params"]),
                        jax.tree.leaves(new["ema"])):
    # The 4th update: debiased decay 0.75 (1 - 0.75^3) / (1 - 0.75^4) (test_optim: optax's).
    d = 0.75 * (1 - 0.75 ** 3) / (1 - 0.75 ** 4)
    np.testing.assert_allclose(e1, d * np.asarray(e0) + (1 - d) * np.asarray(p1), atol=1e-6)


def test_fda_restyles_the_batch_before_the_step(cache):
  """`config.fda` on: the step is the plain step on the restyled batch (source rows in the
  style of target rows), not the step on the batch as read."""
  config = small_config(cache, "method=drivlm_teacher,steps=5,fda=0.1")
  cfg = run_lib.model_config(config)
  params = vlm.init(cfg, jax.random.key(0))
  tx = optax.sgd(0.1)
  state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}
  data = sources.prepare(config.data, cache)
  feats = run_lib.features(config, cfg, data["tokenizer"])
  batch = next(iter(train.train_batches(config, data, feats, 0)))
  batch = {k: batch[k] for k in train.BATCH_KEYS}
  assert 0 < batch["domain"].sum() < len(batch["domain"])
  restyle = fourier.from_config(config, cfg)
  weights = {"action": 1.0, "reason": 1.0}
  _, fda = jax.jit(train.make_train_step(cfg, tx, weights, restyle=restyle))(state, batch, {})
  plain = jax.jit(train.make_train_step(cfg, tx, weights))
  _, restyled = plain(state, {**batch, "image": restyle(batch["image"], batch["domain"])}, {})
  _, as_read = plain(state, batch, {})
  np.testing.assert_allclose(fda["loss"], restyled["loss"], rtol=1e-6)
  assert abs(float(fda["loss"]) - float(as_read["loss"])) > 1e-4
  assert fourier.from_config(demo.get_config("method=drivlm_teacher"), cfg) is None
  with pytest.raises(ValueError, match="config.fda.fraction"):
    fourier.from_config(demo.get_config("method=drivlm_teacher,fda=0.1,fda_fraction=0"), cfg)


def test_resuming_with_another_total_steps_is_an_error_and_unlogged_rows_go(cache, tmp_path,
                                                                          monkeypatch):
  """A checkpointed run resumed with another total_steps would splice two schedules: an
  error naming both; with another model, an error naming the checkpoint, and the run's
  config.json stays its own (a finished run's too, re-evaluated with another learning rate).
  Rows logged past the checkpoint (a run killed before its next save, the last one cut
  mid-row) are dropped when it resumes, so each step is logged once. A relative data cache
  is stored absolute, and the same folder named either way is the same config; other image
  statistics than the run's are an error."""
  monkeypatch.chdir(os.path.dirname(cache))
  relative = small_config(os.path.basename(cache), total_steps=6, checkpoint_every_steps=3)
  train.train(relative, str(tmp_path))
  stored = (tmp_path / "config.json").read_bytes()
  assert json.loads(stored)["data"]["cache_dir"] == cache
  config = small_config(cache, total_steps=6, checkpoint_every_steps=3)
  assert run_lib.config_changes(str(tmp_path), config) == []
  assert run_lib.config_changes(str(tmp_path), relative) == []
  threads = small_config(cache, total_steps=6, checkpoint_every_steps=3,
                         **{"data.read_threads": 3, "data.workers": 2})
  assert run_lib.config_changes(str(tmp_path), threads) == []   # the same batches
  wider = small_config(cache, total_steps=6, checkpoint_every_steps=3,
                       **{"model.head_hidden": config.model.head_hidden * 2})
  with pytest.raises(run_lib.RunError, match=r"checkpoints/6: cannot restore it .*steps "
                                             r"there: \[3, 6\]"):
    train.train(wider, str(tmp_path))
  train.train(small_config(cache, total_steps=6, checkpoint_every_steps=3,
                           **{"optimizer.learning_rate": 0.5}), str(tmp_path))
  assert (tmp_path / "config.json").read_bytes() == stored
  other_frames = small_config(cache, total_steps=6, checkpoint_every_steps=3,
                              **{"model.vision.image_mean": (0.4, 0.4, 0.4)})
  with pytest.raises(run_lib.RunError, match=r"normalised with mean, std \(\(0.48145466, "
                                             r".*resuming it with \(\(0.4, 0.4, 0.4\)"):
    train.train(other_frames, str(tmp_path))
  longer = small_config(cache, total_steps=12, checkpoint_every_steps=3)
  with pytest.raises(run_lib.RunError, match=r"total_steps 6; resuming it with 12 would "
                                             r"splice"):
    train.train(longer, str(tmp_path))
  shorter = small_config(cache, total_steps=3, checkpoint_every_steps=3)
  with pytest.raises(run_lib.RunError, match=r"step 6, past total_steps 3"):
    train.train(shorter, str(tmp_path))
  # As if killed after logging steps 4-6 with only checkpoint 3 saved.
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "lo')
  train.train(config, str(tmp_path))
  steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text()
           .splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]


def test_a_sigterm_during_the_last_step_finishes_the_run(cache, tmp_path, monkeypatch):
  """Signalled while the last step runs: the run is complete (saved, evaluated), so it ends
  as finished, not as stopped (no Preempted, the CLI's exit 0)."""
  real = train.train_batches

  def signalled_last(config, data, feats, start):
    for step, batch in enumerate(real(config, data, feats, start), start=start + 1):
      if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  monkeypatch.setattr(train, "train_batches", signalled_last)
  train.train(small_config(cache, total_steps=3), str(tmp_path))
  assert json.loads((tmp_path / "eval.json").read_text())["step"] == 3


@pytest.mark.parametrize("signum,by", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_a_sigterm_during_the_set_up_stops_after_the_first_step(cache, tmp_path, monkeypatch,
                                                                  signum, by):
  """A SIGTERM while the run prepares its data (an experiments.jobs worker stopped between
  runs' set-ups) is not lost: the run takes one step, saves it and stops. A Ctrl-C does the
  same (a second one would quit unsaved)."""
  real, before = sources.prepare, signal.getsignal(signal.SIGINT)

  def signalled(*args):
    os.kill(os.getpid(), signum)
    return real(*args)
  monkeypatch.setattr(sources, "prepare", signalled)
  with pytest.raises(train.Preempted, match=f"stopped by {by} after step 1 of 6"):
    train.train(small_config(cache, total_steps=6, checkpoint_every_steps=100), str(tmp_path))
  assert signal.getsignal(signal.SIGINT) is before   # given back
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  assert max(read_metrics(tmp_path)) == 1
