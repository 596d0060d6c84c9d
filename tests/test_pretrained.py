"""End to end from a pretrained checkpoint (CPU, tiny): a random tiny HF LLaVA with its own
tokenizer, chat template and processor -> a LoRA teacher (5 steps) -> a student distilled
from it -> `hf.save_vlm` and the ONNX export -> transformers generates from the saved VLM."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import demo
from drivlm_jax import evaluate, hf, lora, pretrained, run as run_lib, train
from drivlm_jax.data import tokenizer as tokenizer_lib
from drivlm_jax.model import vlm
from export import to_onnx
from tests import chat
from tests.test_lora import IMAGE_TOKEN, llava_dir
from tests.test_train import small_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A LLaVA directory with the tokenizer (`<image>` = 4) and processor beside it."""
  path, _ = llava_dir(tmp_path_factory.mktemp("llava"))
  chat.processor(image_size=32, patch_size=8).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
  root, cache = tmp_path_factory.mktemp("runs"), str(tmp_path_factory.mktemp("data"))
  teacher = str(root / "teacher")
  train.train(small_config(cache, f"method=drivlm_teacher,steps=5,tune=lora_lm,"
                                  f"init={checkpoint}"), teacher)
  student = str(root / "student")
  train.train(small_config(cache, f"method=drivlm_student,steps=3,teacher={teacher},"
                                  f"init={checkpoint}"), student)
  return teacher, student


def test_the_run_takes_model_and_tokenizer_from_the_checkpoint(checkpoint, runs):
  teacher, _ = runs
  config = run_lib.read_config(teacher)
  cfg = run_lib.model_config(config)
  assert config.data.tokenizer == checkpoint
  assert (cfg.vision.image_size, cfg.image_token_id) == (32, IMAGE_TOKEN)
  assert cfg.language.vocab_size == 272 and cfg.vision_feature_layer == -2
  # LoRA on the LM: the base kernels are the checkpoint's, bit for bit, after training; the
  # adapters moved.
  raw = config.copy_and_resolve_references()
  raw.lora.rank, raw.ema_decay = 0, 0.0      # the stored params, unmerged
  params, _ = run_lib.load_params(teacher, cfg, config=raw)
  _, base = hf.load_vlm(checkpoint)
  for path in lora.targets(config.lora, params):
    a, b = params, base
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(a, b)
  merged, _ = run_lib.load_params(teacher, cfg)
  q = ("language", "layers", "self_attn", "q_proj", "kernel")
  assert not np.array_equal(jax.tree_util.tree_reduce(lambda x, k: x[k], q, merged),
                            jax.tree_util.tree_reduce(lambda x, k: x[k], q, base))


def test_evaluate_and_a_warm_start_from_the_run_build_the_pretrained_model(checkpoint, runs):
  """`evaluate` with the training command's config builds the checkpoint's model, as train
  does (it built the preset's and could not restore); `init=<that run>` takes the run's
  model and tokenizer (it built the preset's and copied the params whose shapes matched)."""
  teacher, _ = runs
  stored = run_lib.read_config(teacher)
  command = small_config(stored.data.cache_dir,
                         f"method=drivlm_teacher,steps=5,tune=lora_lm,init={checkpoint}")
  result = evaluate.evaluate_run(command, teacher)
  assert 0 <= result["test"]["target"]["action_mAP"] <= 100
  assert json.loads(open(os.path.join(teacher, "eval.json")).read())["step"] == 5

  preset = small_config(stored.data.cache_dir, "method=source_only,steps=1")
  assert run_lib.model_config(preset).language != run_lib.model_config(stored).language
  warm = pretrained.configure(small_config(stored.data.cache_dir,
                                           f"method=source_only,steps=1,init={teacher}"))
  assert warm.data.tokenizer == checkpoint
  cfg, theirs = run_lib.model_config(warm), run_lib.model_config(stored)
  assert (cfg.vision, cfg.language, cfg.image_token_id) == (
      theirs.vision, theirs.language, theirs.image_token_id)
  fresh = jax.jit(lambda k: vlm.init(cfg, k))(jax.random.key(9))
  started = pretrained.start(fresh, cfg, warm)
  trained, _ = run_lib.load_params(teacher, theirs)
  for part in ("vision", "projector", "language"):   # every tensor of them, LoRA merged
    jax.tree.map(np.testing.assert_array_equal, started[part], trained[part])


