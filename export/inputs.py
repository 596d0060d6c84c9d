"""Real inputs for the exported graphs: frames and instructions from our data pipeline (a
run's datasets, or a BDD-OIA / nuScenes folder), in the form the graphs take them."""
import dataclasses
import os

import numpy as np

from drivlm_jax import run as run_lib
from drivlm_jax.data import pipeline, sources
from drivlm_jax.data import tokenizer as tokenizer_lib


def raw_pixels(images, stats: tuple):
  """The pipeline's normalised images (`stats` = (mean, std)) -> 0..255 RGB float32 (what a
  camera gives)."""
  mean, std = (np.asarray(v, np.float32) for v in stats)
  return ((images * std + mean) * 255.0).astype(np.float32)


def take(spec, feats: pipeline.Features, n: int) -> dict:
  """Up to `n` examples of `spec` (no augmentation), as the graphs take them."""
  batch = pipeline.batch_dataset(spec, dataclasses.replace(feats, augment=False), n,
                                 train=False)[0]
  return {"image": raw_pixels(batch["image"], feats.statistics),
          "instruction_ids": batch["instruction_ids"],
          "instruction_mask": batch["instruction_mask"]}


def run_features(run_dir: str):
  """(config, data specs, pipeline.Features) of a trained run."""
  config = run_lib.read_config(run_dir)
  data = sources.prepare(config.data, run_dir)
  return config, data, run_lib.features(config, run_lib.model_config(config), data["tokenizer"])


def from_run(run_dir: str, n: int, role: str = "target", split: str = "test") -> dict:
  """Up to `n` examples of the run's `role` domain, `split` split (no augmentation)."""
  _, data, feats = run_features(run_dir)
  return take(data[role, split], feats, n)


def from_dir(directory: str, feats: pipeline.Features, n: int, cache_dir: str,
             split: str = "train") -> dict:
  """Up to `n` examples of a run directory (its target domain) or of a BDD-OIA / nuScenes
  folder (built once into `cache_dir`), tokenized as `feats` says."""
  if os.path.exists(os.path.join(directory, "config.json")):
    _, data, run_feats = run_features(directory)
    return take(data["target", split], run_feats, n)
  specs = sources.build_folder(directory, cache_dir)
  return take(specs[split], feats, n)


def prompts(tokenizer: str, num_image_tokens: int, instruction_ids, instruction_mask):
  """LM prompts for the instructions, built as the pipeline builds them (the sim's
  `<bos> <image> x N <instruction>`, or the checkpoint's chat template), left-padded to
  1 + N + L tokens (the sim's longest, the Jetson runner's width) or to the longest prompt
  when longer -> (input_ids [B, T] int32, attention_mask [B, T] int32)."""
  tok = tokenizer_lib.load(tokenizer)
  rows = [tok.prompt_from_ids(ids[m > 0], num_image_tokens)
          for ids, m in zip(instruction_ids, instruction_mask)]
  width = max(1 + num_image_tokens + instruction_ids.shape[1], *map(len, rows))
  ids = np.full((len(rows), width), tok.pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    ids[i, width - len(row):] = row
    mask[i, width - len(row):] = 1
  return ids, mask
