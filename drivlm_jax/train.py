r"""Trains a config: `python -m drivlm_jax.train --config configs/X.py[:arg] --workdir DIR
[--config.key=value ...]`. Re-running the same command resumes from DIR/checkpoints.

One jitted step over a (data, fsdp, tensor) mesh with donated state; the host prepares the
next batch while a step runs. Orbax checkpoints (async, max_to_keep, train state + data
position + config), saved on SIGTERM (with several hosts, at a step they all agree on); a
non-finite loss stops the run and leaves the last good checkpoint alone. Writes
DIR/config.json, DIR/metrics.jsonl, TensorBoard events in DIR/tb, and DIR/eval.json; DIR may
be a bucket (gs://...), read and written through etils.epath.
"""
if __name__ == "__main__":  # before JAX loads: the restarted process loads it once
  from drivlm_jax import host
  host.restart_with_tunables()

import json
import math
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import optax
import tqdm
from absl import app, flags, logging

from drivlm_jax import adapt, evaluate, host, lora, optim, parallel, pretrained, run as run_lib
from drivlm_jax.adapt import fourier
from drivlm_jax.data import pipeline, sources
from drivlm_jax.losses import task
from drivlm_jax.model import vlm

BATCH_KEYS = ("image", "input_ids", "attention_mask", "targets", "loss_mask", "actions",
              "reasons", "action_mask", "reason_mask", "instruction_ids", "instruction_mask",
              "boxes", "box_mask", "box_camera", "domain", "caption_ids", "caption_mask")


class NonFiniteLoss(RuntimeError):
  pass


class Preempted(RuntimeError):
  """A SIGTERM (or, on one host, a first Ctrl-C) stopped the run after a step, whose
  checkpoint is saved: the same command resumes it. The CLI exits with `run.PREEMPTED_EXIT`
  (128 + SIGTERM) either way, so that a scheduler or sweep does not take the run for a
  finished one."""


def step_compiler_options(*compute_dtypes) -> dict:
  """XLA compile options for a train step whose model computes in `compute_dtypes`.

  On CPU with a bf16 (or fp16) compute dtype: no while-loop invariant code motion. XLA's
  CPU backend computes bf16 elementwise ops and the attention's matmuls in float32, and the
  pass hoists the float32 conversion of the bf16 activations saved by the forward scan out
  of the backward's layer loop: whole stacks converted before it starts (0.5 GB of copies
  for CLIP ViT-B/16 at batch 8) instead of one layer's slice per iteration. Measured on a
  2-core Intel Xeon: that step 2.6 -> 2.4 s alone, 3.8 -> 2.6 s alternated with torch's
  (`python -m experiments.bench_train --cases vit_b16_bf16`); the demo VLM's step in bf16
  269 -> 300 examples/s. In float32 nothing is converted and the pass pays: the demo VLM's
  float32 step is 12% slower without it. jaxlib 0.11.2 and 0.12.0.1 keep the stacks bf16
  with the pass on, so they get no option (`tests/test_scan_options.py` checks both ways).
  """
  low_precision = any(jnp.dtype(d) != jnp.float32 for d in compute_dtypes)
  if jax.default_backend() == "cpu" and low_precision and host.jaxlib_version() < (0, 11):
    return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
  return {}


