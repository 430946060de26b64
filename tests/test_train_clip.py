"""train_clip.py, iqa/clip/models.py, iqa/clip/data.py: the CLIP baseline on this toolkit's base.

Everything runs offline on the random-initialised 'nano' CLIP, on a few tiny images.
"""
import csv
import json
import math
import os
import shlex
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader
import train_clip
from data_loader import DataError
from iqa.clip import data as clip_data
from iqa.clip import evaluation as clip_eval
from iqa.clip import models as models_clip

# The card's "one-click configurations" A-F and its tuning commands, as the user types them.
CARD_COMMANDS = [
    '--freeze_clip --epochs 10 --batch_size 64 --lr 1e-3',
    '--partial_freeze --freeze_layers 18 --residual_scale_q 0.2 --residual_scale_c 0.2 --epochs 20 '
    '--batch_size 32 --lr 3e-5 --w_q 0.5 --w_c 0.5 --dropout 0.1 --max_grad_norm 1.0',
    '--freeze_clip --residual_scale_q 0.1 --residual_scale_c 0.1 --epochs 30 --batch_size 16 --lr 1e-3 '
    '--weight_decay 5e-4 --dropout 0.2',
    '--residual_scale_q 0.3 --residual_scale_c 0.3 --epochs 15 --batch_size 64 --lr 3e-5 --dropout 0.05',
    '--partial_freeze --freeze_layers 20 --residual_scale_q 0.15 --residual_scale_c 0.15 --dropout 0.2 '
    '--weight_decay 5e-4 --max_grad_norm 0.5',
    '--partial_freeze --freeze_layers 18 --residual_scale_q 0.25 --residual_scale_c 0.25 --epochs 50 '
    '--batch_size 16 --lr 2e-5 --w_q 0.4 --w_c 0.6 --warmup_ratio 0.1',
    '--weight_decay 1e-4 --warmup_ratio 0.05 --max_grad_norm 1.0 --dropout 0.1 --grad_accum_steps 1 --no_amp '
    '--seed 42 --num_workers 4 --pin_memory',
    '--no_pin_memory --w_exp 0.1 --no_residual_learning --use_two_branch --use_refinement --refinement_layers 4 '
    '--refinement_heads 8 --refinement_dim 256 --scheduler step --step_lr_step_size 1 --step_lr_gamma 0.1',
    '--data_csv_path d.csv --image_base_dir imgs --use_explanations --explanation_column why '
    '--resume_from outputs/baseline_best.pt --output_dir outputs --log_csv training_log.csv '
    '--early_stopping_patience 5 --early_stopping_min_delta 0.0005 --label_scale_q 5.0 --label_scale_c 5.0 '
    '--no_strict_residual',
]


def parse(line=''):
    return train_clip.build_parser().parse_args(shlex.split(line))


def test_every_card_flag_parses():
    for line in CARD_COMMANDS:
        parse(line)
    for kind in ('cosine', 'linear', 'constant', 'step'):
        assert parse(f'--scheduler {kind}').scheduler == kind


def test_card_defaults():
    a = parse()
    assert (a.epochs, a.batch_size, a.lr, a.weight_decay, a.warmup_ratio, a.max_grad_norm) == (20, 32, 3e-5, 1e-4, 0.05, 1.0)
    assert (a.dropout, a.grad_accum_steps, a.seed, a.w_q, a.w_c, a.w_exp) == (0.1, 1, 42, 0.5, 0.5, 0.1)
    assert (a.residual_scale_q, a.residual_scale_c, a.freeze_layers, a.refinement_layers) == (0.2, 0.2, 8, 4)
    assert (a.refinement_heads, a.refinement_dim, a.scheduler, a.step_lr_step_size, a.step_lr_gamma) == \
        (8, 256, 'cosine', 1, 0.1)
    assert (a.log_csv, a.label_scale_q, a.label_scale_c, a.early_stopping_patience) == ('training_log.csv', None, None, 0)
    assert a.head_lr_ratio == 1.0 and a.select_on == 'consistency'   # the original's selection
    assert not (a.no_residual_learning or a.freeze_clip or a.partial_freeze or a.use_explanations)


def test_misspelt_flag_stops_with_a_suggestion(capsys):
    with pytest.raises(SystemExit):
        parse('--freeze_layer 18')
    assert 'did you mean --freeze_layers' in capsys.readouterr().err


def test_zeros_mean_zero():
    a = train_clip.check_args(parse('--w_q 0 --freeze_layers 0 --max_grad_norm 0 --dropout 0 --w_exp 0 '
                                    '--residual_scale_q 0 --warmup_ratio 0'), print)
    assert (a.w_q, a.freeze_layers, a.max_grad_norm, a.dropout, a.w_exp, a.residual_scale_q, a.warmup_ratio) == (0,) * 7


def test_bad_flag_values_are_explained_before_any_work():
    for line, needle in [('--epochs 0', '--epochs must be at least 1'), ('--w_q -1', '--w_q must be >= 0'),
                         ('--w_q 0 --w_c 0', 'nothing would be learned'),
                         ('--pin_memory --no_pin_memory', 'contradict'),
                         ('--clip_model ViT-H/99', 'unknown CLIP model')]:
        with pytest.raises(SystemExit, match=needle):
            train_clip.check_args(parse(line), print)


def test_clip_model_name_from_the_environment_and_hugging_face_names(monkeypatch):
    monkeypatch.setenv('CLIP_MODEL_NAME', 'openai/clip-vit-base-patch32')
    assert train_clip.check_args(parse(), print).clip_model == 'ViT-B/32'
    monkeypatch.delenv('CLIP_MODEL_NAME')
    assert train_clip.check_args(parse(), print).clip_model == 'ViT-L/14'


def test_residual_mode_warns_that_direct_mode_flags_are_ignored():
    warnings = []
    train_clip.check_args(parse('--use_two_branch --use_refinement'), warnings.append)
    assert len(warnings) == 2 and all('--no_residual_learning' in w for w in warnings)


# --------------------------------------------------------------------------- model formulas

def _nano(**kw):
    torch.manual_seed(0)
    return models_clip.ClipQualityModel('nano', pretrained=False, **kw).eval()


