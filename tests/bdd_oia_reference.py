"""BDD-OIA labels by the rule of the dataset's own loader (`action_prediction/
DataLoader_together.py` of the BDD-OIA project), written out independently of the builder."""
import json
import os


def official_labels(root, json_dir="lastframe", split="train", image_dir="lastframe/data"):
  """{file_name: (actions [4], reasons [21])}: sort images and reasons by file name; an image's
  label is annotations[image id]; keep 4-value rows and rows whose 5th value is 0; skip images
  whose file is missing; the i-th sorted reason goes with the i-th sorted image."""
  with open(os.path.join(root, json_dir, f"{split}_25k_images_actions.json")) as f:
    data = json.load(f)
  with open(os.path.join(root, json_dir, f"{split}_25k_images_reasons.json")) as f:
    reason = sorted(json.load(f), key=lambda k: k["file_name"])
  out = {}
  for i, img in enumerate(sorted(data["images"], key=lambda k: k["file_name"])):
    category = data["annotations"][img["id"]]["category"]
    if len(category) == 4 or category[4] == 0:
      if os.path.isfile(os.path.join(root, image_dir, img["file_name"])):
        out[img["file_name"]] = (category[:4], reason[i]["reason"])
  return out
