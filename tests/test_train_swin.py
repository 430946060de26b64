"""train_swin.py as a user meets it: flags, losses, schedule, selection, files, resume, DDP."""
import csv
import glob
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from iqa import ckpt
from iqa.ckpt import atomic_torch_save, load_checkpoint
import data_loader
import train_swin
from dataset_fixtures import make_agiqa, make_koniq
from iqa import evaluation
from iqa import metrics as iqa_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def koniq_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('koniq-10k')
    make_koniq(root, sets=('training',) * 8 + ('validation',) * 3 + ('test',) * 4, hw=(64, 64))
    return root


def tiny_args(koniq_root, tmp_path, *extra, epochs=3):
    return ['--dataset', 'koniq-10k', '--data_root', str(koniq_root), '--model_size', 'nano', '--no_pretrained',
            '--resize', '224', '224', '--batch_size', '4', '--train_patch_num', '1', '--test_patch_num', '2',
            '--eval_batch_size', '8', '--epochs', str(epochs), '--cache_dir', 'none', '--num_workers', '1',
            '--output_dir', str(tmp_path / 'checkpoints'), '--log_dir', str(tmp_path / 'logs'), '--no_spaq',
            '--seed', '3', *extra]


def force_offline_hub(monkeypatch, tmp_path):
    """No network and an empty hub cache: the state of an offline cluster node."""
    import huggingface_hub.constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'no-hub-cache'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'no-hub-cache'))


def only_run_dir(tmp_path):
    runs = sorted(glob.glob(str(tmp_path / 'checkpoints' / '*')))
    assert len(runs) == 1, runs
    return runs[0]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.csv'), newline='') as f:
        return list(csv.DictReader(f))


def without_timing(rows):
    """metrics.csv rows minus the wall-clock columns, which differ between identical runs."""
    return [{k: v for k, v in r.items() if k not in ('epoch_seconds', 'train_patches_per_s')} for r in rows]


def scripted_evaluation(monkeypatch, val_srccs, test_srccs):
    """Replace evaluation with scripted SRCCs per epoch (val first, then test, each epoch)."""
    calls = {'val': iter(val_srccs), 'test': iter(test_srccs)}

    def fake(model, images, mos, direction, args, device, amp, rank, world, seed, desc):
        split = desc.split()[0]
        s = next(calls[split])
        return {'srcc': s, 'plcc': s + 0.01, 'krcc': s - 0.1}, None
    monkeypatch.setattr(train_swin, 'evaluate_split', fake)


# --------------------------------------------------------------------------- flags

def test_misspelt_flag_stops_at_once_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_swin.main(['--dataset', 'koniq-10k', '--no_multi_scale'])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'unknown flag --no_multi_scale -- did you mean --no_multiscale?' in err
    assert 'Nothing was run' in err


SEEDS = os.path.join(ROOT, '..', 'shared', 'seeds')


@pytest.mark.skipif(not os.path.isdir(SEEDS),
                    reason=f"the user's notes are not here ({os.path.normpath(SEEDS)} does not exist: it is part "
                           "of the project's workspace, not of a clone); their commands are parsed there")
def test_every_seed_command_parses():
    seeds = glob.glob(os.path.join(SEEDS, '00[01]_*.md'))
    assert len(seeds) == 2
    parser = train_swin.build_parser()
    n = 0
    for path in seeds:
        text = open(path, encoding='utf-8').read()
        for block in re.findall(r'python train_swin\.py(.*?)(?:2>&1|```)', text, flags=re.S):
            argv = block.replace('\\\n', ' ').split()
            args = parser.parse_args(argv)
            assert args.dataset == 'koniq-10k'
            n += 1
    assert n == 20  # 18 commands in the v2 list, 2 manual ones in the lr=5e-7 plan


def test_help_shows_every_group_and_defaults():
    text = train_swin.build_parser().format_help()
    for group in ('Dataset', 'Model', 'Training', 'Optimizer and learning-rate schedule', 'Loss',
                  'Evaluation, selection and early stopping', 'Output and resume', 'Misc'):
        assert group in text
    assert '--ranking_loss_alpha A' in text and '(default: 0.0)' in text


def test_attention_with_no_multiscale_runs_single_scale_with_a_warning():
    args = train_swin.build_parser().parse_args(['--attention_fusion', '--no_multiscale'])
    warnings = []
    args = train_swin.check_args(args, warnings.append)
    assert args.attention_fusion is False
    assert 'attention fusion is OFF' in warnings[0]


