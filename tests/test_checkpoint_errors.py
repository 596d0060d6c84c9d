"""A wrong checkpoint gives an error that names the file or tensor and both shapes."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from drivlm_jax import hf
from tests import reference as ref


def _edit_tensors(path, edit):
  file = os.path.join(path, hf.SAFETENSORS)
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
  path = ref.save(ref.causal_lm(), tmp_path)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["intermediate_size"] += 8
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(hf.CheckpointError,
                     match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(64, 144\) "
                           r"in the checkpoint, the model expects \(64, 152\)"):
    hf.load_language_model(path)


def test_missing_tensor_is_named(tmp_path):
  path = ref.save(ref.clip_vision(), tmp_path)
  _edit_tensors(path, lambda t: t.pop("encoder.layers.1.mlp.fc1.bias"))
  with pytest.raises(hf.CheckpointError, match=r"missing tensor 'encoder\.layers\.1\.mlp\.fc1"
                                               r"\.bias' \(expected shape \(104,\)\)"):
    hf.load_vision_tower(path)


def test_unexpected_tensor_is_named(tmp_path):
  path = ref.save(ref.causal_lm(), tmp_path)
  _edit_tensors(path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros((3, 2),
                                                                                  np.float32)}))
  with pytest.raises(hf.CheckpointError, match=r"model\.layers\.0\.extra\.weight \(3, 2\)"):
    hf.load_language_model(path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
  model = ref.causal_lm()
  model.config.save_pretrained(str(tmp_path))
  torch.save(model.state_dict(), str(tmp_path / "pytorch_model.bin"))
  with pytest.raises(hf.CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\).*"
                                               r"safetensors only"):
    hf.load_language_model(str(tmp_path))


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(hf.CheckpointError, match="is not a directory"):
    hf.load_vision_tower(str(tmp_path / "nope"))
  with pytest.raises(hf.CheckpointError, match=r"config\.json not found"):
    hf.load_vision_tower(str(tmp_path))


def test_wrong_model_type_is_named(tmp_path):
  path = ref.save(ref.causal_lm(), tmp_path)
  with pytest.raises(hf.CheckpointError, match=r"model_type 'qwen2' is not a CLIP or SigLIP"):
    hf.load_vision_tower(path)
