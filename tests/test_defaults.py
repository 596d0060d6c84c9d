"""experiments.defaults: the adversarial defaults chosen across shifts by DEV ranks."""
import json
import sys

import pytest

from configs import demo as demo_config
from drivlm_jax import run as run_lib
from experiments import defaults


def test_candidates_are_the_grid_with_levels_off_at_zero():
  grid = defaults.candidates([0.03, 0.3], ["image+token+instance", "image"], [0.25])
  assert list(grid) == ["w0.03-image+token+instance-start0.25", "w0.03-image-start0.25",
                        "w0.3-image+token+instance-start0.25", "w0.3-image-start0.25"]
  assert grid["w0.3-image-start0.25"] == {"loss.da_image": 0.3, "loss.da_token": 0.0,
                                          "loss.da_instance": 0.0, "da.start": 0.25}
  with pytest.raises(ValueError, match="'pixel'"):
    defaults.candidates([0.1], ["pixel"], [0.25])
  fda = defaults.candidates([0.03], ["image"], [0.25], defaults.parse_fdas("0,0.05x0.5,0.09"))
  assert list(fda) == ["w0.03-image-start0.25", "w0.03-image-start0.25-fda0.05x0.5",
                       "w0.03-image-start0.25-fda0.09x1"]
  assert fda["w0.03-image-start0.25"] == grid["w0.03-image-start0.25"]   # off: as before
  assert fda["w0.03-image-start0.25-fda0.05x0.5"] == {
      **grid["w0.03-image-start0.25"], "fda.beta": 0.05, "fda.fraction": 0.5}
  with pytest.raises(ValueError, match="'0.05y'"):
    defaults.parse_fdas("0.05y")
  with pytest.raises(ValueError, match="fraction"):
    defaults.candidates([0.03], ["image"], [0.25], [(0.05, 0.0)])
  std = defaults.candidates([0.03], ["image"], [0.25], standardize=defaults.parse_switch(
      "--standardize", "0,1"))
  assert std == {"w0.03-image-start0.25": grid["w0.03-image-start0.25"],
                 "w0.03-image-start0.25-std": {**grid["w0.03-image-start0.25"],
                                               "model.vision.standardize": True}}
  rel = defaults.candidates([0.03], ["image"], [0.25], relations=[0.0, 0.3])
  assert rel == {"w0.03-image-start0.25": {**grid["w0.03-image-start0.25"],
                                           "loss.kd_relation": 0.0},   # off, said so
                 "w0.03-image-start0.25-rel0.3": {**grid["w0.03-image-start0.25"],
                                                  "loss.kd_relation": 0.3}}
  with pytest.raises(ValueError, match="relation weight -1"):
    defaults.candidates([0.03], ["image"], [0.25], relations=[-1.0])
  pruned = defaults.candidates([0.03], ["image"], [0.25], relations=[0.3], pruned=[0.0, 1.0])
  assert pruned == {"w0.03-image-start0.25-rel0.3": {**rel["w0.03-image-start0.25-rel0.3"],
                                                     "loss.kd_pruned": 0.0},
                    "w0.03-image-start0.25-rel0.3-pruned1": {
                        **rel["w0.03-image-start0.25-rel0.3"], "loss.kd_pruned": 1.0}}
  assert demo_config.get_config("method=drivlm_student,teacher=t").loss.kd_relation == 0.3
  assert demo_config.get_config("method=drivlm_teacher").loss.kd_relation == 0.0
  assert demo_config.get_config("method=drivlm_student,teacher=t").loss.kd_pruned == 1.0
  assert demo_config.get_config("method=drivlm_teacher").loss.kd_pruned == 0.0
  with pytest.raises(ValueError, match="--standardize '0,2'"):
    defaults.parse_switch("--standardize", "0,2")
  config = demo_config.get_config("method=drivlm_teacher,model=tiny_teacher")
  assert config.model.vision.standardize is False   # the key the candidate sets exists
  assert demo_config.get_config("standardize=1").model.vision.standardize is True