def _embeddings(n=6, d=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def test_residual_mode_formulas():
    m = _nano(residual_scale_q=0.3, residual_scale_c=0.25)
    with torch.no_grad():
        m.c_base_scale.fill_(1.4)
        m.c_base_bias.fill_(-0.1)
    img, txt = _embeddings()
    out = m.heads(img, txt)
    cos = (img * txt).sum(-1, keepdim=True)
    q = torch.clamp(torch.sigmoid(m.q_base_head(img)) + 0.3 * torch.tanh(m.q_delta_head(img)), 0, 1)
    c_base = torch.clamp(1.4 * (cos + 1) / 2 - 0.1, 0, 1)
    c = torch.clamp(c_base + 0.25 * torch.tanh(m.c_delta_head(torch.cat([img, txt, cos], 1))), 0, 1)
    assert torch.allclose(out['q'], q.squeeze(1)) and torch.allclose(out['c'], c.squeeze(1))
    assert torch.allclose(out['c_coarse'], c_base.squeeze(1))
    # the MLPs are the card's: Linear(d,128)-GELU-Dropout-Linear(128,1); LN-Linear(2d+1,256)-GELU-Dropout-Linear(256,64)-GELU-Linear(64,1)
    assert [type(x).__name__ for x in m.q_delta_head] == ['Linear', 'GELU', 'Dropout', 'Linear']
    assert [x.out_features for x in m.c_delta_head if isinstance(x, torch.nn.Linear)] == [256, 64, 1]
    assert m.c_delta_head[1].in_features == 2 * 64 + 1


def test_a_zero_residual_scale_leaves_the_clip_base_score():
    m = _nano(residual_scale_c=0.0)
    img, txt = _embeddings()
    out = m.heads(img, txt)
    assert torch.allclose(out['c'], torch.clamp(((img * txt).sum(-1) + 1) / 2, 0, 1))


def test_smooth_bound_keeps_a_gradient_where_clamp_has_none():
    x = torch.tensor([-0.3, 0.5, 1.4], requires_grad=True)
    models_clip.smooth_bound(x).sum().backward()
    assert (x.grad > 0).all()
    assert torch.allclose(models_clip.smooth_bound(torch.tensor([0.05, 0.5, 0.95])), torch.tensor([0.05, 0.5, 0.95]))
    y = models_clip.smooth_bound(torch.linspace(-0.5, 1.5, 101))
    assert (y > 0).all() and (y < 1).all() and (y.diff() >= 0).all()


def test_direct_mode_two_branch_and_refinement_formulas():
    img, txt = _embeddings()
    cos = (img * txt).sum(-1, keepdim=True)
    fused = torch.cat([img, txt, cos], 1)
    plain = _nano(residual=False)
    out = plain.heads(img, txt)
    assert torch.allclose(out['q'], torch.sigmoid(plain.q_head(img)).squeeze(1))
    assert torch.allclose(out['c'], torch.sigmoid(plain.c_head(fused)).squeeze(1))
    assert out['residual'] is None and not hasattr(plain, 'c_scale')
    two = _nano(residual=False, use_two_branch=True)
    expected = 0.5 * (torch.sigmoid(two.c_head(fused)) + torch.sigmoid(5.0 * cos))
    assert torch.allclose(two.heads(img, txt)['c'], expected.squeeze(1))
    ref = _nano(residual=False, use_refinement=True, refinement_layers=2, refinement_heads=4, refinement_dim=32)
    out = ref.heads(img, txt)
    assert len(ref.refinement.transformer.layers) == 2 and ref.refinement.transformer.layers[0].self_attn.num_heads == 4
    assert torch.allclose(out['c'], torch.clamp(out['c_coarse'] + out['residual'], 0, 1))
    assert out['residual'].abs().max() <= 0.1 + 1e-6  # r * tanh, r = 0.1 at start


def test_two_stage_refinement_loss_supervises_coarse_and_residual_separately():
    out = {'c': torch.tensor([0.6, 0.4]), 'c_coarse': torch.tensor([0.5, 0.5]), 'residual': torch.tensor([0.1, -0.1])}
    target = torch.tensor([0.8, 0.2])
    two = train_clip.consistency_loss(out, target, parse('--no_residual_learning --use_refinement --refinement_loss two_stage'))
    loose = train_clip.consistency_loss(out, target, parse('--no_residual_learning --use_refinement --no_strict_residual'))
    assert loose.item() == pytest.approx(0.04)                                  # MSE(c, t)
    assert two.item() == pytest.approx(0.09 + 0.04)                             # MSE(coarse, t) + MSE(coarse+r, t)


def test_use_refinement_trains_the_originals_strict_residual_by_default():
    """The original's strict residual MSE(c - coarse.detach(), t - coarse.detach()) is MSE(c, t)
    in value and gradient: the flag's default must train exactly that."""
    torch.manual_seed(0)
    ref = _nano(residual=False, use_refinement=True, refinement_layers=1, refinement_heads=4, refinement_dim=32)
    img, txt = _embeddings()
    target = torch.rand(img.shape[0])
    args = parse('--no_residual_learning --use_refinement')
    assert args.refinement_loss == 'strict'

    def grads(loss_fn):
        ref.zero_grad()
        out = ref.heads(img, txt)
        loss = loss_fn(out)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in ref.head_parameters() if p.grad is not None]

    ours, g_ours = grads(lambda out: train_clip.consistency_loss(out, target, args))
    plain, g_plain = grads(lambda out: torch.nn.functional.mse_loss(out['c'], target))
    original, g_orig = grads(lambda out: torch.nn.functional.mse_loss(out['c'] - out['c_coarse'].detach(),
                                                                      target - out['c_coarse'].detach()))
    assert ours == pytest.approx(plain, rel=1e-6) and ours == pytest.approx(original, rel=1e-5)
    assert len(g_ours) == len(g_plain) > 0
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_ours, g_plain))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ours, g_orig))
    with pytest.raises(SystemExit, match='contradict'):
        train_clip.check_args(parse('--no_residual_learning --use_refinement --no_strict_residual '
                                    '--refinement_loss two_stage'), print)


