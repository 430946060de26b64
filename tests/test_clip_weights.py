"""The CLIP system on the user's own weights (iqa/clip/models.py, iqa/clip/weights.py): QuickGELU
for OpenAI weights, local Hugging Face folders, baseline.py files scored by cross_dataset_test.py
and started from by train_clip.py --init_from, the heads in fp32 under autocast.

The references are transformers' CLIPModel and the copy of baseline.py's forward in
test_clip_import.py (not this project's code)."""
import csv
import os
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('transformers')

import cross_dataset_test  # noqa: E402
import data_loader  # noqa: E402
import train_clip  # noqa: E402
from iqa.clip import data as clip_data  # noqa: E402
from iqa.clip import evaluation as clip_eval  # noqa: E402
from iqa.clip import models as models_clip  # noqa: E402
from iqa.clip import weights as clip_weights  # noqa: E402
from test_clip_import import baseline_copy, save_like_baseline, tiny_hf  # noqa: E402
from test_train_clip import make_prompt_csv, read_rows  # noqa: E402


def quick_gelu_towers(clip):
    from open_clip.transformer import QuickGELU
    towers = (clip.visual.transformer.resblocks, clip.transformer.resblocks)
    return [all(isinstance(b.mlp.gelu, QuickGELU) for b in blocks) for blocks in towers]


# --------------------------------------------------------------------------- 1. QuickGELU
@pytest.fixture
def no_download(monkeypatch, tmp_path):
    """open_clip.create_model builds on the meta device with no weights; the calls are recorded."""
    import open_clip
    real, calls = open_clip.create_model, []

    def fake(name, pretrained=None, **kw):
        calls.append((name, pretrained))
        return real(name, pretrained=None, device='meta')
    monkeypatch.setattr(open_clip, 'create_model', fake)
    return calls


@pytest.mark.parametrize('name', ['ViT-B/32', 'ViT-B/16', 'ViT-L/14'])
def test_openai_weights_build_quickgelu_in_both_towers(name, no_download, tmp_path):
    open_clip_file = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save({'visual.proj': torch.zeros(1)}, open_clip_file)   # an open_clip file, not HF: open_clip reads it
    with torch.device('meta'):
        hub = models_clip.ClipQualityModel(name, pretrained=True)
        local = models_clip.ClipQualityModel(name, pretrained=True, pretrained_path=str(open_clip_file))
        random = models_clip.ClipQualityModel(name, pretrained=False)
    quick = name.replace('/', '-') + '-quickgelu'
    assert no_download == [(quick, 'openai'), (quick, str(open_clip_file)), (name.replace('/', '-'), None)]
    for model in (hub, local):
        assert quick_gelu_towers(model.clip) == [True, True] and model.config['quick_gelu'] is True
    assert quick_gelu_towers(random.clip) == [False, False] and random.config['quick_gelu'] is False
    with torch.device('meta'):   # the stored activation rebuilds the same towers, offline
        rebuilt = models_clip.build_from_config(hub.model_config())
    assert quick_gelu_towers(rebuilt.clip) == [True, True]
    assert no_download[-1] == (quick, None)


def test_checkpoint_config_without_activation_loads_as_gelu():
    torch.manual_seed(0)
    model = models_clip.ClipQualityModel('nano', pretrained=False)
    assert model.config['quick_gelu'] is False       # nano keeps GELU: the demo's numbers do not change
    old = {k: v for k, v in model.model_config().items() if k != 'quick_gelu'}   # written before the key
    rebuilt = models_clip.build_from_config(old)
    assert quick_gelu_towers(rebuilt.clip) == [False, False]
    rebuilt.load_state_dict(model.state_dict())
    ids = model.tokenize(['a cat'])
    px = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(px, ids)['q'], rebuilt.eval()(px, ids)['q'])
    assert quick_gelu_towers(models_clip.build_from_config(dict(old, quick_gelu=True)).clip) == [True, True]


# --------------------------------------------------------------------------- 2. local Hugging Face weights
def hf_folder(tmp_path):
    hf = tiny_hf(vocab=49408, context=16, image=32, patch=8)   # OpenAI's vocabulary: our tokenizer's ids
    folder = tmp_path / 'clip-hf'
    hf.save_pretrained(str(folder))
    return hf, folder


