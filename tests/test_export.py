"""Export: ONNX graphs match the JAX model in onnxruntime, the TensorRT checks, INT8 Q/DQ."""
import dataclasses
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from drivlm_jax import hf, run as run_lib, train
from drivlm_jax.data import preprocess
from drivlm_jax.evals import heads
from drivlm_jax.model import cpu_gemm, reweighting, vlm
from export import checks, generate, graphs, inputs, kernels, quantize, rewrite, to_onnx
from tests import reference, test_cpu_gemm
from tests.test_train import small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny demo student (instruction reweighting, pruning inside the tower), 2 steps."""
  root = tmp_path_factory.mktemp("export")
  config = small_config(str(root / "data"), "method=drivlm,teacher=none,steps=2",
                        **{"distill.teacher": ""})     # the student without distillation
  train.train(config, str(root / "run"))
  return str(root / "run")


def _session(path):
  return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _reference_heads(cfg, params, feeds, keep_ratio):
  """The training model (scanned layers, the pipeline's normalisation) -> probabilities."""
  mean, std = preprocess.statistics(cfg.vision)
  images = (feeds["image"] / 255.0 - np.asarray(mean)) / np.asarray(std)
  out = vlm.encode_image(cfg, params, images.astype(np.float32), feeds["instruction_ids"],
                         feeds["instruction_mask"], keep_ratio)
  return jax.nn.sigmoid(out["action_logits"]), jax.nn.sigmoid(out["reason_logits"])


def test_cli_exports_the_demo_student_and_its_lm(run, tmp_path):
  out = tmp_path / "student.onnx"
  result = subprocess.run(
      [sys.executable, "-m", "export.to_onnx", "--workdir", run, "--out", str(out),
       "--keep-ratio", "0.25", "--lm", "--max-new-tokens", "4"],
      capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.with_suffix(".json").read_text())
  assert set(report["student"]["max_abs_diff"]) == {"1", "4"}
  assert (tmp_path / "tokenizer.json").exists()
  # The sidecar's features (JSON) serve the calibration pipeline (quantize, TensorRT), as do
  # those of an export from before the statistics were recorded (the family's).
  frame = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
  want = preprocess.normalize(frame, preprocess.MEAN_STD["clip"])
  np.testing.assert_array_equal(
      preprocess.normalize(frame, quantize.sidecar_features(str(out)).statistics), want)
  legacy = {k: v for k, v in report["features"].items() if k != "statistics"}
  old = tmp_path / "old" / "student.onnx"
  old.parent.mkdir()
  old.with_suffix(".json").write_text(json.dumps({**report, "features": {**legacy,
                                                                         "family": "clip"}}))
  shutil.copy(tmp_path / "tokenizer.json", old.parent / "tokenizer.json")
  np.testing.assert_array_equal(
      preprocess.normalize(frame, quantize.sidecar_features(str(old)).statistics), want)

  # Independently of the export's own check: fresh real frames, batch 4 then 1, against the
  # training-time model (scanned layers, pipeline normalisation).
  cfg = run_lib.model_config(run_lib.read_config(run))
  params, _ = run_lib.load_params(run, cfg)
  feeds = inputs.from_run(run, 4, role="source")
  session = _session(out)
  assert [i.name for i in session.get_inputs()] == ["image", "instruction_ids",
                                                      "instruction_mask"]
  for b in (4, 1):
    cut = {k: v[:b] for k, v in feeds.items()}
    got = session.run(["action_probs", "reason_probs", "token_scores"], cut)
    want = _reference_heads(cfg, params, cut, 0.25)
    np.testing.assert_allclose(got[0], want[0], atol=ATOL)
    np.testing.assert_allclose(got[1], want[1], atol=ATOL)
    assert got[2].shape == (b, cfg.num_visual_tokens)

  # The deployed latency breakdown: heads only and heads + a 4-token answer, from the
  # timed parts (the answer: student + prefill + 3 decode steps).
  bench = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, "-m", "export.benchmark", "--onnx", str(out), "--iters", "3",
       "--warmup", "1", "--answer-tokens", "4", "--out", str(bench)],
      capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  d = json.loads(bench.read_text())["deployed"]
  assert d["vision_heads_ms"] > 0 and d["lm_prefill_ms"] > 0 and d["decode_ms_per_token"] > 0
  np.testing.assert_allclose(d["fps_heads"], 1e3 / d["vision_heads_ms"])
  np.testing.assert_allclose(d["fps_heads_and_answer"], 1e3 / (
      d["vision_heads_ms"] + d["lm_prefill_ms"] + 3 * d["decode_ms_per_token"]))
  assert "frames/s with a 4-token answer" in result.stdout
  # The decode graph holds the 4 new tokens it was exported for: a 5-token answer is refused.
  result = subprocess.run(
      [sys.executable, "-m", "export.benchmark", "--onnx", str(out), "--jax", "",
       "--answer-tokens", "5"], capture_output=True, text=True, timeout=600, check=False,
      cwd=ROOT)
  assert result.returncode == 2 and "--answer-tokens 5: " in result.stderr and \
      "has cache room for 4 new tokens" in result.stderr, result.stderr[-3000:]
  # On the device: the deploy folder without the training run times without JAX.
  device = tmp_path / "device"
  device.mkdir()
  shutil.copy(out, device / "student.onnx")
  sidecar = json.loads(out.with_suffix(".json").read_text())
  (device / "student.json").write_text(json.dumps({**sidecar, "run": "/elsewhere/run"}))
  result = subprocess.run(
      [sys.executable, "-m", "export.benchmark", "--onnx", str(device / "student.onnx"),
       "--iters", "2", "--warmup", "1", "--out", str(bench)],
      capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "/elsewhere/run (the run in" in result.stdout
  assert set(json.loads(bench.read_text())["latency"]) == {"onnxruntime"}

  # The LM graphs generate what vlm.generate generates.
  ids, mask = inputs.prompts(str(tmp_path / "tokenizer.json"), cfg.num_visual_tokens,
                             feeds["instruction_ids"], feeds["instruction_mask"])
  prefill_feeds = {**feeds, "input_ids": ids, "attention_mask": mask}
  tokens = generate.greedy(_session(tmp_path / "student_prefill.onnx"),
                           _session(tmp_path / "student_decode.onnx"), prefill_feeds, 4)
  mean, std = preprocess.statistics(cfg.vision)
  images = (feeds["image"] / 255.0 - np.asarray(mean)) / np.asarray(std)
  want = vlm.generate(cfg, params, images.astype(np.float32), ids, 4,
                      instruction_ids=feeds["instruction_ids"],
                      instruction_mask=feeds["instruction_mask"], attention_mask=mask)
  np.testing.assert_array_equal(tokens, np.asarray(want)[:, ids.shape[1]:])


def test_the_jax_student_on_the_fastest_cpu_kernels_matches_the_training_model(run):
  _, cfg, params, _ = to_onnx.load(run)
  feeds = inputs.from_run(run, 1)
  trained = run_lib.model_config(run_lib.read_config(run))
  want = _reference_heads(trained, run_lib.load_params(run, trained)[0], feeds, 0.25)
  student = graphs.student(cfg, params, 0.25)
  for name, options in kernels.CPU_CANDIDATES.items():   # each policy computes it
    fn, chosen, _ = kernels.fastest(student, list(feeds.values()), {name: options})
    assert chosen == name
    np.testing.assert_allclose(fn(*feeds.values())[0], want[0], atol=ATOL)
  fn, chosen, p50 = kernels.fastest(student, list(feeds.values()), iters=2)
  assert set(p50) == set(kernels.CPU_CANDIDATES) and chosen == min(p50, key=p50.get)
  got = fn(*feeds.values())
  np.testing.assert_allclose(got[0], want[0], atol=ATOL)
  np.testing.assert_allclose(got[1], want[1], atol=ATOL)


def _hf_tower_student(tmp_path, tower, **changes):
  """(cfg, params, feeds [4 frames]): the demo student on an HF vision tower (32 px),
  reweighting with random gates (fresh ones have gain 0: every score ties and top-k may pick
  any token; trained ones do not tie)."""
  vcfg, vparams = hf.load_vision_tower(reference.save(tower, tmp_path / "tower"))
  demo = run_lib.model_config(small_config(str(tmp_path), "method=drivlm,teacher=none"))
  cfg = dataclasses.replace(demo, vision=vcfg, reweight=True,
                            **{"reweight_layer": None, **changes})
  params = {**vlm.init(cfg, jax.random.key(1)), "vision": vparams}
  rng = np.random.default_rng(0)
  params["reweighting"] = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(a.dtype),
                                       params["reweighting"])
  feeds = {"image": rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32),
           "instruction_ids": rng.integers(4, 200, (4, 6)).astype(np.int32),
           "instruction_mask": (np.arange(6) < rng.integers(2, 7, (4, 1))).astype(np.int32)}
  return cfg, params, feeds


