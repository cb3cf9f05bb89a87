"""Checks of ldifs.py and eval.py on a tiny CLIP and synthetic images, offline, on 2 CPU cores."""

import copy
import dataclasses
import importlib.metadata
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models import register_model
from timm.models.convnext import ConvNeXt
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

import eval as evaluation
import ldifs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def no_gpu_but_for_the_cuda_tests(request, monkeypatch):
    """The checks compare CPU runs; the CUDA tests and the benchmarks pick the GPU themselves."""
    if not request.node.name.startswith(("test_cuda_", "test_bench_")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True, scope="session")
def a_cache_of_their_own_and_short_probes(tmp_path_factory):
    """One feature cache for the session, not the user's; and the release's probe with 30
    steps, not 1000, wherever a check does not check the probe itself (those set it back)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDIFS_CACHE", cache)
        patch.setattr(ldifs, "CACHE_DIR", cache)
        patch.setattr(ldifs, "PROBE_STEPS", 30)
        yield


@pytest.fixture
def full_probe(monkeypatch):
    monkeypatch.setattr(ldifs, "PROBE_STEPS", 1000)


def run_env(flags):
    """The environment of a run the checks start: the GPUs hidden unless the flags name one."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not any(str(flag).startswith("cuda") for flag in flags):
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_cli(*flags, script="ldifs.py", launcher=()):
    """A script in a process of its own, for what only a process shows (signals, torchrun)."""
    command = [sys.executable, *launcher, str(HERE / script), *map(str, flags)]
    return subprocess.run(command, capture_output=True, text=True, env=run_env(flags), cwd=HERE)


def run_main(module, argv, capsys):
    """The script's main() in this process (no 4 s import): (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        module.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


TINY = ["--task", "synthetic", "--workers", "0"]
FOLDER = ["--model", ldifs.TINY_CLIP, "--pretrained", "none", "--lr", "1e-3", "--warmup", "10"]
FOLDER += ["--batch-size", "8"]  # the tiny CLIP's recipe, for a folder of a few images


def said(err):
    """The lines a person reads on stderr: the progress bars' redraws left out."""
    lines = [line.split("\r")[-1] for line in err.splitlines()]
    return [line for line in lines if line.strip() and not re.search(r"\d+/\d+ \[\d", line)]


def train_tiny(out, capsys, *flags, steps=12):
    """A short synthetic run in this process; its metrics.json."""
    argv = [*TINY, "--max-steps", steps, "--out", out, *flags]
    code, _, err = run_main(ldifs, argv, capsys)
    assert code == 0, err
    return json.loads((Path(out) / "metrics.json").read_text())


def tiny_args(tmp_path, *flags):
    args = ldifs.parse_args([*TINY, "--out", str(tmp_path), *map(str, flags)])
    ldifs.resolve_args(args)
    return args


def tiny_setup(tmp_path, *flags, steps=8):
    """The pieces of a run, with a zero-shot head so CE starts high and has room to fall."""
    args = tiny_args(tmp_path, "--head", "zs", "--log-every", "1", *flags)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    clip, train_tf, _ = ldifs.load_clip(args.model, args.pretrained, args.device)
    task = ldifs.TASKS["synthetic"]
    taps = tuple(ldifs.default_tap_names(clip.visual))
    stage = ldifs.Stage(task, 0, (task.name,), args.out, task.epochs, steps, taps)
    reference = ldifs.frozen_copy(clip.visual)
    tokenizer = open_clip.get_tokenizer(args.model)
    head = ldifs.zero_shot_head(clip, tokenizer, task.classnames, task.templates, args.device)
    classifier = ldifs.ImageClassifier(clip.visual, head)
    train = ldifs.get_dataset("synthetic", "train", args.data_root)
    return args, stage, classifier, reference, ldifs.Transformed(train, train_tf, args.seed)


def fit(args, stage, classifier, reference, data):
    """ldifs.train from step 0 with a fresh optimizer, in this process."""
    optimizer = ldifs.make_optimizer(classifier.parameters(), args)
    init_head = {k: v.detach().clone() for k, v in classifier.head.state_dict().items()}
    return ldifs.train(classifier, reference, data, None, optimizer, init_head, 0, stage, args)


def strict_json(text):
    """json.loads that refuses NaN and Infinity, as JSON itself (and jq, and JS) do."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def read_log(out):
    return [strict_json(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def weights_of(out, name="open_clip_pytorch_model.bin"):
    return torch.load(Path(out) / name, weights_only=True)


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


# ------------------------------------------------------------------ the regulariser


def test_distance_is_zero_for_identical_taps():
    taps = [torch.randn(4, 7, 16), torch.randn(4, 7, 16)]
    assert ldifs.ldifs_distance(taps, [t.clone() for t in taps]).item() == 0.0


def test_distance_equals_closed_form_on_tokens():
    B, T, C = 3, 11, 24
    taps = [torch.randn(B, T, C, dtype=torch.float64) for _ in range(5)]
    refs = [torch.randn(B, T, C, dtype=torch.float64) for _ in range(5)]
    cos = torch.stack([F.cosine_similarity(h, h0, dim=1) for h, h0 in zip(taps, refs, strict=True)])
    closed_form = (2 / T) * (1 - cos).mean()  # cos: (5, B, C), over the token axis
    assert torch.allclose(ldifs.ldifs_distance(taps, refs), closed_form, rtol=1e-5)


def test_distance_normalises_over_tokens_not_channels():
    """Scaling one channel across all tokens changes nothing when each channel is normalised
    over tokens (dim 1), but would change a per-token (last-dim) norm."""
    h, h0 = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    scaled = h.clone()
    scaled[:, :, 3] *= 50
    assert torch.allclose(ldifs.ldifs_distance([scaled], [h0]), ldifs.ldifs_distance([h], [h0]))
    per_token = lambda x: ((F.normalize(x, dim=-1) - F.normalize(h0, dim=-1)) ** 2).mean()  # noqa: E731
    assert not torch.allclose(per_token(scaled), per_token(h))


def test_distance_on_conv_maps_matches_lpips_style_reference():
    h, h0 = torch.randn(2, 6, 5, 4), torch.randn(2, 6, 5, 4)
    u = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    u0 = h0 / (h0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    expected = ((u - u0) ** 2).mean(dim=(1, 2, 3)).mean()
    assert torch.allclose(ldifs.ldifs_distance([h], [h0]), expected)


def test_distance_keeps_float64_and_upcasts_bfloat16():
    h, h0 = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    assert ldifs.ldifs_distance([h], [h0]).dtype == torch.float64
    assert ldifs.ldifs_distance([h.bfloat16()], [h0.bfloat16()]).dtype == torch.float32


def test_distance_averages_taps_then_batch():
    a, b, c, d = (
        torch.randn(2, 3, 4),
        torch.randn(2, 3, 4),
        torch.randn(2, 5, 4),
        torch.randn(2, 5, 4),
    )
    separate = (ldifs.ldifs_distance([a], [b]) + ldifs.ldifs_distance([c], [d])) / 2
    assert torch.allclose(ldifs.ldifs_distance([a, c], [b, d]), separate)


def test_the_regulariser_runs_copied_into_a_file_that_imports_torch_alone():
    """README: ldifs_distance and recorded_taps depend on torch alone; copy them. Copied with
    `import contextlib, torch` and nothing of ldifs.py, they give ldifs.py's values."""
    copied = {}
    source = "\n\n".join(inspect.getsource(f) for f in (ldifs.ldifs_distance, ldifs.recorded_taps))
    exec("import contextlib\n\nimport torch\n\n" + source, copied)
    nhwc = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
    with copied["recorded_taps"](nhwc, ["0", "1"], channels_last=True) as taps:
        nhwc(torch.randn(2, 5, 4, 3))  # (B, H, W, C)
    assert [tuple(t.shape) for t in taps.values()] == [(2, 3, 5, 4)] * 2
    h, h0 = [torch.randn(2, 7, 6)] * 2, [torch.randn(2, 7, 6)] * 2
    assert copied["ldifs_distance"](h, h0).item() == ldifs.ldifs_distance(h, h0).item() > 0


def readme_python_block(heading):
    """The first ```python block after `heading` in README.md."""
    after = (HERE / "README.md").read_text().split(heading, 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_training_loop_runs_as_written_and_trains_with_the_ldifs_term():
    """Users copy this loop. On a 12-block ViT, whose default taps are the ones it names, it
    moves the encoder, keeps the reference at the start, and adds lam * D to the CE."""
    torch.manual_seed(0)
    encoder = open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=8, width=32, layers=12, heads=2, mlp_ratio=2.0, output_dim=16
    )
    start = copy.deepcopy(encoder.state_dict())
    head = torch.nn.Linear(16, 3)
    loop = dict(encoder=encoder, head=head, lam=10.0, torch=torch, F=F)
    loop["loader"] = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))] * 3
    loop["optimizer"] = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-3)
    exec(readme_python_block("## The regulariser in your own training loop"), loop)
    assert loop["names"] == ldifs.default_tap_names(encoder)
    assert same_weights(start, loop["reference"].state_dict())
    assert not same_weights(start, encoder.state_dict())
    assert (loop["loss"] - loop["ce"]).item() > 0  # the last step's lam * D, once f has moved


def test_vit_taps_are_ln_pre_and_quarter_blocks_batch_first():
    clip, _, _ = ldifs.load_clip(ldifs.TINY_CLIP, "none")
    names = ldifs.default_tap_names(clip.visual)
    assert names == ["ln_pre"] + [f"transformer.resblocks.{i}" for i in (0, 1, 2, 3)]
    with ldifs.recorded_taps(clip.visual, names) as taps:
        clip.visual(torch.randn(3, 3, 32, 32))
    assert [tuple(t.shape) for t in taps.values()] == [(3, 17, 64)] * 5  # (B, 1 + 4x4, width)
    clip.visual(torch.randn(2, 3, 32, 32))
    assert taps["ln_pre"].shape[0] == 3  # the hooks are gone after the block


def test_vit_b32_taps_after_blocks_3_6_9_12_and_resnet_taps_stem_and_layers():
    vit, resnet = (open_clip.get_model_config(name) for name in ("ViT-B-32", "RN50"))
    with torch.device("meta"):  # no memory, no weights
        vit = open_clip.model._build_vision_tower(vit["embed_dim"], vit["vision_cfg"])
        resnet = open_clip.model._build_vision_tower(resnet["embed_dim"], resnet["vision_cfg"])
        names = ldifs.default_tap_names(resnet)
        with ldifs.recorded_taps(resnet, names) as taps:
            resnet.eval()(torch.empty(1, 3, 224, 224))
    assert ldifs.default_tap_names(vit)[1:] == [f"transformer.resblocks.{i}" for i in (2, 5, 8, 11)]
    assert [t.shape[1] for t in taps.values()] == [64, 256, 512, 1024, 2048]


def tower_kinds():
    """One open_clip image tower config of each kind: open_clip's ViT (CoCa's too) and
    ModifiedResNet, and each timm family (SigLIP's ViT, EVA, ConvNeXt, FastViT, Swin...)."""
    kinds = {}
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name)["vision_cfg"]
        timm, coca = config.get("timm_model_name", ""), config.get("attentional_pool", False)
        resnet = isinstance(config.get("layers"), list)
        kind = f"timm {timm.split('_')[0]}" if timm else "resnet" if resnet else f"vit {coca}"
        kinds.setdefault(kind, (name, open_clip.get_model_config(name)["embed_dim"], config))
    return list(kinds.values())