def assert_hf_embeddings(model, hf):
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = model.tokenize(['a red circle', 'two dogs on grass', 'x'])
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=px).pooler_output
        ref_txt = hf.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
        img, txt = model.encode_image(px), model.encode_text(ids)
    assert (img - torch.nn.functional.normalize(ref_img, dim=-1)).abs().max() < 1e-5
    assert (txt - torch.nn.functional.normalize(ref_txt, dim=-1)).abs().max() < 1e-5


def test_local_hf_folder_and_weights_file_as_pretrained_path_and_model_name(tmp_path):
    hf, folder = hf_folder(tmp_path)
    for kwargs in (dict(clip_model=str(folder)), dict(clip_model='ViT-B/32', pretrained_path=str(folder)),
                   dict(clip_model='ViT-B/32', pretrained_path=str(folder / 'model.safetensors'))):
        model = models_clip.ClipQualityModel(**kwargs).eval()
        assert model.config['quick_gelu'] is True and model.config['clip_model'] == 'custom'
        assert model.image_size == 32 and model.tokenize(['a']).shape == (1, 16)
        assert_hf_embeddings(model, hf)
        rebuilt = models_clip.build_from_config(model.model_config())   # offline, from the stored config
        rebuilt.load_state_dict(model.state_dict())
        assert_hf_embeddings(rebuilt.eval(), hf)


def test_train_clip_runs_on_a_local_hf_folder_from_the_environment(tmp_path, monkeypatch):
    _, folder = hf_folder(tmp_path)
    monkeypatch.setenv('CLIP_MODEL_NAME', str(folder))
    csv_path = make_prompt_csv(tmp_path / 'data')
    argv = shlex.split(f'--data_csv_path {csv_path} --epochs 1 --batch_size 8 --output_dir {tmp_path / "runs"} '
                       f'--log_dir {tmp_path / "logs"} --cache_dir none --num_workers 1')
    assert train_clip.main(argv) == 0
    run_dir = next((tmp_path / 'runs').iterdir())
    ckpt = torch.load(run_dir / 'last.pkl', weights_only=True)
    assert ckpt['model_config']['quick_gelu'] is True and ckpt['model_config']['clip_config']['vision_cfg']['image_size'] == 32
    # ... and a HF weights file as --pretrained_path is accepted by the flag checks
    args = train_clip.check_args(train_clip.build_parser().parse_args(
        ['--clip_model', 'ViT-B/32', '--pretrained_path', str(folder)]), print)
    assert args.pretrained_path == str(folder)


# --------------------------------------------------------------------------- 3. cross_dataset_test on baseline.py files
def tiny_images(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        names.append(f'img{i}.png')
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / names[-1])
    return names


def original_scores(original, paths, prompts):
    """q and c of baseline.py's forward on the pixels this program feeds (its loader and normalisation)."""
    images, _ = data_loader.load_images(paths, resize_hw=(64, 64), cache_dir=None, num_workers=1)
    ids = models_clip.build_tokenizer('nano')(prompts)
    with torch.no_grad():
        q, c = original.eval()(clip_data.clip_pixels(images), ids, (ids != 0).long())
    return q.squeeze(1).numpy(), c.squeeze(1).numpy()


def test_cross_dataset_scores_baseline_files_with_the_originals_q_and_c(tmp_path, capsys):
    original = baseline_copy()
    files = save_like_baseline(original, str(tmp_path))
    names = tiny_images(tmp_path / 'imgs')
    prompts = ['a red apple', 'a blue car at night', 'a cat', 'an old house', 'a cat', 'mountains in fog']
    table = tmp_path / 'imgs' / 'to_score.csv'
    with open(table, 'w', newline='') as f:
        csv.writer(f).writerows([['image', 'prompt'], *zip(names, prompts)])
    q_ref, c_ref = original_scores(original, [str(tmp_path / 'imgs' / n) for n in names], prompts)
    assert q_ref.std() > 0 and 0 < c_ref.min() and c_ref.max() < 1
    for path in files:   # bare best state_dict, baseline_last.pt (numpy best_sc), baseline_best.pt
        out = tmp_path / (os.path.basename(path) + '.csv')
        assert cross_dataset_test.main(['--checkpoint', path, '--images', str(table), '--output', str(out),
                                        '--device', 'cpu']) == 0
        rows = read_rows(out)
        q = np.array([float(r['quality']) for r in rows])
        c = np.array([float(r['consistency']) for r in rows])
        assert np.abs(q - q_ref).max() < 1e-3 and np.abs(c - c_ref).max() < 1e-3
    assert 'baseline.py: dropped' in capsys.readouterr().out
    # the weights are not a ViT-L/14: a --clip_model that disagrees is refused, not silently used
    assert cross_dataset_test.main(['--checkpoint', files[0], '--images', str(table), '--output',
                                    str(tmp_path / 'x.csv'), '--device', 'cpu', '--clip_model', 'ViT-L/14']) == 2
    assert 'not the --clip_model ViT-L/14' in capsys.readouterr().err


