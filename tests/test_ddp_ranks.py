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


RNG_SCRIPT = '''
import os, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
from iqa import ckpt, runtime
dist.init_process_group('gloo')
rank = dist.get_rank()
runtime.seed_everything(3)
model = torch.nn.Linear(4, 4)
runtime.seed_rank(3, rank)
weights = [None, None]
dist.all_gather_object(weights, model.weight.detach().clone())
assert torch.equal(weights[0], weights[1]), 'the model differs between ranks'
masks = [None, None]
dist.all_gather_object(masks, torch.nn.functional.dropout(torch.ones(64), 0.5))
assert not torch.equal(masks[0], masks[1]), 'both ranks drew the same dropout mask'
if rank == 0:   # one process draws what it always drew: the stream of seed 3
    runtime.seed_everything(3)
    torch.nn.Linear(4, 4)
    assert torch.equal(masks[0], torch.nn.functional.dropout(torch.ones(64), 0.5))
states = ckpt.gather_rng_states(2)
assert isinstance(states, list) and len(states) == 2
ahead = torch.rand(3)
torch.rand(100)                               # the stream moves on
ckpt.restore_rng_state(states, rank)          # as --resume does, each rank its own
again = torch.rand(3)
draws = [None, None]
dist.all_gather_object(draws, again)
assert torch.equal(again, ahead) and not torch.equal(draws[0], draws[1])
ckpt.restore_rng_state(states[0], rank)       # an older last.pkl: one state, for every rank
print('RNG OK', rank, flush=True)
dist.destroy_process_group()
'''


def test_ranks_draw_their_own_dropout_and_resume_restores_each_ranks_state(tmp_path):
    script = tmp_path / 'rng.py'
    script.write_text(RNG_SCRIPT.format(root=ROOT))
    results = run_two_ranks(script, [], tmp_path, timeout=120)
    for rank, (code, out) in enumerate(results):
        assert code == 0 and f'RNG OK {rank}' in out, out[-3000:]


def test_trainers_seed_ranks_after_the_model_and_save_every_ranks_rng():
    for script in ('train_swin.py', 'train_clip.py'):
        text = open(os.path.join(ROOT, script)).read()
        assert text.index('runtime.seed_rank(') > text.index('model = model.to(device)' if 'clip' in script
                                                            else 'models_swin.build_model(args.model_size')
        assert 'ckpt.gather_rng_states(' in text and 'rng_state=rng_state' in text