def test_choice_is_the_lowest_mean_rank_over_shifts_first_on_ties():
  # Risks on different scales per shift; ranks (1 = lowest risk), ties averaged:
  #   night: a 1, b 2, c 3     sensor: a 3, b 1.5, c 1.5     camera: a 2, b 1, c 3
  # mean ranks: a 2.0, b 1.5, c 2.5 -> b.
  groups = {"night/seed0": {"a": 0.1, "b": 0.2, "c": 0.3},
            "sensor/seed0": {"a": 9.0, "b": 5.0, "c": 5.0},
            "camera/seed0": {"a": 0.02, "b": 0.01, "c": 0.05}}
  result = defaults.choose(groups)
  assert result["mean_rank"] == pytest.approx({"a": 2.0, "b": 1.5, "c": 2.5})
  assert result["ranks"]["b"]["sensor/seed0"] == 1.5
  assert result["chosen"] == "b"
  tied = defaults.choose({"g": {"x": 1.0, "y": 1.0}})
  assert tied["chosen"] == "x"                                   # grid order
  assert defaults.choose({"g": {"x": 1.0, "y": 1.0}}, {"x": 2.0, "y": 1.5})["chosen"] == "y"
  with pytest.raises(ValueError, match="sensor/seed0"):
    defaults.choose({"night/seed0": {"a": 1.0, "b": 2.0}, "sensor/seed0": {"a": 1.0}})


def test_defaults_trains_each_candidate_per_shift_and_reports_the_choice(tmp_path,
                                                                         monkeypatch):
  workdir = tmp_path / "defaults"
  monkeypatch.setattr(sys, "argv", [
      "experiments.defaults", "--workdir", str(workdir), "--smoke", "--steps", "4",
      "--shifts", "night_fog,sensor", "--weights", "0.03,0.3",
      "--arg", "method=drivlm_teacher", "--max_examples", "16", "--parallel", "1",
      "--report", "weights"])
  defaults.main()
  report = json.loads((workdir / "weights.json").read_text())
  names = ["w0.03-image+token+instance-start0.25", "w0.3-image+token+instance-start0.25"]
  assert list(report["candidates"]) == names
  assert len(report["runs"]) == 4
  for row in report["runs"]:
    config = run_lib.read_config(row["run_dir"])
    weight = report["candidates"][row["candidate"]]["loss.da_token"]
    assert config.loss.da_image == config.loss.da_instance == config.loss.da_token == weight
    assert config.data.target.domain == {"night_fog": "night+fog",
                                         "sensor": "day+sensor_lowcost"}[row["shift"]]
    evaluated = run_lib.read_json(run_lib.path(row["run_dir"], "eval.json"))
    assert row["oracle_target_mAP"] == evaluated["test"]["target"]["action_mAP"]
  # The choice: the lowest mean rank of DEV risk within each shift, recomputed here; so are
  # the choices of the baseline criteria (source validation loss; source mAP, higher better).
  for criterion, risk, chosen in [
      ("dev_risk", 1, report["chosen"]),
      ("source_loss", 1, report["by_criterion"]["source val loss"]),
      ("source_mAP", -1, report["by_criterion"]["source val mAP"])]:
    rank = lambda row: 1 + sum(risk * other[criterion] < risk * row[criterion]
                               for other in report["runs"]
                               if other["shift"] == row["shift"] and other is not row)
    mean = {n: sum(rank(r) for r in report["runs"] if r["candidate"] == n) / 2 for n in names}
    if mean[names[0]] != mean[names[1]]:
      assert chosen == min(names, key=mean.get), criterion
    elif criterion == "dev_risk":   # a tie: the source validation loss decides
      assert chosen == report["by_criterion"]["source val loss"]
  assert report["by_criterion"]["DEV"] == report["chosen"]
  for shift in ("night_fog", "sensor"):
    best = max(report["target_mAP"][n][shift] for n in names)
    assert report["regret"][shift] == pytest.approx(
        best - report["target_mAP"][report["chosen"]][shift])
  assert "Chosen without target labels" in (workdir / "weights.md").read_text()


