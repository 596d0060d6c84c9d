"""LLaMA/Qwen2 parity against transformers: logits, hidden states, gradients, padding, KV cache,
generate, RoPE scaling."""
import dataclasses
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
import transformers

from configs import demo
from drivlm_jax import hf, pretrained, run as run_lib
from drivlm_jax.model import language, layers, vlm
from tests import reference as ref

TOL = 1e-5

CASES = {
    "qwen2_gqa_tied": dict(family="qwen2", kv_heads=2, tie=True, pad=5),
    "qwen2_mqa_untied": dict(family="qwen2", kv_heads=1, tie=False, layers=3),
    "llama_mha_bias_untied": dict(family="llama", kv_heads=4, tie=False, bias=True, pad=3),
    "llama_gqa_tied_headdim": dict(family="llama", kv_heads=2, tie=True, head_dim=24),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def lm(request, tmp_path_factory):
  model = ref.causal_lm(**CASES[request.param])
  path = ref.save(model, tmp_path_factory.mktemp(request.param))
  cfg, params = hf.load_language_model(path)
  return model, cfg, params


def _ids(batch, length, vocab, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def test_logits_and_hidden_states_match(lm):
  model, cfg, params = lm
  ids = _ids(2, 11, cfg.vocab_size)
  out = language.forward(cfg, params, ids)
  with torch.inference_mode():
    theirs = model(torch.from_numpy(ids).long(), output_hidden_states=True)
  assert ref.max_diff(out["logits"], theirs.logits) <= TOL
  assert ref.max_diff(out["hidden_states"], theirs.hidden_states[-1]) <= TOL
  assert ref.max_diff(language.apply(cfg, params, ids), theirs.logits) <= TOL


def test_left_padded_batch_matches(lm):
  model, cfg, params = lm
  ids = _ids(3, 9, cfg.vocab_size, seed=1)
  mask = np.ones_like(ids)
  mask[0, :4] = 0
  mask[2, :1] = 0
  ids[mask == 0] = 0
  positions = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
  ours = language.apply(cfg, params, ids, attention_mask=mask)
  with torch.inference_mode():
    theirs = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                   position_ids=torch.from_numpy(positions).long()).logits.numpy()
  real = mask > 0
  assert ref.max_diff(np.asarray(ours)[real], theirs[real]) <= TOL
  # A padded row computes what the same row computes unpadded.
  alone = language.apply(cfg, params, ids[:1, 4:])
  assert ref.max_diff(np.asarray(ours)[0, 4:], np.asarray(alone)[0]) <= TOL


def test_prefill_and_decode_equal_full_forward(lm):
  model, cfg, params = lm
  ids = _ids(2, 10, cfg.vocab_size, seed=2)
  with torch.inference_mode():
    full = model(torch.from_numpy(ids).long()).logits.numpy()
  cache = language.init_cache(cfg, 2, 12)
  out = language.forward(cfg, params, ids[:, :6], cache=cache)
  logits = [out["logits"]]
  cache = out["cache"]
  for t in range(6, 10):
    out = language.forward(cfg, params, ids[:, t:t + 1], cache=cache)
    logits.append(out["logits"])
    cache = out["cache"]
  assert ref.max_diff(jnp.concatenate(logits, axis=1), full) <= TOL
  assert int(cache["index"]) == 10


def test_greedy_generate_matches_hf(lm):
  model, cfg, params = lm
  ids = _ids(2, 7, cfg.vocab_size, seed=3)
  ours = language.generate(cfg, params, ids, max_new_tokens=8)
  with torch.inference_mode():
    theirs = model.generate(torch.from_numpy(ids).long(),
                            attention_mask=torch.ones(ids.shape, dtype=torch.long),
                            max_new_tokens=8, do_sample=False, pad_token_id=0)
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())
  assert len(set(np.asarray(ours)[0, 7:].tolist())) > 1  # not a degenerate repeat


