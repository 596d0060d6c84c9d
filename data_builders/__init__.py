"""TFDS builders for BDD-OIA and nuScenes-Drive (manual_dir, array_record, no TensorFlow).

`import data_builders` registers `bdd_oia` and `nuscenes_drive` with tfds, so that
`tfds.data_source("bdd_oia", data_dir=D, split="train")` reads what `python -m data_builders
build ...` wrote.
"""
from data_builders.bdd_oia.bdd_oia_dataset_builder import BddOia
from data_builders.nuscenes_drive.nuscenes_drive_dataset_builder import NuscenesDrive

__all__ = ["BddOia", "NuscenesDrive"]
