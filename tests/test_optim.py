"""Per-part learning rates, frozen parts and gradient accumulation."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from drivlm_jax import optim, train


def _config(**kw):
  base = dict(learning_rate=0.1, warmup_steps=0, weight_decay=0.0, grad_clip_norm=1e9,
              parts=[dict(pattern="^language/", freeze=True),
                     dict(pattern="^projector/", lr_mult=10.0)])
  base.update(kw)
  return ml_collections.ConfigDict(base)


PARAMS = {"language": {"w": jnp.ones(3)}, "projector": {"w": jnp.ones(3)},
          "vision": {"w": jnp.ones(3)}}


def test_frozen_and_scaled_parts():
  labels = optim.part_labels(PARAMS, _config().parts)
  assert labels == {"language": {"w": "frozen"}, "projector": {"w": "part1"},
                    "vision": {"w": "default"}}
  tx = optim.make(_config(), PARAMS, total_steps=100)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_array_equal(updates["language"]["w"], 0.0)
  # Adam's first step moves every coordinate by the learning rate (times 10 for the projector).
  lr = float(optim.schedule(_config(), 100)(0))
  np.testing.assert_allclose(updates["vision"]["w"], -lr, rtol=1e-5)
  np.testing.assert_allclose(updates["projector"]["w"], -10 * lr, rtol=1e-5)


def test_gradient_accumulation_averages_micro_batches():
  tx = optim.make(_config(grad_accum_steps=2, parts=[]), PARAMS, total_steps=100)
  plain = optim.make(_config(parts=[]), PARAMS, total_steps=100)
  g1 = jax.tree.map(lambda x: 1.0 * x, PARAMS)
  g2 = jax.tree.map(lambda x: 3.0 * x, PARAMS)
  state = tx.init(PARAMS)
  first, state = tx.update(g1, state, PARAMS)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(first))   # accumulating
  second, _ = tx.update(g2, state, PARAMS)
  expected, _ = plain.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2),
                             plain.init(PARAMS), PARAMS)
  for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_schedule_warms_up_then_decays():
  s = optim.schedule(_config(warmup_steps=10, end_lr_ratio=0.1), 110)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 0.1) < 1e-7
  assert abs(float(s(110)) - 0.01) < 1e-7 and float(s(60)) < 0.1


def test_accumulated_updates_keep_the_schedule_in_batches():
  """k = 4, 100 batches: 25 updates, each at the schedule's rate of its first batch (before,
  the optimizer's update count read the batch schedule: the run ended at 1/4 of it)."""
  config = _config(grad_accum_steps=4, parts=[], warmup_steps=8, end_lr_ratio=0.05)
  tx = optim.make(config, PARAMS, total_steps=100)
  schedule = optim.schedule(config, 100)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  state, rates = tx.init(PARAMS), []
  for step in range(100):
    updates, state = tx.update(grads, state, PARAMS)
    if (step + 1) % 4 == 0:   # constant gradients: Adam moves each coordinate by the rate
      rates.append(float(-updates["vision"]["w"].ravel()[0]))
      assert optim.rate_at(config, 100, step + 1) == pytest.approx(float(schedule(step - 3)))
    else:
      assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
  np.testing.assert_allclose(rates, [float(schedule(4 * u)) for u in range(25)], rtol=1e-4,
                             atol=1e-9)
  assert rates[-1] < 0.1 * max(rates)   # decayed to the end of the schedule


def test_the_moving_average_is_optax_debiased_ema():
  """The average after t updates is `optax.ema(debias=True)` of the params sequence: the
  params a run starts from keep no weight (plain decay left them d^t)."""
  rng = np.random.default_rng(0)
  seq = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), PARAMS)
         for _ in range(6)]
  ref = optax.ema(0.9, debias=True)
  ref_state = ref.init(PARAMS)
  ema = jax.tree.map(lambda x: x + 100.0, PARAMS)      # the start: no weight once updated
  tx = optax.sgd(0.1)
  for t, params in enumerate(seq, start=1):
    ema = train.update_ema(tx, ema, params, tx.init(params), 0.9, jnp.int32(t))
    expected, ref_state = ref.update(params, ref_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), ema, expected)


def test_the_moving_average_moves_once_per_update():
  tx = optim.make(_config(grad_accum_steps=2, parts=[]), PARAMS, total_steps=10)
  ema = jax.tree.map(jnp.zeros_like, PARAMS)
  state = tx.init(PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  ref = optax.ema(0.9, debias=True)
  ref_state = ref.init(PARAMS)
  for t in range(1, 4):
    params = jax.tree.map(lambda x: x * t, PARAMS)
    _, state = tx.update(grads, state, params)            # accumulating: no update yet
    same = train.update_ema(tx, ema, params, state, 0.9, jnp.int32(2 * t - 1))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), same, ema)
    _, state = tx.update(grads, state, params)            # the update
    ema = train.update_ema(tx, ema, params, state, 0.9, jnp.int32(2 * t))
    expected, ref_state = ref.update(params, ref_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ema, expected)


def test_weight_decay_shrinks_kernels_only():
  """AdamW's decoupled decay (p -= lr * wd * p with a zero gradient) on kernels, distillation's
  projection and LoRA factors, in every part at its own rate; norm scales, biases, embeddings,
  the logit scale and frozen parts stay. The optimizer state has optax.adamw's structure
  (checkpoints written before the mask restore)."""
  params = {"vision": {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
                       "norm": {"scale": jnp.ones(3)}},
            "projector": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
            "language": {"embed": {"embedding": jnp.ones((4, 3))},
                         "q": {"kernel": jnp.ones((3, 3))}},
            "text": {"logit_scale": jnp.ones(())},
            "distill": {"projection": jnp.ones((3, 5))},
            "lora": {"language": {"q": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 3))}}}}
  config = _config(weight_decay=0.5)   # language frozen, projector at 10x the rate
  tx = optim.make(config, params, total_steps=10)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, updates)
  decayed, fast = 1.0 - 0.1 * 0.5, 1.0 - 1.0 * 0.5
  for got, want in ((new["vision"]["dense"]["kernel"], decayed),
                    (new["distill"]["projection"], decayed),
                    (new["lora"]["language"]["q"]["a"], decayed),
                    (new["lora"]["language"]["q"]["b"], decayed),
                    (new["projector"]["kernel"], fast), (new["projector"]["bias"], 1.0),
                    (new["language"]["q"]["kernel"], 1.0),
                    (new["vision"]["dense"]["bias"], 1.0), (new["vision"]["norm"]["scale"], 1.0),
                    (new["language"]["embed"]["embedding"], 1.0), (new["text"]["logit_scale"], 1.0)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  labels = optim.part_labels(params, config.parts)
  adamw = lambda mult: optax.adamw(optim.update_rate(config, 10, mult), weight_decay=0.5)
  reference = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.multi_transform({"default": adamw(1.0), "frozen": optax.set_to_zero(),
                             "part1": adamw(10.0)}, labels))
  assert jax.tree.structure(state) == jax.tree.structure(reference.init(params))
