"""Data: COCO-format annotations, the embedded synthetic dataset, DALI and fallback loaders.

    from dimaskdino.data import load_coco, build_train_loader, build_eval_loader
    train_set = load_coco(json_path, image_root, for_training=True)
    loader = build_train_loader(train_set, batch_size=..., image_size=..., min_scale=..., max_scale=...,
                                seed=..., shard_id=rank, num_shards=world)
    ...
    print(train_set.problems.summary())

DALI itself is imported only when a DALI loader is built.
"""

from dimaskdino.data.coco import CategoryMap, CocoDataset, CocoFormatError, load_coco
from dimaskdino.data.loader import build_eval_loader, build_train_loader
from dimaskdino.data.problems import DataProblems

__all__ = [
    "CategoryMap",
    "CocoDataset",
    "CocoFormatError",
    "DataProblems",
    "build_eval_loader",
    "build_train_loader",
    "load_coco",
]
