"""Figures that look inside trained runs: where source and target features lie (PCA), and
which visual tokens the instruction selects (reweighting heat-maps).

  python -m drivlm_jax.visualize --runs runs/demo/seed0 --out runs/demo
"""
import argparse
import os

import jax
import numpy as np

from drivlm_jax import run as run_lib
from drivlm_jax.data import pipeline, sources
from drivlm_jax.data import tokenizer as tokenizer_lib
from drivlm_jax.model import vlm


def _load(run_dir):
  run = run_lib.load(run_dir)
  data = sources.prepare(run.config.data, run_dir)
  return (run.config, run.cfg, run.params, data,
          run_lib.features(run.config, run.cfg, data["tokenizer"]))


def _batch(spec, feats, n):
  return next(iter(pipeline.batches(spec, feats, n, train=False, shard_index=0, shard_count=1)))


def pooled_features(run_dir, n=200) -> dict:
  """{"source"|"target": [n, D]} attention-pooled visual features on the test splits."""
  config, cfg, params, data, feats = _load(run_dir)
  fn = jax.jit(lambda p, b: vlm.encode_image(cfg, p, b["image"], b["instruction_ids"],
                                             b["instruction_mask"])["pooled_visual"])
  out = {}
  for role in ("source", "target"):
    b = _batch(data[role, "test"], feats, n)
    out[role] = np.asarray(fn(params, {k: b[k] for k in ("image", "instruction_ids",
                                                          "instruction_mask")}))
  return out


def pca_2d(features: dict) -> dict:
  """Joint 2-D PCA of source and target features (numpy SVD)."""
  joint = np.concatenate([features["source"], features["target"]])
  mean = joint.mean(0)
  _, _, vt = np.linalg.svd(joint - mean, full_matrices=False)
  return {k: (v - mean) @ vt[:2].T for k, v in features.items()}


def plot_pca(run_dirs: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(run_dirs), figsize=(4.5 * len(run_dirs), 4), squeeze=False)
  for ax, (name, run_dir) in zip(axes[0], run_dirs.items()):
    xy = pca_2d(pooled_features(run_dir))
    for role, color in (("source", "tab:blue"), ("target", "tab:orange")):
      ax.scatter(xy[role][:, 0], xy[role][:, 1], s=6, alpha=0.6, c=color, label=role)
    ax.set_title(f"{name}: pooled visual features (PCA)", fontsize=9)
    ax.legend(fontsize=8)
  fig.tight_layout()
  with run_lib.path(path).open("wb") as f:
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)


def plot_reweighting(run_dir: str, path: str, n=4):
  """Target test images with the instruction's token gates (2 sigmoid(score), in (0, 2))
  over them; several cameras side by side, in camera order."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  config, cfg, params, data, feats = _load(run_dir)
  if not cfg.reweight:
    raise ValueError(f"{run_dir} has no instruction reweighting (model.reweight=False)")
  b = _batch(data["target", "test"], feats, n)
  scores = np.asarray(jax.jit(lambda p: vlm.encode_image(
      cfg, p, b["image"], b["instruction_ids"], b["instruction_mask"])["token_scores"])(params))
  tokenizer = tokenizer_lib.load(feats.tokenizer)
  grid, views = cfg.vision.grid, cfg.num_cameras
  side_by_side = lambda x: np.concatenate(list(x.reshape(views, *x.shape[-3:])), axis=1)
  rows, cols = (n, 1) if views > 1 else (1, n)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols * views, 3.6 * rows), squeeze=False)
  for i, ax in enumerate(axes.ravel()):
    image = side_by_side(b["image"][i])
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
    gates = side_by_side(2 / (1 + np.exp(-scores[i].reshape(views, grid, grid, 1))))[..., 0]
    ax.imshow(image)
    ax.imshow(gates, cmap="magma", alpha=0.55, extent=(0, image.shape[1], image.shape[0], 0))
    words = tokenizer.decode(b["instruction_ids"][i][b["instruction_mask"][i] > 0])
    ax.set_title(words[:40], fontsize=7)
    ax.axis("off")
  fig.tight_layout()
  with run_lib.path(path).open("wb") as f:
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)


def write(seed_dir: str, out: str):
  """pca.png (source_only vs drivlm_student) and reweighting.png (drivlm_student)."""
  runs = {m: os.path.join(seed_dir, m) for m in ("source_only", "drivlm_student")}
  plot_pca(runs, os.path.join(out, "pca.png"))
  plot_reweighting(runs["drivlm_student"], os.path.join(out, "reweighting.png"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", required=True, help="dir holding source_only/ and "
                      "drivlm_student/ run dirs (e.g. runs/demo/seed0)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  write(args.runs, args.out)
  print(f"wrote {args.out}/pca.png and {args.out}/reweighting.png")


if __name__ == "__main__":
  main()
