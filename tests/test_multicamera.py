"""Several cameras per example (model.num_cameras = V): one tower for every view, camera
embeddings, cross-view pruning, the six-camera nuScenes-Drive sim trained on a mesh, and the
V-camera student in ONNX."""
import dataclasses
import math
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest

from configs import demo
from drivlm_jax import run as run_lib, train
from drivlm_jax.data import pipeline, preprocess
from drivlm_jax.sim import tokenizer as sim_tokenizer
from drivlm_jax.model import discriminators, vlm
from export import graphs, to_onnx
from tests.test_train import read_metrics

V = 3


def _config(views=V, reweight_layer=0, family="clip", reweight=True):
  cfg = run_lib.model_config(demo.get_config("method=drivlm,teacher=none"))
  vision = dataclasses.replace(cfg.vision, family=family, image_size=32, patch_size=8)
  return dataclasses.replace(cfg, vision=vision, reweight=reweight,
                             reweight_layer=reweight_layer, num_cameras=views,
                             vision_feature_select_strategy="full" if family == "siglip"
                             else "default")


def _randomise(params, seed=0):
  """Trained-looking params: fresh gates (gain 0) tie every score, so top-k could pick any."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(a.dtype), params)


def _inputs(views, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, views, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(4, 200, (batch, 6)).astype(np.int32)
  mask = (np.arange(6) < np.array([[6], [3]])[:batch]).astype(np.int32)
  return images, ids, mask


def test_one_camera_is_the_single_image_model():
  """V = 1: no camera parameter, and [B, 1, H, W, 3] gives exactly what [B, H, W, 3] gives
  (the single-image model, checked against HF in test_llava / test_vlm)."""
  for layer in (0, None):
    cfg = _config(views=1, reweight_layer=layer)
    params = _randomise(vlm.init(cfg, jax.random.key(0)))
    assert "cameras" not in params
    images, ids, mask = _inputs(1)
    fn = jax.jit(lambda p, x: vlm.encode_image(cfg, p, x, ids, mask, keep_ratio=0.5))
    four, five = fn(params, images[:, 0]), fn(params, images)
    assert four.keys() == five.keys()
    for key in four:
      np.testing.assert_array_equal(np.asarray(four[key]), np.asarray(five[key]), err_msg=key)
  with pytest.raises(ValueError, match=r"\[B, 3, H, W, 3\]"):
    vlm.encode_image(_config(), vlm.init(_config(), jax.random.key(0)), images[:, 0], ids, mask)


@pytest.mark.parametrize("standardize", [False, True])
def test_views_are_the_single_image_model_side_by_side(standardize):
  """Without a scoring point inside the tower, V views are the V = 1 model's tokens of each
  view in turn (camera embeddings at 0), and the pooled image feature is their mean. The
  views differ in exposure: `standardize` works on each view alone."""
  multi = _config(reweight_layer=None)
  multi = dataclasses.replace(
      multi, vision=dataclasses.replace(multi.vision, standardize=standardize))
  single = dataclasses.replace(multi, num_cameras=1)
  params = _randomise(vlm.init(single, jax.random.key(0)))
  images, ids, mask = _inputs(V)
  images = images * np.array([1.0, 0.1, 3.0])[:, None, None, None] + np.array([0, -1, 0.5])[
      :, None, None, None]
  images = images.astype(np.float32)
  out = vlm.encode_image(multi, {**params, "cameras": jnp.zeros((V, 64))}, images, ids, mask)
  per_view = [vlm.encode_image(single, params, images[:, v], ids, mask) for v in range(V)]
  for key in ("patch_features", "token_scores"):
    np.testing.assert_allclose(out[key], np.concatenate([o[key] for o in per_view], axis=1),
                               atol=1e-5, err_msg=key)
  np.testing.assert_allclose(out["image_pooled"],
                             np.mean([o["image_pooled"] for o in per_view], axis=0), atol=1e-5)
  assert out["visual_tokens"].shape == (2, multi.num_visual_tokens, 64)


@pytest.mark.parametrize("layer", [0, None])
def test_pruning_across_views_keeps_k_overall(layer):
  """k = ceil(V * N * keep) tokens over all views, the best-scoring ones wherever they are;
  an instruction whose query matches one camera's embedding keeps only that camera."""
  cfg = _config(reweight_layer=layer)
  params = _randomise(vlm.init(cfg, jax.random.key(0)))
  images, ids, mask = _inputs(V, batch=1)
  n = cfg.vision.num_patches
  k = math.ceil(V * n * 0.25)
  out = vlm.encode_image(cfg, params, images, ids, mask, keep_ratio=0.25)
  assert out["kept_indices"].shape == (1, k)
  assert out["visual_tokens"].shape[1] == k
  scores = np.asarray(out["token_scores"][0])
  np.testing.assert_array_equal(out["kept_indices"][0], np.sort(np.argsort(-scores)[:k]))

  # Push view 1's embedding along the direction that raises its tokens' scores.
  view_score = lambda cams: jnp.mean(vlm.encode_image(
      cfg, {**params, "cameras": cams}, images, ids, mask)["token_scores"][0, n:2 * n])
  direction = jax.grad(view_score)(params["cameras"])[1]
  cameras = params["cameras"].at[1].add(1e3 * direction / jnp.linalg.norm(direction))
  kept = vlm.encode_image(cfg, {**params, "cameras": cameras}, images, ids, mask,
                          keep_ratio=0.25)["kept_indices"][0]
  assert np.all((kept >= n) & (kept < 2 * n)), kept


