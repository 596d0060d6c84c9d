"""The plug-in points: a DriVLM component added from outside the trainer, the flat loss
weights, and the layering of the library (no import cycles, no imports of scripts)."""
import ast
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drivlm_jax import adapt, evaluate, run as run_lib, train
from drivlm_jax.model import vlm
from tests.test_train import read_metrics, small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


class ProjectorL2(adapt.Component):
  """A toy component: an L2 penalty on the projector's weights."""
  terms = ("projector_l2",)

  @classmethod
  def from_config(cls, config, cfg, feats):
    del cfg, feats
    return cls() if config.loss.get("projector_l2", 0.0) > 0 else None

  def loss(self, ctx):
    return {"projector_l2": sum(jnp.sum(jnp.square(x))
                                for x in jax.tree.leaves(ctx.params["projector"]))}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def test_a_component_registered_from_a_test_file_trains(cache, tmp_path, monkeypatch):
  monkeypatch.setitem(adapt.REGISTRY, "projector_l2", adapt.register("projector_l2")(ProjectorL2))
  config = small_config(cache, total_steps=3)
  config.loss.projector_l2 = 0.5
  config.loss.entmin = 0.1        # and a built-in one: the entropy-minimisation baseline
  config.loss.lm = 0.0            # a weight of 0 removes its term: no loss_lm, no LM forward
  train.train(config, str(tmp_path))
  rows = read_metrics(tmp_path)
  assert sorted(rows) == [1, 2, 3]
  for r in rows.values():
    assert "loss_lm" not in r and "loss_entmin_reason" not in r
    assert r["loss_projector_l2"] > 0 and r["loss_entmin"] > 0
    total = (r["loss_action"] + r["loss_reason"] + 0.5 * r["loss_projector_l2"]
             + 0.1 * r["loss_entmin"])
    assert r["loss"] == pytest.approx(total, rel=1e-5)
  # Step 1 sees the initial projector: the penalty is its squared norm.
  cfg = run_lib.model_config(config)
  init = vlm.init(cfg, jax.random.key(config.seed))["projector"]
  expected = sum(float(np.sum(np.square(np.asarray(x)))) for x in jax.tree.leaves(init))
  assert rows[1]["loss_projector_l2"] == pytest.approx(expected, rel=1e-5)
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored["loss"]["projector_l2"] == 0.5


def test_a_loss_weight_nobody_computes_is_an_error(cache, tmp_path):
  config = small_config(cache)
  config.loss.da_imgae = 0.1
  with pytest.raises(KeyError, match="da_imgae"):
    train.train(config, str(tmp_path))


def _imports(path: pathlib.Path) -> set:
  """Modules that `path` imports (absolute names, resolved against its package)."""
  package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
  if path.name != "__init__.py":
    package = package.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      out.update(f"{base}.{a.name}" for a in node.names)
      out.add(base)
  return out


def _module(path):
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_library_imports_no_scripts_and_has_no_cycle():
  files = sorted((ROOT / "drivlm_jax").rglob("*.py"))
  modules = {_module(p): p for p in files}
  graph = {}
  for name, path in modules.items():
    imported = _imports(path)
    bad = sorted(m for m in imported if m.split(".")[0] in ("experiments", "export"))
    assert not bad, f"{path} imports scripts: {bad}"
    graph[name] = {m for m in imported if m in modules and m != name
                   # a registry package imports its members, which import the package
                   and not m.startswith(name + ".") and not name.startswith(m + ".")}
  # Only entry points import the trainer.
  assert not [n for n, deps in graph.items() if "drivlm_jax.train" in deps]
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for dep in graph[node]:
      assert state.get(dep) != "open", f"import cycle: {' -> '.join(stack + [dep])}"
      if dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node, [node])
  assert "drivlm_jax.adapt.alignment" in graph   # the walk saw the whole tree


def test_evaluators_are_built_by_name_with_their_own_schedule(cache):
  config = small_config(cache, "method=drivlm,teacher=x")
  config.evals.target_answers = dict(type="generation", role="target", num=4, every=7)
  built = {e.name: e for e in evaluate.from_config(config)}
  assert type(built["target"]).__name__ == "Heads"
  assert built["target"].every == config.eval_every_steps   # the config's default schedule
  assert built["target_answers"].every == 7 and built["target_answers"].key == ("test", "target")
  assert built["target_pruned"].key == ("test", "target_pruned")
  assert run_lib.deploy_keep_ratio(config) == built["target_pruned"].keep_ratio == 0.25
  config.evals.bad = dict(type="bleu", role="target")
  with pytest.raises(ValueError, match=r"config.evals.bad.type is 'bleu'"):
    evaluate.from_config(config)
  config.evals.bad = dict(type="heads", role="target", keep=0.5)
  with pytest.raises(ValueError, match=r"config.evals.bad: unknown key\(s\) \['keep'\]"):
    evaluate.from_config(config)


def test_eval_json_keeps_other_splits_of_the_same_step(tmp_path):
  """`evaluate --split train` on a finished run adds its split; the test split and DriveLM
  scores of that step stay (experiments.report reads them); an older step's go."""
  path = tmp_path / "eval.json"
  path.write_text(json.dumps({"test": {"target": {"action_mAP": 50.0}},
                              "drivelm": {"final_without_judge": 30.0}, "step": 5}))

  class Train:   # an evaluator of the train split (evals.Evaluator's interface)
    key = ("train", "target")

    def run(self, *args):
      del args
      return {"action_mAP": 70.0}
  evaluate.run([Train()], None, None, None, None, str(tmp_path), step=5, merge=True)
  assert json.loads(path.read_text()) == {
      "test": {"target": {"action_mAP": 50.0}}, "drivelm": {"final_without_judge": 30.0},
      "train": {"target": {"action_mAP": 70.0}}, "step": 5}
  evaluate.run([Train()], None, None, None, None, str(tmp_path), step=6, merge=True)
  assert json.loads(path.read_text()) == {"train": {"target": {"action_mAP": 70.0}}, "step": 6}
  # Training (no merge) writes it whole: nothing of an earlier run in the folder survives.
  path.write_text(json.dumps({"test": {"target": {"action_mAP": 50.0}}, "step": 6}))
  evaluate.run([Train()], None, None, None, None, str(tmp_path), step=6)
  assert json.loads(path.read_text()) == {"train": {"target": {"action_mAP": 70.0}}, "step": 6}


def test_evaluate_on_a_folder_that_is_not_a_run_writes_nothing_there(tmp_path):
  result = subprocess.run([sys.executable, "-m", "drivlm_jax.evaluate", "--config",
                           "configs/demo.py", "--workdir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0 and "is not a run directory" in result.stderr
  assert not list(tmp_path.iterdir())