@pytest.mark.parametrize("keep_ratio,standardize,gemm", [(1.0, False, "auto"),
                                                         (0.5, True, "mkl")])
def test_hf_clip_student_round_trips_with_a_dynamic_batch(tmp_path, keep_ratio, standardize,
                                                          gemm):
  """A CLIP vision tower loaded from an HF checkpoint, pruned before the projector; with
  `standardize` each image of the batch is standardised on its own inside the graph. With
  the JAX side's matmuls on MKL (`cpu_gemm`, as on an Intel CPU) the graph is traced with
  XLA's dots all the same."""
  if gemm == "mkl" and test_cpu_gemm.MISSING:
    pytest.skip(f"MKL kernel: {test_cpu_gemm.MISSING}")
  with cpu_gemm.use(gemm):
    _clip_student_round_trip(tmp_path, keep_ratio, standardize)


def _clip_student_round_trip(tmp_path, keep_ratio, standardize):
  cfg, params, feeds = _hf_tower_student(tmp_path, reference.clip_vision(image_size=32,
                                                                         patch_size=8))
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision,
                                                            standardize=standardize))
  # Four exposures: standardising over the batch instead of per image would differ between
  # the batch-4 and the batch-1 runs.
  feeds["image"] = np.clip(feeds["image"] * np.array([0.1, 0.5, 1.0, 0.3])[:, None, None, None]
                           + np.array([0, 100, 0, 150])[:, None, None, None], 0, 255).astype(
                               np.float32)
  path = str(tmp_path / "clip_student.onnx")
  report = to_onnx.export_student(graphs.for_export(cfg), graphs.constants(params), path,
                                  keep_ratio=keep_ratio, feeds=feeds)
  assert set(report["max_abs_diff"]) == {1, 4}
  assert "Einsum" not in report["ops"] or report["ops"]["MatMul"] > 0
  session = _session(path)
  for b in (1, 4):
    cut = {k: v[:b] for k, v in feeds.items()}
    got = session.run(["action_probs", "reason_probs"], cut)
    want = _reference_heads(cfg, params, cut, keep_ratio)
    np.testing.assert_allclose(got[0], want[0], atol=ATOL)
    np.testing.assert_allclose(got[1], want[1], atol=ATOL)


