"""Every parameter carries logical axis names, and they shard the model on a device mesh."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from configs import common
from drivlm_jax.model import text, vlm

RULES = (("batch", "data"), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
         ("vocab", "tensor"), ("kv_heads", None), ("kv", None), ("layers", None),
         ("length", None), ("embed_vision", None), ("proj", None))


def _is_spec(x):
  return isinstance(x, PartitionSpec)


@pytest.mark.parametrize("preset", sorted(common.MODEL_PRESETS))
def test_every_parameter_has_one_name_per_dim(preset):
  cfg = vlm.config_from_dict(common.model_config(preset))
  shapes = jax.eval_shape(lambda k: vlm.init(cfg, k), jax.random.key(0))
  specs = vlm.logical_axes(cfg)
  assert jax.tree.structure(specs, is_leaf=_is_spec) == jax.tree.structure(shapes)
  for spec, sds in zip(jax.tree.leaves(specs, is_leaf=_is_spec), jax.tree.leaves(shapes)):
    assert len(spec) == sds.ndim, (spec, sds.shape)
    if sds.ndim >= 2:
      assert any(name is not None for name in spec), (spec, sds.shape)


def test_text_tower_has_axes():
  cfg = text.Config(vocab_size=64, max_position_embeddings=8, hidden_size=32,
                    intermediate_size=64, num_layers=2, num_heads=4, projection_dim=16,
                    vision_hidden_size=48)
  specs = text.logical_axes(cfg)
  shapes = jax.eval_shape(lambda k: text.init(cfg, k), jax.random.key(0))
  for spec, sds in zip(jax.tree.leaves(specs, is_leaf=_is_spec), jax.tree.leaves(shapes)):
    assert len(spec) == sds.ndim


def test_sharded_forward_equals_single_device():
  assert jax.device_count() == 8, "run with JAX_NUM_CPU_DEVICES=8"
  cfg = vlm.config_from_dict(common.model_config("tiny"))
  params = vlm.init(cfg, jax.random.key(0))
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  ids = np.concatenate([np.full((2, cfg.num_visual_tokens), cfg.image_token_id),
                        np.arange(10, 16)[None].repeat(2, 0)], axis=1).astype(np.int32)
  expected = jax.jit(lambda p: vlm.apply(cfg, p, images, ids))(params)

  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  shardings = nn.logical_to_mesh_sharding(vlm.logical_axes(cfg), mesh, RULES)
  sharded = jax.device_put(params, shardings)
  q_proj = sharded["language"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q_proj.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    got = jax.jit(lambda p: vlm.apply(cfg, p, images, ids))(sharded)
  for key in ("lm_logits", "action_logits", "visual_tokens"):
    np.testing.assert_allclose(got[key], expected[key], atol=1e-5)


def test_a_dimension_the_mesh_cannot_split_is_named():
  """jit's error for a sharded dimension that does not divide names neither the param nor
  what to change; `parallel.check_shardable` names both (the trainer raises it)."""
  from drivlm_jax import parallel
  d = common.model_config("tiny")
  d.language.num_heads = d.language.num_kv_heads = 4
  cfg = vlm.config_from_dict(d)
  shapes = jax.eval_shape(lambda k: vlm.init(cfg, k), jax.random.key(0))
  axes = vlm.logical_axes(cfg)
  fits = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  parallel.check_shardable(shapes, parallel.param_shardings(axes, fits, parallel.DEFAULT_RULES),
                           axes)
  wide = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
  with pytest.raises(ValueError, match=r"/k_proj/\w+ \(4, 16\): dimension 0 \(logical "
                                       r"'heads', 4\) does not split over mesh axes "
                                       r"\('tensor',\) \(8 ways\)"):
    parallel.check_shardable(
        shapes, parallel.param_shardings(axes, wide, parallel.DEFAULT_RULES), axes)
