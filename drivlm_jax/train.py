r"""Trains a config: `python -m drivlm_jax.train --config configs/X.py[:arg] --workdir DIR
[--config.key=value ...]`. Re-running the same command resumes from DIR/checkpoints.

One jitted step over a (data, fsdp, tensor) mesh with donated state; Orbax checkpoints
(async, max_to_keep, train state + data position + config), saved on SIGTERM; a non-finite
loss stops the run and leaves the last good checkpoint alone. Writes DIR/config.json,
DIR/metrics.jsonl, TensorBoard events in DIR/tb, and DIR/eval.json.
"""
import dataclasses
import json
import os
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from drivlm_jax import checkpoints, evaluate, optim, parallel
from drivlm_jax.data import pipeline, sources
from drivlm_jax.data.tokenizer import TextTokenizer
from drivlm_jax.losses import adversarial, contrastive, distill, task
from drivlm_jax.model import discriminators, text, vlm

BATCH_KEYS = ("image", "input_ids", "attention_mask", "targets", "loss_mask", "actions",
              "reasons", "action_mask", "reason_mask", "instruction_ids", "instruction_mask",
              "boxes", "box_mask", "domain", "caption_ids", "caption_mask")
DA_LEVELS = ("image", "token", "instance", "consistency")
KD_KINDS = ("heads", "lm", "feature")


class NonFiniteLoss(RuntimeError):
  pass


def model_config(config) -> vlm.Config:
  cfg = vlm.config_from_dict(config.model)
  if config.get("mixed_precision", False):
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, dtype="bfloat16"),
        language=dataclasses.replace(cfg.language, dtype="bfloat16"))
  return cfg


def features(config, cfg: vlm.Config, tokenizer: str) -> pipeline.Features:
  d = config.data
  tok = TextTokenizer(tokenizer)
  if tok.image_id != cfg.image_token_id or tok.vocab_size > cfg.language.vocab_size:
    raise ValueError(
        f"tokenizer {tokenizer} (<image> id {tok.image_id}, {tok.vocab_size} tokens) does not "
        f"fit the model (model.image_token_id {cfg.image_token_id}, vocab_size "
        f"{cfg.language.vocab_size}); set config.data.tokenizer or config.model.image_token_id")
  return pipeline.Features(tokenizer=tokenizer, family=cfg.vision.family,
                           image_size=cfg.vision.image_size,
                           num_image_tokens=cfg.num_visual_tokens, max_len=d.max_len,
                           resize=d.resize, augment=d.augment)


def da_config(config):
  """(discriminators.Config, {level: weight}, focal gamma) or None when adaptation is off."""
  da = config.get("da")
  if da is None or not any(da.get(k, 0.0) > 0 for k in DA_LEVELS):
    return None
  return (discriminators.Config(hidden=da.get("hidden", 256)),
          {k: float(da.get(k, 0.0)) for k in DA_LEVELS}, da.get("focal_gamma", 0.0),
          float(da.get("start", 0.0)))


def clip_config(config, cfg: vlm.Config):
  """(text.Config, weight, "clip"|"siglip") for contrastive image-text fine-tuning of the
  vision tower, or None when `config.clip.weight` is 0. The text tower is CLIP's, over the
  LM's tokenizer, pooled at the last real token."""
  clip = config.get("clip")
  if clip is None or not clip.get("weight", 0.0) > 0:
    return None
  tcfg = text.Config(**{**dict(clip.get("text", {})), "vocab_size": cfg.language.vocab_size,
                        "vision_hidden_size": cfg.vision.hidden_size, "pool": "last"})
  kind = clip.get("loss", "clip")
  if kind not in ("clip", "siglip"):
    raise ValueError(f"config.clip.loss must be 'clip' or 'siglip', got {kind!r}")
  return tcfg, float(clip.weight), kind


def _contrastive_loss(clip, params, out, batch):
  tcfg, _, kind = clip
  images = text.image_embeds(tcfg, params["text"], out["image_pooled"])
  texts = text.apply(tcfg, params["text"], batch["caption_ids"], batch["caption_mask"])
  if kind == "siglip":
    return contrastive.siglip_loss(images, texts["text_embeds"], params["text"]["logit_scale"],
                                   params["text"]["logit_bias"])
  return contrastive.clip_loss(images, texts["text_embeds"], params["text"]["logit_scale"])