def test_contradictory_flags_are_explained_before_any_work():
    parser = train_swin.build_parser()
    with pytest.raises(SystemExit, match='--patch_size 224 is larger than the resized image 200x300'):
        train_swin.check_args(parser.parse_args(['--resize', '200', '300']), print)
    with pytest.raises(SystemExit, match='--batch_size must be >= 2'):
        train_swin.check_args(parser.parse_args(['--loss_type', 'srcc', '--batch_size', '1']), print)
    args = train_swin.check_args(parser.parse_args(['--no_lr_scheduler']), print)
    assert args.lr_scheduler == 'none'


# --------------------------------------------------------------------------- losses

PRED = torch.tensor([1.0, 2.0, 4.0])
MOS = torch.tensor([1.0, 3.0, 2.0])


def test_l1_and_l2_losses():
    assert train_swin.quality_loss(PRED, MOS, 'l1').item() == pytest.approx(1.0)
    assert train_swin.quality_loss(PRED, MOS, 'l2').item() == pytest.approx(5 / 3)


def test_hinge_is_the_margin_ranking_loss_by_hand():
    # Only the pair (2.0 vs 4.0) is ordered against its MOS (3 > 2): hinge 0.1 + 2 = 2.1,
    # counted once for (i, j) and once for (j, i), over the 6 ordered pairs.
    assert train_swin.margin_ranking_loss(PRED, MOS, 0.1).item() == pytest.approx(4.2 / 6)
    assert train_swin.quality_loss(PRED, MOS, 'hinge', 0.1).item() == pytest.approx(0.7)
    assert train_swin.margin_ranking_loss(PRED, torch.ones(3)).item() == 0.0