def make_train_step(cfg, tx, weights, components=(), ema_decay=0.0, view=lambda p: p,
                    restyle=None):
  """One optimizer step: `train_step(state, batch, frozen) -> (state, metrics)`.

  The loss is `sum(weights[name] * value)` over the task terms (action, reason, lm) and the
  terms of every component (`adapt.build`); a term whose weight is 0 is not computed, and the
  LM runs only when a term reads it. `frozen` holds each component's frozen params (the
  distillation teacher) by component name. With `ema_decay` > 0 the state also carries an
  exponential moving average of the params ("ema"), which evaluation, distillation and warm
  starts use: adversarial training moves the target accuracy a lot from step to step, and
  the average is what a run is judged by. `view` maps the trained params to the ones the
  model and losses see (frozen parts without gradients, LoRA merged: `model_view`).
  `restyle(images, domain) -> images`, if given, redraws the batch's images first (Fourier
  domain adaptation: source rows in a target row's style, `adapt.fourier`); the task, every
  component and the teacher see the restyled batch.
  """
  task_terms = tuple(t for t in task.TERMS if weights.get(t, 0.0))
  needs_lm = "lm" in task_terms or any(c.needs_lm for c in components)

  def train_step(state, batch, frozen):
    if restyle is not None:
      batch = {**batch, "image": restyle(batch["image"], batch["domain"])}

    def loss_fn(trained):
      params = view(trained)
      out = vlm.apply(cfg, params, batch["image"], batch["input_ids"] if needs_lm else None,
                      batch["attention_mask"], batch["instruction_ids"],
                      batch["instruction_mask"])
      losses = task.task_losses(out, batch, task_terms)
      total = sum(weights[k] * v for k, v in losses.items())
      ctx = adapt.Context(params, out, batch, state["step"], frozen, metrics={})
      for component in components:
        terms = {k: v for k, v in component.loss(ctx).items() if weights.get(k, 0.0)}
        total = total + sum(weights[k] * v for k, v in terms.items())
        losses.update(terms)
      return total, (losses, ctx.metrics)
    (total, (losses, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": total, **{f"loss_{k}": v for k, v in losses.items()}, **extra,
               "grad_norm": optax.tree.norm(grads)}
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if ema_decay:
      new_state["ema"] = update_ema(tx, state["ema"], params, opt_state, ema_decay,
                                    new_state["step"])
    return new_state, metrics
  return train_step


def update_ema(tx, ema, params, opt_state, decay: float, step):
  """The moving average after a step: moved towards `params` when the step applied an update
  (every step; with gradient accumulation, every k-th: the decay is per update).

  Debiased, as Adam's moments (`optax.ema(debias=True)`): after t updates the average is
  sum_i (1 - d) d^(t-i) params_i / (1 - d^t), so the params the run started from keep no
  weight (plain decay d left them d^t: 37% after 100 updates at d = 0.99). Each update
  moves it with decay_t = d (1 - d^(t-1)) / (1 - d^t); the first sets it to the params.
  `step`: batches done, this one included.
  """
  multi = isinstance(tx, optax.MultiSteps)
  t = jnp.maximum(opt_state.gradient_step if multi else step, 1).astype(jnp.float32)
  decay_t = decay * (1.0 - decay ** (t - 1.0)) / (1.0 - decay ** t)
  moved = jax.tree.map(lambda p, e: (decay_t * e + (1.0 - decay_t) * p).astype(e.dtype),
                       params, ema)
  if not multi:
    return moved
  updated = tx.has_updated(opt_state)
  return jax.tree.map(lambda new, old: jnp.where(updated, new, old), moved, ema)


def model_view(config, labels):
  """params -> what the model sees: parts the optimizer freezes (`labels` "frozen") without
  gradients, so the backward pass skips their weight gradients, and LoRA merged in."""
  def view(params):
    params = jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p,
                          params, labels)
    return lora.merge(params, config.get("lora"))
  return view


def optimizer_config(config, shapes):
  """config.optimizer, with the kernels LoRA adapts (`shapes["lora"]`) frozen, first in
  `parts`."""
  opt = config.optimizer.copy_and_resolve_references()
  if lora.enabled(config.get("lora")):
    with opt.unlocked():
      opt.parts = [{"pattern": lora.frozen_pattern(lora.adapted(shapes)),
                    "freeze": True}] + [dict(p) for p in opt.get("parts", [])]
  return opt


