"""Checks of ldifs.py on a tiny CLIP and synthetic images: offline, about a minute on 2 CPU cores."""
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

import ldifs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).parent


def tiny_args(tmp_path, *flags):
    args = ldifs.parse_args(["--task", "synthetic", "--workers", "0", "--out", str(tmp_path), *flags])
    ldifs.resolve_args(args)
    return args


def tiny_setup(tmp_path, *flags, steps=8):
    """The pieces of a run, with a zero-shot head so CE starts high and has room to fall."""
    args = tiny_args(tmp_path, "--head", "zs", *flags)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    clip, train_tf, _ = ldifs.load_clip(args.model, args.pretrained)
    args.total_steps, args.taps, args.log_every = steps, ldifs.default_tap_names(clip.visual), 1
    reference = ldifs.frozen_copy(clip.visual)
    head = ldifs.zero_shot_head(clip, open_clip.get_tokenizer(args.model), ldifs.TASKS["synthetic"], "cpu")
    classifier = ldifs.ImageClassifier(clip.visual, head)
    data = ldifs.Augmented(ldifs.get_dataset("synthetic", "train", args.data_root), train_tf, args.seed)
    return args, classifier, reference, data


def read_log(args):
    return [json.loads(line) for line in (args.out / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the regulariser

def test_distance_is_zero_for_identical_taps():
    taps = [torch.randn(4, 7, 16), torch.randn(4, 7, 16)]
    assert ldifs.ldifs_distance(taps, [t.clone() for t in taps]).item() == 0.0


def test_distance_equals_closed_form_on_tokens():
    B, T, C = 3, 11, 24
    taps = [torch.randn(B, T, C, dtype=torch.float64) for _ in range(5)]
    refs = [torch.randn(B, T, C, dtype=torch.float64) for _ in range(5)]
    cos = torch.stack([F.cosine_similarity(h, h0, dim=1) for h, h0 in zip(taps, refs)])  # (5, B, C)
    closed_form = (2 / T) * (1 - cos).mean()
    assert torch.allclose(ldifs.ldifs_distance(taps, refs).double(), closed_form, rtol=1e-5)


def test_distance_normalises_over_tokens_not_channels():
    # Scaling one channel across all tokens changes nothing when each channel is
    # normalised over tokens (dim 1), but would change a per-token (last-dim) norm.
    h = torch.randn(2, 9, 8)
    h0 = torch.randn(2, 9, 8)
    scaled = h.clone()
    scaled[:, :, 3] *= 50
    before = ldifs.ldifs_distance([h], [h0])
    assert torch.allclose(ldifs.ldifs_distance([scaled], [h0]), before)
    per_token = ((F.normalize(scaled, dim=-1) - F.normalize(h0, dim=-1)) ** 2).mean()
    assert not torch.allclose(per_token, ((F.normalize(h, dim=-1) - F.normalize(h0, dim=-1)) ** 2).mean())


def test_distance_on_conv_maps_matches_lpips_style_reference():
    h, h0 = torch.randn(2, 6, 5, 4), torch.randn(2, 6, 5, 4)
    u = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    u0 = h0 / (h0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    expected = ((u - u0) ** 2).mean(dim=(1, 2, 3)).mean()
    assert torch.allclose(ldifs.ldifs_distance([h], [h0]), expected)


def test_distance_averages_taps_then_batch():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    c, d = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    both = ldifs.ldifs_distance([a, c], [b, d])
    assert torch.allclose(both, (ldifs.ldifs_distance([a], [b]) + ldifs.ldifs_distance([c], [d])) / 2)


# ------------------------------------------------------------------ taps and reference

def test_vit_taps_are_ln_pre_and_quarter_blocks_batch_first():
    clip, _, _ = ldifs.load_clip(ldifs.TINY_CLIP, "none")
    names = ldifs.default_tap_names(clip.visual)
    assert names == ["ln_pre"] + [f"transformer.resblocks.{i}" for i in (0, 1, 2, 3)]
    taps = ldifs.record_taps(clip.visual, names)
    clip.visual(torch.randn(3, 3, 32, 32))
    assert [tuple(t.shape) for t in taps.values()] == [(3, 17, 64)] * 5  # (B, 1 + 4x4 patches, width)


def test_vit_b32_taps_after_blocks_3_6_9_12():
    encoder = open_clip.create_model("ViT-B-32").visual
    assert ldifs.default_tap_names(encoder)[1:] == [f"transformer.resblocks.{i}" for i in (2, 5, 8, 11)]


def test_resnet_taps_are_stem_and_four_layers():
    visual = open_clip.create_model("RN50").visual
    names = ldifs.default_tap_names(visual)
    taps = ldifs.record_taps(visual, names)
    visual.eval()(torch.randn(1, 3, 224, 224))
    assert [t.shape[1] for t in taps.values()] == [64, 256, 512, 1024, 2048]
    assert all(t.dim() == 4 for t in taps.values())


def test_reference_is_frozen_and_unchanged_by_training(tmp_path):
    args, classifier, reference, data = tiny_setup(tmp_path, steps=3)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in classifier.encoder.state_dict().items()}
    ldifs.train(classifier, reference, data, args)
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.grad is None for p in reference.parameters())
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert not all(torch.equal(encoder_before[k], v) for k, v in classifier.encoder.state_dict().items())


def count_forwards(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_one_trainable_pass_per_step_and_one_reference_pass(tmp_path):
    args, classifier, reference, data = tiny_setup(tmp_path, steps=4)
    trainable, frozen = count_forwards(classifier.encoder), count_forwards(reference)
    ldifs.train(classifier, reference, data, args)
    assert len(trainable) == 4 and len(frozen) == 4


def test_lam_zero_never_runs_the_reference(tmp_path):
    args, classifier, reference, data = tiny_setup(tmp_path, "--lam", "0", steps=4)
    frozen = count_forwards(reference)
    ldifs.train(classifier, reference, data, args)
    assert frozen == []
    assert all(r["loss/ldifs"] == 0 for r in read_log(args))


# ------------------------------------------------------------------ training

def test_ce_falls_on_synthetic(tmp_path):
    args, classifier, reference, data = tiny_setup(tmp_path, "--lam", "0", steps=12)
    ldifs.train(classifier, reference, data, args)
    ce = [r["loss/ce"] for r in read_log(args)]
    assert sum(ce[-3:]) / 3 < 0.5 * sum(ce[:3]) / 3


def test_ldifs_term_is_zero_at_step_zero(tmp_path):
    args, classifier, reference, data = tiny_setup(tmp_path)
    taps = ldifs.record_taps(classifier.encoder, args.taps)
    ref_taps = ldifs.record_taps(reference, args.taps)
    images = torch.stack([data[i][0] for i in range(8)])
    labels = torch.tensor([data[i][1] for i in range(8)])
    ce, distance = ldifs.ldifs_loss(classifier.train(), reference, taps, ref_taps, images, labels, 10.0)
    # not bitwise 0: the frozen copy's attention may take torch's fused inference path
    assert abs(distance.item()) < 1e-10 and ce.item() > 0


def final_drift(tmp_path, lam):
    args, classifier, reference, data = tiny_setup(tmp_path, "--lam", str(lam), steps=15)
    ldifs.train(classifier, reference, data, args)
    images = torch.stack([data[i][0] for i in range(32)])
    taps = ldifs.record_taps(classifier.encoder, args.taps)
    ref_taps = ldifs.record_taps(reference, args.taps)
    with torch.no_grad():
        classifier.encoder.eval()(images)
        reference(images)
    return ldifs.ldifs_distance(list(taps.values()), list(ref_taps.values())).item()


def test_lam_reduces_feature_drift(tmp_path):
    assert final_drift(tmp_path / "ldifs", 10) < 0.5 * final_drift(tmp_path / "ft", 0)


def test_batches_depend_on_step_alone():
    full = list(ldifs.step_batches(100, 8, 0, 0, 30))
    assert list(ldifs.step_batches(100, 8, 0, 17, 30)) == full[17:]
    first_epoch = [i for b in full[:12] for i in b]  # 100 // 8 = 12 steps an epoch
    assert len(set(first_epoch)) == 96 and max(first_epoch) < 100
    assert min(i for b in full[12:24] for i in b) >= 100  # epoch 1 is encoded as 100 + image


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [ldifs.lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


# ------------------------------------------------------------------ the command line

def run_cli(*flags, script="ldifs.py"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(HERE / script), *flags], capture_output=True,
                          text=True, env=env, cwd=HERE)


def test_cli_writes_outputs_that_open_clip_loads(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--task", "synthetic", "--max-steps", "12", "--workers", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "QuickGELU mismatch" not in result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ["task", "lam", "model", "pretrained", "steps", "epochs", "test_accuracy",
                "train_images_per_second"]:
        assert key in metrics
    assert metrics["steps"] == 12 and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["train_images_per_second"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 12 and {"loss/ce", "loss/ldifs"} <= set(log[0])
    loaded = open_clip.create_model(f"local-dir:{out}")
    ldifs.register_tiny_clip()
    by_name = open_clip.create_model(ldifs.TINY_CLIP, pretrained=str(out / "open_clip_pytorch_model.bin"))
    saved = torch.load(out / "open_clip_pytorch_model.bin", weights_only=True)
    for model in (loaded, by_name):
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    head = torch.load(out / "head.pt", weights_only=True)
    assert head["weight"].shape == (len(ldifs.TASKS["synthetic"].classnames), 64)


def test_openai_weights_are_built_with_quick_gelu():
    assert ldifs.needs_quick_gelu("ViT-B-32", "openai")
    assert not ldifs.needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not ldifs.needs_quick_gelu("ViT-B-32", None)


@pytest.mark.parametrize("flags, message", [
    (["--task", "eurosat", "--data-root", "{tmp}", "--no-download"], "eurosat"),
    (["--task", "synthetic", "--model", "ViT-B-32", "--pretrained", "openai"], "could not download"),
    (["--task", "synthetic", "--model", "ViT-Nope"], "unknown model"),
    (["--task", "nope"], "unknown task"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, flags, message):
    result = run_cli(*[f.format(tmp=tmp_path) for f in flags], "--out", str(tmp_path / "out"))
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
