"""Label-free model selection (experiments.select): DEV against the formulas of You et al.
(2019, Algorithm 1), the proxy A-distance against sklearn's held-out accuracy, and a sweep of
the demo's runs ranked end to end (tests/test_demo.py)."""
import json
import sys

import numpy as np
import pytest
from scipy import special as scipy_special
from sklearn import linear_model, metrics, pipeline, preprocessing

from experiments import select


def _classifier(class_weight=None):
  """The domain classifier the module documents: logistic regression on standardised
  features, random_state 0."""
  return pipeline.make_pipeline(preprocessing.StandardScaler(),
                                linear_model.LogisticRegression(max_iter=1000, random_state=0,
                                                                class_weight=class_weight))


#### DEV

def test_dev_risk_is_the_papers_control_variate_estimate():
  rng = np.random.default_rng(0)
  losses, weights = rng.gamma(2.0, 0.3, 64), rng.lognormal(0.0, 0.7, 64)
  weighted = weights * losses                                   # L
  eta = -np.cov(weighted, weights)[0, 1] / np.var(weights, ddof=1)
  expected = weighted.mean() + eta * weights.mean() - eta
  got = select.dev_risk(losses, weights)
  assert abs(got["risk"] - expected) <= 1e-9
  assert abs(got["eta"] - eta) <= 1e-9
  assert abs(got["weighted_loss"] - weighted.mean()) <= 1e-12


def test_dev_risk_with_unit_weights_is_the_mean_loss():
  losses = np.random.default_rng(1).gamma(2.0, 0.3, 40)
  assert abs(select.dev_risk(losses, np.ones(40))["risk"] - losses.mean()) <= 1e-12


def test_density_ratios_are_cross_fitted_odds():
  """w = n_s / n_t * p(target | f) / p(source | f), each half of the source validation
  weighed by a classifier fit on the other half and every target example."""
  rng = np.random.default_rng(2)
  source, target = rng.normal(size=(30, 5)), rng.normal(0.5, 1.0, size=(50, 5))
  first = select.halves(np.arange(30))
  expected = np.empty(30)
  for query in (first, ~first):
    fit = source[~query]
    clf = _classifier().fit(np.concatenate([fit, target]),
                            np.r_[np.zeros(len(fit)), np.ones(len(target))])
    p = clf.predict_proba(source[query])[:, 1]
    expected[query] = p / (1 - p) * len(fit) / len(target)
  np.testing.assert_allclose(select.density_ratios(source, target), expected, rtol=1e-9)


def test_action_losses_are_binary_cross_entropy():
  rng = np.random.default_rng(3)
  logits, labels = rng.normal(0, 2, size=(10, 4)), rng.integers(0, 2, size=(10, 4))
  p = 1 / (1 + np.exp(-logits))
  expected = np.mean(-labels * np.log(p) - (1 - labels) * np.log(1 - p), axis=1)
  np.testing.assert_allclose(select.action_losses(logits, labels), expected, rtol=1e-10)


#### Proxy A-distance

def test_pad_of_identical_distributions_is_near_zero():
  rng = np.random.default_rng(4)
  assert select.proxy_a_distance(rng.normal(size=(400, 8)), rng.normal(size=(400, 8)))[
      "pad"] < 0.3


def test_pad_of_identical_distributions_of_unequal_size_is_near_zero():
  """A classifier that always answers the larger domain has a plain error of n_t / (n_s +
  n_t) (here a PAD of 1.2); Ben-David's estimate uses the balanced error."""
  rng = np.random.default_rng(7)
  assert select.proxy_a_distance(rng.normal(size=(512, 8)), rng.normal(size=(128, 8)))[
      "pad"] < 0.3


def test_pad_of_separated_distributions_is_near_two():
  rng = np.random.default_rng(5)
  assert select.proxy_a_distance(rng.normal(size=(400, 8)),
                                 rng.normal(4.0, 1.0, size=(400, 8)))["pad"] > 1.8


def test_pad_error_is_sklearns_held_out_error_on_the_image_split():
  rng = np.random.default_rng(6)
  source, target = rng.normal(size=(240, 6)), rng.normal(0.4, 1.0, size=(200, 6))
  source_groups, target_groups = np.repeat(np.arange(60), 4), np.repeat(np.arange(50), 4)
  train_s = select.halves(source_groups, select.SEED)
  train_t = select.halves(target_groups, select.SEED + 1)
  for groups, side in ((source_groups, train_s), (target_groups, train_t)):
    assert all(len(set(side[groups == g])) == 1 for g in np.unique(groups))  # images whole
    assert side.sum() == len(side) // 2                                    # a 50/50 split
  x, y = np.concatenate([source, target]), np.r_[np.zeros(240), np.ones(200)]
  train_rows = np.r_[train_s, train_t]
  clf = _classifier("balanced").fit(x[train_rows], y[train_rows])
  eps = 1 - metrics.balanced_accuracy_score(y[~train_rows], clf.predict(x[~train_rows]))
  got = select.proxy_a_distance(source, target, source_groups, target_groups)
  assert 0 < eps < 0.5
  assert got["error"] == pytest.approx(eps, abs=1e-12)   # the sizes differ: 240 vs 200
  assert got["pad"] == pytest.approx(2 * (1 - 2 * eps), abs=1e-12)


