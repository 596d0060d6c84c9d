"""DriveLM-nuScenes QA of one keyframe, in the released layout (docs/data_prep_nus.md of
OpenDriveLab/DriveLM; v1.1's per-QA `tag`): key objects named by c-tags
`<cK,CAM,x,y>` (the camera where the object's 2D box is largest, and the box centre in its
pixels) with their `key_object_infos`, and QAs that use the c-tags. Tags, as the DriveLM
challenge scores them: 0 exact-match accuracy, 1 GPT judge, 2 language, 3 coordinate match.
"""
from drivlm_jax.sim import labels

MAX_KEY_OBJECTS = 6
_CATEGORY = {"car": "Vehicle", "rider": "Vehicle", "pedestrian": "Pedestrian",
             "obstacle": "Traffic element"}
_EXTRA = {"C": None, "con_up": None, "con_down": None, "cluster": None, "layer": None}


def _qa(question, answer, tag):
  return {"Q": question, "A": answer, **_EXTRA, "tag": list(tag)}


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
  """{"key_object_infos", "QA"} of one keyframe."""
  objects = key_objects(scene, boxes)
  important = ("There is " + ", ".join(f"{labels.describe(a)} ({t})" for t, a, _ in objects)
               + ".") if objects else "There is no important object around the ego vehicle."
  perception = [_qa("What are the important objects in the current scene? Those objects will "
                    "be considered for the future reasoning and driving decision.",
                    important, [3])]
  prediction, planning = [], []
  for tag, agent, info in objects:
    moving = {"Moving": "Going ahead.", "Stopped": "Stopped."}.get(info["Status"],
                                                                    "Not moving.")
    perception.append(_qa(f"What is the moving status of object {tag}?", moving, [0]))
    prediction.append(_qa(f"Would {tag} be in the moving direction of the ego vehicle?",
                          "Yes." if agent.lane == 0 else "No.", [0]))
  base = labels.qa_pairs(scene, actions, reasons)
  perception += [_qa(p["Q"], p["A"], [0]) for p in base["perception"][1:]]   # the light
  prediction += [_qa(p["Q"], p["A"], [2]) for p in base["prediction"]]
  explanation = base["planning"][0]["A"]
  if objects:
    planning.append(_qa(f"What actions could the ego vehicle take based on {objects[0][0]}? "
                        f"Why take this action?", explanation, [1]))
  planning += [_qa(base["planning"][0]["Q"], explanation, [2])]
  planning += [_qa(p["Q"], p["A"], [0]) for p in base["planning"][1:]]
  behavior = [_qa("Predict the behavior of the ego vehicle.", behaviour, [0])]
  return {"key_object_infos": {t: info for t, _, info in objects},
          "QA": {"perception": perception, "prediction": prediction, "planning": planning,
                 "behavior": behavior}}
