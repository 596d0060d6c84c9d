"""Where a config's data comes from: the procedural world written and built into a cache
directory (the embedded default), as tfds SourceSpecs per role and split."""
import json
import os

from data_builders import __main__ as build_cli
from drivlm_jax.data.pipeline import SourceSpec
from drivlm_jax.sim import bdd_oia as sim_bdd
from drivlm_jax.sim import tokenizer as sim_tokenizer


def prepare(data_config, workdir: str) -> dict:
  """-> {"tokenizer": path, ("source"|"target", "train"|"test"): SourceSpec}.

  Writes (once; a `.done` file marks a finished role) BDD-OIA-layout sim data for the source
  and target domains, and builds it with the bdd_oia builder.
  """
  if not data_config.sim:
    raise NotImplementedError("only the sim data is wired into configs so far "
                              "(config.data.sim=True)")
  root = data_config.cache_dir or os.path.join(workdir, "data")
  out = {}
  for role in ("source", "target"):
    spec = data_config[role]
    manual = os.path.join(root, "sim", role)
    done = os.path.join(manual, ".done")
    wanted = {k: spec[k] for k in ("domain", "seed", "train", "test")}
    wanted.update(width=data_config.width, height=data_config.height)
    if not os.path.exists(done) or json.load(open(done)) != wanted:
      if os.path.exists(manual):
        raise FileExistsError(f"{manual} holds other sim data than {wanted}; remove it or "
                              f"set config.data.cache_dir elsewhere")
      for split in ("train", "test"):
        sim_bdd.write(manual, spec.domain, spec[split], seed=spec.seed + (split == "test") * 100,
                      split=split, width=data_config.width, height=data_config.height)
      with open(done, "w") as f:
        json.dump(wanted, f)
    tfds_dir = os.path.join(root, "tfds", role)
    build_cli.build("bdd_oia", manual, tfds_dir)
    for split in ("train", "test"):
      out[role, split] = SourceSpec("bdd_oia", tfds_dir, split)
  out["tokenizer"] = sim_tokenizer.write(root)
  return out