@pytest.mark.parametrize("name, embed_dim, vision_cfg", tower_kinds())
def test_default_taps_for_every_kind_of_open_clip_image_tower(name, embed_dim, vision_cfg):
    """The stem and at least 4 stages or quarter blocks, each seen by the forward pass, batch
    first, (B, C, H, W) for maps (Swin's channels-last ones moved); the embedding is what the
    head and the probes see."""
    size = vision_cfg.get("image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    with torch.device("meta"):  # no memory, no weights
        tower = open_clip.model._build_vision_tower(embed_dim, vision_cfg)
        names = ldifs.default_tap_names(tower)
        nhwc = getattr(getattr(tower, "trunk", tower), "output_fmt", "") == "NHWC"
        with ldifs.recorded_taps(tower, names, nhwc) as taps:
            embedding = ldifs.image_embedding(tower, torch.empty(2, 3, *size))
    assert embedding.shape == (2, embed_dim)
    assert len(names) >= 5 and all(t is not None for t in taps.values())
    for t in taps.values():
        assert t.shape[0] == 2 and t.dim() in (3, 4)
        if t.dim() == 4:  # the spatial dims are last
            assert size[0] % t.shape[2] == 0 and size[1] % t.shape[3] == 0, t.shape


def test_coca_towers_classify_and_probe_on_their_embedding_not_their_tokens():
    """CoCa's image towers return (embedding, tokens); its encode_image uses the embedding."""

    class TokensToo(torch.nn.Module):
        def forward(self, x):
            return x, x[:, None].expand(-1, 7, -1)

    data = [(torch.randn(3), k) for k in range(5)]
    args = types.SimpleNamespace(workers=0, eval_batch_size=2, device=torch.device("cpu"))
    x, y = ldifs.extract_features(TokensToo(), data, args)
    assert torch.allclose(x, F.normalize(torch.stack([d[0] for d in data]), dim=-1))
    assert y.tolist() == [0, 1, 2, 3, 4]
    logits = ldifs.ImageClassifier(TokensToo(), torch.nn.Linear(3, 2))(torch.randn(4, 3))
    assert logits.shape == (4, 2)


def test_recorded_taps_take_the_first_tensor_of_a_tuple_output():
    class HuggingFaceStyleLayer(torch.nn.Module):
        def forward(self, x):
            return (2 * x, "attention weights")

    encoder = torch.nn.Sequential()
    encoder.add_module("layer", HuggingFaceStyleLayer())
    x = torch.randn(2, 3, 4)
    with ldifs.recorded_taps(encoder, ["layer"]) as taps:
        encoder.layer(x)
    assert torch.equal(taps["layer"], 2 * x)


def test_a_tower_without_default_taps_names_its_submodules_for_taps():
    tower = torch.nn.Sequential()
    tower.add_module("features", torch.nn.Conv2d(3, 4, 3))
    tower.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ldifs.UsageError, match="name some of features, pool with --taps"):
        ldifs.default_tap_names(tower)


def test_the_frozen_reference_keeps_its_batch_norm_statistics():
    """Frozen in eval mode: a tower with batch norm (RN50) would otherwise update its running
    statistics on every batch it sees, and drift from the pre-trained model."""
    tower = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    reference = ldifs.frozen_copy(tower)
    before = copy.deepcopy(reference.state_dict())
    reference(torch.randn(8, 3, 6, 6) + 5)
    assert same_weights(before, reference.state_dict()) and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())


# ------------------------------------------------------------------ training


def count_forwards(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_training_moves_the_encoder_once_a_step_and_never_the_reference(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, steps=4)
    before, encoder_before = (copy.deepcopy(m.state_dict()) for m in (reference, classifier))
    trainable, frozen = count_forwards(classifier.visual), count_forwards(reference)
    fit(args, stage, classifier, reference, data)
    assert len(trainable) == 4 and len(frozen) == 4  # one pass each a step
    assert all(p.grad is None for p in reference.parameters())
    assert same_weights(before, reference.state_dict())
    assert not same_weights(encoder_before, classifier.state_dict())


def test_lam_zero_never_runs_the_reference(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, "--lam", "0", steps=4)
    frozen = count_forwards(reference)
    fit(args, stage, classifier, reference, data)
    assert frozen == [] and all(r["loss/ldifs"] == 0 for r in read_log(stage.out))


def test_ce_falls_and_log_lines_are_strict_json_with_null_for_an_unmeasured_rate(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, "--lam", "0", steps=12)
    fit(args, stage, classifier, reference, data)
    log = read_log(stage.out)
    ce = [r["loss/ce"] for r in log]
    assert sum(ce[-3:]) / 3 < 0.5 * sum(ce[:3]) / 3
    rates = [r["images_per_second"] for r in log]  # the clock starts after two steps
    assert rates[:2] == [None, None] and all(rate > 0 for rate in rates[2:])
    assert [r["step"] for r in log] == list(range(1, 13))


def test_ldifs_term_is_zero_at_step_zero_and_lam_times_d_is_logged(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, steps=3)
    images = data.finish(torch.stack([data[i][0] for i in range(8)]))
    labels = torch.tensor([data[i][1] for i in range(8)])
    with (
        ldifs.recorded_taps(classifier.visual, stage.taps) as taps,
        ldifs.recorded_taps(reference, stage.taps) as ref_taps,
    ):
        batch = (images, labels, None)
        ce, distance = ldifs.ldifs_loss(classifier, reference, taps, ref_taps, batch, args)
    # not bitwise 0: the frozen copy's attention may take torch's fused inference path
    assert abs(distance.item()) < 1e-10 and ce.item() > 0
    fit(args, stage, classifier, reference, data)
    last = read_log(stage.out)[-1]
    assert last["ldifs_distance"] > 0 and last["loss/ldifs"] == pytest.approx(
        10 * last["ldifs_distance"]
    )


def test_label_smoothing_is_torchs_in_the_training_loss(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(
        tmp_path, "--label-smoothing", "0.2", steps=1
    )
    batch = next(ldifs.step_batches(len(data), args.batch_size, args.seed, 0, 1))
    images = data.finish(torch.stack([data[i][0] for i in batch]))
    labels = torch.tensor([data[i][1] for i in batch])
    with torch.no_grad():
        logits = copy.deepcopy(classifier)(images)
    fit(args, stage, classifier, reference, data)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.2).item()
    assert read_log(stage.out)[0]["loss/ce"] == pytest.approx(expected, rel=1e-5)
    assert abs(F.cross_entropy(logits, labels).item() - expected) > 1e-3


def test_flyp_is_open_clips_clip_loss_and_flyp_ce_scores_one_prompt_per_class():
    """FLYP: CLIP's contrastive loss on the batch's normalised embeddings, the logit scale a
    constant; FLYP-CE: CE of logit_scale.exp() times the cosines to one prompt per class."""
    torch.manual_seed(0)
    clip, _, _ = ldifs.load_clip(ldifs.TINY_CLIP, "none")
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    prompts = open_clip.get_tokenizer(ldifs.TINY_CLIP)([f"a photo of {k}." for k in range(6)])
    image = clip.encode_image(images, normalize=True)
    text, scale = clip.encode_text(prompts, normalize=True), clip.logit_scale.exp()
    args = types.SimpleNamespace(loss="flyp", label_smoothing=0.0)
    flyp = ldifs.fine_tuning_loss(clip, images, labels, prompts, args, open_clip.ClipLoss())
    assert flyp.item() == pytest.approx(open_clip.ClipLoss()(image, text, scale).item(), rel=1e-6)
    flyp.backward()
    assert clip.logit_scale.grad is None and clip.text_projection.grad.abs().sum() > 0
    args.label_smoothing = 0.2  # smooths both directions' cross-entropy
    smoothed = ldifs.fine_tuning_loss(clip, images, labels, prompts, args, open_clip.ClipLoss())
    logits, targets = scale * image @ text.T, torch.arange(6)
    both = F.cross_entropy(logits, targets, label_smoothing=0.2)
    both += F.cross_entropy(logits.T, targets, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(both.item() / 2, rel=1e-5)
    args.loss, args.label_smoothing = "flyp-ce", 0.0
    per_class = ldifs.fine_tuning_loss(clip, images, labels, prompts[:3], args)
    expected = F.cross_entropy(scale * image @ text[:3].T, labels)
    assert per_class.item() == pytest.approx(expected.item(), rel=1e-6)
    per_class.backward()
    assert clip.logit_scale.grad.abs() > 0  # FLYP-CE trains it


def test_flyp_prompts_name_each_images_class_vary_by_step_and_are_drawn_again_on_resume():
    names, templates = ("cat", "dog", "eel"), ldifs.PHOTO_TEMPLATES
    tokens = ldifs.prompt_tokens(names, templates, ldifs.TINY_CLIP)
    tokenize = open_clip.get_tokenizer(ldifs.TINY_CLIP)
    args = types.SimpleNamespace(loss="flyp", seed=0, batch_size=8, device=torch.device("cpu"))
    one, labels = (
        types.SimpleNamespace(rank=0, world_size=1),
        torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
    )
    drawn = [ldifs.step_prompts(tokens, labels, step, one, args) for step in (0, 1, 1)]
    for prompt, label in zip(drawn[0], labels, strict=True):
        assert any(torch.equal(prompt, tokenize(t.format(names[label]))[0]) for t in templates)
    assert not torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[1], drawn[2])
    for rank in (0, 1):  # two ranks draw, for their share of the batch, one process's prompts
        ranks = types.SimpleNamespace(rank=rank, world_size=2)
        shared = ldifs.step_prompts(tokens, labels[rank::2], 1, ranks, args)
        assert torch.equal(shared, drawn[1][rank::2])
    args.loss = "flyp-ce"
    per_class = ldifs.step_prompts(tokens, None, 0, one, args)
    assert all(
        any(torch.equal(prompt, tokenize(t.format(name))[0]) for t in templates)
        for prompt, name in zip(per_class, names, strict=True)
    )


def test_gradients_are_clipped_to_grad_clip(tmp_path, monkeypatch):
    """The release clips the gradient norm to 1.0: every step's norm after clipping is at most
    --grad-clip (here small enough to bind)."""
    args, stage, classifier, reference, data = tiny_setup(tmp_path, "--grad-clip", "0.01", steps=3)
    norms, clip = [], torch.nn.utils.clip_grad_norm_

    def clipped(parameters, max_norm):
        parameters = list(parameters)
        before = clip(parameters, max_norm)
        norms.append(
            (before.item(), torch.cat([p.grad.flatten() for p in parameters]).norm().item())
        )
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clipped)
    fit(args, stage, classifier, reference, data)
    assert len(norms) == 3
    assert all(before > 0.01 and after == pytest.approx(0.01, rel=1e-4) for before, after in norms)


def test_lam_reduces_feature_drift(tmp_path):
    def drift(lam):
        args, stage, classifier, reference, data = tiny_setup(
            tmp_path / lam, "--lam", lam, steps=15
        )
        fit(args, stage, classifier, reference, data)
        images = data.finish(torch.stack([data[i][0] for i in range(32)]))
        with (
            ldifs.recorded_taps(classifier.visual, stage.taps) as taps,
            ldifs.recorded_taps(reference, stage.taps) as ref_taps,
            torch.no_grad(),
        ):
            classifier.visual.eval()(images)
            reference(images)
        return ldifs.ldifs_distance(list(taps.values()), list(ref_taps.values())).item()

    assert drift("10") < 0.5 * drift("0")


def test_l2sp_term_is_zero_at_step_zero_and_keeps_weights_closer(tmp_path):
    distances = {}
    for alpha in ("0", "0.5"):
        args, stage, classifier, reference, data = tiny_setup(
            tmp_path / alpha, "--lam", "0", "--l2sp", alpha, steps=15
        )
        assert ldifs.l2sp_penalty(classifier.visual, reference).item() == 0.0
        fit(args, stage, classifier, reference, data)
        assert read_log(stage.out)[0]["loss/l2sp"] == 0.0  # at step 0, before any update
        distances[alpha] = ldifs.l2sp_penalty(classifier.visual, reference).item()
    assert distances["0.5"] < distances["0"], distances