@pytest.mark.parametrize("strategy,keep_ratio,reweight_layer", [
    ("default", 1.0, None), ("default", 0.05, 1), ("full", 0.25, 0)])
def test_siglip_student_exports_and_default_never_keeps_a_dropped_patch(
    tmp_path, strategy, keep_ratio, reweight_layer):
  """SigLIP has no class token: the exported graph holds no empty tensor (an empty Reshape
  reads as "copy the input dim" in ONNX: one token too many per view, or a failed run with
  the graph optimiser off), and "default" drops each view's first patch, so pruning never
  keeps it: keep 0.05 of 16 patches still gives a visual token. onnxruntime with and without
  its graph optimiser against the training model."""
  cfg, params, feeds = _hf_tower_student(
      tmp_path, reference.siglip_vision(image_size=32, patch_size=8),
      reweight_layer=reweight_layer, vision_feature_select_strategy=strategy)
  out = vlm.encode_image(cfg, params, np.zeros((1, 32, 32, 3), np.float32),
                         feeds["instruction_ids"][:1], feeds["instruction_mask"][:1], keep_ratio)
  assert out["visual_tokens"].shape[1] >= 1
  if keep_ratio < 1 and strategy == "default":
    assert 0 not in np.asarray(out["kept_indices"])   # the patch "default" drops
  path = str(tmp_path / "siglip_student.onnx")
  to_onnx.export_student(graphs.for_export(cfg), graphs.constants(params), path,
                         keep_ratio=keep_ratio, feeds=feeds)
  want = _reference_heads(cfg, params, feeds, keep_ratio)
  for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    got = session.run(["action_probs", "reason_probs"], feeds)
    np.testing.assert_allclose(got[0], want[0], atol=ATOL)
    np.testing.assert_allclose(got[1], want[1], atol=ATOL)