def random_batch(seed, n=16, ties=True):
    """Random float64 predictions and MOS; some MOS repeated (ties) and some predictions equal."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, generator=g, dtype=torch.float64)
    mos = torch.rand(n, generator=g, dtype=torch.float64) * 4 + 1
    if ties:
        mos[1], mos[5] = mos[0], mos[2]   # tied MOS: pairs that every pairwise loss leaves out
        pred[3] = pred[4]                  # tied prediction: e = 1 where p_i = p_j
    return pred, mos


def users_pairs(pred, mos):
    """(dp, dy) of every ordered pair i != j with |y_i - y_j| > 1e-6, in plain Python."""
    p, y = pred.tolist(), mos.tolist()
    return [(p[i] - p[j], y[i] - y[j]) for i in range(len(p)) for j in range(len(p))
            if i != j and abs(y[i] - y[j]) > 1e-6]


def test_rank_is_the_users_formula_on_random_inputs():
    for seed in range(5):
        pred, mos = random_batch(seed)
        terms = [max(0.0, abs(dp) - (1.0 if dp >= 0 else -1.0) * dy) for dp, dy in users_pairs(pred, mos)]
        expected = sum(terms) / len(terms)
        assert train_swin.quality_loss(pred, mos, 'rank').item() == pytest.approx(expected, abs=1e-6)


def test_rank_by_hand_and_in_mos_units():
    # pairs (a pair and its mirror give the same term), pred 1,2,4 with MOS 1,3,2:
    # (0,1) dp=-1 dy=-2: 1 - (-1)(-2) = -1 -> 0 (right order, gap within the MOS gap);
    # (0,2) dp=-3 dy=-1: 3 - 1 = 2 (right order, but 2 further apart than the MOS);
    # (1,2) dp=-2 dy=+1: 2 + 1 = 3 (wrong order). Mean over the 3 pairs = 5/3.
    assert train_swin.quality_loss(PRED, MOS, 'rank').item() == pytest.approx(5 / 3)
    # equal predictions: e = 1, so the term is max(0, -dy): 0 one way, |dy| the other
    assert train_swin.rank_loss(torch.zeros(2), torch.tensor([1.0, 3.0])).item() == pytest.approx(1.0)
    assert train_swin.rank_loss(PRED, torch.ones(3)).item() == 0.0


def test_pairwise_is_the_users_fidelity_formula_on_random_inputs():
    sig = lambda x: 1 / (1 + math.exp(-x))
    for seed in range(5):
        pred, mos = random_batch(seed)
        terms = []
        for dp, dy in users_pairs(pred, mos):
            p_gt, p_pred = sig(dy), sig(1.702 * dp / (math.sqrt(2) * 0.1))
            terms.append(1 - math.sqrt(p_gt * p_pred + 1e-8) - math.sqrt((1 - p_gt) * (1 - p_pred) + 1e-8))
        expected = sum(terms) / len(terms)
        assert train_swin.quality_loss(pred, mos, 'pairwise').item() == pytest.approx(expected, abs=1e-6)
    assert train_swin.quality_loss(PRED, torch.ones(3), 'pairwise').item() == 0.0


def test_srcc_loss_is_one_minus_batch_correlation():
    expected = 1 - 1 / (math.sqrt(42) / 3 * math.sqrt(2))
    assert train_swin.quality_loss(PRED, MOS, 'srcc').item() == pytest.approx(expected, rel=1e-5)
    # the user's formula: 1 - sum (v - v_mean)(p - p_mean) / sqrt(sum (v - v_mean)^2 sum (p - p_mean)^2)
    for seed in range(5):
        pred, mos = random_batch(seed)
        p, v = np.array(pred.tolist()), np.array(mos.tolist())
        pc, vc = p - p.mean(), v - v.mean()
        expected = 1 - (pc * vc).sum() / math.sqrt((pc ** 2).sum() * (vc ** 2).sum())
        assert train_swin.quality_loss(pred, mos, 'srcc').item() == pytest.approx(expected, abs=1e-6)


def test_fidelity_is_the_thurstone_variant_by_hand():
    phi = statistics.NormalDist().cdf
    total = 0.0
    for i, j in ((0, 1), (0, 2), (1, 2)):
        prob = phi((PRED[i] - PRED[j]).item() / math.sqrt(2))
        target = 1.0 if MOS[i] > MOS[j] else 0.0
        total += 1 - math.sqrt(target * prob) - math.sqrt((1 - target) * (1 - prob))
    assert train_swin.quality_loss(PRED, MOS, 'fidelity').item() == pytest.approx(total / 3, abs=1e-4)


def test_ranking_alpha_adds_the_margin_loss():
    args = train_swin.build_parser().parse_args(['--ranking_loss_alpha', '0.3'])
    assert train_swin.total_loss(PRED, MOS, args).item() == pytest.approx(1.0 + 0.3 * 0.7)


def test_ranking_alpha_term_is_the_users_pairwise_ranking_loss_on_random_inputs():
    # The user's solver: relu(-(p_i - p_j) * sign(y_i - y_j) + margin), averaged over the ordered
    # pairs with sign(y_i - y_j) != 0, added to L1 with weight alpha.
    args = train_swin.build_parser().parse_args(['--ranking_loss_alpha', '0.5', '--ranking_loss_margin', '0.2'])
    for seed in range(5):
        pred, mos = random_batch(seed)
        p, y = pred.tolist(), mos.tolist()
        sign = lambda x: (x > 0) - (x < 0)
        terms = [max(0.0, -(p[i] - p[j]) * sign(y[i] - y[j]) + 0.2)
                 for i in range(len(p)) for j in range(len(p)) if sign(y[i] - y[j]) != 0]
        l1 = sum(abs(a - b) for a, b in zip(p, y)) / len(p)
        expected = l1 + 0.5 * sum(terms) / len(terms)
        assert train_swin.total_loss(pred, mos, args).item() == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- schedule

def schedule(*flags):
    args = train_swin.check_args(train_swin.build_parser().parse_args(list(flags)), print)
    return [train_swin.learning_rates(e, args) for e in range(args.epochs)]


def test_cosine_decays_each_group_to_its_own_floor_and_never_rises():
    lrs = schedule('--lr', '5e-7', '--epochs', '10')
    assert lrs[0] == pytest.approx((5e-7, 5e-6))
    assert lrs[5][0] == pytest.approx(5e-7 * (0.01 + 0.99 * 0.5))
    for (b0, h0), (b1, h1) in zip(lrs, lrs[1:]):
        assert b1 < b0 and h1 < h0  # the user's eta_min=1e-6 made lr=5e-7 *rise*
    assert all(h / b == pytest.approx(10) for b, h in lrs)
    assert lrs[-1][0] > 5e-7 * 0.01


def test_step_schedule_divides_the_head_by_ten_every_six_epochs():
    lrs = schedule('--lr_scheduler', 'step', '--lr', '1e-5', '--epochs', '13')
    assert [h for _, h in lrs] == pytest.approx([1e-4] * 6 + [1e-5] * 6 + [1e-6])
    assert all(b == pytest.approx(1e-5) for b, _ in lrs)


def test_warmup_then_cosine_and_constant_schedule():
    lrs = schedule('--warmup_epochs', '2', '--epochs', '6', '--lr', '1e-5')
    assert [b for b, _ in lrs[:3]] == pytest.approx([1e-5 / 3, 2e-5 / 3, 1e-5])
    flat = [lr for pair in schedule('--no_lr_scheduler', '--epochs', '3', '--lr', '2e-6') for lr in pair]
    assert flat == pytest.approx([2e-6, 2e-5] * 3)


# --------------------------------------------------------------------------- runs

def test_selection_early_stopping_naming_and_retention(koniq_root, tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, val_srccs=[0.5, 0.6, 0.6, 0.59, 0.9], test_srccs=[0.40, 0.55, 0.7, 0.71, 0.9])
    code = train_swin.main(tiny_args(koniq_root, tmp_path, '--patience', '2', '--epochs', '5',
                                     '--ranking_loss_alpha', '0.3', '--keep_checkpoints', '1'))
    assert code == 0
    run_dir = only_run_dir(tmp_path)
    assert re.fullmatch(r'koniq-10k-swin-ranking-alpha0\.3_\d{8}_\d{6}', os.path.basename(run_dir))
    rows = read_metrics(run_dir)
    assert [r['epoch'] for r in rows] == ['1', '2', '3', '4']  # stopped after 2 epochs without gain
    assert [r['is_best'] for r in rows] == ['1', '1', '0', '0']
    assert list(rows[0]) == train_swin.METRIC_COLUMNS
    # Only the newest best survives, named with the selected epoch's TEST numbers, plus last.pkl.
    files = sorted(os.listdir(run_dir))
    assert [f for f in files if f.endswith('.pkl')] == ['best_model_srcc_0.5500_plcc_0.5600.pkl', 'last.pkl']
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['status'] == 'stopped_early' and summary['best_epoch'] == 2 and summary['select_on'] == 'val'
    assert summary['best']['test_srcc'] == pytest.approx(0.55)
    ckpt = load_checkpoint(os.path.join(run_dir, 'best_model_srcc_0.5500_plcc_0.5600.pkl'))
    assert ckpt['epoch'] == 2 and ckpt['config']['model_size'] == 'nano'
    assert ckpt['config']['ranking_loss_alpha'] == 0.3
    log = open(tmp_path / 'logs' / (os.path.basename(run_dir) + '.log')).read()
    assert 'Best test SRCC 0.5500 PLCC 0.5600 (epoch 2, selected on val)' in log
    assert json.load(open(os.path.join(run_dir, 'config.json')))['run_name'] == os.path.basename(run_dir)


def test_select_on_test_reproduces_the_users_protocol(koniq_root, tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, val_srccs=[0.9, 0.1], test_srccs=[0.3, 0.6])
    assert train_swin.main(tiny_args(koniq_root, tmp_path, '--select_on', 'test', '--epochs', '2')) == 0
    summary = json.load(open(os.path.join(only_run_dir(tmp_path), 'summary.json')))
    assert summary['best_epoch'] == 2 and summary['select_on'] == 'test'


def test_a_set_without_official_split_selects_on_its_own_val_split_every_round(tmp_path, monkeypatch):
    # AGIQA-3K has no official split: each round carves val (by prompt) out of its training side.
    root = tmp_path / 'agiqa-3k'
    make_agiqa(root, prompts=10, per_prompt=2)
    scripted_evaluation(monkeypatch, val_srccs=[0.5, 0.4, 0.3, 0.6], test_srccs=[0.2, 0.9, 0.8, 0.1])
    args = tiny_args(root, tmp_path, '--train_test_num', '2', epochs=2)
    args[args.index('koniq-10k')] = 'agiqa-3k'
    assert train_swin.main(args) == 0
    run_dir = only_run_dir(tmp_path)
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['select_on'] == 'val'
    assert [r['test_srcc'] for r in summary['rounds']] == pytest.approx([0.2, 0.1])  # val's picks, not test's
    assert json.load(open(os.path.join(run_dir, 'config.json')))['val_ratio'] == 0.1
    log = open(tmp_path / 'logs' / (os.path.basename(run_dir) + '.log')).read()
    for round_idx, seed in ((1, 3), (2, 4)):
        assert (f'Round {round_idx}/2: agiqa-3k from {root}, split: random 80/20 by prompt (seed {seed}); '
                f'val 10% of the training side by prompt (seed {seed}); train 14, val 2, test 4 images') in log
    assert 'Best test SRCC 0.1500 PLCC 0.1600 (epoch 2, selected on val)' in log and 'TEST split' not in log

    # --val_ratio 0: the behaviour of earlier versions, labelled as such
    scripted_evaluation(monkeypatch, val_srccs=[], test_srccs=[0.2, 0.9])
    out = tmp_path / 'no-val'
    args = tiny_args(root, out, '--val_ratio', '0', epochs=2)
    args[args.index('koniq-10k')] = 'agiqa-3k'
    assert train_swin.main(args) == 0
    log = open(out / 'logs' / (os.path.basename(only_run_dir(out)) + '.log')).read()
    assert 'Best test SRCC 0.9000 PLCC 0.9100 (epoch 2, selected on test (no validation split: --val_ratio 0))' in log


def test_test_crop_flag_resolves_the_users_spelling():
    parser = train_swin.build_parser()
    resolve = lambda *flags: train_swin.check_args(parser.parse_args(list(flags)), print)
    assert resolve().test_crop == 'fixed' and resolve().test_random_crop is False
    args = resolve('--test_random_crop')
    assert args.test_crop == 'random' and args.test_random_crop is True
    args = resolve('--test_crop', 'center')
    assert args.test_crop == 'center' and args.test_random_crop is False
    with pytest.raises(SystemExit, match='--test_random_crop .* contradicts --test_crop center'):
        resolve('--test_random_crop', '--test_crop', 'center')


def test_center_crop_protocol_is_recorded_and_scores_the_torchvision_centre_crop(koniq_root, tmp_path):
    # 240x232 images: CenterCrop(224) starts at row 8, column 4
    assert train_swin.main(tiny_args(koniq_root, tmp_path, '--test_crop', 'center', '--epochs', '1',
                                     '--resize', '240', '232')) == 0
    run_dir = only_run_dir(tmp_path)
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['test_crop'] == 'center' and summary['test_patch_num'] == 2
    assert json.load(open(os.path.join(run_dir, 'config.json')))['test_crop'] == 'center'
    log = open(tmp_path / 'logs' / (os.path.basename(run_dir) + '.log')).read()
    assert 'Evaluation: centre crop (--test_crop center' in log
    # by hand: the saved model on the centre crop of each test image, one image at a time
    ckpt = load_checkpoint(summary['best_checkpoint'])
    assert ckpt['config']['test_crop'] == 'center' and ckpt['metrics']['test_crop'] == 'center'
    model = train_swin.models_swin.build_model('nano', pretrained=False)
    model.load_state_dict(ckpt['state_dict'])
    model.eval()
    dataset = data_loader.load_dataset('koniq-10k', str(koniq_root), seed=3)
    test = dataset.splits['test']
    images, _ = data_loader.load_images([dataset.paths[i] for i in test], resize_hw=(240, 232), cache_dir=None,
                                        num_workers=1, progress=False)
    mean = torch.tensor(data_loader.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data_loader.IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        pred = [model(((img[:, 8:232, 4:228].float() / 255 - mean) / std)[None]).item() for img in images]
    tool = evaluation.predict_scores(model, images, patch_size=224, patch_num=2, crop='center')
    assert np.allclose(tool, pred, atol=1e-6, rtol=0)
    assert summary['best']['test_srcc'] == pytest.approx(iqa_metrics.srcc(pred, dataset.mos[test]), abs=1e-6)


def test_full_disk_while_saving_keeps_previous_best_and_training_goes_on(koniq_root, tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, val_srccs=[0.5, 0.6, 0.7], test_srccs=[0.5, 0.6, 0.7])
    real_save = atomic_torch_save
    saves = []

    def disk_full_after_first_best(obj, path):
        if 'best_model' in os.path.basename(path):
            saves.append(path)
            if len(saves) > 1:
                raise OSError(28, 'No space left on device')
        return real_save(obj, path)
    monkeypatch.setattr(ckpt, 'atomic_torch_save', disk_full_after_first_best)
    assert train_swin.main(tiny_args(koniq_root, tmp_path)) == 0
    run_dir = only_run_dir(tmp_path)
    assert len(read_metrics(run_dir)) == 3  # every epoch ran
    first_best = os.path.join(run_dir, 'best_model_srcc_0.5000_plcc_0.5100.pkl')
    assert load_checkpoint(first_best)['epoch'] == 1  # intact and loadable
    assert not glob.glob(os.path.join(run_dir, '*.tmp*'))
    log = open(tmp_path / 'logs' / (os.path.basename(run_dir) + '.log')).read()
    assert 'No space left on device' in log


def test_nan_loss_stops_with_a_message_and_keeps_last_good_checkpoint(koniq_root, tmp_path, monkeypatch):
    real_loss = train_swin.total_loss
    calls = []

    def nan_in_second_epoch(pred, mos, args):
        calls.append(1)
        loss = real_loss(pred, mos, args)
        return loss * float('nan') if len(calls) > 2 else loss  # 2 steps per epoch
    monkeypatch.setattr(train_swin, 'total_loss', nan_in_second_epoch)
    assert train_swin.main(tiny_args(koniq_root, tmp_path)) == 3
    run_dir = only_run_dir(tmp_path)
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['status'] == 'diverged'
    assert load_checkpoint(os.path.join(run_dir, 'last.pkl'))['epoch'] == 1
    log = open(tmp_path / 'logs' / (os.path.basename(run_dir) + '.log')).read()
    assert 'STOPPED: loss is nan at epoch 2' in log


def test_resume_after_a_kill_ends_with_the_uninterrupted_metrics(koniq_root, tmp_path, monkeypatch):
    full = tmp_path / 'full'
    assert train_swin.main(tiny_args(koniq_root, full)) == 0
    expected = read_metrics(only_run_dir(full))

    killed = tmp_path / 'killed'
    real_epoch = train_swin.train_one_epoch

    def killed_in_epoch_three(model, optimizer, sampler, epoch, *rest):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(model, optimizer, sampler, epoch, *rest)
    monkeypatch.setattr(train_swin, 'train_one_epoch', killed_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        train_swin.main(tiny_args(koniq_root, killed))
    monkeypatch.setattr(train_swin, 'train_one_epoch', real_epoch)
    run_dir = only_run_dir(killed)
    assert len(read_metrics(run_dir)) == 2
    assert train_swin.main(['--resume', run_dir]) == 0
    resumed = read_metrics(run_dir)
    assert without_timing(resumed) == without_timing(expected)
    assert json.load(open(os.path.join(run_dir, 'summary.json')))['status'] == 'finished'


def test_resuming_a_run_from_before_validation_splits_keeps_its_training_images(tmp_path, monkeypatch):
    # Its config has no val_ratio: the resumed epochs must train on the same images (no val cut).
    root = tmp_path / 'agiqa-3k'
    make_agiqa(root, prompts=10, per_prompt=2)
    real_epoch = train_swin.train_one_epoch

    def killed_in_epoch_two(model, optimizer, sampler, epoch, *rest):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(model, optimizer, sampler, epoch, *rest)
    monkeypatch.setattr(train_swin, 'train_one_epoch', killed_in_epoch_two)
    args = tiny_args(root, tmp_path, '--val_ratio', '0', epochs=2)
    args[args.index('koniq-10k')] = 'agiqa-3k'
    with pytest.raises(KeyboardInterrupt):
        train_swin.main(args)
    monkeypatch.setattr(train_swin, 'train_one_epoch', real_epoch)
    run_dir = only_run_dir(tmp_path)
    last = os.path.join(run_dir, 'last.pkl')
    old = torch.load(last, weights_only=False)
    del old['config']['val_ratio']
    torch.save(old, last)
    assert train_swin.main(['--resume', run_dir]) == 0
    log = open(tmp_path / 'logs' / (os.path.basename(run_dir) + '.log')).read()
    resumed = log[log.index('(resumed'):]
    assert 'train 16, val 0, test 4 images' in resumed
    assert 'selected on test (no validation split: --val_ratio 0)' in resumed


@pytest.mark.parametrize('kill_at', [(2, 1), (1, 2)], ids=['in-round-2', 'between-rounds'])
def test_resume_of_a_multi_round_run_ends_with_the_uninterrupted_metrics(koniq_root, tmp_path, monkeypatch,
                                                                         kill_at):
    """--train_test_num 2 keeps each round's checkpoints in round<k>/; a kill in the second
    round (or just before it starts) resumes there, and the median covers both rounds."""
    extra = ('--train_test_num', '2')
    full = tmp_path / 'full'
    assert train_swin.main(tiny_args(koniq_root, full, *extra, epochs=2)) == 0
    expected = read_metrics(only_run_dir(full))
    expected_summary = json.load(open(os.path.join(only_run_dir(full), 'summary.json')))

    killed = tmp_path / 'killed'
    real_epoch, calls = train_swin.train_one_epoch, []

    def killed_later(model, optimizer, sampler, epoch, *rest):
        calls.append(epoch)
        if len(calls) == (kill_at[0] - 1) * 2 + kill_at[1] + 1:   # the epoch after kill_at
            raise KeyboardInterrupt
        return real_epoch(model, optimizer, sampler, epoch, *rest)
    monkeypatch.setattr(train_swin, 'train_one_epoch', killed_later)
    with pytest.raises(KeyboardInterrupt):
        train_swin.main(tiny_args(koniq_root, killed, *extra, epochs=2))
    monkeypatch.setattr(train_swin, 'train_one_epoch', real_epoch)
    run_dir = only_run_dir(killed)
    done = [(int(r['round']), int(r['epoch'])) for r in read_metrics(run_dir)]
    assert done[-1] == kill_at
    assert train_swin.main(['--resume', run_dir]) == 0
    assert without_timing(read_metrics(run_dir)) == without_timing(expected)
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert summary['status'] == 'finished'
    assert [r['test_srcc'] for r in summary['rounds']] == [r['test_srcc'] for r in expected_summary['rounds']]
    assert summary['median_test_srcc'] == expected_summary['median_test_srcc']
    for k in (1, 2):
        assert any(f.startswith('best_model_srcc_') for f in os.listdir(os.path.join(run_dir, f'round{k}')))


def test_resume_refuses_a_weights_only_checkpoint(tmp_path):
    path = tmp_path / 'best_model_srcc_0.9000_plcc_0.9000.pkl'
    torch.save({'fc5b_fc.bias': torch.zeros(1)}, path)
    with pytest.raises(SystemExit, match='no training state'):
        train_swin.main(['--resume', str(path)])


def test_offline_weights_error_names_the_way_out(koniq_root, tmp_path, monkeypatch, capsys):
    force_offline_hub(monkeypatch, tmp_path)
    argv = [a for a in tiny_args(koniq_root, tmp_path) if a != '--no_pretrained']
    argv[argv.index('nano')] = 'tiny'
    with pytest.raises(SystemExit) as exit_info:
        train_swin.main(argv)
    assert exit_info.value.code == 2
    out = capsys.readouterr().out
    assert '--pretrained_path' in out and '--no_pretrained' in out


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu_matches_single_process_evaluation(koniq_root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', '2',
           '--master_addr', '127.0.0.1', '--master_port', str(free_port()),
           os.path.join(ROOT, 'train_swin.py'), *tiny_args(koniq_root, tmp_path, epochs=2), '--device', 'cpu',
           '--cache_dir', str(tmp_path / 'cache')]  # rank 0 builds the cache, rank 1 reads it
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list((tmp_path / 'cache').glob('*.npy'))) == 1
    run_dir = only_run_dir(tmp_path)  # one folder: only rank 0 writes
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    assert config['world_size'] == 2
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    best = load_checkpoint(summary['best_checkpoint'])

    # Re-evaluate the saved weights in this single process, on the same test images.
    from models_swin import build_model
    model = build_model('nano', pretrained=False)
    model.load_state_dict(best['state_dict'])
    dataset = data_loader.load_dataset('koniq-10k', str(koniq_root), seed=3)
    images, kept = data_loader.load_images(dataset.paths, resize_hw=(224, 224), cache_dir=None, num_workers=1)
    test = dataset.splits['test']
    pred = evaluation.predict_scores(model, images[test], patch_size=224, patch_num=2, batch_size=8, seed=3)
    from iqa.metrics import srcc, plcc
    assert summary['best']['test_srcc'] == pytest.approx(srcc(pred, dataset.mos[test]), abs=1e-6)
    assert summary['best']['test_plcc'] == pytest.approx(plcc(pred, dataset.mos[test]), abs=1e-4)
    # Both ranks trained on disjoint images: every training image was seen once per epoch.
    rows = read_metrics(run_dir)
    assert len(rows) == 2


def write_blur_dataset(folder, n=40):
    """Stripes, checkerboard-free and high-contrast, blurred at 4 levels; score falls with blur.

    Blur changes the local pattern a patch embedding sees (not just its scale, which LayerNorm
    would hide), so a randomly initialised nano model can learn it in a few dozen steps.
    """
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(0)
    rows = []
    (folder / 'img').mkdir(parents=True)
    yy, xx = np.mgrid[0:128, 0:128]
    for i in range(n):
        f, a = rng.uniform(0.15, 0.5), rng.uniform(0, np.pi)
        base = 127 + 100 * np.sign(np.sin(f * (xx * np.cos(a) + yy * np.sin(a))))
        level = i % 4
        im = Image.fromarray(np.stack([base] * 3, -1).astype(np.uint8))
        im.filter(ImageFilter.GaussianBlur(radius=[0, 1.5, 3, 6][level])).save(folder / 'img' / f'{i:03d}.png')
        split = 'train' if i < 28 else ('val' if i < 32 else 'test')
        rows.append([f'img/{i:03d}.png', 80 - 20 * level, split])
    with open(folder / 'scores.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['image', 'score', 'split'])
        writer.writerows(rows)
    return folder / 'scores.csv'


def test_short_end_to_end_run_learns(tmp_path):
    """A real run (data, model, loop, evaluation, files) whose test SRCC improves."""
    csv_path = write_blur_dataset(tmp_path / 'blur')
    argv = ['--dataset', str(csv_path), '--model_size', 'nano', '--no_pretrained', '--resize', '224', '224',
            '--batch_size', '8', '--train_patch_num', '2', '--test_patch_num', '1', '--epochs', '4', '--lr', '3e-4',
            '--dropout_rate', '0', '--drop_path_rate', '0', '--no_color_jitter', '--cache_dir', 'none',
            '--output_dir', str(tmp_path / 'checkpoints'), '--log_dir', str(tmp_path / 'logs'), '--no_spaq',
            '--seed', '42']
    assert train_swin.main(argv) == 0
    run_dir = only_run_dir(tmp_path)
    assert os.path.basename(run_dir).startswith('scores-swin_')
    rows = read_metrics(run_dir)
    test_srcc = [float(r['test_srcc']) for r in rows]
    assert test_srcc[-1] > test_srcc[0] + 0.3
    assert max(test_srcc) > 0.5
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])


def test_spaq_cross_test_each_epoch_when_spaq_test_exists(koniq_root, tmp_path, monkeypatch):
    from dataset_fixtures import make_json_list
    spaq = tmp_path / 'spaq-test'
    make_json_list(spaq, 'spaq_test.json', n=5)
    monkeypatch.setitem(data_loader.DEFAULT_ROOTS, 'spaq', spaq)
    argv = [a for a in tiny_args(koniq_root, tmp_path, epochs=2) if a != '--no_spaq']
    assert train_swin.main(argv) == 0
    rows = read_metrics(only_run_dir(tmp_path))
    assert all(-1 <= float(r['spaq_srcc']) <= 1 for r in rows)


def test_broken_spaq_folder_is_reported_and_skipped(tmp_path, monkeypatch):
    spaq = tmp_path / 'spaq-test'
    spaq.mkdir()
    (spaq / 'spaq_test.json').write_text('[{"image": "missing.png", "score": "not a number"}]')
    monkeypatch.setitem(data_loader.DEFAULT_ROOTS, 'spaq', spaq)
    args = train_swin.build_parser().parse_args(['--cache_dir', 'none'])
    messages = []
    assert train_swin.load_cross_test('spaq', args, messages.append) is None
    assert 'SPAQ cross-test skipped' in messages[0] and 'spaq_test.json' in messages[0]


def test_several_rounds_report_the_median_and_keep_each_rounds_checkpoints(koniq_root, tmp_path, monkeypatch):
    scripted_evaluation(monkeypatch, val_srccs=[0.5, 0.6, 0.7, 0.4], test_srccs=[0.3, 0.5, 0.8, 0.2])
    assert train_swin.main(tiny_args(koniq_root, tmp_path, '--train_test_num', '2', epochs=2)) == 0
    run_dir = only_run_dir(tmp_path)
    assert [(r['round'], r['epoch']) for r in read_metrics(run_dir)] == [('1', '1'), ('1', '2'), ('2', '1'), ('2', '2')]
    assert os.listdir(os.path.join(run_dir, 'round1')).count('best_model_srcc_0.5000_plcc_0.5100.pkl') == 1
    assert 'best_model_srcc_0.8000_plcc_0.8100.pkl' in os.listdir(os.path.join(run_dir, 'round2'))
    summary = json.load(open(os.path.join(run_dir, 'summary.json')))
    assert [r['test_srcc'] for r in summary['rounds']] == pytest.approx([0.5, 0.8])
    assert summary['median_test_srcc'] == pytest.approx(0.65)
    log = open(tmp_path / 'logs' / (os.path.basename(run_dir) + '.log')).read()
    assert 'Testing median SRCC 0.6500, median PLCC 0.6600 over 2 rounds' in log


def test_a_run_that_fails_its_data_check_leaves_no_folder_and_no_log(tmp_path, capsys):
    args = tiny_args(tmp_path / 'no-such-koniq', tmp_path)
    with pytest.raises(SystemExit) as stop:
        train_swin.main(args)
    assert stop.value.code == 2
    assert 'DATA ERROR' in capsys.readouterr().out
    for folder in ('checkpoints', 'logs'):
        assert not (tmp_path / folder).exists() or not list((tmp_path / folder).iterdir())


def test_cross_test_is_a_list_with_two_columns_per_set(koniq_root, tmp_path, monkeypatch):
    from dataset_fixtures import make_json_list
    spaq = tmp_path / 'spaq-test'
    make_json_list(spaq, 'spaq_test.json', n=5)
    monkeypatch.setitem(data_loader.DEFAULT_ROOTS, 'spaq', spaq)
    monkeypatch.setitem(data_loader.DEFAULT_ROOTS, 'kadid-10k', tmp_path / 'no-kadid')   # not there: empty cells
    argv = [a for a in tiny_args(koniq_root, tmp_path, epochs=1) if a != '--no_spaq']
    assert train_swin.main(argv + ['--cross_test', 'kadid-10k', 'spaq']) == 0
    rows = read_metrics(only_run_dir(tmp_path))
    columns = list(rows[0])
    assert columns[columns.index('test_krcc') + 1:columns.index('epoch_seconds')] == [
        'kadid-10k_srcc', 'kadid-10k_plcc', 'spaq_srcc', 'spaq_plcc']
    assert rows[0]['kadid-10k_srcc'] == '' and -1 <= float(rows[0]['spaq_srcc']) <= 1
    with pytest.raises(SystemExit, match='--cross_test nope: not a data set name'):
        train_swin.check_args(train_swin.build_parser().parse_args(['--cross_test', 'nope']), print)