def test_left_padded_generate_matches_hf(lm):
  model, cfg, params = lm
  ids = _ids(2, 8, cfg.vocab_size, seed=4)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  ids[mask == 0] = 0
  ours = language.generate(cfg, params, ids, max_new_tokens=6, attention_mask=mask)
  with torch.inference_mode():
    theirs = model.generate(torch.from_numpy(ids).long(),
                            attention_mask=torch.from_numpy(mask).long(),
                            max_new_tokens=6, do_sample=False, pad_token_id=0)
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_generate_stops_at_eos_like_hf(lm):
  model, cfg, params = lm
  ids = _ids(2, 7, cfg.vocab_size, seed=3)
  free = np.asarray(language.generate(cfg, params, ids, max_new_tokens=8))
  eos = int(free[0, 9])  # row 0 hits this token on its 3rd new step
  ours = np.asarray(language.generate(cfg, params, ids, max_new_tokens=8, eos_token_id=eos,
                                      pad_token_id=0))
  with torch.inference_mode():
    theirs = model.generate(torch.from_numpy(ids).long(),
                            attention_mask=torch.ones(ids.shape, dtype=torch.long),
                            max_new_tokens=8, do_sample=False, eos_token_id=eos,
                            pad_token_id=0).numpy()
  n = theirs.shape[1]  # HF stops once every row has finished
  np.testing.assert_array_equal(ours[:, :n], theirs)
  assert (ours[:, n:] == 0).all()


def test_generate_stops_at_any_of_several_eos_like_hf(lm):
  """A checkpoint's eos may be several ids (generation_config), a chat template's end of
  turn besides the tokenizer's eos: a row stops at the first of any."""
  model, cfg, params = lm
  ids = _ids(2, 7, cfg.vocab_size, seed=3)
  free = np.asarray(language.generate(cfg, params, ids, max_new_tokens=8))
  eos = (int(free[1, 8]), int(free[0, 10]))   # row 1 stops at its 2nd step, row 0 later
  ours = np.asarray(language.generate(cfg, params, ids, max_new_tokens=8, eos_token_id=eos,
                                      pad_token_id=0))
  with torch.inference_mode():
    theirs = model.generate(torch.from_numpy(ids).long(),
                            attention_mask=torch.ones(ids.shape, dtype=torch.long),
                            max_new_tokens=8, do_sample=False, eos_token_id=list(eos),
                            pad_token_id=0).numpy()
  n = theirs.shape[1]
  np.testing.assert_array_equal(ours[:, :n], theirs)
  assert (ours[:, n:] == 0).all() and (ours[1, 9:] == 0).all()


def test_sampling_is_reproducible_and_respects_top_p(lm):
  _, cfg, params = lm
  ids = _ids(2, 5, cfg.vocab_size, seed=5)
  kw = dict(max_new_tokens=6, temperature=0.8, top_p=0.9)
  a = language.generate(cfg, params, ids, rng=jax_key(1), **kw)
  b = language.generate(cfg, params, ids, rng=jax_key(1), **kw)
  np.testing.assert_array_equal(a, b)
  # With a tiny nucleus only the argmax survives: sampling equals greedy.
  greedy = language.generate(cfg, params, ids, max_new_tokens=6)
  tiny = language.generate(cfg, params, ids, max_new_tokens=6, temperature=1.0, top_p=1e-6,
                           rng=jax_key(2))
  np.testing.assert_array_equal(greedy, tiny)


def jax_key(seed):
  import jax
  return jax.random.key(seed)