def test_instance_pooling_reads_each_box_in_its_camera():
  """A box of camera c pools view c's grid: the same as pooling that view alone."""
  grid, d = 4, 5
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(2, V * grid * grid, d)).astype(np.float32)
  boxes = np.array([[[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 0.5]]] * 2, np.float32)
  camera = np.array([[2, 0], [1, 1]], np.int32)
  mask = np.ones((2, 2), np.float32)
  got = discriminators.box_pool(tokens, grid, boxes, mask, camera, V)
  views = tokens.reshape(2, V, grid * grid, d)
  for b in range(2):
    for m in range(2):
      want = discriminators.box_pool(views[b:b + 1, camera[b, m]], grid, boxes[b:b + 1, m:m + 1],
                                     mask[b:b + 1, m:m + 1])
      np.testing.assert_allclose(got[b, m], want[0, 0], atol=1e-6)


def test_siglip_default_selection_is_refused_for_several_cameras():
  with pytest.raises(ValueError, match="'full'"):
    dataclasses.replace(_config(family="siglip"), vision_feature_select_strategy="default")


def test_six_camera_student_exports_with_static_views(tmp_path, keep_ratio=0.25):
  """The V = 6 student, pruned across views, in onnxruntime = JAX within 1e-4 (batch 1 and 4,
  V fixed at 6)."""
  cfg = _config(views=6)
  params = _randomise(vlm.init(cfg, jax.random.key(1)))
  rng = np.random.default_rng(0)
  feeds = {"image": rng.uniform(0, 255, (4, 6, 32, 32, 3)).astype(np.float32),
           "instruction_ids": rng.integers(4, 200, (4, 6)).astype(np.int32),
           "instruction_mask": (np.arange(6) < rng.integers(2, 7, (4, 1))).astype(np.int32)}
  path = str(tmp_path / "six.onnx")
  export_cfg = graphs.for_export(cfg)
  report = to_onnx.export_student(export_cfg, graphs.constants(params), path,
                                  keep_ratio=keep_ratio, feeds=feeds)
  assert set(report["max_abs_diff"]) == {1, 4}
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  shape = session.get_inputs()[0].shape
  assert shape[1:] == [6, 32, 32, 3], shape
  got = session.run(None, feeds)
  want = graphs.student(export_cfg, params, keep_ratio)(*feeds.values())
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, np.asarray(w), atol=1e-4)
  assert got[2].shape == (4, 6 * cfg.vision.num_patches)


def _nuscenes_config(cache, mesh):
  config = demo.get_config("method=drivlm_teacher,steps=3,dataset=nuscenes")
  config.data.cache_dir = cache
  config.data.source.update(train=2, test=1)
  config.data.target.update(train=2, test=1)
  config.data.target_fraction = 0.25
  config.batch_size = 8
  config.log_every_steps = 1
  config.loss.da_instance = 0.1
  config.evals = {"target": dict(type="heads", role="target", batch_size=8)}
  config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return config


def test_six_cameras_train_on_a_mesh_as_on_one_device(tmp_path_factory):
  """The six-camera nuScenes-Drive sim (boxes of every camera for the instance level): a
  (2, 2, 2) mesh gives the losses of one device to 1e-5."""
  assert jax.device_count() == 8
  cache = str(tmp_path_factory.mktemp("nuscenes"))
  runs = {}
  for mesh in ((1, 1, 1), (2, 2, 2)):
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train(_nuscenes_config(cache, mesh), workdir)
    runs[mesh] = read_metrics(workdir)
  # The mesh's checkpoint read back by a process with one device (evaluate, export, a
  # teacher on another machine): its arrays land on that device.
  code = ("from drivlm_jax import run; r = run.load(%r); "
          "import jax; print(r.step, {str(d) for a in jax.tree.leaves(r.params) "
          "for d in a.devices()})" % workdir)
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1"}
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split("\n")[-2] == "3 {'cpu:0'}", done.stdout
  a, b = runs.values()
  assert sorted(a) == sorted(b) == [1, 2, 3]
  for step in a:
    for key in ("loss", "loss_da_instance", "loss_da_token", "loss_action", "grad_norm"):
      assert abs(a[step][key] - b[step][key]) <= 1e-5, (step, key, a[step], b[step])


def test_box_slots_are_shared_by_every_camera():
  """Six cameras with five boxes each and 16 slots: each camera keeps two or three boxes,
  its first ones (taken in turn), not the first cameras all of theirs and the back none."""
  feats = pipeline.Features(tokenizer=sim_tokenizer.write(tempfile.mkdtemp()), image_size=32,
                            num_image_tokens=6 * 4, num_cameras=6, max_len=64, augment=False)
  views = []
  for _ in range(6):   # 64 x 36 frames, resized as the pipeline resizes them
    image, transform = preprocess.resize(np.zeros((36, 64, 3), np.uint8), 32, "pad", None)
    views.append((image, (transform, 64, 36)))
  boxes = np.array([[0.1 * i, 0.2, 0.1 * i + 0.3, 0.8] for _ in range(6) for i in range(5)],
                   np.float32)   # normalised
  example = {"resized_views": views, "boxes": boxes,
             "box_categories": np.arange(30, dtype=np.int32),
             "box_camera": np.repeat(np.arange(6, dtype=np.int32), 5),
             "actions": np.zeros(4, np.float32), "example_id": 0}
  out = pipeline.ExampleTransform(feats, domain=0, labelled=True, train=False, seed=0)(
      0, example)
  kept = out["box_categories"][out["box_mask"] > 0]
  assert len(kept) == 16
  per_camera = np.bincount(out["box_camera"][out["box_mask"] > 0], minlength=6)
  assert per_camera.min() >= 2 and per_camera.max() <= 3
  # Each camera keeps its first boxes (categories numbered camera by camera).
  for c in range(6):
    mine = sorted(kept[(kept >= 5 * c) & (kept < 5 * c + 5)] - 5 * c)
    assert mine == list(range(len(mine)))
