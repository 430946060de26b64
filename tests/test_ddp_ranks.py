"""Two gloo ranks: evaluation that cannot hang, per-rank RNG streams (issue 20)."""
import csv
import os

import pytest

from test_gpu_paths import run_two_ranks
from test_train_swin import only_run_dir, read_metrics, write_blur_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blur_dataset(folder, train, val, test):
    """write_blur_dataset's images with `train`, `val` and `test` images in its splits."""
    path = write_blur_dataset(folder, n=train + val + test)
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    splits = ['train'] * train + ['val'] * val + ['test'] * test
    for row, split in zip(rows[1:], splits):
        row[2] = split
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows(rows)
    return path


def swin_argv(csv_path, tmp_path, *extra):
    return [os.path.join(ROOT, 'train_swin.py'), '--dataset', str(csv_path), '--model_size', 'nano',
            '--no_pretrained', '--resize', '224', '224', '--batch_size', '4', '--train_patch_num', '1',
            '--test_patch_num', '2', '--eval_batch_size', '2', '--epochs', '1', '--cache_dir', 'none',
            '--num_workers', '1', '--output_dir', str(tmp_path / 'checkpoints'), '--log_dir', str(tmp_path / 'logs'),
            '--no_spaq', '--device', 'cpu', '--seed', '3', *extra]


def run_ranks(argv, tmp_path, timeout=150):
    script = tmp_path / 'main.py'
    script.write_text(f'import runpy, sys\nsys.path.insert(0, {ROOT!r})\nsys.argv = {argv!r}\n'
                      f'runpy.run_path({argv[0]!r}, run_name="__main__")\n')
    return run_two_ranks(script, [], tmp_path, timeout=timeout)


def test_ranks_with_unequal_evaluation_batches_do_not_hang(tmp_path):
    # 3 val images at 2 crops and batch 2: rank 0 scores 2 images (2 batches), rank 1 one (1 batch).
    # Through the DDP wrapper rank 0's second batch waited in a buffer broadcast rank 1 never joined.
    csv_path = blur_dataset(tmp_path / 'blur', train=8, val=3, test=3)
    results = run_ranks(swin_argv(csv_path, tmp_path), tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert len(read_metrics(only_run_dir(tmp_path))) == 1


def test_a_split_smaller_than_the_world_is_refused_with_a_message(tmp_path):
    csv_path = blur_dataset(tmp_path / 'blur', train=8, val=1, test=3)
    results = run_ranks(swin_argv(csv_path, tmp_path), tmp_path)
    for code, out in results:
        assert code == 1, out[-3000:]
        assert 'val (1 image): fewer images than the 2 processes' in out and '--nproc_per_node' in out


def test_predict_scores_refuses_a_split_smaller_than_the_world():
    import torch
    from iqa import evaluation
    with pytest.raises(ValueError, match='fewer images than the 2 processes'):
        evaluation.predict_scores(torch.nn.Identity(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), patch_size=8,
                                  patch_num=1, rank=1, world_size=2)