def test_save_round_trip_loads_in_transformers(lm, tmp_path):
  model, cfg, params = lm
  hf.save_language_model(cfg, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(reloaded) is type(model)
  ids = _ids(2, 9, cfg.vocab_size, seed=6)
  with torch.inference_mode():
    theirs = reloaded(torch.from_numpy(ids).long()).logits
  assert ref.max_diff(language.apply(cfg, params, ids), theirs) <= TOL


def test_gradients_match(lm, tmp_path):
  """The backward (SwiGLU recomputed from gate and up, the tied head's custom gradient):
  every parameter's float32 gradient of a token cross-entropy matches torch's, also where the
  pad id is read as a token (its embedding row, transformers' padding_idx, gets none)."""
  model, cfg, params = lm
  ids = _ids(2, 9, cfg.vocab_size, seed=7)
  if cfg.pad_token_id is not None:
    ids[:, 2] = cfg.pad_token_id

  def loss(p):
    logits = language.apply(cfg, p, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  hf.save_language_model(cfg, jax.grad(loss)(params), str(tmp_path))   # HF names and layouts
  ours = safetensors.numpy.load_file(str(tmp_path / hf.SAFETENSORS))
  model.zero_grad()
  logits = model(torch.from_numpy(ids).long()).logits
  torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                    torch.from_numpy(ids[:, 1:]).long().flatten()).backward()
  theirs = {n: p.grad.numpy() for n, p in model.named_parameters()}
  assert set(theirs) <= set(ours) and len(theirs) > 10
  for name, g in theirs.items():
    assert ref.max_diff(ours[name], g) <= 2e-5 * max(np.abs(g).max(), 1e-3), name


def test_a_negative_pad_id_freezes_the_last_row_as_torch_reads_it():
  """torch's nn.Embedding reads padding_idx=-1 from the end: row vocab - 1 gets no gradient
  from its lookups, through the decoder and through `embed_tokens` (the VLM's splice)."""
  model = ref.causal_lm(family="llama", tie=False, pad=-1)
  assert model.model.embed_tokens.padding_idx == model.config.vocab_size - 1
  cfg, params = hf.load_language_model(ref.save(model, tempfile.mkdtemp()))
  ids = _ids(2, 9, cfg.vocab_size, seed=5)
  ids[:, 3] = cfg.vocab_size - 1
  model.zero_grad()
  logits = model(torch.from_numpy(ids).long()).logits
  torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                    torch.from_numpy(ids[:, 1:]).long().flatten()).backward()
  theirs = model.model.embed_tokens.weight.grad.numpy()
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      language.apply(cfg, p, ids)[:, :-1], ids[:, 1:]).mean()
  ours = np.asarray(jax.grad(loss)(params)["embed_tokens"]["embedding"])
  assert ref.max_diff(ours, theirs) <= 2e-5 * np.abs(theirs).max()
  spliced = jax.grad(lambda p: language.embed_tokens(cfg, p, ids).sum())(params)
  rows = np.abs(np.asarray(spliced["embed_tokens"]["embedding"])).sum(-1)
  assert rows[cfg.vocab_size - 1] == 0 and rows[ids[0, 0]] > 0


