"""DriVLM's parts against the papers' formulas: gradient reversal, DANN schedule,
discriminators, box pooling, reweighting/pruning, contrastive and distillation losses."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from transformers.models.clip import modeling_clip

from configs import common, demo
from drivlm_jax import adapt, run as run_lib, train
from drivlm_jax.adapt import alignment, distillation
from drivlm_jax.adapt import contrastive as clip_stage
from drivlm_jax.data import preprocess
from drivlm_jax.losses import adversarial, contrastive, distill
from drivlm_jax.model import discriminators, reweighting, vlm


def test_grad_reverse_is_minus_lambda_times_identity():
  w = jax.random.normal(jax.random.key(0), (5, 3))
  x = jax.random.normal(jax.random.key(1), (5, 3))
  f = lambda x: jnp.sum(jnp.sin(x) * w)
  for lam in (0.0, 0.3, 1.0):
    np.testing.assert_array_equal(adversarial.grad_reverse(x, lam), x)
    plain = jax.grad(f)(x)
    reversed_ = jax.grad(lambda x: f(adversarial.grad_reverse(x, lam)))(x)
    np.testing.assert_array_equal(reversed_, -lam * plain)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_dann_schedule(p):
  assert float(adversarial.dann_lambda(p)) == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1,
                                                            abs=1e-6)


def test_focal_loss_formula():
  logits = jnp.array([[2.0, -1.0], [0.5, 3.0]])
  domain = jnp.array([1, 0])
  p = 1 / (1 + np.exp(-np.asarray(logits)))
  pt = np.where(np.array([[1], [0]]) == 1, p, 1 - p)
  expected = np.mean(-((1 - pt) ** 2) * np.log(pt))
  assert float(adversarial.domain_focal(logits, domain, gamma=2.0)) == pytest.approx(expected,
                                                                                     rel=1e-6)
  assert float(adversarial.domain_focal(logits, domain, gamma=0.0)) == pytest.approx(
      float(adversarial.domain_bce(logits, domain)), rel=1e-6)


def test_domain_confusion_formula():
  logits = jnp.array([[2.0, -1.0, 0.0], [0.5, 3.0, -4.0]])
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  per_entry = -(np.log(p) + np.log(1 - p)) / 2 - np.log(2)
  assert float(adversarial.domain_confusion(logits)) == pytest.approx(per_entry.mean(), rel=1e-5)
  mask = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
  assert float(adversarial.domain_confusion(logits, mask)) == pytest.approx(
      per_entry[np.asarray(mask) > 0].mean(), rel=1e-5)
  assert float(adversarial.domain_confusion(jnp.zeros((4,)))) == pytest.approx(0.0, abs=1e-7)


def test_confusion_gradient_does_not_vanish_when_the_discriminator_is_confident():
  """The reason for `da.objective=confusion`: on well separated domains a trained
  discriminator is confident, and the features' gradient behind the reversal,
  lam (s(z) - y) dz/df, all but vanishes; the confusion gradient (s(z) - 1/2) dz/df does
  not, and pushes source and target features towards each other."""
  cfg = discriminators.Config(hidden=32)
  pooled, tokens, grid, boxes, box_mask, domain = _separable(jax.random.key(0))
  pooled, tokens = 3.0 * pooled, 3.0 * tokens
  params = discriminators.init(cfg, jax.random.key(1), 8, grid, 3)
  tx = optax.adam(1e-2)
  state = tx.init(params)
  bce = lambda p, x, lam: discriminators.losses(discriminators.apply(
      cfg, p, x, tokens, tokens, grid, boxes, box_mask, lam), domain, box_mask)["image"]

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(bce)(params, pooled, 1.0), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(200):
    params, state = step(params, state)
  assert float(bce(params, pooled, 1.0)) < 1e-3
  reversal = jax.grad(bce, argnums=1)(params, pooled, 1.0)
  confusion = jax.grad(lambda x: discriminators.confusion(discriminators.apply(
      cfg, params, x, tokens, tokens, grid, boxes, box_mask, -1.0), box_mask)["image"])(pooled)
  assert float(jnp.abs(confusion).mean()) > 100 * float(jnp.abs(reversal).mean())
  # Descending the confusion gradient moves the two domains' mean features together.
  gap = lambda x: float(jnp.linalg.norm(x[domain == 1].mean(0) - x[domain == 0].mean(0)))
  assert gap(pooled - 5.0 * confusion) < gap(pooled)


def test_confusion_objective_trains_each_player_on_its_own_loss():
  """da.objective=confusion: the discriminators' gradient is that of their BCE at every level
  (features held fixed), the features' gradient is lam(p) times that of the confusion loss
  (discriminators held fixed)."""
  cfg = discriminators.Config(hidden=16)
  _, tokens, grid, boxes, box_mask, domain = _separable(jax.random.key(4))
  params = discriminators.init(cfg, jax.random.key(5), 8, grid, 3)
  component = alignment.Alignment(cfg, {f"da_{k}": 1.0 for k in alignment.LEVELS[:3]} | {
      "da_consistency": 0.0}, 0.0, 0.0, 10, 8, grid, 3, 1,
      _layout_cfg("clip", "default", 1), objective="confusion")   # (its tokens are the cells)
  batch = {"boxes": boxes, "box_mask": box_mask, "box_camera": jnp.zeros_like(box_mask, int),
           "domain": domain}

  def total(p, tokens):
    ctx = adapt.Context({"discriminators": p}, {"visual_tokens": tokens}, batch, jnp.int32(5),
                        {}, {})
    return sum(component.loss(ctx).values())

  def apply(p, tokens):   # reverse = -1: the plain gradient reaches the features
    return discriminators.apply(cfg, p, tokens.mean(1), tokens, tokens, grid, boxes, box_mask,
                                -1.0)

  bce = lambda p: sum(discriminators.losses(apply(p, tokens), domain, box_mask,
                                            consistency=False).values())
  confusion = lambda t: sum(discriminators.confusion(apply(params, t), box_mask).values())
  got_params, got_tokens = jax.grad(total, argnums=(0, 1))(params, tokens)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_params,
               jax.grad(bce)(params))
  lam = float(adversarial.dann_lambda(0.5))
  np.testing.assert_allclose(got_tokens, lam * jax.grad(confusion)(tokens), rtol=1e-5,
                             atol=1e-8)


def _separable(key, b=16, grid=4, d=8, m=3):
  domain = jnp.arange(b) % 2
  shift = (2.0 * domain - 1.0)
  k1, k2, k3 = jax.random.split(key, 3)
  pooled = jax.random.normal(k1, (b, d)) + shift[:, None]
  tokens = jax.random.normal(k2, (b, grid * grid, d)) + shift[:, None, None]
  boxes = jnp.sort(jax.random.uniform(k3, (b, m, 2, 2)), axis=2).transpose(0, 1, 3, 2).reshape(
      b, m, 4)[..., jnp.array([0, 2, 1, 3])]
  box_mask = jnp.ones((b, m)).at[:, -1].set(0.0)
  return pooled, tokens, grid, boxes, box_mask, domain


@pytest.mark.parametrize("level", ["image", "token", "instance"])
def test_each_discriminator_learns_separable_domains(level):
  cfg = discriminators.Config(hidden=32)
  pooled, tokens, grid, boxes, box_mask, domain = _separable(jax.random.key(0))
  params = discriminators.init(cfg, jax.random.key(1), 8, grid, 3)
  tx = optax.adam(1e-2)
  state = tx.init(params)

  def loss(p):
    logits = discriminators.apply(cfg, p, pooled, tokens, tokens, grid, boxes, box_mask, 1.0)
    return discriminators.losses(logits, domain, box_mask, consistency=False)[level]

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  first = float(loss(params))
  for _ in range(60):
    params, state = step(params, state)
  assert float(loss(params)) < 0.3 * first and float(loss(params)) < 0.2


def test_masked_boxes_contribute_nothing():
  cfg = discriminators.Config(hidden=16)
  pooled, tokens, grid, boxes, box_mask, domain = _separable(jax.random.key(2))
  params = discriminators.init(cfg, jax.random.key(3), 8, grid, 3)

  def instance_loss(tokens, boxes):
    logits = discriminators.apply(cfg, params, pooled, tokens, tokens, grid, boxes, box_mask, 1.0)
    return discriminators.losses(logits, domain, box_mask)["instance"]

  moved = boxes.at[:, -1].set(jnp.array([0.0, 0.0, 1.0, 1.0]))   # only masked boxes change
  assert float(instance_loss(tokens, boxes)) == float(instance_loss(tokens, moved))
  g1 = jax.grad(instance_loss)(tokens, boxes)
  g2 = jax.grad(instance_loss)(tokens, moved)
  np.testing.assert_array_equal(g1, g2)
  none = jnp.zeros_like(box_mask)
  logits = discriminators.apply(cfg, params, pooled, tokens, tokens, grid, boxes, none, 1.0)
  assert float(discriminators.losses(logits, domain, none)["instance"]) == 0.0


def test_box_pool_reads_the_cells_inside_the_box():
  grid = 4
  tokens = jnp.arange(grid * grid, dtype=jnp.float32).reshape(1, grid * grid, 1)
  boxes = jnp.array([[[0.25, 0.5, 0.5, 0.75], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.25]]])
  pooled = discriminators.box_pool(tokens, grid, boxes, jnp.ones((1, 3)))[0, :, 0]
  # cell (row 2, col 1) = 9; the whole grid's mean = 7.5; row 0, cols 0-1 -> mean(0, 1).
  np.testing.assert_allclose(pooled, [9.0, 7.5, 0.5], atol=1e-6)


def test_pruning_keeps_exactly_the_top_k():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.normal(size=(3, 20, 4)), jnp.float32)
  scores = jnp.asarray(rng.normal(size=(3, 20)), jnp.float32)
  idx = reweighting.top_k(scores, 0.25)
  kept = jnp.take_along_axis(tokens, idx[..., None], axis=1)
  assert kept.shape == (3, 5, 4)
  for b in range(3):
    expected = np.sort(np.argsort(-np.asarray(scores[b]))[:5])
    np.testing.assert_array_equal(idx[b], expected)
    np.testing.assert_array_equal(kept[b], np.asarray(tokens[b])[expected])
  with pytest.raises(ValueError, match="keep_ratio"):
    reweighting.top_k(scores, 0.0)


def test_reweighting_scores_follow_the_instruction():
  cfg = reweighting.Config(dim=16)
  params = {**reweighting.init(cfg, jax.random.key(0), 8, 12), "gain": jnp.float32(1.0)}
  tokens = jax.random.normal(jax.random.key(1), (2, 10, 8))
  text = jax.random.normal(jax.random.key(2), (2, 5, 12))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  s = reweighting.scores(cfg, params, tokens, text, mask)
  assert s.shape == (2, 10)
  # Padding of the instruction changes nothing; another instruction changes the scores.
  s_padded = reweighting.scores(cfg, params, tokens, text.at[0, 3:].set(9.0), mask)
  np.testing.assert_allclose(s_padded[0], s[0], rtol=1e-6)
  assert not np.allclose(reweighting.scores(cfg, params, tokens, -text, mask), s)
  gated = reweighting.reweight(tokens, s)
  np.testing.assert_allclose(gated, tokens * 2 * jax.nn.sigmoid(s)[..., None], rtol=1e-6)
  # The gain starts at 0: every gate is exactly 1 before training.
  fresh = reweighting.init(cfg, jax.random.key(0), 8, 12)
  np.testing.assert_array_equal(
      reweighting.reweight(tokens, reweighting.scores(cfg, fresh, tokens, text, mask)), tokens)


def test_clip_loss_matches_transformers():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(6, 16)).astype(np.float32), rng.normal(size=(6, 16)).astype(
      np.float32)
  scale = 2.3
  ours = float(contrastive.clip_loss(jnp.asarray(img), jnp.asarray(txt), scale))
  n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits_per_text = torch.from_numpy(math.exp(scale) * n(txt) @ n(img).T)
  assert ours == pytest.approx(float(modeling_clip.image_text_contrastive_loss(logits_per_text)), rel=1e-5)


def test_siglip_loss_formula():
  rng = np.random.default_rng(1)
  img, txt = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
  scale, bias = 1.7, -3.0
  n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  z = np.where(np.eye(5) > 0, 1.0, -1.0)
  logits = math.exp(scale) * n(img) @ n(txt).T + bias
  expected = -np.sum(np.log(1 / (1 + np.exp(-z * logits)))) / 5
  assert float(contrastive.siglip_loss(jnp.asarray(img), jnp.asarray(txt), scale, bias)) == \
      pytest.approx(expected, rel=1e-5)


def test_contrastive_losses_take_equal_captions_as_positives():
  """Rows with equal captions match: SigLIP's z_ij is 1 on them (with distinct captions, the
  plain loss above). InfoNCE is UniCL's multi-positive loss as it is (written out here), since
  equal captions have equal embeddings."""
  rng = np.random.default_rng(3)
  img = rng.normal(size=(6, 8))
  ids = np.array([[5, 1, 0], [7, 0, 0], [5, 1, 0], [9, 2, 0], [5, 1, 0], [7, 0, 0]])
  txt = rng.normal(size=(3, 8))[[0, 1, 0, 2, 0, 1]]     # equal captions, equal embeddings
  pos = np.all(ids[:, None] == ids[None], -1)
  np.testing.assert_array_equal(contrastive.same_caption(jnp.asarray(ids)), pos)
  scale, bias = 1.2, -2.0
  n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = math.exp(scale) * n(img) @ n(txt).T
  z = np.where(pos, 1.0, -1.0)
  expected = -np.sum(np.log(1 / (1 + np.exp(-z * (logits + bias))))) / 6
  got = contrastive.siglip_loss(jnp.asarray(img), jnp.asarray(txt), scale, bias,
                                jnp.asarray(pos))
  assert float(got) == pytest.approx(expected, rel=1e-5)
  logsm = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
  i2t = -np.mean([logsm(logits)[i, pos[i]].mean() for i in range(6)])
  t2i = -np.mean([logsm(logits.T)[j, pos[:, j]].mean() for j in range(6)])
  got = contrastive.clip_loss(jnp.asarray(img), jnp.asarray(txt), scale)
  assert float(got) == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_softmax_kd_is_the_scaled_kl():
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7))
  mask = np.array([[1, 1, 0], [1, 0, 1]])
  T = 2.5
  sm = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(
      x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
  p, q = sm(t / T), sm(s / T)
  kl = (p * np.log(p / q)).sum(-1)
  expected = (kl * mask).sum() / mask.sum() * T * T
  got = distill.softmax_kd(jnp.asarray(s), jnp.asarray(t), T, jnp.asarray(mask))
  assert float(got) == pytest.approx(expected, rel=1e-5)
  assert float(distill.softmax_kd(jnp.asarray(t), jnp.asarray(t), T)) == pytest.approx(0.0,
                                                                                    abs=1e-6)


def test_sigmoid_kd_is_the_binary_kl():
  rng = np.random.default_rng(3)
  s, t = rng.normal(size=(4, 21)), rng.normal(size=(4, 21))
  T = 2.0
  sig = lambda x: 1 / (1 + np.exp(-x))
  p, q = sig(t / T), sig(s / T)
  kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
  expected = kl.sum(-1).mean() * T * T
  assert float(distill.sigmoid_kd(jnp.asarray(s), jnp.asarray(t), T)) == pytest.approx(
      expected, rel=1e-5)
  assert float(distill.sigmoid_kd(jnp.asarray(t), jnp.asarray(t), T)) == pytest.approx(
      0.0, abs=1e-6)
  # "mean": over the classes as well, as the heads' BCE on the labels; with a row mask
  mask = np.array([1.0, 0.0, 1.0, 1.0])
  expected = (kl.mean(-1) * mask).sum() / mask.sum() * T * T
  got = distill.sigmoid_kd(jnp.asarray(s), jnp.asarray(t), T, jnp.asarray(mask), "mean")
  assert float(got) == pytest.approx(expected, rel=1e-5)


def test_relation_kd_is_one_minus_pearson_per_class_and_domain():
  """DIST's intra-class relation (Huang et al., 2022), against scipy's Pearson r per class
  over each domain's selected rows."""
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(5)
  s, t = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
  domain = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
  mask = np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 1.0])
  T = 2.0
  sig = lambda x: 1 / (1 + np.exp(-x / T))
  expected = np.mean([
      np.mean([1 - stats.pearsonr(sig(s[rows, c]), sig(t[rows, c]))[0] for c in range(4)])
      for rows in ((domain == 0) & (mask > 0), (domain == 1) & (mask > 0))])
  got = distill.relation_kd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(domain), T,
                            jnp.asarray(mask))
  assert float(got) == pytest.approx(expected, rel=1e-5)
  # Blind to the teacher's scale and offset, where the KL is not: a teacher whose
  # probabilities differ in their fourth decimal teaches the same ranking.
  tiny = 1e-3 * t - 2.0
  for teacher in (t, tiny):
    same = distill.relation_kd(jnp.asarray(teacher), jnp.asarray(teacher), jnp.asarray(domain))
    assert float(same) == pytest.approx(0.0, abs=1e-4)
  ranked = distill.relation_kd(jnp.asarray(0.5 * t), jnp.asarray(tiny), jnp.asarray(domain))
  assert float(ranked) < 0.01
  # A domain with fewer than two selected rows is left out; none at all gives 0.
  one = distill.relation_kd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(domain), T,
                            jnp.asarray((domain == 1) * mask + np.eye(10)[0]))
  target_only = np.mean([1 - stats.pearsonr(sig(s[r, c]), sig(t[r, c]))[0] for c in range(4)
                         for r in [(domain == 1) & (mask > 0)]])
  assert float(one) == pytest.approx(target_only, rel=1e-5)
  assert float(distill.relation_kd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(domain), T,
                                   jnp.zeros(10))) == 0.0
  grad = jax.grad(lambda x: distill.relation_kd(x, jnp.asarray(tiny), jnp.asarray(domain)))(
      jnp.asarray(s, jnp.float32))
  assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0
  # A flat student class (a collapsed head): its gradient stays bounded (Pearson's own
  # is 1 / the student's spread: 1e10 here without the floor).
  flat = jax.grad(lambda x: distill.relation_kd(x, jnp.asarray(t), jnp.asarray(domain)))(
      jnp.full((10, 4), -3.0, jnp.float32))
  assert np.all(np.isfinite(np.asarray(flat))) and 0 < float(jnp.abs(flat).max()) < 1e6
  # A flat teacher class has no ranking to teach: left out, so a student equal to the
  # teacher still scores 0.
  flat_teacher = np.array(t).copy()
  flat_teacher[:, 2] = 0.5
  assert float(distill.relation_kd(jnp.asarray(flat_teacher), jnp.asarray(flat_teacher),
                                   jnp.asarray(domain))) == pytest.approx(0.0, abs=1e-5)
  assert float(distill.relation_kd(jnp.zeros((10, 4)), jnp.zeros((10, 4)),
                                   jnp.asarray(domain))) == 0.0   # nothing to teach


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_feature_kd(kind):
  rng = np.random.default_rng(4)
  student = jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)
  teacher = student @ jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  proj = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  exact = jnp.asarray(np.linalg.lstsq(np.asarray(student).reshape(-1, 5),
                                      np.asarray(teacher).reshape(-1, 7), rcond=None)[0])
  assert float(distill.feature_kd(student, teacher, exact, kind=kind)) == pytest.approx(
      0.0, abs=1e-5)
  assert float(distill.feature_kd(student, teacher, proj, kind=kind)) > 0.01
  # A zero-weight token contributes nothing.
  weights = jnp.ones((2, 6)).at[:, 0].set(0.0)
  base = distill.feature_kd(student, teacher, proj, weights, kind)
  changed = distill.feature_kd(student, teacher.at[:, 0].set(100.0), proj, weights, kind)
  assert float(base) == pytest.approx(float(changed), rel=1e-6)