# --------------------------------------------------------------------------- 4. --init_from, --resume_from
def test_init_from_a_baseline_file_starts_a_new_run_from_its_scores(tmp_path):
    original = baseline_copy()
    best, last, _ = save_like_baseline(original, str(tmp_path))
    csv_path = make_prompt_csv(tmp_path / 'data')
    argv = shlex.split(f'--data_csv_path {csv_path} --init_from {last} --epochs 1 --batch_size 8 --lr 1e-12 '
                       f'--output_dir {tmp_path / "runs"} --log_dir {tmp_path / "logs"} --cache_dir none '
                       '--num_workers 1')
    assert train_clip.main(argv) == 0
    run_dir = next((tmp_path / 'runs').iterdir())
    log = (tmp_path / 'logs' / (run_dir.name + '.log')).read_text()
    assert 'a NEW run' in log and 'optimizer state, if any, is not carried over' in log
    row = read_rows(run_dir / 'metrics.csv')[0]
    # the imported model's own scores on the same val split (lr 1e-12: one epoch changes nothing visible)
    model, _ = clip_weights.import_baseline_model(last)
    ds = clip_data.read_prompt_csv(str(csv_path))
    val = clip_data.prompt_split(ds.prompts, 42, 0.1, 0.2)['val']
    images, _ = data_loader.load_images([ds.paths[i] for i in val], resize_hw=(64, 64), cache_dir=None,
                                        num_workers=1)
    prompts, index = np.unique(np.array([ds.prompts[i] for i in val], dtype=object).astype(str), return_inverse=True)
    q, c, _ = clip_eval.predict(model, images, model.tokenize(prompts), index)
    expected = clip_eval.head_metrics(q, c, ds.mos_q[val], ds.mos_c[val])
    for m in ('srcc_q', 'plcc_q', 'srcc_c', 'plcc_c'):
        assert abs(float(row[f'val_{m}']) - expected[m]) < 1e-3, m
    config = (run_dir / 'config.json').read_text()
    assert '"init_from"' in config
    # a train_clip.py checkpoint starts a new run the same way; its first evaluation is the file's
    argv2 = [a if a != str(last) else str(run_dir / 'last.pkl') for a in argv]
    argv2[argv2.index(str(tmp_path / 'runs'))] = str(tmp_path / 'runs2')
    assert train_clip.main(argv2) == 0
    row2 = read_rows(next((tmp_path / 'runs2').iterdir()) / 'metrics.csv')[0]
    for m in ('srcc_q', 'plcc_q', 'srcc_c', 'plcc_c'):
        assert abs(float(row2[f'val_{m}']) - expected[m]) < 1e-3, m


def test_resume_from_a_baseline_file_points_to_init_from(tmp_path):
    _, last, _ = save_like_baseline(baseline_copy(), str(tmp_path))
    with pytest.raises(SystemExit, match=r'baseline\.py.*--init_from'):
        train_clip.main(['--resume_from', last, '--output_dir', str(tmp_path / 'runs')])


# --------------------------------------------------------------------------- 5. heads in fp32, fp32 evaluation
def test_heads_run_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    for residual in (True, False):
        model = models_clip.ClipQualityModel('nano', pretrained=False, residual=residual).eval()
        img = torch.nn.functional.normalize(torch.randn(600, 64), dim=-1)
        txt = torch.nn.functional.normalize(torch.randn(600, 64), dim=-1)
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            out = model.heads(img, txt)
        assert out['q'].dtype == torch.float32 and out['c'].dtype == torch.float32
        assert len(torch.unique(out['q'])) > 590 and len(torch.unique(out['c'])) > 590


def test_evaluation_is_fp32_unless_asked():
    assert train_clip.build_parser().parse_args([]).eval_precision == 'fp32'
    assert cross_dataset_test.build_parser().parse_args([]).eval_precision == 'fp32'
    assert train_clip.build_parser().parse_args(['--eval_precision', 'bf16']).eval_precision == 'bf16'
