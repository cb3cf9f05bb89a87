"""Checks of ldifs.py on a tiny CLIP and synthetic images, offline, on 2 CPU cores."""

import argparse
import ast
import copy
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision
from packaging.requirements import Requirement
from PIL import Image
from timm.models import register_model
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer

import eval as evaluation
import ldifs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def no_gpu_but_for_the_cuda_tests(request, monkeypatch):
    """The checks compare CPU runs; the CUDA tests and the benchmarks pick the GPU themselves.
    NVML's count of GPUs goes too: GPUs that CUDA cannot start on are an error."""
    if not request.node.name.startswith(("test_cuda_", "test_bench_")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(autouse=True, scope="session")
def a_cache_of_their_own(tmp_path_factory):
    """One cache for the session's checks, in and out of this process, not the user's."""
    cache = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDIFS_CACHE", cache)
        patch.setattr(ldifs, "CACHE_DIR", cache)
        yield


def run_env(flags):
    """The environment of a run the checks start: a GPU machine's GPUs hidden unless the flags
    name a CUDA device, and no TQDM_* variable of the shell's (they set what the bars draw)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    env["HF_HUB_OFFLINE"] = "1"
    if not any(str(flag).startswith("cuda") for flag in flags):
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_the_checks_run_on_the_cpu_even_on_a_gpu_machine():
    """By default a run picks the GPU: on a GPU machine six checks here fed CPU tensors to a
    model on the GPU, and gloo's two-rank runs would have met on one GPU. The checks compare
    CPU runs, so they hide the GPUs from this process and the runs it starts; the CUDA tests
    and the benchmarks name their device."""
    assert ldifs.pick_device(None) == torch.device("cpu")
    assert run_env(["--task", "synthetic"])["CUDA_VISIBLE_DEVICES"] == ""
    visible = run_env(["--device", "cuda"]).get("CUDA_VISIBLE_DEVICES")
    assert visible == os.environ.get("CUDA_VISIBLE_DEVICES")


def test_the_checks_keep_their_cache_out_of_the_users(tmp_path_factory):
    """Runs that name no --cache-dir use $LDIFS_CACHE or ~/.cache/ldifs: the checks' entries
    would land in the user's cache, and a check would find a past session's probes there."""
    cache = Path(ldifs.parse_args([]).cache_dir)
    assert tmp_path_factory.getbasetemp() in cache.parents
    assert evaluation.parse_args(["runs/x"]).cache_dir == cache
    assert run_env([])["LDIFS_CACHE"] == str(cache)


def tiny_args(tmp_path, *flags):
    args = ldifs.parse_args(
        ["--task", "synthetic", "--workers", "0", "--out", str(tmp_path), *flags]
    )
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
    data = ldifs.Augmented(
        ldifs.get_dataset("synthetic", "train", args.data_root), train_tf, args.seed
    )
    return args, stage, classifier, reference, data


def fit(args, stage, classifier, reference, data):
    """ldifs.train from step 0 with a fresh optimizer, in this process."""
    optimizer = ldifs.make_optimizer(classifier.parameters(), args)
    init_head = {k: v.detach().clone() for k, v in classifier.head.state_dict().items()}
    return ldifs.train(classifier, reference, data, optimizer, init_head, 0, stage, args)


def strict_json(text):
    """json.loads that refuses NaN and Infinity, as JSON itself (and jq, and JS) do."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def read_log(stage):
    return read_log_at(stage.out)


def read_log_at(out):
    return [strict_json(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the regulariser


def test_distance_is_zero_for_identical_taps():
    taps = [torch.randn(4, 7, 16), torch.randn(4, 7, 16)]
    assert ldifs.ldifs_distance(taps, [t.clone() for t in taps]).item() == 0.0


def test_distance_equals_closed_form_on_tokens():
    B, T, C = 3, 11, 24
    taps = [torch.randn(B, T, C, dtype=torch.float64) for _ in range(5)]
    refs = [torch.randn(B, T, C, dtype=torch.float64) for _ in range(5)]
    cos = torch.stack(
        [F.cosine_similarity(h, h0, dim=1) for h, h0 in zip(taps, refs, strict=True)]
    )  # (5, B, C)
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
    assert not torch.allclose(
        per_token, ((F.normalize(h, dim=-1) - F.normalize(h0, dim=-1)) ** 2).mean()
    )


def test_distance_on_conv_maps_matches_lpips_style_reference():
    h, h0 = torch.randn(2, 6, 5, 4), torch.randn(2, 6, 5, 4)
    u = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    u0 = h0 / (h0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    expected = ((u - u0) ** 2).mean(dim=(1, 2, 3)).mean()
    assert torch.allclose(ldifs.ldifs_distance([h], [h0]), expected)


def test_distance_keeps_float64_and_upcasts_bfloat16():
    h, h0 = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    assert ldifs.ldifs_distance([h], [h0]).dtype == torch.float64
    low = ldifs.ldifs_distance([h.bfloat16()], [h0.bfloat16()])
    assert low.dtype == torch.float32


def test_distance_averages_taps_then_batch():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    c, d = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    both = ldifs.ldifs_distance([a, c], [b, d])
    assert torch.allclose(
        both, (ldifs.ldifs_distance([a], [b]) + ldifs.ldifs_distance([c], [d])) / 2
    )


def test_the_regulariser_runs_copied_into_a_file_that_imports_torch_alone():
    """README: ldifs_distance and recorded_taps depend on torch alone; copy them. Copied with
    `import contextlib, torch` and nothing of ldifs.py, they give ldifs.py's values."""
    copied = {}
    source = "\n\n".join(inspect.getsource(f) for f in (ldifs.ldifs_distance, ldifs.recorded_taps))
    exec("import contextlib\n\nimport torch\n\n" + source, copied)
    nhwc = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
    images = torch.randn(2, 5, 4, 3)  # (B, H, W, C)
    with copied["recorded_taps"](nhwc, ["0", "1"], channels_last=True) as taps:
        nhwc(images)
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
    reference = loop["reference"].state_dict()
    assert all(torch.equal(reference[k], v) for k, v in start.items())
    assert not all(torch.equal(encoder.state_dict()[k], v) for k, v in start.items())
    assert (loop["loss"] - loop["ce"]).item() > 0  # the last step's lam * D, once f has moved


# ------------------------------------------------------------------ taps and reference


def test_vit_taps_are_ln_pre_and_quarter_blocks_batch_first():
    clip, _, _ = ldifs.load_clip(ldifs.TINY_CLIP, "none")
    names = ldifs.default_tap_names(clip.visual)
    assert names == ["ln_pre"] + [f"transformer.resblocks.{i}" for i in (0, 1, 2, 3)]
    with ldifs.recorded_taps(clip.visual, names) as taps:
        clip.visual(torch.randn(3, 3, 32, 32))
    assert [tuple(t.shape) for t in taps.values()] == [
        (3, 17, 64)
    ] * 5  # (B, 1 + 4x4 patches, width)
    clip.visual(torch.randn(2, 3, 32, 32))
    assert taps["ln_pre"].shape[0] == 3  # the hooks are gone after the block


def test_vit_b32_taps_after_blocks_3_6_9_12():
    encoder = open_clip.create_model("ViT-B-32").visual
    assert ldifs.default_tap_names(encoder)[1:] == [
        f"transformer.resblocks.{i}" for i in (2, 5, 8, 11)
    ]


def test_resnet_taps_are_stem_and_four_layers():
    visual = open_clip.create_model("RN50").visual
    names = ldifs.default_tap_names(visual)
    with ldifs.recorded_taps(visual, names) as taps:
        visual.eval()(torch.randn(1, 3, 224, 224))
    assert [t.shape[1] for t in taps.values()] == [64, 256, 512, 1024, 2048]
    assert all(t.dim() == 4 for t in taps.values())


def test_reference_is_frozen_and_unchanged_by_training(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, steps=3)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in classifier.encoder.state_dict().items()}
    fit(args, stage, classifier, reference, data)
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.grad is None for p in reference.parameters())
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert not all(
        torch.equal(encoder_before[k], v) for k, v in classifier.encoder.state_dict().items()
    )


def count_forwards(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_one_trainable_pass_per_step_and_one_reference_pass(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, steps=4)
    trainable, frozen = count_forwards(classifier.encoder), count_forwards(reference)
    fit(args, stage, classifier, reference, data)
    assert len(trainable) == 4 and len(frozen) == 4


def test_lam_zero_never_runs_the_reference(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, "--lam", "0", steps=4)
    frozen = count_forwards(reference)
    fit(args, stage, classifier, reference, data)
    assert frozen == []
    assert all(r["loss/ldifs"] == 0 for r in read_log(stage))


# ------------------------------------------------------------------ training


def test_ce_falls_on_synthetic(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, "--lam", "0", steps=12)
    fit(args, stage, classifier, reference, data)
    ce = [r["loss/ce"] for r in read_log(stage)]
    assert sum(ce[-3:]) / 3 < 0.5 * sum(ce[:3]) / 3


def test_log_lines_are_strict_json_with_null_for_an_unmeasured_rate(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, steps=4)
    fit(args, stage, classifier, reference, data)
    rates = [r["images_per_second"] for r in read_log(stage)]
    # the clock starts after two steps, so the first two lines have no rate yet
    assert rates[:2] == [None, None] and all(rate > 0 for rate in rates[2:])


def test_images_per_second_leave_out_checkpoint_writes(tmp_path, monkeypatch):
    """On a fake clock, each step takes 1 s and each checkpoint write 1000 s: the rate is one
    batch a second."""
    args, stage, classifier, reference, data = tiny_setup(tmp_path, "--save-every", "2", steps=6)
    now = [0.0]
    step_lr, save = ldifs.lr_at, ldifs.save_checkpoint
    monkeypatch.setattr(ldifs, "sync_time", lambda device: now[0])
    monkeypatch.setattr(ldifs, "lr_at", lambda *a: now.__setitem__(0, now[0] + 1) or step_lr(*a))
    monkeypatch.setattr(
        ldifs, "save_checkpoint", lambda *a: now.__setitem__(0, now[0] + 1000) or save(*a)
    )
    metrics = fit(args, stage, classifier, reference, data)
    assert metrics["train_images_per_second"] == args.batch_size
    assert [r["images_per_second"] for r in read_log(stage)][2:] == [args.batch_size] * 4


def test_the_clock_waits_for_the_gpu_that_trains_not_the_current_one(monkeypatch):
    """torch.cuda.synchronize() waits for the current GPU, cuda:0: a run on --device cuda:1
    timed the kernels it had queued, not the ones it ran, so images/s was off (a checkpoint's
    pause, left out of it, took in the training still queued). A Mac's GPU (mps) is as
    asynchronous, and was not waited for at all."""
    waited = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: waited.append(device))
    for device in ("cuda:1", "mps", "cpu"):
        ldifs.sync_time(torch.device(device))
    assert waited == [torch.device("cuda", 1), torch.device("mps")]


def test_checkpoints_come_every_save_every_steps_at_epoch_ends_and_last_with_0_those_alone(
    tmp_path,
):
    """README: --save-every 0 leaves the checkpoints at each epoch's end and the last step."""
    stage = types.SimpleNamespace(total_steps=25)  # 100 images, batch 10: 10 steps an epoch
    for every, expected in [("4", [4, 8, 10, 12, 16, 20, 24, 25]), ("0", [10, 20, 25])]:
        args = tiny_args(tmp_path, "--save-every", every, "--batch-size", "10")
        steps = [s for s in range(1, 26) if ldifs.is_checkpoint_step(s, 100, stage, args)]
        assert steps == expected


def test_a_run_from_step_zero_replaces_the_log_of_one_killed_before_its_checkpoint(tmp_path):
    """A run killed before its first checkpoint leaves log lines and nothing to resume; the
    run that starts over must not append its lines to them."""
    args, stage, classifier, reference, data = tiny_setup(tmp_path, steps=3)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss/ce": 9.9}\n{"step": 2}\n')
    fit(args, stage, classifier, reference, data)
    assert [line["step"] for line in read_log(stage)] == [1, 2, 3]


def test_workers_uint8_images_finished_on_the_device_are_the_transforms_bitwise(tmp_path):
    """The loader's workers hand over uint8 images; `finish` scales and normalises the batch.
    Together they give open_clip's transform of the same image (the train transform's with
    the same seeded crop), and leave the process's random state alone."""
    _, train_tf, eval_tf = ldifs.load_clip(ldifs.TINY_CLIP, "none")
    data = ldifs.get_dataset("synthetic", "train", tmp_path)
    augmented = ldifs.Augmented(data, train_tf, seed=3)
    state = torch.get_rng_state()
    crops = [augmented[5 * len(data) + i][0] for i in (7, 8)]  # epoch 5, images 7 and 8
    assert torch.equal(torch.get_rng_state(), state)
    assert all(crop.dtype == torch.uint8 for crop in crops)
    expected = []
    for i in (7, 8):
        torch.manual_seed(hash((3, 5, i)))
        expected.append(train_tf(data[i][0]))
    assert torch.equal(augmented.finish(torch.stack(crops)), torch.stack(expected))
    assert not torch.equal(expected[0], train_tf(data[7][0]))  # the seed picked the crop
    test = ldifs.Transformed(data, eval_tf)
    assert test[7][0].dtype == torch.uint8
    assert torch.equal(test.finish(test[7][0][None]), eval_tf(data[7][0])[None])


def test_features_of_a_transformed_dataset_are_those_of_its_transformed_images(tmp_path):
    clip, _, eval_tf = ldifs.load_clip(ldifs.TINY_CLIP, "none")
    data = torch.utils.data.Subset(ldifs.get_dataset("synthetic", "test", tmp_path), range(6))
    args = types.SimpleNamespace(workers=0, eval_batch_size=4, device=torch.device("cpu"))
    x, y = ldifs.extract_features(clip.visual, ldifs.Transformed(data, eval_tf), args)
    by_hand = [(eval_tf(image), label) for image, label in data]
    x_by_hand, y_by_hand = ldifs.extract_features(clip.visual, by_hand, args)
    assert torch.equal(x, x_by_hand) and torch.equal(y, y_by_hand)


def test_ldifs_term_is_zero_at_step_zero(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path)
    images = data.finish(torch.stack([data[i][0] for i in range(8)]))
    labels = torch.tensor([data[i][1] for i in range(8)])
    with (
        ldifs.recorded_taps(classifier.encoder, stage.taps) as taps,
        ldifs.recorded_taps(reference, stage.taps) as ref_taps,
    ):
        ce, distance = ldifs.ldifs_loss(
            classifier.train(), reference, taps, ref_taps, images, labels, 10.0
        )
    # not bitwise 0: the frozen copy's attention may take torch's fused inference path
    assert abs(distance.item()) < 1e-10 and ce.item() > 0


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
    logged = read_log(stage)[0]["loss/ce"]
    expected = F.cross_entropy(logits, labels, label_smoothing=0.2).item()
    assert logged == pytest.approx(expected, rel=1e-5)
    assert abs(F.cross_entropy(logits, labels).item() - expected) > 1e-3


def final_drift(tmp_path, lam):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, "--lam", str(lam), steps=15)
    fit(args, stage, classifier, reference, data)
    images = data.finish(torch.stack([data[i][0] for i in range(32)]))
    with (
        ldifs.recorded_taps(classifier.encoder, stage.taps) as taps,
        ldifs.recorded_taps(reference, stage.taps) as ref_taps,
    ):
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


def test_tf32_matmuls_are_on_in_training_alone(tmp_path, capsys, monkeypatch):
    """TF32 speeds up the fp32 matmuls that bf16 autocast leaves in training on CUDA; the
    probes' and zero-shot features stay in full fp32, as the release's (torch 2.0 leaves TF32
    matmuls off). The flag is read on the CPU too, so this holds here."""
    seen = {"train": set(), "eval": set()}

    def spy(original, phase):
        def recording(*args, **kwargs):
            seen[phase].add(torch.backends.cuda.matmul.allow_tf32)
            return original(*args, **kwargs)

        return recording

    monkeypatch.setattr(ldifs, "ldifs_loss", spy(ldifs.ldifs_loss, "train"))
    monkeypatch.setattr(ldifs, "extract_features", spy(ldifs.extract_features, "eval"))
    flags = ["--task", "synthetic", "--max-steps", "2", "--warmup", "1", "--workers", "0"]
    flags += ["--eval-tasks", "synthetic-stripes", "--out", str(tmp_path / "run")]
    assert run_main(ldifs, flags, capsys)[0] == 0
    assert seen == {"train": {True}, "eval": {False}}
    assert not torch.backends.cuda.matmul.allow_tf32


def test_a_warm_up_as_long_as_the_run_is_warned_of(tmp_path, capsys):
    """The release's 500 warm-up steps outlast a short run (--max-steps, --epochs 1 on a
    small task): the lr then never reaches --lr, which a user should hear."""
    tasks = [ldifs.TASKS["synthetic"]]
    for steps, warned in [(9, True), (10, False)]:  # the 10th step is at --lr
        args = tiny_args(tmp_path, "--max-steps", str(steps), "--warmup", "10")
        ldifs.plan_stage(0, tasks, 2400, ["ln_pre"], (0, 1), args)
        assert ("lr never peaks" in capsys.readouterr().err) == warned


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [ldifs.lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


# ------------------------------------------------------------------ the command line


def run_main(module, argv, capsys):
    """The CLI's main() in this process (no 4 s import): (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        module.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def ctrl_c(*_args):
    """Stands in for a step that the user stops with Ctrl-C (or SIGTERM)."""
    raise KeyboardInterrupt


def run_cli(*flags, script="ldifs.py", launcher=(), env=None):
    return subprocess.run(
        [sys.executable, *launcher, str(HERE / script), *flags],
        capture_output=True,
        text=True,
        env={**run_env(flags), **(env or {})},
        cwd=HERE,
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short synthetic runs from the CLI, lam 0 and lam 10, evaluated on the stripes task."""
    root = tmp_path_factory.mktemp("runs")
    results = {}
    for lam in ("0", "10"):
        out = root / f"lam{lam}"
        results[lam] = run_cli(
            "--task",
            "synthetic",
            "--lam",
            lam,
            "--max-steps",
            "12",
            "--workers",
            "0",
            "--out",
            str(out),
            "--cache-dir",
            str(root / "cache"),
        )
        assert results[lam].returncode == 0, results[lam].stderr
    return root, results


def test_cli_writes_outputs_that_open_clip_loads(two_runs):
    root, results = two_runs
    out, result = root / "lam10", results["10"]
    assert "QuickGELU mismatch" not in result.stdout + result.stderr
    metrics = strict_json((out / "metrics.json").read_text())
    for key in [
        "task",
        "lam",
        "model",
        "pretrained",
        "steps",
        "epochs",
        "test_accuracy",
        "train_images_per_second",
    ]:
        assert key in metrics
    assert metrics["steps"] == 12 and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["train_images_per_second"] > 0
    log = read_log_at(out)
    assert log[-1]["step"] == 12 and {"loss/ce", "loss/ldifs"} <= set(log[0])
    loaded = open_clip.create_model(f"local-dir:{out}")
    ldifs.register_tiny_clip()
    by_name = open_clip.create_model(
        ldifs.TINY_CLIP, pretrained=str(out / "open_clip_pytorch_model.bin")
    )
    saved = torch.load(out / "open_clip_pytorch_model.bin", weights_only=True)
    for model in (loaded, by_name):
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    head = torch.load(out / "head.pt", weights_only=True)
    assert (
        head["weight"].shape
        == head["init_weight"].shape
        == (len(ldifs.TASKS["synthetic"].classnames), 64)
    )
    assert (
        head["bias"].shape == head["init_bias"].shape == (len(ldifs.TASKS["synthetic"].classnames),)
    )
    assert not torch.equal(head["bias"], head["init_bias"])  # the bias trains with the encoder


def test_run_ends_with_a_forgetting_table(two_runs):
    root, results = two_runs
    assert "| synthetic-stripes |" in results["10"].stdout and "Δ_LP" in results["10"].stdout
    row = json.loads((root / "lam10/metrics.json").read_text())["forgetting"]["synthetic-stripes"]
    assert set(row) == {
        "zs_pretrained",
        "zs_finetuned",
        "delta_zs",
        "lp_pretrained",
        "lp_finetuned",
        "delta_lp",
    }
    assert row["delta_lp"] == pytest.approx(row["lp_finetuned"] - row["lp_pretrained"])
    assert all(0 <= row[k] <= 1 for k in row if not k.startswith("delta"))


def compare_runs(root, tmp_path, *flags):
    """eval.py on the two runs with one WiSE-FT mix; the results as JSON in tmp_path/e.json."""
    runs, cache, out = (
        [str(root / "lam0"), str(root / "lam10")],
        str(root / "cache"),
        tmp_path / "e.json",
    )
    flags = ["--wise-ft", "0.5", "--workers", "0", "--cache-dir", cache, "--json", str(out), *flags]
    result = run_cli(*runs, *flags, script="eval.py")
    assert result.returncode == 0, result.stderr
    return result


def test_eval_compares_runs_and_wise_ft(two_runs, tmp_path):
    root, _ = two_runs
    result = compare_runs(root, tmp_path)
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    labels = [line.split("|")[1].strip() for line in table[1:]]
    assert (
        labels[0].startswith("pre-trained")
        and "synthetic FT" in labels
        and "synthetic LDIFS (lam 10)" in labels
    )
    assert sum("WiSE-FT alpha 0.5" in label for label in labels) == 2
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    pre = rows[0]["a_lp"]["synthetic-stripes"]
    assert all(
        r["delta_lp"]["synthetic-stripes"] == pytest.approx(r["a_lp"]["synthetic-stripes"] - pre)
        for r in rows
    )
    ft = next(r for r in rows if r["label"] == "synthetic FT")
    recorded = json.loads((root / "lam0/metrics.json").read_text())["test_accuracy"]
    assert ft["target_accuracy"] == pytest.approx(recorded)  # the same head on the same split


def test_eval_rebuilds_the_random_weights_a_run_started_from(two_runs, tmp_path):
    """The runs use --pretrained none: eval.py must draw the same random encoder as ldifs.py
    did (it drew an unseeded one), so its baseline matches the run's own, without the cache."""
    root, _ = two_runs
    out, cache = tmp_path / "e.json", tmp_path / "fresh-cache"
    flags = ["--tasks", "synthetic-stripes", "--workers", "0", "--cache-dir", str(cache)]
    result = run_cli(str(root / "lam10"), *flags, "--json", str(out), script="eval.py")
    assert result.returncode == 0, result.stderr
    baseline = json.loads(out.read_text())["rows"][0]["a_lp"]["synthetic-stripes"]
    recorded = json.loads((root / "lam10/metrics.json").read_text())["forgetting"]
    assert baseline == pytest.approx(recorded["synthetic-stripes"]["lp_pretrained"])


def test_a_killed_eval_goes_on_where_it_stopped(two_runs, tmp_path, capsys, monkeypatch):
    """Each A_LP eval.py computes is kept in the cache: a rerun after Ctrl-C (or SIGTERM)
    fits only the probes the killed one had not finished, and gives the same table."""
    runs = [str(two_runs[0] / p) for p in ("lam0", "lam10")]
    flags = ["--tasks", "synthetic-stripes", "--wise-ft", "0.5", "--workers", "0"]
    fits, probe, killed = [], ldifs.linear_probe, [True]

    def counted(*a, **k):
        fits.append(1)
        if len(fits) == 3 and killed[0]:  # two probes finished: the baseline's and one mix's
            raise KeyboardInterrupt
        return probe(*a, **k)

    monkeypatch.setattr(ldifs, "linear_probe", counted)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    code, _, err = run_main(evaluation, [*runs, *flags, *cache], capsys)
    assert code == 130 and "interrupted" in err, err
    fits.clear()
    killed[0] = False
    code, resumed, err = run_main(evaluation, [*runs, *flags, *cache], capsys)
    assert code == 0, err
    assert len(fits) == 5 - 2  # baseline, then alpha 1 and 0.5 of each run; two were kept
    fresh = ["--cache-dir", str(tmp_path / "fresh")]
    assert run_main(evaluation, [*runs, *flags, *fresh], capsys)[1] == resumed
    assert len(fits) == 3 + 5


def test_the_encoder_digest_names_the_layers_and_the_weights():
    ldifs.register_tiny_clip()
    encoder = open_clip.create_model(ldifs.TINY_CLIP).visual
    same = copy.deepcopy(encoder)
    assert ldifs.encoder_digest(same) == ldifs.encoder_digest(encoder)
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-6
    assert ldifs.encoder_digest(same) != ldifs.encoder_digest(encoder)
    quick = open_clip.create_model(ldifs.TINY_CLIP, force_quick_gelu=True).visual
    quick.load_state_dict(encoder.state_dict())  # the same weights, another activation
    assert ldifs.encoder_digest(quick) != ldifs.encoder_digest(encoder)


def test_eval_keeps_no_a_lp_of_another_key_or_a_corrupt_one_and_warns_when_it_cannot(
    tmp_path, capsys
):
    path, key = tmp_path / "a_lp.json", {"encoder": "digest", "task": "t", "split": "a_lp"}
    assert ldifs.kept_a_lp(path, key) is None
    ldifs.keep_a_lp(0.5, path, key)
    assert ldifs.kept_a_lp(path, key) == 0.5
    assert ldifs.kept_a_lp(path, {**key, "encoder": "another"}) is None
    path.write_text(path.read_text()[:10])
    assert ldifs.kept_a_lp(path, key) is None
    (tmp_path / "file").write_text("")
    ldifs.keep_a_lp(0.5, tmp_path / "file/cache/a_lp.json", key)  # not a folder
    assert f"cannot cache in {tmp_path / 'file/cache'}" in capsys.readouterr().err


def test_eval_gives_each_mix_one_row(two_runs, tmp_path, capsys):
    run, out = str(two_runs[0] / "lam0"), tmp_path / "e.json"
    flags = ["--tasks", "none", "--wise-ft", "0.5,1,0.5", "--workers", "0", "--json", str(out)]
    code, _, err = run_main(evaluation, [run, *flags], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [r.get("alpha") for r in rows] == [None, 1.0, 0.5]
    assert rows[1]["label"] == "synthetic FT"


def test_eval_tells_runs_of_the_same_method_apart_by_their_folders(two_runs, tmp_path, capsys):
    """Two runs of one task and method (say two seeds) got the same row label: a table whose
    rows cannot be told apart. Those labels name the run's folder; a unique one does not."""
    shutil.copytree(two_runs[0] / "lam10", tmp_path / "seed1")
    runs = [str(two_runs[0] / p) for p in ("lam10", "lam0")] + [str(tmp_path / "seed1")]
    flags = [
        "--tasks",
        "none",
        "--wise-ft",
        "0.5",
        "--workers",
        "0",
        "--json",
        str(tmp_path / "e.json"),
    ]
    code, _, err = run_main(evaluation, [*runs, *flags], capsys)
    assert code == 0, err
    labels = [r["label"] for r in json.loads((tmp_path / "e.json").read_text())["rows"][1:]]
    ldifs_label = "synthetic LDIFS (lam 10)"
    assert labels == [
        f"{ldifs_label} ({runs[0]})",
        f"  WiSE-FT alpha 0.5 of {ldifs_label} ({runs[0]})",
        "synthetic FT",
        "  WiSE-FT alpha 0.5 of synthetic FT",
        f"{ldifs_label} ({runs[2]})",
        f"  WiSE-FT alpha 0.5 of {ldifs_label} ({runs[2]})",
    ]


def test_eval_rejects_a_path_that_is_not_a_run(tmp_path):
    result = run_cli(str(tmp_path), script="eval.py")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "not a run directory" in result.stderr


def test_eval_says_a_misspelt_run_path_does_not_exist(tmp_path, capsys):
    code, _, err = run_main(evaluation, [str(tmp_path / "lamm10")], capsys)
    assert code == 2 and f"no such folder: {tmp_path / 'lamm10'}" in err, err


def test_eval_says_a_file_named_as_a_run_is_a_file(tmp_path, capsys):
    """A run's metrics.json, or a file that `runs/*` caught, was called a folder with no
    metrics.json in it."""
    (tmp_path / "metrics.json").write_text("{}")
    code, _, err = run_main(evaluation, [str(tmp_path / "metrics.json")], capsys)
    assert code == 2 and f"{tmp_path / 'metrics.json'} is a file, not a run directory" in err, err


def test_eval_tells_an_unfinished_run_from_a_folder_that_is_no_run(tmp_path, capsys):
    """A run killed before it finished has checkpoints but no metrics.json: say so."""
    (tmp_path / "1-svhn").mkdir()
    (tmp_path / "1-svhn/checkpoint.pt").write_bytes(b"")
    code, _, err = run_main(evaluation, [str(tmp_path)], capsys)
    assert code == 2 and "is an unfinished run: finish it with ldifs.py --resume" in err


def test_eval_of_the_folder_that_holds_the_runs_names_one_of_them(two_runs, capsys):
    """`python eval.py runs` names the folder ldifs.py writes its runs into, not a run."""
    root = two_runs[0]
    code, _, err = run_main(evaluation, [str(root)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{root} holds runs but is not one; name them, e.g. {root / 'lam0'}" in err


def copy_run(run, to, **metrics):
    """A copy of the run in `to`, with `metrics` changed in its metrics.json."""
    to.mkdir(exist_ok=True)
    for name in ("open_clip_pytorch_model.bin", "head.pt"):
        (to / name).write_bytes((run / name).read_bytes())
    recorded = json.loads((run / "metrics.json").read_text())
    (to / "metrics.json").write_text(json.dumps({**recorded, **metrics}))
    return to


def resident_mb():
    """This process's resident memory now (Linux), not its peak."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_eval_maps_the_runs_weights_rather_than_reading_them_all_into_memory(two_runs, tmp_path):
    """eval.py loads every run before it evaluates any: read into memory, four ViT-B/32 runs
    took 2.3 GB before the first row. Mapped from their files, they take none until used."""
    run = copy_run(two_runs[0] / "lam0", tmp_path / "run")
    torch.save({"visual.big": torch.ones(2**25)}, run / "open_clip_pytorch_model.bin")  # 128 MB
    before = resident_mb()
    loaded = evaluation.load_run(run)
    assert resident_mb() - before < 32
    assert float(loaded["weights"]["visual.big"].sum()) == 2**25  # it is all there


def test_eval_reads_the_data_where_the_runs_were_trained_unless_told(
    two_runs, tmp_path, capsys, monkeypatch
):
    """A run trained with --data-root /scratch/data, then `eval.py RUN`: eval.py looked in
    ~/data, and downloaded every eval task there again (1.5 GB for the default seven). A
    recorded folder that is not there (a run copied from another machine) is passed over,
    for the next run's."""
    theirs, mine = tmp_path / "theirs", tmp_path / "mine"
    theirs.mkdir()
    run = copy_run(two_runs[0] / "lam0", tmp_path / "run", data_root=str(theirs))
    elsewhere = copy_run(run, tmp_path / "copied", data_root=str(tmp_path / "gone"))
    roots, get_dataset = [], ldifs.get_dataset

    def recording_root(task, split, root, *args, **kwargs):
        roots.append(Path(root))
        return get_dataset(task, split, root, *args, **kwargs)

    monkeypatch.setattr(ldifs, "get_dataset", recording_root)
    default = ldifs.user_path(ldifs.DATA_ROOT)
    for paths, typed, expected in [
        ([run], [], theirs),
        ([run], ["--data-root", str(mine)], mine),
        ([elsewhere], [], default),
        ([elsewhere, run], [], theirs),
    ]:
        roots.clear()
        argv = [*map(str, paths), "--tasks", "synthetic-stripes", "--workers", "0", *typed]
        code, _, err = run_main(evaluation, argv, capsys)
        assert code == 0, err
        assert roots and set(roots) == {expected}, roots


def test_a_run_records_its_data_root_for_eval(tmp_path, capsys):
    data = tmp_path / "data"
    flags = ["--task", "synthetic", "--head", "zs", "--max-steps", "2", "--eval-tasks", "none"]
    flags += ["--workers", "0", "--data-root", str(data), "--out", str(tmp_path / "o")]
    assert run_main(ldifs, flags, capsys)[0] == 0
    assert strict_json((tmp_path / "o/metrics.json").read_text())["data_root"] == str(data)


def test_eval_refuses_runs_from_different_models(two_runs, tmp_path, capsys):
    root, _ = two_runs
    other = copy_run(root / "lam0", tmp_path / "other", model="ViT-S-32")
    code, _, err = run_main(evaluation, [str(root / "lam0"), str(other)], capsys)
    assert code == 2 and "different models" in err
    copy_run(root / "lam0", other, seed=1)  # other random weights
    code, _, err = run_main(evaluation, [str(root / "lam0"), str(other)], capsys)
    assert code == 2 and "ldifs-tiny / none (seed 0); ldifs-tiny / none (seed 1)" in err


def test_eval_says_a_run_whose_metrics_lack_a_field_is_from_an_older_ldifs_py(
    two_runs, tmp_path, capsys, monkeypatch
):
    """Runs written before ldifs.py recorded --seed (2026-11-27) raised a KeyError traceback.
    Said before the run's weights load: a ViT's take seconds."""
    monkeypatch.setattr(torch, "load", lambda *_, **__: pytest.fail("loaded before the check"))
    old = copy_run(two_runs[0] / "lam0", tmp_path / "old")
    recorded = json.loads((old / "metrics.json").read_text())
    del recorded["seed"], recorded["lam"]
    (old / "metrics.json").write_text(json.dumps(recorded))
    code, _, err = run_main(evaluation, [str(old)], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert f"{old / 'metrics.json'} has no lam, seed: written by an older ldifs.py" in err


@pytest.mark.parametrize(
    "field, value, kind",
    [
        ("lam", "10", "a number"),
        ("lam", True, "a number"),
        ("sequence", "synthetic", "a list of names"),
        ("seed", None, "an integer"),
    ],
)
def test_eval_says_which_metrics_field_holds_the_wrong_type(
    two_runs, tmp_path, capsys, monkeypatch, field, value, kind
):
    """A metrics.json edited by hand: "lam": "10" ended eval.py in a ValueError traceback,
    "lam": true labelled the run lam 1 (a bool is an int in Python), and "sequence":
    "synthetic" labelled the run "continual s". Said before the weights load."""
    monkeypatch.setattr(torch, "load", lambda *_, **__: pytest.fail("loaded before the check"))
    edited = copy_run(two_runs[0] / "lam10", tmp_path / "edited", **{field: value})
    code, _, err = run_main(evaluation, [str(edited)], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert f"{edited / 'metrics.json'}: {field} is not {kind}; fix it or run ldifs.py again" in err


@pytest.mark.parametrize("tasks", [{"tasks": []}, {}])
def test_eval_says_a_continual_summary_names_no_tasks(tmp_path, capsys, tasks):
    """A continual run's summary stands for its last stage, named by its tasks: emptied or
    removed by hand, they ended eval.py in an IndexError or KeyError traceback."""
    summary = tmp_path / "continual"
    summary.mkdir()
    (summary / "metrics.json").write_text(json.dumps({"accuracy_matrix": [[1.0]], **tasks}))
    code, _, err = run_main(evaluation, [str(summary)], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert f"{summary / 'metrics.json'}: tasks is missing or empty; fix it or run" in err


@pytest.mark.parametrize("stage", [2, None])
def test_eval_says_a_continual_stage_has_no_stage_in_its_sequence(
    two_runs, tmp_path, capsys, monkeypatch, stage
):
    """A continual stage's label and start read its place in the sequence: removed by hand,
    it ended eval.py in a KeyError traceback; out of range, in an error about the weights."""
    monkeypatch.setattr(torch, "load", lambda *_, **__: pytest.fail("loaded before the check"))
    sequence = ["synthetic-stripes", "synthetic"]
    edited = copy_run(two_runs[0] / "lam10", tmp_path / "1-synthetic", sequence=sequence)
    metrics = json.loads((edited / "metrics.json").read_text())
    del metrics["stage"]
    if stage is not None:
        metrics["stage"] = stage
    (edited / "metrics.json").write_text(json.dumps(metrics))
    code, _, err = run_main(evaluation, [str(edited)], capsys)
    assert code == 1 and err.count("\n") == 1, err
    expected = "stage is missing or not 0 to 1, a place in the sequence; fix it or run"
    assert f"{edited / 'metrics.json'}: {expected}" in err


def test_eval_compares_local_dir_runs_by_their_files_not_by_an_ignored_pretrained(tmp_path):
    """open_clip loads a local-dir: model's own weights and ignores --pretrained, so two runs
    from one folder start from the same weights whatever --pretrained they recorded."""
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    model = f"local-dir:{folder}"
    runs = [
        {"metrics": {"model": model, "pretrained": p, "seed": s}}
        for p, s in [("openai", 0), ("none", 1)]
    ]
    assert evaluation.check_same_start(runs) == (model, "none", None)


def test_eval_names_a_local_dir_baseline_by_its_folder_alone(two_runs, tmp_path, capsys):
    """Its weights are the folder's: '(openai)', which runs once recorded, or '(none)', which
    reads as random weights, would both misname them."""
    root, _ = two_runs
    start = f"local-dir:{root / 'lam0'}"
    for i, pretrained in enumerate(("openai", "none")):
        run = copy_run(root / "lam10", tmp_path / f"run{i}", model=start, pretrained=pretrained)
        args = [str(run), "--workers", "0", "--tasks", "synthetic-stripes"]
        code, table, err = run_main(evaluation, args, capsys)
        assert code == 0, err
        assert f"| pre-trained {start} |" in table, table


def test_eval_says_when_the_weights_a_run_started_from_are_gone(two_runs, tmp_path, capsys):
    """A run from a weights file or a local-dir: folder that has since moved: say which, not
    a --pretrained error (eval.py has no such flag) or a bare errno."""
    root, _ = two_runs
    for i, (model, pretrained) in enumerate(
        [("ldifs-tiny", str(tmp_path / "moved.bin")), (f"local-dir:{tmp_path / 'moved'}", "none")]
    ):
        run = copy_run(root / "lam0", tmp_path / f"run{i}", model=model, pretrained=pretrained)
        code, _, err = run_main(evaluation, [str(run), "--workers", "0"], capsys)
        gone = pretrained if i == 0 else str(tmp_path / "moved")
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"{run} started from {gone}, which is gone; put it back" in err, err


def test_eval_of_runs_evaluated_on_no_task_fetches_nothing(two_runs, tmp_path, capsys):
    """A continual run over every task of its recipe, or one with --eval-tasks none, records
    no eval task: eval.py must not fall back on the release's seven datasets to download."""
    root, _ = two_runs
    run = copy_run(root / "lam0", tmp_path / "run", eval_tasks=[])
    args = [str(run), "--workers", "0", "--data-root", str(tmp_path / "empty")]
    code, table, err = run_main(evaluation, args, capsys)
    assert code == 0 and "skipping" not in err, err
    assert "warning: the runs were evaluated on no task; name some with --tasks" in err
    assert "synthetic FT" in table and not (tmp_path / "empty").exists()


def test_eval_skips_a_recorded_folder_task_whose_folder_is_gone(two_runs, tmp_path, capsys):
    root, _ = two_runs
    gone = f"folder:{tmp_path / 'moved'}"
    run = copy_run(root / "lam0", tmp_path / "run", eval_tasks=[gone])
    code, table, err = run_main(evaluation, [str(run), "--workers", "0"], capsys)
    assert code == 0 and f"warning: skipping {gone}" in err, err
    assert "synthetic FT" in table


@pytest.mark.parametrize(
    "task, message, exit_code",
    [
        ("folder:{tmp}/moved", "run {run}: folder:{tmp}/moved: no such folder", 2),
        ("eurosat", "run {run}: task 'eurosat': no data at {tmp}/eurosat", 1),
    ],
)
def test_eval_checks_each_runs_own_test_data_first(
    two_runs, tmp_path, capsys, monkeypatch, task, message, exit_code
):
    """A run's target task whose data is gone (a moved folder:PATH) ends eval.py before the
    model loads, with one line that names the run, not the --task flag eval.py lacks, and
    before the --json file's folder is made."""
    monkeypatch.setattr(ldifs, "load_clip", lambda *_: pytest.fail("evaluated before the check"))
    run = copy_run(two_runs[0] / "lam0", tmp_path / "run", task=task.format(tmp=tmp_path))
    flags = ["--data-root", str(tmp_path), "--no-download", "--workers", "0"]
    flags += ["--json", str(tmp_path / "results" / "r.json")]
    code, _, err = run_main(evaluation, [str(run), *flags], capsys)
    assert code == exit_code and len(err.strip().splitlines()) == 1, err
    assert message.format(tmp=tmp_path, run=run) in err, err
    assert not (tmp_path / "results").exists()


def test_eval_flags_fail_before_any_evaluation(two_runs, tmp_path, capsys):
    run = str(two_runs[0] / "lam0")
    for flags, message in [
        (["--wise-ft", "abc"], "--wise-ft: not comma-separated numbers: 'abc'"),
        (["--wise-ft", "0.5,2"], "--wise-ft: the weights must lie in [0, 1], got 0.5,2"),
        (["--wise-ft", ","], "--wise-ft: names no weight; e.g. 0.25,0.5"),
        (
            ["--json", str(tmp_path / "file/results.json")],
            f"--json {tmp_path}/file/results.json: {tmp_path}/file is a file, not a folder",
        ),
        (["--json", str(tmp_path)], f"--json {tmp_path} is a folder; name a file"),
        (["--plot", str(tmp_path)], f"--plot {tmp_path} is a folder; name a file"),
        (["--eval-batch-size", "0"], "--eval-batch-size must be positive, got 0"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        ([f"{run}/../lam0"], f"{run}/../lam0 is {run} again; name each run once"),
    ]:
        (tmp_path / "file").write_text("")
        code, out, err = run_main(evaluation, [run, *flags], capsys)
        assert code in (1, 2) and message in err and err.count("\n") == 1 and not out, err
    code, _, _ = run_main(
        evaluation, [run, "--tasks", "none", "--json", str(tmp_path / "new/r.json")], capsys
    )
    assert code == 0 and (tmp_path / "new/r.json").exists()


def unwritable_folder(folder, monkeypatch):
    """`folder`, made, and which os.access says this user cannot write in: root, which runs
    these tests, may write anywhere."""
    folder.mkdir()
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path) != folder and access(path, mode)
    )
    return folder


def test_eval_refuses_a_json_file_in_a_folder_it_cannot_write_before_evaluating(
    two_runs, tmp_path, capsys, monkeypatch
):
    """The file was written after the whole evaluation, and before the table: both were
    lost. (Root may write anywhere, so the permission is faked.)"""
    monkeypatch.setattr(ldifs, "load_clip", lambda *_: pytest.fail("evaluated before the check"))
    locked = unwritable_folder(tmp_path / "shared", monkeypatch)
    results = locked / "r.json"
    argv = [str(two_runs[0] / "lam0"), "--tasks", "none", "--json", str(results)]
    code, out, err = run_main(evaluation, argv, capsys)
    assert code == 1 and not out and err.count("\n") == 1, err
    assert f"--json {results}: cannot write in {locked}" in err, err


def test_wise_ft_interpolates_weights():
    a, b = {"w": torch.zeros(3)}, {"w": torch.ones(3) * 4}
    assert torch.equal(evaluation.wise_ft(a, b, 0.25)["w"], torch.ones(3))
    assert torch.equal(evaluation.wise_ft(a, b, 0.0)["w"], a["w"])


def test_missing_eval_data_is_skipped_not_fatal(tmp_path, capsys):
    code, out, err = run_main(
        ldifs,
        [
            "--task",
            "synthetic",
            "--head",
            "zs",
            "--max-steps",
            "3",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "o"),
            "--eval-tasks",
            "dtd,synthetic-stripes",
            "--no-download",
            "--data-root",
            str(tmp_path),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capsys,
    )
    assert code == 0, err
    assert "warning: skipping eval task dtd" in err
    assert "| dtd | skipped" in out
    forgetting = json.loads((tmp_path / "o/metrics.json").read_text())["forgetting"]
    assert "skipped" in forgetting["dtd"] and "delta_lp" in forgetting["synthetic-stripes"]


def test_tiny_clip_registers_without_leaving_its_config_file(tmp_path, monkeypatch):
    factory = open_clip.factory
    configs = {k: v for k, v in factory._MODEL_CONFIGS.items() if k != ldifs.TINY_CLIP}
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", configs)
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ldifs.register_tiny_clip()
    open_clip.add_model_config(tmp_path)  # a later registration rescans every config path
    assert open_clip.get_model_config(ldifs.TINY_CLIP)["vision_cfg"]["layers"] == 4
    assert not any(tmp_path.iterdir())


def test_imports_where_os_has_no_sched_getaffinity():
    """macOS lacks it; `from ldifs import ldifs_distance` must still work there."""
    code = "import os; del os.sched_getaffinity; import ldifs; print(ldifs.WORKERS)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == min(8, os.cpu_count())


def test_ldifs_imports_and_runs_without_posix_resource_module_as_on_windows():
    """Windows has no `resource` module, which gives the CPU's peak memory: importing it at
    the top made ldifs.py fail to start there, for one figure in metrics.json."""
    code = (
        "import sys; sys.modules['resource'] = None; import torch, ldifs; "
        "print(ldifs.peak_memory_mb(torch.device('cpu')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"


def test_an_empty_data_or_cache_variable_is_unset_not_the_current_folder():
    """`export LDIFS_DATA=` means no choice: the defaults, not downloads into the current folder."""
    code = "import ldifs; print(ldifs.parse_args([]).data_root, ldifs.parse_args([]).cache_dir)"
    env = {**os.environ, "LDIFS_DATA": "", "LDIFS_CACHE": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        str(Path("~/data").expanduser()),
        str(Path("~/.cache/ldifs").expanduser()),
    ]


@pytest.mark.parametrize("module, shown", [(ldifs, "--lam LAM"), (evaluation, "--eval-batch-size")])
def test_help_shows_defaults_except_none_empty_and_booleans(capsys, module, shown):
    code, out, _ = run_main(module, ["--help"], capsys)
    text = " ".join(out.split())  # argparse wraps "(default: X)" anywhere
    assert code == 0 and re.search(re.escape(shown) + r"[^-]*\(default: [^)]+\)", text)
    assert not re.search(r"\(default: (None|True|False|\[\]|)\)", text)


def test_path_flags_expand_a_tilde_the_shell_left(tmp_path, monkeypatch):
    """Bash expands ~ in `--out ~/x` but not in `--out=~/x`: a run must not write to ./~/x,
    nor take ~/w.bin for an unknown tag."""
    monkeypatch.setenv("HOME", str(tmp_path))
    home = Path.home()
    (home / "w.bin").write_bytes(b"")
    (home / "t.txt").write_text("a photo of a {}.")
    (home / "m").mkdir()  # a local-dir: folder as a run leaves it
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        (home / "m" / name).write_text("{}")
    args = ldifs.parse_args(["--task=synthetic", "--out=~/runs/x", "--pretrained=~/w.bin"])
    ldifs.resolve_args(args)
    assert (args.out, args.pretrained) == (home / "runs/x", str(home / "w.bin"))
    assert ldifs.parse_args(["--templates=~/t.txt"]).templates == home / "t.txt"
    model = ldifs.parse_args(["--task=synthetic", "--model=local-dir:~/m", "--pretrained=none"])
    ldifs.resolve_args(model)
    assert model.model == f"local-dir:{home / 'm'}"
    args = evaluation.parse_args(["~/runs/x", "--json=~/e.json", "--plot=~/e.png"])
    assert (args.runs, args.json, args.plot) == ([home / "runs/x"], home / "e.json", home / "e.png")


def test_eval_py_takes_ldifs_py_s_eval_tasks_flag_as_its_tasks():
    """Typed as in ldifs.py, --eval-tasks was refused as unrecognised by eval.py."""
    for flag in ("--tasks", "--eval-tasks"):
        assert evaluation.parse_args(["runs/x", flag, "cifar10,svhn"]).tasks == "cifar10,svhn"


def test_eval_tasks_that_name_only_the_trained_tasks_warn_that_nothing_is_left(capsys):
    warning = "ldifs.py: warning: --eval-tasks synthetic names only tasks trained on"
    for flags, warned, left in [
        (["--task=synthetic", "--eval-tasks=synthetic"], True, []),
        (
            ["--task=synthetic", "--eval-tasks=synthetic,synthetic-stripes"],
            False,
            ["synthetic-stripes"],
        ),
        (["--task=synthetic,synthetic-stripes"], False, []),  # the recipe's eval tasks
        (["--task=synthetic", "--eval-tasks=none"], False, []),
    ]:
        args = ldifs.parse_args(flags)
        ldifs.resolve_args(args)
        assert (warning in capsys.readouterr().err) == warned, flags
        assert args.eval_tasks == left, flags


@pytest.mark.parametrize("empty", ["", ","])
def test_an_empty_eval_task_list_is_refused_not_read_as_none(two_runs, tmp_path, capsys, empty):
    """--eval-tasks "$EVAL" with EVAL unset ran without a forgetting table, and eval.py
    --tasks "$EVAL" fell back on the recorded tasks: each silently. 'none' says it."""
    flags = ["--task", "synthetic", "--eval-tasks", empty, "--out", str(tmp_path / "run")]
    run = str(two_runs[0] / "lam0")
    for module, argv, flag in [
        (ldifs, flags, "--eval-tasks"),
        (evaluation, [run, "--tasks", empty, "--workers", "0"], "--tasks"),
    ]:
        code, out, err = run_main(module, argv, capsys)
        assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
        assert f"{flag} {empty!r} names no task; name some (a,b) or 'none'" in err, err
    assert not (tmp_path / "run").exists()


def test_task_lists_written_with_spaces_after_the_commas_are_read():
    """`--task "svhn, cifar10"`, as lists are written in prose, stopped at "unknown task
    ' cifar10'"."""
    args = ldifs.parse_args(["--task=synthetic, synthetic-stripes", "--eval-tasks= mnist , svhn"])
    tasks = ldifs.resolve_args(args)
    assert [t.name for t in tasks] == ["synthetic", "synthetic-stripes"]
    assert args.eval_tasks == ["mnist", "svhn"]


def test_task_names_are_read_as_the_paper_writes_them():
    """--task EuroSAT, as the paper spells it, is eurosat, in metrics and folder names too."""
    args = ldifs.parse_args(["--task=Synthetic", "--eval-tasks=SYNTHETIC-stripes,synthetic"])
    tasks = ldifs.resolve_args(args)
    assert [t.name for t in tasks] == ["synthetic"]
    assert args.eval_tasks == ["synthetic-stripes"]
    assert args.out == Path("runs/synthetic-lam10")


def test_eval_tasks_named_twice_are_measured_once():
    args = ldifs.parse_args(
        ["--task=synthetic", "--eval-tasks=synthetic-stripes,mnist,synthetic-stripes"]
    )
    ldifs.resolve_args(args)
    assert args.eval_tasks == ["synthetic-stripes", "mnist"]


@pytest.mark.parametrize("module", [ldifs, evaluation])
def test_a_device_this_machine_lacks_is_one_line(capsys, module, tmp_path):
    missing_gpu = f"cuda:{torch.cuda.device_count()}"
    cases = [("foo", "unknown device 'foo'"), (missing_gpu, "visible CUDA GPUs")]
    if not torch.xpu.is_available():  # a backend this torch build lacks, not a model problem
        cases.append(("xpu", "xpu: this torch build runs on cpu"))
    for device, message in cases:
        flags = ["--task", "synthetic"] if module is ldifs else [str(tmp_path)]
        code, _, err = run_main(module, [*flags, "--device", device], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_gpu_older_than_the_torch_build_is_one_line_naming_the_build_to_install(monkeypatch):
    """PyPI's torch 2.14.1 is built for CUDA 13, whose kernels start at Turing (7.5): on a V100
    torch only warns, and the first kernel ends the run in a "no kernel image is available"
    traceback. Faked here: the test machine has no such GPU."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90a", "sm_75", "compute_120"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _: "Tesla V100-SXM2-16GB")
    for capability in [(7, 5), (8, 6), (12, 0)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _, c=capability: c)
        ldifs.check_gpu_kernels(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _: (7, 0))
    with pytest.raises(ldifs.UserError) as error:
        ldifs.check_gpu_kernels(torch.device("cuda"))
    versions = [module.__version__.split("+")[0] for module in (torch, torchvision)]
    assert str(error.value) == (
        "Tesla V100-SXM2-16GB (compute capability 7.0) is older than the GPUs this torch build "
        "runs on (CUDA 13.0, from 7.5); install its CUDA 12.6 build: pip install torch=="
        "{} torchvision=={} --index-url https://download.pytorch.org/whl/cu126".format(*versions)
    )
    ldifs.check_gpu_kernels(torch.device("cpu"))  # the CPU needs no kernels built for it


@pytest.mark.parametrize("module", [ldifs, evaluation])
def test_gpus_this_torch_build_cannot_start_are_one_line_not_a_silent_run_on_the_cpu(
    capsys, module, tmp_path, monkeypatch
):
    """PyPI's torch 2.14.1 is built for CUDA 13, which needs driver 580. Under an older one
    torch only warns and finds no GPU: the default device was the CPU, unasked, and
    --device cuda ended in a traceback. Faked here: NVML counts the GPUs (as
    CUDA_VISIBLE_DEVICES leaves them), and CUDA cannot start on them."""

    def too_old_a_driver():
        warnings.warn(
            "CUDA initialization: The NVIDIA driver on your system is too old (found version "
            "12040). Please update your GPU driver by downloading and installing a new version",
            stacklevel=1,
        )
        return False

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", too_old_a_driver)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    flags = ["--task", "synthetic"] if module is ldifs else [str(tmp_path)]
    versions = [m.__version__.split("+")[0] for m in (torch, torchvision)]
    for device in ([], ["--device", "cuda"], ["--device", "cuda:1"]):
        code, _, err = run_main(module, [*flags, *device], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert (
            "this torch build (CUDA 13.0) cannot use this machine's NVIDIA GPUs (2): The NVIDIA "
            "driver on your system is too old (found version 12040); install its CUDA 12.6 "
            "build: pip install torch=={} torchvision=={} --index-url https://download.pytorch"
            ".org/whl/cu126; or pass --device cpu".format(*versions)
        ) in err
    assert ldifs.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # torch warned before
    with pytest.raises(argparse.ArgumentTypeError, match=r"GPUs \(2\): most likely their driver"):
        ldifs.pick_device("")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no GPU, or all hidden
    assert ldifs.pick_device("") == torch.device("cpu")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc, where even root can't write")
def test_unwritable_out_is_one_line(capsys):
    """An --out that passes the checks but cannot be written fails when the run first writes
    (an --out under a file is refused before that: see below)."""
    flags = ["--task", "synthetic", "--max-steps", "1", "--warmup", "1", "--eval-tasks", "none"]
    code, _, err = run_main(ldifs, [*flags, "--workers", "0", "--out", "/proc/ldifs-out"], capsys)
    assert code == 1 and err.count("\n") == 1 and "/proc/ldifs-out" in err, err


BEFORE_A_CHECKPOINT = " before the first checkpoint; run the same command to start again"


def test_ctrl_c_before_the_first_checkpoint_does_not_send_the_user_to_resume(
    tmp_path, capsys, monkeypatch
):
    """--resume refuses an --out with no checkpoint: Ctrl-C must not point to it then."""

    monkeypatch.setattr(ldifs, "initial_head", ctrl_c)  # the LP-init fit, before step 1
    flags = ["--task", "synthetic", "--workers", "0", "--out", str(tmp_path / "run")]
    code, _, err = run_main(ldifs, flags, capsys)
    assert code == 130 and err == f"ldifs.py: interrupted{BEFORE_A_CHECKPOINT}\n", err
    assert not ldifs.run_files_in(tmp_path / "run")


def test_ctrl_c_is_one_line_in_both_scripts(capsys, monkeypatch):
    monkeypatch.setattr(ldifs, "run", ctrl_c)
    monkeypatch.setattr(evaluation, "evaluate", ctrl_c)
    try:
        code, _, err = run_main(ldifs, ["--task", "synthetic"], capsys)
        assert code == 130 and err == f"ldifs.py: interrupted{BEFORE_A_CHECKPOINT}\n"
        code, _, err = run_main(evaluation, ["runs/any"], capsys)
        assert code == 130 and err == "eval.py: interrupted\n"
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")


def test_ranks_other_than_0_end_silently_when_torchrun_stops_them(capsys, monkeypatch):
    """torchrun sends SIGTERM to every other rank when one fails (say rank 0, on missing
    data): their "interrupted; --resume continues" would bury rank 0's error."""

    monkeypatch.setattr(ldifs, "run", ctrl_c)
    monkeypatch.setattr(ldifs, "other_rank", lambda: True)
    assert run_main(ldifs, ["--task", "synthetic"], capsys)[::2] == (130, "")


def test_a_gradient_clip_that_is_not_positive_is_refused(capsys):
    # clip_grad_norm_ with max_norm < 0 scales gradients by a negative factor: ascent
    for value in ("-1", "0"):
        code, _, err = run_main(ldifs, ["--task", "synthetic", "--grad-clip", value], capsys)
        assert code == 2 and f"--grad-clip must be positive, got {float(value)}" in err, err


def test_flags_a_run_cannot_use_are_one_line(capsys, tmp_path):
    out = ["--out", str(tmp_path / "run"), "--workers", "0", "--eval-tasks", "none"]
    for flags, says in [
        (["--task", "synthetic,synthetic"], "--task 'synthetic,synthetic' repeats a task"),
        (["--task", "synthetic", "--label-smoothing", "1"], "--label-smoothing must be below 1"),
        (["--task", "synthetic", "--batch-size", "2401"], "exceeds the 2400 training images"),
        (["--task", "synthetic", "--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--task", "synthetic", "--seed", str(2**64)], f"--seed must be below 2**64, got {2**64}"),
    ]:
        code, _, err = run_main(ldifs, [*flags, *out], capsys)
        assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "run").exists()


def test_a_batch_a_later_task_cannot_fill_is_refused_before_the_first_task_trains(
    capsys, tmp_path, monkeypatch
):
    """In a continual run the batch size was checked against each task as its stage began:
    hours into the run, which then could not resume with a smaller --batch-size."""
    monkeypatch.setattr(ldifs, "load_clip", lambda *_: pytest.fail("loaded before the check"))
    small = make_folder(tmp_path / "small")  # 54 training images; the recipe's batch is 64
    argv = ["--task", f"synthetic,folder:{small}", "--out", str(tmp_path / "run"), "--workers=0"]
    code, _, err = run_main(ldifs, argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"--batch-size 64 exceeds the 54 training images of folder:{small}" in err, err
    assert not (tmp_path / "run").exists()


def test_an_empty_path_or_prefix_is_refused_not_read_as_the_current_folder(
    capsys, tmp_path, monkeypatch
):
    """`--out "$OUT"`, `folder:$DATA` or `local-dir:$RUN` in a script with the variable unset
    read the current folder; an empty hf-hub: said "check your connection"; an empty --taps
    meant the default taps."""
    monkeypatch.chdir(tmp_path)
    short = ["--task", "synthetic", *ONE_SHORT_STEP]
    empty = "an empty path"
    for module, argv, says in [
        (ldifs, [*short, "--out", ""], f"argument --out: {empty}"),
        (ldifs, [*short, "--templates", ""], f"argument --templates: {empty}"),
        (ldifs, [*short, "--data-root", ""], f"argument --data-root: {empty}"),  # downloads here
        (ldifs, [*short, "--cache-dir", ""], f"argument --cache-dir: {empty}"),
        (ldifs, [*short, "--taps", ""], "argument --taps: names no submodule; name some (a,b)"),
        (evaluation, ["", "--tasks", "none"], f"argument runs: {empty}"),
        (evaluation, ["run", "--json", ""], f"argument --json: {empty}"),
        (evaluation, ["run", "--data-root", ""], f"argument --data-root: {empty}"),
        (ldifs, [*short, "--task", "folder:"], "nothing after folder:"),
        (ldifs, [*short, "--eval-tasks", "folder:"], "nothing after folder:"),
        (ldifs, [*short, "--model", "local-dir:"], "argument --model: nothing after local-dir:"),
        (ldifs, [*short, "--model", "hf-hub:"], "argument --model: nothing after hf-hub:"),
    ]:
        code, _, err = run_main(module, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not list(tmp_path.iterdir())


def test_a_number_flag_that_is_nan_or_infinite_is_refused(capsys, tmp_path):
    # NaN passes every range check written as a comparison: --lam nan crashed with a traceback,
    # and an infinite --lam or --lr stopped training as if the loss had diverged
    cases = [("--lam", "nan"), ("--lam", "-inf"), ("--lr", "inf"), ("--wd", "nan")]
    cases += [("--label-smoothing", "nan"), ("--l2sp", "inf"), ("--grad-clip", "nan")]
    cases += [("--lr", "1e39")]  # finite, but past float32: AdamW's step raised a traceback
    for flag, value in cases:
        code, _, err = run_main(ldifs, ["--task", "synthetic", f"{flag}={value}"], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{flag} must be" in err and f"got {float(value)}" in err, err
    assert tiny_args(tmp_path, "--grad-clip", "inf").grad_clip == float("inf")  # no clipping


def test_out_of_gpu_memory_is_one_line_naming_the_batch_flags(capsys, monkeypatch):
    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nIf ...")

    monkeypatch.setattr(ldifs, "run", out_of_memory)
    code, _, err = run_main(ldifs, ["--task", "synthetic"], capsys)
    assert code == 1 and err.count("\n") == 1 and "2.00 GiB" in err
    assert "--batch-size (in a new run)" in err and "--eval-batch-size (then --resume)" in err


def test_openai_weights_are_built_with_quick_gelu(monkeypatch):
    calls = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **kw: calls.append(kw))
    ldifs.load_clip("ViT-B-32", "openai")
    ldifs.load_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert [kw["force_quick_gelu"] for kw in calls] == [True, False]
    assert ldifs.needs_quick_gelu("ViT-B-32", "openai")
    assert not ldifs.needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not ldifs.needs_quick_gelu("ViT-B-32", None)


def test_weights_a_run_saved_keep_quick_gelu_when_fine_tuned_again(tmp_path):
    """--pretrained runs/x/open_clip_pytorch_model.bin with --model ViT-B-32: a file has no
    open_clip tag to say QuickGELU, and open_clip does not warn, but the config beside it does."""
    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"")
    assert not ldifs.needs_quick_gelu("ViT-B-32", str(weights))
    for quick_gelu in (True, False):
        config = {"model_cfg": {"embed_dim": 512, "quick_gelu": quick_gelu}}
        (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
        assert ldifs.needs_quick_gelu("ViT-B-32", str(weights)) is quick_gelu


def test_a_damaged_config_beside_a_weights_file_is_named_not_the_weights(tmp_path, capsys):
    """A config cut short (older ldifs.py wrote it without atomic_write) was reported as
    "could not read checkpoint <the weights>", sending the user to a good file."""
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({}, weights)
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {')
    flags = ["--task", "synthetic", "--pretrained", str(weights), "--out", str(tmp_path / "o")]
    code, _, err = run_main(ldifs, flags, capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert f"cannot read {tmp_path / 'open_clip_config.json'}: Expecting" in err, err
    assert "fix or delete it" in err and "could not read checkpoint" not in err, err


def test_a_weights_file_with_no_config_beside_it_warns_of_quick_gelu(tmp_path, capsys):
    """It may hold OpenAI's weights (say, downloaded by hand), which --model ViT-B-32 builds
    with GELU: no tag says QuickGELU, and open_clip says nothing."""
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    ldifs.warn_once.cache_clear()
    capsys.readouterr()
    for model in ("ViT-B-32", "ViT-B-32-quickgelu", "convnext_base"):  # only the first can err
        assert not ldifs.needs_quick_gelu(model, str(weights))
    assert capsys.readouterr().err == (
        f"ldifs.py: warning: --pretrained {weights} has no open_clip_config.json beside it, so "
        "ViT-B-32 is built with GELU; if these are OpenAI's weights, use ViT-B-32-quickgelu\n"
    )


def test_a_bad_model_or_tag_is_refused_before_any_data_is_fetched(tmp_path, capsys, monkeypatch):
    def fetch_data(*args):
        pytest.fail("data was fetched before the model was checked")

    monkeypatch.setattr(ldifs, "fetch_data", fetch_data)
    for flags, message in [
        (["--model", "ViT-Nope"], "unknown model 'ViT-Nope'"),
        (["--model", "ViT-B-32", "--pretrained", "nope"], "--pretrained 'nope' is neither"),
    ]:
        argv = ["--task", "cifar10", "--out", str(tmp_path), *flags]
        code, _, err = run_main(ldifs, argv, capsys)
        assert code == 2 and message in err, err


def test_load_clip_names_the_step_that_failed(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fail)
    (tmp_path / "w.bin").write_bytes(b"")
    expected = {
        ("ViT-B-32", "openai"): "could not download ViT-B-32 weights openai: boom",
        ("ViT-B-32", str(tmp_path / "w.bin")): f"could not read checkpoint {tmp_path / 'w.bin'}",
        (ldifs.TINY_CLIP, "none"): f"could not build {ldifs.TINY_CLIP}: boom",
    }
    for (name, pretrained), message in expected.items():
        with pytest.raises(ldifs.UserError, match=re.escape(message)):
            ldifs.load_clip(name, pretrained)


ONE_SHORT_STEP = ["--head", "zs", "--max-steps", "1", "--batch-size", "2", "--eval-tasks", "none"]


@pytest.mark.parametrize(
    "flags, message, code",
    [
        (
            ["--task", "eurosat", "--data-root", "{tmp}", "--no-download"],
            "'eurosat': no data at {tmp}/eurosat/2750/<class>/*.jpg and --no-download is set",
            1,
        ),
        (["--task", "eurosat", "--data-root", "{tmp}"], "could not be downloaded", 1),
        (
            ["--task", "synthetic", "--model", "ViT-B-32", "--pretrained", "openai"],
            "could not download",
            1,
        ),
        (["--task", "synthetic", "--model", "ViT-Nope"], "unknown model", 2),
        (
            ["--task", "synthetic", "--model", "ViT-B-32", "--pretrained", "nope"],
            "neither a tag",
            2,
        ),
        (  # the user typed no --pretrained: the message says where 'openai' came from
            ["--task", "eurosat", "--model", "ldifs-tiny"],
            "--pretrained 'openai' (the default) is neither a tag of ldifs-tiny (none) nor a file",
            2,
        ),
        (  # an unset $WEIGHTS in a script: not random weights, silently
            ["--task", "synthetic", "--model", "ViT-B-32", "--pretrained", "", *ONE_SHORT_STEP],
            "--pretrained '' is neither a tag of ViT-B-32 (openai, ",
            2,
        ),
        (
            ["--task", "synthetic", "--pretrained", "{tmp}/garbage.bin"],
            "could not read checkpoint",
            1,
        ),
        (["--task", "nope"], "unknown task", 2),
        (
            ["--task", "synthetic", "--lam", "-1", "--batch-size", "0", "--epochs", "0"],
            "--batch-size must be positive, got 0; --epochs must be positive, got 0; "
            "--lam must be >= 0",
            2,
        ),
        (["--task", "synthetic", "--lam", "ten"], "invalid weight value", 2),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, flags, message, code):
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    result = run_cli(*[f.format(tmp=tmp_path) for f in flags], "--out", str(tmp_path / "out"))
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert "download=True" not in result.stderr  # torchvision's advice, not the flag's
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], result.stderr


# ------------------------------------------------------------------ tasks on fake copies
# Each fake image is a solid colour whose red channel encodes the class index we
# expect its label to be, so a test reads the truth from the pixels themselves.


def fake_image(path, code):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (5 * code, 0, 0)).save(path)


def decoded_labels(data):
    return [(round(image.getpixel((4, 4))[0] / 5), label) for image, label in data]


def assert_splits(task, root, sizes):
    """Labels match the pixels, splits are disjoint, deterministic and of the given sizes."""
    splits = {s: ldifs.get_dataset(task, s, root, download=False) for s in ("train", "val", "test")}
    for name, data in splits.items():
        pairs = decoded_labels(data)
        assert all(code == label for code, label in pairs), (task, name)
        assert len(data) == sizes[name], (task, name, len(data))
    again = decoded_labels(ldifs.get_dataset(task, "val", root, download=False))
    assert again == decoded_labels(splits["val"])
    return splits


def image_ids(data):
    """Stable identities of a split's images (their paths), through Subset/Concat wrappers."""
    return {str(p) for p in paths(data)}


def paths(data):
    if isinstance(data, torch.utils.data.Subset):
        return [paths(data.dataset)[i] for i in data.indices]
    if isinstance(data, torch.utils.data.ConcatDataset):
        return [p for d in data.datasets for p in paths(d)]
    for attr in ("samples", "_samples"):
        if hasattr(data, attr):
            return [s[0] for s in getattr(data, attr)]
    return list(data._image_files)


EUROSAT_FOLDERS = [
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
]


def test_eurosat_labels_follow_folders_and_split_80_10_10(tmp_path):
    names = dict(zip(EUROSAT_FOLDERS, ldifs.TASKS["eurosat"].classnames, strict=True))
    assert names["Highway"] == "highway or road" and names["SeaLake"] == "lake or sea"
    for code, folder in enumerate(EUROSAT_FOLDERS):
        for k in range(5):
            fake_image(tmp_path / "eurosat/2750" / folder / f"{folder}_{k}.jpg", code)
    splits = assert_splits("eurosat", tmp_path, {"train": 40, "val": 5, "test": 5})
    ids = [image_ids(d) for d in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_a_built_in_task_with_fewer_images_than_its_dataset_warns(tmp_path, capsys):
    """torchvision takes a half-unpacked EuroSAT or GTSRB (a download killed while it
    unpacked) for the whole: it checks only that the folder exists."""
    for code, folder in enumerate(EUROSAT_FOLDERS):
        fake_image(tmp_path / "eurosat/2750" / folder / f"{folder}_0.jpg", code)
    ldifs.warn_once.cache_clear()
    capsys.readouterr()
    ldifs.get_dataset("eurosat", "train", tmp_path, download=False)
    warning = (
        f"ldifs.py: warning: eurosat: 8 train images in {tmp_path}, not the dataset's 21600: "
        "unpacked in part? delete it to download it again"
    )
    assert warning in capsys.readouterr().err
    whole = dataclasses.replace(ldifs.TASKS["eurosat"], split_sizes=(8, 1, 1))
    for split in ("train", "val", "test"):
        ldifs.get_dataset(whole, split, tmp_path, download=False)
    assert not capsys.readouterr().err
    fake_image(tmp_path / "imagenet/val/n01440764/0.JPEG", 0)  # placed by hand: no download
    ldifs.get_dataset("imagenet", "test", tmp_path, download=False)
    warning = (
        f"imagenet: 1 test images in {tmp_path}, not the dataset's 50000: copied in part? get "
        "it again from image-net.org"
    )
    assert warning in capsys.readouterr().err
    fixed = "cars cifar10 cifar100 dtd eurosat gtsrb imagenet mnist resisc45 svhn".split()
    assert [name for name, t in ldifs.TASKS.items() if t.split_sizes] == fixed


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


def test_dtd_trains_on_partition_1_train_alone(tmp_path):
    base = tmp_path / "dtd/dtd"
    lines = {"train1": [], "val1": [], "test1": []}
    for code, name in enumerate(FAKE_DTD_CLASSES):
        for k, part in enumerate(["train1", "train1", "val1", "test1"]):
            fake_image(base / "images" / name / f"{name}_{k}.jpg", code)
            lines[part].append(f"{name}/{name}_{k}.jpg")
    for part, rows in lines.items():
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{part}.txt").write_text("\n".join(rows) + "\n")
    n_train = 47 * 2  # train1 only, as the release; val1 is unused
    assert_splits(
        "dtd", tmp_path, {"train": n_train - n_train // 10, "val": n_train // 10, "test": 47}
    )
    names = ldifs.class_names(ldifs.TASKS["dtd"], tmp_path)  # the data's, as the release
    assert names == tuple(FAKE_DTD_CLASSES) and len(names) == ldifs.TASKS["dtd"].num_classes


FAKE_DTD_CLASSES = [f"texture-{k:02d}" for k in range(47)]
FAKE_RESISC45_CLASSES = [f"scene_{k:02d}" for k in range(45)]


def make_resisc45(root, per_class=5):
    for code, folder in enumerate(FAKE_RESISC45_CLASSES):
        for k in range(per_class):
            fake_image(root / "resisc45/NWPU-RESISC45" / folder / f"{folder}_{k:03d}.jpg", code)


def test_resisc45_seeded_60_20_20_without_split_files(tmp_path):
    make_resisc45(tmp_path)  # 225 images: 135 stand in for the train file, minus 10% val
    assert_splits("resisc45", tmp_path, {"train": 122, "val": 13, "test": 45})
    names = ldifs.class_names(ldifs.TASKS["resisc45"], tmp_path)
    assert names[2] == "scene 02" and len(names) == 45  # sorted folders, '_' read as ' '


def test_missing_data_or_scipy_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    root = tmp_path / "scipy-projects"  # a path that names scipy is not a missing scipy
    with pytest.raises(ldifs.DataMissing) as error:
        ldifs.class_names(ldifs.TASKS["resisc45"], root)
    assert f"task 'resisc45': no data at {root}/resisc45/" in str(error.value)
    assert "it is not downloaded automatically" in str(error.value)

    def load_mat(root, split, download):  # as torchvision's SVHN reads its .mat files
        import scipy.io  # noqa: F401

    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    svhn = dataclasses.replace(ldifs.TASKS["svhn"], load=load_mat)
    with pytest.raises(ldifs.DataMissing) as error:
        ldifs.get_dataset(svhn, "test", root)
    assert str(error.value) == "task 'svhn' needs scipy to read its .mat files: pip install scipy"
    cars = dataclasses.replace(ldifs.TASKS["cars"], load=torchvision_cars_without_scipy)
    with pytest.raises(ldifs.DataMissing, match="task 'cars' needs scipy"):
        ldifs.get_dataset(cars, "test", root)


def torchvision_cars_without_scipy(root, split, download):
    raise RuntimeError("Scipy is not found. This dataset needs to have scipy installed: ...")


def test_resisc45_has_the_same_split_sizes_with_or_without_its_split_files():
    """Its 31500 images give the split files' 18900 / 6300 and the seeded 60/20/20 alike, so
    a copy of other counts (copied in part) is told, and its A_LPs are not kept."""
    fallback = [len(ldifs.seeded_split(31500, s, (0.6, 0.2, 0.2))) for s in ("train", "test")]
    assert fallback == [18900, 6300]  # the split files' counts
    held_out = [len(ldifs.seeded_split(18900, s)) for s in ("train", "val")]
    assert ldifs.TASKS["resisc45"].split_sizes == (*held_out, 6300)


def write_resisc45_split_files(root):
    for split, ks in {"train": (0, 1, 2), "val": (3,), "test": (4,)}.items():
        names = [f"{c}_{k:03d}.jpg" for c in FAKE_RESISC45_CLASSES for k in ks]
        (root / "resisc45" / f"resisc45-{split}.txt").write_text("\n".join(names))


def test_resisc45_uses_the_standard_split_files(tmp_path):
    make_resisc45(tmp_path)
    write_resisc45_split_files(tmp_path)
    splits = assert_splits("resisc45", tmp_path, {"train": 122, "val": 13, "test": 45})
    assert all(p.endswith("_004.jpg") for p in image_ids(splits["test"]))
    assert not any(p.endswith("_003.jpg") for s in ("train", "val") for p in image_ids(splits[s]))


SUN397_CLASSES = ["/a/abbey", "/a/apartment_building/outdoor", "/b/beach"]


def make_sun397(root):
    (root / "SUN397").mkdir()
    (root / "SUN397/ClassName.txt").write_text("\n".join(SUN397_CLASSES) + "\n")
    for code, c in enumerate(SUN397_CLASSES):
        for k in range(10):
            fake_image(root / "SUN397" / c.strip("/") / f"sun_{code}{k}.jpg", code)


def test_sun397_names_from_data_and_seeded_fallback_split(tmp_path, capsys):
    make_sun397(tmp_path)
    names = ldifs.class_names(ldifs.TASKS["sun397"], tmp_path)
    assert names == ("abbey", "apartment building outdoor", "beach")  # the release's formatting
    assert_splits("sun397", tmp_path, {"train": 24, "val": 3, "test": 3})


def write_sun397_partition_1(root):
    parts = root / "SUN397/Partitions"  # where Partitions.zip unpacks
    parts.mkdir()
    rows = {
        p: [f"{c}/sun_{code}{k}.jpg" for code, c in enumerate(SUN397_CLASSES) for k in ks]
        for p, ks in (("Training_01", range(0, 4)), ("Testing_01", range(4, 8)))
    }
    for p, lines in rows.items():
        (parts / f"{p}.txt").write_text("\n".join(lines) + "\n")


def test_sun397_uses_partition_1_when_present(tmp_path):
    make_sun397(tmp_path)
    write_sun397_partition_1(tmp_path)
    splits = assert_splits("sun397", tmp_path, {"train": 11, "val": 1, "test": 12})
    used = set().union(*(image_ids(d) for d in splits.values()))
    assert not any(p.endswith(("8.jpg", "9.jpg")) for p in used)  # images outside partition 1


def test_imagenet_reads_placed_folders(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    for code, w in enumerate(wnids):
        for k in range(10):
            fake_image(tmp_path / "imagenet/train" / w / f"{k}.JPEG", code)
        fake_image(tmp_path / "imagenet/val" / w / "v.JPEG", code)
    assert_splits("imagenet", tmp_path, {"train": 27, "val": 3, "test": 3})
    assert ldifs.TASKS["imagenet"].classnames[:2] == ("tench", "goldfish")


def test_imagenet_reads_what_image_folder_reads_less_hidden_files(tmp_path):
    """The images and labels of torchvision's ImageFolder, in its order (so the seeded val
    split is the same), less what is hidden: ImageFolder takes macOS's ._* twins for images,
    and a .ipynb_checkpoints/ folder for a class, which shifts every label by one."""
    names = ["B.JPEG", "a.JPEG", "a-1.JPEG", "a_1.JPEG", "10.JPEG", "9.jpeg"]
    for code, wnid in enumerate(["n02", "n01", "n10"]):
        for name in names:
            fake_image(tmp_path / "imagenet/val" / wnid / name, code)
    image_folder = torchvision.datasets.ImageFolder(tmp_path / "imagenet/val").samples
    (tmp_path / "imagenet/val/.ipynb_checkpoints").mkdir()
    (tmp_path / "imagenet/val/n01/._a.JPEG").write_bytes(bytes(4000))
    ours = ldifs.get_dataset("imagenet", "test", tmp_path, download=False)
    assert ours.samples == image_folder


def test_imagenet_follows_linked_folders_as_image_folder_does(tmp_path):
    """Images gathered by symlinks, a folder of them linked into a class folder, are read as
    ImageFolder reads them: skipping them would silently train on fewer images."""
    for k in range(3):
        fake_image(tmp_path / "elsewhere/more" / f"{k}.JPEG", 1)
    fake_image(tmp_path / "imagenet/val/n01/0.JPEG", 0)
    fake_image(tmp_path / "imagenet/val/n02/0.JPEG", 1)
    (tmp_path / "imagenet/val/n02/linked").symlink_to(tmp_path / "elsewhere")
    image_folder = torchvision.datasets.ImageFolder(tmp_path / "imagenet/val").samples
    ours = ldifs.get_dataset("imagenet", "test", tmp_path, download=False)
    assert ours.samples == image_folder and len(ours) == 5


def test_a_link_back_up_the_tree_is_not_followed_round_and_round(tmp_path):
    """A link to a folder above it (`ln -s .. all`) would be walked into again at every level,
    as ImageFolder does until the OS stops it: each image read about 40 times, the other
    classes' images under this class. It is skipped; other links are still followed."""
    for name in ("n01/0.JPEG", "n02/0.JPEG", "elsewhere/1.JPEG"):
        fake_image(tmp_path / name, 0)
    (tmp_path / "n01/up").symlink_to(tmp_path)
    (tmp_path / "n01/self").symlink_to(tmp_path / "n01")
    (tmp_path / "n01/more").symlink_to(tmp_path / "elsewhere")
    expected = [str(tmp_path / "n01" / name) for name in ("0.JPEG", "more/1.JPEG")]
    assert ldifs.image_files(tmp_path / "n01") == expected


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
    if isinstance(t.classnames, tuple):
        assert len(t.classnames) == count
        assert (
            len(set(t.classnames)) == count or task == "imagenet"
        )  # CLIP's list repeats crane, maillot
    assert t.templates and all(
        tpl.format("dog") != tpl and "dog" in tpl.format("dog") for tpl in t.templates
    )


def test_cifar100_names_are_the_datasets_own_with_underscores(tmp_path):
    split = []
    test_set = types.SimpleNamespace(classes=["apple", "aquarium_fish"])
    load = lambda root, s, download: split.append((s, download)) or test_set  # noqa: E731
    task = dataclasses.replace(ldifs.TASKS["cifar100"], load=load)
    assert ldifs.class_names(task, tmp_path) == ("apple", "aquarium_fish")  # the release keeps '_'
    assert split == [("test", False)]


def test_cars_has_task_vectors_eight_templates_and_keeps_slashes(tmp_path):
    templates = ldifs.TASKS["cars"].templates
    assert (
        len(templates) == 8
        and "i love my {}!" in templates
        and "a photo of my dirty {}." in templates
    )
    ram = ["Ram C/V Cargo Van Minivan 2012"]  # torchvision's name, kept as is
    task = dataclasses.replace(ldifs.TASKS["cars"], classnames=lambda root: ram)
    assert ldifs.class_names(task, tmp_path) == ("Ram C/V Cargo Van Minivan 2012",)


def test_held_out_split_is_10_percent_capped_at_20000():
    assert len(ldifs.seeded_split(1000, "val")) == 100
    assert len(ldifs.seeded_split(1_281_167, "val")) == 20000
    assert set(ldifs.seeded_split(1000, "val")).isdisjoint(ldifs.seeded_split(1000, "train"))


@pytest.mark.parametrize("n", [94, 1000, 60000])
def test_held_out_split_is_the_releases_random_split(n):
    n_val = min(int(n * 0.1), 20000)
    train, val = torch.utils.data.random_split(
        range(n), [n - n_val, n_val], generator=torch.Generator().manual_seed(0)
    )
    assert ldifs.seeded_split(n, "train") == train.indices
    assert ldifs.seeded_split(n, "val") == val.indices
    if n == 60000:  # the release asserts this for MNIST
        assert ldifs.seeded_split(n, "train")[0] == 36044


def test_missing_data_is_one_line_naming_the_folder(tmp_path):
    with pytest.raises(ldifs.DataMissing) as e:
        ldifs.get_dataset("dtd", "train", tmp_path, download=False)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "dtd") in message and "'dtd'" in message
    for download in (False, True):  # ImageNet never downloads, whatever --no-download says
        with pytest.raises(ldifs.DataMissing, match="not downloaded automatically.*image-net.org"):
            ldifs.get_dataset("imagenet", "test", tmp_path, download=download)


@pytest.mark.parametrize("name", ["cars", "imagenet", "resisc45"])
def test_missing_data_of_a_task_fetched_by_hand_says_where_in_a_sentence(tmp_path, name):
    """The line says "get it from <source>": it must read as English for by-hand tasks."""
    with pytest.raises(ldifs.DataMissing) as e:
        ldifs.get_dataset(name, "test", tmp_path, download=False)
    where = str(e.value).split("; get it from ", 1)[1]
    assert "by hand" in where and not where.startswith("by hand"), where


def test_list_tasks_shows_every_task(capsys):
    code, out, _ = run_main(ldifs, ["--list-tasks", "--data-root", "/data"], capsys)
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines()[1:-1]}
    assert listed == set(ldifs.TASKS)
    assert "/data/eurosat/2750" in out and "seeded 80/10/10" in out
    assert out.splitlines()[-1].startswith("folder:PATH")


# ------------------------------------------------------------------ evaluation


def blobs(n, num_classes=10, dim=64, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.randint(num_classes, (n,), generator=g)
    return F.normalize(means[y] + noise * torch.randn(n, dim, generator=g), dim=-1), y


def test_probe_separates_separable_data_and_is_chance_on_shuffled_labels():
    (x, y), (tx, ty) = blobs(2000), blobs(1000, seed=1)
    assert ldifs.linear_probe(x, y, tx, ty) > 0.99
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert abs(ldifs.linear_probe(x, shuffled, tx, ty) - 0.1) < 0.05


def tuned_scikit_learn(x, y, val, test):
    """Test accuracy of scikit-learn's LogisticRegression with C picked on val."""
    sklearn = pytest.importorskip("sklearn.linear_model")

    def fit(c):
        return sklearn.LogisticRegression(C=c, max_iter=2000).fit(x.numpy(), y.numpy())

    best = max((0.01, 0.1, 1, 10, 100), key=lambda c: fit(c).score(val[0].numpy(), val[1].numpy()))
    return fit(best).score(test[0].numpy(), test[1].numpy())


# The release's probe regularises only through AdamW's weight decay and its lr sweep. On
# separable data it matches tuned scikit-learn; on noisy data it trails it, measured here
# by 3.4 points (90.6 % against 94.0 %). We keep the release's estimator (its numbers are
# the paper's) and pin the gap, so any drift in it is caught.
@pytest.mark.parametrize("noise, gap", [(0.3, 0.01), (3.0, 0.04)])
def test_probe_against_tuned_scikit_learn_on_separable_and_noisy_data(noise, gap):
    (x, y), val, test = (
        blobs(n, num_classes=20, dim=128, noise=noise, seed=s)
        for n, s in ((3000, 0), (500, 1), (2000, 2))
    )
    theirs = tuned_scikit_learn(x, y, val, test)
    ours = ldifs.linear_probe(x, y, *test, val=val)
    assert ours >= theirs - gap, (ours, theirs)


def test_probe_is_the_releases_adamw_fit_with_bias_picked_on_val():
    (x, y), val = blobs(600, noise=2.0), blobs(300, noise=2.0, seed=1)
    fits = ldifs.fit_linear_probes(x, y, 10, ldifs.PROBE_LRS)
    scores = [ldifs.probe_accuracy(f, *val) for f in fits]
    assert len(set(scores)) > 1  # the learning rate matters here, so the choice is tested
    chosen = ldifs.select_probe((x, y), val, 10)
    best = fits[scores.index(max(scores))]
    assert torch.equal(chosen.weight, best.weight) and torch.equal(chosen.bias, best.bias)
    assert chosen.bias.abs().sum() > 0


def test_probes_fit_side_by_side_as_they_would_alone(monkeypatch):
    x, y = blobs(300, noise=2.0)
    together = ldifs.fit_linear_probes(x, y, 10, ldifs.PROBE_LRS, steps=50)
    monkeypatch.setattr(ldifs, "PROBE_LOGITS", 1)  # one probe at a time
    alone = ldifs.fit_linear_probes(x, y, 10, ldifs.PROBE_LRS, steps=50)
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(a.weight, b.weight, atol=1e-5) and torch.allclose(
            a.bias, b.bias, atol=1e-5
        )
    manual = ldifs.seeded_linear(64, 10, 0)
    optimizer = torch.optim.AdamW(manual.parameters(), lr=ldifs.PROBE_LRS[2])
    for _ in range(50):
        optimizer.zero_grad()
        F.cross_entropy(manual(F.normalize(x, dim=-1)), y).backward()
        optimizer.step()
    assert torch.allclose(manual.weight, together[2].weight, atol=1e-5)


def test_probe_is_deterministic_for_a_seed():
    x, y = blobs(200)
    a, b = (ldifs.fit_linear_probes(x, y, 10, [0.1], steps=20)[0] for _ in range(2))
    other = ldifs.fit_linear_probes(x, y, 10, [0.1], steps=20, seed=1)[0]
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, other.weight)


def test_zero_shot_head_is_open_clips_classifier_times_logit_scale():
    clip, _, _ = ldifs.load_clip(ldifs.TINY_CLIP, "none")
    tokenizer = open_clip.get_tokenizer(ldifs.TINY_CLIP)
    task = ldifs.TASKS["synthetic"]
    head = ldifs.zero_shot_head(clip, tokenizer, task.classnames, task.templates, "cpu")
    theirs = open_clip.build_zero_shot_classifier(clip, tokenizer, task.classnames, task.templates)
    assert torch.allclose(head.weight, theirs.T * clip.logit_scale.exp(), atol=1e-5)
    assert torch.equal(head.bias, torch.zeros(len(task.classnames)))


def test_lp_init_head_is_the_fitted_probe_and_its_bias_trains(tmp_path, monkeypatch):
    args = tiny_args(tmp_path, "--cache-dir", str(tmp_path / "cache"))
    clip, _, transform = ldifs.load_clip(args.model, args.pretrained)
    head = ldifs.probe_head(clip.visual, ldifs.TASKS["synthetic"], 6, transform, args)
    cached = {path.name.split("-")[1] for path in (tmp_path / "cache").iterdir()}
    assert cached == {"train", "val"}  # the probe never needs the test split's features
    f = ldifs.task_features(clip.visual, ldifs.TASKS["synthetic"], transform, args)
    assert torch.equal(head.weight, ldifs.select_probe(f["train"], f["val"], 6).weight)
    assert head.bias.abs().sum() > 0 and head.bias.requires_grad


def test_random_weights_are_cached_per_seed(tmp_path):
    """--pretrained none draws the encoder from --seed: one seed's cached features must never
    stand in for another's (they did: LP-init then fit its head to another encoder)."""
    task, cache = ldifs.TASKS["synthetic"], str(tmp_path / "cache")
    for seed in ("0", "1"):
        args = tiny_args(tmp_path, "--seed", seed, "--cache-dir", cache)
        torch.manual_seed(args.seed)  # as run() does before it draws the weights
        clip, _, transform = ldifs.load_clip(args.model, args.pretrained)
        weights = ldifs.weights_key(args.model, args.pretrained, args.seed)
        cached = ldifs.task_features(clip.visual, task, transform, args, weights, ("val",))
        fresh = ldifs.task_features(clip.visual, task, transform, args, splits=("val",))
        assert torch.equal(cached["val"][0], fresh["val"][0]), seed


class Constant(torch.nn.Module):
    """An encoder that forgot everything: the same features for every image."""

    def forward(self, images):
        return torch.ones(len(images), 64)


def test_forgetting_deltas_are_finetuned_minus_pretrained(tmp_path):
    args = tiny_args(tmp_path, "--cache-dir", str(tmp_path / "cache"))
    clip, _, transform = ldifs.load_clip(args.model, args.pretrained)
    task = ldifs.TASKS["synthetic"]
    constant = Constant()
    row = ldifs.forgetting_on(
        task, clip.visual, constant, ldifs.encoder_digest(constant), clip, transform, args
    )
    assert (
        row["lp_pretrained"] > 0.9 and row["lp_finetuned"] < 0.5
    )  # colour is easy even for random features
    assert (
        row["delta_lp"] == pytest.approx(row["lp_finetuned"] - row["lp_pretrained"])
        and row["delta_lp"] < 0
    )
    assert row["delta_zs"] == pytest.approx(row["zs_finetuned"] - row["zs_pretrained"])
    table = ldifs.forgetting_table({"synthetic": row})
    assert f"{100 * row['delta_lp']:+.1f}" in table


def counted_probe_fits(monkeypatch):
    """The list that gets an entry for every linear probe fit for an A_LP from now on."""
    fits, probe = [], ldifs.linear_probe
    monkeypatch.setattr(ldifs, "linear_probe", lambda *a, **k: [fits.append(1), probe(*a, **k)][1])
    return fits


def test_forgetting_fits_no_probe_whose_a_lp_the_cache_keeps(tmp_path, monkeypatch):
    """A sweep over --lam measured the pre-trained encoder's A_LPs once a run, and eval.py
    measured each run's again: both are kept in the cache, keyed by the encoder's weights."""
    args = tiny_args(tmp_path, "--cache-dir", str(tmp_path / "cache"))
    clip, _, transform = ldifs.load_clip(args.model, args.pretrained)
    task, finetuned = ldifs.TASKS["synthetic-stripes"], copy.deepcopy(clip.visual)

    def measure():
        digest = ldifs.encoder_digest(finetuned)
        return ldifs.forgetting_on(task, clip.visual, finetuned, digest, clip, transform, args)

    first = measure()
    fits = counted_probe_fits(monkeypatch)
    assert measure() == first
    assert fits == []
    with torch.no_grad():
        next(finetuned.parameters()).view(-1)[0] += 1e-3  # another run's weights
    measure()
    assert len(fits) == 1  # the fine-tuned encoder's alone


def test_the_fine_tuned_encoder_is_digested_once_a_run_not_once_an_eval_task(tmp_path, monkeypatch):
    """Its A_LPs are kept in the cache under a digest of its weights, which took up to a
    second an eval task (ViT-L/14 on the CPU) though the weights do not change between them."""
    args = tiny_args(tmp_path, "--cache-dir", str(tmp_path / "cache"))
    args.eval_tasks = ["synthetic", "synthetic-stripes"]  # two tasks, neither trained on here
    clip, _, transform = ldifs.load_clip(args.model, args.pretrained)
    digested, digest = [], ldifs.encoder_digest
    monkeypatch.setattr(ldifs, "encoder_digest", lambda e: [digested.append(e), digest(e)][1])
    finetuned = copy.deepcopy(clip.visual)
    rows = ldifs.evaluate_forgetting(clip.visual, finetuned, clip, transform, {}, tmp_path, args)
    assert list(rows) == args.eval_tasks and digested == [finetuned]


def test_an_a_lp_measured_on_a_dataset_unpacked_in_part_is_not_kept(tmp_path, monkeypatch):
    """Data of other than the dataset's size gets a warning (unpacked in part? download it
    again), and the user mends it: an A_LP kept from it would be read on, the baseline of
    every later run. One measured on the whole dataset is kept."""
    args = tiny_args(tmp_path, "--cache-dir", str(tmp_path / "cache"))
    clip, _, transform = ldifs.load_clip(args.model, args.pretrained)
    whole = dataclasses.replace(ldifs.TASKS["synthetic-stripes"], split_sizes=(2400, 240, 600))
    in_part = dataclasses.replace(whole, split_sizes=(2401, 240, 600))  # a train image short
    weights = ldifs.weights_key(args.model, args.pretrained, args.seed)
    fits = counted_probe_fits(monkeypatch)
    for task in (in_part, in_part, whole, whole):
        ldifs.cached_linear_probe(clip.visual, task, transform, args, weights, weights)
    assert len(fits) == 3


@pytest.mark.parametrize(
    "name, make, add_split_files",
    [
        ("resisc45", make_resisc45, write_resisc45_split_files),
        ("sun397", make_sun397, write_sun397_partition_1),
    ],
)
def test_the_cache_tells_the_seeded_split_from_the_split_files(
    tmp_path, monkeypatch, name, make, add_split_files
):
    """Without its split files a task falls back to a seeded split (with a warning); the
    cache kept that split's A_LP and features (RESISC45's have the files' sizes) and read
    them on after the user added the files: another split's baseline in every later run."""
    (tmp_path / "data").mkdir()
    make(tmp_path / "data")
    data, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    args = tiny_args(tmp_path, "--data-root", data, "--cache-dir", cache, "--no-download")
    clip, _, transform = ldifs.load_clip(args.model, args.pretrained)
    task = dataclasses.replace(ldifs.TASKS[name], split_sizes=())  # the fakes are smaller
    weights = ldifs.weights_key(args.model, args.pretrained, args.seed)
    fits = counted_probe_fits(monkeypatch)
    for _ in range(2):  # the second time, from the cache
        ldifs.cached_linear_probe(clip.visual, task, transform, args, weights, weights)
    add_split_files(tmp_path / "data")
    ldifs.cached_linear_probe(clip.visual, task, transform, args, weights, weights)
    assert len(fits) == 2
    cached = ldifs.task_features(clip.visual, task, transform, args, weights, ("test",))
    fresh = ldifs.task_features(clip.visual, task, transform, args, splits=("test",))
    assert torch.equal(cached["test"][0], fresh["test"][0])


def test_eval_reuses_the_a_lps_the_run_measured(two_runs, tmp_path, capsys, monkeypatch):
    root, _ = two_runs
    out, fits = tmp_path / "e.json", counted_probe_fits(monkeypatch)
    flags = ["--tasks", "synthetic-stripes", "--workers", "0", "--json", str(out)]
    code, _, err = run_main(
        evaluation, [str(root / "lam10"), *flags, "--cache-dir", str(root / "cache")], capsys
    )
    assert code == 0, err
    recorded = json.loads((root / "lam10/metrics.json").read_text())["forgetting"]
    rows = json.loads(out.read_text())["rows"]
    a_lps = [row["a_lp"]["synthetic-stripes"] for row in rows]
    assert fits == [] and a_lps == [
        recorded["synthetic-stripes"][k] for k in ("lp_pretrained", "lp_finetuned")
    ]


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return images.flatten(1)[:, :8] + 1


def test_feature_cache_hits_misses_on_key_change_and_recomputes_corrupt_entries(tmp_path):
    args = tiny_args(tmp_path, "--cache-dir", str(tmp_path / "cache"))
    data = [(torch.full((3, 4, 4), float(i)), i % 2) for i in range(10)]
    encoder = Counting()
    key = {"model": "m", "pretrained": "p", "task": "t", "split": "train", "preprocess": "a"}
    x1, y1 = ldifs.cached_features(encoder, data, key, args)
    x2, y2 = ldifs.cached_features(encoder, data, key, args)
    assert encoder.calls == 1 and torch.equal(x1, x2) and torch.equal(y1, y2)
    for field in ("model", "pretrained", "task", "split", "preprocess"):
        calls = encoder.calls
        ldifs.cached_features(encoder, data, {**key, field: "other"}, args)
        assert encoder.calls == calls + 1, field
    for entry in (tmp_path / "cache").iterdir():
        entry.write_bytes(entry.read_bytes()[:50])
    calls = encoder.calls
    x3, _ = ldifs.cached_features(encoder, data, key, args)
    assert encoder.calls == calls + 1 and torch.equal(x3, x1)


def test_files_digest_is_of_the_real_paths_sizes_and_mtimes(tmp_path, monkeypatch):
    """files_digest stats a file once and resolves a folder once (a folder task may hold a
    million images): through linked files and folders, and from a relative path, it must
    still digest each file's real path, size and mtime."""
    real = tmp_path / "real"
    real.mkdir()
    for name in ("a", "bb"):
        (real / f"{name}.jpg").write_bytes(name.encode())
    (tmp_path / "linked").symlink_to(real)
    (real / "c.jpg").symlink_to(real / "bb.jpg")
    monkeypatch.chdir(real)
    paths = [real / "a.jpg", tmp_path / "linked" / "bb.jpg", str(real / "c.jpg"), "bb.jpg"]
    paths.append(tmp_path / "linked" / "c.jpg")
    stats = [(os.path.realpath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    assert ldifs.files_digest(paths) == hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    assert len({path for path, _, _ in stats}) == 2  # the links name the files they link to


def test_the_feature_cache_deletes_what_killed_writes_on_this_machine_left(tmp_path):
    """A run killed while it writes a cache entry (SIGKILL, the OOM killer) leaves the
    temporary file, 2.6 GB for ImageNet's train split, and each such kill another. The next
    write there deletes those of ended processes on this machine, and no other: the cache may
    be shared by machines, whose writes may still run."""
    cache = tmp_path / "cache"
    cache.mkdir()
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    host, pid = ldifs.HOST, os.getpid()
    stale = [
        cache / f"t-train-1.pt.{host}-{ended.pid}.tmp",
        cache / f"x.json.{host}-{ended.pid}.tmp",
    ]
    kept = [cache / f"t-train-1.pt.{host}-{pid}.tmp", cache / f"t-train-1.pt.other-{ended.pid}.tmp"]
    kept.append(cache / "notes.tmp")
    for path in stale + kept:
        path.write_bytes(bytes(100))
    args = tiny_args(tmp_path, "--cache-dir", str(cache))
    data = [(torch.full((3, 4, 4), float(i)), i % 2) for i in range(10)]
    key = {"model": "m", "pretrained": "p", "task": "t", "split": "train", "preprocess": "a"}
    ldifs.cached_features(Counting(), data, key, args)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    names = []
    ldifs.atomic_write(tmp_path / "a.json", lambda tmp: [names.append(tmp.name), tmp.touch()])
    assert names == [f"a.json.{host}-{pid}.tmp"]


def test_an_unwritable_feature_cache_warns_and_the_run_goes_on(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    args = tiny_args(tmp_path, "--cache-dir", str(tmp_path / "file/cache"))  # not a folder
    data = [(torch.full((3, 4, 4), float(i)), i % 2) for i in range(10)]
    key = {"model": "m", "pretrained": "p", "task": "t", "split": "train", "preprocess": "a"}
    x, y = ldifs.cached_features(Counting(), data, key, args)
    assert len(x) == len(y) == 10 and "cannot cache features" in capsys.readouterr().err


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_draws_progress_bars_and_warns(tmp_path, capsys, monkeypatch, rank):
    """Under torchrun every rank extracts features and fits the LP-init probe: one bar each
    would garble the terminal line they share, and each warning would come once a rank."""
    if rank == 0 and os.environ.get("TQDM_DISABLE"):  # tqdm read it when this process began
        pytest.skip("the shell's TQDM_DISABLE hides rank 0's bars too")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    args = tiny_args(tmp_path)
    capsys.readouterr()
    x, y = ldifs.extract_features(
        Counting(), [(torch.ones(3, 4, 4), 0), (torch.zeros(3, 4, 4), 1)], args
    )
    ldifs.fit_linear_probes(x, y, 2, [0.1], steps=2)
    ldifs.warn_once(f"a warning seen by rank {rank}")
    err = capsys.readouterr().err
    assert (
        ("features" in err and "linear probe" in err and "warning" in err)
        if rank == 0
        else err == ""
    )


def test_feature_key_tracks_model_weights_split_and_preprocessing(tmp_path):
    task, tag = ldifs.TASKS["synthetic"], ldifs.weights_key("m", "openai", 0)
    key = ldifs.feature_key(tag, task, "train", "T1", tmp_path)
    assert (
        key
        != ldifs.feature_key(tag, task, "test", "T1", tmp_path)
        != ldifs.feature_key(tag, task, "train", "T2", tmp_path)
    )
    assert key != ldifs.feature_key(
        ldifs.weights_key("other", "openai", 0), task, "train", "T1", tmp_path
    )
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"1")
    first = ldifs.feature_key(
        ldifs.weights_key("m", str(weights), 0), task, "train", "T1", tmp_path
    )
    weights.write_bytes(b"22")
    assert (
        ldifs.feature_key(ldifs.weights_key("m", str(weights), 0), task, "train", "T1", tmp_path)
        != first
    )
    resisc45, keys = ldifs.TASKS["resisc45"], []  # its split files say which images a split holds
    for text in (None, "a.jpg", "b.jpg"):
        if text:
            (tmp_path / "resisc45").mkdir(exist_ok=True)
            (tmp_path / "resisc45/resisc45-test.txt").write_text(text)
        keys.append(json.dumps(ldifs.feature_key(tag, resisc45, "test", "T1", tmp_path)))
    assert len(set(keys)) == 3
    # random weights ('none') are drawn by the seed; real ones do not depend on it
    assert ldifs.weights_key("m", "none", 0) != ldifs.weights_key("m", "none", 1)
    assert ldifs.weights_key("m", "openai", 0) == ldifs.weights_key("m", "openai", 1)


def test_spellings_of_one_tag_that_open_clip_accepts_are_one_key():
    """open_clip reads tags case- and dash-blind, so --pretrained OpenAI loads openai: as two
    keys, eval.py refused to compare such runs as "from different weights", and the feature
    cache held the baseline twice."""
    for spelling in ("OpenAI", "laion2b-s34b-b79k"):
        canonical = spelling.lower().replace("-", "_")
        assert ldifs.weights_key("m", spelling, 0) == ldifs.weights_key("m", canonical, 0)


def test_a_quickgelu_name_for_weights_built_with_quickgelu_anyway_is_one_key():
    """ldifs.py builds ViT-B-32 on OpenAI's (or MetaCLIP's) weights with QuickGELU: the network
    that ViT-B-32-quickgelu names. As two keys, eval.py refused to compare such runs. GELU
    weights, and random ones, are two networks."""
    for tag, same in [("openai", 1), ("metaclip_400m", 1), ("laion2b_s34b_b79k", 0), ("none", 0)]:
        quick = ldifs.weights_key("ViT-B-32-quickgelu", tag, 0)
        assert (quick == ldifs.weights_key("ViT-B-32", tag, 0)) == same, tag


def test_an_hf_hub_model_is_keyed_by_the_weights_open_clip_fetched(tmp_path, monkeypatch):
    """Keyed by its name alone, a repo whose owner pushed new weights reused the old weights'
    cached features: a silently wrong baseline. The key follows the files' contents."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--clip"

    def fetched(commit, weights):  # as hf_hub_download lays out what it fetches
        snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
        snapshot.mkdir(parents=True)
        blobs.mkdir(exist_ok=True)
        for name, text in [
            ("open_clip_config.json", "{}"),
            ("open_clip_model.safetensors", weights),
        ]:
            if not (blobs / text).exists():  # named by their content's hash: fetched once
                (blobs / text).write_text(text)
            (snapshot / name).symlink_to(Path("../../blobs") / text)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return ldifs.weights_key("hf-hub:org/clip", "none", 0)

    first = fetched("c1", "weights")
    assert fetched("c2", "weights") == first  # a new commit that left the weights as they were
    assert fetched("c3", "new weights") != first


def test_a_local_dir_model_is_keyed_by_its_files_and_recorded_absolute(tmp_path, monkeypatch):
    """--model local-dir:PATH, e.g. a saved run: open_clip loads PATH's weights and ignores
    --pretrained, so the feature cache must track those files, and eval.py must find PATH
    from any folder."""
    weights = tmp_path / "run" / "open_clip_pytorch_model.bin"
    weights.parent.mkdir()
    weights.write_bytes(b"1")
    (weights.parent / "open_clip_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    first = ldifs.weights_key("local-dir:run", "none", 0)
    weights.write_bytes(b"22")
    assert ldifs.weights_key("local-dir:run", "none", 0) != first
    args = ldifs.parse_args(["--task", "eurosat", "--model", "local-dir:run"])
    ldifs.resolve_args(args)
    assert args.model == f"local-dir:{weights.parent}"
    assert args.pretrained == "none"  # not the recipe's 'openai', which the folder ignores
    args = ldifs.parse_args(["--model", "local-dir:run", "--pretrained", "laion2b_s34b_b79k"])
    with pytest.raises(ldifs.UsageError, match="--pretrained laion2b_s34b_b79k: an hf-hub: or "):
        ldifs.resolve_args(args)


@pytest.mark.parametrize(
    "task, model, pretrained",
    [
        ("synthetic", "ViT-B-32", "openai"),  # README's default, not the tiny recipe's 'none'
        ("synthetic", "ldifs-tiny", "none"),  # the recipe's own model keeps its weights
        ("synthetic", None, "none"),
        ("eurosat", "RN50", "openai"),
    ],
)
def test_a_typed_model_gets_the_default_weights_not_another_models_recipe(task, model, pretrained):
    """A recipe's --pretrained belongs to its --model: --task synthetic --model ViT-B-32 would
    otherwise train a randomly drawn ViT-B-32 without a word."""
    args = ldifs.parse_args(["--task", task] + (["--model", model] if model else []))
    ldifs.resolve_args(args)
    assert args.pretrained == pretrained


def test_an_hf_hub_model_records_no_tag_and_its_key_ignores_tag_and_seed(monkeypatch):
    """open_clip loads an hf-hub: repo's own weights and ignores --pretrained: a run must not
    record the recipe's 'openai', nor the seed tell two runs from one repo apart."""
    args = ldifs.parse_args(["--task", "eurosat", "--model", "hf-hub:org/repo"])
    ldifs.resolve_args(args)
    assert args.pretrained == "none"
    key = ldifs.weights_key("hf-hub:org/repo", "none", 0)
    assert key == ldifs.weights_key("hf-hub:org/repo", "openai", 1)
    assert key["model"] == "hf-hub:org/repo" and "pretrained" not in key and "seed" not in key


def test_a_local_dir_of_a_continual_run_names_one_of_its_stages(tmp_path, capsys):
    """A continual run's --out holds its stages' models, not one of its own: "name a folder
    a run wrote" left the user, who had named one, to guess."""
    run = tmp_path / "eleven-tasks-lam10"
    for k in range(11):  # the last is 10-task10, which sorts before 2-task2 as text
        (run / f"{k}-task{k}").mkdir(parents=True)
        (run / f"{k}-task{k}" / "open_clip_config.json").write_text("{}")
    flags = ["--task", "synthetic", "--model", f"local-dir:{run}", "--out", str(tmp_path / "o")]
    code, _, err = run_main(ldifs, flags, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"a continual run's folder; name a stage, e.g. local-dir:{run / '10-task10'}" in err


def test_a_local_dir_folder_without_its_config_or_weights_is_refused_up_front(tmp_path, capsys):
    """open_clip builds a local-dir: folder that holds a config but no weights file with random
    weights, and only logs a warning (which ldifs.py silences): a fine-tuning or an eval.py
    baseline from noise that looks like a result. A folder without its config was blamed on the
    connection."""
    folder = tmp_path / "run"
    folder.mkdir()
    flags = ["--task", "synthetic", "--model", f"local-dir:{folder}", "--out", str(tmp_path / "o")]
    code, _, err = run_main(ldifs, flags, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"local-dir:{folder}: no open_clip_config.json in it" in err, err
    config = {"model_cfg": ldifs.TINY_CLIP_CONFIG, "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    code, _, err = run_main(ldifs, flags, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "no weights file (*.safetensors, *.bin or *.pth) in it" in err, err
    with pytest.raises(ldifs.UsageError, match="no weights file"):  # eval.py's path
        ldifs.load_clip(f"local-dir:{folder}", "none")
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"")
    (folder / "open_clip_config.json").write_text("{")
    code, _, err = run_main(ldifs, [*flags, "--workers", "0"], capsys)
    assert code == 1 and err.count("\n") == 1 and "check its model config" in err, err
    with pytest.raises(ldifs.UserError, match="check its model config"):  # not the connection
        ldifs.load_clip(f"local-dir:{folder}", "openai")  # as a run recorded it before 2026-11-28
    assert not (tmp_path / "o").exists()


def test_an_hf_hub_model_whose_weights_fail_to_download_is_an_error(monkeypatch):
    """open_clip goes on with random weights when an hf-hub: model's config downloads and its
    weights do not, and only logs a warning."""
    config = {"model_cfg": ldifs.TINY_CLIP_CONFIG, "preprocess_cfg": {}}
    monkeypatch.setattr(open_clip.factory, "_get_hf_config", lambda *_, **__: config)

    def connection_lost(*_, **__):
        raise OSError("connection reset")

    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", connection_lost)
    with pytest.raises(ldifs.UserError, match="could not download hf-hub:org/repo weights"):
        ldifs.load_clip("hf-hub:org/repo", "none")


def test_feature_key_of_a_folder_task_tracks_its_images(tmp_path):
    root = make_folder(tmp_path / "d", counts={"train": 4, "test": 2})
    tag = ldifs.weights_key("m", "openai", 0)

    def run_key():  # each run builds its task anew
        return ldifs.feature_key(tag, ldifs.folder_task(f"folder:{root}"), "test", "T", root)

    key = run_key()
    assert run_key() == key
    (root / "test/eel/0.jpg").rename(root / "test/cat_a/relabelled.jpg")  # same image count
    relabelled = run_key()
    assert relabelled != key
    os.utime(root / "test/cat_a/relabelled.jpg", ns=(0, 0))  # edited in place
    edited = run_key()
    assert edited not in (key, relabelled)
    twin = shutil.copy2(root / "test/cat_a/relabelled.jpg", tmp_path / "twin.jpg")  # same stat
    (root / "test/cat_a/relabelled.jpg").unlink()
    (root / "test/cat_a/relabelled.jpg").symlink_to(twin)  # a link now, to another file
    assert run_key() not in (key, relabelled, edited)


# ------------------------------------------------------------------ benchmarks (opt-in)
# LDIFS_BENCH=1 python -m pytest test_ldifs.py -k bench -s
# They print figures for the README and assert nothing about time.

bench = pytest.mark.skipif(not os.environ.get("LDIFS_BENCH"), reason="benchmark: set LDIFS_BENCH=1")


@bench
def test_bench_probe_against_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    (x, y), (vx, vy), (tx, ty) = (
        blobs(n, num_classes=10, dim=512, noise=8.0, seed=s)
        for n, s in ((50000, 0), (5000, 1), (10000, 2))
    )
    start = time.perf_counter()
    ours = ldifs.linear_probe(x, y, tx, ty, val=(vx, vy))
    middle = time.perf_counter()

    def fit(c, a, b):
        return sklearn.LogisticRegression(C=c, max_iter=1000).fit(a.numpy(), b.numpy())

    best_c = max((0.01, 0.1, 1, 10, 100), key=lambda c: fit(c, x, y).score(vx.numpy(), vy.numpy()))
    theirs = fit(best_c, torch.cat([x, vx]), torch.cat([y, vy])).score(tx.numpy(), ty.numpy())
    end = time.perf_counter()
    print(
        f"\nprobe, 50000x512, 10 classes: ours {100 * ours:.1f}% in {middle - start:.1f} s; "
        f"scikit-learn (C={best_c}) {100 * theirs:.1f}% in {end - middle:.1f} s"
    )


# ------------------------------------------------------------------ runs that survive

RESUME_FLAGS = [
    "--task",
    "synthetic",
    "--head",
    "zs",
    "--max-steps",
    "16",
    "--save-every",
    "2",
    "--eval-tasks",
    "none",
]


def start_cli(*flags, stderr=subprocess.DEVNULL, **popen):
    command = [sys.executable, str(HERE / "ldifs.py"), *flags]
    return subprocess.Popen(
        command,
        env=run_env(flags),
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
        **popen,
    )


def wait_for_checkpoint(process, out):
    deadline = time.time() + 120
    while (
        not (out / "checkpoint.pt").exists() and time.time() < deadline and process.poll() is None
    ):
        time.sleep(0.005)


def kill_after_first_checkpoint(flags, out):
    """Start ldifs.py, SIGKILL it as soon as its first checkpoint exists."""
    process = start_cli(*flags, "--out", str(out))
    wait_for_checkpoint(process, out)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished


def test_sigkill_then_resume_is_bitwise_identical_to_an_unbroken_run(tmp_path):
    unbroken = run_cli(*RESUME_FLAGS, "--workers", "0", "--out", str(tmp_path / "unbroken"))
    assert unbroken.returncode == 0, unbroken.stderr
    killed = tmp_path / "killed"
    kill_after_first_checkpoint([*RESUME_FLAGS, "--workers", "2"], killed)
    step = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= step < 16
    resumed = run_cli(*RESUME_FLAGS, "--workers", "2", "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("open_clip_pytorch_model.bin", "head.pt"):
        a = torch.load(tmp_path / "unbroken" / name, weights_only=True)
        b = torch.load(killed / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor)), name
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # no log line twice after the resume


@pytest.mark.parametrize("to_the_group", [False, True])
def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path, to_the_group):
    """kill, Slurm's preemption and torchrun's teardown send SIGTERM to the run; `timeout`,
    scancel and a terminal's job kill send it to the whole process group, data-loading
    workers included. Either way the run must end with the same one line, after the cleanup
    Ctrl-C gets (no temporary checkpoint left behind), and no worker may die with a "killed
    by signal" traceback that can become the run's error."""
    flags = [*RESUME_FLAGS, "--workers", "2" if to_the_group else "0", "--out", str(tmp_path)]
    process = start_cli(*flags, stderr=subprocess.PIPE, start_new_session=to_the_group)
    wait_for_checkpoint(process, tmp_path)
    if to_the_group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    last = "ldifs.py: interrupted; --resume continues from the last checkpoint"
    assert process.returncode == 130 and err.strip().splitlines()[-1] == last, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert not list(tmp_path.glob("*.tmp"))


def hold_then_sigterm(lock, ready):
    ldifs.quiet_worker_exit(0)
    with lock:
        ready.set()
        time.sleep(60)


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGTERM")
def test_a_worker_ended_by_sigterm_lets_go_of_its_locks():
    """A worker that os._exit-ed on SIGTERM while it held the lock of the loader's shutdown
    event (it checks the event for every batch) left the main process waiting on that lock
    for ever: scancel or timeout hung the run. It unwinds as on Ctrl-C, letting go."""
    fork = multiprocessing.get_context("fork")
    lock, ready = fork.Lock(), fork.Event()
    worker = fork.Process(target=hold_then_sigterm, args=(lock, ready))
    worker.start()
    assert ready.wait(30)
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(30)
    assert lock.acquire(timeout=10)


def test_a_worker_keeps_quiet_when_the_main_process_hangs_up_mid_batch(capsys):
    """A worker's fd-sharing thread printed a BrokenPipeError traceback beside the main
    process's one line when Ctrl-C or SIGTERM stopped the main process mid-batch."""
    for error in (BrokenPipeError(), ConnectionResetError(), EOFError(), ValueError("real")):
        ldifs.unless_the_main_process_left(type(error), error, None)
    assert capsys.readouterr().err.strip() == "ValueError: real"


def stop_at_first_checkpoint(flags, capsys, monkeypatch):
    """Run ldifs.py in this process and stop it with Ctrl-C once its first checkpoint is saved."""
    save = ldifs.save_checkpoint
    monkeypatch.setattr(ldifs, "save_checkpoint", lambda *a: [save(*a), ctrl_c()])
    assert run_main(ldifs, flags, capsys)[0] == 130
    monkeypatch.undo()


def test_resume_deletes_what_a_write_killed_midway_left(tmp_path, capsys, monkeypatch):
    """A run killed while it writes a checkpoint (SIGKILL, the OOM killer, Slurm's kill after
    its grace time) leaves the temporary file, as big as a checkpoint, and each such kill
    another: the next run on --out deletes them, and no file of the user's."""
    flags = [*RESUME_FLAGS, "--workers", "0", "--out", str(tmp_path)]
    stop_at_first_checkpoint(flags, capsys, monkeypatch)
    stale = [tmp_path / "checkpoint.pt.4242.tmp", tmp_path / "0-synthetic/metrics.json.7.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / "data/x.1.tmp", tmp_path / "a.b.tmp"]
    for path in stale + kept:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes(100))
    code, _, err = run_main(ldifs, [*flags, "--resume"], capsys)
    assert code == 0, err
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)


def test_a_checkpoint_from_a_machine_with_more_gpus_resumes_on_fewer(tmp_path, monkeypatch):
    """Rank 0 saves the RNG state of every GPU it sees, and torch sets them by position: the
    checkpoint of an 8-GPU node raised IndexError on a 1-GPU machine. The states of GPUs
    that are not there are dropped."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    classifier = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(classifier.parameters())
    states = [torch.full((8,), gpu, dtype=torch.uint8) for gpu in range(8)]
    checkpoint = dict(model=classifier.state_dict(), optimizer=optimizer.state_dict(), step=3)
    checkpoint.update(init_head=None, rng={"cpu": torch.get_rng_state(), "cuda": states})
    stage = types.SimpleNamespace(out=tmp_path, rank=1)
    assert ldifs.restore(checkpoint, classifier, optimizer, stage) == (3, None)
    assert len(restored) == 1 and torch.equal(restored[0], states[0])


LOCK = (
    "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)"
)


def held_by_a_run(out):
    """Whether another process holds --out: this one, or any other, cannot lock it now."""
    locking = subprocess.run([sys.executable, "-c", LOCK, str(out / ".lock")], capture_output=True)
    return locking.returncode != 0


def holder_of(lock, then, *argv):
    """Another process that holds the file `lock`, then runs `then` (with `argv` after the
    lock in sys.argv); returned once it holds the lock."""
    command = [sys.executable, "-c", f"{LOCK}; print(flush=True); {then}", str(lock), *argv]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    process.stdout.readline()
    return process


def test_a_run_holds_its_out_folder_and_a_second_run_on_it_is_refused(
    tmp_path, capsys, monkeypatch
):
    """The same command started twice (in another terminal, or a requeued job whose first
    copy still runs) passed the check for a run in --out until the first checkpoint, and
    the two trained over each other's files."""
    out, held = tmp_path / "run", []
    save = ldifs.save_checkpoint
    holding = lambda *a: [held.append(held_by_a_run(out)), save(*a)]  # noqa: E731
    monkeypatch.setattr(ldifs, "save_checkpoint", holding)
    flags = [*RESUME_FLAGS, "--workers", "0", "--out"]
    assert run_main(ldifs, [*flags, str(out)], capsys)[0] == 0
    assert held and all(held) and not held_by_a_run(out)  # held while it trained, then let go
    other = tmp_path / "other"
    other.mkdir()
    first = holder_of(other / ".lock", "sys.stdin.read()")  # as the first copy would, till told
    code, _, err = run_main(ldifs, [*flags, str(other)], capsys)
    first.communicate("")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{other} is in use by another ldifs.py; wait for it to end, or choose" in err, err
    assert [p.name for p in other.iterdir()] == [".lock"]


def test_eval_says_a_run_still_training_is_running_not_unfinished(tmp_path, capsys):
    """`eval.py runs/*` while a run trains told the user to finish it with --resume, which
    the running copy would refuse: say it runs."""
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    training = holder_of(tmp_path / ".lock", "sys.stdin.read()")
    code, _, err = run_main(evaluation, [str(tmp_path)], capsys)
    training.communicate("")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{tmp_path} is a run that ldifs.py is still training; name it once it ends" in err


def downloaded_task(load):
    """A task that torchvision downloads, as far as ldifs.py can tell, read by `load`."""
    fake = "torchvision.datasets.Fake"
    return ldifs.Task(
        name="fake", templates=("{}",), epochs=1, num_classes=2, load=load, source=fake
    )


def test_runs_started_together_fetch_a_task_one_at_a_time(tmp_path, capsys):
    """A sweep started at once (`for lam in 0 10; do python ldifs.py ... & done`) downloaded
    into one file from every run, and a run could read the folder another was still
    unpacking: torchvision takes any EuroSAT folder for the whole dataset."""
    unpacked, seen = tmp_path / "unpacked", []
    task = downloaded_task(lambda root, split, download: seen.append(unpacked.exists()) or [])
    unpack = "import time; time.sleep(1); open(sys.argv[2], 'w')"  # for a second
    first = holder_of(tmp_path / ".fake.lock", unpack, str(unpacked))
    ldifs.get_dataset(task, "test", tmp_path)
    first.wait()
    assert seen == [True]  # read once the other process had unpacked it
    err = capsys.readouterr().err
    assert f"fake: waiting for another process to fetch it into {tmp_path}" in err, err


def test_a_data_root_this_user_may_only_read_still_serves_its_data(tmp_path):
    """A shared, read-only dataset folder holds the data and cannot hold a lock file. (Tests
    run as root, whom permissions do not stop: a folder where the lock file would go fails
    to open as such a folder does.)"""
    (tmp_path / ".fake.lock").mkdir()
    task = downloaded_task(lambda root, split, download: ["an image"])
    assert ldifs.get_dataset(task, "test", tmp_path) == ["an image"]


def test_a_log_line_cut_short_by_a_kill_or_full_disk_is_dropped_on_resume(
    tmp_path, capsys, monkeypatch
):
    """A full disk (or a crash) mid-write leaves log.jsonl's last line cut short. It was
    written after the last checkpoint, so the resumed run writes it again: the resume must
    drop it, not stop with a JSONDecodeError traceback."""
    flags = [*RESUME_FLAGS, "--workers", "0", "--log-every", "1", "--out", str(tmp_path)]
    stop_at_first_checkpoint(flags, capsys, monkeypatch)
    with (tmp_path / "log.jsonl").open("a") as log:
        log.write('{"step": 3, "lr": 0.0')
    code, _, err = run_main(ldifs, [*flags, "--resume"], capsys)
    assert code == 0, err
    assert [line["step"] for line in read_log_at(tmp_path)] == list(range(1, 17))


def cut_short_on_writing(name, monkeypatch):
    """Ctrl-C halfway through writing a text file whose name starts with `name`."""
    write_text = Path.write_text

    def write_half(path, text, *args, **kwargs):
        if not path.name.startswith(name):
            return write_text(path, text, *args, **kwargs)
        write_text(path, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", write_half)


@pytest.mark.parametrize(
    "name, logged", [("open_clip_config.json", range(1, 17)), ("log.jsonl", [1, 2])]
)
def test_a_run_killed_while_it_rewrites_a_file_keeps_the_file_whole(
    tmp_path, capsys, monkeypatch, name, logged
):
    """The open_clip config is written at the end of a run, and log.jsonl is rewritten at
    a resume (without the lines after the checkpoint): killed mid-write, neither may be left
    half-written, the one for open_clip, the other with the log's earlier lines lost."""
    flags = [*RESUME_FLAGS, "--workers", "0", "--log-every", "1", "--out", str(tmp_path)]
    stop_at_first_checkpoint(flags, capsys, monkeypatch)
    cut_short_on_writing(name, monkeypatch)
    assert run_main(ldifs, [*flags, "--resume"], capsys)[0] == 130
    assert not (tmp_path / "open_clip_config.json").exists()
    assert [line["step"] for line in read_log_at(tmp_path)] == list(logged)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_resume_that_only_evaluates_keeps_the_measured_throughput(tmp_path, capsys, monkeypatch):
    flags = [*RESUME_FLAGS, "--workers", "0", "--out", str(tmp_path)]

    monkeypatch.setattr(ldifs, "report", ctrl_c)
    assert run_main(ldifs, flags, capsys)[0] == 130
    measured = strict_json((tmp_path / "metrics.json").read_text())
    assert measured["train_images_per_second"] > 0 and measured["train_seconds"] > 0
    monkeypatch.undo()
    code, out, err = run_main(ldifs, [*flags, "--resume"], capsys)
    assert code == 0, err
    metrics = strict_json((tmp_path / "metrics.json").read_text())
    assert "test_accuracy" in metrics
    for key in ("train_images_per_second", "train_seconds", "peak_memory_mb"):
        assert metrics[key] == measured[key], key
    assert f"({measured['train_images_per_second']:.1f} images/s)" in out


def test_tqdm_environment_variables_reach_every_progress_bar(tmp_path, monkeypatch):
    """A batch job's log keeps every refresh of every bar. tqdm's own variables, read when
    it is imported, keep it short, so no bar may set what they set: TQDM_DISABLE=1 draws
    none, and with TQDM_MININTERVAL=3600 a bar is drawn when it starts and when it ends."""
    bars, probe_starts = ("train synthetic:", "features:", "linear probe:"), "linear probe:   0%"

    def run(name, **env):  # a cache of its own: a cached probe draws no bar
        out = ["--out", str(tmp_path / name), "--cache-dir", str(tmp_path / name / "cache")]
        result = run_cli(*RESUME_FLAGS[:-1], "synthetic-stripes", "--workers", "0", *out, env=env)
        assert result.returncode == 0, result.stderr
        return result.stderr

    monkeypatch.setenv("TQDM_DISABLE", "1")  # the shell's: the runs do not see it
    drawn = run("drawn")
    assert all(bar in drawn for bar in bars)
    assert drawn.count(bars[2]) > drawn.count(probe_starts) > 0
    disabled = run("disabled", TQDM_DISABLE="1")
    assert not any(bar in disabled for bar in bars)
    hourly = run("hourly", TQDM_MININTERVAL="3600")
    assert hourly.count(bars[0]) == 2  # the loss figures wait for a redraw, as the rest do
    assert hourly.count(bars[2]) == hourly.count(probe_starts) > 0  # each probe: its start


def test_a_run_killed_in_the_forgetting_evaluation_keeps_its_test_accuracy(
    tmp_path, capsys, monkeypatch
):
    """The forgetting evaluation reads every other task, which can take longer than the
    training: the target accuracy measured before it is written first."""
    flags = [*RESUME_FLAGS[:-1], "synthetic-stripes", "--workers", "0", "--out", str(tmp_path)]

    monkeypatch.setattr(ldifs, "evaluate_forgetting", ctrl_c)
    code, out, _ = run_main(ldifs, flags, capsys)
    assert code == 130
    metrics = strict_json((tmp_path / "metrics.json").read_text())
    assert f"test accuracy {metrics['test_accuracy']:.4f} after 16 steps" in out
    assert "forgetting" not in metrics
    monkeypatch.undo()
    code, out, err = run_main(ldifs, [*flags, "--resume"], capsys)
    assert code == 0, err
    assert "already finished" not in out and "Concept forgetting" in out
    assert "synthetic-stripes" in strict_json((tmp_path / "metrics.json").read_text())["forgetting"]


def test_a_run_killed_in_the_forgetting_evaluation_measures_only_the_other_tasks_on_resume(
    tmp_path, capsys, monkeypatch
):
    """Each eval task's row is written as it is measured: the resumed run measures only the
    others. One skipped for want of data is tried again: the data may be there now."""
    eval_tasks = ["synthetic-stripes", "dtd", "gtsrb"]
    flags = [*RESUME_FLAGS[:-1], ",".join(eval_tasks), "--workers", "0"]
    flags += ["--no-download", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path)]
    measured, measure = [], ldifs.forgetting_on

    def killed_at_gtsrb(task, *args):
        measured.append(task.name)
        if task.name == "gtsrb" and len(measured) == 3:
            raise KeyboardInterrupt
        return measure(task, *args)

    monkeypatch.setattr(ldifs, "forgetting_on", killed_at_gtsrb)
    assert run_main(ldifs, flags, capsys)[0] == 130
    kept = strict_json((tmp_path / "metrics.json").read_text())["forgetting_so_far"]
    assert list(kept) == ["synthetic-stripes", "dtd"] and "skipped" in kept["dtd"]
    measured.clear()
    code, out, err = run_main(ldifs, [*flags, "--resume"], capsys)
    assert code == 0, err
    assert measured == ["dtd", "gtsrb"]
    metrics = strict_json((tmp_path / "metrics.json").read_text())
    assert "forgetting_so_far" not in metrics and list(metrics["forgetting"]) == eval_tasks
    assert metrics["forgetting"]["synthetic-stripes"] == kept["synthetic-stripes"]
    assert "skipped" in metrics["forgetting"]["gtsrb"] and "| synthetic-stripes |" in out


def test_a_resume_that_measures_no_forgetting_keeps_no_rows_of_the_killed_run(
    tmp_path, capsys, monkeypatch
):
    """Killed mid-evaluation, then resumed with --eval-tasks none: the finished run's
    metrics.json kept the killed run's partial rows, which no table would ever complete."""
    flags = [*RESUME_FLAGS[:-1], "synthetic-stripes,dtd", "--workers", "0", "--no-download"]
    flags += ["--data-root", str(tmp_path / "data"), "--out", str(tmp_path)]
    measure = ldifs.forgetting_on

    def killed_at_dtd(task, *args):
        if task.name == "dtd":
            raise KeyboardInterrupt
        return measure(task, *args)

    monkeypatch.setattr(ldifs, "forgetting_on", killed_at_dtd)
    assert run_main(ldifs, flags, capsys)[0] == 130
    assert "forgetting_so_far" in strict_json((tmp_path / "metrics.json").read_text())
    code, _, err = run_main(ldifs, [*flags, "--resume", "--eval-tasks", "none"], capsys)
    assert code == 0, err
    metrics = strict_json((tmp_path / "metrics.json").read_text())
    assert metrics["eval_tasks"] == [] and "test_accuracy" in metrics
    assert "forgetting_so_far" not in metrics and "forgetting" not in metrics


class ClosedPipe:
    """stdout piped into `head`, which has exited: every write raises BrokenPipeError."""

    def write(self, _text):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize(
    "tasks, kept",
    [
        ("synthetic --eval-tasks synthetic-stripes", "forgetting"),
        ("synthetic,synthetic-stripes --eval-tasks none", "accuracy_matrix"),
    ],
)
def test_a_stdout_closed_before_the_results_table_loses_none_of_it(
    tmp_path, capsys, monkeypatch, tasks, kept
):
    """`ldifs.py ... | head -3` closes stdout before the forgetting table (or a continual
    run's summary) is printed, after it was measured: it is in metrics.json all the same."""
    flags = [*RESUME_FLAGS[:-2], "--workers", "0", "--out", str(tmp_path), "--task", *tasks.split()]
    table = ldifs.markdown_table

    def then_close_stdout(*args):
        monkeypatch.setattr(sys, "stdout", ClosedPipe())
        return table(*args)

    monkeypatch.setattr(ldifs, "markdown_table", then_close_stdout)
    code, _, err = run_main(ldifs, flags, capsys)
    assert code == 1 and "Broken pipe" in err
    assert kept in strict_json((tmp_path / "metrics.json").read_text())


def test_list_tasks_into_a_closed_stdout_is_one_line(capsys, monkeypatch):
    """`ldifs.py --list-tasks | head -3` ended with a BrokenPipeError traceback."""
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code, _, err = run_main(ldifs, ["--list-tasks"], capsys)
    assert code == 1 and err == "ldifs.py: error: [Errno 32] Broken pipe\n"


def test_eval_writes_its_json_before_a_closed_stdout_can_end_it(
    two_runs, tmp_path, capsys, monkeypatch
):
    """`eval.py ... --json r.json | head -3`: the results are written before the table."""
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    flags = [str(two_runs[0] / "lam0"), "--tasks", "none", "--workers", "0", "--json", str(out)]
    code, _, err = run_main(evaluation, flags, capsys)
    assert code == 1 and "Broken pipe" in err
    assert strict_json(out.read_text())["rows"][1]["label"] == "synthetic FT"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_save_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.pt"
    ldifs.atomic_save({"step": 1}, path)

    def half_written(obj, f):
        Path(f).write_bytes(b"half")
        raise error

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(type(error)):
        ldifs.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_a_save_reaches_the_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    """A rename can reach the disk before the data renamed: a node that lost power right after
    a checkpoint could come back with an empty checkpoint.pt and the old one gone. The new
    file is flushed (fsync) before it replaces the old one."""
    path, events = tmp_path / "checkpoint.pt", []
    ldifs.atomic_save({"step": 1}, path)
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: [events.append(os.fstat(fd).st_ino), fsync(fd)])
    monkeypatch.setattr(os, "replace", lambda *a: [events.append("replace"), replace(*a)])
    ldifs.atomic_save({"step": 2}, path)
    assert events == [path.stat().st_ino, "replace"]  # the new file's inode, then the rename


def test_existing_run_is_never_overwritten_without_resume(tmp_path, capsys):
    flags = RESUME_FLAGS + ["--max-steps", "2", "--workers", "0", "--out", str(tmp_path / "run")]
    code, _, err = run_main(ldifs, flags + ["--resume"], capsys)
    assert code == 2 and f"no run in {tmp_path / 'run'}" in err
    assert run_main(ldifs, flags, capsys)[0] == 0
    before = (tmp_path / "run/checkpoint.pt").read_bytes()
    code, _, err = run_main(ldifs, flags, capsys)
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "run/checkpoint.pt").read_bytes() == before
    code, _, err = run_main(ldifs, flags + ["--lam", "0", "--resume"], capsys)
    assert code == 2 and "--lam 0.0 (checkpoint: 10.0)" in err
    code, _, err = run_main(ldifs, flags + ["--label-smoothing", "0.1", "--resume"], capsys)
    assert code == 2 and "--label-smoothing 0.1 (checkpoint: 0.0)" in err
    longer = [*flags, "--max-steps", "3", "--resume"]  # the cosine schedule ends elsewhere
    code, _, err = run_main(ldifs, longer, capsys)
    assert code == 2 and "total steps (from --epochs, --max-steps) 3 (checkpoint: 2)" in err
    (tmp_path / "run/checkpoint.pt").write_bytes(before[:100])
    code, _, err = run_main(ldifs, flags + ["--resume"], capsys)
    assert code == 1 and "cannot read checkpoint" in err and len(err.strip().splitlines()) == 1


def test_an_out_that_holds_other_runs_in_its_folders_is_not_sent_to_resume(tmp_path, capsys):
    """`--out runs`, the folder ldifs.py puts its runs in: --resume would only be refused."""
    (tmp_path / "eurosat-lam10").mkdir()
    (tmp_path / "eurosat-lam10/metrics.json").write_text("{}")
    code, _, err = run_main(ldifs, [*RESUME_FLAGS, "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path} holds another run (eurosat-lam10); choose another --out" in err
    assert "pass --resume" not in err


def test_default_out_gives_the_baselines_folders_of_their_own(tmp_path):
    def default_out(*flags):
        args = ldifs.parse_args(["--task", "synthetic,synthetic-stripes", *flags])
        ldifs.resolve_args(args)
        return args.out

    assert default_out("--lam", "0") == Path("runs/synthetic+synthetic-stripes-lam0")
    assert default_out("--lam", "0", "--l2sp", "0.5", "--label-smoothing", "0.1") == Path(
        "runs/synthetic+synthetic-stripes-lam0-l2sp0.5-ls0.1"
    )
    assert default_out("--lam", "10", "--out", str(tmp_path)) == tmp_path
    assert default_out("--lam", "-0", "--l2sp", "-0") == default_out("--lam", "0")  # not lam-0


def test_a_default_out_too_long_for_a_file_name_is_one_line_that_names_out(
    tmp_path, capsys, monkeypatch
):
    """A continual run over eight folders of one's own: joined, their names are over the 255
    bytes a file name may have, which failed as the OS's 'File name too long'."""
    counts = {"train": 10, "test": 1}
    folders = [
        make_folder(tmp_path / f"leaf_photos_batch_{k}_cleaned", counts=counts) for k in range(8)
    ]
    monkeypatch.chdir(tmp_path)
    flags = ["--task", ",".join(f"folder:{f}" for f in folders), *FOLDER_FLAGS]
    code, _, err = run_main(ldifs, flags, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "over the 255 bytes a file name may have; choose a shorter one with --out" in err
    assert not (tmp_path / "runs").exists()


def test_a_hugging_face_text_side_without_transformers_is_one_line_before_any_loading(
    tmp_path, capsys, monkeypatch
):
    """SigLIP's tokenizer and XLM-RoBERTa's text tower need transformers, which the
    requirements leave out: say so before the model or any data loads, not in a traceback."""
    find_spec = importlib.util.find_spec

    def without_transformers(name, *args):
        return None if name == "transformers" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_transformers)
    monkeypatch.setattr(ldifs, "load_clip", lambda *a: pytest.fail("the model was loaded"))
    for model, hub in [
        ("ViT-B-16-SigLIP", "timm/ViT-B-16-SigLIP"),
        ("xlm-roberta-base-ViT-B-32", "xlm-roberta-base"),
    ]:
        flags = ["--task", "synthetic", "--model", model, "--pretrained", "none"]
        code, _, err = run_main(ldifs, [*flags, "--out", str(tmp_path / model)], capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"{model}'s text side comes from Hugging Face ({hub}) and needs transformers" in err
    assert not any(tmp_path.iterdir())


def test_a_tokenizer_that_needs_a_missing_package_is_a_one_line_error(monkeypatch):
    def get_tokenizer(name):  # as open_clip's HFTokenizer does without transformers
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(open_clip, "get_tokenizer", get_tokenizer)
    with pytest.raises(ldifs.UserError, match="tokenizer of hf-hub:x/y needs transformers"):
        ldifs.tokenizer_of("hf-hub:x/y")


def test_a_run_whose_tokenizer_cannot_load_stops_before_training(tmp_path, capsys, monkeypatch):
    """An hf-hub: model's tokenizer needs are known only once its config is fetched, so
    check_model cannot see them: without transformers, a run trained to its end and then
    failed in the forgetting evaluation, the first use of the tokenizer."""

    def get_tokenizer(name):  # as open_clip's HFTokenizer does without transformers
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    ldifs.tokenizer_of.cache_clear()  # a tokenizer an earlier test loaded would hide the check
    monkeypatch.setattr(open_clip, "get_tokenizer", get_tokenizer)
    monkeypatch.setattr(ldifs, "initial_head", lambda *a: pytest.fail("the run went on"))
    flags = ["--task", "synthetic", "--workers", "0", "--out", str(tmp_path / "o")]
    code, _, err = run_main(ldifs, flags, capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert "the tokenizer of ldifs-tiny needs transformers: pip install transformers" in err, err


def test_an_out_that_is_or_is_under_a_file_is_refused_before_the_model_loads(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(ldifs, "load_clip", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        flags = ["--task", "synthetic", "--workers", "0", "--out", str(out)]
        code, _, err = run_main(ldifs, flags, capsys)
        assert code == 2, err
        assert f"--out {out}: {tmp_path / 'notes.txt'} is a file, not a folder" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_out_in_a_folder_this_user_cannot_write_is_refused_before_the_data_loads(
    tmp_path, capsys, monkeypatch
):
    """A shared folder without write permission, or a read-only mount: mkdir failed only
    after the data had downloaded and the model had loaded. (Root may write anywhere, so
    the permission is faked; os.access is what the check asks.)"""
    monkeypatch.setattr(ldifs, "fetch_data", lambda *a: pytest.fail("the data was loaded"))
    locked = unwritable_folder(tmp_path / "shared", monkeypatch)
    out = locked / "runs" / "x"
    code, _, err = run_main(ldifs, ["--task", "synthetic", "--out", str(out)], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert f"--out {out}: cannot write in {locked}" in err, err


def test_a_finished_run_without_its_checkpoints_is_never_trained_again(tmp_path, capsys):
    """Checkpoints are large, and a finished run needs none: deleting them must not let the
    same command train over the run, nor --resume train a finished stage again, nor a
    --resume with other flags or another sequence of tasks train over it."""
    out = tmp_path / "run"
    flags = [*RESUME_FLAGS, "--task", "synthetic,synthetic-stripes", "--max-steps", "2"]
    flags += ["--workers", "0", "--out", str(out)]
    assert run_main(ldifs, flags, capsys)[0] == 0
    weights = sorted(out.glob("*/open_clip_pytorch_model.bin"))
    written = [w.stat().st_mtime_ns for w in weights]
    for checkpoint in out.glob("*/checkpoint.pt"):
        checkpoint.unlink()
    code, _, err = run_main(ldifs, flags, capsys)
    assert code == 2 and "already holds a run; to continue it, pass --resume with the flags" in err
    code, printed, err = run_main(ldifs, [*flags, "--resume"], capsys)
    assert code == 0 and printed.count("already finished") == 2, err
    assert [w.stat().st_mtime_ns for w in weights] == written
    summary = (out / "metrics.json").read_text()
    code, _, err = run_main(ldifs, [*flags, "--resume", "--lam", "5"], capsys)
    assert code == 2 and "--lam 5.0 (metrics.json: 10.0)" in err, err
    reordered = [*flags, "--resume", "--task", "synthetic-stripes,synthetic"]
    code, _, err = run_main(ldifs, reordered, capsys)
    assert (
        code == 2
        and f"{out} holds another run (0-synthetic, 1-synthetic-stripes, metrics.json)" in err
    ), err
    assert not (out / "0-synthetic-stripes").exists()
    assert (out / "metrics.json").read_text() == summary
    single = [*flags, "--resume", "--task", "synthetic"]
    code, _, err = run_main(ldifs, single, capsys)
    assert code == 2 and "holds another run" in err and not (out / "head.pt").exists(), err


def test_resuming_a_finished_one_task_run_points_to_eval_py_for_more_eval_tasks(two_runs, capsys):
    """Its --eval-tasks are for a run that is yet to finish: nothing is left to run."""
    out = two_runs[0] / "lam0"
    flags = ["--task", "synthetic", "--lam", "0", "--max-steps", "12", "--workers", "0"]
    flags += ["--out", str(out), "--resume", "--eval-tasks", "mnist"]
    code, printed, err = run_main(ldifs, flags, capsys)
    assert code == 0 and f"already finished in {out}; loaded it" in printed, err
    assert f"python eval.py {out} --tasks a,b measures it on other eval tasks" in printed


def test_resume_may_extend_a_finished_sequence_but_not_change_it(tmp_path):
    """A continual --resume may add tasks after a finished sequence (its summary is then
    rewritten with more rows), never drop or reorder them."""
    args = types.SimpleNamespace(out=tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"tasks": ["mnist", "svhn"]}))
    tasks = [ldifs.get_task(name) for name in ("mnist", "svhn", "cifar10")]
    assert ldifs.part_of_run(tmp_path / "metrics.json", tasks, args)
    assert ldifs.part_of_run(tmp_path / "2-cifar10/checkpoint.pt", tasks, args)
    assert not ldifs.part_of_run(tmp_path / "2-dtd/checkpoint.pt", tasks, args)
    assert not ldifs.part_of_run(tmp_path / "metrics.json", tasks[::-1], args)
    assert not ldifs.part_of_run(tmp_path / "metrics.json", tasks[:1] + tasks[2:], args)


@pytest.mark.parametrize("text", ["[]", "null", "3"])
def test_a_metrics_file_edited_into_json_that_is_no_object_is_one_line(
    two_runs, tmp_path, capsys, text
):
    """Valid JSON, but not the object both scripts read fields of: an AttributeError or
    TypeError traceback."""
    run = copy_run(two_runs[0] / "lam0", tmp_path / "run")
    (run / "metrics.json").write_text(text)
    flags = ["--task", "synthetic", "--lam", "0", "--max-steps", "12", "--workers", "0"]
    for module, argv in [
        (ldifs, [*flags, "--eval-tasks", "none", "--out", str(run), "--resume"]),
        (evaluation, [str(run), "--workers", "0"]),
    ]:
        code, _, err = run_main(module, argv, capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"cannot read {run / 'metrics.json'}: not a JSON object; fix or delete it" in err


@pytest.mark.parametrize(
    "damaged, ldifs_says, eval_says",
    [
        ("metrics.json", "cannot read {file}: ", "cannot read {file}: "),
        (
            "open_clip_pytorch_model.bin",
            "cannot load the finished run in {run}: PytorchStreamReader",
            "cannot read run {run}: PytorchStreamReader",
        ),
    ],
)
def test_a_run_copied_in_part_is_one_line_in_both_scripts(
    two_runs, tmp_path, capsys, damaged, ldifs_says, eval_says
):
    """A truncated or hand-edited file of a finished run (its checkpoint deleted): say which,
    not a traceback, when ldifs.py --resume loads it and when eval.py does."""
    run = copy_run(two_runs[0] / "lam0", tmp_path / "run")
    file = run / damaged
    file.write_bytes(file.read_bytes()[:20])
    flags = ["--task", "synthetic", "--lam", "0", "--max-steps", "12", "--workers", "0"]
    for module, argv, says in [
        (ldifs, [*flags, "--eval-tasks", "none", "--out", str(run), "--resume"], ldifs_says),
        (evaluation, [str(run), "--workers", "0"], eval_says),
    ]:
        code, _, err = run_main(module, argv, capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert says.format(file=file, run=run) in err, err


def test_a_head_file_without_the_heads_tensors_is_one_line_in_both_scripts(
    two_runs, tmp_path, capsys
):
    """A head.pt that loads but lacks what a script reads of it (another program's, or one
    edited by hand) ended both in a KeyError traceback."""
    run = copy_run(two_runs[0] / "lam0", tmp_path / "run")
    head = torch.load(run / "head.pt", weights_only=True)
    torch.save({"weight": head["weight"]}, run / "head.pt")
    flags = ["--task", "synthetic", "--lam", "0", "--max-steps", "12", "--workers", "0"]
    argv = [*flags, "--eval-tasks", "none", "--out", str(run), "--resume"]
    code, _, err = run_main(ldifs, argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    missing = "head.pt holds no bias, init_weight, init_bias"
    assert f"cannot load the finished run in {run}: {missing}; copy it again" in err, err
    code, _, err = run_main(evaluation, [str(run), "--workers", "0"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"cannot read run {run}: {missing}" in err, err


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, steps=6)
    args.save_every = 2
    forwards = []

    def poison(module, inputs, output):  # the 5th step (index 4) yields a NaN loss
        forwards.append(1)
        return output * float("nan") if len(forwards) == 5 else output

    classifier.head.register_forward_hook(poison)
    with pytest.raises(ldifs.UserError, match="step 4") as error:
        fit(args, stage, classifier, reference, data)
    assert "intact" in str(error.value)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 4
    assert all(v.isfinite().all() for v in checkpoint["model"].values())


def test_a_non_finite_loss_between_log_lines_is_caught_before_the_checkpoint(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, steps=4)
    args.save_every, args.log_every = 1, 10  # the checkpoint comes before any log line
    classifier.head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    with pytest.raises(ldifs.UserError) as error:
        fit(args, stage, classifier, reference, data)
    assert str(error.value) == (
        "the loss was not finite at step 0; no checkpoint was written; try a lower --lr"
    )
    assert not (tmp_path / "checkpoint.pt").exists()


def test_non_finite_weights_after_a_finite_loss_never_reach_a_checkpoint(tmp_path):
    """A NaN gradient leaves its step's loss finite and every weight NaN after the update."""
    args, stage, classifier, reference, data = tiny_setup(tmp_path, steps=6)
    args.save_every, args.log_every = 2, 10
    backwards = []

    def poison(grad):  # the 4th step's (index 3): its update ends where a checkpoint is due
        backwards.append(1)
        return grad * float("nan") if len(backwards) == 4 else grad

    classifier.head.weight.register_hook(poison)
    with pytest.raises(ldifs.UserError, match="the weights became non-finite") as error:
        fit(args, stage, classifier, reference, data)
    assert f"the last good checkpoint {tmp_path / 'checkpoint.pt'} is intact" in str(error.value)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2
    assert all(v.isfinite().all() for v in checkpoint["model"].values())


TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


SIX_LOGGED_STEPS = [
    *("--task", "synthetic", "--head", "zs", "--max-steps", "6", "--log-every", "1"),
    *("--batch-size", "16", "--eval-tasks", "none", "--workers", "0"),
]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    single = run_cli(*SIX_LOGGED_STEPS, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    ddp = run_cli(*SIX_LOGGED_STEPS, "--out", str(tmp_path / "two"), launcher=TORCHRUN_2)
    assert ddp.returncode == 0, ddp.stderr
    one, two = (read_log_at(tmp_path / d) for d in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for key in ("loss/ce", "loss/ldifs"):
        assert torch.allclose(
            torch.tensor([r[key] for r in one]),
            torch.tensor([r[key] for r in two]),
            rtol=1e-4,
            atol=1e-7,
        ), key
    assert json.loads((tmp_path / "two/metrics.json").read_text())["world_size"] == 2


def test_missing_data_under_torchrun_is_one_line_from_every_rank(tmp_path):
    """Rank 0 fetches the data while the others wait; when it cannot, they must not die on
    a broken connection with a traceback of their own."""
    flags = ["--task", "eurosat", "--no-download", "--data-root", str(tmp_path / "empty")]
    ddp = run_cli(*flags, "--device", "cpu", "--out", str(tmp_path / "run"), launcher=TORCHRUN_2)
    assert ddp.returncode != 0
    message = f"ldifs.py: error: task 'eurosat': no data at {tmp_path / 'empty' / 'eurosat'}"
    assert ddp.stderr.count(message) == 2, ddp.stderr
    assert "[rank1]" not in ddp.stderr, ddp.stderr


def step_images_per_second(model, batch_size, device, lam=0.0, compiled=False, steps=30):
    """Forward, backward and AdamW step of the open_clip visual tower and a linear head on one
    in-memory batch, in bf16 with fused AdamW on CUDA, with the LDIFS term when lam > 0 (through
    ldifs_loss and recorded taps, as ldifs.py trains). Returns the steady-state images/s and
    the seconds the first two steps took (torch.compile's compile time, when compiled)."""
    clip, _, _ = ldifs.load_clip(model, "none", device)
    classifier = ldifs.ImageClassifier(
        clip.visual, torch.nn.Linear(clip.visual.output_dim, 6, device=device)
    )
    reference = ldifs.frozen_copy(clip.visual)
    taps = ldifs.default_tap_names(clip.visual) if lam else []
    torch.compiler.reset()  # dynamo guards no hooks: a graph traced without taps would be reused
    trained, frozen = classifier, reference
    if compiled:
        trained, frozen = torch.compile(classifier), torch.compile(reference)
    optimizer = torch.optim.AdamW(
        classifier.parameters(), lr=1e-5, weight_decay=0.1, fused=device.type == "cuda"
    )
    images = torch.randn(batch_size, 3, *clip.visual.image_size, device=device)
    labels = torch.randint(6, (batch_size,), device=device)
    with (
        ldifs.recorded_taps(classifier.encoder, taps) as recorded,
        ldifs.recorded_taps(reference, taps) as ref_recorded,
        ldifs.tf32_matmuls(),  # as ldifs.train runs
    ):
        start = ldifs.sync_time(device)
        for step in range(steps):
            if step == 2:
                warm_up, start = ldifs.sync_time(device) - start, ldifs.sync_time(device)
            with ldifs.autocast(device):
                batch = (images, labels, lam)
                ce, distance = ldifs.ldifs_loss(trained, frozen, recorded, ref_recorded, *batch)
            optimizer.zero_grad()
            (ce + lam * distance).backward()
            optimizer.step()
    return (steps - 2) * batch_size / (ldifs.sync_time(device) - start), warm_up


def median(values):
    return sorted(values)[len(values) // 2]


def eurosat_like_folder(root, per_class, classes=10):
    """Real-format JPEGs of EuroSAT's size (64 px) in an on-disk ImageFolder task."""
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("test", 4)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for k in range(count):
                pixels = torch.randint(256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{k}.jpg", quality=90)
    return root


def loader_images_per_second(data, transform, batch_size, workers, steps):
    """Decoding and augmenting images alone, as the training loop's loader does."""
    train = ldifs.Augmented(data, transform, seed=0)
    batches = ldifs.step_batches(len(train), batch_size, 0, 0, steps)
    loader = torch.utils.data.DataLoader(train, batch_sampler=batches, num_workers=workers)
    for step, _ in enumerate(loader):
        if step == 2:
            start = time.perf_counter()
    return (steps - 3) * batch_size / (time.perf_counter() - start)


def features_images_per_second(model, data, transform, args):
    clip, _, _ = ldifs.load_clip(model, "none", args.device)
    start = ldifs.sync_time(args.device)
    ldifs.extract_features(clip.visual, ldifs.Transformed(data, transform), args)
    return len(data) / (ldifs.sync_time(args.device) - start)


def in_file_runs(flags, tmp_path, cuda, repeats=3):
    """metrics.json of `ldifs.py FLAGS --lam 0` and `--lam 10`, alternated so that drifts in
    the machine's load hit both alike; the runs' 1 GB checkpoints are deleted as they end.
    On CUDA they run in this process: a process's start and CUDA's take about 10 s there."""
    runs = {"0": [], "10": []}
    for repeat in range(repeats):
        for lam in runs:
            out = tmp_path / f"lam{lam}-{repeat}"
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                ldifs.main([*flags, "--lam", lam, "--out", str(out)])
            else:  # a process each, for its own peak RSS
                result = run_cli(*flags, "--lam", lam, "--out", str(out))
                assert result.returncode == 0, result.stderr
            runs[lam].append(json.loads((out / "metrics.json").read_text()))
            shutil.rmtree(out)
    return runs["0"], runs["10"]


def rate(runs):
    return median([m["train_images_per_second"] for m in runs])


@bench
def test_bench_ldifs_overhead_loop_efficiency_and_memory(tmp_path):
    device = ldifs.pick_device(None)
    cuda = device.type == "cuda"  # ViT-B/32 at the release's batch on a GPU; a small ViT on CPUs
    model, batch, steps, per_class = (
        ("ViT-B-32", 128, 120, 1600) if cuda else ("ViT-S-32", 16, 12, 100)
    )
    root = eurosat_like_folder(tmp_path / "eurosat", per_class)
    flags = [
        *("--task", f"folder:{root}", "--model", model, "--pretrained", "none", "--head", "zs"),
        *("--batch-size", str(batch), "--max-steps", str(steps), "--eval-tasks", "none"),
        *("--device", str(device), *([] if cuda else ["--workers", "1"])),
    ]
    ft_runs, ldifs_runs = in_file_runs(flags, tmp_path, cuda)
    ft, ld = rate(ft_runs), rate(ldifs_runs)
    memory = [median([m["peak_memory_mb"] for m in r]) for r in (ft_runs, ldifs_runs)]
    bare, ldifs_bare = (step_images_per_second(model, batch, device, lam)[0] for lam in (0, 10))
    _, train_tf, eval_tf = ldifs.load_clip(model, "none")
    images = ldifs.Samples(ldifs.folder_samples(root / "train", [f"c{c}" for c in range(10)]))
    loader = loader_images_per_second(images, train_tf, batch, ldifs.WORKERS, 40 if cuda else 60)
    args = tiny_args(tmp_path, "--device", str(device), "--workers", str(ldifs.WORKERS))
    features = features_images_per_second(model, images, eval_tf, args)
    card, workers = torch.cuda.get_device_name() if cuda else "CPU", f"{ldifs.WORKERS} workers"
    bf16 = "bf16 " if cuda else ""
    table = "\n".join(
        [
            f"| figure ({card}, {model}, batch {batch}) | value |",
            "|---|---:|",
            f"| FT (lam 0) training images/s, median of 3 | {ft:.1f} |",
            f"| LDIFS (lam 10) training images/s, median of 3 | {ld:.1f} |",
            f"| **LDIFS / FT throughput** | **{ld / ft:.2f}** |",
            f"| bare {bf16}loop images/s, FT / LDIFS | {bare:.1f} / {ldifs_bare:.1f} |",
            f"| bare loop LDIFS / FT (the cost floor) | {ldifs_bare / bare:.2f} |",
            f"| **in-file loop (FT) / bare loop** | **{ft / bare:.2f}** |",
            f"| peak memory FT / LDIFS (MB) | {memory[0]:.0f} / {memory[1]:.0f} |",
            f"| **peak memory LDIFS / FT** | **{memory[1] / memory[0]:.2f}** |",
            f"| loader alone: 64 px JPEGs decoded, augmented, {workers}, images/s | {loader:.1f} |",
            f"| feature extraction (fp32, 64 px JPEGs, {workers}), images/s | {features:.1f} |",
        ]
    )
    print_table(table)


def print_table(table):
    print("\n" + table)
    if os.environ.get("LDIFS_BENCH_OUT"):
        with open(os.environ["LDIFS_BENCH_OUT"], "a") as file:
            file.write(table + "\n\n")


@bench
def test_bench_ldifs_step_under_torch_compile():
    """torch.compile of the trainable classifier and the reference, against eager, on the
    in-memory step. ldifs.py had a --compile flag for a while; see README for why it went."""
    device = ldifs.pick_device(None)
    model, batch = ("ViT-B-32", 128) if device.type == "cuda" else ("ViT-S-32", 16)
    rows = []
    for lam in (0, 10):
        eager, _ = step_images_per_second(model, batch, device, lam)
        compiled, compile_seconds = step_images_per_second(model, batch, device, lam, True)
        rows.append(
            f"| lam {lam} | {eager:.1f} | {compiled:.1f} | **{compiled / eager:.2f}** "
            f"| {compile_seconds:.0f} |"
        )
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    header = f"| {card}, {model}, batch {batch} | eager images/s | compiled images/s | ratio "
    print_table("\n".join([header + "| compile s |", "|---|---:|---:|---:|---:|", *rows]))


# ------------------------------------------------------------------ the CUDA path (skipped on CPUs)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_bf16_steps_stay_finite_reference_gets_no_gradient_and_memory_is_cudas(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, "--device", "cuda", steps=6)
    torch.cuda.reset_peak_memory_stats()
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    metrics = fit(args, stage, classifier, reference, data)
    log = read_log(stage)
    assert all(math.isfinite(r["loss/ce"]) and math.isfinite(r["ldifs_distance"]) for r in log)
    assert log[-1]["ldifs_distance"] > 0
    assert all(p.grad is None for p in reference.parameters())
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert metrics["peak_memory_mb"] == pytest.approx(torch.cuda.max_memory_allocated() / 2**20)


@cuda
def test_cuda_distance_is_accumulated_in_fp32_under_bf16_autocast(tmp_path):
    args, stage, classifier, reference, data = tiny_setup(tmp_path, "--device", "cuda", steps=1)
    images = data.finish(torch.stack([data[i][0] for i in range(16)]).cuda())
    labels = torch.tensor([data[i][1] for i in range(16)]).cuda()
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1)
    with ldifs.autocast(args.device):  # move the encoder away from the reference first
        F.cross_entropy(classifier(images), labels).backward()
    optimizer.step()
    with (
        ldifs.recorded_taps(classifier.encoder, stage.taps) as taps,
        ldifs.recorded_taps(reference, stage.taps) as ref_taps,
        ldifs.autocast(args.device),
    ):
        _, distance = ldifs.ldifs_loss(classifier, reference, taps, ref_taps, images, labels, 10.0)
    assert distance.dtype == torch.float32
    exact = ldifs.ldifs_distance(
        [t.double().cpu() for t in taps.values()], [t.double().cpu() for t in ref_taps.values()]
    )
    assert distance.item() == pytest.approx(exact.item(), rel=1e-3)
    low = [t.bfloat16() for t in taps.values()], [t.bfloat16() for t in ref_taps.values()]
    with ldifs.autocast(args.device):  # bf16 taps, as other towers may give, sum in fp32
        assert ldifs.ldifs_distance(*low).dtype == torch.float32


@cuda
def test_cuda_kill_and_resume_ends_near_an_unbroken_run(tmp_path):
    # bf16 autocast and cuDNN/cuBLAS kernels are not bitwise reproducible across processes in
    # general; the tolerance is the relative L2 distance of all weights.
    flags = [*RESUME_FLAGS, "--device", "cuda", "--workers", "0"]
    unbroken = run_cli(*flags, "--out", str(tmp_path / "unbroken"))
    assert unbroken.returncode == 0, unbroken.stderr
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(flags, killed)
    resumed = run_cli(*flags, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (
        torch.load(d / "open_clip_pytorch_model.bin", weights_only=True)
        for d in (tmp_path / "unbroken", killed)
    )
    difference = sum((a[k].float() - b[k].float()).norm() ** 2 for k in a) ** 0.5
    assert difference / sum(a[k].float().norm() ** 2 for k in a) ** 0.5 < 1e-3


TORCHRUN_1 = [*TORCHRUN_2[:-1], "1"]


@cuda
def test_cuda_torchrun_joins_over_nccl_and_logs_as_a_plain_run_does(tmp_path, monkeypatch):
    """One GPU allows one NCCL rank (NCCL refuses two on a GPU): it still runs the log's
    all_reduce and the data broadcast over NCCL, which take CUDA tensors, not gloo's CPU ones."""
    monkeypatch.setenv("NCCL_DEBUG", "VERSION")  # NCCL names itself when it first starts
    flags = [*SIX_LOGGED_STEPS, "--device", "cuda"]
    plain = run_cli(*flags, "--out", str(tmp_path / "plain"))
    nccl = run_cli(*flags, "--out", str(tmp_path / "nccl"), launcher=TORCHRUN_1)
    assert plain.returncode == 0, plain.stderr
    assert nccl.returncode == 0, nccl.stderr
    assert "NCCL version" in nccl.stdout + nccl.stderr
    assert "NCCL version" not in plain.stdout + plain.stderr
    one, other = (read_log_at(tmp_path / d) for d in ("plain", "nccl"))
    assert [r["step"] for r in one] == [r["step"] for r in other] == list(range(1, 7))
    for key in ("loss/ce", "ldifs_distance"):
        assert [r[key] for r in other] == pytest.approx([r[key] for r in one], rel=1e-3), key
    assert json.loads((tmp_path / "nccl/metrics.json").read_text())["world_size"] == 1


@cuda
def test_cuda_missing_data_under_torchrun_is_broadcast_over_nccl_as_one_line(tmp_path):
    flags = ["--task", "eurosat", "--no-download", "--data-root", str(tmp_path / "empty")]
    nccl = run_cli(*flags, "--device", "cuda", "--out", str(tmp_path / "run"), launcher=TORCHRUN_1)
    assert nccl.returncode != 0
    message = f"ldifs.py: error: task 'eurosat': no data at {tmp_path / 'empty' / 'eurosat'}"
    assert nccl.stderr.count(message) == 1, nccl.stderr
    assert 'ldifs.py", line' not in nccl.stderr, nccl.stderr  # torchrun's own summary follows


# ------------------------------------------------------------------ continual fine-tuning and L2-SP

SEQUENCE = [
    "--task",
    "synthetic,synthetic-stripes",
    "--max-steps",
    "6",
    "--save-every",
    "2",
    "--workers",
    "0",
    "--head",
    "zs",
]


def test_continual_reference_is_the_previous_stage_and_heads_are_per_task(
    tmp_path, capsys, monkeypatch
):
    references, ends, real = [], [], ldifs.finetune

    def spy(clip, reference, pretrained, data, transforms, stage, args):
        references.append({k: v.clone() for k, v in reference.state_dict().items()})
        head = real(clip, reference, pretrained, data, transforms, stage, args)
        ends.append({k: v.clone() for k, v in clip.visual.state_dict().items()})
        return head

    monkeypatch.setattr(ldifs, "finetune", spy)
    code, out, err = run_main(ldifs, SEQUENCE + ["--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert len(references) == 2 and all(torch.equal(references[1][k], ends[0][k]) for k in ends[0])
    assert not all(torch.equal(references[1][k], references[0][k]) for k in ends[0])
    heads = [
        torch.load(tmp_path / d / "head.pt", weights_only=True)
        for d in ("0-synthetic", "1-synthetic-stripes")
    ]
    assert [h["weight"].shape[0] for h in heads] == [6, 4]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    matrix = summary["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2] and all(
        0 <= a <= 1 for row in matrix for a in row
    )
    assert summary["backward_transfer"] == pytest.approx(matrix[1][0] - matrix[0][0])
    assert summary["average_accuracy"] == pytest.approx(sum(matrix[1]) / 2)
    assert "backward transfer" in out


def test_reference_pretrained_keeps_the_original_encoder(tmp_path, capsys, monkeypatch):
    references, real = [], ldifs.finetune
    monkeypatch.setattr(
        ldifs,
        "finetune",
        lambda clip, reference, *rest: references.append(reference) or real(clip, reference, *rest),
    )
    code, _, err = run_main(
        ldifs, SEQUENCE + ["--reference", "pretrained", "--out", str(tmp_path)], capsys
    )
    assert code == 0, err
    assert references[0] is references[1]


class Killed(Exception):
    pass


def test_continual_resume_mid_sequence_matches_an_unbroken_sequence(tmp_path, capsys, monkeypatch):
    assert run_main(ldifs, SEQUENCE + ["--out", str(tmp_path / "unbroken")], capsys)[0] == 0
    real = ldifs.save_checkpoint

    def die_in_stage_1(classifier, optimizer, init_head, step, stage, args):
        real(classifier, optimizer, init_head, step, stage, args)
        if stage.index == 1 and step == 4:
            raise Killed

    monkeypatch.setattr(ldifs, "save_checkpoint", die_in_stage_1)
    with pytest.raises(Killed):
        run_main(ldifs, SEQUENCE + ["--out", str(tmp_path / "broken")], capsys)
    monkeypatch.setattr(ldifs, "save_checkpoint", real)
    code, out, err = run_main(
        ldifs, SEQUENCE + ["--out", str(tmp_path / "broken"), "--resume"], capsys
    )
    assert code == 0, err
    assert "stage 0 already finished" in out
    for stage in ("0-synthetic", "1-synthetic-stripes"):
        a, b = (
            torch.load(tmp_path / run / stage / "open_clip_pytorch_model.bin", weights_only=True)
            for run in ("unbroken", "broken")
        )
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def test_wise_ft_of_a_continual_stage_starts_from_the_previous_stage(tmp_path, capsys):
    """Stage 1's initial head was fit on stage 0's encoder: alpha 0 of its WiSE-FT must be
    that encoder with that head, not the pre-trained encoder with a head fit elsewhere."""
    out = tmp_path / "seq"
    flags = ["--task", "synthetic,synthetic-stripes", "--max-steps", "20", "--eval-tasks", "none"]
    flags += ["--workers", "0", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert run_main(ldifs, flags, capsys)[0] == 0
    stage_0 = out / ldifs.stage_folder(0, "synthetic")
    compare = [str(stage_0), str(out), "--tasks", "synthetic-stripes", "--wise-ft", "0"]
    compare += ["--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--json"]
    code, _, err = run_main(evaluation, [*compare, str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    pretrained, stage_0_run, _, _, stage_1_start = rows
    assert stage_1_start["alpha"] == 0 and stage_1_start["task"] == "synthetic-stripes"
    stripes = stage_0_run["a_lp"]["synthetic-stripes"]
    assert stripes != pretrained["a_lp"]["synthetic-stripes"]  # stage 0 moved the features
    assert stage_1_start["a_lp"]["synthetic-stripes"] == pytest.approx(stripes)
    assert stage_1_start["target_accuracy"] == pytest.approx(stripes)  # the LP-init head


def test_l2sp_term_is_zero_at_step_zero_and_keeps_weights_closer(tmp_path):
    distances = {}
    for alpha in ("0", "0.5"):
        args, stage, classifier, reference, data = tiny_setup(
            tmp_path / alpha, "--lam", "0", "--l2sp", alpha, steps=15
        )
        assert ldifs.l2sp_penalty(classifier.encoder, reference).item() == 0.0
        fit(args, stage, classifier, reference, data)
        assert read_log(stage)[0]["loss/l2sp"] == 0.0  # measured at step 0, before any update
        distances[alpha] = ldifs.l2sp_penalty(classifier.encoder, reference).item()
    assert distances["0.5"] < distances["0"], distances


def test_eval_labels_name_the_method():
    base = {"lam": 0.0, "l2sp": 0.0, "head": "lp"}
    assert evaluation.method_label(base) == "FT"
    assert evaluation.method_label({**base, "lam": 10.0}) == "LDIFS (lam 10)"
    assert evaluation.method_label({**base, "l2sp": 0.5}) == "L2-SP (alpha 0.5)"
    assert evaluation.method_label({**base, "label_smoothing": 0.1}) == "LS (eps 0.1)"
    continual = {**base, "lam": 10.0, "sequence": ["svhn", "cifar10", "resisc45"], "stage": 1}
    assert evaluation.method_label(continual) == "LDIFS (lam 10), continual svhn > cifar10"


def test_lp_init_after_the_first_stage_never_reads_the_pretrained_feature_cache(
    tmp_path, capsys, monkeypatch
):
    caches, real = [], ldifs.probe_head
    monkeypatch.setattr(
        ldifs, "probe_head", lambda *a, cache=True: caches.append(cache) or real(*a, cache=cache)
    )
    flags = SEQUENCE[:-2] + [
        "--head",
        "lp",
        "--out",
        str(tmp_path),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    code, _, err = run_main(ldifs, flags, capsys)
    assert code == 0, err
    assert caches == [True, False]  # the cache is keyed by the pre-trained weights


# ------------------------------------------------------------------ every eval task installs

TASK_SOURCES = {
    "cars": "StanfordCars",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "dtd": "DTD",
    "eurosat": "EuroSAT",
    "gtsrb": "GTSRB",
    "imagenet": "ImageFolder",
    "mnist": "MNIST",
    "resisc45": "ImageFolder",
    "sun397": "SUN397",
    "svhn": "SVHN",
}


def canonical(distribution):
    return re.sub(r"[-_.]+", "-", distribution).lower()


def requirements_closure():
    """The distributions that `pip install -r requirements.txt` installs."""
    todo = [line.split("==")[0] for line in (HERE / "requirements.txt").read_text().split()]
    installed = set()
    while todo:
        name = canonical(todo.pop())
        if name not in installed:
            installed.add(name)
            needs = map(Requirement, importlib.metadata.requires(name) or [])
            todo += [r.name for r in needs if not r.marker or r.marker.evaluate({"extra": ""})]
    return installed


def test_requirements_install_every_package_a_task_loader_imports():
    assert set(TASK_SOURCES) == {name for name in ldifs.TASKS if not name.startswith("synthetic")}
    sources = [
        inspect.getsource(inspect.getmodule(getattr(torchvision.datasets, name)))
        for name in set(TASK_SOURCES.values())
    ] + [(HERE / "ldifs.py").read_text()]
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for src in sources
        for node in ast.walk(ast.parse(src))
        if isinstance(node, ast.Import) or isinstance(node, ast.ImportFrom) and not node.level
        for alias in node.names
    }
    imported = {name.split(".")[0] for name in imported}
    providers = importlib.metadata.packages_distributions()
    installed = requirements_closure()
    assert "scipy" in imported  # SVHN and Cars read .mat files with it
    opt_in = {"accimage"}  # torchvision imports it only when a user picks that image backend
    for module in imported - set(sys.stdlib_module_names) - opt_in:
        assert {canonical(d) for d in providers.get(module, [])} & installed, module


# ------------------------------------------------------------------ folder:PATH tasks


def make_folder(root, classes=("cat_a", "dog_b", "eel"), counts=None):
    """An ImageFolder copy in real JPEGs: root/{train,test}/<class>/*.jpg, pixels coding labels."""
    counts = counts or {"train": 20, "test": 4}
    for split, n in counts.items():
        for code, name in enumerate(classes):
            for k in range(n):
                fake_image(root / split / name / f"{k}.jpg", code)
    return root


def test_folder_task_reads_classes_labels_and_holds_out_val(tmp_path):
    root = make_folder(tmp_path / "my data")
    task = ldifs.get_task(f"folder:{root}")
    assert task.classnames == ("cat a", "dog b", "eel") and task.epochs == 10
    splits = assert_splits(task, tmp_path, {"train": 54, "val": 6, "test": 12})
    assert not image_ids(splits["train"]) & image_ids(splits["val"])
    make_folder(root, counts={"val": 2})
    assert len(ldifs.get_dataset(ldifs.folder_task(f"folder:{root}"), "val", tmp_path)) == 6
    assert len(ldifs.get_dataset(ldifs.folder_task(f"folder:{root}"), "train", tmp_path)) == 60


def test_a_folder_whose_path_holds_a_comma_is_one_task(tmp_path):
    """--task and --eval-tasks split at commas, so folder:PATH with a comma in PATH became
    two tasks, the second an unknown one. A part that names no built-in task nor a folder
    belongs to the folder before it; a built-in task after a folder is a task of its own."""
    root = make_folder(tmp_path / "leaves, 2024")
    folder = f"folder:{root}"
    args = ldifs.parse_args(["--task", f"{folder},synthetic", "--eval-tasks", f"mnist,{folder}"])
    assert [task.name for task in ldifs.resolve_args(args)] == [folder, "synthetic"]
    assert args.eval_tasks == ["mnist"]
    assert ldifs.parse_eval_tasks(f"{folder}, svhn,") == [folder, "svhn"]
    assert ldifs.task_names(" folder:a ,b, mnist") == ["folder:a ,b", "mnist"]


def test_folder_task_skips_hidden_files_and_folders(tmp_path):
    """A folder copied from macOS holds ._* twins of its images, which are no images, and a
    notebook leaves .ipynb_checkpoints/ folders, which are no classes."""
    root = make_folder(tmp_path / "d")
    for split in ("train", "test"):
        (root / split / ".ipynb_checkpoints").mkdir()
    (root / "train/cat_a/._0.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(4000))
    fake_image(root / "train/eel/.thumbnails/0.jpg", 0)  # a label the pixels would contradict
    task = ldifs.get_task(f"folder:{root}")
    assert task.classnames == ("cat a", "dog b", "eel")
    assert_splits(task, tmp_path, {"train": 54, "val": 6, "test": 12})


def test_folder_images_keep_pathlibs_sorted_order(tmp_path):
    """The seeded splits of a folder task depend on its images' order: the faster walk over
    strings keeps pathlib's order of the paths, which sorts by parts ('a/x' before 'a-b/x')."""
    names = ["a", "a-b", "a b", "A", "a_b", "10", "9"]
    for one, two, suffix in [(o, t, s) for o in names for t in names[:3] for s in (".jpg", ".PNG")]:
        nested = tmp_path / one / two / f"{two}{suffix}"  # beside flat ones, e.g. a/a-b/a-b.jpg
        fake_image(nested if suffix == ".jpg" else tmp_path / one / f"{two}{suffix}", 0)
    (tmp_path / "a" / "notes.txt").write_text("")
    paths = sorted(p for p in tmp_path.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    assert ldifs.image_files(tmp_path) == [str(p) for p in paths] and len(paths) == 7 * 3 * 2


def test_a_folder_task_with_one_class_is_refused(tmp_path, capsys):
    """Images not sorted into class folders (train/images/*.jpg) make one class, which every
    head gets right: a run that reports 100% and has learnt nothing."""
    root = make_folder(tmp_path / "d", classes=("images",))
    code, _, err = run_main(
        ldifs, ["--task", f"folder:{root}", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "one class (images) in train/; sort the images into train/<class>/" in err, err


def test_folder_task_test_labels_follow_train_classes(tmp_path):
    root = make_folder(tmp_path / "d", counts={"train": 10})
    fake_image(root / "test/eel/0.jpg", 2)  # test lacks cat_a and dog_b: eel is still label 2
    assert decoded_labels(ldifs.get_dataset(f"folder:{root}", "test", tmp_path)) == [(2, 2)]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train": 0}, "no test/ folder"),
        ({"test": 0}, "no train/ folder"),
        ({}, "no train/ or test/ folder"),
        ({"train": 2, "test": 2, "test/zebra": 0}, "class 'zebra' is in test/ but not in train/"),
        # which files count: a folder of iPhone photos (.heic) is not empty to its owner
        ({"train": 2, "test": 2, "train/empty": 0}, "holds no images (.jpg, .jpeg, .png, .ppm, "),
        ({"train": -1, "test": -1}, "no images"),
        ({"train": 3, "test": 1}, "9 images in train/ hold out no validation images"),
        ({"train": 4, "test": 0}, "test/ holds no images in train/'s class folders"),
        ({"train": 4, "test": 1, "val": 0}, "val/ holds no images in train/'s class folders"),
    ],
)
def test_folder_task_bad_layouts_are_one_line_and_write_nothing(tmp_path, capsys, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    for split, n in layout.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        if n > 0:
            make_folder(root, counts={split: n})
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--task", f"folder:{root}", "--out", str(out), "--cache-dir", str(cache)]
    code, _, err = run_main(ldifs, argv, capsys)  # in this process: a traceback would fail here
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists() and not cache.exists()


@pytest.mark.parametrize("flag, prefix", [("--task", "folder:"), ("--model", "local-dir:")])
def test_a_misspelt_folder_is_said_to_be_missing(tmp_path, capsys, flag, prefix):
    """Not "no train/ or test/ folder" or "no open_clip_config.json in it", which send the
    user to look inside a folder that is not there."""
    missing = tmp_path / "leavs"
    argv = ["--task", "synthetic", flag, f"{prefix}{missing}", "--out", str(tmp_path / "o")]
    code, _, err = run_main(ldifs, argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{prefix}{missing}: no such folder" in err, err


@pytest.mark.parametrize("path", ["..", "/", "a b/../c d", "x/y"])
def test_task_paths_never_reach_file_names_raw(tmp_path, path):
    name = f"folder:{Path(path).resolve()}"
    safe = ldifs.file_safe(name)
    assert re.fullmatch(r"folder-[\w.-]+-[0-9a-f]{8}", safe) and ".." not in safe
    assert ldifs.stage_folder(1, name) == f"1-{safe}"
    assert ldifs.file_safe("eurosat") == "eurosat"


def test_a_long_folder_name_is_cut_in_cache_entries_and_a_short_one_kept(tmp_path):
    """A 240-byte folder name made feature-cache entries whose temporary files the OS refused
    ('File name too long'), so the cache was skipped; its runs' folders are left as they were."""
    args = argparse.Namespace(cache_dir=tmp_path)

    def entry(name):
        key = {"task": name, "split": "train"}
        return ldifs.cache_entry(key, "json", args).name, ldifs.key_digest(key)

    name, digest = entry("folder:/d/" + "é" * 50)
    assert name == f"{ldifs.file_safe('folder:/d/' + 'é' * 50)}-train-{digest}.json"
    name, digest = entry("folder:/d/a" + "é" * 120)  # 241 bytes
    assert name.startswith("folder-aéé") and name.endswith(f"-train-{digest}.json")
    assert len(name.encode()) + len(f".{'h' * 64}-4194304.tmp") <= 255  # the longest host name


FOLDER_FLAGS = [
    "--model",
    ldifs.TINY_CLIP,
    "--pretrained",
    "none",
    "--lr",
    "1e-3",
    "--warmup",
    "2",
    "--batch-size",
    "16",
    "--workers",
    "0",
]


def test_folder_task_fine_tunes_and_reports_forgetting_on_another_folder(
    tmp_path, capsys, monkeypatch
):
    prompts, real = [], ldifs.zero_shot_head
    monkeypatch.setattr(
        ldifs,
        "zero_shot_head",
        lambda clip, tok, names, templates, device: (
            prompts.append(templates) or real(clip, tok, names, templates, device)
        ),
    )
    a, b = make_folder(tmp_path / "a b"), make_folder(tmp_path / "b", classes=("x", "y"))
    (tmp_path / "t.txt").write_text("a drawing of a {}.\nan icon of the {}.\n")
    flags = [
        "--task",
        f"folder:{a}",
        "--eval-tasks",
        f"folder:{b}",
        "--max-steps",
        "3",
        "--templates",
        str(tmp_path / "t.txt"),
        "--head",
        "zs",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    os.chdir(tmp_path)
    code, out, err = run_main(ldifs, flags + FOLDER_FLAGS, capsys)
    os.chdir(HERE)
    assert code == 0, err
    run = tmp_path / "runs" / f"{ldifs.file_safe(f'folder:{a}')}-lam10"
    assert run.name.startswith("folder-a_b-")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == f"folder:{a}" and f"| folder:{b} |" in out
    assert "delta_lp" in metrics["forgetting"][f"folder:{b}"]
    assert all(p.name.startswith("folder-b-") for p in (tmp_path / "c").iterdir())
    assert prompts[0] == ("a drawing of a {}.", "an icon of the {}.")  # --templates, for the target
    assert prompts[1] == ldifs.PHOTO_TEMPLATES  # the eval folder keeps CLIP's photo templates


def test_folder_tasks_in_a_sequence_and_in_eval_py(tmp_path, capsys):
    a, b, c = (make_folder(tmp_path / n, counts={"train": 10, "test": 2}) for n in ("a", "b", "c"))
    out = tmp_path / "seq"
    flags = [
        "--task",
        f"folder:{a},folder:{b}",
        "--eval-tasks",
        "none",
        "--max-steps",
        "2",
        "--head",
        "zs",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    code, _, err = run_main(ldifs, flags + FOLDER_FLAGS, capsys)
    assert code == 0, err
    assert (out / ldifs.stage_folder(1, f"folder:{b}") / "head.pt").exists()
    code, table, err = run_main(
        evaluation,
        [
            str(out),
            "--tasks",
            f"folder:{c}",
            "--workers",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capsys,
    )
    assert code == 0, err
    assert f"A_LP folder:{c}" in table and "continual" in table
    last = out / ldifs.stage_folder(1, f"folder:{b}")  # what the sequence's folder stands for
    code, _, err = run_main(evaluation, [str(out), str(last), "--tasks", "none"], capsys)
    assert code == 2 and f"{last} is {out} again; name each run once" in err, err


def test_data_loading_workers_started_by_spawn_as_on_macos(tmp_path):
    """macOS and Windows start DataLoader workers by spawn, and Python 3.14 by forkserver on
    Linux: then every dataset goes to the workers pickled, and a lambda in one fails."""
    root = make_folder(tmp_path / "d", counts={"train": 16, "test": 2})
    flags = [f"folder:{root}", "--head", "zs", "--eval-tasks", "none", "--max-steps", "2"]
    flags += [*FOLDER_FLAGS[:-2], "--workers", "1", "--out", str(tmp_path / "run")]
    spawn = "import multiprocessing as m, sys, ldifs; m.set_start_method('spawn'); "
    spawn += "ldifs.main(sys.argv[2:])"  # argv[1] is ldifs.py's path
    result = run_cli("--task", *flags, launcher=("-c", spawn))
    assert result.returncode == 0, result.stderr
    assert strict_json((tmp_path / "run/metrics.json").read_text())["steps"] == 2


def test_undecodable_image_mid_run_is_one_line_and_keeps_the_checkpoint(tmp_path):
    root = make_folder(tmp_path / "d", counts={"train": 30, "test": 2})
    out = tmp_path / "out"
    flags = ["--task", f"folder:{root}", "--max-steps", "60", "--save-every", "1", "--head", "zs"]
    flags += ["--eval-tasks", "none", "--out", str(out), *FOLDER_FLAGS[:-2], "--workers", "2"]
    process = start_cli(*flags, stderr=subprocess.PIPE)
    wait_for_checkpoint(process, out)
    for image in (root / "train").rglob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 1 and "Traceback" not in err
    errors = [
        line for line in err.splitlines() if line.strip() and not line.startswith("train folder:")
    ]
    assert (
        len(errors) == 1 and "cannot decode image" in errors[0] and str(root / "train") in errors[0]
    ), err
    assert 1 <= torch.load(out / "checkpoint.pt", weights_only=True)["step"] < 60


def test_an_image_too_large_for_pils_bomb_check_is_one_line_naming_it(tmp_path, monkeypatch):
    """PIL refuses images over twice Image.MAX_IMAGE_PIXELS (about 179 megapixels), as a
    satellite or slide scan can be, with a DecompressionBombError that is no OSError: the
    run ended in a traceback that did not name the file."""
    fake_image(tmp_path / "big.png", 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8)  # so that the small image is "too large"
    with pytest.raises(ldifs.UserError, match=f"cannot decode image {tmp_path / 'big.png'}: "):
        ldifs.Samples([(str(tmp_path / "big.png"), 0)])[0]


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task"), reason="needs Linux /proc")
def test_a_loader_worker_the_os_kills_ends_the_run_in_one_line_naming_the_fix(tmp_path):
    """The OOM killer, or Docker's small /dev/shm (a bus error), kills a data-loading worker:
    torch ended the run with a traceback. One line now, naming --workers; the checkpoint holds."""
    out = tmp_path / "out"
    flags = ["--task", "synthetic", "--head", "zs", "--save-every", "1", "--eval-tasks", "none"]
    process = start_cli(*flags, "--workers", "2", "--out", str(out), stderr=subprocess.PIPE)
    wait_for_checkpoint(process, out)
    main = process.pid
    worker = Path(f"/proc/{main}/task/{main}/children").read_text().split()[0]
    os.kill(int(worker), signal.SIGKILL)
    err = process.communicate(timeout=120)[1]
    lines = [line for line in err.splitlines() if line.startswith("ldifs.py")]
    assert process.returncode == 1 and "Traceback" not in err and len(lines) == 1, err
    assert f"DataLoader worker (pid {worker}) is killed by signal: Killed" in lines[0], err
    assert lines[0].endswith("; lower --workers, or give them more memory (Docker: --shm-size)")
    assert 1 <= torch.load(out / "checkpoint.pt", weights_only=True)["step"] < 111  # of 111


def test_templates_file_is_checked(tmp_path):
    # str.format fails on the last three, which would end a run with a traceback
    for bad in ["no placeholder here", "{{}} is literal", "{} and {}", "a {kind} photo of {}"]:
        (tmp_path / "bad.txt").write_text(f"a photo of a {{}}.\n{bad}\n")
        with pytest.raises(ldifs.UsageError, match=re.escape(f"{bad!r} needs one {{}}")):
            ldifs.read_templates(tmp_path / "bad.txt")
    (tmp_path / "good.txt").write_text("a photo of a {}.\na {0} in the wild.\n")
    assert ldifs.read_templates(tmp_path / "good.txt") == ("a photo of a {}.", "a {0} in the wild.")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ldifs.UsageError, match="no templates"):
        ldifs.read_templates(tmp_path / "empty.txt")
    with pytest.raises(ldifs.UsageError, match="--templates"):
        ldifs.read_templates(tmp_path / "missing.txt")
    (tmp_path / "bom.txt").write_text("a photo of a {}.\n", encoding="utf-8-sig")  # Notepad's
    assert ldifs.read_templates(tmp_path / "bom.txt") == ("a photo of a {}.",)  # no \ufeff in it
    (tmp_path / "utf16.txt").write_text("a photo of a {}.\n", encoding="utf-16")  # Notepad's
    with pytest.raises(ldifs.UsageError, match="--templates .*utf16.txt: 'utf-8' codec can't"):
        ldifs.read_templates(tmp_path / "utf16.txt")


# ------------------------------------------------------------------ taps on every open_clip tower


def distinct_towers():
    towers = {}
    for name in open_clip.list_models():
        if name.startswith("ldifs-"):  # the tiny models these tests register
            continue
        config = open_clip.get_model_config(name)
        towers.setdefault(
            json.dumps(config["vision_cfg"], sort_keys=True),
            (name, config["embed_dim"], config["vision_cfg"]),
        )
    return list(towers.values())


def test_default_taps_for_every_open_clip_image_tower():
    towers = distinct_towers()
    assert len(towers) == 98  # open_clip 3.3.0's distinct image towers
    for name, embed_dim, vision_cfg in towers:
        size = vision_cfg.get("image_size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        with torch.device("meta"):  # no memory, no weights
            tower = open_clip.model._build_vision_tower(embed_dim, vision_cfg)
            names = ldifs.default_tap_names(tower)
            with ldifs.recorded_taps(tower, names, ldifs.channels_last(tower)) as taps:
                embedding = ldifs.image_embedding(tower, torch.empty(2, 3, *size))
        assert embedding.shape == (2, embed_dim), name  # what the head and the probes see
        # at least the stem and 4 stages (MCi3/4 have 5), each tap seen by the forward pass
        assert len(names) >= 5 and all(t is not None for t in taps.values()), name
        for tap, t in taps.items():
            assert t.shape[0] == 2 and t.dim() in (3, 4), (name, tap, t.shape)
            if t.dim() == 4:  # (B, C, H, W): the spatial dims are last
                assert size[0] % t.shape[2] == 0 and size[1] % t.shape[3] == 0, (name, tap, t.shape)


def test_coca_towers_classify_and_probe_on_their_embedding_not_their_tokens():
    """open_clip's CoCa image towers return (embedding, tokens); CoCa's encode_image uses the
    embedding, and so must the classifier and the probes' features."""
    config = open_clip.get_model_config("coca_ViT-B-32")
    dim = config["embed_dim"]
    with torch.device("meta"):  # no memory, no weights
        tower = open_clip.model._build_vision_tower(dim, config["vision_cfg"])
        images = torch.empty(2, 3, 224, 224)
        embedding, tokens = tower(images)
        logits = ldifs.ImageClassifier(tower, torch.nn.Linear(dim, 5))(images)
    assert embedding.shape == (2, dim) and tokens.dim() == 3 and logits.shape == (2, 5)

    class TokensToo(torch.nn.Module):
        def forward(self, x):
            return x, x[:, None].expand(-1, 7, -1)

    data = [(torch.randn(3), k) for k in range(5)]
    args = types.SimpleNamespace(workers=0, eval_batch_size=2, device=torch.device("cpu"))
    x, y = ldifs.extract_features(TokensToo(), data, args)
    assert torch.allclose(x, F.normalize(torch.stack([d[0] for d in data]), dim=-1))
    assert y.tolist() == [0, 1, 2, 3, 4]


def test_recorded_taps_take_the_first_tensor_of_a_tuple_output():
    class HuggingFaceStyleLayer(torch.nn.Module):
        def forward(self, x):
            return (2 * x, "attention weights")

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = HuggingFaceStyleLayer()

        def forward(self, x):
            return self.layer(x)[0]

    x, encoder = torch.randn(2, 3, 4), Encoder()
    with ldifs.recorded_taps(encoder, ["layer"]) as taps:
        encoder(x)
    assert torch.equal(taps["layer"], 2 * x)


def test_unsupported_tower_names_taps_flag_and_its_submodules():
    tower = torch.nn.Sequential()
    tower.add_module("features", torch.nn.Conv2d(3, 4, 3))
    tower.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ldifs.UsageError) as error:
        ldifs.default_tap_names(tower)
    assert "--taps" in str(error.value) and "features, pool" in str(error.value)
    assert ldifs.tap_names(tower, "features") == ["features"]
    # as the message lists them, and a trailing comma: "" would tap the whole tower
    assert ldifs.tap_names(tower, "features, pool,") == ["features", "pool"]
    with pytest.raises(ldifs.UsageError, match="no submodule 'nope'"):
        ldifs.tap_names(tower, "features,nope")
    # recorded_taps keeps one output per name: a repeat would not weigh its tap twice in D
    with pytest.raises(ldifs.UsageError, match="--taps names 'pool' twice"):
        ldifs.tap_names(tower, "pool,features,pool")


def model_kwargs(kwargs):
    """What timm.create_model passes on, less its pretrained-weights bookkeeping."""
    return {
        k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"
    }


def with_cfg(model):
    model.pretrained_cfg = model.default_cfg = {}  # open_clip reads it; timm sets it for its own
    return model


@register_model
def ldifs_tiny_vit(pretrained=False, **kwargs):
    return with_cfg(
        VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, **model_kwargs(kwargs)
        )
    )


@register_model
def ldifs_tiny_convnext(pretrained=False, **kwargs):
    return with_cfg(ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), **model_kwargs(kwargs)))


def register_timm_clip(tmp_path, trunk):
    name = f"ldifs-tiny-{trunk}"
    config = {
        **ldifs.TINY_CLIP_CONFIG,
        "vision_cfg": {
            "timm_model_name": f"ldifs_tiny_{trunk}",
            "timm_model_pretrained": False,
            "image_size": 32,
        },
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    return name


@pytest.mark.parametrize(
    "trunk, expected",
    [
        ("vit", ["trunk.norm_pre"] + [f"trunk.blocks.{i}" for i in range(4)]),
        ("convnext", ["trunk.stem"] + [f"trunk.stages.{i}" for i in range(4)]),
    ],
)
def test_timm_towers_train_with_ldifs_on_their_trunk(tmp_path, capsys, trunk, expected):
    model = register_timm_clip(tmp_path, trunk)
    out = tmp_path / "run"
    code, _, err = run_main(
        ldifs,
        [
            "--task",
            "synthetic",
            "--model",
            model,
            "--pretrained",
            "none",
            "--head",
            "zs",
            "--max-steps",
            "6",
            "--log-every",
            "1",
            "--eval-tasks",
            "none",
            "--workers",
            "0",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["taps"] == expected
    distances = [
        r["ldifs_distance"] for r in (json.loads(line) for line in (out / "log.jsonl").open())
    ]
    assert distances[0] < 1e-9 and distances[-1] > 100 * max(distances[0], 1e-12)
    visual = open_clip.create_model(model).visual
    with ldifs.recorded_taps(visual, expected) as taps:
        visual(torch.randn(3, 3, 32, 32))
    assert all(t.shape[0] == 3 for t in taps.values())
    assert [t.dim() for t in taps.values()] == ([3] * 5 if trunk == "vit" else [4] * 5)


def test_a_tap_that_never_runs_in_the_forward_pass_is_refused_up_front(tmp_path, capsys):
    """open_clip's attention reads out_proj's weights without calling the module, so a tap on
    it recorded nothing, and the first step ended in an AttributeError traceback."""
    flags = RESUME_FLAGS + ["--workers", "0", "--out", str(tmp_path / "run")]
    taps = "ln_pre,transformer.resblocks.0.attn.out_proj"
    code, out, err = run_main(ldifs, flags + ["--taps", taps], capsys)
    assert code == 2 and not out and err.count("\n") == 1, err
    message = "--taps: transformer.resblocks.0.attn.out_proj never runs in the image tower's"
    assert message in err, err
    assert not (tmp_path / "run/log.jsonl").exists()  # refused before any work


def test_taps_flag_is_recorded_and_a_resume_with_other_taps_is_refused(tmp_path, capsys):
    flags = RESUME_FLAGS + ["--max-steps", "2", "--workers", "0", "--out", str(tmp_path / "run")]
    taps = "ln_pre,transformer.resblocks.3"
    assert run_main(ldifs, flags + ["--taps", taps], capsys)[0] == 0
    assert json.loads((tmp_path / "run/metrics.json").read_text())["taps"] == taps.split(",")
    code, _, err = run_main(ldifs, flags + ["--resume"], capsys)
    assert code == 2 and "--taps" in err


# ------------------------------------------------------------------ the accuracy-forgetting picture


def test_eval_plots_target_accuracy_against_forgetting(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    root, _ = two_runs
    png = tmp_path / "tradeoff.png"
    compare_runs(root, tmp_path, "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    starts = [r for r in rows if r.get("alpha") == 0.0]  # curves start at the pre-trained point
    assert len(starts) == 2 and all(r["a_lp"] == rows[0]["a_lp"] for r in starts)


def test_a_plot_file_without_a_suffix_is_written_where_named_as_png(tmp_path):
    """matplotlib appends .png to a name without a suffix: --plot out/figure wrote
    out/figure.png, and the user found no out/figure."""
    pytest.importorskip("matplotlib")
    rows = [
        dict(run="r", label="FT", alpha=alpha, avg_delta_lp=-alpha / 10, target_accuracy=alpha)
        for alpha in (0.0, 1.0)
    ]
    evaluation.plot(rows, tmp_path / "figure", "delta_lp")
    assert [p.name for p in tmp_path.iterdir()] == ["figure"]
    assert (tmp_path / "figure").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plot_cut_short_by_ctrl_c_leaves_the_old_picture_whole(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def write_half(figure, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", write_half)
    picture = tmp_path / "p.png"
    picture.write_bytes(b"the old picture")
    rows = [dict(run="r", label="FT", alpha=a, avg_delta_lp=0.0, target_accuracy=a) for a in (0, 1)]
    with pytest.raises(KeyboardInterrupt):
        evaluation.plot(rows, picture, "delta_lp")
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
    assert picture.read_bytes() == b"the old picture"


def test_plot_without_matplotlib_is_one_line(two_runs, tmp_path, capsys, monkeypatch):
    root, _ = two_runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code, _, err = run_main(
        evaluation, [str(root / "lam0"), "--plot", str(tmp_path / "plots" / "p.png")], capsys
    )
    assert code == 2 and "pip install matplotlib" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "plots").exists()  # refused before its folder is made


def test_a_plot_format_matplotlib_cannot_write_is_one_line_before_any_evaluation(
    two_runs, tmp_path, capsys
):
    pytest.importorskip("matplotlib")
    run, plot = str(two_runs[0] / "lam0"), tmp_path / "plots" / "p.txt"
    code, out, err = run_main(evaluation, [run, "--tasks", "none", "--plot", str(plot)], capsys)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert f"--plot {plot}: matplotlib cannot write .txt files; use one of" in err and "png" in err
    assert not plot.parent.exists()  # refused before its folder is made


def test_plot_without_eval_tasks_is_one_line(two_runs, tmp_path, capsys, monkeypatch):
    """Forgetting, the plot's x axis, is an average over the eval tasks: with none (all
    missing, or --tasks none) there is nothing to draw."""
    root, _ = two_runs
    monkeypatch.setattr(evaluation, "check_plot_format", lambda _: None)  # matplotlib is optional
    flags = ["--tasks", "none", "--plot", str(tmp_path / "plots" / "p.png"), "--workers", "0"]
    code, _, err = run_main(evaluation, [str(root / "lam0"), *flags], capsys)
    assert code == 2 and "--plot needs an eval task" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "plots").exists()