def test_lr_schedule_warms_up_then_decays_to_zero_as_the_release():
    lrs = [ldifs.lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_the_training_loop_sets_the_scheduled_lr_and_logs_it(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, "--warmup", "4", steps=8)
    fit(args, stage, classifier, reference, data)
    logged = [r["lr"] for r in read_log(stage.out)]
    assert logged == pytest.approx([ldifs.lr_at(s, args.lr, 4, 8) for s in range(8)])


def test_a_warm_up_longer_than_the_run_is_warned_of(tmp_path, capsys):
    tasks = [ldifs.TASKS["synthetic"]]
    for steps, warned in [(9, True), (10, False)]:
        args = tiny_args(tmp_path, "--max-steps", str(steps), "--warmup", "10")
        ldifs.plan_stage(0, tasks, 2400, ["ln_pre"], (0, 1), args)
        assert ("lr never peaks" in capsys.readouterr().err) == warned


def test_checkpoints_come_every_save_every_steps_at_epoch_ends_and_last_with_0_those_alone(
    tmp_path,
):
    stage = types.SimpleNamespace(total_steps=25)  # 100 images, batch 10: 10 steps an epoch
    for every, expected in [("4", [4, 8, 10, 12, 16, 20, 24, 25]), ("0", [10, 20, 25])]:
        args = tiny_args(tmp_path, "--save-every", every, "--batch-size", "10")
        assert [
            s for s in range(1, 26) if ldifs.is_checkpoint_step(s, 100, stage, args)
        ] == expected


def test_a_run_from_step_zero_replaces_the_log_of_one_killed_before_its_checkpoint(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, steps=3)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss/ce": 9.9}\n{"step": 2}\n')
    fit(args, stage, classifier, reference, data)
    assert [line["step"] for line in read_log(tmp_path)] == [1, 2, 3]


def test_batches_depend_on_step_alone():
    full = list(ldifs.step_batches(100, 8, 0, 0, 30))
    assert list(ldifs.step_batches(100, 8, 0, 17, 30)) == full[17:]
    first_epoch = [i for b in full[:12] for i in b]  # 100 // 8 = 12 steps an epoch
    assert len(set(first_epoch)) == 96 and max(first_epoch) < 100
    assert min(i for b in full[12:24] for i in b) >= 100  # epoch 1 is encoded as 100 + image


def test_workers_uint8_images_finished_on_the_device_are_the_transforms_bitwise(tmp_path):
    """The workers hand over uint8 images; `finish` scales and normalises the batch. Together
    they give open_clip's transform of the same image (the train transform's with the same
    seeded crop), and leave the process's random state alone."""
    _, train_tf, eval_tf = ldifs.load_clip(ldifs.TINY_CLIP, "none")
    data = ldifs.get_dataset("synthetic", "train", tmp_path)
    augmented = ldifs.Transformed(data, train_tf, seed=3)
    state = torch.get_rng_state()
    crops = [augmented[5 * len(data) + i][0] for i in (7, 8)]  # epoch 5, images 7 and 8
    assert torch.equal(torch.get_rng_state(), state) and crops[0].dtype == torch.uint8
    expected = []
    for i in (7, 8):
        torch.manual_seed(hash((3, 5, i)))
        expected.append(train_tf(data[i][0]))
    assert torch.equal(augmented.finish(torch.stack(crops)), torch.stack(expected))
    assert not torch.equal(expected[0], train_tf(data[7][0]))  # the seed picked the crop
    test = ldifs.Transformed(data, eval_tf)
    assert torch.equal(test.finish(test[7][0][None]), eval_tf(data[7][0])[None])


def test_tf32_matmuls_are_on_in_training_alone(tmp_path, capsys, monkeypatch):
    """TF32 speeds up training's fp32 matmuls on CUDA; the probes' and zero-shot features stay
    in full fp32, as the release's. The flag is read on the CPU too, so this holds here."""
    seen = {"train": set(), "eval": set()}

    def spy(original, phase):
        def recording(*args, **kwargs):
            seen[phase].add(torch.backends.cuda.matmul.allow_tf32)
            return original(*args, **kwargs)

        return recording

    monkeypatch.setattr(ldifs, "ldifs_loss", spy(ldifs.ldifs_loss, "train"))
    monkeypatch.setattr(ldifs, "extract_features", spy(ldifs.extract_features, "eval"))
    train_tiny(tmp_path, capsys, "--warmup", "1", "--eval-tasks", "synthetic-stripes", steps=2)
    assert seen == {"train": {True}, "eval": {False}}
    assert not torch.backends.cuda.matmul.allow_tf32


# ------------------------------------------------------------------ runs and their outputs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short synthetic runs, lam 0 and lam 10, evaluated on the stripes task."""
    root = tmp_path_factory.mktemp("runs")
    for lam in ("0", "10"):
        ldifs.main([*TINY, "--lam", lam, "--max-steps", "12", "--out", str(root / f"lam{lam}")])
    return root


@pytest.fixture(scope="module")
def flyp_runs(tmp_path_factory):
    """Short FLYP and FLYP-CE runs, evaluated on the stripes task."""
    root = tmp_path_factory.mktemp("flyp")
    for loss in ("flyp", "flyp-ce"):
        flags = ["--loss", loss, "--lam", "0", "--max-steps", "12", "--out", str(root / loss)]
        ldifs.main([*TINY, *flags])
    return root


def pretrained_tiny_clip():
    """The random CLIP the synthetic runs start from: drawn by their --seed, 0."""
    torch.manual_seed(0)
    return ldifs.load_clip(ldifs.TINY_CLIP, "none")


def zero_shot_accuracy(clip, transform, task):
    args = types.SimpleNamespace(workers=0, eval_batch_size=256, device=torch.device("cpu"))
    tokenizer, task = open_clip.get_tokenizer(ldifs.TINY_CLIP), ldifs.TASKS[task]
    head = ldifs.zero_shot_head(clip, tokenizer, task.classnames, task.templates, "cpu")
    test = ldifs.get_dataset(task, "test", ldifs.DATA_ROOT, transform)
    return ldifs.probe_accuracy(head, *ldifs.extract_features(clip.visual, test, args)), head


def test_flyp_trains_both_towers_and_ce_leaves_the_text_tower_bitwise(two_runs, flyp_runs):
    start = pretrained_tiny_clip()[0].state_dict()
    text = {k: v for k, v in start.items() if not k.startswith("visual.") and k != "logit_scale"}
    for run in (two_runs / "lam0", flyp_runs / "flyp", flyp_runs / "flyp-ce"):
        weights = weights_of(run)
        assert not same_weights({k: start[k] for k in weights if k.startswith("visual.")}, weights)
        assert same_weights(text, weights) == (run.name == "lam0"), run
    scales = [weights_of(flyp_runs / loss)["logit_scale"] for loss in ("flyp", "flyp-ce")]
    assert scales[0] == start["logit_scale"] != scales[1]  # a constant in FLYP, trained in FLYP-CE


def test_a_flyp_run_is_scored_with_the_zero_shot_head_of_its_own_text_tower(flyp_runs):
    """Its target accuracy, head.pt and forgetting table's ZS columns, as the release's."""
    for loss in ("flyp", "flyp-ce"):
        out = flyp_runs / loss
        clip, _, transform = open_clip.create_model_and_transforms(f"local-dir:{out}")
        accuracy, head = zero_shot_accuracy(clip, transform, "synthetic")
        metrics, saved = json.loads((out / "metrics.json").read_text()), weights_of(out, "head.pt")
        assert accuracy == pytest.approx(metrics["test_accuracy"])
        assert torch.allclose(saved["weight"], head.weight, atol=1e-5)
        assert not torch.allclose(saved["weight"], saved["init_weight"], atol=1e-3)
        forgetting = metrics["forgetting"]["synthetic-stripes"]
        assert forgetting["zs_finetuned"] == pytest.approx(
            zero_shot_accuracy(clip, transform, "synthetic-stripes")[0]
        )
        assert forgetting["zs_pretrained"] == pytest.approx(
            zero_shot_accuracy(*pretrained_tiny_clip()[::2], "synthetic-stripes")[0]
        )


def test_a_frozen_head_keeps_its_init_while_the_encoder_trains(tmp_path, capsys):
    metrics = train_tiny(tmp_path, capsys, "--freeze-head", "--eval-tasks", "none", steps=4)
    head, start = weights_of(tmp_path, "head.pt"), pretrained_tiny_clip()[0].state_dict()
    assert torch.equal(head["weight"], head["init_weight"]) and head["bias"].abs().sum() > 0
    assert torch.equal(head["bias"], head["init_bias"]) and metrics["freeze_head"]
    assert not same_weights(
        {k: v for k, v in start.items() if k.startswith("visual.")}, weights_of(tmp_path)
    )


def test_a_run_writes_outputs_that_open_clip_and_torch_load(two_runs):
    out = two_runs / "lam10"
    metrics = strict_json((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["lam"] == 10 and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["train_images_per_second"] > 0 and metrics["peak_memory_mb"] > 0
    log = read_log(out)
    assert log[-1]["step"] == 12 and {"loss/ce", "loss/ldifs", "ldifs_distance"} <= set(log[0])
    saved = weights_of(out)
    loaded = open_clip.create_model(f"local-dir:{out}")
    by_name = open_clip.create_model(
        ldifs.TINY_CLIP, pretrained=str(out / "open_clip_pytorch_model.bin")
    )
    assert same_weights(saved, loaded.state_dict()) and same_weights(saved, by_name.state_dict())
    head = weights_of(out, "head.pt")
    assert head["weight"].shape == head["init_weight"].shape == (6, 64)
    assert not torch.equal(head["bias"], head["init_bias"])  # the bias trains with the encoder
    assert head["classnames"] == list(ldifs.TASKS["synthetic"].classnames)


def test_a_run_ends_with_a_forgetting_table(two_runs, capsys, tmp_path):
    row = json.loads((two_runs / "lam10/metrics.json").read_text())["forgetting"][
        "synthetic-stripes"
    ]
    assert set(row) == set(ldifs.FORGETTING_COLUMNS)
    assert row["delta_lp"] == pytest.approx(row["lp_finetuned"] - row["lp_pretrained"])
    assert all(0 <= row[k] <= 1 for k in row if not k.startswith("delta"))
    table = ldifs.forgetting_table({"synthetic-stripes": row, "mnist": {"skipped": "no data"}})
    lines = table.splitlines()
    assert lines[0] == "| task | ZS pre | ZS ft | Δ_ZS | LP pre | LP ft | Δ_LP |"
    assert f"| {100 * row['delta_lp']:+.1f} |" in lines[2] and "skipped" in lines[3]
    assert lines[4].startswith("| **average** |")


def test_openai_weights_are_built_with_quick_gelu_and_a_run_records_it(tmp_path, monkeypatch):
    """OpenAI's weights were trained with QuickGELU: built with GELU they lose accuracy, and
    open_clip only warns. A run's weights file carries the flag in the config beside it."""
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: "offline")
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda *a, **k: None)
    for tag, activation in (("openai", "QuickGELU"), ("laion2b_s34b_b79k", "GELU")):
        with torch.device("meta"):  # the model load_clip builds, without memory or weights
            clip = ldifs.load_clip("ViT-B-32", tag, "meta")[0]
        built = {type(m).__name__ for m in clip.modules() if "GELU" in type(m).__name__}
        assert built == {activation}, tag
    assert ldifs.needs_quick_gelu("ViT-B-32", "openai")
    assert not ldifs.needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"")
    assert not ldifs.needs_quick_gelu("ViT-B-32", str(weights))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    assert ldifs.needs_quick_gelu("ViT-B-32", str(weights))


def test_a_run_starts_from_another_runs_weights_by_file_or_by_folder(two_runs, tmp_path, capsys):
    """--pretrained FILE and --model local-dir:PATH load a run's weights (at lr 0, a run
    ends where it started), and the new run saves a config open_clip loads it by."""
    run, start = two_runs / "lam0", weights_of(two_runs / "lam0")
    file = ["--pretrained", run / "open_clip_pytorch_model.bin"]
    for name, flags in (("file", file), ("folder", ["--model", f"local-dir:{run}"])):
        argv = [*flags, "--lr", "0", "--head", "zs", "--eval-tasks", "none"]
        metrics = train_tiny(tmp_path / name, capsys, *argv, steps=2)
        assert same_weights(start, weights_of(tmp_path / name))
        assert same_weights(
            start, open_clip.create_model(f"local-dir:{tmp_path / name}").state_dict()
        )
    assert metrics["model"] == f"local-dir:{run}" and metrics["pretrained"] == "none"


def test_data_and_cache_folders_come_from_the_environment():
    env = {**run_env([]), "LDIFS_DATA": "/d", "LDIFS_CACHE": "/c"}
    command = [sys.executable, "-c", "import ldifs; print(ldifs.DATA_ROOT, ldifs.CACHE_DIR)"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE)
    assert result.stdout.split() == ["/d", "/c"], result.stderr


def test_help_documents_every_flag(capsys):
    code, out, _ = run_main(ldifs, ["--help"], capsys)
    text = " ".join(out.split())  # unwrapped
    assert code == 0 and "(default: 10.0)" in text and "(default: None)" not in text
    flags = [c for c in ldifs.parse_args.__code__.co_consts if str(c).startswith("--")]
    helped = [line.split()[0] for line in out.split("options:")[1].splitlines() if line.strip()]
    assert len(flags) == 32 and all(flag in helped for flag in flags)


def test_list_tasks_shows_every_task(capsys):
    code, out, _ = run_main(ldifs, ["--list-tasks", "--data-root", "/data"], capsys)
    assert code == 0
    assert {line.split()[0] for line in out.splitlines()[1:-1]} == set(ldifs.TASKS)
    assert "/data/eurosat/2750" in out and "seeded 80/10/10" in out
    assert out.splitlines()[-1].startswith("folder:PATH")


def test_task_names_are_read_in_any_case_and_the_target_is_no_eval_task(tmp_path):
    args = ldifs.parse_args(["--task", "EuroSAT", "--eval-tasks", "eurosat, MNIST,mnist"])
    tasks = ldifs.resolve_args(args)
    assert [t.name for t in tasks] == ["eurosat"] and args.eval_tasks == ["mnist"]
    assert args.out == Path("runs/eurosat-lam10")
    for flags, out in [
        (["--lam", "0", "--l2sp", "0.5", "--label-smoothing", "0.1"], "eurosat-lam0-l2sp0.5-ls0.1"),
        (["--lam", "0", "--loss", "flyp-ce"], "eurosat-lam0-flyp-ce"),
        (["--freeze-head"], "eurosat-lam10-frozen-head"),
    ]:  # not FT's folder
        baseline = ldifs.parse_args(flags)
        ldifs.resolve_args(baseline)
        assert baseline.out == Path("runs", out)
    hub = ldifs.parse_args(["--model", "hf-hub:org/repo", "--pretrained", "openai"])
    ldifs.resolve_args(hub)  # open_clip loads the repo's own weights, whatever the tag
    assert hub.pretrained == "none" and "seed" not in ldifs.weights_key(hub.model, "none", 3)


