"""GPU check of the data package (python3 benchmarks/gpu_data_check.py on a CUDA machine): the one
placement policy decides where images live, and patches and scores are equal wherever they live."""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data_loader as dl  # noqa: E402
from iqa import evaluation  # noqa: E402

if not torch.cuda.is_available():
    sys.exit('no CUDA GPU here: this check needs one')
dev = dl.canonical_device('cuda')
assert dev == torch.device('cuda', torch.cuda.current_device())
g = torch.Generator().manual_seed(0)
imgs = torch.randint(0, 256, (64, 3, 384, 512), dtype=torch.uint8, generator=g)
assert dl.place_images(imgs, 'cuda').device == dev                       # fits: moved
assert dl.place_images(imgs, 'cuda', images_on='cpu') is imgs            # --images_on cpu: stays
free, _ = torch.cuda.mem_get_info(dev)
assert dl.place_images(imgs, 'cuda', step_bytes=free) is imgs            # does not fit: stays, unpinned
assert not imgs.is_pinned()
for crop in ('fixed', 'center', 'random'):
    host = list(dl.eval_patch_batches(imgs, patch_size=224, patch_num=5, batch_size=32, crop=crop, seed=1,
                                      device='cuda', place=False))
    gpu = list(dl.eval_patch_batches(imgs, patch_size=224, patch_num=5, batch_size=32, crop=crop, seed=1,
                                     device='cuda'))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(host, gpu)), crop
    cpu = list(dl.eval_patch_batches(imgs, patch_size=224, patch_num=5, batch_size=32, crop=crop, seed=1))
    assert max((a[0].cpu() - c[0]).abs().max().item() for a, c in zip(host, cpu)) < 1e-5, crop
mos = np.arange(64.0)
sa = dl.TrainPatchSampler(imgs, mos, patch_size=224, patch_num=3, batch_size=32, seed=2, device='cuda')
sb = dl.TrainPatchSampler(imgs, mos, patch_size=224, patch_num=3, batch_size=32, seed=2, device='cuda', place=False)
assert sa.images.device == dev and sb.images.device.type == 'cpu'
for x, y in zip(sa.batches(0), sb.batches(0)):
    assert all(torch.equal(p, q) for p, q in zip(x, y))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(8, 1), torch.nn.Flatten(0)).to(dev)
a = evaluation.predict_scores(model, imgs, patch_num=4, batch_size=16, device=dev)               # placed by the plan
b = evaluation.predict_scores(model, imgs, patch_num=4, batch_size=16, device=dev, place=False)  # cut from host
assert np.array_equal(a, b), np.abs(a - b).max()
print('GPU placement checks passed on', torch.cuda.get_device_name(dev))
