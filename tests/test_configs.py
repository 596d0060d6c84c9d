"""Every config builds its model (shapes only, no memory) and parses its variants."""
import importlib
import pathlib

import jax
import pytest

from configs import common
from drivlm_jax.model import vlm

CONFIG_FILES = sorted(p.stem for p in pathlib.Path(common.__file__).parent.glob("*.py")
                      if p.stem not in ("__init__", "common"))


def _param_count(cfg):
  shapes = jax.eval_shape(lambda key: vlm.init(cfg, key), jax.random.key(0))
  return sum(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_builds_its_model(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  for key in ("seed", "total_steps", "batch_size", "log_every_steps", "eval_every_steps",
              "checkpoint_every_steps"):
    assert key in config, f"configs/{name}.py lacks {key}"
  assert set(config.mesh) == {"data", "fsdp", "tensor"}
  assert _param_count(vlm.config_from_dict(config.model)) > 0


@pytest.mark.parametrize("preset", sorted(common.MODEL_PRESETS))
def test_every_preset_builds(preset):
  cfg = vlm.config_from_dict(common.model_config(preset))
  n = _param_count(cfg)
  if preset == "clip_b16_qwen05b":
    # CLIP ViT-B/16 vision tower (~86M) + Qwen2-0.5B (~494M) + projector and heads.
    assert 575e6 < n < 590e6, n
  axes = vlm.logical_axes(cfg)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) \
      == jax.tree.structure(jax.eval_shape(lambda k: vlm.init(cfg, k), jax.random.key(0)))


def test_demo_variants_and_errors():
  from configs import demo
  config = demo.get_config("model=clip_b16_qwen05b,steps=7")
  assert config.total_steps == 7 and config.model.vision.image_size == 224
  with pytest.raises(KeyError, match="unknown config arg 'stpes'"):
    demo.get_config("stpes=3")
  bad = common.model_config("tiny")
  bad.language.num_layer = 3
  with pytest.raises(KeyError, match=r"\['num_layer'\] in model.language"):
    vlm.config_from_dict(bad)