def test_match_grid():
  tokens = jnp.ones((1, 16, 3))
  assert distill.match_grid(tokens, 4, 2).shape == (1, 4, 3)
  np.testing.assert_allclose(distill.match_grid(tokens, 4, 8), 1.0, atol=1e-6)


def test_entropy_minimisation_is_the_binary_entropy_of_target_rows():
  """adapt/entropy.py: sum over classes of H(sigmoid(logit)), scipy's entropy of (p, 1 - p),
  averaged over the target rows only."""
  from scipy import stats
  from drivlm_jax import adapt
  from drivlm_jax.adapt import entropy
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (5, 4)).astype(np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  want = stats.entropy(np.stack([p, 1 - p]), axis=0).sum(-1)
  np.testing.assert_allclose(entropy.binary_entropy(jnp.asarray(logits)), want, rtol=1e-5)
  domain = np.array([0, 1, 1, 0, 1])
  ctx = adapt.Context(params={}, out={"action_logits": jnp.asarray(logits),
                                      "reason_logits": jnp.asarray(logits[:, :2])},
                      batch={"domain": jnp.asarray(domain)}, step=0, frozen={}, metrics={})
  got = entropy.EntropyMinimisation().loss(ctx)
  np.testing.assert_allclose(got["entmin"], want[domain == 1].mean(), rtol=1e-5)


def test_distillation_on_target_rows_is_the_loss_of_those_rows_alone():
  """config.distill.rows="target": every KD term over a mixed batch equals the same term on
  its target rows alone (the source rows add nothing), and differs from distilling all rows."""
  from configs import common
  from drivlm_jax import run as run_lib
  from drivlm_jax.adapt import distillation
  from drivlm_jax.model import vlm
  # with the instruction gates, as the demo's student: feature KD weighs tokens by them
  cfg = dataclasses.replace(vlm.config_from_dict(common.model_config("tiny")), reweight=True,
                            reweight_layer=0)
  student, teacher = (vlm.init(cfg, jax.random.key(k)) for k in (0, 1))
  rng = np.random.default_rng(0)
  n, size = cfg.num_visual_tokens, cfg.vision.image_size
  batch = {"image": jnp.asarray(rng.normal(size=(4, size, size, 3)), jnp.float32),
           "input_ids": jnp.asarray(np.concatenate(
               [np.full((4, n), cfg.image_token_id), rng.integers(10, 100, (4, 6))], 1),
               jnp.int32),
           "attention_mask": jnp.ones((4, n + 6), jnp.int32),
           "instruction_ids": jnp.asarray(rng.integers(10, 100, (4, 5)), jnp.int32),
           "instruction_mask": jnp.ones((4, 5), jnp.int32),
           "domain": jnp.asarray([0, 1, 0, 1], jnp.int32)}
  weights = {"kd_heads": 1.0, "kd_relation": 1.0, "kd_lm": 1.0, "kd_feature": 1.0}

  def losses(rows, batch):
    kd = distillation.Distillation(cfg, run_lib.Run("teacher", None, cfg, teacher, 0), weights,
                                   2.0, "cosine", rows)
    out = vlm.apply(cfg, student, batch["image"], batch["input_ids"], batch["attention_mask"],
                    batch["instruction_ids"], batch["instruction_mask"])
    assert "token_scores" in out
    params = {**student, "distill": kd.init(jax.random.key(2))}
    return kd.loss(adapt.Context(params=params, out=out, batch=batch, step=0,
                                 frozen={"distillation": teacher}, metrics={}))

  target_only = {k: v[1::2] for k, v in batch.items()}
  got, alone, every = losses("target", batch), losses("all", target_only), losses("all", batch)
  for term in weights:
    assert float(got[term]) == pytest.approx(float(alone[term]), rel=1e-5), term
    assert abs(float(got[term]) - float(every[term])) > 1e-4, term


def test_pruned_distillation_is_the_heads_objective_on_the_deployed_student():
  """loss.kd_pruned: the heads' KD (binary KL per class at T, summed, x T^2) plus the
  relation term (1 - Pearson per class and domain, scipy) at kd_relation / kd_heads, on the
  student's heads pruned to distill.keep_ratio as deployed; it reaches the instruction
  scorer that picks the kept tokens; bad settings are errors naming the keys."""
  stats = pytest.importorskip("scipy.stats")
  cfg = dataclasses.replace(vlm.config_from_dict(common.model_config("tiny")), reweight=True,
                            reweight_layer=0)
  student, teacher = (vlm.init(cfg, jax.random.key(k)) for k in (0, 1))
  student["reweighting"]["gain"] = jnp.asarray(1.0)   # scores that differ between tokens
  rng = np.random.default_rng(0)
  size = cfg.vision.image_size
  b = 6
  batch = {"image": jnp.asarray(rng.normal(size=(b, size, size, 3)), jnp.float32),
           "instruction_ids": jnp.asarray(rng.integers(10, 100, (b, 5)), jnp.int32),
           "instruction_mask": jnp.ones((b, 5), jnp.int32),
           "attention_mask": jnp.ones((b, 4), jnp.int32),   # the LM's: not run here
           "domain": jnp.asarray([0, 1, 0, 1, 0, 1], jnp.int32)}
  weights = {"kd_heads": 2.0, "kd_relation": 0.6, "kd_pruned": 1.0, "kd_lm": 0.0,
             "kd_feature": 0.0}
  kd = distillation.Distillation(cfg, run_lib.Run("teacher", None, cfg, teacher, 0), weights,
                                 2.0, "cosine", keep_ratio=0.25)

  def loss(params):
    out = vlm.encode_image(cfg, params, batch["image"], batch["instruction_ids"],
                           batch["instruction_mask"])
    return kd.loss(adapt.Context(params=params, out=out, batch=batch, step=0,
                                 frozen={"distillation": teacher}, metrics={}))

  got = loss(student)
  pruned, full, taught = (vlm.encode_image(cfg, p, batch["image"], batch["instruction_ids"],
                                           batch["instruction_mask"], keep_ratio=keep)
                          for p, keep in ((student, 0.25), (student, 1.0), (teacher, 1.0)))
  assert pruned["kept_indices"].shape[1] == math.ceil(cfg.vision.grid ** 2 * 0.25)
  T, domain = 2.0, np.asarray(batch["domain"])
  sig = lambda x: 1 / (1 + np.exp(-np.float64(x) / T))   # noqa: E731

  def reference(student_out):
    heads = relation = 0.0
    for k in ("action_logits", "reason_logits"):
      p, q = sig(taught[k]), sig(student_out[k])
      kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
      heads += kl.sum(-1).mean() * T ** 2
      relation += np.mean([np.mean([1 - stats.pearsonr(q[domain == d, c], p[domain == d, c])[0]
                                    for c in range(p.shape[1])]) for d in (0, 1)]) / 2
    return heads, relation

  heads, relation = reference(pruned)
  assert float(got["kd_pruned"]) == pytest.approx(heads + 0.6 / 2.0 * relation, rel=1e-4)
  assert float(got["kd_heads"]) == pytest.approx(reference(full)[0], rel=1e-4)
  assert abs(float(got["kd_pruned"]) - float(got["kd_heads"]) - 0.3 * float(
      got["kd_relation"])) > 1e-3   # the pruned heads are not the full ones
  grads = jax.grad(lambda p: loss(p)["kd_pruned"])(student)
  assert float(jnp.abs(grads["reweighting"]["gain"])) > 0

  config = demo.get_config("method=drivlm_student,teacher=t")
  assert config.distill.keep_ratio == config.evals.target_pruned.keep_ratio == 0.25
  for changes, match in (({"distill.keep_ratio": 1.0}, "config.distill.keep_ratio"),
                         ({"loss.kd_heads": 0.0}, "set loss.kd_heads > 0")):
    bad = demo.get_config("method=drivlm_student,teacher=t")
    bad.loss.kd_pruned = 1.0
    for key, value in changes.items():
      section, name = key.split(".")
      bad[section][name] = value
    with pytest.raises(ValueError, match=match):
      distillation.Distillation.from_config(bad, cfg, None)


def _fda_reference(source, target, beta):
  """One [H, W, C] image in the style of another, as the FDA authors' numpy code does it
  (Yang & Soatto 2020, `FDA_source_to_target_np` / `low_freq_mutate_np`): channels first,
  fft2 over the last two axes, the centred window of the shifted amplitudes swapped."""
  src, trg = np.transpose(source, (2, 0, 1)), np.transpose(target, (2, 0, 1))
  fft_src, fft_trg = np.fft.fft2(src, axes=(-2, -1)), np.fft.fft2(trg, axes=(-2, -1))
  amp_src, pha_src, amp_trg = np.abs(fft_src), np.angle(fft_src), np.abs(fft_trg)
  a_src = np.fft.fftshift(amp_src, axes=(-2, -1))
  a_trg = np.fft.fftshift(amp_trg, axes=(-2, -1))
  _, h, w = a_src.shape
  b = int(np.floor(np.amin((h, w)) * beta))
  c_h, c_w = int(np.floor(h / 2.0)), int(np.floor(w / 2.0))
  a_src[:, c_h - b:c_h + b + 1, c_w - b:c_w + b + 1] = a_trg[:, c_h - b:c_h + b + 1,
                                                             c_w - b:c_w + b + 1]
  amp = np.fft.ifftshift(a_src, axes=(-2, -1))
  out = np.real(np.fft.ifft2(amp * np.exp(1j * pha_src), axes=(-2, -1)))
  return np.transpose(out, (1, 2, 0))


@pytest.mark.parametrize("beta,shape", [(0.05, (64, 64)), (0.09, (36, 64)), (0.01, (64, 64)),
                                        (0.1, (15, 20))])
def test_fourier_swap_matches_the_authors_formula(beta, shape):
  from drivlm_jax.adapt import fourier
  rng = np.random.default_rng(0)
  source, target = (rng.uniform(size=(2, *shape, 3)) for _ in range(2))
  got = np.asarray(fourier.swap_low_frequencies(jnp.asarray(source, jnp.float32),
                                                jnp.asarray(target, jnp.float32), beta))
  for i in range(2):
    np.testing.assert_allclose(got[i], _fda_reference(source[i], target[i], beta), atol=2e-5)
  # the window takes the target's low-frequency amplitude and keeps the source's phase
  spectrum = np.fft.fftshift(np.fft.fft2(got[0], axes=(0, 1)), axes=(0, 1))
  want = np.abs(np.fft.fftshift(np.fft.fft2(target[0], axes=(0, 1)), axes=(0, 1)))
  b, (ch, cw) = fourier.window(beta, *shape), (shape[0] // 2, shape[1] // 2)
  np.testing.assert_allclose(np.abs(spectrum)[ch - b:ch + b + 1, cw - b:cw + b + 1],
                             want[ch - b:ch + b + 1, cw - b:cw + b + 1], rtol=1e-3, atol=1e-3)


def test_fourier_restyles_source_rows_with_target_rows_of_the_batch():
  """The k-th source row takes the (k mod n)-th target row; pixels are restyled unnormalised and
  clipped to [0, 1]; target rows, and batches without a target row, are unchanged."""
  from drivlm_jax.adapt import fourier
  from drivlm_jax.data import preprocess
  mean, std = (np.asarray(v) for v in preprocess.MEAN_STD["clip"])
  rng = np.random.default_rng(1)
  pixels = rng.uniform(size=(5, 2, 16, 16, 3))      # 5 rows, 2 camera views each
  pixels[3] *= 0.2                                   # a dark target row
  images = ((pixels - mean) / std).astype(np.float32)
  domain = np.array([0, 1, 0, 1, 0])
  got = np.asarray(fourier.restyle(jnp.asarray(images), jnp.asarray(domain), 0.1,
                                   preprocess.MEAN_STD["clip"]))
  for row, partner in ((0, 1), (2, 3), (4, 1)):   # source ranks 0, 1, 2; n = 2
    want = np.clip(_fda_reference_views(pixels[row], pixels[partner], 0.1), 0, 1)
    np.testing.assert_allclose(got[row], (want - mean) / std, atol=1e-4)
  np.testing.assert_array_equal(got[[1, 3]], images[[1, 3]])
  assert got[2].mean() < images[2].mean()            # darker after the dark row's spectrum
  same = fourier.restyle(jnp.asarray(images), jnp.zeros(5, jnp.int32), 0.1,
                         preprocess.MEAN_STD["clip"])
  np.testing.assert_array_equal(np.asarray(same), images)
  # fraction 0.5 of 4 source rows: the two of source rank 0 and 1
  half = np.asarray(fourier.restyle(jnp.asarray(images), jnp.array([0, 1, 0, 0, 0]), 0.1,
                                    preprocess.MEAN_STD["clip"], fraction=0.5))
  np.testing.assert_allclose(half[[0, 2]], [
      (np.clip(_fda_reference_views(pixels[r], pixels[1], 0.1), 0, 1) - mean) / std
      for r in (0, 2)], atol=1e-4)
  np.testing.assert_array_equal(half[[1, 3, 4]], images[[1, 3, 4]])


def _fda_reference_views(source, target, beta):
  return np.stack([_fda_reference(s, t, beta) for s, t in zip(source, target)])


def _layout_cfg(family, strategy, views, model="tiny"):
  d = common.model_config(model)
  d.reweight, d.vision_feature_select_strategy, d.num_cameras = True, strategy, views
  if family == "siglip":
    d.vision.family, d.vision.hidden_act = "siglip", "gelu_pytorch_tanh"
  return vlm.config_from_dict(d)


LAYOUTS = [("clip", "default", 1), ("clip", "full", 2), ("siglip", "default", 1),
           ("siglip", "full", 2)]   # (SigLIP's "default" takes one camera: vlm.Config)


@pytest.mark.parametrize("family,strategy,views", LAYOUTS)
def test_instance_and_feature_terms_on_every_token_layout(family, strategy, views):
  """The instance discriminators and feature KD place the visual tokens on the patch grids
  (`vlm.on_grid`) whatever the layout: CLIP's "full" class tokens in front, SigLIP's
  "default" without each view's first patch (both crashed before). Reference: the "full"
  layout of the same weights holds every patch; "default" must agree on the patches it keeps,
  and feature KD equals plain `feature_kd` over the full grids with the missing cells at
  weight 0."""
  cfg = _layout_cfg(family, strategy, views)
  full_cfg = dataclasses.replace(cfg, vision_feature_select_strategy="full")
  params = jax.jit(lambda k: vlm.init(cfg, k))(jax.random.key(0))
  b, n = 2, cfg.vision.num_patches
  size = cfg.vision.image_size
  images = jax.random.uniform(jax.random.key(1), (b, views, size, size, 3)) * 255
  ids, mask = jnp.ones((b, 5), jnp.int32), jnp.ones((b, 5), jnp.int32)
  encode = lambda c: jax.jit(lambda p: vlm.encode_image(
      c, p, images if views > 1 else images[:, 0], ids, mask))(params)
  out, full = encode(cfg), encode(full_cfg)
  assert out["visual_tokens"].shape[1] == cfg.num_visual_tokens
  cells, valid = vlm.on_grid(cfg, out["visual_tokens"])
  full_cells, _ = vlm.on_grid(full_cfg, full["visual_tokens"])
  assert cells.shape == (b, views * n, cfg.language.hidden_size)
  missing = family == "siglip" and strategy == "default"
  want_valid = np.array([0.0 if missing and i % n == 0 else 1.0 for i in range(views * n)])
  np.testing.assert_array_equal(np.ones(views * n) if valid is None else valid, want_valid)
  np.testing.assert_allclose(cells * want_valid[:, None], full_cells * want_valid[:, None],
                             atol=1e-5)
  if cfg.vision.family == "clip" and strategy == "full":   # class tokens are not cells
    assert out["visual_tokens"].shape[1] == views * (n + 1)

  batch = {"image": images if views > 1 else images[:, 0], "attention_mask": mask,
           "instruction_ids": ids, "instruction_mask": mask, "domain": jnp.array([0, 1]),
           "boxes": jnp.array([[[0.0, 0.0, 0.5, 0.5]] * 2] * b),
           "box_mask": jnp.ones((b, 2)), "box_camera": jnp.zeros((b, 2), jnp.int32)}
  # A teacher of another layout: SigLIP "default" (one camera) or CLIP "full".
  teacher_layout = ("siglip", "default") if views == 1 else ("clip", "full")
  teacher_cfg = _layout_cfg(*teacher_layout, views, "tiny_teacher")
  teacher = run_lib.Run("", None, teacher_cfg,
                        jax.jit(lambda k: vlm.init(teacher_cfg, k))(jax.random.key(2)), 0)
  kd = distillation.Distillation(cfg, teacher, {"kd_heads": 0.0, "kd_lm": 0.0,
                                                "kd_feature": 1.0}, 1.0, "cosine")
  da = alignment.Alignment(discriminators.Config(hidden=16),
                           {t: 1.0 for t in alignment.Alignment.terms}, 0.0, 0.0, 10,
                           cfg.language.hidden_size, cfg.vision.grid, 2, views, cfg)
  own = {"distill": kd.init(jax.random.key(3)), "discriminators": da.init(jax.random.key(4))}
  losses = jax.jit(lambda own, out, frozen: {
      **kd.loss(adapt.Context(own, out, batch, jnp.int32(5), frozen, {})),
      **da.loss(adapt.Context(own, out, batch, jnp.int32(5), frozen, {}))})(
          own, out, {kd.name: teacher.params})
  assert all(np.isfinite(float(v)) for v in losses.values()), losses

  full_teacher = dataclasses.replace(teacher_cfg, vision_feature_select_strategy="full")
  # The teacher takes the frames normalised for its own family (same image size here).
  (mean, std), (t_mean, t_std) = (preprocess.MEAN_STD[f] for f in (family, teacher_layout[0]))
  teacher_frames = ((batch["image"] * np.asarray(std) + np.asarray(mean)) - np.asarray(t_mean)) \
      / np.asarray(t_std)
  teacher_out = jax.jit(lambda p: vlm.encode_image(full_teacher, p, teacher_frames, ids,
                                                   mask))(teacher.params)
  lead = views if views > 1 else 0   # the CLIP "full" teacher's class tokens
  teacher_cells = distill.match_grid(teacher_out["visual_tokens"][:, lead:],
                                     teacher_cfg.vision.grid, cfg.vision.grid, views)
  teacher_valid = distill.match_grid(
      jnp.asarray([0.0 if views == 1 and i % teacher_cfg.vision.num_patches == 0 else 1.0
                   for i in range(views * teacher_cfg.vision.num_patches)])[None, :, None],
      teacher_cfg.vision.grid, cfg.vision.grid, views)[0, :, 0]
  want = distill.feature_kd(full_cells, teacher_cells, own["distill"]["projection"],
                            jax.nn.sigmoid(out["token_scores"]) * want_valid * teacher_valid)
  np.testing.assert_allclose(float(losses["kd_feature"]), float(want), rtol=1e-5)


def test_a_teacher_of_another_family_and_size_takes_its_own_frames():
  """The teacher's frames: the student's pixels normalised by the statistics of the teacher's
  family's HF processor, at its image size, view by view; the distillation loss runs with a
  teacher at another resolution (it crashed: the teacher got the student's frames)."""
  stats = {f: (np.asarray(p.image_mean), np.asarray(p.image_std)) for f, p in (
      ("clip", transformers.CLIPImageProcessor()), ("siglip", transformers.SiglipImageProcessor()))}
  hf_normalize = lambda pixels, family: (pixels / 255.0 - stats[family][0]) / stats[family][1]
  resized = lambda cfg, size: dataclasses.replace(cfg, vision=dataclasses.replace(
      cfg.vision, image_size=size))
  clip, siglip = _layout_cfg("clip", "default", 1), _layout_cfg("siglip", "default", 1)
  pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float64)
  frames = jnp.asarray(hf_normalize(pixels, "clip"), jnp.float32)
  np.testing.assert_allclose(distillation.teacher_images(resized(clip, 32), resized(siglip, 32),
                                                         frames),
                             hf_normalize(pixels, "siglip"), atol=3e-6)
  # Two views of other greys (a flat frame stays flat at any size): each view on its own.
  grey = np.stack([np.full((32, 32, 3), 77.0), np.full((32, 32, 3), 200.0)])[None]
  got = distillation.teacher_images(clip, resized(siglip, 48),
                                    jnp.asarray(hf_normalize(grey, "clip"), jnp.float32))
  assert got.shape == (1, 2, 48, 48, 3)
  np.testing.assert_allclose(got, hf_normalize(np.broadcast_to(
      grey[:, :, :1, :1], got.shape), "siglip"), atol=3e-6)
  frames = np.asarray(frames)
  big = resized(siglip, 48)

  student = resized(clip, 32)
  tcfg = dataclasses.replace(big, num_cameras=1)
  teacher = run_lib.Run("", None, tcfg, jax.jit(lambda k: vlm.init(tcfg, k))(jax.random.key(2)),
                        0)
  kd = distillation.Distillation(student, teacher, {"kd_heads": 1.0, "kd_lm": 0.0,
                                                    "kd_feature": 1.0}, 1.0, "cosine")
  params = jax.jit(lambda k: vlm.init(student, k))(jax.random.key(0))
  ids, mask = jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32)
  batch = {"image": jnp.asarray(frames), "input_ids": None, "attention_mask": mask,
           "instruction_ids": ids, "instruction_mask": mask, "domain": jnp.array([0, 1])}
  out = vlm.encode_image(student, params, batch["image"], ids, mask)
  own = {"distill": kd.init(jax.random.key(3))}
  losses = kd.loss(adapt.Context(own, out, batch, jnp.int32(5), {kd.name: teacher.params}, {}))
  assert set(losses) == {"kd_heads", "kd_feature"}
  assert all(np.isfinite(float(v)) for v in losses.values()), losses