@pytest.mark.parametrize(
    "flags, message, code",
    [
        (
            ["--task", "eurosat", "--data-root", "{tmp}", "--no-download"],
            "task 'eurosat': no data at {tmp}/eurosat/2750/<class>/*.jpg and --no-download is set",
            1,
        ),
        (["--task", "eurosat", "--data-root", "{tmp}"], "it could not be downloaded", 1),
        (["--model", "ViT-B-32", "--pretrained", "openai"], "could not load ViT-B-32 weights", 1),
        (["--model", "ViT-Nope"], "unknown model 'ViT-Nope'", 2),
        (
            ["--model", "ViT-B-32", "--pretrained", "nope"],
            "'nope' is no file nor tag of ViT-B-32",
            2,
        ),
        (["--pretrained", "{tmp}/garbage.bin"], "could not load ldifs-tiny weights", 1),
        (["--task", "nope"], "unknown task 'nope'; choose from cars, cifar10", 2),
        (["--task", "synthetic,synthetic"], "repeats a task", 2),
        (["--batch-size", "0"], "argument --batch-size: must be > 0, got 0", 2),
        (["--lam", "-1"], "argument --lam: must be >= 0, got -1", 2),
        (["--lr", "nan"], "argument --lr: must be >= 0, got nan", 2),
        (["--label-smoothing", "1"], "must be >= 0 and < 1, got 1", 2),
        (["--lam", "ten"], "argument --lam: invalid float value: 'ten'", 2),
        (["--batch-size", "4096"], "--batch-size 4096 > the 2400 images of synthetic", 2),
        (["--templates", "{tmp}/garbage.bin"], "write one template a line, each with {{}}", 2),
        (["--resume"], "--resume: no run in {tmp}/out; run without --resume to start", 2),
        (["--loss", "nosuch"], "argument --loss: invalid choice: 'nosuch'", 2),
        (["--freeze-head", "--loss", "flyp"], "--freeze-head: --loss flyp trains no head", 2),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, capsys, flags, message, code):
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    argv = [*TINY, *[f.format(tmp=tmp_path) for f in flags], "--out", tmp_path / "out"]
    exit_code, _, err = run_main(ldifs, argv, capsys)
    lines = said(err)  # argparse's errors come after its usage line
    assert exit_code == code and (len(lines) == 1 or lines[0].startswith("usage:")), err
    assert message.format(tmp=tmp_path) in lines[-1] and "Traceback" not in err, err
    assert "download=True" not in err  # torchvision's advice for its Python API, not ours


def ctrl_c(*args):
    raise KeyboardInterrupt


def test_out_of_gpu_memory_and_ctrl_c_are_one_line(tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(ldifs, "train", out_of_memory)
    code, _, err = run_main(ldifs, [*TINY, "--head", "zs", "--out", tmp_path / "a"], capsys)
    assert code == 1 and len(said(err)) == 1
    assert "CUDA out of memory. Tried to allocate 2.00 GiB; lower --batch-size" in err
    monkeypatch.setattr(ldifs, "train", ctrl_c)
    code, _, err = run_main(ldifs, [*TINY, "--head", "zs", "--out", tmp_path / "b"], capsys)
    assert (code, said(err)) == (130, ["ldifs.py: interrupted"])


def test_an_existing_run_is_never_overwritten_without_resume(two_runs, tmp_path, capsys):
    shutil.copytree(two_runs / "lam0", tmp_path / "run")
    before = (tmp_path / "run/metrics.json").read_text()
    code, _, err = run_main(ldifs, [*TINY, "--lam", "0", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "holds a run: --resume it" in err
    assert (tmp_path / "run/metrics.json").read_text() == before


# ------------------------------------------------------------------ the linear probe


def blobs(n, num_classes=10, dim=64, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.randint(num_classes, (n,), generator=g)
    return means[y] + noise * torch.randn(n, dim, generator=g), y


def test_probe_separates_separable_data_and_is_chance_on_shuffled_labels(full_probe):
    (x, y), val, (tx, ty) = blobs(500), blobs(100, seed=1), blobs(400, seed=2)
    assert ldifs.probe_accuracy(ldifs.select_probe((x, y), val, 10), tx, ty) > 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert ldifs.probe_accuracy(ldifs.select_probe((x, shuffled), val, 10), tx, ty) < 0.25


def test_probe_is_the_releases_adamw_fit_with_bias_picked_on_val():
    (x, y), val = blobs(600, noise=2.0), blobs(300, noise=2.0, seed=1)
    fits = ldifs.fit_linear_probes(x, y, 10, ldifs.PROBE_LRS, steps=200)
    scores = [ldifs.probe_accuracy(f, *val) for f in fits]
    assert len(set(scores)) > 1  # the learning rate matters here, so the choice is tested
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ldifs, "PROBE_STEPS", 200)
        chosen = ldifs.select_probe((x, y), val, 10)
    best = fits[scores.index(max(scores))]
    assert torch.equal(chosen.weight, best.weight) and torch.equal(chosen.bias, best.bias)


def test_probes_fit_side_by_side_as_each_would_alone_with_adamw(monkeypatch):
    x, y = blobs(300, noise=2.0)
    together = ldifs.fit_linear_probes(x, y, 10, ldifs.PROBE_LRS, steps=50)
    monkeypatch.setattr(ldifs, "PROBE_LOGITS", 1)  # one probe at a time
    alone = ldifs.fit_linear_probes(x, y, 10, ldifs.PROBE_LRS, steps=50)
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(a.weight, b.weight, atol=1e-5) and torch.allclose(
            a.bias, b.bias, atol=1e-5
        )
    torch.manual_seed(0)
    manual, g = torch.nn.Linear(64, 10), torch.Generator().manual_seed(0)
    with torch.no_grad():  # nn.Linear's own init, seeded as the probes'
        for p in manual.parameters():
            p.uniform_(-(64**-0.5), 64**-0.5, generator=g)
    optimizer = torch.optim.AdamW(manual.parameters(), lr=ldifs.PROBE_LRS[2])  # weight decay 0.01
    for _ in range(50):
        optimizer.zero_grad()
        F.cross_entropy(manual(F.normalize(x, dim=-1)), y).backward()
        optimizer.step()
    assert torch.allclose(manual.weight, together[2].weight, atol=1e-5)
    assert torch.allclose(manual.bias, together[2].bias, atol=1e-5)


def test_zero_shot_head_is_open_clips_classifier_times_logit_scale():
    clip, _, _ = ldifs.load_clip(ldifs.TINY_CLIP, "none")
    tokenizer = open_clip.get_tokenizer(ldifs.TINY_CLIP)
    task = ldifs.TASKS["synthetic"]
    head = ldifs.zero_shot_head(clip, tokenizer, task.classnames, task.templates, "cpu")
    theirs = open_clip.build_zero_shot_classifier(clip, tokenizer, task.classnames, task.templates)
    assert torch.allclose(head.weight, theirs.T * clip.logit_scale.exp(), atol=1e-5)
    assert torch.equal(head.bias, torch.zeros(len(task.classnames)))


def test_lp_init_head_is_the_probe_on_cached_train_and_val_features(tmp_path):
    args = tiny_args(tmp_path, "--cache-dir", tmp_path / "cache")
    clip, _, transform = ldifs.load_clip(args.model, args.pretrained)
    task, stage = ldifs.TASKS["synthetic"], types.SimpleNamespace(index=0)
    head = ldifs.initial_head(clip, task, transform, stage, args)
    cached = {path.name.split("-")[1] for path in (tmp_path / "cache").iterdir()}
    assert cached == {"train", "val"}  # the probe never needs the test split's features
    f = ldifs.task_features(clip.visual, task, transform, args)
    assert torch.equal(head.weight, ldifs.select_probe(f["train"], f["val"], 6).weight)
    assert head.bias.abs().sum() > 0 and head.bias.requires_grad
    later = types.SimpleNamespace(index=1)  # the encoder has moved: its features are not kept
    ldifs.initial_head(clip, task, transform, later, args)
    assert len(list((tmp_path / "cache").iterdir())) == 2


# ------------------------------------------------------------------ forgetting and its cache


class Constant(torch.nn.Module):
    """An encoder that forgot everything: the same features for every image."""

    def forward(self, images):
        return torch.ones(len(images), 64)


def test_forgetting_deltas_are_finetuned_minus_pretrained(tmp_path):
    args = tiny_args(tmp_path, "--cache-dir", tmp_path / "cache")
    clip, _, transform = ldifs.load_clip(args.model, args.pretrained)
    forgot = copy.deepcopy(clip)
    forgot.visual = Constant()
    digest = ldifs.encoder_digest(Constant())
    row = ldifs.forgetting_on(ldifs.TASKS["synthetic"], clip, forgot, digest, transform, args)
    assert row["lp_pretrained"] > 0.5 > 0.25 > row["lp_finetuned"]  # 6 colours: chance is 1/6
    assert row["delta_lp"] == pytest.approx(row["lp_finetuned"] - row["lp_pretrained"])
    assert row["delta_zs"] == pytest.approx(row["zs_finetuned"] - row["zs_pretrained"])


def counted_probe_fits(monkeypatch):
    """The list that gets an entry for every probe fit from now on."""
    fits, probe = [], ldifs.select_probe
    monkeypatch.setattr(ldifs, "select_probe", lambda *a: [fits.append(1), probe(*a)][1])
    return fits


def test_the_cache_keeps_features_and_a_lps_under_their_key_alone(tmp_path, monkeypatch):
    """An entry is used for its own key alone (weights, task, split, image count), and a
    corrupt one is computed again; random weights are keyed by the seed that drew them."""
    args = tiny_args(tmp_path, "--cache-dir", tmp_path / "cache")
    calls = []
    compute = lambda value: lambda: calls.append(value) or value  # noqa: E731
    key = {"model": "m", "pretrained": "none", "seed": 0, "task": "t", "split": "val", "images": 5}
    assert ldifs.cached(key, compute(1.0), args) == 1.0
    assert ldifs.cached(key, compute(2.0), args) == 1.0 and calls == [1.0]
    for other in ({"seed": 1}, {"images": 4}, {"split": "test"}, {"pretrained": "openai"}):
        assert ldifs.cached({**key, **other}, compute(3.0), args) == 3.0
    for entry in (tmp_path / "cache").iterdir():
        entry.write_bytes(entry.read_bytes()[:20])
    assert ldifs.cached(key, compute(4.0), args) == 4.0
    assert ldifs.weights_key("m", "none", 1) != ldifs.weights_key("m", "none", 0)
    assert ldifs.weights_key("m", "openai", 1) == ldifs.weights_key("m", "openai", 0)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"1")
    before = ldifs.weights_key("m", str(weights), 0)
    weights.write_bytes(b"22")
    assert ldifs.weights_key("m", str(weights), 0) != before  # edited weights are read again


def test_a_sweep_fits_the_pretrained_probes_once(two_runs, tmp_path, capsys, monkeypatch):
    fits = counted_probe_fits(monkeypatch)
    cache = ["--cache-dir", tmp_path / "cache", "--eval-tasks", "synthetic-stripes"]
    train_tiny(tmp_path / "a", capsys, *cache, "--lam", "0")
    assert len(fits) == 3  # the LP-init head, then A_LP of the pre-trained and the fine-tuned
    train_tiny(tmp_path / "b", capsys, *cache, "--lam", "10")
    assert len(fits) == 3 + 2  # the same head and baseline again: kept


def test_the_fine_tuned_encoder_is_digested_by_its_layers_and_weights():
    encoder = open_clip.create_model(ldifs.TINY_CLIP).visual
    same = copy.deepcopy(encoder)
    assert ldifs.encoder_digest(same) == ldifs.encoder_digest(encoder)
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-6
    assert ldifs.encoder_digest(same) != ldifs.encoder_digest(encoder)
    quick = open_clip.create_model(ldifs.TINY_CLIP, force_quick_gelu=True).visual
    quick.load_state_dict(encoder.state_dict())  # the same weights, another activation
    assert ldifs.encoder_digest(quick) != ldifs.encoder_digest(encoder)


def test_eval_tasks_whose_data_is_missing_are_skipped_not_fatal(tmp_path, capsys):
    flags = ["--eval-tasks", "mnist,synthetic-stripes", "--no-download", "--data-root", tmp_path]
    metrics = train_tiny(tmp_path / "run", capsys, *flags, steps=4)
    assert "no data at" in metrics["forgetting"]["mnist"]["skipped"]
    assert "delta_lp" in metrics["forgetting"]["synthetic-stripes"]


# ------------------------------------------------------------------ eval.py


def compare(capsys, *argv, key="rows"):
    """eval.py in this process: its table, and its JSON's rows (or another `key`)."""
    out = Path(argv[0]).parent / "eval.json"
    code, stdout, err = run_main(evaluation, [*argv, "--workers", "0", "--json", out], capsys)
    assert code == 0, err
    return stdout, json.loads(out.read_text())[key]


def test_eval_compares_runs_and_their_wise_ft_mixes(two_runs, capsys):
    runs = [two_runs / "lam0", two_runs / "lam10"]
    table, rows = compare(capsys, *runs, "--wise-ft", "0.5,1,0.5")
    labels = [row["label"] for row in rows]
    assert labels[0] == "pre-trained ldifs-tiny (none)"
    assert labels[1:] == [
        "synthetic FT",
        "  WiSE-FT alpha 0.5 of synthetic FT",
        "synthetic LDIFS (lam 10)",
        "  WiSE-FT alpha 0.5 of synthetic LDIFS (lam 10)",
    ]
    pre = rows[0]["a_lp"]["synthetic-stripes"]
    assert all(
        r["delta_lp"]["synthetic-stripes"] == pytest.approx(r["a_lp"]["synthetic-stripes"] - pre)
        for r in rows
    )
    for row, run in ((rows[1], runs[0]), (rows[3], runs[1])):  # its own head on its own split
        metrics = json.loads((run / "metrics.json").read_text())
        assert row["target_accuracy"] == pytest.approx(metrics["test_accuracy"])
        assert row["a_lp"]["synthetic-stripes"] == pytest.approx(
            metrics["forgetting"]["synthetic-stripes"]["lp_finetuned"]
        )
    assert pre == pytest.approx(metrics["forgetting"]["synthetic-stripes"]["lp_pretrained"])
    assert "| synthetic FT | " in table and "Δ_LP synthetic-stripes" in table
    table, methods = compare(capsys, *runs, "--wise-ft", "0.5", "--by-method", key="by_method")
    assert [m["method"] for m in methods] == [
        "FT",
        "WiSE-FT alpha 0.5 of FT",
        "LDIFS (lam 10)",
        "WiSE-FT alpha 0.5 of LDIFS (lam 10)",
    ]
    for method, row in zip(methods, rows[1:], strict=True):  # one target task: the run's row
        assert method["target_tasks"] == 1 and method["avg_delta_lp"] == row["avg_delta_lp"]
    assert f"| LDIFS (lam 10) | 1 | {100 * rows[3]['target_accuracy']:.1f} |" in table


def test_wise_ft_interpolates_weights():
    a, b = {"w": torch.zeros(3), "n": torch.tensor(0)}, {"w": torch.ones(3), "n": torch.tensor(4)}
    mixed = evaluation.wise_ft(a, b, 0.25)
    assert torch.allclose(mixed["w"], torch.full((3,), 0.25)) and mixed["n"].dtype == torch.int64


def test_a_runs_averages_leave_out_its_target_and_methods_average_over_targets():
    baseline = {"a": 0.5, "b": 0.5, "c": 0.5}
    rows = [{"a_lp": baseline}]
    for method, task, a_lp, accuracy in [
        ("FT", "a", (0.9, 0.4, 0.2), 0.9),
        ("FT", "a", (0.9, 0.2, 0.2), 0.7),  # a second seed
        ("FT", "b", (0.6, 0.9, 0.6), 0.8),
        ("LDIFS (lam 10)", "a", (0.9, 0.5, 0.7), 0.9),
    ]:
        row = dict(method=method, task=task, target_accuracy=accuracy)
        rows.append(dict(row, a_lp=dict(zip("abc", a_lp, strict=True))))
    evaluation.add_deltas(rows, baseline)
    assert rows[0]["avg_a_lp"] == pytest.approx(0.5)  # no target: every task
    assert rows[1]["avg_a_lp"] == pytest.approx(0.3) and rows[1]["avg_delta_lp"] == pytest.approx(
        -0.2
    )
    ft, ldifs_row = evaluation.by_method(rows[1:])
    assert (ft["method"], ft["target_tasks"], ldifs_row["target_tasks"]) == ("FT", 2, 1)
    assert ft["target_accuracy"] == pytest.approx((0.8 + 0.8) / 2)  # seeds first, then targets
    assert ft["avg_a_lp"] == pytest.approx((0.25 + 0.6) / 2)
    assert ldifs_row["avg_delta_lp"] == pytest.approx(0.1)


def test_eval_wise_ft_mixes_the_head_as_it_mixes_the_encoder(two_runs, capsys, monkeypatch):
    """alpha 0: the initial head on the start encoder; 0.5: the mean head on the mean encoder."""
    scored, accuracy = [], ldifs.probe_accuracy
    spy = lambda head, x, y: scored.append((head, x)) or accuracy(head, x, y)  # noqa: E731
    monkeypatch.setattr(ldifs, "probe_accuracy", spy)
    run = two_runs / "lam10"
    _, rows = compare(capsys, run, "--tasks", "none", "--wise-ft", "0,0.5")
    head, saved = weights_of(run, "head.pt"), weights_of(run)
    start, _, transform = pretrained_tiny_clip()
    args = types.SimpleNamespace(workers=0, eval_batch_size=256, device=torch.device("cpu"))
    test = ldifs.get_dataset("synthetic", "test", ldifs.DATA_ROOT, transform)
    for (mixed, x), alpha in zip(scored, (1, 0, 0.5), strict=True):
        for k in ("weight", "bias"):
            assert torch.allclose(
                mixed.state_dict()[k], torch.lerp(head[f"init_{k}"], head[k], alpha)
            )
        clip = copy.deepcopy(start)
        clip.load_state_dict(evaluation.wise_ft(start.state_dict(), saved, alpha))
        assert torch.allclose(x, ldifs.extract_features(clip.visual, test, args)[0], atol=1e-6)
    metrics = json.loads((run / "metrics.json").read_text())
    assert rows[1]["target_accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_eval_wise_ft_of_a_flyp_run_mixes_both_towers_and_rebuilds_its_zero_shot_head(
    flyp_runs, capsys
):
    run = flyp_runs / "flyp"
    _, rows = compare(capsys, run, "--tasks", "none", "--wise-ft", "0,0.5")
    start, _, transform = pretrained_tiny_clip()
    assert rows[2]["target_accuracy"] == pytest.approx(
        zero_shot_accuracy(start, transform, "synthetic")[0]
    )
    mixed = copy.deepcopy(start)  # the text tower mixed too, and the head rebuilt from it
    mixed.load_state_dict(evaluation.wise_ft(start.state_dict(), weights_of(run), 0.5))
    assert rows[3]["target_accuracy"] == pytest.approx(
        zero_shot_accuracy(mixed, transform, "synthetic")[0]
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert rows[1]["target_accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_eval_rebuilds_the_random_weights_a_run_started_from(two_runs, tmp_path, capsys):
    """The runs use --pretrained none: eval.py draws the same random encoder from the seed,
    so its baseline matches the run's own, even with a fresh cache."""
    run = shutil.copytree(two_runs / "lam10", tmp_path / "run")
    _, rows = compare(
        capsys, run, "--tasks", "synthetic-stripes", "--cache-dir", tmp_path / "fresh"
    )
    recorded = json.loads((run / "metrics.json").read_text())["forgetting"]["synthetic-stripes"]
    assert rows[0]["a_lp"]["synthetic-stripes"] == pytest.approx(recorded["lp_pretrained"])


def test_a_killed_eval_goes_on_where_it_stopped(two_runs, tmp_path, capsys, monkeypatch):
    """Each A_LP eval.py computes is cached: a rerun after Ctrl-C fits only the probes the
    killed one had not finished, and gives the same table."""
    runs = [shutil.copytree(two_runs / p, tmp_path / p) for p in ("lam0", "lam10")]
    argv = [*runs, "--tasks", "synthetic-stripes", "--wise-ft", "0.5", "--workers", "0"]
    argv += ["--cache-dir", tmp_path / "cache"]
    fits, probe = [], ldifs.select_probe

    def counted(*a):
        fits.append(1)
        if len(fits) == 3 and counted.kill:  # two probes finished: the baseline's, one mix's
            raise KeyboardInterrupt
        return probe(*a)

    counted.kill = True
    monkeypatch.setattr(ldifs, "select_probe", counted)
    code, _, err = run_main(evaluation, argv, capsys)
    assert (code, said(err)) == (130, ["eval.py: interrupted"])
    fits.clear()
    counted.kill = False
    code, table, err = run_main(evaluation, argv, capsys)
    assert code == 0 and len(fits) == 5 - 2, err  # baseline, alpha 1 and 0.5 of each run
    assert run_main(evaluation, argv, capsys)[1] == table and len(fits) == 3  # all kept


def test_eval_refuses_runs_from_different_weights_and_paths_that_are_no_runs(
    two_runs, tmp_path, capsys
):
    other = shutil.copytree(two_runs / "lam0", tmp_path / "seed1")
    metrics = json.loads((other / "metrics.json").read_text())
    (other / "metrics.json").write_text(json.dumps({**metrics, "seed": 1}))
    code, _, err = run_main(evaluation, [two_runs / "lam0", other], capsys)
    assert code == 2 and "runs start from different weights" in err and "(seed 1)" in err
    code, _, err = run_main(evaluation, [tmp_path / "nope"], capsys)
    assert (
        code == 2
        and err
        == f"eval.py: error: {tmp_path / 'nope'} is no finished run of ldifs.py (no metrics.json)\n"
    )


def test_eval_labels_name_the_method_and_tell_alike_runs_apart(two_runs, tmp_path, capsys):
    base = {"lam": 0.0, "l2sp": 0.0, "head": "lp"}
    assert evaluation.method_label(base) == "FT"
    assert evaluation.method_label({**base, "loss": "flyp-ce", "head": "zs"}) == "FLYP-CE"
    flyp = {**base, "loss": "flyp", "lam": 10.0}
    assert evaluation.method_label(flyp) == "FLYP + LDIFS (lam 10)"
    assert evaluation.method_label({**base, "freeze_head": True}) == "FT, frozen head"
    assert evaluation.method_label({**base, "lam": 10.0, "head": "zs"}) == "LDIFS (lam 10), ZS-init"
    assert evaluation.method_label({**base, "l2sp": 0.5}) == "L2-SP (alpha 0.5)"
    assert evaluation.method_label({**base, "label_smoothing": 0.1}) == "LS (eps 0.1)"
    continual = {**base, "lam": 10.0, "sequence": ["svhn", "cifar10", "resisc45"], "stage": 1}
    assert evaluation.method_label(continual) == "LDIFS (lam 10), continual svhn > cifar10"
    twin = shutil.copytree(two_runs / "lam10", tmp_path / "twin")
    _, rows = compare(capsys, two_runs / "lam10", twin, "--tasks", "none")
    assert [r["label"] for r in rows[1:]] == [
        f"synthetic LDIFS (lam 10) ({p})" for p in (two_runs / "lam10", twin)
    ]


def test_eval_reads_the_data_where_the_runs_were_trained_unless_told(two_runs, tmp_path):
    recorded = json.loads((two_runs / "lam0/metrics.json").read_text())["data_root"]
    assert recorded == os.path.abspath(os.path.expanduser(ldifs.DATA_ROOT))
    runs = [{"metrics": {"data_root": str(tmp_path / p)}} for p in ("gone", "here", "too")]
    (tmp_path / "here").mkdir(), (tmp_path / "too").mkdir()
    args = evaluation.parse_args(["x"])
    assert evaluation.data_root(args, runs) == str(tmp_path / "here")  # the first that is there
    assert evaluation.data_root(args, runs[:1]) == ldifs.DATA_ROOT
    assert evaluation.data_root(evaluation.parse_args(["x", "--data-root", "d"]), runs) == "d"


def test_eval_plots_target_accuracy_against_forgetting_with_labels_inside(two_runs, capsys):
    plt = pytest.importorskip("matplotlib.pyplot")
    rows = [
        {
            "run": run,
            "alpha": a,
            "label": f"synthetic run {run} with a long label",
            "avg_delta_lp": d,
            "avg_a_lp": 0.5 + d,
            "target_accuracy": t,
        }
        for run, points in (
            ("a", [(0, 0.0, 0.2), (1, -0.3, 1.0)]),
            ("b", [(0, 0.0, 0.2), (1, 0.05, 0.99)]),
        )
        for a, d, t in points
    ]
    path = two_runs / "plot" / "figure.png"
    figures = []
    close = plt.close
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt, "close", lambda figure: figures.append(figure))
        evaluation.plot(rows, path, "delta_lp")
        evaluation.plot(rows, path.with_suffix(".pdf"), "a_lp")
    assert path.read_bytes()[:4] == b"\x89PNG"
    figure = figures[0]
    renderer = figure.canvas.get_renderer()
    axes_box = figure.axes[0].get_window_extent(renderer)
    labels = [t for t in figure.axes[0].texts]
    assert len(labels) == 2
    for label in labels:
        box = label.get_window_extent(renderer)
        assert axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and box.y1 <= axes_box.y1, (
            label.get_text()
        )
    close(figure)
    assert figures[1].axes[0].get_xlabel() == "average A_LP over eval tasks (%)"
    assert path.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"  # the format its suffix names
    close(figures[1])


def test_every_torch_load_reads_weights_alone():
    """A checkpoint that pickles code runs it when loaded: every load is weights_only."""
    for script in ("ldifs.py", "eval.py"):
        loads = re.findall(r"torch\.load\b[^)]*\)", (HERE / script).read_text())
        assert loads and all("weights_only=True" in call for call in loads), script


def test_eval_plot_needs_matplotlib_and_an_eval_task(two_runs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, _, err = run_main(evaluation, [two_runs / "lam0", "--plot", "p.png"], capsys)
    assert code == 2 and said(err) == [
        "eval.py: error: --plot needs matplotlib: pip install matplotlib"
    ]
    monkeypatch.setattr(evaluation, "pyplot", lambda: None)
    code, _, err = run_main(
        evaluation, [two_runs / "lam0", "--plot", "p.png", "--tasks", "none"], capsys
    )
    assert code == 2 and "--plot needs an eval task" in err


# ------------------------------------------------------------------ tasks on fake copies
# Each fake image is a solid colour whose red channel encodes the class index we expect its
# label to be, so a check reads the truth from the pixels themselves.


def fake_image(path, code):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (5 * code, 0, 0)).save(path)


def decoded_labels(data):
    return [(round(image.getpixel((4, 4))[0] / 5), label) for image, label in data]


def assert_splits(task, root, sizes):
    """Labels match the pixels; splits are disjoint, deterministic and of the given sizes."""
    splits = {s: ldifs.get_dataset(task, s, root, download=False) for s in ("train", "val", "test")}
    for name, data in splits.items():
        assert all(code == label for code, label in decoded_labels(data)), name
        assert len(data) == sizes[name], (name, len(data))
    assert decoded_labels(ldifs.get_dataset(task, "val", root, download=False)) == decoded_labels(
        splits["val"]
    )
    ids = [set(map(str, paths(d))) for d in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    return splits


def paths(data):
    """The images' paths of a split, through Subset wrappers."""
    if isinstance(data, torch.utils.data.Subset):
        return [paths(data.dataset)[i] for i in data.indices]
    for attr in ("samples", "_samples"):
        if hasattr(data, attr):
            return [s[0] for s in getattr(data, attr)]
    return list(data._image_files)


EUROSAT_FOLDERS = "AnnualCrop Forest HerbaceousVegetation Highway Industrial Pasture PermanentCrop"
EUROSAT_FOLDERS = EUROSAT_FOLDERS.split() + ["Residential", "River", "SeaLake"]


def test_eurosat_labels_follow_folders_and_split_80_10_10(tmp_path):
    names = dict(zip(EUROSAT_FOLDERS, ldifs.TASKS["eurosat"].classnames, strict=True))
    assert names["Highway"] == "highway or road" and names["SeaLake"] == "lake or sea"
    for code, folder in enumerate(EUROSAT_FOLDERS):
        for k in range(5):
            fake_image(tmp_path / "eurosat/2750" / folder / f"{folder}_{k}.jpg", code)
    assert_splits("eurosat", tmp_path, {"train": 40, "val": 5, "test": 5})


def test_gtsrb_labels_are_class_ids(tmp_path):
    base = tmp_path / "gtsrb/GTSRB"
    for code in range(43):  # torchvision labels training folders by sorted position
        for k in range(2):
            fake_image(base / "Training" / f"{code:05d}" / f"{k}.ppm", code)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for k, code in enumerate((14, 42, 0, 14)):
        fake_image(base / "Final_Test/Images" / f"{k:05d}.ppm", code)
        rows.append(f"{k:05d}.ppm;8;8;0;0;8;8;{code}")
    (tmp_path / "gtsrb/GT-final_test.csv").write_text("\n".join(rows) + "\n")
    assert_splits("gtsrb", tmp_path, {"train": 78, "val": 8, "test": 4})
    assert ldifs.TASKS["gtsrb"].classnames[14] == "stop"


def test_dtd_trains_on_partition_1_train_alone_and_names_its_classes_from_the_data(tmp_path):
    base, lines = tmp_path / "dtd/dtd", {"train1": [], "val1": [], "test1": []}
    classes = [f"texture-{k:02d}" for k in range(47)]
    for code, name in enumerate(classes):
        for k, part in enumerate(["train1", "train1", "val1", "test1"]):
            fake_image(base / "images" / name / f"{name}_{k}.jpg", code)
            lines[part].append(f"{name}/{name}_{k}.jpg")
    for part, rows in lines.items():
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{part}.txt").write_text("\n".join(rows) + "\n")
    assert_splits("dtd", tmp_path, {"train": 94 - 9, "val": 9, "test": 47})  # val1 unused
    assert ldifs.class_names(ldifs.TASKS["dtd"], tmp_path) == tuple(classes)


def test_resisc45_reads_its_standard_split_files(tmp_path):
    classes = [f"scene_{k:02d}" for k in range(45)]
    for code, folder in enumerate(classes):
        for k in range(5):
            fake_image(tmp_path / "resisc45/NWPU-RESISC45" / folder / f"{folder}_{k:03d}.jpg", code)
    with pytest.raises(ldifs.DataMissing, match="resisc45-train.txt not found"):
        ldifs.get_dataset("resisc45", "train", tmp_path)
    for split, ks in {"train": (0, 1, 2), "val": (3,), "test": (4,)}.items():
        names = [f"{c}_{k:03d}.jpg" for c in classes for k in ks]
        (tmp_path / "resisc45" / f"resisc45-{split}.txt").write_text("\n".join(names))
    splits = assert_splits("resisc45", tmp_path, {"train": 122, "val": 13, "test": 45})
    assert all(p.endswith("_004.jpg") for p in paths(splits["test"]))
    names = ldifs.class_names(ldifs.TASKS["resisc45"], tmp_path)
    assert names[2] == "scene 02" and len(names) == 45  # sorted folders, '_' read as ' '


def test_sun397_reads_partition_1_and_names_classes_as_the_release(tmp_path):
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/beach"]
    (tmp_path / "SUN397/Partitions").mkdir(parents=True)
    (tmp_path / "SUN397/ClassName.txt").write_text("\n".join(classes) + "\n")
    for code, c in enumerate(classes):
        for k in range(10):
            fake_image(tmp_path / "SUN397" / c.strip("/") / f"sun_{code}{k}.jpg", code)
    for part, ks in (("Training_01", range(0, 4)), ("Testing_01", range(4, 8))):
        rows = [f"{c}/sun_{code}{k}.jpg" for code, c in enumerate(classes) for k in ks]
        (tmp_path / "SUN397/Partitions" / f"{part}.txt").write_text("\n".join(rows) + "\n")
    splits = assert_splits("sun397", tmp_path, {"train": 11, "val": 1, "test": 12})
    assert not any(p.endswith(("8.jpg", "9.jpg")) for s in splits.values() for p in paths(s))
    names = ldifs.class_names(ldifs.TASKS["sun397"], tmp_path)
    assert names == ("abbey", "apartment building outdoor", "beach")


def test_imagenet_reads_placed_folders_less_hidden_ones(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    for code, w in enumerate(wnids):
        for k in range(10):
            fake_image(tmp_path / "imagenet/train" / w / f"{k}.JPEG", code)
        fake_image(tmp_path / "imagenet/val" / w / "v.JPEG", code)
    fake_image(tmp_path / "imagenet/train/.ipynb_checkpoints/0.JPEG", 0)  # no class
    fake_image(tmp_path / "imagenet/train/n01440764/._0.JPEG", 9)  # macOS's twin: no image
    assert_splits("imagenet", tmp_path, {"train": 27, "val": 3, "test": 3})
    assert ldifs.class_names(ldifs.TASKS["imagenet"], tmp_path)[:2] == ("tench", "goldfish")


@pytest.mark.parametrize(
    "task, count",
    [
        ("cars", 196),
        ("cifar10", 10),
        ("cifar100", 100),
        ("dtd", 47),
        ("eurosat", 10),
        ("gtsrb", 43),
        ("imagenet", 1000),
        ("mnist", 10),
        ("resisc45", 45),
        ("sun397", 397),
        ("svhn", 10),
    ],
)
def test_class_counts_and_templates(task, count):
    t = ldifs.TASKS[task]
    assert t.num_classes == count
    if t.classnames:  # CLIP's ImageNet list repeats crane and maillot
        assert len(t.classnames) == count and (
            len(set(t.classnames)) == count or task == "imagenet"
        )
    assert all("dog" in template.format("dog") != template for template in t.templates)


def test_cars_and_cifar100_keep_the_datasets_own_names_and_cars_task_vectors_templates(tmp_path):
    templates = ldifs.TASKS["cars"].templates
    assert len(templates) == 8 and "i love my {}!" in templates
    names = ["Ram C/V Cargo Van Minivan 2012", "aquarium_fish"]  # kept as the release keeps them
    for task in ("cars", "cifar100"):
        fake = dataclasses.replace(
            ldifs.TASKS[task], load=lambda *a: types.SimpleNamespace(classes=names)
        )
        assert ldifs.class_names(fake, tmp_path) == tuple(names)


@pytest.mark.parametrize("n", [94, 1000, 60000])
def test_held_out_split_is_the_releases_random_split(n):
    n_val = min(int(n * 0.1), 20000)
    generator = torch.Generator().manual_seed(0)
    train, val = torch.utils.data.random_split(range(n), [n - n_val, n_val], generator=generator)
    assert ldifs.seeded_split(n, "train") == train.indices
    assert ldifs.seeded_split(n, "val") == val.indices
    if n == 60000:  # the release asserts this for MNIST
        assert ldifs.seeded_split(n, "train")[0] == 36044
    assert len(ldifs.seeded_split(1_281_167, "val")) == 20000


def test_missing_data_is_one_line_naming_the_folder_and_the_source(tmp_path):
    with pytest.raises(ldifs.DataMissing) as e:
        ldifs.get_dataset("dtd", "train", tmp_path, download=False)
    assert str(e.value).startswith(
        f"task 'dtd': no data at {tmp_path}/dtd/dtd/ and --no-download is set"
    )
    assert "\n" not in str(e.value) and str(e.value).endswith(
        "get it from torchvision.datasets.DTD, or set --data-root"
    )
    for download in (False, True):  # ImageNet never downloads, whatever --no-download says
        with pytest.raises(ldifs.DataMissing, match="not downloaded automatically.*image-net.org"):
            ldifs.get_dataset("imagenet", "test", tmp_path, download=download)


def test_requirements_pin_the_packages_the_code_and_every_task_loader_import():
    pins = dict(line.split("==") for line in (HERE / "requirements.txt").read_text().split())
    assert pins.keys() == {"torch", "torchvision", "open_clip_torch", "scipy"}  # scipy: SVHN, Cars
    for package, version in pins.items():
        assert importlib.metadata.version(package).split("+")[0] == version, package


# ------------------------------------------------------------------ your own images


def make_folder(root, classes=("cat_a", "dog_b", "eel"), counts=None):
    """An ImageFolder copy: root/{train,test}/<class>/*.jpg, pixels coding labels."""
    for split, n in (counts or {"train": 20, "test": 4}).items():
        for code, name in enumerate(classes):
            for k in range(n):
                fake_image(root / split / name / f"{k}.jpg", code)
    return root


def test_folder_task_reads_classes_labels_and_holds_out_val_or_reads_it(tmp_path):
    root = make_folder(tmp_path / "my data")
    task = ldifs.get_task(f"folder:{root}")
    assert task.classnames == ("cat a", "dog b", "eel") and task.epochs == 10
    assert_splits(task, tmp_path, {"train": 54, "val": 6, "test": 12})
    make_folder(root, counts={"val": 2})
    assert len(ldifs.get_dataset(ldifs.folder_task(f"folder:{root}"), "train", tmp_path)) == 60


def test_folder_task_skips_hidden_files_and_folders_and_test_labels_follow_train(tmp_path):
    """A folder copied from macOS holds ._* twins of its images, which are no images, and a
    notebook leaves .ipynb_checkpoints/ folders, which are no classes."""
    root = make_folder(tmp_path / "d")
    for split in ("train", "test"):
        (root / split / ".ipynb_checkpoints").mkdir()
    (root / "train/cat_a/._0.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(4000))
    fake_image(root / "train/eel/.thumbnails/0.jpg", 0)  # a label the pixels would contradict
    shutil.rmtree(root / "test/cat_a")  # test lacks cat_a: eel is still label 2
    task = ldifs.get_task(f"folder:{root}")
    assert task.classnames == ("cat a", "dog b", "eel")
    assert_splits(task, tmp_path, {"train": 54, "val": 6, "test": 8})


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train": 4}, "no test/ folder of test/<class>/* images"),
        ({"test": 4}, "no train/ folder of train/<class>/* images"),
        ({"train": 4, "test": 4, "one class": True}, "train/ needs a folder of images per class"),
    ],
)
def test_folder_task_bad_layouts_are_one_line_and_write_nothing(tmp_path, capsys, layout, message):
    root = tmp_path / "data"
    layout = dict(layout)
    classes = ("images",) if layout.pop("one class", False) else ("a", "b")
    make_folder(root, classes, layout)
    argv = ["--task", f"folder:{root}", "--out", tmp_path / "out", "--cache-dir", tmp_path / "c"]
    code, _, err = run_main(ldifs, argv, capsys)
    assert code == 2 and len(said(err)) == 1, err
    assert said(err)[0].startswith(f"ldifs.py: error: folder:{root}: {message}")
    assert not (tmp_path / "out").exists()


def test_folder_tasks_fine_tune_report_forgetting_and_keep_paths_out_of_file_names(
    tmp_path, capsys, monkeypatch
):
    prompts, real = [], ldifs.zero_shot_head
    monkeypatch.setattr(
        ldifs,
        "zero_shot_head",
        lambda c, t, n, templates, d: prompts.append(templates) or real(c, t, n, templates, d),
    )
    a, b = make_folder(tmp_path / "a b"), make_folder(tmp_path / "b", classes=("x", "y"))
    (tmp_path / "t.txt").write_text("a drawing of a {}.\nan icon of the {}.\n")
    flags = ["--task", f"folder:{a}", "--eval-tasks", f"folder:{b}", "--max-steps", 3, *FOLDER]
    flags += ["--templates", tmp_path / "t.txt", "--head", "zs", "--cache-dir", tmp_path / "c"]
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(ldifs, flags, capsys)
    assert code == 0, err
    run = tmp_path / "runs" / f"{ldifs.file_safe(f'folder:{a}')}-lam10"
    assert run.name.startswith("folder-a_b-") and f"| folder:{b} |" in out
    assert "delta_lp" in json.loads((run / "metrics.json").read_text())["forgetting"][f"folder:{b}"]
    assert all(p.name.startswith("folder-b-") for p in (tmp_path / "c").iterdir())
    assert prompts[0] == ("a drawing of a {}.", "an icon of the {}.")  # --templates: the target's
    assert prompts[1] == ldifs.PHOTO_TEMPLATES  # the eval folder keeps CLIP's photo templates
    _, rows = compare(capsys, run, "--cache-dir", tmp_path / "c")  # eval.py reads the folder too
    assert set(rows[1]["a_lp"]) == {f"folder:{b}"}


def test_an_undecodable_image_is_one_line_naming_it_also_from_a_loader_worker(tmp_path, capsys):
    root = make_folder(tmp_path / "d")
    (root / "train/eel/7.jpg").write_bytes(b"not a jpeg")
    for workers in ("0", "2"):
        argv = ["--task", f"folder:{root}", *FOLDER, "--head", "zs"]
        code, _, err = run_main(
            ldifs, [*argv, "--workers", workers, "--out", tmp_path / workers], capsys
        )
        assert code == 1 and len(said(err)) == 1, err
        assert f"ldifs.py: error: cannot decode image {root / 'train/eel/7.jpg'}: " in err


# ------------------------------------------------------------------ runs that survive

RESUME = [*TINY, "--head", "zs", "--max-steps", "16", "--save-every", "2", "--eval-tasks", "none"]
RESUME += ["--log-every", "1"]


@pytest.mark.parametrize("loss", ["ce", "flyp"])
def test_sigkill_then_resume_is_bitwise_identical_to_an_unbroken_run(tmp_path, capsys, loss):
    train_tiny(tmp_path / "unbroken", capsys, *RESUME[len(TINY) :], "--loss", loss, steps=16)
    killed = tmp_path / "killed"
    flags = [*RESUME, "--loss", loss, "--workers", "2", "--out", killed]
    command = [sys.executable, str(HERE / "ldifs.py"), *map(str, flags)]
    process = subprocess.Popen(command, env=run_env(flags), stderr=subprocess.DEVNULL, cwd=HERE)
    deadline = time.time() + 120
    while (
        not (killed / "checkpoint.pt").exists()
        and process.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert 2 <= torch.load(killed / "checkpoint.pt", weights_only=True)["step"] < 16
    code, _, err = run_main(ldifs, [*flags, "--resume"], capsys)
    assert code == 0, err
    for name in ("open_clip_pytorch_model.bin", "head.pt"):
        assert same_weights(weights_of(tmp_path / "unbroken", name), weights_of(killed, name))
    assert [r["step"] for r in read_log(killed)] == list(range(1, 17))  # none twice


def test_a_resume_with_other_settings_or_a_corrupt_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    train_tiny(out, capsys, *RESUME[len(TINY) :], steps=16)
    (out / "metrics.json").unlink()  # as if killed after its last checkpoint
    code, _, err = run_main(
        ldifs, [*RESUME, "--out", out, "--resume", "--lr", "0.1", "--taps", "ln_pre"], capsys
    )
    assert (
        code == 2
        and "--resume with other settings than the checkpoint: lr 0.1 (checkpoint: 0.001)" in err
    )
    assert "taps ['ln_pre'] (checkpoint: ['ln_pre', 'transformer.resblocks.0'" in err
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    code, _, err = run_main(ldifs, [*RESUME, "--out", out, "--resume"], capsys)
    assert code == 1 and f"cannot read {out / 'checkpoint.pt'}: " in err and "delete it" in err


def test_a_run_killed_in_the_forgetting_evaluation_keeps_what_it_measured(
    tmp_path, capsys, monkeypatch
):
    """The test accuracy and each eval task's row are saved as they are measured: the resumed
    run measures only the other tasks, and keeps the first process's throughput."""
    flags = [
        "--eval-tasks",
        "synthetic-stripes,mnist",
        "--data-root",
        tmp_path / "data",
        "--no-download",
    ]
    real, measured, kill = ldifs.forgetting_on, [], [True]

    def killed_at_mnist(task, *args):
        if task.name == "mnist" and kill[0]:
            raise KeyboardInterrupt
        measured.append(task.name)
        return real(task, *args)

    monkeypatch.setattr(ldifs, "forgetting_on", killed_at_mnist)
    argv = [*TINY, "--max-steps", "4", "--out", tmp_path / "run", *flags]
    assert run_main(ldifs, argv, capsys)[0] == 130
    first = json.loads((tmp_path / "run/metrics.json").read_text())
    assert "test_accuracy" in first and list(first["forgetting_so_far"]) == ["synthetic-stripes"]
    measured.append("killed")
    kill[0] = False
    code, out, err = run_main(ldifs, [*argv, "--resume"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert measured == ["synthetic-stripes", "killed", "mnist"]  # stripes not measured again
    assert (
        metrics["forgetting"]["synthetic-stripes"]
        == first["forgetting_so_far"]["synthetic-stripes"]
    )
    assert "skipped" in metrics["forgetting"]["mnist"] and "forgetting_so_far" not in metrics
    assert metrics["train_images_per_second"] == first["train_images_per_second"]
    code, out, _ = run_main(ldifs, [*argv, "--resume"], capsys)  # finished: nothing to do
    assert code == 0 and "already finished" in out


def test_a_non_finite_loss_or_weight_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch
):
    """A NaN loss at step 3, or an inf weight after step 4's update, between log lines: the
    checkpoint of step 4 is never written, and step 2's stays."""
    loss, make_optimizer, calls = ldifs.ldifs_loss, ldifs.make_optimizer, []

    def nan_at_step_3(*args):
        calls.append(1)
        ce, distance = loss(*args)
        return (ce * float("nan") if len(calls) == 3 else ce), distance

    def inf_after_step_4(params, args):
        optimizer = make_optimizer(params, args)
        step = optimizer.step

        def poisoned():
            step()
            calls.append(1)
            if len(calls) == 4:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")

        optimizer.step = poisoned
        return optimizer

    for what, patch in (
        ("loss", ("ldifs_loss", nan_at_step_3)),
        ("weights", ("make_optimizer", inf_after_step_4)),
    ):
        calls.clear()
        with monkeypatch.context() as context:
            context.setattr(ldifs, *patch)
            argv = [*RESUME, "--log-every", "10", "--out", tmp_path / what]
            code, _, err = run_main(ldifs, argv, capsys)
        assert code == 1 and f"the {what} became non-finite by step 4" in err, err
        saved = torch.load(tmp_path / what / "checkpoint.pt", weights_only=True)
        assert saved["step"] == 2 and all(v.isfinite().all() for v in saved["model"].values())


def test_a_failed_save_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    ldifs.write_json({"old": 1}, path)

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        ldifs.atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["metrics.json"]


# ------------------------------------------------------------------ continual fine-tuning

SEQUENCE = [
    *TINY[:1],
    "synthetic,synthetic-stripes",
    *TINY[2:],
    "--max-steps",
    "6",
    "--save-every",
    "2",
    "--head",
    "zs",
]


@pytest.mark.parametrize("loss", ["ce", "flyp-ce"])
def test_continual_reference_is_the_previous_stage_and_heads_are_per_task(
    tmp_path, capsys, monkeypatch, loss
):
    references, ends, real = [], [], ldifs.finetune

    def spy(clip, reference, *rest):
        references.append(copy.deepcopy(reference.state_dict()))
        head = real(clip, reference, *rest)
        ends.append(copy.deepcopy(clip.visual.state_dict()))
        return head

    monkeypatch.setattr(ldifs, "finetune", spy)
    code, out, err = run_main(ldifs, [*SEQUENCE, "--loss", loss, "--out", tmp_path], capsys)
    assert code == 0, err
    assert same_weights(references[1], ends[0]) and not same_weights(references[1], references[0])
    heads = [weights_of(tmp_path / d, "head.pt") for d in ("0-synthetic", "1-synthetic-stripes")]
    assert [h["weight"].shape[0] for h in heads] == [6, 4]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    matrix = summary["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2] and all(
        0 <= a <= 1 for row in matrix for a in row
    )
    assert summary["backward_transfer"] == pytest.approx(matrix[1][0] - matrix[0][0])
    assert summary["average_accuracy"] == pytest.approx(sum(matrix[1]) / 2)
    assert "backward transfer" in out
    if loss != "ce":  # FLYP scores an earlier task with the text tower it has now
        final = f"local-dir:{tmp_path / '1-synthetic-stripes'}"
        clip, _, transform = open_clip.create_model_and_transforms(final)
        assert matrix[1][0] == pytest.approx(zero_shot_accuracy(clip, transform, "synthetic")[0])
        return
    references.clear()
    code, _, err = run_main(
        ldifs, [*SEQUENCE, "--reference", "pretrained", "--out", tmp_path / "p"], capsys
    )
    assert code == 0 and same_weights(references[0], references[1]), err


class Killed(Exception):
    pass


def test_continual_resume_mid_sequence_matches_an_unbroken_sequence(tmp_path, capsys, monkeypatch):
    assert run_main(ldifs, [*SEQUENCE, "--out", tmp_path / "unbroken"], capsys)[0] == 0
    real = ldifs.save_checkpoint

    def die_in_stage_1(classifier, optimizer, init_head, step, stage, args):
        real(classifier, optimizer, init_head, step, stage, args)
        if stage.index == 1 and step == 4:
            raise Killed

    monkeypatch.setattr(ldifs, "save_checkpoint", die_in_stage_1)
    with pytest.raises(Killed):
        run_main(ldifs, [*SEQUENCE, "--out", tmp_path / "broken"], capsys)
    monkeypatch.setattr(ldifs, "save_checkpoint", real)
    code, out, err = run_main(ldifs, [*SEQUENCE, "--out", tmp_path / "broken", "--resume"], capsys)
    assert code == 0 and "synthetic: already finished" in out, err
    for stage in ("0-synthetic", "1-synthetic-stripes"):
        assert same_weights(
            weights_of(tmp_path / "unbroken" / stage), weights_of(tmp_path / "broken" / stage)
        )


def test_wise_ft_of_a_continual_stage_starts_from_the_previous_stage(tmp_path, capsys):
    """Stage 1's initial head was fit on stage 0's encoder: alpha 0 of its WiSE-FT must be
    that encoder with that head, not the pre-trained encoder with a head fit elsewhere."""
    out = tmp_path / "seq"
    flags = ["--task", "synthetic,synthetic-stripes", "--max-steps", "20", "--eval-tasks", "none"]
    assert run_main(ldifs, [*flags, "--workers", "0", "--out", out], capsys)[0] == 0
    stage_0 = out / ldifs.stage_folder(0, "synthetic")
    _, rows = compare(capsys, stage_0, out, "--tasks", "synthetic-stripes", "--wise-ft", "0")
    pretrained, stage_0_run, _, _, stage_1_start = rows
    assert stage_1_start["alpha"] == 0 and stage_1_start["task"] == "synthetic-stripes"
    stripes = stage_0_run["a_lp"]["synthetic-stripes"]
    assert stripes != pretrained["a_lp"]["synthetic-stripes"]  # stage 0 moved the features
    assert stage_1_start["a_lp"]["synthetic-stripes"] == pytest.approx(stripes)
    assert stage_1_start["target_accuracy"] == pytest.approx(stripes)  # the LP-init head


# ------------------------------------------------------------------ several processes

TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SIX_LOGGED_STEPS = [
    *RESUME[: len(TINY) + 2],
    "--max-steps",
    "6",
    "--log-every",
    "1",
    "--batch-size",
    "16",
    "--eval-tasks",
    "none",
]


@pytest.mark.parametrize("loss", ["ce", "flyp"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, capsys, loss):
    """FLYP's contrastive loss spans the global batch: ClipLoss gathers it across ranks."""
    flags = [*SIX_LOGGED_STEPS, "--loss", loss]
    train_tiny(tmp_path / "one", capsys, *flags[len(TINY) :], steps=6)
    ddp = run_cli(*flags, "--out", tmp_path / "two", launcher=TORCHRUN_2)
    assert ddp.returncode == 0, ddp.stderr
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for key in ("loss/ce", "loss/ldifs"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-7), (
            key
        )
    assert json.loads((tmp_path / "two/metrics.json").read_text())["world_size"] == 2


# ------------------------------------------------------------------ any open_clip model


def with_cfg(model):
    model.pretrained_cfg = model.default_cfg = {}  # open_clip reads it; timm sets it for its own
    return model


def model_kwargs(kwargs):
    """What timm.create_model passes on, less its pretrained-weights bookkeeping."""
    return {
        k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"
    }


@register_model
def ldifs_tiny_vit(pretrained=False, **kwargs):
    vit = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    return with_cfg(VisionTransformer(**vit, **model_kwargs(kwargs)))


@register_model
def ldifs_tiny_convnext(pretrained=False, **kwargs):
    return with_cfg(ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), **model_kwargs(kwargs)))


@register_model
def ldifs_tiny_swin(pretrained=False, **kwargs):
    swin = dict(img_size=32, window_size=2, embed_dim=16, depths=(1,) * 4, num_heads=(1,) * 4)
    swin.update(drop_path_rate=0.0)  # timm's default 0.1 would make train and eval mode differ
    return with_cfg(SwinTransformer(**swin, **model_kwargs(kwargs)))


@pytest.mark.parametrize(
    "trunk, stem, stages",
    [
        ("vit", "norm_pre", "blocks"),
        ("convnext", "stem", "stages"),
        ("swin", "patch_embed", "layers"),
    ],
)
def test_timm_towers_train_with_ldifs_on_their_trunk(
    tmp_path, capsys, monkeypatch, trunk, stem, stages
):
    """The trunk's stem and stages are tapped; Swin's channels-last (B, H, W, C) maps reach
    ldifs_distance as (B, C, H, W), which it normalises over channels."""
    shapes, distance = [], ldifs.ldifs_distance

    def recorded(taps, ref_taps):
        shapes.append([t.shape for t in taps])
        return distance(taps, ref_taps)

    monkeypatch.setattr(ldifs, "ldifs_distance", recorded)
    vision = {
        "timm_model_name": f"ldifs_tiny_{trunk}",
        "timm_model_pretrained": False,
        "image_size": 32,
    }
    (tmp_path / f"ldifs-timm-{trunk}.json").write_text(
        json.dumps({**ldifs.TINY_CLIP_CONFIG, "vision_cfg": vision})
    )
    open_clip.add_model_config(tmp_path / f"ldifs-timm-{trunk}.json")
    out = tmp_path / "run"
    flags = [
        "--model",
        f"ldifs-timm-{trunk}",
        "--pretrained",
        "none",
        "--head",
        "zs",
        "--log-every",
        "1",
    ]
    metrics = train_tiny(out, capsys, *flags, "--eval-tasks", "none", steps=6)
    assert metrics["taps"] == [f"trunk.{stem}"] + [f"trunk.{stages}.{i}" for i in range(4)]
    distances = [r["ldifs_distance"] for r in read_log(out)]
    assert distances[0] < 1e-9 and distances[-1] > 100 * max(distances[0], 1e-12)
    if trunk == "swin":  # patch_embed and stage 0 at 8x8, then each stage halves and doubles
        channels = [(16, 8), (16, 8), (32, 4), (64, 2), (128, 1)]
        assert shapes[0] == [(64, c, s, s) for c, s in channels]


# ------------------------------------------------------------------ benchmarks (opt-in)

bench = pytest.mark.skipif(not os.environ.get("LDIFS_BENCH"), reason="set LDIFS_BENCH=1")


def step_images_per_second(model, batch_size, device, lam=0.0, steps=30):
    """Forward, backward and AdamW step of the tower and a linear head on one in-memory batch,
    bf16 and fused AdamW on CUDA, with the LDIFS term when lam > 0: the loop's cost floor."""
    clip, _, _ = ldifs.load_clip(model, "none", device)
    head = torch.nn.Linear(clip.visual.output_dim, 6, device=device)
    classifier, reference = ldifs.ImageClassifier(clip.visual, head), ldifs.frozen_copy(clip.visual)
    taps = ldifs.default_tap_names(clip.visual) if lam else []
    args = types.SimpleNamespace(device=device, lr=1e-5, wd=0.1, lam=lam, loss="ce")
    args.label_smoothing = 0.0
    optimizer = ldifs.make_optimizer(classifier.parameters(), args)
    images = torch.randn(batch_size, 3, *clip.visual.image_size, device=device)
    labels = torch.randint(6, (batch_size,), device=device)
    with (
        ldifs.recorded_taps(clip.visual, taps) as recorded,
        ldifs.recorded_taps(reference, taps) as ref,
    ):
        for step in range(steps):
            if step == 2:
                start = ldifs.sync_time(device)
            with ldifs.autocast(device):
                batch = (images, labels, None)
                ce, distance = ldifs.ldifs_loss(classifier, reference, recorded, ref, batch, args)
            optimizer.zero_grad()
            (ce + lam * distance).backward()
            optimizer.step()
    return (steps - 2) * batch_size / (ldifs.sync_time(device) - start)


def median(values):
    return sorted(values)[len(values) // 2]


@bench
def test_bench_ldifs_overhead_loop_efficiency_memory_and_loader(tmp_path):
    """FT and LDIFS through ldifs.py (median of 3, alternated), the bare loop, peak memory,
    and the loader and feature extraction alone, on 64 px JPEGs in a folder task."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"  # ViT-B/32 at the release's batch on a GPU; a small ViT on CPUs
    model, batch, steps, per_class = (
        ("ViT-B-32", 128, 120, 1600) if cuda else ("ViT-S-32", 16, 12, 100)
    )
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("test", 4)):
        for c in range(10):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for k in range(count):
                pixels = torch.randint(256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(
                    tmp_path / "data" / split / f"c{c}" / f"{k}.jpg", quality=90
                )
    flags = [
        "--task",
        f"folder:{tmp_path / 'data'}",
        "--model",
        model,
        "--pretrained",
        "none",
        "--head",
        "zs",
    ]
    flags += [
        "--batch-size",
        batch,
        "--max-steps",
        steps,
        "--eval-tasks",
        "none",
        "--device",
        device,
    ]
    flags += [] if cuda else ["--workers", "1"]
    runs = {"0": [], "10": []}
    for repeat in range(3):
        for lam in runs:  # a process each on the CPU, for its own peak RSS
            out = tmp_path / f"lam{lam}-{repeat}"
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                ldifs.main([*map(str, flags), "--lam", lam, "--out", str(out)])
            else:
                assert run_cli(*flags, "--lam", lam, "--out", out).returncode == 0
            runs[lam].append(json.loads((out / "metrics.json").read_text()))
            shutil.rmtree(out)
    ft, ld = (median([m["train_images_per_second"] for m in runs[lam]]) for lam in ("0", "10"))
    memory = [median([m["peak_memory_mb"] for m in runs[lam]]) for lam in ("0", "10")]
    bare, bare_ldifs = (step_images_per_second(model, batch, device, lam) for lam in (0, 10))
    _, train_tf, eval_tf = ldifs.load_clip(model, "none")
    images = ldifs.Samples(
        ldifs.folder_samples(tmp_path / "data/train", [f"c{c}" for c in range(10)]), None
    )
    augmented = ldifs.Transformed(images, train_tf, seed=0)
    loader = torch.utils.data.DataLoader(
        augmented,
        batch_sampler=list(ldifs.step_batches(len(images), batch, 0, 0, 40)),
        num_workers=ldifs.WORKERS,
    )
    for step, _ in enumerate(loader):
        if step == 2:
            start = time.perf_counter()
    loader_rate = 37 * batch / (time.perf_counter() - start)
    args = types.SimpleNamespace(device=device, workers=ldifs.WORKERS, eval_batch_size=256)
    clip, _, _ = ldifs.load_clip(model, "none", device)
    start = ldifs.sync_time(device)
    ldifs.extract_features(clip.visual, ldifs.Transformed(images, eval_tf), args)
    features = len(images) / (ldifs.sync_time(device) - start)
    card, workers = torch.cuda.get_device_name() if cuda else "CPU", f"{ldifs.WORKERS} workers"
    print(f"\n| figure ({card}, {model}, batch {batch}) | value |\n|---|---:|")
    for name, value in [
        ("FT (lam 0) training images/s, median of 3", f"{ft:.1f}"),
        ("LDIFS (lam 10) training images/s, median of 3", f"{ld:.1f}"),
        ("**LDIFS / FT throughput**", f"**{ld / ft:.2f}**"),
        ("bare loop images/s, FT / LDIFS", f"{bare:.1f} / {bare_ldifs:.1f}"),
        ("**in-file loop (FT) / bare loop**", f"**{ft / bare:.2f}**"),
        ("peak memory FT / LDIFS (MB)", f"{memory[0]:.0f} / {memory[1]:.0f}"),
        (
            f"loader alone: 64 px JPEGs decoded, augmented, {workers}, images/s",
            f"{loader_rate:.1f}",
        ),
        (f"feature extraction (fp32, {workers}), images/s", f"{features:.1f}"),
    ]:
        print(f"| {name} | {value} |")


# ------------------------------------------------------------------ the CUDA path (skipped on CPUs)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_bf16_steps_stay_finite_with_d_in_fp32_and_memory_is_cudas(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, "--device", "cuda", steps=6)
    torch.cuda.reset_peak_memory_stats()
    metrics = fit(args, stage, classifier, reference, data)
    log = read_log(stage.out)
    assert all(math.isfinite(r["loss/ce"]) and math.isfinite(r["ldifs_distance"]) for r in log)
    assert log[-1]["ldifs_distance"] > 0 and all(p.grad is None for p in reference.parameters())
    assert metrics["peak_memory_mb"] == pytest.approx(torch.cuda.max_memory_allocated() / 2**20)
    taps = [torch.randn(2, 5, 4, device="cuda").bfloat16() for _ in range(2)]
    with ldifs.autocast(args.device):
        assert ldifs.ldifs_distance(taps[:1], taps[1:]).dtype == torch.float32


@cuda
@pytest.mark.parametrize("loss", ["ce", "flyp"])
def test_cuda_torchrun_joins_over_nccl_and_logs_as_a_plain_run_does(tmp_path, loss):
    flags = [*SIX_LOGGED_STEPS, "--device", "cuda", "--loss", loss]
    plain = run_cli(*flags, "--out", tmp_path / "plain")
    nccl = run_cli(*flags, "--out", tmp_path / "nccl", launcher=[*TORCHRUN_2[:-1], "1"])
    assert plain.returncode == 0 and nccl.returncode == 0, plain.stderr + nccl.stderr
    one, other = read_log(tmp_path / "plain"), read_log(tmp_path / "nccl")
    for key in ("loss/ce", "ldifs_distance"):
        assert [r[key] for r in other] == pytest.approx([r[key] for r in one], rel=1e-3), key
