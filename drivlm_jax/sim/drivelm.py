"""DriveLM-nuScenes QA of one keyframe, in the released layout (docs/data_prep_nus.md of
OpenDriveLab/DriveLM; `v1_1_train_nus.json` as its challenge/data/train_sample.json shows
it: no tags, which the challenge's scripts add when they derive the test questions): key
objects named by c-tags `<cK,CAM,x,y>` (the camera where the object's 2D box is largest, and
the box centre in its pixels) with their `key_object_infos`, and QAs that use the c-tags,
phrased so that those scripts pick the kinds they pick from the real files: the important
objects (named by class), the moving status of a vehicle (answers among the challenge's
options), the order to notice the objects in (every c-tag), yes/no questions, the actions
to take, and the ego's behaviour (one of the challenge's 21).
"""
from drivlm_jax.sim import labels

MAX_KEY_OBJECTS = 6
_CATEGORY = {"car": "Vehicle", "rider": "Vehicle", "pedestrian": "Pedestrian",
             "obstacle": "Traffic element"}
_EXTRA = {"C": None, "con_up": None, "con_down": None, "cluster": None, "layer": None}


def _qa(question, answer):
  return {"Q": question, "A": answer, **_EXTRA}


def key_objects(scene, boxes: dict) -> list:
  """[(c-tag, agent, info)] of the nearest agents seen by a camera (at most 6).
  `boxes`: agent index -> (camera, [x1, y1, x2, y2]) of its largest 2D box."""
  seen = sorted((i for i in boxes), key=lambda i: scene.agents[i].distance)
  out = []
  for k, i in enumerate(seen[:MAX_KEY_OBJECTS]):
    camera, box = boxes[i]
    agent = scene.agents[i]
    tag = f"<c{k + 1},{camera},{(box[0] + box[2]) / 2:.1f},{(box[1] + box[3]) / 2:.1f}>"
    status = ("Stopped" if agent.stopped else "Moving") if agent.category in ("car",
                                                                             "rider") else "None"
    out.append((tag, agent, {"Category": _CATEGORY[agent.category], "Status": status,
                             "Visual_description": labels.describe(agent),
                             "2d_bbox": [round(float(v), 1) for v in box]}))
  return out


def frame(scene, actions, reasons, behaviour: str, boxes: dict) -> dict:
  """{"key_object_infos", "QA"} of one keyframe; `behaviour` one of DriveLM's 21."""
  objects = key_objects(scene, boxes)
  important = ("There is " + ", ".join(f"{labels.describe(a)} ({t})" for t, a, _ in objects)
               + ".") if objects else "There is no important object around the ego vehicle."
  perception = [_qa("What are the important objects in the current scene? Those objects will "
                    "be considered for the future reasoning and driving decision.", important)]
  prediction = []
  for tag, agent, info in objects:
    if info["Status"] != "None":   # vehicles: the challenge's moving-status options
      moving = "Stopped." if agent.stopped else {"left": "Turn left.", "right": "Turn right."}.get(
          agent.turning, "Going ahead.")
      perception.append(_qa(f"What is the moving status of object {tag}?", moving))
    prediction.append(_qa(f"Would {tag} be in the moving direction of the ego vehicle?",
                          "Yes." if agent.lane == 0 else "No."))
  if objects:
    order = ("Firstly", "Secondly", "Thirdly", "Fourthly", "Fifthly", "Sixthly")
    prediction.append(_qa(
        "What object should the ego vehicle notice first when the ego vehicle is getting to "
        "the next possible location? And then?",
        " ".join(f"{order[k]} notice that {t}, {labels.describe(a)}."
                 for k, (t, a, _) in enumerate(objects))))
  base = labels.qa_pairs(scene, actions, reasons)
  perception += [_qa(p["Q"], p["A"]) for p in base["perception"][1:]]   # the light
  prediction += [_qa(p["Q"], p["A"]) for p in base["prediction"]]
  explanation = base["planning"][0]["A"]
  planning = []
  if objects:
    planning.append(_qa(f"What actions could the ego vehicle take based on {objects[0][0]}? "
                        f"Why take this action?", explanation))
  planning += [_qa(base["planning"][0]["Q"], explanation)]
  planning += [_qa(p["Q"], p["A"]) for p in base["planning"][1:]]
  behavior = [_qa("Predict the behavior of the ego vehicle.", behaviour)]
  return {"key_object_infos": {t: info for t, _, info in objects},
          "QA": {"perception": perception, "prediction": prediction, "planning": planning,
                 "behavior": behavior}}