SCALED_ROPE = {   # positions up to 40 against an "original" context of 32 or 16
    "llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "linear": ("llama", {"rope_type": "linear", "factor": 2.5}),
    "yarn": ("qwen2", {"rope_type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": 16}),
    "yarn_mscale": ("qwen2", {"rope_type": "yarn", "factor": 3.0, "beta_fast": 16,
                              "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5,
                              "truncate": False, "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("case", sorted(SCALED_ROPE))
def test_scaled_rope_matches(case, tmp_path):
  """Llama 3.1's, linear and YaRN RoPE scaling as transformers computes them; a save loads
  back in transformers with the same rope_parameters."""
  family, scaling = SCALED_ROPE[case]
  model = ref.causal_lm(family=family, rope={**scaling, "rope_theta": 5000.0})
  cfg, params = hf.load_language_model(ref.save(model, tmp_path / "in"))
  assert dict(cfg.rope_scaling) == scaling
  ids = _ids(2, 40, cfg.vocab_size, seed=8)
  with torch.inference_mode():
    theirs = model(torch.from_numpy(ids).long()).logits
  assert ref.max_diff(language.apply(cfg, params, ids), theirs) <= TOL
  plain = dataclasses.replace(cfg, rope_scaling=())   # the scaling matters at these lengths
  assert ref.max_diff(language.apply(plain, params, ids), theirs) > 1e-3
  hf.save_language_model(cfg, params, str(tmp_path / "out"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert {k: v for k, v in reloaded.config.rope_parameters.items()
          if k in scaling} == scaling
  with torch.inference_mode():
    assert ref.max_diff(reloaded(torch.from_numpy(ids).long()).logits, theirs) <= TOL


@pytest.mark.parametrize("case", ["default"] + sorted(SCALED_ROPE))
def test_jitted_rope_tables_match_transformers_at_long_positions(case, tmp_path):
  """cos/sin up to position 100000 from a jitted function: the table must not drift there
  (computed inside jit, XLA's rewrites put frequencies an ulp off: 1e-2 at 100000)."""
  family, scaling = SCALED_ROPE.get(case, ("qwen2", {}))
  rope = {"rope_type": "default", **scaling, "rope_theta": 1_000_000.0}
  model = ref.causal_lm(family=family, rope=rope)
  cfg, _ = hf.load_language_model(ref.save(model, tmp_path))
  positions = np.array([[0, 7, 1000, 8000, 32000, 100000]], np.int32)
  cos, sin = jax.jit(lambda p: language.rope_tables(p, cfg))(positions)
  x = torch.zeros(1, positions.shape[1], cfg.hidden_size)
  their_cos, their_sin = model.model.rotary_emb(x, torch.from_numpy(positions).long())
  assert ref.max_diff(cos[:, :, 0], their_cos) <= 1e-6
  assert ref.max_diff(sin[:, :, 0], their_sin) <= 1e-6


def test_scaled_rope_reaches_a_run_config(tmp_path):
  """`init_language` with Llama 3.1 RoPE: the run's config.json keeps the scaling (a dict),
  and the model config read back from it has it."""
  family, scaling = SCALED_ROPE["llama3"]
  path = ref.save(ref.causal_lm(family=family, rope={**scaling, "rope_theta": 5000.0}),
                  tmp_path / "lm")
  config = demo.get_config()
  with config.unlocked():
    config.init_language, config.data.tokenizer = path, str(tmp_path / "tokenizer")
  run_lib.write_config(str(tmp_path / "run"), pretrained.configure(config))
  config = run_lib.read_config(str(tmp_path / "run"))
  assert config.model.language.rope_scaling.to_dict() == scaling
  assert dict(run_lib.model_config(config).language.rope_scaling) == scaling


def test_qwen2_sliding_window_loads_where_no_layer_slides(tmp_path):
  """Qwen2's use_sliding_window slides the layers from max_window_layers on (its
  layer_types): none here, so it is full attention as in transformers; a sliding layer is an
  error naming it."""
  model = ref.causal_lm(family="qwen2")
  model.config.update(dict(use_sliding_window=True, sliding_window=4, max_window_layers=2))
  cfg, params = hf.load_language_model(ref.save(model, tmp_path / "full"))
  ids = _ids(1, 11, cfg.vocab_size, seed=9)
  with torch.inference_mode():
    theirs = model(torch.from_numpy(ids).long()).logits
  assert ref.max_diff(language.apply(cfg, params, ids), theirs) <= TOL
  model.config.layer_types = ["full_attention", "sliding_attention"]
  with pytest.raises(hf.CheckpointError, match=r"sliding-window attention \(layers \[1\]\)"):
    hf.load_language_model(ref.save(model, tmp_path / "sliding"))


def test_qwen2_ignores_a_llama_only_mlp_bias_key_as_transformers_does(tmp_path):
  model = ref.causal_lm(family="qwen2")
  model.config.mlp_bias = True   # a LLaMA key: Qwen2's MLP has no biases in transformers
  cfg, params = hf.load_language_model(ref.save(model, tmp_path / "qwen2"))
  ids = _ids(1, 7, cfg.vocab_size, seed=3)
  with torch.inference_mode():
    theirs = model(torch.from_numpy(ids).long()).logits
  assert ref.max_diff(language.apply(cfg, params, ids), theirs) <= TOL


def test_swish_is_silu_as_in_transformers_and_another_activation_an_error(tmp_path):
  model = ref.causal_lm(family="llama")
  model.config.hidden_act = "swish"          # ACT2FN["swish"] is SiLU
  model = transformers.LlamaForCausalLM(model.config).eval()
  ref.perturb(model)
  cfg, params = hf.load_language_model(ref.save(model, tmp_path / "swish"))
  ids = _ids(2, 9, cfg.vocab_size)
  with torch.inference_mode():
    theirs = model(input_ids=torch.from_numpy(ids).long()).logits
  assert ref.max_diff(language.apply(cfg, params, ids), theirs) <= TOL
  model.config.hidden_act = "gelu"
  path = ref.save(transformers.LlamaForCausalLM(model.config), tmp_path / "gelu")
  with pytest.raises(hf.CheckpointError, match=r"config.json: hidden_act 'gelu' is not"):
    hf.load_language_model(path)


def test_unsupported_rope_is_a_clear_error(tmp_path):
  model = ref.causal_lm(family="llama")
  model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5000.0}
  path = ref.save(model, tmp_path)
  with pytest.raises(hf.CheckpointError, match=r"config.json: rope_parameters: .*'dynamic'"):
    hf.load_language_model(path)


def test_a_tied_config_with_another_stored_head_loads_untied_as_transformers(tmp_path):
  """tie_word_embeddings set, but the file stores an lm_head that differs from the
  embedding (an untied fine-tune that kept its base config): transformers keeps the stored
  head, so do we; a stored head equal to the embedding stays tied."""
  def saved_as_tied(model, name):
    path = ref.save(model, tmp_path / name)
    config = json.loads((tmp_path / name / "config.json").read_text())
    (tmp_path / name / "config.json").write_text(json.dumps({**config,
                                                             "tie_word_embeddings": True}))
    return path

  path = saved_as_tied(ref.causal_lm(family="qwen2", tie=False), "other_head")
  theirs_model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  cfg, params = hf.load_language_model(path)
  assert not cfg.tie_word_embeddings
  ids = _ids(2, 9, cfg.vocab_size, seed=10)
  with torch.inference_mode():
    theirs = theirs_model(torch.from_numpy(ids).long()).logits
  assert ref.max_diff(language.apply(cfg, params, ids), theirs) <= TOL
  same = ref.causal_lm(family="qwen2", tie=False)
  with torch.no_grad():
    same.lm_head.weight.copy_(same.model.embed_tokens.weight)
  assert hf.load_language_model(saved_as_tied(same, "same_head"))[0].tie_word_embeddings
  # A run built on it (init_language) is configured untied too, and takes the stored head.
  config = demo.get_config()
  with config.unlocked():
    config.init_language, config.data.tokenizer = path, str(tmp_path)   # the tokenizer: unread
  config = pretrained.configure(config)
  assert not config.model.language.tie_word_embeddings
  run_cfg = run_lib.model_config(config)
  started = pretrained.start(vlm.init(run_cfg, jax.random.key(0)), run_cfg, config)
  jax.tree.map(np.testing.assert_array_equal, started["language"], params)


def test_a_tied_lm_storing_only_the_head_loads_as_transformers(tmp_path):
  """A tied checkpoint whose file holds the shared matrix only as lm_head.weight:
  transformers ties it either way; we read the embedding from the head."""
  path = ref.save(ref.causal_lm(family="llama", kv_heads=2, tie=True), tmp_path / "lm")
  file = tmp_path / "lm" / hf.SAFETENSORS
  tensors = safetensors.numpy.load_file(str(file))
  embed = tensors.pop("model.embed_tokens.weight")
  safetensors.numpy.save_file({**tensors, "lm_head.weight": embed}, str(file),
                              metadata={"format": "pt"})
  theirs_model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  cfg, params = hf.load_language_model(path)
  assert cfg.tie_word_embeddings
  np.testing.assert_array_equal(params["embed_tokens"]["embedding"], embed)
  ids = _ids(2, 9, cfg.vocab_size, seed=11)
  with torch.inference_mode():
    theirs = theirs_model(torch.from_numpy(ids).long()).logits
  assert ref.max_diff(language.apply(cfg, params, ids), theirs) <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_special_token_ids_survive_load_and_save(family, tmp_path):
  """LlamaConfig would otherwise write its defaults (bos 1, eos 2), and transformers'
  generate on the saved model would stop elsewhere than on the source."""
  model = ref.causal_lm(family, vocab=96)
  model.config.update(dict(bos_token_id=3, eos_token_id=[7, 9], pad_token_id=5))
  cfg, params = hf.load_language_model(ref.save(model, tmp_path / "source"))
  assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (3, (7, 9), 5)
  hf.save_language_model(cfg, params, str(tmp_path / "saved"))
  again = transformers.AutoConfig.from_pretrained(str(tmp_path / "saved"))
  assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (3, [7, 9], 5)


@pytest.mark.parametrize("kv_heads", [6, 2])
def test_attention_gradients_match_torch_sdpa(kv_heads):
  """`layers.attention`'s custom gradient (the softmax's in flash attention's form) against
  torch's scaled_dot_product_attention backward, grouped-query heads, a causal and padding
  mask; a fully masked row (finite output, which torch does not give) takes no gradient."""
  rng = np.random.default_rng(0)
  b, t, n, dh = 2, 7, 6, 8
  q = rng.normal(size=(b, t, n, dh)).astype(np.float32)
  k, v = (rng.normal(size=(b, t, kv_heads, dh)).astype(np.float32) for _ in range(2))
  mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
  mask[1, :, :2] = False   # a left-padded second row: its first two keys masked
  mask[1, :2] = False      # ... and its first two queries see nothing
  # Weights zero on the dead queries, whose output torch gives as NaN (ours: the values' mean).
  w = rng.normal(size=(b, t, n, dh)).astype(np.float32) * mask.any(-1)[..., None, None]

  def loss(q, k, v):
    return jnp.sum(layers.attention(q, k, v, jnp.asarray(mask)) * w)

  ours = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).requires_grad_()
                for x in (q, k, v))
  out = torch.nn.functional.scaled_dot_product_attention(
      tq, tk, tv, attn_mask=torch.from_numpy(mask)[:, None], enable_gqa=kv_heads != n)
  live = torch.from_numpy(mask.any(-1))[:, None, :, None]
  (torch.where(live, out, 0) * torch.from_numpy(w.transpose(0, 2, 1, 3))).sum().backward()
  for got, x in zip(ours, (tq, tk, tv)):
    want = x.grad.numpy().transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())
  # With weight on the dead queries too: autodiff of the plain formula, where their scores
  # are constants (no gradient to q or k) and their uniform probabilities reach v.
  w_all = rng.normal(size=w.shape).astype(np.float32)

  def plain(q, k, v):
    kk, vv = (np.repeat(x, n // kv_heads, axis=2) for x in (k, v))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, kk) * dh ** -0.5
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min))
    return jnp.sum(jnp.einsum("bnqk,bknd->bqnd", probs, vv) * w_all)

  ours = jax.grad(lambda *x: jnp.sum(layers.attention(*x, jnp.asarray(mask)) * w_all),
                  argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(ours, jax.grad(plain, argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())
  assert not np.asarray(ours[0])[1, :2].any()   # the dead queries
