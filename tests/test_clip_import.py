"""Import of the user's Hugging Face CLIP weights and of baseline.py's checkpoints (iqa/clip/hf_import.py).

The reference is `transformers.CLIPModel` itself (a test-only dependency) and, for the heads, a
copy of baseline.py's forward written here from the original's source (residual mode with its
delta mixer, direct mode with its refinement module), not imported from this project."""
import io
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip('transformers')
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from iqa.clip import hf_import  # noqa: E402
from iqa.clip.hf_import import CheckpointImportError  # noqa: E402

from iqa.clip import models as models_clip  # noqa: E402

TOL_EMB = 1e-5
TOL_SCORE = 1e-4


def hf_config(text_width=64, text_heads=4, vision_width=64, vision_heads=4, vocab=1000, context=16,
              image=32, patch=8, projection=48, layers=2, act='quick_gelu'):
    return CLIPConfig(
        text_config=dict(hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=layers,
                         num_attention_heads=text_heads, max_position_embeddings=context, vocab_size=vocab,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, hidden_act=act),
        vision_config=dict(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=layers,
                           num_attention_heads=vision_heads, image_size=image, patch_size=patch, hidden_act=act),
        projection_dim=projection)


def tiny_hf(seed=0, **kw):
    torch.manual_seed(seed)
    model = CLIPModel(hf_config(**kw)).eval()
    with torch.no_grad():   # non-trivial LayerNorm affines and biases, so a mis-mapped one shows
        for name, p in model.named_parameters():
            if 'norm' in name or name.endswith('bias'):
                p.add_(0.1 * torch.randn_like(p))
    return model


def token_ids(batch, context, vocab, seed=1):
    """Tokenizer-like ids: random tokens, then the end-of-text token (the largest id) and zero
    padding; each sequence has its own length. Both HF (first EOT) and open_clip (argmax) pool there."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, context, dtype=torch.long)
    mask = torch.zeros(batch, context, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(2, context, (1,), generator=g))
        ids[i, :n - 1] = torch.randint(1, vocab - 1, (n - 1,), generator=g)
        ids[i, n - 1] = vocab - 1
        mask[i, :n] = 1
    return ids, mask


def pixels(batch, image, seed=2):
    return torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(seed))


def hf_features(model, px, ids, mask):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=px).pooler_output
        txt = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    return img, txt


def open_clip_features(clip, px, ids):
    clip.eval()
    with torch.no_grad():
        return clip.encode_image(px), clip.encode_text(ids)


def assert_same_features(hf_model, clip, image, context, vocab):
    px, (ids, mask) = pixels(3, image), token_ids(3, context, vocab)
    ref_img, ref_txt = hf_features(hf_model, px, ids, mask)
    img, txt = open_clip_features(clip, px, ids)
    assert (img - ref_img).abs().max().item() < TOL_EMB
    assert (txt - ref_txt).abs().max().item() < TOL_EMB


# --------------------------------------------------------------------------- a. towers
def test_converted_towers_give_the_hf_embeddings():
    hf = tiny_hf()
    sd = hf_import.hf_to_open_clip(hf.state_dict())
    config = hf_import.open_clip_config_from_hf(hf.config.to_dict(), hf.state_dict())
    assert config['quick_gelu'] is True
    assert config['text_cfg']['heads'] == 4 and config['vision_cfg']['head_width'] == 16   # from the config
    clip = hf_import.build_open_clip(config)
    clip.load_state_dict(sd, strict=True)
    assert torch.equal(clip.logit_scale, hf.logit_scale)
    assert_same_features(hf, clip, image=32, context=16, vocab=1000)


def test_gelu_config_builds_gelu_and_differs_from_quickgelu():
    hf = tiny_hf(act='gelu')
    config = hf_import.open_clip_config_from_hf(hf.config.to_dict(), hf.state_dict())
    assert config['quick_gelu'] is False
    clip = hf_import.build_open_clip(config)
    clip.load_state_dict(hf_import.hf_to_open_clip(hf.state_dict()))
    assert_same_features(hf, clip, image=32, context=16, vocab=1000)
    wrong = hf_import.build_open_clip(dict(config, quick_gelu=True))
    wrong.load_state_dict(hf_import.hf_to_open_clip(hf.state_dict()))
    px = pixels(2, 32)
    assert (open_clip_features(wrong, px, token_ids(2, 16, 1000)[0])[0]
            - open_clip_features(clip, px, token_ids(2, 16, 1000)[0])[0]).abs().max() > 1e-4


def test_config_disagreeing_with_weights_is_named():
    hf = tiny_hf()
    cfg = hf.config.to_dict()
    cfg['vision_config']['num_hidden_layers'] = 5
    with pytest.raises(CheckpointImportError, match='vision_config.num_hidden_layers=5'):
        hf_import.open_clip_config_from_hf(cfg, hf.state_dict())


# --------------------------------------------------------------------------- b. baseline.py files
class RefinementCopy(nn.Module):
    """baseline.py's ConsistencyRefinementModule (same names, same forward)."""

    def __init__(self, dim, hidden, layers, heads):
        super().__init__()
        self.input_proj = nn.Sequential(nn.Linear(2 * dim + 1, hidden), nn.LayerNorm(hidden), nn.GELU())
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=0.1,
                                           activation='gelu', batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers=layers)
        self.residual_head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden // 2), nn.GELU(),
                                           nn.Dropout(0.1), nn.Linear(hidden // 2, 1), nn.Tanh())
        self.residual_scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, img, txt, coarse):
        x = self.transformer(self.input_proj(torch.cat([img, txt, coarse], dim=1)).unsqueeze(1)).squeeze(1)
        return torch.clamp(coarse + self.residual_scale * self.residual_head(x), 0.0, 1.0)