def test_box_pooling_skips_cells_without_a_token():
  """A box over a cell no token holds (SigLIP's dropped first patch) pools the cells that
  hold one, and a box over that cell alone pools nothing."""
  grid, tokens = 2, jnp.arange(1.0, 5.0)[None, :, None] * jnp.ones((1, 4, 3))
  valid = np.array([0.0, 1.0, 1.0, 1.0])
  boxes = jnp.array([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 0.5]]])   # cell 0; cells 0-1
  pooled = discriminators.box_pool(tokens, grid, boxes, jnp.ones((1, 2)), valid=valid)
  np.testing.assert_allclose(pooled[0, :, 0], [0.0, 2.0])


def test_feature_kd_of_bf16_tokens_is_computed_in_float32():
  """Mixed precision hands feature KD bf16 tokens; a cosine distance near 0 (a student close
  to its teacher) keeps its digits only in float32: the loss and its gradient equal the
  float32 formula on the same (bf16-rounded) values."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  teacher = jax.random.normal(k1, (4, 16, 48)).astype(jnp.bfloat16)
  projection = jax.random.normal(k2, (32, 48)) / 6
  student = (teacher.astype(jnp.float32) @ jnp.linalg.pinv(projection)
             + 1e-3 * jax.random.normal(k3, (4, 16, 32))).astype(jnp.bfloat16)
  f32 = lambda x: x.astype(jnp.float32)

  def reference(s, p):
    a, b = f32(s) @ p, f32(teacher)
    cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))
    return jnp.mean(1.0 - cos)
  got = jax.value_and_grad(lambda p: distill.feature_kd(student, teacher, p))(projection)
  want = jax.value_and_grad(lambda p: reference(student, p))(projection)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-4)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-3, atol=1e-7)


def test_the_clip_stage_follows_the_vision_tower_the_run_trains():
  """Its loss and fresh text tower follow the model the run builds, also one a pretrained
  start takes from its checkpoint after the config was made (they followed the preset)."""
  config = demo.get_config("method=clip_finetune")
  for family, width, kind in (("clip", 64, "clip"), ("siglip", 48, "siglip"),
                              ("siglip", 128, "siglip")):
    model = _layout_cfg(family, "default", 1)
    model = dataclasses.replace(model, vision=dataclasses.replace(model.vision,
                                                                  hidden_size=width))
    component = clip_stage.ContrastiveFinetuning.from_config(config, model, None)
    assert component.kind == kind
    assert (component.tcfg.hidden_size, component.tcfg.projection_dim,
            component.tcfg.intermediate_size, component.tcfg.num_heads,
            component.tcfg.vision_hidden_size) == (width, width, 4 * width, max(1, width // 64),
                                                   width)
  config.clip.loss, config.clip.text.hidden_size = "clip", 32   # what a user sets stays
  component = clip_stage.ContrastiveFinetuning.from_config(config, model, None)
  assert component.kind == "clip" and component.tcfg.hidden_size == 32


def test_caption_metrics_and_warnings(caplog):
  """clip_captions counts the batch's distinct captions and clip_cross_domain the share of
  rows whose caption also captions a row of the other domain; training warns on one caption
  for all, and on captions that name the domain."""
  cfg = vlm.config_from_dict(common.model_config("tiny"))
  config = demo.get_config("method=clip_finetune")
  component = clip_stage.ContrastiveFinetuning.from_config(config, cfg, None)
  params = {"text": component.init(jax.random.key(0))}

  def metrics(captions, domain):
    ids = np.zeros((len(captions), 6), np.int32)
    ids[:, :2] = np.asarray(captions)
    batch = {"caption_ids": jnp.asarray(ids), "caption_mask": jnp.asarray(ids > 0, jnp.int32),
             "domain": jnp.asarray(domain, jnp.int32)}
    out = {"image_pooled": jnp.ones((len(captions), cfg.vision.hidden_size))}
    ctx = adapt.Context(params, out, batch, jnp.int32(0), {}, {})
    component.loss(ctx)
    return {k: float(v) for k, v in ctx.metrics.items()}

  a, b, c = [5, 1], [7, 1], [9, 2]
  assert metrics([a, b, a, c, a, b], [0, 0, 0, 1, 1, 1]) == {
      "clip_captions": 3, "clip_cross_domain": pytest.approx(5 / 6)}   # c on target only
  one = metrics([a] * 4, [0, 0, 1, 1])
  by_domain = metrics([a, a, b, b], [0, 0, 1, 1])
  assert one == {"clip_captions": 1, "clip_cross_domain": 1.0}
  assert by_domain == {"clip_captions": 2, "clip_cross_domain": 0.0}
  assert metrics([a, b], [0, 0])["clip_cross_domain"] == 1.0   # one domain: nothing to tell
  warned = {}
  with caplog.at_level("WARNING"):
    for row in ({"step": 1, **metrics([a, b, a, b], [0, 0, 1, 1])}, {"step": 2, **one},
                {"step": 3, **by_domain}, {"step": 4, **one}):
      train._warn_captions(row, warned)
  text = caplog.text
  assert "step 2 is the same" in text and "step 3 captions rows of both domains" in text
  assert "step 1" not in text and "step 4" not in text    # once each