def train_batches(config, data, feats, start: int):
  """This host's training batches from step `start` on."""
  d = config.data
  target = data["target", "train"] if d.target_fraction > 0 else None
  return pipeline.batches(
      data["source", "train"], feats, config.batch_size // jax.process_count(), target=target,
      target_fraction=d.target_fraction, target_labelled=d.target_labelled, seed=config.seed,
      start=start, workers=d.workers, threads=d.read_threads)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole run; returns the last evaluation. A SIGTERM (on one host also a Ctrl-C) from
  its start on (during the set-up too: data, init, restore, compiles) stops it after the next
  step, saved, and raises `Preempted`."""
  parallel.maybe_initialize_distributed(config.get("multihost"))
  preemption = _Preemption()
  try:
    return _train(config, workdir, preemption)
  finally:
    preemption.close()


def check_config(config):
  """Values no run can use, each named by its key (before anything is built or written)."""
  for key in ("total_steps", "batch_size", "log_every_steps", "checkpoint_every_steps",
              "eval_every_steps"):
    if config[key] < 1:
      raise ValueError(f"config.{key} is {config[key]}: at least 1")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size {config.batch_size} (the global batch) does not "
                     f"divide over {jax.process_count()} hosts")
  if not 0 <= config.data.target_fraction < 1:
    raise ValueError(f"config.data.target_fraction is {config.data.target_fraction}: must be "
                     f"in [0, 1)")
  if config.data.target_fraction > 0:   # the pipeline's own rule, checked before the set-up
    pipeline.target_rows(config.batch_size // jax.process_count(), jax.process_count(),
                         config.data.target_fraction)


def _check_batch_shards(config, mesh, sharding):
  shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(sharding.spec)[:1]))
  if config.batch_size % shards:
    raise ValueError(f"config.batch_size {config.batch_size} does not divide over the "
                     f"{shards} devices the batch is split over (config.mesh "
                     f"{dict(mesh.shape)})")


def _train(config, workdir: str, preemption) -> dict:
  #### Set up
  check_config(config)
  if run_lib.path(workdir).exists() and not run_lib.path(workdir).is_dir():
    raise ValueError(f"--workdir {workdir} is a file: give a run directory (new or existing)")
  config = run_lib.absolute_paths(pretrained.configure(config))
  checkpoints = run_lib.Checkpoints(workdir, config)
  if checkpoints.latest_step() is not None:
    run_lib.check_resume(workdir, config, checkpoints.latest_step())
  cfg = run_lib.model_config(config)
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.rules_from_config(config.get("rules"))
  _check_batch_shards(config, mesh, parallel.batch_sharding(mesh, rules))
  data = sources.prepare(config.data, workdir)
  feats = run_lib.features(config, cfg, data["tokenizer"])
  evaluators = evaluate.from_config(config)

  #### Set up model, DriVLM components and optimizer, sharded by the logical-axis rules
  components = adapt.build(config, cfg, feats)
  axes = vlm.logical_axes(cfg)
  frozen = {}
  for c in components:
    if c.param_key:
      axes[c.param_key] = c.logical_axes()
    if c.frozen() is not None:
      frozen[c.name] = jax.device_put(c.frozen(), parallel.param_shardings(c.frozen_axes(),
                                                                           mesh, rules))
  param_shardings = parallel.param_shardings(axes, mesh, rules)

  use_lora = lora.enabled(config.get("lora"))
  if use_lora:
    shapes = jax.eval_shape(lambda k: vlm.init(cfg, k), jax.random.key(0))
    axes["lora"] = lora.logical_axes(config.lora, shapes, axes)
    param_shardings = parallel.param_shardings(axes, mesh, rules)

  def init_params(key):
    params = vlm.init(cfg, key)
    if use_lora:
      params["lora"] = lora.init(config.lora, params, jax.random.fold_in(key, lora.KEY_INDEX))
    for c in components:
      if c.param_key:
        params[c.param_key] = c.init(jax.random.fold_in(key, c.key_index))
    return params

  init = jax.jit(init_params, out_shardings=param_shardings)
  with jax.set_mesh(mesh):
    try:
      params = init(jax.random.key(config.seed))
    except ValueError:   # a dimension the mesh cannot split: say which param and axis
      parallel.check_shardable(jax.eval_shape(init_params, jax.random.key(0)),
                               param_shardings, axes)
      raise
  if checkpoints.latest_step() is None:   # resuming restores them: no pretrained load
    params = pretrained.start(params, cfg, config)
  opt_config = optimizer_config(config, params)
  tx = optim.make(opt_config, params, config.total_steps)
  view = model_view(config, optim.part_labels(params, [dict(p) for p in opt_config.parts]))
  opt_shardings = parallel.like_params(jax.eval_shape(tx.init, params), params, mesh)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  step0 = jax.device_put(jnp.zeros((), jnp.int32), parallel.replicated(mesh))
  state = {"step": step0, "params": params, "opt_state": opt_state}
  ema_decay = float(config.get("ema_decay", 0.0))
  if ema_decay:
    state["ema"] = jax.tree.map(jnp.copy, params)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  train_step = jax.jit(make_train_step(cfg, tx, dict(config.loss), components, ema_decay, view,
                                       fourier.from_config(config, cfg)),
                       in_shardings=(state_shardings, batch_sharding,
                                     jax.tree.map(lambda x: x.sharding, frozen)),
                       out_shardings=(state_shardings, parallel.replicated(mesh)),
                       donate_argnums=0,
                       compiler_options=step_compiler_options(cfg.vision.dtype,
                                                              cfg.language.dtype))
  eval_key = run_lib.eval_key(config)
  eval_params = lambda s: lora.merge(s[eval_key], config.get("lora"))   # what is evaluated

  # Several hosts evaluate together, each on its shard, batches placed like training's.
  eval_place = ((lambda b: parallel.put_batch(b, batch_sharding))
                if jax.process_count() > 1 else None)

  def evals_due(step, final):
    return [e for e in evaluators if final or step % e.every == 0]

  #### Checkpoints: resume when the workdir has one
  start = 0
  if checkpoints.latest_step() is not None:
    start = checkpoints.latest_step()
    state = checkpoints.restore(state)
  run_lib.trim_metrics(workdir, start)

  if start >= config.total_steps:   # a finished run: re-running it re-evaluates it
    checkpoints.close()
    return evaluate.run(evaluators, cfg, eval_params(state), data, feats, workdir, start,
                        place=eval_place)
  # Once the checkpoint restored (a config it cannot resume leaves the run's own config.json);
  # a finished run keeps the config it was trained with.
  run_lib.write_config(workdir, config)

  #### Data: batch `i` of the run is `ds[i]`, so resuming at step s continues the same order
  batches = iter(train_batches(config, data, feats, start))

  def place(host_batch):
    return parallel.put_batch({k: host_batch[k] for k in BATCH_KEYS}, batch_sharding)

  #### Train loop. The host never waits for the step it has just dispatched: it prepares the
  # next batch and writes the log rows of earlier steps while the step runs, and waits only
  # where it must (checkpoints, evaluation, the end). A non-finite loss is tracked on the
  # device over every step and checked wherever the host waits. (On one CPU device the entry
  # point runs the step inline, on this thread, so that glibc keeps its buffers:
  # `drivlm_jax.host`; the input pipeline's threads still prepare batches meanwhile.)
  metrics_file = run_lib.path(workdir, "metrics.jsonl") if jax.process_index() == 0 else None
  writer = _tensorboard(workdir)
  result = {}
  pending = []   # (step, metrics, tracker) of log steps whose rows are not written yet
  clock = {"step": start, "time": time.time()}
  warned = {}   # warnings given once per run

  def write_rows(rows, tracker):
    """Writes `rows` up to the first non-finite step (read from `tracker`), then stops the
    run there, before any checkpoint of that step or a later one."""
    bad_step, bad_loss = (x.item() for x in tracker)
    for done, metrics, _ in rows:
      if bad_step and done >= bad_step:
        break
      now = time.time()
      row = {"step": done, **{k: v.item() for k, v in metrics.items()},
             "learning_rate": optim.rate_at(config.optimizer, config.total_steps, done),
             "examples_per_s": (done - clock["step"]) * config.batch_size
                               / max(now - clock["time"], 1e-9), "time": now}
      clock.update(step=done, time=now)
      _warn_captions(row, warned)
      bar.set_postfix(loss=f"{row['loss']:.4f}")
      if metrics_file:
        run_lib.append_text(metrics_file, json.dumps(row) + "\n")
      if writer:
        for k, v in row.items():
          if k not in ("step", "time"):
            writer.add_scalar(f"train/{k}", v, done)
    del rows[:]
    if bad_step:
      raise NonFiniteLoss(f"non-finite loss or gradient (loss {bad_loss}) at step {bad_step}; "
                          f"stopping. The last good checkpoint (step "
                          f"{checkpoints.latest_step()}) is kept.")

  try:
    tracker = (jnp.int32(0), jnp.float32(0.0))
    bar = tqdm.trange(start, config.total_steps, initial=start, total=config.total_steps,
                      desc="train", disable=jax.process_index() != 0)
    batch = place(next(batches))
    for step in bar:
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, metrics = train_step(state, batch, frozen)
      done = step + 1
      tracker = _track_non_finite(tracker, metrics["loss"], metrics["grad_norm"], done)
      final = done == config.total_steps
      stop = preemption.reached(done)   # every host agrees: this step is the last
      if not (final or stop):
        batch = place(next(batches))   # the next batch, while this step runs
      earlier = [p for p in pending if p[0] < done]
      if earlier:
        pending[:] = [p for p in pending if p[0] >= done]
        write_rows(earlier, earlier[-1][2])
      if done % config.log_every_steps == 0 or final:
        pending.append((done, metrics, tracker))
      save = done % config.checkpoint_every_steps == 0 or final or stop
      due = evals_due(done, final)
      if save or due:   # the host waits for this step: check it before keeping anything
        write_rows(pending, tracker)
      if save and checkpoints.latest_step() != done:
        checkpoints.save(done, state)
      if due:
        result = evaluate.run(due, cfg, eval_params(state), data, feats, workdir, done,
                              place=eval_place)
        if writer:
          for split, domains in result.items():
            for domain, values in domains.items():
              for k, v in values.items():
                writer.add_scalar(f"{split}/{domain}/{k}", v, done)
      if stop and not final:   # (stopped at the last step: finished, evaluated)
        raise Preempted(f"stopped by {preemption.by} after step {done} of "
                        f"{config.total_steps}: its checkpoint is saved; the same command "
                        f"resumes the run")
  finally:
    checkpoints.close()
    if writer:
      writer.close()
  return result


def _warn_captions(row, warned: dict):
  """Once per run: captions the contrastive loss cannot learn from (adapt/contrastive.py)."""
  if row.get("clip_captions") == 1 and "one" not in warned:
    warned["one"] = True
    logging.warning("config.loss.clip: every caption of the batch at step %d is the same "
                    "(BDD-OIA's frames carry no instruction): the contrastive loss has "
                    "nothing to contrast", row["step"])
  if row.get("clip_cross_domain", 1.0) == 0.0 and "domain" not in warned:
    warned["domain"] = True
    logging.warning("config.loss.clip: no caption of the batch at step %d captions rows of "
                    "both domains: the contrastive loss learns to tell the domains apart",
                    row["step"])


@jax.jit
def _track_non_finite(tracker, loss, grad_norm, step):
  """(step, loss) of the first step with a non-finite loss or gradient so far (a finite
  loss with non-finite gradients would update, and checkpoint, broken params); step 0 while
  there is none."""
  bad_step, bad_loss = tracker
  first = (bad_step == 0) & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  return (jnp.where(first, jnp.int32(step), bad_step),
          jnp.where(first, loss.astype(jnp.float32), bad_loss))


class _Preemption:
  """Whether to stop after a step. One process: a SIGTERM or a first Ctrl-C seen by then
  (the step whose batch is already prepared still runs, then the run saves and exits; a second
  Ctrl-C quits at once, unsaved). Several processes: JAX's preemption sync point (SIGTERM),
  so that every host stops after the same step, whichever host got the signal."""

  def __init__(self):
    self.multihost = jax.process_count() > 1
    self.by = "SIGTERM"
    self.signalled = []
    self.previous = {}
    if not self.multihost:   # with several hosts JAX's own notifier takes SIGTERM
      self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM,
                                                                   signal.SIGINT)}

  def _handle(self, signum, _):
    if signum == signal.SIGINT:
      self.by = "Ctrl-C"
      signal.signal(signal.SIGINT, self.previous[signal.SIGINT])   # a second one quits
      print("\nCtrl-C: stopping after this step and saving it (Ctrl-C again quits unsaved)",
            file=sys.stderr, flush=True)
    self.signalled.append(signum)

  def reached(self, step: int) -> bool:
    if self.multihost:
      return multihost_utils.reached_preemption_sync_point(step)
    return bool(self.signalled)

  def close(self):
    for s, handler in self.previous.items():
      signal.signal(s, handler)


def _tensorboard(workdir):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter
  return SummaryWriter(str(run_lib.path(workdir, "tb")))   # gs:// through google-cloud-storage


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config, workdir = run_lib.flag_values()
  try:
    with run_lib.user_errors():
      train(config, workdir)
  except NonFiniteLoss as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(run_lib.PREEMPTED_EXIT)


if __name__ == "__main__":
  run_lib.define_flags()
  app.run(main, flags_parser=run_lib.parse_flags)