def kd_config(config):
  """(teacher run dir, {kind: weight}, temperature, feature kind) or None when distillation
  is off."""
  kd = config.get("distill")
  if kd is None or not kd.get("teacher") or not any(
      kd.get(k, 0.0) > 0 for k in KD_KINDS):
    return None
  return (kd.teacher, {k: float(kd.get(k, 0.0)) for k in KD_KINDS},
          float(kd.get("temperature", 1.0)), kd.get("feature_kind", "cosine"))


def load_teacher(teacher_dir: str, cfg: vlm.Config):
  """The frozen teacher of a distillation run: (vlm.Config, params) from any run directory."""
  tcfg = model_config(checkpoints.run_config(teacher_dir))
  if tcfg.language.vocab_size != cfg.language.vocab_size:
    raise ValueError(f"teacher {teacher_dir} has a {tcfg.language.vocab_size}-token vocabulary, "
                     f"the student {cfg.language.vocab_size}: LM distillation needs one tokenizer")
  params, step = checkpoints.load_params(teacher_dir, tcfg)
  logging.info("teacher: %s at step %d", teacher_dir, step)
  return tcfg, params


def warm_start(params, run_dir: str):
  """`params` with every model param that the run `run_dir` also has (same path and shape)
  taken from its latest checkpoint; the rest (e.g. discriminators, reweighting) stay fresh.
  Logs what was taken and what was not."""
  source_cfg = model_config(checkpoints.run_config(run_dir))
  loaded, step = checkpoints.load_params(run_dir, source_cfg)
  flat = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  taken, fresh = [], []

  def pick(path, x):
    y = flat.get(path)
    if y is not None and y.shape == x.shape:
      taken.append(path)
      return jax.device_put(y.astype(x.dtype), x.sharding)
    fresh.append(jax.tree_util.keystr(path))
    return x
  params = jax.tree_util.tree_map_with_path(pick, params)
  if not taken:
    raise ValueError(f"init_from {run_dir}: no param matches this model (other preset?)")
  logging.warning("init_from %s (step %d): %d params loaded, %d fresh%s", run_dir, step,
                  len(taken), len(fresh), f": {', '.join(sorted(fresh)[:6])}..." if fresh
                  else "")
  return params


def _distill_losses(cfg, tcfg, kd, out, teacher_out, batch, projection):
  """Scene-aware KD: heads (sigmoid KD), LM tokens from the image on (softmax KD), visual
  tokens (feature KD weighted by the student's instruction scores), on every row: the
  teacher needs no labels."""
  _, weights, temperature, kind = kd
  t = jax.lax.stop_gradient(teacher_out)
  out_losses = {}
  if weights["heads"]:
    out_losses["heads"] = (distill.sigmoid_kd(out["action_logits"], t["action_logits"], temperature)
                           + distill.sigmoid_kd(out["reason_logits"], t["reason_logits"],
                                                temperature))
  if weights["lm"]:
    mask = batch["attention_mask"] * (batch["input_ids"] != cfg.image_token_id)
    out_losses["lm"] = distill.softmax_kd(out["lm_logits"], t["lm_logits"], temperature, mask)
  if weights["feature"]:
    teacher_tokens = distill.match_grid(t["visual_tokens"], tcfg.vision.grid, cfg.vision.grid)
    scores = out.get("token_scores")
    out_losses["feature"] = distill.feature_kd(
        out["visual_tokens"], teacher_tokens, projection,
        None if scores is None else jax.nn.sigmoid(scores), kind)
  return out_losses


