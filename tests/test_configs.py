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
  # The README's `--config.evals.target.official_batch_size=N` (a flag sets existing keys only).
  assert all("official_batch_size" in spec for spec in config.evals.values()
             if spec.type == "heads"), name
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


def test_each_method_takes_its_own_adversarial_weight():
  """The teacher, the student and DANN each train at their DA_WEIGHT (chosen on each run by
  experiments.defaults), in every config that builds them; an explicit weight wins."""
  from configs import bdd_oia, demo
  for get_config in (demo.get_config, bdd_oia.get_config):
    for method, levels in [("drivlm_teacher", 3), ("drivlm_student", 3), ("dann", 1),
                           ("source_only", 0), ("entmin", 0), ("oracle", 0)]:
      loss = get_config(f"method={method},teacher=runs/t").loss
      weights = [loss.da_image, loss.da_token, loss.da_instance]
      assert weights == [common.DA_WEIGHT.get(method, 0.0)] * levels + [0.0] * (3 - levels)
  config = demo.get_config("method=source_only")
  common.add_method(config, "drivlm_student", "runs/t", keep_ratio=0.25, da_weight=0.2)
  assert config.loss.da_token == 0.2


def test_baselines_and_shifts():
  """DANN: one image-level discriminator, nothing else of DriVLM; entropy minimisation: its
  term only; both see as many source rows as source-only plus target rows; the oracle too.
  Each shift names two sim domains the sim accepts (a mixture: each part)."""
  from configs import demo
  from drivlm_jax.sim import domains
  loss = lambda method: demo.get_config(f"method={method}").loss
  dann, entmin = loss("dann"), loss("entmin")
  assert dann.da_image > 0 and dann.da_token == dann.da_instance == dann.kd_heads == 0
  assert entmin.entmin > 0 and entmin.da_image == 0
  assert not demo.get_config("method=dann").model.reweight
  rows = {m: demo.get_config(f"method={m}").batch_size
          for m in ("source_only", "dann", "entmin", "oracle")}
  assert rows == {"source_only": 16, "dann": 32, "entmin": 32, "oracle": 32}
  for shift, (source, target) in demo.SHIFTS.items():
    config = demo.get_config(f"shift={shift}")
    assert (config.data.source.domain, config.data.target.domain) == (source, target)
    for name in (*source.split(","), *target.split(",")):
      domains.parse_domain(name)
  with pytest.raises(ValueError, match="shift 'fog'"):
    demo.get_config("shift=fog")