def test_explanation_loss_is_mse_of_normalised_vectors():
    m = _nano()
    img, txt = _embeddings()
    target = torch.nn.functional.normalize(torch.randn(6, 64), dim=-1)
    cos = (img * txt).sum(-1, keepdim=True)
    pred = torch.nn.functional.normalize(m.rationale_head(torch.cat([img, txt, cos], 1)), dim=-1)
    assert m.explanation_loss(img, txt, target).item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- freezing

def _trainable(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def _numel(*modules):
    return sum(p.numel() for x in modules for p in (x.parameters() if isinstance(x, torch.nn.Module) else [x]))


def test_freeze_clip_leaves_only_the_heads():
    m = _nano()
    m.freeze(freeze_clip=True)
    assert _trainable(m) == sum(p.numel() for n, p in m.named_parameters() if not n.startswith('clip.'))


def _block_trainable(blocks):
    """Per block: 'frozen', 'trainable' (every parameter one way) or 'mixed'."""
    out = []
    for block in blocks:
        flags = {p.requires_grad for p in block.parameters()}
        out.append('mixed' if len(flags) > 1 else ('trainable' if flags == {True} else 'frozen'))
    return out


def test_partial_freeze_counts_embeddings_and_first_blocks():
    """As the original meant: embeddings (patch conv, class, position, token) and the first N
    blocks; ln_pre trains (it is no embedding); --freeze_ln_pre freezes it too (make demo-clip)."""
    m = _nano()
    total = _trainable(m)
    v, t = m.clip.visual, m.clip
    m.freeze(partial_freeze=True, freeze_layers=2)
    frozen = _numel(v.conv1, v.class_embedding, v.positional_embedding, t.token_embedding,
                    t.positional_embedding, *v.transformer.resblocks[:2], *t.transformer.resblocks[:2])
    assert _trainable(m) == total - frozen
    assert all(p.requires_grad for p in v.ln_pre.parameters())
    assert _block_trainable(v.transformer.resblocks) == ['frozen'] * 2 + ['trainable'] * 2
    assert _block_trainable(t.transformer.resblocks) == ['frozen'] * 2 + ['trainable']
    m0 = _nano()
    m0.freeze(partial_freeze=True, freeze_layers=0)   # zero means zero: only the embeddings
    assert _trainable(m0) == total - _numel(v.conv1, v.class_embedding, v.positional_embedding,
                                            t.token_embedding, t.positional_embedding)
    m1 = _nano()
    m1.freeze(partial_freeze=True, freeze_layers=0, freeze_ln_pre=True)   # make demo-clip's freezing
    assert _trainable(m1) == total - _numel(v.conv1, v.ln_pre, v.class_embedding, v.positional_embedding,
                                            t.token_embedding, t.positional_embedding)
    args = train_clip.check_args(parse('--partial_freeze --freeze_layers 0 --freeze_ln_pre'), print)
    assert args.freeze_ln_pre


def test_partial_freeze_at_or_above_a_towers_depth_freezes_all_its_blocks():
    m = _nano()   # 4 vision blocks, 3 text blocks
    notes = []
    m.freeze(partial_freeze=True, freeze_layers=3, warn=notes.append)
    assert len(notes) == 1 and 'text tower has 3 blocks; all of them are frozen' in notes[0]
    assert _block_trainable(m.clip.transformer.resblocks) == ['frozen'] * 3
    assert _block_trainable(m.clip.visual.transformer.resblocks) == ['frozen'] * 3 + ['trainable']
    m8 = _nano()
    m8.freeze(partial_freeze=True, freeze_layers=8, warn=notes.append)
    assert _block_trainable(m8.clip.visual.transformer.resblocks) == ['frozen'] * 4
    assert _block_trainable(m8.clip.transformer.resblocks) == ['frozen'] * 3
    assert all(p.requires_grad for p in m8.clip.visual.ln_post.parameters()) and m8.clip.visual.proj.requires_grad
    assert all(p.requires_grad for p in m8.clip.ln_final.parameters()) and m8.clip.text_projection.requires_grad


def test_partial_freeze_on_vit_l14_as_the_card_configures_it():
    """ViT-L/14 built on the meta device (no download, no memory): --freeze_layers 18 freezes 18 of
    24 vision blocks and all 12 text blocks (the clamp before left one text block trainable)."""
    import types
    import open_clip
    from open_clip.model import CLIP
    with torch.device('meta'):
        clip = CLIP(**open_clip.get_model_config('ViT-L-14'))
    holder = types.SimpleNamespace(clip=clip)
    models_clip.ClipQualityModel.freeze(holder, partial_freeze=True, freeze_layers=18, warn=lambda m: None)
    assert _block_trainable(clip.visual.transformer.resblocks) == ['frozen'] * 18 + ['trainable'] * 6
    assert _block_trainable(clip.transformer.resblocks) == ['frozen'] * 12
    v = clip.visual
    assert not any(p.requires_grad for p in (v.conv1.weight, v.class_embedding, v.positional_embedding,
                                             clip.token_embedding.weight, clip.positional_embedding))
    assert all(p.requires_grad for p in v.ln_pre.parameters())
    frozen = sum(p.numel() for p in clip.parameters() if not p.requires_grad)
    expected = _numel(v.conv1, v.class_embedding, v.positional_embedding, clip.token_embedding,
                      clip.positional_embedding, *v.transformer.resblocks[:18], *clip.transformer.resblocks)
    assert frozen == expected


# --------------------------------------------------------------------------- training crops

def test_training_cache_is_large_enough_to_downsample_crops(tmp_path):
    for side, (w, h) in {'big': (640, 480), 'mid': (300, 400), 'demo': (64, 64), 'small': (24, 20)}.items():
        Image.new('RGB', (w, h)).save(tmp_path / f'{side}.png')
    assert clip_data.train_cache_size(224, [tmp_path / 'big.png'] * 3) == 448     # 2 x the model size
    assert clip_data.train_cache_size(224, [tmp_path / 'mid.png']) == 300         # the short side
    assert clip_data.train_cache_size(64, [tmp_path / 'demo.png']) == 64          # demo: as before
    assert clip_data.train_cache_size(64, [tmp_path / 'small.png']) == 64
    assert clip_data.train_cache_size(224, [tmp_path / 'big.png'] * 2 + [tmp_path / 'small.png']) == 448  # median


def _crop_boxes(seed, b, scale=(0.8, 1.0)):
    """The relative boxes and flips clip_pixels draws from a generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    area = torch.empty(b).uniform_(*scale, generator=g)
    ratio = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
    cw, ch = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
    x0, y0 = torch.rand(b, generator=g) * (1 - cw), torch.rand(b, generator=g) * (1 - ch)
    return cw, ch, x0, y0, torch.rand(b, generator=g) < 0.5


def test_training_crops_from_the_larger_cache_match_the_originals_crop_of_the_full_image():
    """The original cut 80-100% of the full image and downsampled it to the model size; a crop of
    the 2x cache comes close to that, a crop of the model-size cache (upsampled) does not."""
    yy, xx = np.mgrid[0:256, 0:256]
    full = ((np.sin(xx / 3.0) * np.cos(yy / 5.0) * 0.5 + 0.5) * 255)[..., None].repeat(3, 2).astype(np.uint8)
    b, size = 8, 64
    cw, ch, x0, y0, flip = _crop_boxes(3, b)
    x = torch.from_numpy(full).permute(2, 0, 1).float()[None] / 255
    ref = []
    for i in range(b):
        left, top = round(float(x0[i]) * 256), round(float(y0[i]) * 256)
        w, h = round(float(cw[i]) * 256), round(float(ch[i]) * 256)
        r = torch.nn.functional.interpolate(x[:, :, top:top + h, left:left + w], size=(size, size),
                                            mode='bilinear', antialias=True, align_corners=False)
        ref.append(r.flip(3) if flip[i] else r)
    ref = (torch.cat(ref) - clip_data.CLIP_MEAN) / clip_data.CLIP_STD
    errors = {}
    for n in (size, 2 * size):
        cache = torch.from_numpy(np.array(Image.fromarray(full).resize((n, n), Image.BILINEAR))).permute(2, 0, 1)
        out = clip_data.clip_pixels(cache[None].repeat(b, 1, 1, 1), train=True,
                                    generator=torch.Generator().manual_seed(3), size=size)
        assert out.shape == (b, 3, size, size)
        errors[n] = (out - ref).abs().mean().item()
    assert errors[2 * size] < 0.08 and errors[2 * size] < 0.5 * errors[size]


def test_run_crops_training_images_from_the_larger_cache_and_evaluates_at_model_size(tmp_path, monkeypatch):
    root = tmp_path / 'data'
    csv_path = make_prompt_csv(root)
    for png in (root / 'AGIQA-3K').iterdir():   # 200 x 160 images for the 64-pixel nano
        Image.open(png).resize((200, 160)).save(png)
    seen = {}
    real_epoch = train_clip.train_one_epoch

    def spy(model, optimizer, data, *rest):
        seen.update(train=tuple(data['train_images'].shape[1:]), eval=tuple(data['images'].shape[1:]))
        return real_epoch(model, optimizer, data, *rest)

    monkeypatch.setattr(train_clip, 'train_one_epoch', spy)
    run(tmp_path, csv_path, '--epochs 1')
    assert seen == {'train': (3, 128, 128), 'eval': (3, 64, 64)}
    run(tmp_path / 'b', csv_path, '--epochs 1 --train_image_size 64')   # the model size: crops of the eval images
    assert seen == {'train': (3, 64, 64), 'eval': (3, 64, 64)}


def test_missing_pretrained_weights_stop_at_once_with_the_way_out(monkeypatch):
    monkeypatch.setattr(models_clip, '_hub_unreachable', lambda: True)   # never touch the network in tests
    start = time.time()
    with pytest.raises(models_clip.PretrainedWeightsError) as err:
        models_clip.build_backbone('ViT-B/32', pretrained=True)
    assert '--pretrained_path' in str(err.value) and '--no_pretrained' in str(err.value)
    assert time.time() - start < 60
    with pytest.raises(models_clip.PretrainedWeightsError, match='--no_pretrained'):
        models_clip.build_backbone('nano', pretrained=True)


def test_tokenizer_works_offline():
    ids = models_clip.build_tokenizer('ViT-L/14')(['a red circle on a white background'])
    assert ids.shape == (1, 77) and ids[0, 0].item() == 49406


# --------------------------------------------------------------------------- data

def make_prompt_csv(root, prompts=9, per_prompt=3, extra_rows=(), explanation=False):
    images = root / 'AGIQA-3K'
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for p in range(prompts):
        for k in range(per_prompt):
            name = f'p{p}_{k}.png'
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / name)
            row = [name, f'prompt number {p}', f'{rng.uniform(1, 5):.3f}', f'{rng.uniform(1, 5):.3f}', 'other']
            rows.append(row + ([f'because {p} {k}'] if explanation else []))
    header = ['name', 'prompt', 'mos_quality', 'mos_align', 'ignored'] + (['explanation'] if explanation else [])
    with open(root / 'data.csv', 'w', newline='') as f:
        csv.writer(f).writerows([header, *rows, *extra_rows])
    return root / 'data.csv'


def test_reads_agiqa_csv_with_images_in_the_agiqa_folder(tmp_path):
    ds = clip_data.read_prompt_csv(make_prompt_csv(tmp_path))
    assert len(ds) == 27 and ds.paths[0].endswith(os.path.join('AGIQA-3K', 'p0_0.png'))
    assert ds.prompts[3] == 'prompt number 1' and ds.lines[0] == 2


@pytest.mark.parametrize('problem, needle', [
    ('column', "column 'mos_align' missing"),
    ('image', 'line 29: '),
    ('prompt', "line 29, column 'prompt': empty prompt"),
    ('score', "line 29, column 'mos_quality': expected a number, got 'good'"),
])
def test_bad_input_names_the_row(tmp_path, problem, needle):
    extra = {'image': [['missing.png', 'a prompt', '3', '3', '']],
             'prompt': [['p0_0b.png', '', '3', '3', '']],
             'score': [['p0_0c.png', 'a prompt', 'good', '3', '']]}.get(problem, [])
    csv_path = make_prompt_csv(tmp_path, extra_rows=extra)
    for name in ('p0_0b.png', 'p0_0c.png'):
        Image.new('RGB', (8, 8)).save(tmp_path / 'AGIQA-3K' / name)
    if problem == 'column':
        text = csv_path.read_text().replace('mos_align', 'alignment')
        csv_path.write_text(text)
    with pytest.raises(DataError) as err:
        clip_data.read_prompt_csv(csv_path)
    assert needle in str(err.value) and str(csv_path) in str(err.value)
    if problem == 'image':
        assert 'missing.png' in str(err.value)


def test_image_folder_is_found_one_level_down_and_named(tmp_path, capsys):
    # The user's second project keeps AGIQA-3K's images in ACGIQA-3K/, not AGIQA-3K/.
    csv_path = make_prompt_csv(tmp_path)
    (tmp_path / 'AGIQA-3K').rename(tmp_path / 'ACGIQA-3K')
    ds = clip_data.read_prompt_csv(csv_path)
    assert len(ds) == 27 and all(os.path.dirname(p) == str(tmp_path / 'ACGIQA-3K') for p in ds.paths)
    assert f'images found in {tmp_path / "ACGIQA-3K"}' in capsys.readouterr().out
    # --image_base_dir pointing one level above the images: found below it as well.
    assert clip_data.read_prompt_csv(csv_path, tmp_path).paths == ds.paths


@pytest.mark.parametrize('base_dir', [None, 'elsewhere'])
def test_images_nowhere_give_one_message_naming_folders_and_flag(tmp_path, base_dir):
    csv_path = make_prompt_csv(tmp_path)
    (tmp_path / 'AGIQA-3K').rename(tmp_path / 'unrelated')
    for f in (tmp_path / 'unrelated').iterdir():
        f.unlink()
    if base_dir:
        (tmp_path / base_dir).mkdir()
    with pytest.raises(DataError) as err:
        clip_data.read_prompt_csv(csv_path, tmp_path / base_dir if base_dir else None)
    text = str(err.value)
    assert '\n' not in text and 'p0_1.png' not in text            # one message, not one line per image
    assert 'cannot find the images: p0_0.png' in text and '--image_base_dir' in text
    if base_dir is None:                                           # the folders searched are named
        assert f'{tmp_path / "AGIQA-3K"}/ (no such folder)' in text and str(tmp_path / 'unrelated') in text
    else:
        assert f'not in {tmp_path / base_dir}/' in text and str(tmp_path / 'unrelated') not in text
    # clip_eval's prompt lookup (check_images=False) reads the CSV without raising.
    assert len(clip_data.read_prompt_csv(csv_path, check_images=False)) == 27


def test_label_scale_is_automatic_as_in_the_original():
    assert clip_data.label_scale(np.array([0.2, 4.8])) == 5.0
    assert clip_data.label_scale(np.array([0.2, 1.0])) == 1.0


def test_split_by_prompt_is_disjoint_and_seeded():
    prompts = [f'p{i // 4}' for i in range(200)]
    a = clip_data.prompt_split(prompts, seed=42)
    sides = {k: {prompts[i] for i in v} for k, v in a.items()}
    assert not (sides['train'] & sides['val'] or sides['train'] & sides['test'] or sides['val'] & sides['test'])
    assert sorted(np.concatenate(list(a.values()))) == list(range(200))
    assert (len(sides['train']), len(sides['val']), len(sides['test'])) == (35, 5, 10)
    b = clip_data.prompt_split(prompts, seed=42)
    c = clip_data.prompt_split(prompts, seed=43)
    assert all((a[k] == b[k]).all() for k in a) and not (a['test'].tolist() == c['test'].tolist())
    # One split rule in the toolkit: data_loader's, with prompts as groups and val as a share of
    # the training side (0.1 of the whole = 0.125 of the 80% that is not test).
    same = data_loader.split_by_groups(200, 42, train_ratio=0.8, val_ratio=0.125, groups=prompts)
    assert all(a[k].tolist() == same[k].tolist() for k in ('train', 'val', 'test'))


@pytest.mark.parametrize('n_prompts, val, test', [(2, 0.1, 0.2), (3, 0.1, 0.7)])
def test_split_by_prompt_stops_when_prompts_are_too_few(n_prompts, val, test):
    with pytest.raises(DataError, match='too few|at least 3 different prompts'):
        clip_data.prompt_split([f'p{i % n_prompts}' for i in range(12)], seed=0, val_ratio=val, test_ratio=test)
    assert set(clip_data.prompt_split([f'p{i % 3}' for i in range(12)], seed=0)) == {'train', 'val', 'test'}


def test_split_file_and_shared_prompt_report(tmp_path):
    ds = clip_data.read_prompt_csv(make_prompt_csv(tmp_path, prompts=3, per_prompt=2))
    spec = {'train': ['p0_0.png', 'p0_1.png', 'p1_0.png'], 'test': ['p1_1.png', 'p2_0.png', 'p2_1.png']}
    (tmp_path / 'split.json').write_text(json.dumps(spec))
    splits = clip_data.read_split_file(tmp_path / 'split.json', ds)
    assert splits['train'].tolist() == [0, 1, 2] and splits['test'].tolist() == [3, 4, 5]
    assert clip_data.shared_prompts(splits, ds.prompts) == ['prompt number 1']


def test_schedules_follow_the_originals():
    args = parse('--warmup_ratio 0.1')
    assert train_clip.lr_factor(0, 0, 100, args) == 0.0                 # warm-up starts at 0, as transformers'
    assert train_clip.lr_factor(5, 0, 100, args) == 0.5
    assert train_clip.lr_factor(10, 0, 100, args) == 1.0
    assert train_clip.lr_factor(55, 0, 100, args) == pytest.approx(0.5)   # half way through the cosine
    assert train_clip.lr_factor(55, 0, 100, parse('--warmup_ratio 0.1 --scheduler linear')) == pytest.approx(0.5)
    assert train_clip.lr_factor(90, 0, 100, parse('--scheduler constant')) == 1.0
    step = parse('--scheduler step --step_lr_step_size 2 --step_lr_gamma 0.5')
    assert [train_clip.lr_factor(0, e, 100, step) for e in range(5)] == [1, 1, 0.5, 0.5, 0.25]


# --------------------------------------------------------------------------- whole runs

def run(tmp_path, csv_path, extra=''):
    argv = shlex.split(f'--data_csv_path {csv_path} --clip_model nano --no_pretrained --epochs 2 --batch_size 8 '
                       f'--lr 1e-3 --output_dir {tmp_path / "runs"} --log_dir {tmp_path / "logs"} '
                       f'--cache_dir {tmp_path / "cache"} --num_workers 1 {extra}')
    assert train_clip.main(argv) == 0
    runs = sorted((tmp_path / 'runs').iterdir(), key=os.path.getmtime)
    return runs[-1]


def read_rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


TIMING = ('epoch_seconds', 'train_images_per_s')


def test_run_writes_every_output_and_ends_with_the_result_line(tmp_path):
    csv_path = make_prompt_csv(tmp_path / 'data', explanation=True)
    run_dir = run(tmp_path, csv_path, '--use_explanations --w_exp 0.2')
    files = sorted(os.listdir(run_dir))
    assert {'config.json', 'metrics.csv', 'summary.json', 'training_log.csv', 'last.pkl'} <= set(files)
    best = [f for f in files if f.startswith('best_model_srccq_')]
    assert len(best) == 1
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert best[0] == f"best_model_srccq_{summary['best']['test_srcc_q']:.4f}_srccc_{summary['best']['test_srcc_c']:.4f}.pkl"
    assert summary['select_split'] == 'val' and summary['label_scales'] == {'quality': 5.0, 'consistency': 5.0}
    log = read_rows(run_dir / 'training_log.csv')
    assert list(log[0]) == train_clip.LOG_CSV_COLUMNS and len(log) == 2
    assert float(log[0]['le']) > 0                                          # the explanation loss ran
    metrics = read_rows(run_dir / 'metrics.csv')
    assert list(metrics[0]) == train_clip.METRIC_COLUMNS
    assert all(metrics[1][f'{s}_{m}'] != '' for s in ('val', 'test') for m in train_clip.HEAD_METRICS)
    # the log says which prompts went where, and its last line is the grep-able result
    last = (tmp_path / 'logs' / f'{run_dir.name}.log').read_text().strip().splitlines()[-1]
    assert last.startswith('Best test SRCC_Q ') and ' SRCC_C ' in last and 'selected on val consistency' in last
    ckpt = torch.load(run_dir / best[0], weights_only=True)
    assert ckpt['format'] == clip_eval.CLIP_CHECKPOINT_FORMAT and ckpt['model_config']['clip_model'] == 'nano'
    model, _ = clip_eval.load_model(str(run_dir / best[0]))
    assert isinstance(model, models_clip.ClipQualityModel)


def test_resume_after_a_kill_ends_with_the_uninterrupted_metrics(tmp_path, monkeypatch):
    csv_path = make_prompt_csv(tmp_path / 'data')
    whole = run(tmp_path / 'a', csv_path, '--epochs 3')
    real_epoch = train_clip.train_one_epoch

    def killed_in_epoch_3(model, optimizer, data, epoch, *rest):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(model, optimizer, data, epoch, *rest)

    monkeypatch.setattr(train_clip, 'train_one_epoch', killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / 'b', csv_path, '--epochs 3')
    monkeypatch.setattr(train_clip, 'train_one_epoch', real_epoch)
    killed = next((tmp_path / 'b' / 'runs').iterdir())
    assert len(read_rows(killed / 'metrics.csv')) == 2
    assert train_clip.main(['--resume_from', str(killed)]) == 0
    a, c = read_rows(whole / 'metrics.csv'), read_rows(killed / 'metrics.csv')
    assert len(c) == 3
    for ra, rc in zip(a, c):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rc.items() if k not in TIMING}
    assert read_rows(whole / 'training_log.csv') == read_rows(killed / 'training_log.csv')


def test_selection_and_training_log_follow_the_original(tmp_path):
    """Default selection is on val consistency (the original's), and training_log.csv's best_s_c
    and lr hold what the original wrote: its running best of s_c, raised only by a gain above
    --early_stopping_min_delta, and opt.param_groups[0]['lr'] after the epoch's scheduler steps."""
    csv_path = make_prompt_csv(tmp_path / 'data')
    run_dir = run(tmp_path, csv_path, '--epochs 3')
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['select_on'] == 'consistency'
    log, metrics = read_rows(run_dir / 'training_log.csv'), read_rows(run_dir / 'metrics.csv')
    best = -1.0
    for row, m in zip(log, metrics):
        if float(row['s_c']) - best > 1e-4:
            best = float(row['s_c'])
            assert m['is_best'] == '1'           # the best epoch moves with val consistency alone
        else:
            assert m['is_best'] == '0' or m['epoch'] == '1'
        assert row['best_s_c'] == f'{best:.6f}'
        assert abs(float(row['s_c']) - float(m['val_srcc_c'])) <= 5e-5   # unrounded in the log
    assert summary['best_epoch'] == max(int(m['epoch']) for m in metrics if m['is_best'] == '1')
    # lr: 18 training images / batch 8 = 3 steps an epoch, 9 in all, warm-up int(0.05 * 9) = 0 steps;
    # the original logged the rate after each epoch's last scheduler step (0 after the last epoch)
    args = parse('--epochs 3 --lr 1e-3')
    for epoch, row in enumerate(log, start=1):
        expected = 1e-3 * train_clip.lr_factor(epoch * 3, epoch, 9, args)
        assert row['lr'] == f'{expected:.8f}'
    assert log[-1]['lr'] == '0.00000000'
    # a gain must exceed min_delta: with 2 (no SRCC gain is that large) the original's best stays -1
    strict = run(tmp_path / 'b', csv_path, '--epochs 2 --early_stopping_min_delta 2')
    assert [r['best_s_c'] for r in read_rows(strict / 'training_log.csv')] == ['-1.000000'] * 2


@pytest.mark.parametrize('how', ['val_ratio', 'split_file'])
def test_a_run_without_validation_split_selects_on_test_and_says_so(tmp_path, how):
    csv_path = make_prompt_csv(tmp_path / 'data')
    if how == 'val_ratio':
        extra, label = '--val_ratio 0', '--val_ratio 0'
    else:
        split = {'train': [f'p{p}_{k}.png' for p in range(6) for k in range(3)],
                 'test': [f'p{p}_{k}.png' for p in range(6, 9) for k in range(3)]}
        (tmp_path / 'split.json').write_text(json.dumps(split))
        extra, label = f'--split_file {tmp_path / "split.json"}', 'none in --split_file'
    run_dir = run(tmp_path, csv_path, extra)
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['select_split'] == 'test' and summary['best']['no_val'].startswith(label)
    last = (tmp_path / 'logs' / f'{run_dir.name}.log').read_text().strip().splitlines()[-1]
    assert f'selected on test consistency (no validation split: {label}' in last
    log = read_rows(run_dir / 'training_log.csv')
    assert len(log) == 2 and log[0]['s_c'] == '' and log[0]['best_s_c'] == '' and log[0]['train_loss'] != ''


def test_resume_after_an_early_stop_trains_no_further_epoch(tmp_path, monkeypatch):
    csv_path = make_prompt_csv(tmp_path / 'data')
    scores = iter([0.5, 0.4, 0.3, 0.2])   # the selection SRCC falls: patience 1 stops after epoch 2
    monkeypatch.setattr(train_clip, 'selection_score', lambda metrics, select_on: next(scores))
    run_dir = run(tmp_path, csv_path, '--epochs 4 --early_stopping_patience 1')
    assert len(read_rows(run_dir / 'metrics.csv')) == 2
    best = [f for f in os.listdir(run_dir) if f.startswith('best_model_srccq_')]
    assert train_clip.main(['--resume_from', str(run_dir)]) == 0
    assert len(read_rows(run_dir / 'metrics.csv')) == 2
    assert [f for f in os.listdir(run_dir) if f.startswith('best_model_srccq_')] == best
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['status'] == 'stopped_early' and summary['best_epoch'] == 1


def test_cross_dataset_test_scores_a_clip_checkpoint(tmp_path):
    import cross_dataset_test
    data = tmp_path / 'agiqa'
    csv_path = make_prompt_csv(data)
    run_dir = run(tmp_path, csv_path, '--epochs 1')
    ckpt = str(run_dir / 'last.pkl')
    assert clip_eval.is_clip_checkpoint(ckpt) and not clip_eval.is_clip_checkpoint(str(csv_path))
    out = tmp_path / 'out'
    assert cross_dataset_test.main(['--checkpoint', ckpt, '--datasets', f'agiqa={data}', '--split', 'all',
                                    '--n_boot', '50', '--output_dir', str(out), '--cache_dir', 'none']) == 0
    result = json.loads(next(out.glob('cross_dataset_results_clip_*.json')).read_text())['results']['agiqa']
    assert result['images'] == 27 and not math.isnan(result['srcc_q']) and not math.isnan(result['srcc_c'])
    # a CSV of image paths + prompts -> a CSV of quality and consistency
    (tmp_path / 'to_score.csv').write_text('image,prompt\nagiqa/AGIQA-3K/p0_0.png,a red circle\n'
                                           'agiqa/AGIQA-3K/nothere.png,a cat\n')
    scores = tmp_path / 'scores.csv'
    assert cross_dataset_test.main(['--checkpoint', ckpt, '--images', str(tmp_path / 'to_score.csv'),
                                    '--output', str(scores), '--cache_dir', 'none']) == 0
    rows = read_rows(scores)
    assert rows[0]['quality'] != '' and rows[0]['consistency'] != '' and rows[0]['prompt'] == 'a red circle'
    assert rows[1]['quality'] == '' and rows[1]['error']
    assert 0 <= float(rows[0]['quality']) <= 5      # on the training labels' scale
    # a row with an empty prompt gets a quality score and no consistency (not one against '')
    (tmp_path / 'no_prompt.csv').write_text('image,prompt\nagiqa/AGIQA-3K/p0_0.png,a red circle\n'
                                            'agiqa/AGIQA-3K/p0_1.png,\nagiqa/AGIQA-3K/p0_2.png,"  "\n')
    assert cross_dataset_test.main(['--checkpoint', ckpt, '--images', str(tmp_path / 'no_prompt.csv'),
                                    '--output', str(scores), '--cache_dir', 'none']) == 0
    rows = read_rows(scores)
    assert rows[0]['consistency'] != '' and all(r['quality'] != '' and r['error'] == '' for r in rows)
    assert rows[1]['consistency'] == '' and rows[2]['consistency'] == ''


def plan_lines(path):
    """(name, flags) of a run_experiments.sh plan file: comments dropped, backslash lines joined."""
    text = open(path, encoding='utf-8').read().replace('\\\n', ' ')
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append((words[0], words[1:]))
    return out


def test_clip_plan_files_name_their_script_and_parse():
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments')
    files = sorted(f for f in os.listdir(folder) if f.startswith('clip_'))
    assert len(files) >= 5
    parser = train_clip.build_parser()
    for name in files:
        path = os.path.join(folder, name)
        assert open(path, encoding='utf-8').readline().strip() == '# script: train_clip.py', name
        lines = plan_lines(path)
        assert lines, name
        for exp, flags in lines:
            args = train_clip.check_args(parser.parse_args(['--name', exp] + flags), lambda m: None)
            assert args.name == exp
    configs = dict(plan_lines(os.path.join(folder, 'clip_configs.txt')))
    assert configs['B'] == shlex.split(CARD_COMMANDS[1])    # the card's configuration B, verbatim


def test_frozen_towers_direct_heads_and_a_zero_weight_in_one_run(tmp_path):
    csv_path = make_prompt_csv(tmp_path / 'data', explanation=True)
    run_dir = run(tmp_path, csv_path, '--epochs 1 --freeze_clip --no_residual_learning --use_two_branch '
                                      '--use_refinement --refinement_layers 1 --refinement_heads 4 '
                                      '--refinement_dim 32 --use_explanations --w_q 0 --w_exp 0.1')
    row = read_rows(run_dir / 'metrics.csv')[0]
    # --w_q 0 means zero: the loss is w_c * lc + w_exp * le only
    expected = 0.5 * float(row['train_loss_c']) + 0.1 * float(row['train_loss_exp'])
    assert float(row['train_loss']) == pytest.approx(expected, abs=2e-6)
    assert float(row['train_loss_q']) > 0 and row['c_base_alpha'] == ''
    log = (tmp_path / 'logs' / f'{run_dir.name}.log').read_text()
    assert 'CLIP frozen (both towers)' in log
    model, ckpt = clip_eval.load_model(str(run_dir / 'last.pkl'))
    assert ckpt['model_config']['use_refinement'] and hasattr(model, 'refinement') and hasattr(model, 'c_scale')


def test_demo_set_is_generated_offline_with_prompts_and_both_scores(tmp_path):
    csv_path = clip_data.ensure_clip_demo(tmp_path / 'demo')
    ds = clip_data.read_prompt_csv(csv_path)
    assert len(ds) == 1280 and len(set(ds.prompts)) == 320
    assert ds.prompts[0] == 'a small red circle on a white background'
    assert ds.mos_q.min() < 1.5 and ds.mos_q.max() > 4 and ds.mos_c.min() < 1.5 and ds.mos_c.max() > 4
    # the four images of a prompt match different numbers of its words: consistency levels 1..5
    # (rater noise 0.15) never repeat within a prompt
    levels = np.rint(ds.mos_c).reshape(320, 4)
    assert all(len(set(row)) == 4 for row in levels.tolist())
    assert clip_data.ensure_clip_demo(tmp_path / 'demo') == csv_path   # written once
    # another generator seed draws other images and scores for the same prompts (the unseen-data check)
    other = clip_data.read_prompt_csv(clip_data.ensure_clip_demo(tmp_path / 'demo-seed1', seed=1))
    assert other.prompts == ds.prompts and not np.allclose(other.mos_c, ds.mos_c)


def test_text_lr_ratio_sets_the_text_towers_rate_and_zero_keeps_its_weights(tmp_path):
    csv_path = make_prompt_csv(tmp_path / 'data')
    run_dir = run(tmp_path / 'half', csv_path, '--epochs 1 --text_lr_ratio 0.5 --scheduler constant --warmup_ratio 0')
    groups = torch.load(run_dir / 'last.pkl', weights_only=True)['optimizer']['param_groups']
    assert [g['initial_lr'] for g in groups] == [1e-3, 1e-3, 5e-4]   # image tower, heads, text tower
    run_dir = run(tmp_path / 'zero', csv_path, '--epochs 1 --text_lr_ratio 0')
    trained = torch.load(run_dir / 'last.pkl', weights_only=True)['state_dict']
    train_clip.seed_everything(42)
    initial = train_clip.build_model(parse('--clip_model nano --no_pretrained')).state_dict()
    text = [k for k in initial if k.startswith('clip.') and not k.startswith('clip.visual.')]
    assert text and all(torch.equal(trained[k], initial[k]) for k in text)
    assert not torch.equal(trained['clip.visual.conv1.weight'], initial['clip.visual.conv1.weight'])
    assert len(torch.load(run_dir / 'last.pkl', weights_only=True)['optimizer']['param_groups']) == 2


def test_bf16_autocast_and_fused_adamw_run_on_the_cpu_as_on_cuda(tmp_path):
    # the CUDA code path (bf16 autocast, fused AdamW) is device-agnostic, so it runs here
    csv_path = make_prompt_csv(tmp_path / 'data')
    run_dir = run(tmp_path, csv_path, '--epochs 1 --precision bf16')
    config = json.loads((run_dir / 'config.json').read_text())
    assert config['precision'] == 'bf16'
    assert 'precision bf16 autocast' in (tmp_path / 'logs' / f'{run_dir.name}.log').read_text()
    row = read_rows(run_dir / 'metrics.csv')[0]
    assert math.isfinite(float(row['train_loss'])) and row['test_srcc_q'] != ''
    ckpt = torch.load(run_dir / 'last.pkl', weights_only=True)
    assert all(group['fused'] for group in ckpt['optimizer']['param_groups'])
    # --no_amp is the card's spelling of fp32, and contradicts an explicit bf16
    assert train_clip.check_args(parse('--no_amp'), print).precision == 'fp32'
    with pytest.raises(SystemExit, match='contradicts --precision bf16'):
        train_clip.check_args(parse('--no_amp --precision bf16'), print)


def test_a_run_that_fails_its_data_check_leaves_no_folder_and_no_log(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, tmp_path / 'no-such-folder' / 'data.csv')
    assert stop.value.code == 2
    assert 'DATA ERROR' in capsys.readouterr().out
    for folder in ('runs', 'logs'):
        assert not (tmp_path / folder).exists() or not list((tmp_path / folder).iterdir())


def test_two_process_torchrun_on_cpu_trains_one_model_and_writes_one_run(tmp_path):
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    csv_path = make_prompt_csv(tmp_path / 'data')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', '2',
           '--master_addr', '127.0.0.1', '--master_port', str(port), os.path.join(root, 'train_clip.py'),
           *shlex.split(f'--data_csv_path {csv_path} --clip_model nano --no_pretrained --epochs 2 --batch_size 8 '
                        f'--lr 1e-3 --output_dir {tmp_path / "runs"} --log_dir {tmp_path / "logs"} '
                        f'--cache_dir none --num_workers 1 --device cpu')]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = list((tmp_path / 'runs').iterdir())
    assert len(runs) == 1 and len(list((tmp_path / 'logs').iterdir())) == 1   # only rank 0 writes
    assert json.loads((runs[0] / 'config.json').read_text())['world_size'] == 2
    assert len(read_rows(runs[0] / 'metrics.csv')) == 2
    summary = json.loads((runs[0] / 'summary.json').read_text())
    assert summary['status'] == 'finished'
    model, _ = clip_eval.load_model(summary['best_checkpoint'])
    assert isinstance(model, models_clip.ClipQualityModel)
