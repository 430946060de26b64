"""Image-quality data: data-set records and readers, splits, the decode-once image cache,
patch batches and where the images live on a GPU run.

Data flows one way:

    annotation files -> IQADataset (paths, mos, splits)          registry.load_dataset()
    image files      -> uint8 tensor (N, 3, H, W), cached on disk  image_cache.load_images()
    uint8 tensor     -> normalized patch batches on the device     patches.TrainPatchSampler, eval_patch_batches()

Importing the package registers every built-in data set (iqa/data/datasets/), so the
registry's tables are complete before any of its modules is used.
"""
from iqa.data import registry  # noqa: F401  (first: the data-set modules register into it)
from iqa.data import datasets  # noqa: F401