#### Run directories (the end-to-end ranking of a sweep: tests/test_demo.py, on the demo's
#### runs)

def test_a_run_dir_without_eval_or_checkpoints_is_named(tmp_path, monkeypatch):
  unfinished = tmp_path / "unfinished"
  monkeypatch.setattr(sys, "argv", ["experiments.select", str(unfinished)])
  with pytest.raises(SystemExit, match=f"{unfinished}: no eval.json"):
    select.main()
  unfinished.mkdir()
  (unfinished / "eval.json").write_text(json.dumps({"test": {"target": {"action_mAP": 50.0}}}))
  with pytest.raises(SystemExit, match=f"{unfinished}: no checkpoints"):
    select.main()


def test_only_a_pruned_student_is_scored_as_deployed(tmp_path):
  from configs import demo
  student = demo.get_config("method=drivlm_student,teacher=t")
  assert select.deployed_keep_ratio("s", student) == 0.25
  with pytest.raises(ValueError, match="teacher_run: no evals.target_pruned.keep_ratio"):
    select.deployed_keep_ratio("teacher_run", demo.get_config("method=drivlm_teacher"))
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "eval.json").write_text(json.dumps(
      {"test": {"target": {"action_mAP": 70.0}, "target_pruned": {"action_mAP": 60.0}}}))
  assert (select.oracle_map(str(run)), select.oracle_map(str(run), "target_pruned")) == (70, 60)
  # DEV's features of the deployed student are its pruned heads', PAD's its every token.
  import dataclasses
  import jax
  from configs import common
  from drivlm_jax.model import vlm
  cfg = dataclasses.replace(vlm.config_from_dict(common.model_config("tiny")), reweight=True,
                            reweight_layer=0)
  params = vlm.init(cfg, jax.random.key(0))
  params["reweighting"]["gain"] = np.float32(1.0)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(2, cfg.vision.image_size, cfg.vision.image_size, 3)
                               ).astype(np.float32),
           "instruction_ids": rng.integers(10, 100, (2, 5)).astype(np.int32),
           "instruction_mask": np.ones((2, 5), np.int32),
           "boxes": np.tile(np.float32([0.1, 0.1, 0.6, 0.6]), (2, 1, 1)),
           "box_mask": np.ones((2, 1), np.float32), "box_camera": np.zeros((2, 1), np.int32)}
  full, pruned = (select._features(cfg, params, batch, keep) for keep in (1.0, 0.25))
  want = vlm.encode_image(cfg, params, batch["image"], batch["instruction_ids"],
                          batch["instruction_mask"], keep_ratio=0.25)
  np.testing.assert_allclose(pruned["action_logits"], want["action_logits"], atol=1e-5)
  assert np.abs(np.asarray(pruned["action_logits"] - full["action_logits"])).max() > 1e-4
  np.testing.assert_allclose(pruned["token"], full["token"], atol=1e-5)   # another program


def test_a_target_without_labels_is_ranked_without_the_oracle(tmp_path):
  """The selection reads no target label: a run whose eval.json has no target action_mAP
  (a target without labels) is still ranked; only the agreement with the oracle is left
  out, and said so."""
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "eval.json").write_text(json.dumps({"test": {"source": {"action_mAP": 80.0}}}))
  assert select.oracle_map(str(run)) is None
  row = {"run_dir": str(run), "method": "m", "dev_risk": 0.5, "source_loss": 0.4,
         "source_mAP": 70.0, "pad": dict.fromkeys(select.LEVELS), "oracle_target_mAP": None,
         "dev_rank": 1}
  text = select.markdown({"runs": [row], "agreement": {}, "notes": ["no target labels"],
                          "pad_by_method": select.pad_by_method([row])})
  assert f"DEV selects {run}" in text and "Spearman" not in text


def test_output_spread_is_the_mean_std_of_the_probabilities_per_class():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 4)) * [3.0, 1.0, 0.1, 0.0]
  expected = np.mean([np.std(scipy_special.expit(logits[:, k])) for k in range(4)])
  assert select.output_spread(logits) == pytest.approx(expected)
  assert select.output_spread(np.full((50, 4), 2.0)) == pytest.approx(0.0, abs=1e-12)