def make_train_step(cfg, tx, loss_weights, da=None, total_steps=1, kd=None, tcfg=None,
                    clip=None, ema_decay=0.0):
  """One optimizer step: `train_step(state, batch, teacher_params)`.

  With `da` (from `da_config`) the domain discriminators on the visual tokens (image level:
  their mean) join the loss behind a gradient reversal whose strength
  follows the DANN schedule. With `kd` (from `kd_config`) the frozen teacher (`tcfg`,
  `teacher_params`) runs on the same batch and the distillation losses join. With `clip`
  (from `clip_config`) the contrastive image-caption loss joins. With `ema_decay` > 0 the
  state also carries an exponential moving average of the params ("ema"), which evaluation,
  distillation and warm starts use: adversarial training moves the target accuracy a lot
  from step to step, and the average is what a run is judged by.
  """
  def train_step(state, batch, teacher_params):
    def loss_fn(params):
      out = vlm.apply(cfg, params, batch["image"], batch["input_ids"], batch["attention_mask"],
                      batch["instruction_ids"], batch["instruction_mask"])
      losses = task.task_losses(out, batch)
      total = sum(loss_weights[k] * v for k, v in losses.items())
      extra = {}
      if clip is not None:
        losses["clip"] = _contrastive_loss(clip, params, out, batch)
        total = total + clip[1] * losses["clip"]
      if da is not None:
        dcfg, weights, gamma, start = da
        # Progress p of the DANN schedule runs over the steps after `start` (a fraction):
        # the discriminators train from step 0, the reversal acts once the task features exist.
        progress = (state["step"] / total_steps - start) / (1.0 - start)
        lam = adversarial.dann_lambda(jnp.clip(progress, 0.0, 1.0))
        # Image level: the mean of the visual token map (a global feature of the image, as
        # DA Faster R-CNN's image level), not the heads' own pooled input.
        pooled = jnp.mean(out["visual_tokens"], axis=1)
        logits = discriminators.apply(dcfg, params["discriminators"], pooled,
                                      out["visual_tokens"], cfg.vision.grid, batch["boxes"],
                                      batch["box_mask"], lam)
        da_losses = discriminators.losses(logits, batch["domain"], batch["box_mask"],
                                          gamma or None, weights["consistency"] > 0)
        total = total + sum(weights[k] * v for k, v in da_losses.items())
        losses = {**losses, **{f"da_{k}": v for k, v in da_losses.items()}}
        extra["da_lambda"] = lam
      if kd is not None:
        teacher_out = vlm.apply(tcfg, teacher_params, batch["image"], batch["input_ids"],
                                batch["attention_mask"], batch["instruction_ids"],
                                batch["instruction_mask"])
        kd_losses = _distill_losses(cfg, tcfg, kd, out, teacher_out, batch,
                                    params["distill"]["projection"])
        total = total + sum(kd[1][k] * v for k, v in kd_losses.items())
        losses = {**losses, **{f"kd_{k}": v for k, v in kd_losses.items()}}
      return total, (losses, extra)
    (total, (losses, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": total, **{f"loss_{k}": v for k, v in losses.items()}, **extra,
               "grad_norm": optax.tree.norm(grads)}
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if ema_decay:
      new_state["ema"] = optax.incremental_update(params, state["ema"], 1.0 - ema_decay)
    return new_state, metrics
  return train_step


def train_batches(config, data, feats, start: int):
  """This host's training batches from step `start` on."""
  d = config.data
  target = data["target", "train"] if d.target_fraction > 0 else None
  return pipeline.batches(
      data["source", "train"], feats, config.batch_size // jax.process_count(), target=target,
      target_fraction=d.target_fraction, target_labelled=d.target_labelled, seed=config.seed,
      start=start, workers=d.workers)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole run; returns the final evaluation."""
  #### Set up
  parallel.maybe_initialize_distributed(config.get("multihost"))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  cfg = model_config(config)
  data = sources.prepare(config.data, workdir)
  feats = features(config, cfg, data["tokenizer"])
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.rules_from_config(config.get("rules"))

  #### Set up model and optimizer, sharded by the logical-axis rules
  da = da_config(config)
  axes = vlm.logical_axes(cfg)
  if da is not None:
    disc_args = (cfg.language.hidden_size, cfg.vision.grid, feats.max_boxes)
    axes["discriminators"] = discriminators.logical_axes(da[0], *disc_args)
  clip = clip_config(config, cfg)
  if clip is not None:
    axes["text"] = text.logical_axes(clip[0])
    if clip[2] == "siglip":
      axes["text"]["logit_bias"] = jax.sharding.PartitionSpec()
  kd, tcfg, teacher = kd_config(config), None, {}
  if kd is not None:
    tcfg, teacher = load_teacher(kd[0], cfg)
    axes["distill"] = {"projection": jax.sharding.PartitionSpec("embed", None)}
    teacher = jax.device_put(teacher, parallel.param_shardings(vlm.logical_axes(tcfg), mesh,
                                                               rules))
  param_shardings = parallel.param_shardings(axes, mesh, rules)

  def init_params(key):
    params = vlm.init(cfg, key)
    if da is not None:
      params["discriminators"] = discriminators.init(da[0], jax.random.fold_in(key, 1),
                                                     *disc_args)
    if clip is not None:
      params["text"] = text.init(clip[0], jax.random.fold_in(key, 3))
      if clip[2] == "siglip":   # SigLIP's learned bias, initialised as in the paper
        params["text"]["logit_bias"] = jnp.asarray(-10.0, jnp.float32)
    if kd is not None:   # student visual token -> teacher visual token width
      shape = (cfg.language.hidden_size, tcfg.language.hidden_size)
      params["distill"] = {"projection": nn.initializers.lecun_normal()(
          jax.random.fold_in(key, 2), shape)}
    return params

  init = jax.jit(init_params, out_shardings=param_shardings)
  with jax.set_mesh(mesh):
    params = init(jax.random.key(config.seed))
  if config.get("init_from"):
    params = warm_start(params, config.init_from)
  tx = optim.make(config.optimizer, params, config.total_steps)
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
  train_step = jax.jit(make_train_step(cfg, tx, dict(config.loss), da, config.total_steps,
                                       kd, tcfg, clip, ema_decay),
                       in_shardings=(state_shardings, batch_sharding,
                                     jax.tree.map(lambda x: x.sharding, teacher)),
                       out_shardings=(state_shardings, parallel.replicated(mesh)),
                       donate_argnums=0)

  #### Checkpoints: resume when the workdir has one
  manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints, create=True,
                                           enable_async_checkpointing=True))
  start = 0
  if manager.latest_step() is not None:
    start = manager.latest_step()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    restored = manager.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state = restored["state"]
    logging.info("resumed from step %d (data position %d)", start,
                 restored["meta"]["data_position"])

  def save(step):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": step, "data_position": step,
                                "config": json.loads(config.to_json_best_effort())})),
                 force=True)

  if start >= config.total_steps:   # a finished run: re-running it re-evaluates it
    manager.close()
    return evaluate.run(config, cfg, state["ema" if ema_decay else "params"], data, feats,
                        workdir, step=start)

  #### Data: batch `i` of the run is `ds[i]`, so resuming at step s continues the same order
  batches = iter(train_batches(config, data, feats, start))

  #### Train loop
  preempted = []
  previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a") \
      if jax.process_index() == 0 else None
  writer = _tensorboard(workdir)
  schedule = optim.schedule(config.optimizer, config.total_steps)
  result = {}
  try:
    last_log, last_time = start, time.time()
    bar = tqdm.trange(start, config.total_steps, initial=start, total=config.total_steps,
                      desc="train", disable=jax.process_index() != 0)
    for step in bar:
      host_batch = next(batches)
      batch = parallel.put_batch({k: host_batch[k] for k in BATCH_KEYS}, batch_sharding)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, metrics = train_step(state, batch, teacher)
      done = step + 1
      loss = float(metrics["loss"])
      if not np.isfinite(loss):
        raise NonFiniteLoss(f"non-finite loss ({loss}) at step {done}; stopping. The last "
                            f"good checkpoint (step {manager.latest_step()}) is kept.")
      if done % config.log_every_steps == 0 or done == config.total_steps:
        now = time.time()
        row = {"step": done, **{k: float(v) for k, v in metrics.items()},
               "learning_rate": float(schedule(done)),
               "examples_per_s": (done - last_log) * config.batch_size / (now - last_time),
               "time": now}
        last_log, last_time = done, now
        bar.set_postfix(loss=f"{loss:.4f}")
        if metrics_file:
          metrics_file.write(json.dumps(row) + "\n")
          metrics_file.flush()
        if writer:
          for k, v in row.items():
            if k not in ("step", "time"):
              writer.add_scalar(f"train/{k}", v, done)
      if done % config.checkpoint_every_steps == 0 or done == config.total_steps:
        save(done)
      if done % config.eval_every_steps == 0 or done == config.total_steps:
        result = evaluate.run(config, cfg, state["ema" if ema_decay else "params"], data, feats,
                              workdir, step=done)
        if writer:
          for split, domains in result.items():
            for domain, values in domains.items():
              for k, v in values.items():
                writer.add_scalar(f"{split}/{domain}/{k}", v, done)
      if preempted:
        if manager.latest_step() != done:
          save(done)
        logging.warning("SIGTERM: checkpoint of step %d saved; re-run to resume", done)
        break
  finally:
    manager.wait_until_finished()
    manager.close()
    signal.signal(signal.SIGTERM, previous)
    if metrics_file:
      metrics_file.close()
    if writer:
      writer.close()
  return result


def _tensorboard(workdir):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, "tb"))


def define_flags():
  """--config (with --config.key=value overrides; unknown keys are errors) and --workdir."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (local or gs://).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required")
  try:
    train(config, workdir)
  except NonFiniteLoss as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
