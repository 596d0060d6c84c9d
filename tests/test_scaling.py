"""The analytic memory table agrees with what JAX/XLA really allocate."""
import jax
import numpy as np
import optax
import pytest

from drivlm_jax import parallel
from drivlm_jax.model import vlm
from experiments import scaling
from export import graphs

MESHES = [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 8, "tensor": 1},
          {"data": 2, "fsdp": 2, "tensor": 2}]


def _sharded_state(cfg, mesh_sizes):
  mesh = parallel.make_mesh(mesh_sizes)
  shardings = parallel.param_shardings(vlm.logical_axes(cfg), mesh, parallel.DEFAULT_RULES)
  tx = optax.adamw(1e-3)
  with jax.set_mesh(mesh):
    params = jax.jit(lambda k: vlm.init(cfg, k), out_shardings=shardings)(jax.random.key(0))
    opt_shardings = parallel.like_params(jax.eval_shape(tx.init, params), params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  return params, opt_state


def _device0_bytes(tree):
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("mesh_sizes", MESHES)
def test_params_and_adam_state_per_device_match_the_real_shards(mesh_sizes):
  cfg = scaling.preset_config("tiny")
  params, opt_state = _sharded_state(cfg, mesh_sizes)
  est = scaling.estimate(cfg, mesh_sizes, global_batch=16, seq_len=64)
  assert est["params"] == sum(x.size for x in jax.tree.leaves(params))
  assert est["param_bytes"] == _device0_bytes(params)
  # Adam's mu and nu are sharded like the params (only the step count is replicated).
  assert abs(est["optimizer_bytes"] - _device0_bytes(opt_state)) <= 16


def test_optimizer_state_follows_the_param_shardings():
  cfg = scaling.preset_config("tiny")
  params, opt_state = _sharded_state(cfg, {"data": 1, "fsdp": 8, "tensor": 1})
  mu = opt_state[0].mu
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mu)):
    assert m.sharding == p.sharding
  assert _device0_bytes(mu) < 0.2 * sum(x.nbytes for x in jax.tree.leaves(mu))


def test_estimate_against_xla_memory_analysis_of_the_train_step():
  mesh_sizes = {"data": 2, "fsdp": 2, "tensor": 2}
  for preset in ("tiny", "tiny_teacher"):
    cfg = scaling.preset_config(preset)
    est = scaling.estimate(cfg, mesh_sizes, global_batch=16, seq_len=128)
    xla = scaling.xla_memory(cfg, mesh_sizes, global_batch=16, seq_len=128)
    state = xla["argument_bytes"] - xla["batch_bytes"]
    np.testing.assert_allclose(est["param_bytes"] + est["optimizer_bytes"], state, rtol=0.01)
    # Activations + gradients are an estimate (Korthikanti et al.): the right magnitude.
    ratio = (est["activation_bytes"] + est["grad_bytes"]) / xla["temp_bytes"]
    assert 0.33 < ratio < 3, (preset, ratio)


def test_flops_per_example_match_xla_cost_analysis():
  # XLA's cost analysis counts a while loop's body once: trace the layers as a loop.
  cfg = graphs.for_export(scaling.preset_config("tiny"))
  images = jax.ShapeDtypeStruct((1, cfg.vision.image_size, cfg.vision.image_size, 3),
                                np.float32)
  ids = jax.ShapeDtypeStruct((1, 96), np.int32)
  params = jax.eval_shape(lambda k: vlm.init(scaling.preset_config("tiny"), k),
                          jax.random.key(0))
  fwd = jax.jit(lambda p, x, i: vlm.apply(cfg, p, x, i)["lm_logits"])
  cost = fwd.lower(params, images, ids).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = scaling.vision_flops(cfg.vision, 1) + scaling.lm_flops(cfg.language, 1, 96)
  assert 0.9 < ours / cost["flops"] < 1.1, (ours, cost["flops"])


@pytest.mark.parametrize("tune", ["freeze_vision", "lora_lm"])
def test_finetune_recipes_hold_adam_state_only_for_what_trains(tune):
  """The estimate of a recipe's params and AdamW state per device equals the real optimizer
  (optim.make with the trainer's frozen parts and LoRA) on an FSDP mesh."""
  import ml_collections
  from configs import common
  from drivlm_jax import optim, train
  cfg, mesh_sizes = scaling.preset_config("tiny"), {"data": 1, "fsdp": 8, "tensor": 1}
  shapes, axes, _ = scaling.tuned(cfg, tune)
  mesh = parallel.make_mesh(mesh_sizes)
  shardings = parallel.param_shardings(axes, mesh, parallel.DEFAULT_RULES)
  zeros = lambda s, sh: jax.device_put(np.zeros(s.shape, s.dtype), sh)
  params = jax.tree.map(zeros, shapes, shardings)
  config = ml_collections.ConfigDict(dict(optimizer=dict(
      learning_rate=1e-3, warmup_steps=1, weight_decay=0.1, grad_clip_norm=1.0, parts=[])))
  common.finetune(config, tune)
  tx = optim.make(train.optimizer_config(config, params), params, 10)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init, out_shardings=parallel.like_params(
        jax.eval_shape(tx.init, params), params, mesh))(params)
  est = scaling.estimate(cfg, mesh_sizes, global_batch=16, seq_len=64, tune=tune)
  assert est["param_bytes"] == _device0_bytes(params)
  assert abs(est["optimizer_bytes"] - _device0_bytes(state)) <= 16
