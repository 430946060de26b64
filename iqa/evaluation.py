"""Per-image scores of a patch-based IQA model, shared by training-time evaluation
(train_swin.py) and checkpoint evaluation (cross_dataset_test.py), so both score
an image with exactly the same crops.
"""
import math
import sys

import numpy as np
import torch
from tqdm import tqdm

from iqa.data.patches import eval_crops_per_image, eval_patch_batches
from iqa.runtime import gather_to_all


def too_small_message(sizes, world_size):
    """Why splits of fewer images than processes cannot be evaluated; `sizes`: {split name: images}."""
    names = ', '.join(f'{name} ({n} image{"s" * (n != 1)})' for name, n in sizes.items())
    return (f'{names}: fewer images than the {world_size} processes; each process scores every '
            f'{world_size}-th image, so one would have none. Run fewer processes (torchrun --nproc_per_node) '
            'or use a larger split.')


def predict_scores(model, images_u8, *, patch_size=224, patch_num=20, batch_size=64, random_crop=False,
                   seed=0, device='cpu', amp=False, rank=0, world_size=1, pad_batches=False, desc=None,
                   crop=None, place=True):
    """One score per image: the mean of the model's scores over `patch_num` crops.

    crop: 'fixed', 'center' or 'random' (eval_patch_batches; None = 'random' if
    random_crop else 'fixed'). With several processes each rank scores every world_size-th
    image and the predictions are gathered, so metrics equal the single-process ones. Crops
    depend on the image's index (and on `seed` with random crops), never on the batch or the
    process it lands in. place=False leaves the images where a memory plan put them
    (eval_patch_batches).
    """
    n = images_u8.shape[0]
    if n < world_size:
        raise ValueError(too_small_message({desc or 'the split': n}, world_size))
    ids = np.arange(rank, n, world_size)
    preds = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    was_training = model.training
    model.eval()
    crop = crop or ('random' if random_crop else 'fixed')
    total = math.ceil(len(ids) * eval_crops_per_image(crop, patch_num) / batch_size)
    bar = tqdm(total=total, desc=desc or 'eval', unit='batch', leave=False, file=sys.__stderr__,
               disable=rank != 0 or desc is None, mininterval=1.0)
    # Scores and image indices stay on the device until the split ends and come back in one
    # transfer: a read-back per batch would make the host wait for each batch before queueing
    # the next. The sums are then taken on the host in float64, in batch order, as before.
    outs, indices = [], []
    # autocast on the device's own type, so bf16 evaluation runs (and is tested) on a CPU too
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        for patches, index in eval_patch_batches(
                images_u8, patch_size=patch_size, patch_num=patch_num, batch_size=batch_size,
                crop=crop, seed=seed, device=device, image_ids=ids, place=place):
            real = patches.shape[0]
            if pad_batches and real < batch_size:  # torch.compile: keep one static shape
                patches = torch.cat([patches, patches[:1].expand(batch_size - real, -1, -1, -1)])
            outs.append(model(patches)[:real].float().double())
            indices.append(index.to(outs[-1].device).double())   # exact: image indices < 2 ** 53
            bar.update(1)
    bar.close()
    model.train(was_training)
    if outs:
        index, out = torch.stack([torch.cat(indices), torch.cat(outs)]).cpu()
        preds.index_add_(0, index.long(), out)
        counts.index_add_(0, index.long(), torch.ones_like(out))
    local = np.stack([ids, (preds[ids] / counts[ids]).numpy()], axis=1)
    gathered = gather_to_all(local, world_size)
    result = np.empty(n)
    result[gathered[:, 0].astype(int)] = gathered[:, 1]
    return result