def test_student_exports_to_llava_and_onnx(checkpoint, runs, tmp_path):
  _, student = runs
  run = run_lib.load(student)
  out = tmp_path / "student_llava"
  hf.save_vlm(run.cfg, run.params, out, tokenizer=checkpoint)
  processor = transformers.AutoProcessor.from_pretrained(out, local_files_only=True)
  model = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  messages = [{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": "What should the car do?"}]}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
  inputs = processor(text=text, images=image, return_tensors="pt")
  with torch.inference_mode():
    theirs = model.generate(**inputs, max_new_tokens=5, do_sample=False).numpy()
  # Our model, on the processor's inputs, gives the same greedy tokens as far as LLaVA
  # reaches: the instruction gates ride in drivlm.safetensors, which transformers ignores.
  tok = tokenizer_lib.load(checkpoint)
  assert run.cfg.reweight and tok.image_id == IMAGE_TOKEN
  llava_part = dataclasses.replace(run.cfg, reweight=False)
  ours = vlm.generate(llava_part, run.params, inputs["pixel_values"].numpy().transpose(0, 2, 3, 1),
                      inputs["input_ids"].numpy().astype(np.int32), max_new_tokens=5)
  np.testing.assert_array_equal(np.asarray(ours), theirs)

  onnx = tmp_path / "deploy" / "student.onnx"
  report = to_onnx.export_run(student, str(onnx), batch="dynamic")
  assert onnx.exists() and report["student"]
  assert os.path.isdir(tmp_path / "deploy" / "tokenizer")   # the checkpoint's own, copied


def test_a_checkpoint_that_does_not_fit_the_model_is_an_error(checkpoint):
  config = demo.get_config(f"init={checkpoint}")
  config = pretrained.configure(config)
  config.model.language.num_layers = 3     # no longer the checkpoint's model
  cfg = run_lib.model_config(config)
  params = jax.eval_shape(lambda k: vlm.init(cfg, k), jax.random.key(0))
  with pytest.raises(hf.CheckpointError, match="language.num_layers: 2 in the checkpoint, 3 in"):
    pretrained.start(params, cfg, config)


def test_one_line_errors_name_the_file_or_key(checkpoint, tmp_path):
  import shutil
  bare = tmp_path / "bare"          # the LLaVA weights without their tokenizer
  bare.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(checkpoint, name), bare / name)
  with pytest.raises(FileNotFoundError, match=f"{bare}: no tokenizer files"):
    pretrained.configure(demo.get_config(f"init={bare}"))
  pickled = tmp_path / "pickled"    # a pickle-only checkpoint is never read
  pickled.mkdir()
  shutil.copy(bare / "config.json", pickled / "config.json")
  (pickled / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(hf.CheckpointError, match="pickled holds only pickle weights"):
    hf.load_vlm(str(pickled))
  config = pretrained.configure(demo.get_config(f"init={checkpoint}"))
  config.model.image_token_id = 5   # the tokenizer's <image> is 4
  with pytest.raises(ValueError, match=r"<image> id 4.*model.image_token_id 5"):
    run_lib.features(config, run_lib.model_config(config), checkpoint)
  clip = tmp_path / "clip"          # a vision tower alone, given as the whole VLM
  clip.mkdir()
  (clip / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
  with pytest.raises(ValueError, match=r"an HF 'clip_vision_model' checkpoint, neither a LLaVA "
                                       r"VLM nor a run: give a vision tower as init_vision"):
    pretrained.configure(demo.get_config(f"init={clip}"))


def test_an_hf_llava_teacher_and_what_it_can_teach(checkpoint, tmp_path):
  from drivlm_jax.adapt import distillation
  from drivlm_jax.data import pipeline
  from drivlm_jax.sim import tokenizer as sim_tokenizer
  config = demo.get_config("method=drivlm_student,teacher=x")    # the sim's tokenizer
  cfg = run_lib.model_config(config)
  feats = pipeline.Features(tokenizer=sim_tokenizer.write(str(tmp_path)))
  kd = lambda heads, lm, feature: {"kd_heads": heads, "kd_lm": lm, "kd_feature": feature}
  with pytest.raises(ValueError, match="without DriVLM heads .* set --config.loss.kd_heads=0"):
    distillation.load_teacher(checkpoint, cfg, kd(1.0, 0.0, 1.0), config, feats)
  # the heads' relation term needs trained heads too (the student's default weight)
  with pytest.raises(ValueError, match="set --config.loss.kd_heads=0 --config.loss.kd_relation=0"):
    distillation.load_teacher(checkpoint, cfg, {**kd(1.0, 0.0, 1.0), "kd_relation": 0.3}, config,
                              feats)
  with pytest.raises(ValueError, match="heads; set --config.loss.kd_relation=0$"):
    distillation.load_teacher(checkpoint, cfg, {**kd(0.0, 0.0, 1.0), "kd_relation": 0.3}, config,
                              feats)
  with pytest.raises(ValueError, match=f"tokenizer {checkpoint}.* the sim BPE.*loss.kd_lm=0"):
    distillation.load_teacher(checkpoint, cfg, kd(0.0, 1.0, 1.0), config, feats)
  teacher = distillation.load_teacher(checkpoint, cfg, kd(0.0, 0.0, 1.0), config, feats)
  assert teacher.cfg.vision.image_size == 32 and {"heads", "vision"} <= set(teacher.params)
  # Same tokenizer, but the student's prompts hold one placeholder more than the teacher
  # splices (its class token kept): LM-logit distillation cannot feed them to the teacher.
  config = pretrained.configure(demo.get_config(f"method=drivlm_student,teacher=x,"
                                                f"init={checkpoint}"))
  same = run_lib.model_config(config)
  distillation.load_teacher(checkpoint, same, kd(0.0, 1.0, 1.0), config, feats)
  full = dataclasses.replace(same, vision_feature_select_strategy="full")
  with pytest.raises(ValueError, match=rf"splices {same.num_visual_tokens} visual tokens at "
                                       rf"token 4, the student's prompts hold "
                                       rf"{same.num_visual_tokens + 1}"):
    distillation.load_teacher(checkpoint, full, kd(0.0, 1.0, 1.0), config, feats)