def test_defaults_chooses_on_students_of_one_teacher_and_clip_stage(tmp_path, monkeypatch,
                                                                    capsys):
  workdir = tmp_path / "defaults"
  argv = ["experiments.defaults", "--workdir", str(workdir), "--smoke", "--steps", "4",
          "--shifts", "camera", "--weights", "0.1", "--stage", "student", "--max_examples",
          "16", "--parallel", "1", "--report", "student"]
  for bad, message in [(["--arg", "method=drivlm_student,steps=9"], "pass --steps"),
                       (["--stage", "teacher", "--teacher_arg", "model=tiny"], "student only"),
                       (["--standardize", "0,1"], "compare it with --stage teacher"),
                       (["--standardize", "2"], "--standardize '2'"),
                       (["--relation", "abc"], "--relation 'abc'"),
                       (["--weights", "0.1,x"], "--weights '0.1,x'"),
                       (["--relation", "nan"], "relation weight nan"),
                       (["--stage", "teacher", "--relation", "0.3"], "distils from nothing"),
                       (["--pruned", "-1"], "pruned weight -1"),
                       (["--stage", "teacher", "--deployed"], "is not pruned")]:
    monkeypatch.setattr(sys, "argv", argv + bad)
    with pytest.raises(SystemExit):
      defaults.main()
    assert message in capsys.readouterr().err
  assert not workdir.exists()
  monkeypatch.setattr(sys, "argv", argv + ["--pruned", "0,1", "--deployed"])
  ran = []
  real_run = defaults.jobs.run
  monkeypatch.setattr(defaults.jobs, "run", lambda todo, *a: (ran.extend(todo),
                                                              real_run(todo, *a)))
  defaults.main()
  report = json.loads((workdir / "student.json").read_text())
  seed_dir = workdir / "camera" / "seed0"
  teacher = run_lib.read_config(str(seed_dir / "teacher"))
  clip = run_lib.read_config(str(seed_dir / "clip_finetune"))
  current = demo_config.get_config("method=drivlm_teacher,model=tiny_teacher")
  assert teacher.loss.to_dict() == current.loss.to_dict()   # the teacher at the defaults
  assert teacher.model.to_dict() == current.model.to_dict()
  assert (teacher.total_steps, clip.total_steps) == (4, 1)
  assert clip.loss.clip > 0 and clip.loss.action == 0
  # the student's own relation weight unless --relation says otherwise
  names = ["w0.1-image+token+instance-start0.25-rel0.3",
           "w0.1-image+token+instance-start0.25-rel0.3-pruned1"]
  assert [row["candidate"] for row in report["runs"]] == names
  # Each student waits for its teacher and CLIP stage (run side by side with --parallel > 1).
  assert [job.needs for job in ran] == [(), ()] + [
      ("camera seed 0 teacher", "camera seed 0 clip_finetune")] * 2
  for row in report["runs"]:
    assert row["run_dir"] == str(seed_dir / f"student-{row['candidate']}")
    config = run_lib.read_config(row["run_dir"])
    weight = report["candidates"][row["candidate"]]["loss.da_token"]
    assert config.loss.da_image == config.loss.da_instance == weight
    assert config.loss.kd_relation == report["candidates"][row["candidate"]][
        "loss.kd_relation"] == 0.3
    assert config.loss.kd_pruned == report["candidates"][row["candidate"]]["loss.kd_pruned"]
    # --deployed: scored pruned as deployed, against the pruned evaluator's mAP
    assert row["keep_ratio"] == config.evals.target_pruned.keep_ratio == 0.25
    assert row["oracle_target_mAP"] == run_lib.read_json(run_lib.path(
        row["run_dir"], "eval.json"))["test"]["target_pruned"]["action_mAP"]
    assert config.loss.kd_heads > 0 and config.model.to_dict() == demo_config.get_config(
        f"method=drivlm_student,teacher={seed_dir / 'teacher'}").model.to_dict()
    assert config.distill.teacher == str(seed_dir / "teacher")
    assert config.init_from == str(seed_dir / "clip_finetune")
    assert (config.total_steps, config.data.target.domain) == (4, "cam_tele")
