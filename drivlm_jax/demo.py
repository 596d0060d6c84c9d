r"""Smoke training of `configs/demo.py`: the tiny VLM learns synthetic driving labels on CPU.

  python -m drivlm_jax.demo [--config configs/demo.py:steps=100]

Until the procedural driving world and the trainer land, the images are synthetic noise on
which each of the 4 actions (forward, stop_or_slow, turn_left, turn_right) leaves its own
mark when it is on or off (a red, green or blue tint; a checkerboard), the 21 explanations are fixed functions of the actions, and
the LM answers "how many actions apply?" with one token. The losses fall and the held-out action
accuracy rises well above chance when the model, its heads and the LM path all train.
"""
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import app
from ml_collections import config_flags

import configs
from drivlm_jax.model import vlm

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "demo.py"), "Config file.")
_ANSWER_BASE = 10  # answer token = _ANSWER_BASE + number of active actions
_TINTS = np.eye(3, dtype=np.float32) * 0.5


def synthetic_batch(cfg: vlm.Config, rng: np.random.Generator, batch: int) -> dict:
  size, n = cfg.vision.image_size, cfg.num_visual_tokens
  actions = rng.integers(0, 2, (batch, 4))
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  sign = 2 * actions - 1
  images += (sign[:, :3] @ _TINTS)[:, None, None, :]
  checker = (np.indices((size, size)).sum(0) % 2 - 0.5).astype(np.float32)
  images += sign[:, 3, None, None, None] * checker[None, :, :, None]
  reasons = np.stack([actions[:, j % 4] ^ ((j // 4) % 2) for j in range(21)], axis=1)
  prompt = np.concatenate([np.full((batch, n), cfg.image_token_id), np.full((batch, 3), 7)], 1)
  return {"images": images, "input_ids": prompt.astype(np.int32),
          "actions": actions.astype(np.float32), "reasons": reasons.astype(np.float32),
          "answer": (_ANSWER_BASE + actions.sum(1)).astype(np.int32)}


def loss_fn(cfg, weights, params, batch):
  out = vlm.apply(cfg, params, batch["images"], batch["input_ids"])
  bce = lambda logits, y: optax.sigmoid_binary_cross_entropy(logits, y).mean()
  losses = {
      "action": bce(out["action_logits"], batch["actions"]),
      "reason": bce(out["reason_logits"], batch["reasons"]),
      "lm": optax.softmax_cross_entropy_with_integer_labels(
          out["lm_logits"][:, -1], batch["answer"]).mean(),
  }
  total = sum(weights[k] * v for k, v in losses.items())
  return total, (losses, out)


def main(argv):
  del argv
  config = _CONFIG.value
  cfg = vlm.config_from_dict(config.model)
  params = vlm.init(cfg, jax.random.key(config.seed))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.optimizer.learning_rate, config.optimizer.warmup_steps, config.total_steps)
  tx = optax.chain(optax.clip_by_global_norm(config.optimizer.grad_clip_norm),
                   optax.adamw(schedule, weight_decay=config.optimizer.weight_decay))
  opt_state = tx.init(params)
  loss = functools.partial(loss_fn, cfg, dict(config.loss))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch):
    (total, (losses, _)), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": total, **losses}

  @jax.jit
  def predict(params, batch):
    out = loss(params, batch)[1][1]
    return out["action_logits"] > 0, jnp.argmax(out["lm_logits"][:, -1], -1)

  rng = np.random.default_rng(config.seed)
  held_out = synthetic_batch(cfg, np.random.default_rng(config.seed + 1), 64)
  print(f"Smoke training of configs/demo.py (synthetic images; model={cfg.vision.family} "
        f"{cfg.vision.image_size}px + {cfg.language.family} {cfg.language.num_layers} layers)")
  t0 = time.time()
  for step in tqdm.trange(1, config.total_steps + 1, desc="train"):
    params, opt_state, metrics = train_step(params, opt_state,
                                            synthetic_batch(cfg, rng, config.batch_size))
    if step % config.log_every_steps == 0 or step == 1:
      tqdm.tqdm.write(f"step {step:4d}  " + "  ".join(f"{k} {float(v):.4f}"
                                                     for k, v in metrics.items()))
  actions, answer = predict(params, held_out)
  action_acc = float(np.mean(np.asarray(actions) == held_out["actions"]))
  answer_acc = float(np.mean(np.asarray(answer) == held_out["answer"]))
  print(f"held-out action accuracy {100 * action_acc:.1f}% (chance 50%), LM answer accuracy "
        f"{100 * answer_acc:.1f}% (chance {100 / 5:.0f}%), {time.time() - t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