class BaselineCopy(nn.Module):
    """baseline.py's BaselineCLIPScore as main() builds and calls it (forward keyword switches at
    their defaults): the heads its forward uses, plus a selection of those it builds and never uses
    (named as in the original, so the importer has to drop them)."""

    def __init__(self, hf_model, residual=True, refinement=None, rs_q=0.2, rs_c=0.2):
        super().__init__()
        self.clip = hf_model
        dim = hf_model.config.projection_dim
        v_dim = hf_model.config.vision_config.hidden_size
        self.residual, self.rs_q, self.rs_c = residual, rs_q, rs_c
        if residual:
            self.q_base_head = nn.Linear(dim, 1)
            self.q_delta_head = nn.Sequential(nn.Linear(dim, 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, 1),
                                              nn.Tanh())
            self.quality_gate = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, 1),
                                              nn.Sigmoid())
            self.c_base_scale = nn.Parameter(torch.tensor(1.0))
            self.c_base_bias = nn.Parameter(torch.tensor(0.0))
            self.c_delta_head = nn.Sequential(nn.LayerNorm(dim * 2 + 1), nn.Linear(dim * 2 + 1, 256), nn.GELU(),
                                              nn.Dropout(0.1), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 1),
                                              nn.Tanh())
            self.moe_experts = nn.ModuleList([nn.Sequential(nn.LayerNorm(dim * 2 + 1), nn.Linear(dim * 2 + 1, 128),
                                                            nn.GELU(), nn.Linear(128, 1)) for _ in range(2)])
            self.moe_gate = nn.Sequential(nn.LayerNorm(dim * 2 + 1), nn.Linear(dim * 2 + 1, 2))
            self.ext_inter_proj = nn.Sequential(nn.LayerNorm(4 * dim + 2), nn.Linear(4 * dim + 2, 256))
            self.res_seq_proj_img = nn.Linear(v_dim, dim, bias=False)
            self.tp_score_head = nn.Sequential(nn.LayerNorm(dim * 2 + 2), nn.Linear(dim * 2 + 2, 128))
            self.delta_gate_mlp = nn.Sequential(nn.LayerNorm(dim * 2 + 1), nn.Linear(dim * 2 + 1, 128), nn.GELU())
            self.delta_gate_heads = nn.ModuleDict({k: nn.Linear(128, 1) for k in ('mlp', 'cross', 'ext', 'tp')})
        else:
            self.q_head = nn.Linear(dim, 1)
            self.c_scale = nn.Parameter(torch.tensor(5.0))
            self.c_bias = nn.Parameter(torch.tensor(0.0))
            self.filip_scale = nn.Parameter(torch.tensor(5.0))
            self.filip_bias = nn.Parameter(torch.tensor(0.0))
            self.seq_proj_img = nn.Linear(v_dim, dim, bias=False)
            self.c_head = nn.Sequential(nn.LayerNorm(dim * 2 + 1), nn.Linear(dim * 2 + 1, 256), nn.GELU(),
                                        nn.Linear(256, 1))
        self.rationale_head = nn.Sequential(nn.LayerNorm(dim * 2 + 1), nn.Linear(dim * 2 + 1, dim))
        self.img_adapter = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim // 2))
        self.film_gamma = nn.Linear(dim, dim)
        self.refinement_module = RefinementCopy(dim, **refinement) if refinement else None

    def forward(self, px, ids, mask):
        out = self.clip(pixel_values=px, input_ids=ids, attention_mask=mask, return_dict=True)
        img_g = F.normalize(out.image_embeds, dim=-1)
        txt_g = F.normalize(out.text_embeds, dim=-1)
        sim = (img_g * txt_g).sum(-1, keepdim=True)
        fused = torch.cat([img_g, txt_g, sim], dim=1)
        if self.residual:
            q = torch.clamp(torch.sigmoid(self.q_base_head(img_g)) + 1.0 * self.q_delta_head(img_g) * self.rs_q,
                            0.0, 1.0)
            c_base = torch.clamp(self.c_base_scale * ((sim + 1.0) / 2.0) + self.c_base_bias, 0.0, 1.0)
            c_delta_mlp = self.c_delta_head(fused)
            g = torch.sigmoid(self.delta_gate_heads['mlp'](self.delta_gate_mlp(fused)))   # the delta mixer
            c_delta_raw = (g / torch.clamp(g, min=1e-6)) * c_delta_mlp
            c = torch.clamp(c_base + c_delta_raw * self.rs_c * 1.0, 0.0, 1.0)
        else:
            q = torch.sigmoid(self.q_head(img_g))
            c = torch.sigmoid(self.c_head(fused))
            if self.refinement_module is not None:
                c = self.refinement_module(img_g, txt_g, c)
        return q, c