def _model(nodes, inputs_, outputs, opset, initializers=()):
  graph = helper.make_graph(nodes, "g", inputs_, outputs, initializer=list(initializers))
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_tensorrt_check_rejects_what_tensorrt_10_3_cannot_parse(tmp_path):
  x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
  y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
  scale = onnx.numpy_helper.from_array(np.ones(8, np.float32), "scale")
  rms = _model([helper.make_node("RMSNormalization", ["x", "scale"], ["y"], axis=-1)],
               [x], [y], 23, [scale])
  onnx.checker.check_model(rms, full_check=True)          # a valid graph, opset 23
  problems = checks.tensorrt_problems(rms)
  assert any("opset 23" in p for p in problems)
  assert any("RMSNormalization" in p for p in problems)
  onnx.save(rms, tmp_path / "rms.onnx")
  with pytest.raises(checks.GraphError, match="RMSNormalization"):
    checks.check(str(tmp_path / "rms.onnx"))

  k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
  idx = helper.make_tensor_value_info("i", TensorProto.INT64, [2, None])
  top = _model([helper.make_node("TopK", ["x", "k"], ["y", "i"])], [x, k],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None]), idx], 17)
  assert any("TopK" in p and "constant" in p for p in checks.tensorrt_problems(top))

  fine = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], 17)
  assert checks.tensorrt_problems(fine) == []


@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("abc,cd->abd", (2, 5, 8), (8, 6)),
    ("abc,cde->abde", (2, 5, 8), (8, 2, 3)),
    ("abcd,cde->abe", (2, 5, 2, 4), (2, 4, 6))])
def test_einsum_to_matmul_keeps_the_graph_output(equation, x_shape, w_shape):
  rng = np.random.default_rng(0)
  w = onnx.numpy_helper.from_array(rng.normal(size=w_shape).astype(np.float32), "w")
  x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", *x_shape[1:]])
  feed = {"x": rng.normal(size=x_shape).astype(np.float32)}
  want = np.einsum(equation, feed["x"], onnx.numpy_helper.to_array(w))
  y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", *want.shape[1:]])
  model = _model([helper.make_node("Einsum", ["x", "w"], ["y"], equation=equation)], [x], [y],
                 18, [w])
  assert rewrite.einsum_to_matmul(model) == 1
  onnx.checker.check_model(model, full_check=True)
  assert [n.op_type for n in model.graph.node].count("Einsum") == 0
  got = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_int8_qdq_graph_is_valid_and_close_to_fp32(run, tmp_path):
  _, cfg, params, _ = to_onnx.load(run)
  calib = inputs.from_run(run, 16, role="target", split="train")
  held_out = inputs.from_run(run, 8, role="target", split="test")
  fp32 = str(tmp_path / "student.onnx")
  to_onnx.export_student(cfg, params, fp32, keep_ratio=1.0, feeds=held_out)
  int8 = str(tmp_path / "student.int8.onnx")
  quantize.quantize(fp32, int8, calib)
  ops = checks.check(int8)                # valid, parseable, symmetric (zero points 0)
  assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] >= ops["MatMul"] > 0
  err = quantize.error(fp32, int8, held_out)   # the Q/DQ graph as written (TensorRT's math)
  assert err["action_probs"] < 0.05 and err["reason_probs"] < 0.05, err


