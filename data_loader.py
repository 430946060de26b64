"""The data API under its familiar name: a face over the library package iqa/data/.

    annotation files -> IQADataset (paths, mos, splits)          load_dataset()
    image files      -> uint8 tensor (N, 3, H, W), cached on disk  load_images()
    uint8 tensor     -> normalized patch batches on the device     TrainPatchSampler, eval_patch_batches()

Where each part lives:
    iqa/data/registry.py      DatasetRecord, register, resolve_dataset, load_dataset, and the
                              tables derived from the records (DATASET_NAMES, DEFAULT_ROOTS, ...)
    iqa/data/datasets/*.py    one module per data set: its record and its reader
    iqa/data/formats.py       CSV, XLSX, .mat and score-list readers, the image-folder search
    iqa/data/splits.py        split_by_groups and the split helpers
    iqa/data/image_cache.py   load_images: decode once, cache on disk (memory-mapped); ImageRows
    iqa/data/patches.py       TrainPatchSampler, eval_patch_batches, jitter and normalization
    iqa/data/placement.py     canonical_device and the one GPU memory policy (plan_image_memory)

Every problem with the input raises DataError naming the file and what was expected.
"""
from iqa.data.datasets.demo import ensure_demo_dataset
from iqa.data.formats import find_image_folder, parse_number, read_csv
from iqa.data.image_cache import ImageRows, load_images
from iqa.data.patches import (EVAL_CROPS, IMAGENET_MEAN, IMAGENET_STD, TrainPatchSampler, eval_crops_per_image,
                              eval_patch_batches)
from iqa.data.placement import canonical_device, place_images, plan_image_memory
from iqa.data.registry import (ANNOTATION_FILES, DATASET_ALIASES, DATASET_NAMES, DEFAULT_ROOTS, DEFAULT_VAL_RATIO,
                               EXPECTED_LAYOUT, GENERIC, SCRIPT_DIR, DatasetRecord, DataError, IQADataset,
                               ReadContext, load_dataset, register, resolve_dataset)
from iqa.data.splits import split_by_groups

__all__ = [
    'IMAGENET_MEAN', 'IMAGENET_STD', 'DATASET_NAMES', 'DATASET_ALIASES', 'DEFAULT_ROOTS', 'EXPECTED_LAYOUT',
    'ANNOTATION_FILES', 'GENERIC', 'SCRIPT_DIR', 'DataError', 'IQADataset', 'DatasetRecord', 'register',
    'resolve_dataset', 'load_dataset', 'load_images', 'ImageRows', 'TrainPatchSampler', 'eval_patch_batches',
    'eval_crops_per_image', 'EVAL_CROPS', 'place_images', 'ensure_demo_dataset',
    'canonical_device', 'plan_image_memory', 'DEFAULT_VAL_RATIO', 'split_by_groups',
    'ReadContext', 'read_csv', 'find_image_folder', 'parse_number',
]