def baseline_copy(residual=True, refinement=None, seed=3):
    # towers with 64-wide heads (OpenAI's), so a bare state_dict describes them fully; embed_dim,
    # context and vocabulary of our 'nano' model, whose heads then have the right sizes
    hf = tiny_hf(seed=seed, text_width=64, text_heads=1, vision_width=128, vision_heads=2, vocab=49408,
                 context=32, image=64, patch=16, projection=64)
    model = BaselineCopy(hf, residual=residual, refinement=refinement).eval()
    with torch.no_grad():   # trained-looking heads: scale and bias off their initial 1 and 0
        for name, p in model.named_parameters():
            if not name.startswith('clip.'):
                p.add_(0.05 * torch.randn_like(p))
    return model


def our_model(backbone, heads, config):
    kw = {k: config[k] for k in ('residual', 'use_two_branch', 'use_refinement', 'residual_scale_q',
                                 'residual_scale_c', 'refinement_layers', 'refinement_heads',
                                 'refinement_dim') if k in config}
    # the imported architecture and activation, built from the config the importer read
    model = models_clip.ClipQualityModel('custom', pretrained=False, clip_config=config['clip_config'], **kw)
    assert model.config['quick_gelu'] == config['clip_config']['quick_gelu']
    model.load_state_dict({**{'clip.' + k: v for k, v in backbone.items()}, **heads}, strict=True)
    return model.eval()


def assert_same_scores(original, backbone, heads, config):
    px, (ids, mask) = pixels(4, 64), token_ids(4, 32, 49408)
    with torch.no_grad():
        q_ref, c_ref = original(px, ids, mask)
        out = our_model(backbone, heads, config)(px, ids)
    assert 0.0 < c_ref.min() and c_ref.max() < 1.0 and q_ref.std() > 0   # not all clamped
    assert (out['q'] - q_ref.squeeze(1)).abs().max().item() < TOL_SCORE
    assert (out['c'] - c_ref.squeeze(1)).abs().max().item() < TOL_SCORE