def test_tensorrt_engine(run, tmp_path):
  onnx_path = str(tmp_path / "student.onnx")
  _, cfg, params, _ = to_onnx.load(run)
  feeds = inputs.from_run(run, 4)
  to_onnx.export_student(cfg, params, onnx_path, keep_ratio=0.25, feeds=feeds)
  engine = str(tmp_path / "student.plan")
  result = subprocess.run(
      [sys.executable, "-m", "export.to_tensorrt", "--onnx", onnx_path, "--engine", engine,
       "--max-batch", "4"], capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
  assert "trtexec --onnx=" in result.stdout and "--maxShapes=image:4x64x64x3" in result.stdout
  if importlib.util.find_spec("tensorrt") is None:
    # Without TensorRT the script says where to build and fails (status 2).
    assert result.returncode == 2 and "build them on the target" in result.stderr
    pytest.skip("tensorrt is not installed (engines are built on the target GPU); checked "
                "the script's message and trtexec command instead")
  import torch  # pylint: disable=import-outside-toplevel
  if not torch.cuda.is_available():
    pytest.skip("tensorrt is installed but there is no CUDA GPU to build an engine on")
  assert result.returncode == 0, result.stderr[-3000:]
  from export import tensorrt_runner  # pylint: disable=import-outside-toplevel
  got = tensorrt_runner.Engine(engine)(feeds)
  want = _session(onnx_path).run(None, feeds)
  np.testing.assert_allclose(got["action_probs"], want[0], atol=1e-3)


def test_arguments_the_export_cannot_honour_are_refused_up_front(tmp_path):
  """Before any model is loaded: an --out in a bucket (the files are written locally), a
  batch of 0, a keep ratio outside (0, 1] (above 1 would export the unpruned graph under the
  asked ratio), an LM asked for no new token, and opsets below 13 (jax2onnx writes Squeeze
  with its axes as an input)."""
  with pytest.raises(ValueError, match=r"--out gs://b/s.onnx: .* local folder"):
    to_onnx.export_run(str(tmp_path), "gs://b/s.onnx")
  with pytest.raises(ValueError, match=r"batch 0: 'dynamic' or a positive integer"):
    to_onnx.export_run(str(tmp_path), str(tmp_path / "s.onnx"), batch=0)
  for keep in (1.5, float("nan"), 0.0):
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got"):
      to_onnx.export_run(str(tmp_path), str(tmp_path / "s.onnx"), keep_ratio=keep)
  with pytest.raises(ValueError, match=r"--max-new-tokens 0: the LM graphs generate at least"):
    to_onnx.export_run(str(tmp_path), str(tmp_path / "s.onnx"), lm=True, max_new_tokens=0)
  with pytest.raises(ValueError, match=r"--opset 12: the export writes opsets 13-"):
    to_onnx.convert(lambda x: x, [], ["x"], ["y"], str(tmp_path / "s.onnx"), 12)


@pytest.mark.parametrize("module", ["export.quantize", "export.benchmark"])
def test_a_missing_onnx_is_named(module, tmp_path):
  extra = ["--calib", str(tmp_path), "--out", str(tmp_path / "o.onnx")] if "quant" in module \
      else []
  result = subprocess.run([sys.executable, "-m", module, "--onnx", str(tmp_path / "no.onnx"),
                           *extra], capture_output=True, text=True, timeout=300, check=False,
                          cwd=ROOT)
  assert result.returncode == 2 and f"--onnx {tmp_path / 'no.onnx'}: no such file" in \
      result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("content", [b"", b"not a graph"])
def test_a_graph_onnxruntime_cannot_load_is_named(content, tmp_path):
  path = tmp_path / "student.onnx"
  path.write_bytes(content)
  result = subprocess.run([sys.executable, "-m", "export.benchmark", "--onnx", str(path)],
                          capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
  assert result.returncode == 2 and f"{path}: onnxruntime cannot load it" in result.stderr \
      and "Traceback" not in result.stderr


def test_the_pruned_evaluation_scores_the_deployed_float32_student(run):
  """A mixed-precision run's pruned evaluation (target_pruned) scores what is deployed: the
  exported student computes in float32, so the evaluation does too."""
  trained = run_lib.load(run)
  _, data, feats = inputs.run_features(run)
  pruned = heads.Heads(name="t", every=1, role="target", batch_size=8, keep_ratio=0.25)
  bf16 = vlm.with_dtype(trained.cfg, "bfloat16")
  got = pruned.run(bf16, trained.params, data, feats)
  assert got == pruned.run(vlm.with_dtype(trained.cfg, "float32"), trained.params, data, feats)
  assert got != heads.Heads(name="t", every=1, role="target", batch_size=8).run(
      bf16, trained.params, data, feats)   # the unpruned evaluation keeps the run's bf16


def test_tied_scores_keep_the_tokens_onnx_topk_keeps():
  """Ties (a reweighting gain of 0 scores every token +0 or -0) go to the lower index, as
  onnxruntime's TopK keeps them: the JAX model and the exported graph prune alike."""
  scores = np.array([[-0.0, 0.0, -0.0, 0.0, 0.5, -0.0]], np.float32)
  graph = helper.make_graph(
      [helper.make_node("TopK", ["x", "k"], ["values", "indices"])], "topk",
      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6]),
       helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
      [helper.make_tensor_value_info("values", TensorProto.FLOAT, [1, 3]),
       helper.make_tensor_value_info("indices", TensorProto.INT64, [1, 3])])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  want = np.sort(session.run(None, {"x": scores, "k": np.array([3], np.int64)})[1], axis=-1)
  np.testing.assert_array_equal(reweighting.top_k(jnp.asarray(scores), 0.5), want)