def save_like_baseline(model, folder):
    """Both files baseline.py writes on a new best: the bare state_dict and the full checkpoint
    (best_sc from scipy's spearmanr: a numpy.float64)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5)   # one step, so the optimizer has state
    sched = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=10)
    model(pixels(2, 64), *token_ids(2, 32, 49408))[1].sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    best = os.path.join(folder, 'baseline_residual_best.pt')
    torch.save(model.state_dict(), best)
    full = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'scheduler': sched.state_dict(),
            'epoch': 3, 'best_sc': np.float64(0.7321), 'timestamp': '2025-01-01T00:00:00'}
    paths = [best]
    for name in ('baseline_last.pt', 'baseline_best.pt'):   # save_checkpoint() writes both
        paths.append(os.path.join(folder, name))
        torch.save(full, paths[-1])
    return paths


def test_baseline_residual_files_give_the_original_q_and_c(tmp_path):
    original = baseline_copy()
    paths = save_like_baseline(original, str(tmp_path))
    original.eval()
    for path in paths:
        backbone, heads, config, notes = hf_import.import_baseline_checkpoint(path)
        assert config['residual'] and not config['use_refinement'] and config['clip_config']['quick_gelu']
        assert config['clip_model'] is None     # a tiny model, none of the named ones
        assert set(heads) == {k for k in original.state_dict() if k.split('.')[0] in
                              ('q_base_head', 'q_delta_head', 'c_base_scale', 'c_base_bias', 'c_delta_head',
                               'rationale_head')}
        dropped = next(n for n in notes if n.startswith('dropped'))
        for name in ('quality_gate', 'moe_experts', 'delta_gate_heads', 'ext_inter_proj', 'img_adapter'):
            assert name in dropped
        assert_same_scores(original, backbone, heads, config)
    assert any('optimizer state not carried over' in n for n in notes)
    assert any('0.7321' in n and '3 epochs' in n for n in notes)


def test_baseline_refinement_file_maps_refinement_module(tmp_path):
    original = baseline_copy(residual=False, refinement=dict(hidden=32, layers=2, heads=4))
    path = str(tmp_path / 'baseline_refinement_best.pt')
    torch.save(original.state_dict(), path)
    backbone, heads, config, notes = hf_import.import_baseline_checkpoint(path, refinement_heads=4)
    assert not config['residual'] and config['use_refinement'] and not config['use_two_branch']
    assert (config['refinement_layers'], config['refinement_dim']) == (2, 32)
    assert 'refinement.residual_scale' in heads and not any(k.startswith('refinement_module') for k in heads)
    assert any('use_two_branch' in n for n in notes)
    assert any('refinement heads not in the weights: 4 used' in n for n in notes)
    assert_same_scores(original, backbone, heads, config)


def test_numpy1_scalar_in_a_checkpoint_loads_with_weights_only(tmp_path):
    """A file written under numpy 1 names the scalar reconstructor numpy.core.multiarray.scalar."""
    buf = io.BytesIO()
    torch.save({'model': {'x': torch.ones(1)}, 'best_sc': np.float64(0.5)}, buf,
               _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    for name, data in (('numpy2', raw), ('numpy1', raw.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))):
        path = tmp_path / f'{name}.pt'
        path.write_bytes(data)
        assert float(hf_import.load_checkpoint_file(str(path))['best_sc']) == 0.5


# --------------------------------------------------------------------------- c. HF folders
@pytest.mark.parametrize('layout', ['safetensors', 'sharded', 'bin'])
def test_local_hf_folder_loads(tmp_path, layout):
    hf = tiny_hf()
    if layout == 'bin':   # how older transformers versions (and the OpenAI hub folders) store it
        hf.config.save_pretrained(str(tmp_path))
        torch.save(hf.state_dict(), tmp_path / 'pytorch_model.bin')
    else:
        hf.save_pretrained(str(tmp_path), max_shard_size='200KB' if layout == 'sharded' else '5GB')
    names = os.listdir(tmp_path)
    assert (sum(n.endswith(('.safetensors', '.bin')) for n in names) > 1) == (layout == 'sharded')
    for path in [str(tmp_path)] + [str(tmp_path / n) for n in names if n.endswith(('.safetensors', '.bin'))][:1]:
        if layout == 'sharded' and path != str(tmp_path):
            continue   # one shard alone is not a model
        sd, config = hf_import.load_hf_folder(path)
        assert config['text_cfg']['heads'] == 4    # config.json beside the weights was read
        clip = hf_import.build_open_clip(config)
        clip.load_state_dict(sd, strict=True)
        assert_same_features(hf, clip, image=32, context=16, vocab=1000)


# --------------------------------------------------------------------------- d. errors
def test_unknown_keys_are_named():
    sd = dict(tiny_hf().state_dict())
    sd['vision_model.extra_adapter.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointImportError, match='vision_model.extra_adapter.weight'):
        hf_import.hf_to_open_clip(sd)


def test_non_clip_files_are_refused_with_their_name(tmp_path):
    swin = tmp_path / 'hyperiqa_best.pt'
    torch.save({'hypernet.conv1.weight': torch.zeros(2, 2)}, swin)
    with pytest.raises(CheckpointImportError, match=r'hyperiqa_best\.pt.*no clip\.\* keys'):
        hf_import.import_baseline_checkpoint(str(swin))
    with pytest.raises(CheckpointImportError, match=r'hyperiqa_best\.pt.*not a Hugging Face CLIPModel'):
        hf_import.load_hf_folder(str(swin))
    baseline = tmp_path / 'baseline_last.pt'
    torch.save({'model': baseline_copy().state_dict(), 'epoch': 1}, baseline)
    with pytest.raises(CheckpointImportError, match=r'baseline_last\.pt: a baseline\.py checkpoint'):
        hf_import.load_hf_folder(str(baseline))
    pickled = tmp_path / 'code.pt'
    torch.save({'model': {}, 'thing': torch.optim.lr_scheduler.LambdaLR}, pickled)
    with pytest.raises(CheckpointImportError, match=r'code\.pt: cannot be read as a weights file'):
        hf_import.load_checkpoint_file(str(pickled))
    empty = tmp_path / 'empty_folder'
    empty.mkdir()
    with pytest.raises(CheckpointImportError, match='empty_folder: no model.safetensors'):
        hf_import.load_hf_folder(str(empty))


def test_heads_of_unsupported_switches_and_stray_keys_are_refused():
    sd = dict(baseline_copy().state_dict())
    with pytest.raises(CheckpointImportError, match='--use_confidence_gate'):
        hf_import.import_baseline_checkpoint({**sd, 'conf_gate.1.weight': torch.zeros(1)})
    with pytest.raises(CheckpointImportError, match='my_new_head.weight'):
        hf_import.import_baseline_checkpoint({**sd, 'my_new_head.weight': torch.zeros(1)})


# --------------------------------------------------------------------------- e. named models
def _hf_named_config(name):
    if name == 'ViT-L/14':
        return hf_config(text_width=768, text_heads=12, vision_width=1024, vision_heads=16, vocab=49408,
                         context=77, image=224, patch=14, projection=768, layers=12), 24
    patch = 32 if name == 'ViT-B/32' else 16
    return hf_config(text_width=512, text_heads=8, vision_width=768, vision_heads=12, vocab=49408, context=77,
                     image=224, patch=patch, projection=512, layers=12), 12


@pytest.mark.parametrize('name', ['ViT-B/32', 'ViT-B/16', 'ViT-L/14'])
def test_named_models_are_recognised_and_built_with_quickgelu(name):
    import open_clip
    config, vision_layers = _hf_named_config(name)
    config.vision_config.num_hidden_layers = vision_layers
    config.vision_config.intermediate_size = 4 * config.vision_config.hidden_size
    config.text_config.intermediate_size = 4 * config.text_config.hidden_size
    with torch.device('meta'):   # shapes only: nothing allocated, nothing downloaded
        hf_sd = CLIPModel(config).state_dict()
        oc_name = hf_import.openai_model_name(name)
        model = open_clip.create_model(oc_name, pretrained=None, device='meta')
        plain = open_clip.create_model(hf_import.OPENAI_MODELS[name], pretrained=None, device='meta')
    clip_config = hf_import.open_clip_config_from_hf(hf_sd)    # a bare state_dict: no config at all
    assert hf_import.named_model(clip_config) == name
    assert oc_name == hf_import.OPENAI_MODELS[name] + '-quickgelu'
    converted = hf_import.hf_to_open_clip(hf_sd)
    expected = model.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    for tower in (model.visual.transformer, model.transformer):
        assert isinstance(tower.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert not isinstance(plain.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_openai_model_name_refuses_models_without_openai_weights():
    assert hf_import.openai_model_name('openai/clip-vit-large-patch14') == 'ViT-L-14-quickgelu'
    with pytest.raises(ValueError, match='nano'):
        hf_import.openai_model_name('nano')
