"""LDIFS: fine-tune CLIP on one task without forgetting the others.

Mukhoti, Gal, Torr, Dokania, "Fine-tuning can cripple your foundation model; preserving
features may be the solution" (TMLR 2024). The loss is

    loss = CE(head(f(x)), y) + lam * D(x),   D = ldifs_distance(taps(f, x), taps(f0, x))

where f is the trainable image encoder, f0 a frozen copy of the pre-trained one and the
taps are intermediate activations (see `ldifs_distance`). lam=0 is plain fine-tuning.

    python ldifs.py --task eurosat --lam 10            # CLIP ViT-B/32 (OpenAI) on EuroSAT
    python ldifs.py --task eurosat --lam 0             # plain fine-tuning, for comparison
    python ldifs.py --task svhn,cifar10,resisc45       # continual fine-tuning, task after task
    python ldifs.py --task folder:~/data/leaves        # your own images (ImageFolder layout)
    python ldifs.py --task synthetic                   # offline smoke run, tiny CLIP, CPU
    torchrun --nproc_per_node 8 ldifs.py --task imagenet   # DDP on 8 GPUs
    python ldifs.py --list-tasks                       # the tasks and where their data goes
    python eval.py runs/eurosat-lam0 runs/eurosat-lam10    # compare runs for forgetting

The file reads top to bottom: the regulariser, training, evaluation, models and heads,
tasks and data, checkpoints, the command line.
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from open_clip.pretrained import get_pretrained_cfg
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import Compose, PILToTensor, ToTensor
from tqdm import tqdm

# ----------------------------------------------------------------------- the regulariser


def ldifs_distance(taps, ref_taps, eps=1e-10):
    """The LDIFS feature distance between two lists of activations of the same inputs, one
    tensor per tap, batch first: (B, T, C) tokens or (B, C, H, W) maps.

    As in the authors' release (an LPIPS habit), each tap is divided by its L2 norm along
    dim 1, which for ViT tokens is the token axis, per channel; the squared difference is
    averaged over all non-batch dims, then over taps, then over the batch. For tokens this
    equals (2/T) * mean_c(1 - cos_T(h[:, c], h0[:, c])). Depends on torch alone: copy it.
    lam=10 is calibrated for CLIP ViTs with this normalisation; other towers need their own."""

    def unit(h):
        h = h.to(torch.promote_types(h.dtype, torch.float32))  # bf16/fp16 up, float64 kept
        return h / (h.norm(dim=1, keepdim=True) + eps)

    per_tap = [
        (unit(h) - unit(h0)).pow(2).flatten(1).mean(1) for h, h0 in zip(taps, ref_taps, strict=True)
    ]
    return torch.stack(per_tap).mean(0).mean()


@contextlib.contextmanager
def recorded_taps(model, names, channels_last=False):
    """Within the block, every forward pass of `model` stores the outputs of its submodules
    `names` in the yielded dict (name -> tensor, in the order of `names`), from the same
    pass that gives the logits. A module that returns a tuple (as Hugging Face layers do) is
    tapped at its first element; with `channels_last`, (B, H, W, C) maps become (B, C, H, W)."""
    taps = dict.fromkeys(names)

    def record(name, output):
        output = output[0] if isinstance(output, tuple) else output
        taps[name] = output.movedim(-1, 1) if channels_last and output.dim() == 4 else output

    modules = [(name, model.get_submodule(name)) for name in names]
    handles = [m.register_forward_hook(lambda _, __, out, n=n: record(n, out)) for n, m in modules]
    try:
        yield taps
    finally:
        for handle in handles:
            handle.remove()


def default_tap_names(encoder):
    """The release's taps and their analogue on every open_clip image tower: for ViTs
    (open_clip's, timm's VisionTransformer and EVA) the tokens after the patch and position
    embeddings (ln_pre, norm_pre) and after the blocks at depth/4, depth/2, 3*depth/4 and
    depth; for staged towers (ModifiedResNet, ConvNeXt, FastViT, Swin) the stem and each
    stage. open_clip wraps timm models as `.trunk`."""
    trunk, prefix = (encoder.trunk, "trunk.") if hasattr(encoder, "trunk") else (encoder, "")
    if hasattr(trunk, "ln_pre") and hasattr(trunk, "transformer"):
        return ["ln_pre"] + quarter_blocks(
            "transformer.resblocks", len(trunk.transformer.resblocks)
        )
    if hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):
        first = "norm_pre" if getattr(trunk, "norm_pre", None) is not None else "patch_embed"
        return [prefix + first] + quarter_blocks(prefix + "blocks", len(trunk.blocks))
    if hasattr(trunk, "layer4"):
        return ["avgpool", "layer1", "layer2", "layer3", "layer4"]  # avgpool ends the stem
    stem = next((n for n in ("stem", "patch_embed") if hasattr(trunk, n)), None)
    stages = next((n for n in ("stages", "layers") if hasattr(trunk, n)), None)
    if not (stem and stages):
        raise UsageError(
            f"no default LDIFS taps for a {type(trunk).__name__} image tower; name them with "
            f"--taps a,b,c (its top-level submodules: {submodules(encoder)})"
        )
    return [prefix + stem] + [f"{prefix}{stages}.{i}" for i in range(len(getattr(trunk, stages)))]


def quarter_blocks(blocks, depth):
    return [f"{blocks}.{depth * k // 4 - 1}" for k in (1, 2, 3, 4)]


def channels_last(encoder):
    """Whether the tower's maps are (B, H, W, C), as timm's Swin makes them."""
    return getattr(getattr(encoder, "trunk", encoder), "output_fmt", "NCHW") == "NHWC"


def frozen_copy(module):
    """A deep copy that never trains: eval mode, no gradients. Take it outside
    `recorded_taps`: deepcopy shares hook closures, which would mix the two models' taps."""
    reference = copy.deepcopy(module).eval()
    reference.requires_grad_(False)
    return reference


# ---------------------------------------------------------------------------- training


def ldifs_loss(model, reference, taps, ref_taps, images, labels, lam, label_smoothing=0.0):
    """Cross-entropy and the LDIFS distance D of one batch, from one trainable pass (the
    release runs the trainable encoder twice per step; one pass that yields both the logits
    and the taps is the same maths at lower cost). When lam is 0, D is 0 and the reference
    never runs."""
    ce = F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
    if lam == 0:
        return ce, torch.zeros((), device=ce.device)
    with torch.no_grad():
        reference(images)
    return ce, ldifs_distance(list(taps.values()), list(ref_taps.values()))


def l2sp_penalty(encoder, reference):
    """The L2-SP baseline's sum ||w - w0||^2 over the encoder's weights, w0 the reference's."""
    pairs = zip(encoder.parameters(), reference.parameters(), strict=True)
    return sum((w - w0).pow(2).sum() for w, w0 in pairs)


def lr_at(step, lr, warmup, total_steps):
    """The release's schedule: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * lr


@dataclasses.dataclass(frozen=True)
class Stage:
    """What one fine-tuning stage derives from the flags, built once in `plan_stage`."""

    task: "Task"
    index: int  # in a continual sequence; 0 for a plain run
    sequence: tuple  # the names of the run's tasks
    out: Path  # where this stage writes
    epochs: int
    total_steps: int
    taps: tuple  # the tower's submodules LDIFS compares
    rank: int = 0  # this process, under torchrun
    world_size: int = 1


def train(classifier, reference, data, optimizer, init_head, start_step, stage, args):
    """Fine-tune `classifier` with CE + lam * D (+ the L2-SP term) from `start_step` to the
    stage's last step, checkpointing every epoch and every --save-every steps; return
    throughput metrics."""
    model = DistributedDataParallel(classifier) if stage.world_size > 1 else classifier
    loader = train_loader(data, start_step, stage, args)
    log, nhwc = TrainLog(start_step, stage, args), channels_last(reference)
    ref_taps = stage.taps if args.lam > 0 else []
    classifier.train()
    with (
        recorded_taps(classifier.encoder, stage.taps, nhwc) as taps,
        recorded_taps(reference, ref_taps, nhwc) as reference_taps,
        contextlib.closing(log),
        tf32_matmuls(),
    ):
        for step, (images, labels) in enumerate(loader, start_step):
            images = data.finish(images.to(args.device, non_blocking=True))
            labels = labels.to(args.device, non_blocking=True)
            lr = lr_at(step, args.lr, args.warmup, stage.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(args.device):
                batch = (images, labels, args.lam, args.label_smoothing)
                ce, distance = ldifs_loss(model, reference, taps, reference_taps, *batch)
            penalty = l2sp_penalty(classifier.encoder, reference) if args.l2sp else 0 * ce
            optimizer.zero_grad(set_to_none=True)
            (ce + args.lam * distance + args.l2sp * penalty).backward()
            torch.nn.utils.clip_grad_norm_(classifier.parameters(), args.grad_clip)
            optimizer.step()
            log.record(step, ce, distance, penalty, lr)
            if is_checkpoint_step(step + 1, len(data), stage, args):
                with log.paused():
                    log.check_finite(classifier)
                    save_checkpoint(classifier, optimizer, init_head, step + 1, stage, args)
    return {
        "steps": stage.total_steps,
        "train_images_per_second": log.images_per_second(),
        "peak_memory_mb": peak_memory_mb(args.device),
    }


def train_loader(data, start_step, stage, args):
    """One DataLoader for the whole stage: its workers start once."""
    steps = (start_step, stage.total_steps, stage.rank, stage.world_size)
    batches = step_batches(len(data), args.batch_size, args.seed, *steps)
    pin = args.device.type == "cuda"
    loading = dict(num_workers=args.workers, pin_memory=pin, worker_init_fn=quiet_worker_exit)
    return DataLoader(data, batch_sampler=batches, **loading)


def step_batches(n, batch_size, seed, start_step, total_steps, rank=0, world_size=1):
    """This rank's share of each step's batch, for steps start_step..total_steps-1. Every
    epoch is a seeded permutation of the n images (the last partial batch is dropped), so a
    batch depends on its step alone. Indices are epoch * n + image, as `Augmented` reads."""
    steps_per_epoch = n // batch_size
    epoch, order = None, None
    for step in range(start_step, total_steps):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(hash((seed, epoch))))
        k = step % steps_per_epoch
        yield (epoch * n + order[k * batch_size : (k + 1) * batch_size][rank::world_size]).tolist()


class Transformed(Dataset):
    """`data` with open_clip's `transform` applied to its images, in two parts. The loader's
    workers run it up to its ToTensor (crop and resize, in PIL) and hand over uint8 images;
    `finish` runs the rest, the scaling to [0, 1] and the normalisation, on whole batches on
    the device. A quarter of the bytes then goes through the loader, and the same workers
    give about twice the images/s (see README). The images are the un-split transform's,
    bitwise on the CPU; CUDA may round the division by 255 differently in the last bit."""

    def __init__(self, data, transform):
        steps = transform.transforms
        cut = next(k for k, step in enumerate(steps) if isinstance(step, ToTensor))
        self.data, self.on_workers = data, Compose([*steps[:cut], PILToTensor()])
        self.on_device = Compose(steps[cut + 1 :])

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image, label = self.data[i]
        return self.on_workers(image), label

    def finish(self, images):
        return self.on_device(images.float() / 255)


class Augmented(Transformed):
    """Training data whose random augmentation is seeded by (seed, epoch, image), so a
    resumed run, any worker count and any number of ranks see identical batches."""

    def __init__(self, data, transform, seed):
        super().__init__(data, transform)
        self.seed = seed

    def __getitem__(self, index):
        epoch, i = divmod(index, len(self.data))
        # The CPU generator alone, which the crop draws from: torch.manual_seed also seeds
        # every other device, at 50 times the cost per image.
        state = torch.default_generator.get_state()
        torch.default_generator.manual_seed(hash((self.seed, epoch, i)))
        try:
            return super().__getitem__(i)
        finally:
            torch.default_generator.set_state(state)


def make_optimizer(params, args):
    fused = args.device.type == "cuda"  # one kernel for the whole AdamW update
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.wd, fused=fused)


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on the CPU, where bf16 is slower."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


@contextlib.contextmanager
def tf32_matmuls():
    """TF32 for the fp32 matmuls that bf16 autocast leaves in training on CUDA. Evaluation
    stays in full fp32, as the release's did: its torch 2.0 left TF32 matmuls off."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class TrainLog:
    """The loss parts, lr and throughput every --log-every steps, to log.jsonl and the
    progress bar. Losses stay on the device between log lines: no host sync per step."""

    def __init__(self, start_step, stage, args):
        self.stage, self.args, self.first = stage, args, start_step
        self.sums = torch.zeros(3, device=args.device)  # CE, D and L2-SP since the last line
        self.bad_step = torch.tensor(-1, device=args.device)  # the first non-finite step
        self.since, self.clock = 0, None
        mode = "a" if start_step else "w"  # from step 0: over a run killed before a checkpoint
        self.file = open(stage.out / "log.jsonl", mode) if stage.rank == 0 else None
        name, total = stage.task.name, stage.total_steps
        self.bar = progress_bar(total=total, initial=start_step, desc=f"train {name}")

    def record(self, step, ce, distance, penalty, lr):
        parts = torch.stack([ce, distance, penalty]).detach()
        first_bad = (self.bad_step < 0) & ~parts.isfinite().all()
        self.bad_step = torch.where(first_bad, step, self.bad_step)
        self.sums += parts
        self.since += 1
        self.bar.update()
        if step == self.first + 1:  # steady state starts after two steps
            self.clock = (step, sync_time(self.args.device))
        if (step + 1) % self.args.log_every == 0 or step + 1 == self.stage.total_steps:
            self.write(step + 1, lr)

    def write(self, step, lr):
        sums = all_reduce_mean(self.sums)  # a NaN on any rank makes it NaN on every rank
        if not sums.isfinite().all():
            bad = int(self.bad_step) if self.bad_step >= 0 else step - 1
            raise UserError(f"the loss was not finite at step {bad}; {last_good(self.stage)}")
        (ce, d, penalty), lam = (sums / self.since).tolist(), self.args.lam
        rate = self.images_per_second(step - 1)
        line = {"step": step, "lr": lr, "loss/ce": ce, "loss/ldifs": lam * d, "ldifs_distance": d}
        line.update({"loss/l2sp": self.args.l2sp * penalty, "images_per_second": rate})
        if self.file:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
        shown = "-" if rate is None else f"{rate:.1f}"
        postfix = {"ce": f"{ce:.3f}", "ldifs": f"{lam * d:.4f}", "img_s": shown}
        self.bar.set_postfix(postfix, refresh=False)  # a redraw each line would flood logs
        self.sums.zero_()
        self.since = 0

    def check_finite(self, model):
        """Stop before a non-finite loss or weight can reach a checkpoint."""
        if self.bad_step >= 0:
            step = int(self.bad_step)
            raise UserError(f"the loss was not finite at step {step}; {last_good(self.stage)}")
        if not all(p.isfinite().all() for p in model.parameters()):
            raise UserError(f"the weights became non-finite; {last_good(self.stage)}")

    @contextlib.contextmanager
    def paused(self):
        """Keep checkpoint writes out of images/s: a 1 GB write per epoch is not training, and
        would make the figure depend on the disk."""
        start = sync_time(self.args.device)
        yield
        if self.clock:
            step, clock = self.clock
            self.clock = (step, clock + sync_time(self.args.device) - start)

    def images_per_second(self, step=None):
        """Steady-state throughput up to `step`, or None (JSON's null: it has no NaN) before
        two steps have run."""
        if self.clock is None:
            return None
        start_step, start_time = self.clock
        step = self.stage.total_steps - 1 if step is None else step
        if step <= start_step:
            return None
        elapsed = sync_time(self.args.device) - start_time
        return (step - start_step) * self.args.batch_size / elapsed

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


def last_good(stage):
    path = stage.out / "checkpoint.pt"
    if not path.exists():
        return "no checkpoint was written; try a lower --lr"
    return f"the last good checkpoint {path} is intact; try a lower --lr"


def sync_time(device):
    if device.type != "cpu":  # the device that trains, not the current GPU (cuda:1); mps too
        torch.accelerator.synchronize(device)
    return time.perf_counter()


def all_reduce_mean(tensor):
    if not torch.distributed.is_initialized():
        return tensor
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor)
    return tensor / torch.distributed.get_world_size()


def other_rank():
    """Whether this is a torchrun rank other than 0: rank 0 alone draws progress bars (one a
    rank would overwrite each other) and warns."""
    return torch.distributed.is_initialized() and torch.distributed.get_rank() > 0


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar on rank 0. Only the other ranks set `disable`, so tqdm's environment
    variables apply: TQDM_DISABLE=1, or TQDM_MININTERVAL=60 for a batch job's log."""
    if other_rank():
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


def peak_memory_mb(device):
    """CUDA's peak allocated memory, or on the CPU the process's peak resident set (None on
    Windows, which lacks the `resource` module)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 2**10  # macOS reports bytes


# -------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def extract_features(encoder, data, args):
    """L2-normalised image embeddings and labels of every image in `data`, in fp32 with
    autocast off, as the release measured them (training alone uses bf16)."""
    encoder.eval()
    loading = dict(num_workers=args.workers, worker_init_fn=quiet_worker_exit)
    loader = DataLoader(data, batch_size=args.eval_batch_size, **loading)
    xs, ys = [], []
    bar = progress_bar(loader, desc="features", unit="batch", leave=False)
    finish = data.finish if isinstance(data, Transformed) else lambda images: images
    for images, labels in bar:
        embedding = image_embedding(encoder, finish(images.to(args.device)))
        xs.append(F.normalize(embedding.float(), dim=-1))
        ys.append(labels.to(args.device))
    return torch.cat(xs), torch.cat(ys)


PROBE_LRS = (0.01, 0.05, 0.1, 0.5, 1.0)  # the release's sweep, picked on val
PROBE_LOGITS = 2**27  # at most this many logits at once: probes share a pass while they fit


def fit_linear_probes(x, y, num_classes, lrs, steps=1000, seed=0):
    """The release's probes, one per learning rate: nn.Linear with bias, from nn.Linear's
    default init (seeded, the same for every lr), fit full-batch on the L2-normalised
    features by AdamW with torch's default weight decay (0.01) for 1000 steps.

    Speed-up, same maths: probes fit side by side, each in its own param group, with one
    matmul for all and the loss the sum of their separate CEs, so each gets exactly the
    gradient it would get alone."""
    x, y = F.normalize(x.clone(), dim=-1), y.clone()  # inference tensors cannot enter autograd
    heads = [seeded_linear(x.shape[1], num_classes, seed).to(x.device) for _ in lrs]
    at_once = max(1, PROBE_LOGITS // (len(x) * num_classes))
    total = steps * len(lrs)
    with progress_bar(total=total, desc="linear probe", leave=False) as bar:
        for k in range(0, len(lrs), at_once):
            fit_side_by_side(x, y, heads[k : k + at_once], lrs[k : k + at_once], steps, bar)
    return heads


def seeded_linear(dim, num_classes, seed):
    """nn.Linear(dim, num_classes) with its default init U(-1/sqrt(dim), 1/sqrt(dim)), seeded."""
    head, g = nn.Linear(dim, num_classes), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.uniform_(-(dim**-0.5), dim**-0.5, generator=g)
    return head


def fit_side_by_side(x, y, heads, lrs, steps, bar):
    groups = [{"params": head.parameters(), "lr": lr} for head, lr in zip(heads, lrs, strict=True)]
    optimizer = torch.optim.AdamW(groups)
    targets = y[:, None].expand(-1, len(heads))
    with torch.enable_grad():
        for _ in range(steps):
            weight = torch.cat([head.weight for head in heads])
            bias = torch.cat([head.bias for head in heads])
            logits = F.linear(x, weight, bias).view(len(x), len(heads), -1).transpose(1, 2)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(logits, targets, reduction="none").mean(0).sum().backward()
            optimizer.step()
            bar.update(len(heads))


@torch.no_grad()
def probe_accuracy(head, x, y):
    """Top-1 accuracy (a fraction) of the linear head on features x."""
    return head(x).argmax(1).eq(y).float().mean().item()


def select_probe(train, val, num_classes):
    """The release's probe: one fit on `train` = (x, y) per lr, the best on `val` (the first
    of ties, as its strict >). The release then "refits on train + val", but its XValVal
    resolves to XVal: it refits on the same train split from a fresh random init, a draw
    from the same procedure, so we keep the chosen fit (one fit fewer)."""
    heads = fit_linear_probes(*train, num_classes, PROBE_LRS)
    return max(heads, key=lambda head: probe_accuracy(head, *val))


def linear_probe(train_x, train_y, test_x, test_y, val=None):
    """A_LP: the test accuracy (a fraction) of the release's probe on frozen features, its
    lr chosen on `val` = (x, y), by default the seeded 10% of train held out as for tasks."""
    if val is None:
        keep, held = (seeded_split(len(train_x), s) for s in ("train", "val"))
        (train_x, train_y), val = (train_x[keep], train_y[keep]), (train_x[held], train_y[held])
    num_classes = int(torch.cat([train_y, val[1], test_y]).max()) + 1
    return probe_accuracy(select_probe((train_x, train_y), val, num_classes), test_x, test_y)


def weights_key(model, pretrained, seed):
    """What the pre-trained encoder's features depend on besides the data: the model and
    its weights (local files by `files_digest`; random ones, 'none', by the seed)."""
    if model.startswith("local-dir:"):  # open_clip loads the folder's files, not `pretrained`
        files = sorted(p for p in Path(model.split(":", 1)[1]).iterdir() if p.is_file())
        return {"model": model, "files": files_digest(files)}
    if model.startswith("hf-hub:"):  # the repo's weights, not `pretrained`: those fetched
        return {"model": model, "files": files_digest(hub_files(model.split(":", 1)[1]))}
    if pretrained == "none":
        return {"model": model, "pretrained": pretrained, "seed": seed}
    if os.path.isfile(pretrained):
        pretrained = files_digest([pretrained])
    else:  # as open_clip reads a tag: --pretrained OpenAI loads openai
        pretrained = pretrained.lower().replace("-", "_")
        if needs_quick_gelu(model.removesuffix("-quickgelu"), pretrained):  # load_clip forces it
            model = model.removesuffix("-quickgelu")
    return {"model": model, "pretrained": pretrained}


def hub_files(repo):
    """The files of the Hugging Face repo's revision that open_clip last fetched, if any."""
    config = huggingface_hub.try_to_load_from_cache(repo, "open_clip_config.json")
    return sorted(Path(config).parent.iterdir()) if isinstance(config, str) else []


def files_digest(paths):
    """A digest of the files' real paths, sizes and mtimes: it changes when one does."""
    stats, real_folder = [], functools.cache(os.path.realpath)
    for path in paths:  # a folder task may hold a million: one lstat a file, one realpath a folder
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            real, info = os.path.realpath(path), os.stat(path)
        else:  # realpath(path), without its lstat of every part of the path again
            folder, name = os.path.split(path)
            real = os.path.join(real_folder(folder), name)
        stats.append((real, info.st_size, info.st_mtime_ns))
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def feature_key(weights, task, split, transform, root):
    """Everything the pre-trained encoder's features depend on, for the feature cache: for a
    task whose split files may be missing (a seeded split stands in), the files there."""
    where = {"task": task.name, "split": split, "preprocess": repr(transform)}
    if task.images_digest:
        where["images"] = task.images_digest
    if task.split_files:
        files = task.split_files(os.path.expanduser(root))
        where["split_files"] = [hashlib.sha256(path.read_bytes()).hexdigest() for path in files]
    return {**weights, **where, "format": 1}


def key_digest(key):
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cache_entry(key, extension, args):
    """The file that keeps `key`'s entry in the cache, named by its task (no path reaches a
    file name raw; cut to 128 bytes, so that with atomic_write's suffix it fits the OS's 255),
    split and digest, which covers the task."""
    task = file_safe(key["task"]).encode()[:128].decode(errors="ignore")
    name = f"{task}-{key['split']}-{key_digest(key)}.{extension}"
    return Path(args.cache_dir).expanduser() / name


def cached_features(encoder, data, key, args):
    """extract_features, memoised on disk under `key`; an entry that is unreadable or made
    for another key is recomputed, never trusted."""
    path = cache_entry(key, "pt", args)
    with contextlib.suppress(Exception):  # missing, truncated, corrupt: all mean recompute
        entry = torch.load(path, map_location=args.device, weights_only=True)
        if entry["key"] == key and len(entry["x"]) == len(entry["y"]) == len(data):
            return entry["x"], entry["y"]
    x, y = extract_features(encoder, data, args)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        delete_dead_writes(path.parent)
        atomic_save({"key": key, "x": x.cpu(), "y": y.cpu()}, path)
    except OSError as e:  # read-only, full: the cache saves time, never a run
        warn_once(f"cannot cache features in {path.parent} ({e.strerror or e}); see --cache-dir")
    return x, y


def task_features(encoder, task, transform, args, weights=None, splits=("train", "val", "test")):
    """{split: (features, labels)} of the task's `splits`; cached on disk under `weights` (a
    `weights_key`) when given: for the pre-trained encoder alone."""
    features = {}
    for split in splits:
        data = get_dataset(task, split, args.data_root, transform, args.download)
        key = weights and feature_key(weights, task, split, transform, args.data_root)
        cached = key and cached_features(encoder, data, key, args)
        features[split] = cached or extract_features(encoder, data, args)
    return features


def forgetting_on(task, reference, encoder, digest, clip, transform, args):
    """Zero-shot (pre-trained text head) and linear-probe accuracy of the pre-trained and the
    fine-tuned image encoder (`digest`: its `encoder_digest`) on `task`, and the deltas
    (fine-tuned minus pre-trained)."""
    weights = weights_key(args.model, args.pretrained, args.seed)
    encoders = {"pretrained": (reference, weights), "finetuned": (encoder, None)}
    tests = {
        which: task_features(model, task, transform, args, key, splits=("test",))["test"]
        for which, (model, key) in encoders.items()
    }
    names = class_names(task, args.data_root)  # once the features have fetched the data
    tokenizer = tokenizer_of(args.model)
    zs = zero_shot_head(clip, tokenizer, names, task.templates, args.device)
    row = {}
    for which, (model, key) in encoders.items():
        row[f"zs_{which}"] = probe_accuracy(zs, *tests[which])
        row[f"lp_{which}"] = cached_linear_probe(
            model, task, transform, args, key or digest, key, tests[which]
        )
    row["delta_zs"] = row["zs_finetuned"] - row["zs_pretrained"]
    row["delta_lp"] = row["lp_finetuned"] - row["lp_pretrained"]
    return row


def cached_linear_probe(encoder, task, transform, args, named, weights=None, test=None):
    """A_LP of the encoder on `task`, kept in the cache under `named` (its `weights_key`, or
    an `encoder_digest`): eval.py reuses ldifs.py's, a sweep fits the pre-trained probe once,
    and a killed eval.py goes on where it stopped. Features are extracted only when it is not
    kept (`test`: those of the test split, at hand), and cached only under `weights`."""
    key = feature_key(named, task, "a_lp", transform, args.data_root)
    path = cache_entry(key, "json", args)
    a_lp = kept_a_lp(path, key)
    if a_lp is None:
        splits = ("train", "val") if test else ("train", "val", "test")
        f = {"test": test, **task_features(encoder, task, transform, args, weights, splits)}
        a_lp = linear_probe(*f["train"], *f["test"], val=f["val"])
        if not any(in_part(task, split, len(y)) for split, (_, y) in f.items()):
            keep_a_lp(a_lp, path, key)  # not from data unpacked in part: it outlives the fix
    return a_lp


def kept_a_lp(path, key):
    """The A_LP kept at `path` for `key`, or None; an entry made for another key is not used."""
    with contextlib.suppress(Exception):  # missing, truncated, corrupt: all mean recompute
        entry = json.loads(path.read_text())
        if entry["key"] == key:
            return entry["a_lp"]
    return None


def keep_a_lp(a_lp, path, key):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json({"key": key, "a_lp": a_lp}, path)
    except OSError as e:  # read-only, full: the cache saves time, never a run
        warn_once(f"cannot cache in {path.parent} ({e.strerror or e}); see --cache-dir")


def encoder_digest(encoder):
    """A digest of the encoder's layers and weights: what its features depend on, besides
    the images and their preprocessing."""
    digest = hashlib.sha256(repr(encoder).encode())
    for name, tensor in encoder.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"encoder": digest.hexdigest()}


def evaluate_forgetting(reference, encoder, clip, transform, metrics, out, args):
    """forgetting_on for every eval task, each row written to metrics.json as it is measured:
    a run killed here measures only the others when resumed. A task whose data is missing is
    skipped with a warning, and tried again on a resume; it never costs the run."""
    rows = metrics.setdefault("forgetting_so_far", {})
    digest = encoder_digest(encoder)  # once a run, not a task: 0.7 s for ViT-L/14 on a CPU
    for name in args.eval_tasks:
        if name in rows and "skipped" not in rows[name]:  # measured before the run was killed
            continue
        try:
            rows[name] = forgetting_on(
                get_task(name), reference, encoder, digest, clip, transform, args
            )
        except DataMissing as e:
            print(f"ldifs.py: warning: skipping eval task {name}: {e}", file=sys.stderr)
            rows[name] = {"skipped": str(e)}
        write_json(metrics, out / "metrics.json")
    del metrics["forgetting_so_far"]
    return {name: rows[name] for name in args.eval_tasks}


FORGETTING_COLUMNS = (
    "zs_pretrained zs_finetuned delta_zs lp_pretrained lp_finetuned delta_lp".split()
)


def forgetting_table(results):
    """The forgetting results as a Markdown table, in percent, with the average."""
    header = ["task", "ZS pre", "ZS ft", "Δ_ZS", "LP pre", "LP ft", "Δ_LP"]
    skipped = ["skipped (data missing)"] + [""] * 5
    rows = [[name, *(skipped if "skipped" in r else percents(r))] for name, r in results.items()]
    done = [row for row in results.values() if "skipped" not in row]
    if done:
        means = {c: sum(row[c] for row in done) / len(done) for c in FORGETTING_COLUMNS}
        rows.append(["**average**", *percents(means)])
    return markdown_table(header, rows)


def percents(row):
    return [f"{100 * row[c]:{'+' if c.startswith('delta') else ''}.1f}" for c in FORGETTING_COLUMNS]


def markdown_table(header, rows):
    """A Markdown table of cells, every column but the first right-aligned."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|---|" + "---:|" * (len(header) - 1), *lines[1:]])


def seen_task_accuracies(encoder, seen, heads, data, transform, args):
    """Test accuracy on every task seen so far, each with its own head."""
    row = []
    for task in seen:
        test = Transformed(data[task.name][1], transform)
        row.append(probe_accuracy(heads[task.name], *extract_features(encoder, test, args)))
    return row


def summarise_sequence(tasks, matrix, args):
    """The accuracy matrix (after stage k, on task i), the final average accuracy and
    backward transfer: mean over i < T of acc(T, i) - acc(i, i)."""
    names, last = [t.name for t in tasks], matrix[-1]
    transfer = sum(last[i] - matrix[i][i] for i in range(len(names) - 1)) / (len(names) - 1)
    summary = dict(tasks=names, accuracy_matrix=matrix, average_accuracy=sum(last) / len(last))
    summary.update(
        backward_transfer=transfer, lam=args.lam, l2sp=args.l2sp, reference=args.reference
    )
    write_json(summary, args.out / "metrics.json")  # before printing: stdout may be closed
    rows = [
        [f"{k}: {names[k]}", *(f"{100 * a:.1f}" for a in row), *[""] * (len(names) - len(row))]
        for k, row in enumerate(matrix)
    ]
    print(f"\nContinual fine-tuning, test accuracy in % (lam {args.lam:g}, l2sp {args.l2sp:g}):\n")
    print(markdown_table(["after stage", *names], rows))
    print(
        f"\naverage accuracy {100 * summary['average_accuracy']:.1f}, "
        f"backward transfer {100 * transfer:+.1f}"
    )
    return summary


# --------------------------------------------------------------------- models and heads


class ImageClassifier(nn.Module):
    """The image encoder and a linear head (with bias) on its L2-normalised features."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images):
        return self.head(F.normalize(image_embedding(self.encoder, images), dim=-1))


def image_embedding(encoder, images):
    """The image tower's embedding. CoCa's towers return (embedding, tokens), and CoCa's own
    encode_image uses the embedding."""
    output = encoder(images)
    return output[0] if isinstance(output, tuple) else output


def linear_head(weight, bias=None):
    """An nn.Linear holding `weight` (classes, dim) and `bias` (0 if None), on weight's device."""
    head = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(torch.zeros(len(weight)) if bias is None else bias)
    return head


def zero_shot_head(clip, tokenizer, classnames, templates, device):
    """A linear head whose rows are the text embeddings of the class prompts, scaled by
    logit_scale.exp() (100 for OpenAI CLIP), bias 0, as CLIP's zero-shot classifier."""
    weights = open_clip.build_zero_shot_classifier(
        clip, tokenizer, classnames, templates, device=device
    )
    return linear_head(weights.T * clip.logit_scale.exp().detach())


def probe_head(encoder, task, num_classes, transform, args, cache=True):
    """LP-init: the release's linear probe (`select_probe`) on the frozen encoder's features.
    `cache` only while the encoder holds the pre-trained weights the cache is keyed by."""
    weights = weights_key(args.model, args.pretrained, args.seed) if cache else None
    f = task_features(encoder, task, transform, args, weights, splits=("train", "val"))
    return select_probe(f["train"], f["val"], num_classes)


def initial_head(clip, task, classnames, transform, stage, args):
    """The head's init: the zero-shot text head, or an LP-init probe that reuses cached
    features only while the encoder is the pre-trained one (the first stage)."""
    if args.head == "zs":
        tokenizer = tokenizer_of(args.model)
        return zero_shot_head(clip, tokenizer, classnames, task.templates, args.device)
    return probe_head(clip.visual, task, len(classnames), transform, args, cache=stage.index == 0)


TINY_CLIP = "ldifs-tiny"
TINY_CLIP_CONFIG = {  # a 4-block ViT and 2-block text tower for offline runs and tests
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_clip():
    if TINY_CLIP not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as folder:  # open_clip reads the file once, here
            path = Path(folder) / f"{TINY_CLIP}.json"
            path.write_text(json.dumps(TINY_CLIP_CONFIG))
            open_clip.add_model_config(path)


OWN_WEIGHTS = ("hf-hub:", "local-dir:")  # models whose weights come with them


def needs_quick_gelu(name, pretrained):
    # OpenAI weights were trained with QuickGELU; building them with GELU loses accuracy
    # silently (open_clip only warns "QuickGELU mismatch", and for a file not at all).
    if pretrained and os.path.isfile(pretrained):  # no tag; a run saved its config beside it
        saved = Path(pretrained).with_name("open_clip_config.json")
        if not saved.is_file() and f"{name}-quickgelu" in open_clip.list_models():
            warn_once(
                f"--pretrained {pretrained} has no open_clip_config.json beside it, so {name} "
                f"is built with GELU; if these are OpenAI's weights, use {name}-quickgelu"
            )
        return bool(read_json_object(saved).get("model_cfg", {}).get("quick_gelu"))
    return bool(pretrained and (get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu"))


def load_clip(name, pretrained, device="cpu"):
    """An open_clip CLIP with its train and eval preprocessing. `pretrained` is an open_clip
    tag, a checkpoint path or 'none'; `name` may be 'hf-hub:org/repo'."""
    check_model(name, pretrained)
    check_gpu_kernels(torch.device(device))
    own_weights = name.startswith(OWN_WEIGHTS)  # open_clip ignores a tag, as older runs recorded
    tag = None if pretrained == "none" or own_weights else pretrained
    # Weights that fail to load are an error: open_clip would go on with random ones, warning.
    required = bool(tag) or own_weights
    quick_gelu = needs_quick_gelu(name, tag)
    try:
        return open_clip.create_model_and_transforms(
            name, tag, device=device, force_quick_gelu=quick_gelu, require_pretrained=required
        )
    except Exception as e:  # open_clip raises bare RuntimeErrors for all of these
        if tag and os.path.isfile(tag):
            what, hint = f"read checkpoint {tag}", "check the file"
        elif tag or name.startswith("hf-hub:"):
            what, hint = f"download {name} weights {tag or ''}".strip(), "check your connection"
        else:  # nothing was fetched: the model itself failed to build
            what, hint = f"build {name}", "check its model config"
        raise UserError(f"could not {what}: {one_line(e)}; {hint}") from e


def check_gpu_kernels(device):
    """The torch build must hold kernels for the GPU. PyPI's torch 2.14 is built for CUDA 13,
    which starts at Turing (7.5): on a V100 torch only warns, and the first kernel fails with
    "no kernel image is available". torch 2.14's CUDA 12.6 build still runs from Maxwell."""
    if device.type != "cuda" or not torch.version.cuda:  # ROCm names its GPUs otherwise
        return
    major, minor = torch.cuda.get_device_capability(device)
    built = [int(re.search(r"\d+", arch)[0]) for arch in torch.cuda.get_arch_list()]  # sm_90a
    oldest = min(built, default=0)
    if 10 * major + minor < oldest:
        raise UserError(
            f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) is older "
            f"than the GPUs this torch build runs on (CUDA {torch.version.cuda}, from "
            f"{oldest / 10:g}); install its CUDA 12.6 build: {cuda12_install()}"
        )


def cuda12_install():
    """The command that installs this torch's CUDA 12.6 build, which runs from driver 525."""
    versions = [module.__version__.split("+")[0] for module in (torch, torchvision)]
    return (
        f"pip install torch=={versions[0]} torchvision=={versions[1]} "
        "--index-url https://download.pytorch.org/whl/cu126"
    )


def unusable_gpus():
    """The NVIDIA GPUs that NVML counts (as CUDA_VISIBLE_DEVICES leaves them) but CUDA cannot
    start on, and torch's reason. Under a driver older than the build's CUDA, torch only warns
    and finds no GPU, and the run went on on the CPU."""
    if not torch.version.cuda:
        return 0, ""
    with warnings.catch_warnings(record=True) as caught:  # torch's warning goes in our line
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return 0, ""
    said = [str(w.message).removeprefix("CUDA initialization: ") for w in caught]
    reason = said[-1].split(". ")[0] if said else "most likely their driver is too old for it"
    return torch.cuda.device_count(), reason  # NVML's count, while CUDA has not started


def check_model(name, pretrained):
    """Refuse an unknown model, or weights that are neither its tag nor a file, before
    anything is downloaded."""
    register_tiny_clip()
    if name.startswith("local-dir:"):
        return check_local_dir(name)
    if name.startswith("hf-hub:"):
        return
    config = open_clip.get_model_config(name)
    if config is None:
        raise UsageError(
            f"unknown model {name!r}; pick one of open_clip.list_models(), e.g. ViT-B-32"
        )
    text = config.get("text_cfg", {})
    hugging_face = text.get("hf_model_name") or text.get("hf_tokenizer_name")
    if hugging_face and not importlib.util.find_spec("transformers"):  # SigLIP's tokenizer, say
        raise UserError(
            f"{name}'s text side comes from Hugging Face ({hugging_face}) and needs "
            "transformers: pip install transformers"
        )
    tag = None if pretrained == "none" else pretrained
    # '' (an unset $WEIGHTS, say) too: open_clip would build random weights for it, silently
    if tag is not None and not get_pretrained_cfg(name, tag) and not os.path.isfile(tag):
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        default = " (the default)" if tag == RELEASE_RECIPE["pretrained"] else ""  # maybe untyped
        raise UsageError(
            f"--pretrained {tag!r}{default} is neither a tag of {name} ({known}) nor a file; "
            "pass a tag, a checkpoint path, or 'none'"
        )


def check_local_dir(name):
    """A local-dir: folder must hold open_clip's config and weights: without a weights file,
    open_clip builds random weights and only logs a warning."""
    folder = Path(name.split(":", 1)[1])
    if not folder.is_dir():
        raise UsageError(f"{name}: no such folder")
    if not (folder / "open_clip_config.json").is_file():
        stage = last_stage(folder)
        if stage:
            raise UsageError(
                f"{name}: a continual run's folder; name a stage, e.g. local-dir:{stage}"
            )
        raise UsageError(f"{name}: no open_clip_config.json in it; name a folder a run wrote")
    if not any(any(folder.glob(f"*.{ext}")) for ext in ("safetensors", "bin", "pth")):
        raise UsageError(f"{name}: no weights file (*.safetensors, *.bin or *.pth) in it")


def last_stage(folder):
    """The model a continual run in `folder` ends with: its stage folder k-<task> of highest k."""
    stages = [p.parent for p in folder.glob("*/open_clip_config.json")]
    index = lambda stage: stage.name.split("-")[0]  # noqa: E731
    numbered = [stage for stage in stages if index(stage).isdigit()]
    return max(numbered, key=lambda stage: int(index(stage)), default=None)


@functools.cache  # one load a run, however many zero-shot heads it builds
def tokenizer_of(name):
    """open_clip's tokenizer of `name`. Hugging Face's need transformers, which the
    requirements leave out; check_model says so up front where the config is at hand."""
    try:
        return open_clip.get_tokenizer(name)
    except ImportError as e:
        raise UserError(f"the tokenizer of {name} needs {e.name}: pip install {e.name}") from e


def tap_names(encoder, flag):
    """--taps a,b,c if given, else the tower's default taps; each must name a submodule, once."""
    names = [n.strip() for n in (flag or "").split(",") if n.strip()] or default_tap_names(encoder)
    for name in names:
        if names.count(name) > 1:  # D would average over it once, not weigh it twice
            raise UsageError(f"--taps names {name!r} twice; name each tap once")
        try:
            encoder.get_submodule(name)
        except AttributeError:
            raise UsageError(
                f"--taps: the image tower has no submodule {name!r} (its top-level "
                f"submodules: {submodules(encoder)})"
            ) from None
    return names


@torch.no_grad()
def check_taps_run(encoder, names):
    """Each tap must run in the tower's forward pass, as checked on one blank image: open_clip's
    attention reads out_proj's weights without calling it, so a tap there records nothing."""
    size = encoder.preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    image = torch.zeros(1, 3, height, width, device=next(encoder.parameters()).device)
    training = encoder.training
    with recorded_taps(encoder, names, channels_last(encoder)) as taps:
        encoder.eval()(image)
    encoder.train(training)
    silent = [name for name, output in taps.items() if output is None]
    if silent:
        raise UsageError(
            f"--taps: {', '.join(silent)} never runs in the image tower's forward pass; "
            "tap modules that run, such as its blocks"
        )


def submodules(module):
    return ", ".join(name for name, _ in module.named_children())


# ---------------------------------------------------------------------- tasks and data

HELD_OUT = "train = official train minus a seeded 10% val (at most 20000); test = official test"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    templates: tuple
    epochs: int  # the release's epochs for this task
    load: Callable  # load(root, split, download) -> Dataset of (PIL image, label)
    # In label order, or read from the data as the release does: by a function of the data
    # root, or (None) as the test split's own .classes.
    classnames: tuple | Callable | None = None
    num_classes: int = 0  # 0: len(classnames)
    layout: str = ""  # where the data lives under --data-root ('' for generated data)
    source: str = "generated"  # where to get it; "torchvision...": it downloads by itself
    split_rule: str = HELD_OUT
    recipe: dict = dataclasses.field(default_factory=dict)  # overrides of the release's recipe
    images_digest: str = ""  # of data users edit (folder tasks), for the feature cache's key
    split_sizes: tuple = ()  # (train, val, test) of the whole dataset, when it is fixed
    split_files: Callable | None = None  # root -> the split files there (else a seeded split)

    def __post_init__(self):
        if not self.num_classes:
            object.__setattr__(self, "num_classes", len(self.classnames))

    @property
    def downloads(self):
        return self.source.startswith("torchvision")


def seeded_split(n, split, fractions=None, seed=0):
    """Indices of `split` ('train', 'val' or 'test') in one seeded permutation of n images,
    cut by `fractions` (train, val, rest). Without them, the release's val held out of an
    official train split: `random_split(train, [n - n_val, n_val], Generator().manual_seed(0))`
    with n_val = int(0.1 * n) capped at 20000, so val is the END of the permutation."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if fractions:
        n_train, n_val = round(n * fractions[0]), round(n * fractions[1])
    else:
        n_train = n - min(int(n * 0.1), 20000)
        n_val = n - n_train
    cuts = [0, n_train, n_train + n_val, n]
    k = ("train", "val", "test").index(split)
    return order[cuts[k] : cuts[k + 1]]


def official_split(make, split):
    """train and val from the official train split (make(True)), test from the official test
    split (make(False))."""
    if split == "test":
        return make(False)
    full = make(True)
    return Subset(full, seeded_split(len(full), split))


class Samples(Dataset):
    """(path, label) pairs read as RGB PIL images."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return torchvision.datasets.folder.default_loader(path), label
        # PIL's UnidentifiedImageError is an OSError; its refusal of a huge image is neither
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot decode image {path}: {one_line(e)}; fix or remove it") from e


def image_files(folder):
    """The paths of the images anywhere under `folder`, linked folders too (as ImageFolder
    reads them) but not a link back up to a folder that holds it (ImageFolder walks round
    it until the OS stops it), in pathlib's sorted order, less what is hidden: macOS's ._*
    twins of images are no images, and folders such as .ipynb_checkpoints/ hold none.
    Strings: ImageNet's 1.3M Path objects take seconds."""
    extensions, found = torchvision.datasets.folder.IMG_EXTENSIONS, []
    for parent, folders, files in os.walk(folder, followlinks=True):
        here = os.path.realpath(parent)
        folders[:] = [name for name in folders if name[0] != "." and not holds(name, here)]
        parts = Path(parent).parts  # pathlib sorts paths by their parts
        images = [name for name in files if name.lower().endswith(extensions)]
        found += [(*parts, name) for name in images if name[0] != "."]
    return [os.path.join(*parts) for parts in sorted(found)]


def holds(name, parent):
    """Whether the folder `name` in the real folder `parent` is `parent` or one above it."""
    real = Path(os.path.realpath(os.path.join(parent, name)))
    return real == Path(parent) or real in Path(parent).parents  # commonpath fails across drives


def folder_samples(folder, classes):
    """(path, label) pairs of the images in folder/<class>/, labels by position in `classes`."""
    return [
        (path, label)
        for label, name in enumerate(classes)
        for path in image_files(Path(folder) / name)
    ]


def subfolders(path):
    """The folders in `path`, sorted, less hidden ones such as .ipynb_checkpoints/: no class."""
    return sorted(d.name for d in Path(path).iterdir() if d.is_dir() and d.name[0] != ".")


def require(path):
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found")
    return path


@functools.cache
def warn_once(message):
    if not other_rank():  # once, not once a process
        print(f"ldifs.py: warning: {message}", file=sys.stderr)


def load_eurosat(root, split, download):
    # EuroSAT has no official split, and the release's 21600/2700/2700 files were never
    # published: ours is a seeded 80/10/10 of its 27000 images, of the same sizes.
    full = torchvision.datasets.EuroSAT(root, download=download)
    return Subset(full, seeded_split(len(full), split, (0.8, 0.1, 0.1)))


def load_resisc45(root, split, download):
    # As the release: the split files resisc45-{train,test}.txt (18900 / 6300) are the
    # official splits. Without them, a seeded 60/20/20 of the 31500 images stands in.
    base = Path(root) / "resisc45"
    folder = require(base / "NWPU-RESISC45")
    samples = folder_samples(folder, subfolders(folder))

    def make(train):
        name = "train" if train else "test"
        split_file = resisc45_split_files(root, [name])
        if split_file:
            keep = set(split_file[0].read_text().split())
            return Samples([s for s in samples if Path(s[0]).name in keep])
        warn_once(f"resisc45: no split files in {base}; using a seeded 60/20/20 split instead")
        return Subset(Samples(samples), seeded_split(len(samples), name, (0.6, 0.2, 0.2)))

    return official_split(make, split)


def resisc45_split_files(root, names=("train", "test")):
    """Those of its split files resisc45-{train,test}.txt that are there: the loader reads
    them, the feature cache's key holds them."""
    base = Path(root) / "resisc45"
    return [p for s in names if (p := base / f"resisc45-{s}.txt").exists()]


def resisc45_classes(root):
    # The release's list is the sorted folder names, '_' read as ' '.
    folder = require(Path(root) / "resisc45" / "NWPU-RESISC45")
    return [name.replace("_", " ") for name in subfolders(folder)]


SUN397_PARTITIONS = "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip"


def sun397_classes(root):
    # As the release (folder 'a_apartment_building_outdoor' minus 'a_', '_' read as ' '):
    # '/a/apartment_building/outdoor' -> 'apartment building outdoor'.
    lines = require(Path(root) / "SUN397" / "ClassName.txt").read_text().split()
    return [line[3:].replace("_", " ").replace("/", " ") for line in lines]


def sun397_partition(base, name):
    """Partitions.zip's file `name` (e.g. Training_01.txt), wherever it was unpacked."""
    return next((p for p in (base / name, base / "Partitions" / name) if p.exists()), None)


def sun397_partition_1(root):
    """The files of partition 1 that are there: Training_01.txt, Testing_01.txt."""
    base = Path(root) / "SUN397"
    return [p for s in ("Training", "Testing") if (p := sun397_partition(base, f"{s}_01.txt"))]


def load_sun397(root, split, download):
    # This literature's split: the official partition 1 (Training_01 / Testing_01).
    base = Path(root) / "SUN397"
    if download:
        torchvision.datasets.SUN397(root, download=True)
        if not sun397_partition(base, "Training_01.txt"):
            torchvision.datasets.utils.download_and_extract_archive(SUN397_PARTITIONS, base)
    lines = require(base / "ClassName.txt").read_text().split()
    label = {line: i for i, line in enumerate(lines)}  # '/a/abbey' -> 0
    parts = sun397_partition_1(root)
    if len(parts) == 2:
        files = [part.read_text().split() for part in parts]
        sample = lambda f: (str(base / f.lstrip("/")), label[f.rsplit("/", 1)[0]])  # noqa: E731
        return official_split(lambda train: Samples(list(map(sample, files[1 - train]))), split)
    warn_once(
        f"sun397: no partition files in {base} (get {SUN397_PARTITIONS}); using a seeded "
        "80/10/10 split of all images instead, not comparable with the paper"
    )
    paths = sorted(base.rglob("sun_*.jpg"))
    samples = [(str(f), label["/" + "/".join(f.relative_to(base).parts[:-1])]) for f in paths]
    return Subset(Samples(samples), seeded_split(len(samples), split, (0.8, 0.1, 0.1)))


def load_imagenet(root, split, download):
    # Read from folders the user places; the official val split is our test split. The images
    # and labels of the release's ImageFolder, in its order, less hidden files (a bug fix).
    base = Path(root) / "imagenet"

    def make(train):
        folder = require(base / ("train" if train else "val"))
        return Samples(folder_samples(folder, subfolders(folder)))

    return official_split(make, split)


def torchvision_loader(name, train_kwargs, test_kwargs, subdir=""):
    """A loader for a torchvision dataset with an official train/test split."""

    def load(root, split, download):
        cls, path = getattr(torchvision.datasets, name), os.path.join(root, subdir)
        kwargs = lambda train: train_kwargs if train else test_kwargs  # noqa: E731
        return official_split(lambda train: cls(path, **kwargs(train), download=download), split)

    return load


def class_names(task, root):
    """The task's class names in label order, read from the data where the task says so."""
    if isinstance(task.classnames, tuple):
        return task.classnames
    read = task.classnames or (lambda root: task.load(root, "test", False).classes)
    try:
        return tuple(read(os.path.expanduser(root)))
    except (OSError, RuntimeError, ImportError) as e:
        raise data_missing(task, root, e, download=False) from e


def get_dataset(task, split, root, transform=None, download=True):
    """The (image, label) pairs of `task`'s `split` ('train', 'val' or 'test'), read from (or
    downloaded into) `root`. Raises DataMissing, a one-line message, when the data is not
    there and cannot be fetched."""
    task = get_task(task) if isinstance(task, str) else task
    root = os.path.expanduser(root)
    fetch = download and task.downloads
    try:
        with fetching(task, root) if fetch else contextlib.nullcontext():
            data = task.load(root, split, fetch)
    except (OSError, RuntimeError, ImportError) as e:
        raise data_missing(task, root, e, download) from e
    if in_part(task, split, len(data)):  # torchvision checks only that a folder exists
        fix = "unpacked in part? delete it to download it again"
        if not task.downloads:
            fix = f"copied in part? get it again from {task.source}"
        whole = whole_split(task, split)
        warn_once(
            f"{task.name}: {len(data)} {split} images in {root}, not the dataset's {whole}: {fix}"
        )
    return Transformed(data, transform) if transform else data


def whole_split(task, split):
    """The number of images in `split` of the whole dataset, where it is fixed (else None)."""
    return dict(zip(("train", "val", "test"), task.split_sizes, strict=False)).get(split)


def in_part(task, split, size):
    """Whether `size` images are not the whole dataset's `split`, where its size is fixed."""
    return whole_split(task, split) not in (None, size)


def fetching(task, root):
    """One process at a time fetches a task into `root`: runs started together (a sweep over
    --lam) downloaded into one file at once, and read folders another was still unpacking."""
    os.makedirs(root, exist_ok=True)
    waiting = f"{task.name}: waiting for another process to fetch it into {root}"
    return locked(Path(root) / f".{task.name}.lock", functools.partial(warn_once, waiting))


def data_missing(task, root, error, download):
    # torchvision's Stanford Cars says so in a RuntimeError; "scipy" in a path says nothing.
    scipy = isinstance(error, ImportError) and (error.name or "").startswith("scipy")
    if scipy or str(error).startswith("Scipy is not found"):
        return DataMissing(
            f"task {task.name!r} needs scipy to read its .mat files: pip install scipy"
        )
    if not task.downloads:
        how = "it is not downloaded automatically"
    else:
        how = "it could not be downloaded" if download else "--no-download is set"
    # torchvision's "You can use download=True..." is for its Python API; our line names flags
    reason = re.sub(r"\s*You \w+ \w+ download=True.*", "", one_line(error))
    return DataMissing(
        f"task {task.name!r}: no data at {os.path.join(root, task.layout)} and {how} "
        f"({reason}); get it from {task.source}, or set --data-root"
    )


@functools.cache
def get_task(name):
    """The built-in task `name`, in any case (EuroSAT, as the paper writes it), or a
    folder:PATH task."""
    if name.lower() in TASKS:
        return TASKS[name.lower()]
    if name.startswith("folder:"):
        return folder_task(name)
    raise UsageError(f"unknown task {name!r}; choose from {', '.join(TASKS)}, or folder:PATH")


def folder_task(name):
    """--task folder:PATH: your images in ImageFolder layout, PATH/{train,test}/<class>/* and
    optionally PATH/val/<class>/* (else val is held out of train as for every task). Class
    names are the train folders' names, sorted as ImageFolder does, '_' read as ' '."""
    path = name.split(":", 1)[1]
    if not path:  # folder:$DATA with DATA unset: not the current folder
        raise UsageError("nothing after folder:; e.g. folder:~/data/leaves")
    root = Path(path).expanduser().resolve()
    classes = image_folder_classes(root)
    names = tuple(c.replace("_", " ") for c in classes)
    load = lambda _, split, download: load_folder(root, classes, split)  # noqa: E731
    return Task(
        name=f"folder:{root}",
        classnames=names,
        templates=PHOTO_TEMPLATES,
        epochs=10,
        load=load,
        layout=str(root),
        source="your folder",
        images_digest=files_digest(image_files(root)),
    )


def image_folder_classes(root):
    """The class folders of a folder:PATH task, after checking its layout."""
    where = f"folder:{root}"
    if not root.is_dir():
        raise UsageError(f"{where}: no such folder")
    missing = [s + "/" for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise UsageError(
            f"{where}: no {' or '.join(missing)} folder; expected {root}/train/"
            f"<class>/* and {root}/test/<class>/* (ImageFolder layout)"
        )
    splits = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    classes, images = subfolders(root / "train"), dict.fromkeys(splits, 0)
    for split in images:
        for name in subfolders(root / split):
            if name not in classes:
                raise UsageError(f"{where}: class {name!r} is in {split}/ but not in train/")
            folder = root / split / name
            count = len(image_files(folder))
            if not count:
                kinds = ", ".join(torchvision.datasets.folder.IMG_EXTENSIONS)
                raise UsageError(f"{where}: class folder {folder} holds no images ({kinds} files)")
            images[split] += count
    if not classes:
        raise UsageError(f"{where}: no images; put them in {root}/train/<class>/")
    if len(classes) == 1:  # every head is right on one class: 100% having learnt nothing
        raise UsageError(
            f"{where}: one class ({classes[0]}) in train/; sort the images into train/<class>/"
        )
    for split, count in images.items():  # train's count is not 0: it has classes
        if not count:
            raise UsageError(f"{where}: {split}/ holds no images in train/'s class folders")
    if not (root / "val").is_dir() and not seeded_split(images["train"], "val"):  # probes need it
        raise UsageError(
            f"{where}: {images['train']} images in train/ hold out no validation images (10%, "
            "rounded down); add images or a val/ folder"
        )
    return classes


def load_folder(root, classes, split):
    if (root / "val").is_dir() or split == "test":
        return Samples(folder_samples(root / split, classes))
    return official_split(lambda train: Samples(folder_samples(root / "train", classes)), split)


def file_safe(name):
    """`name` as part of a file name: a built-in task's as it is; a folder:PATH task's as
    folder-<its last folder>-<hash of PATH>, so no path reaches a file name raw."""
    if name in TASKS:
        return name
    tail = re.sub(r"[^\w.-]+", "_", Path(name.split(":", 1)[-1]).name).strip("._") or "data"
    return f"folder-{tail}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


SYNTHETIC_COLOURS = dict(red=(220, 50, 50), green=(50, 190, 70), blue=(60, 80, 230))
SYNTHETIC_COLOURS.update(yellow=(230, 210, 60), purple=(150, 60, 200), orange=(240, 140, 40))
SYNTHETIC_STRIPES = ("horizontal", "vertical", "diagonal", "anti-diagonal")
SYNTHETIC_SIZES = {"train": 2400, "val": 240, "test": 600}


class SyntheticImages(Dataset):
    """Procedural 64x64 images of a striped square on a noisy background. Each image has two
    independent concepts, the square's colour and its stripes' orientation; `concept` says
    which one is the label. Image i of a split is the same in every run and process."""

    def __init__(self, concept, split, size=64):
        self.concept, self.split, self.size = concept, split, size
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        self.grid = (xs.float(), ys.float())

    def __len__(self):
        return SYNTHETIC_SIZES[self.split]

    def __getitem__(self, i):
        split_seed = {"train": 0, "val": 1, "test": 2}[self.split]
        g = torch.Generator().manual_seed(1_000_003 * split_seed + i)
        colour = int(torch.randint(len(SYNTHETIC_COLOURS), (), generator=g))
        stripes = int(torch.randint(len(SYNTHETIC_STRIPES), (), generator=g))
        image = self.draw(colour, stripes, g)
        return Image.fromarray(image.numpy()), colour if self.concept == "colour" else stripes

    def draw(self, colour, stripes, g):
        xs, ys = self.grid
        angle = math.pi / 4 * [0, 2, 1, 3][stripes]
        period = 6 + 4 * float(torch.rand((), generator=g))
        wave = torch.sin((xs * math.sin(angle) + ys * math.cos(angle)) * 2 * math.pi / period)
        side = int(self.size * (0.5 + 0.3 * float(torch.rand((), generator=g))))
        x0, y0 = (int(v) for v in torch.randint(self.size - side + 1, (2,), generator=g))
        inside = (xs >= x0) & (xs < x0 + side) & (ys >= y0) & (ys < y0 + side)
        rgb = torch.tensor(list(SYNTHETIC_COLOURS.values())[colour]).float()
        square = rgb * (0.6 + 0.4 * (wave > 0).float())[..., None]
        image = 110 + 40 * torch.rand(self.size, self.size, 3, generator=g)
        return torch.where(inside[..., None], square, image).clamp(0, 255).to(torch.uint8)


def synthetic_loader(concept):
    return lambda root, split, download: SyntheticImages(concept, split)


PHOTO_TEMPLATES = tuple(
    f"a {adj}photo of {art} {{}}."
    for art in ("a", "the")
    for adj in (
        "",
        "blurry ",
        "black and white ",
        "low contrast ",
        "high contrast ",
        "bad ",
        "good ",
    )
) + tuple(f"a photo of {art} {size} {{}}." for art in ("a", "the") for size in ("small", "big"))
DIGIT_TEMPLATES = ('a photo of the number: "{}".',)
SATELLITE_TEMPLATES = tuple(
    f"{kind} {view} of {art}{{}}."
    for art in ("", "a ", "the ")
    for view in ("imagery", "photo", "view")
    for kind in ("satellite", "aerial")
)
CARS_TEMPLATES = (  # task_vectors' cars_template
    *(f"a photo of {w} {{}}." for w in ("a", "the", "my")),
    "i love my {}!",
    *(f"a photo of my {w} {{}}." for w in ("dirty", "clean", "new", "old")),
)
DTD_TEMPLATES = tuple(
    f"a photo of {art} {{}} {kind}."
    for art in ("a", "the")
    for kind in ("texture", "pattern", "thing", "object")
)
EUROSAT_TEMPLATES = tuple(f"a centered satellite photo of {art}{{}}." for art in ("", "a ", "the "))
GTSRB_TEMPLATES = tuple(
    f'a {kind} photo of a "{{}}" traffic sign.' for kind in ("zoomed in", "centered", "close up")
)
EUROSAT_CLASSES = tuple(  # torchvision's sorted folders AnnualCrop .. SeaLake, as CLIP names them
    "annual crop land; forest; brushland or shrubland; highway or road; industrial buildings or "
    "commercial buildings; pasture land; permanent crop land; residential buildings or homes or "
    "apartments; river; lake or sea".split("; ")
)
GTSRB_CLASSES = tuple(  # the CLIP paper's descriptive names, in class-id order 0..42
    (
        "red and white circle 20 kph speed limit; red and white circle 30 kph speed limit; red "
        "and white circle 50 kph speed limit; red and white circle 60 kph speed limit; red and "
        "white circle 70 kph speed limit; red and white circle 80 kph speed limit; end / "
        "de-restriction of 80 kph speed limit; red and white circle 100 kph speed limit; red and "
        "white circle 120 kph speed limit; red and white circle red car and black car no passing; "
        "red and white circle red truck and black car no passing; red and white triangle road "
        "intersection warning; white and yellow diamond priority road; red and white upside down "
        "triangle yield right-of-way; stop; empty red and white circle; red and white circle no "
        "truck entry; red circle with white horizonal stripe no entry; red and white triangle "
        "with exclamation mark warning; red and white triangle with black left curve approaching "
        "warning; red and white triangle with black right curve approaching warning; red and "
        "white triangle with black double curve approaching warning; red and white triangle rough "
        "/ bumpy road warning; red and white triangle car skidding / slipping warning; red and "
        "white triangle with merging / narrow lanes warning; red and white triangle with person "
        "digging / construction / road work warning; red and white triangle with traffic light "
        "approaching warning; red and white triangle with person walking warning; red and white "
        "triangle with child and person walking warning; red and white triangle with bicyle "
        "warning; red and white triangle with snowflake / ice warning; red and white triangle "
        "with deer warning; white circle with gray strike bar no speed limit; blue circle with "
        "white right turn arrow mandatory; blue circle with white left turn arrow mandatory; blue "
        "circle with white forward arrow mandatory; blue circle with white forward or right turn "
        "arrow mandatory; blue circle with white forward or left turn arrow mandatory; blue "
        "circle with white keep right arrow mandatory; blue circle with white keep left arrow "
        "mandatory; blue circle with white arrows indicating a traffic circle; white circle with "
        "gray strike bar indicating no passing for cars has ended; white circle with gray strike "
        "bar indicating no passing for trucks has ended"
    ).split("; ")
)
TINY_RECIPE = dict(model=TINY_CLIP, pretrained="none", lr=1e-3, warmup=10, batch_size=64)
TINY_RECIPE["eval_tasks"] = "synthetic,synthetic-stripes"
TV_TRAIN_TEST = ({"train": True}, {"train": False})
TV_SPLITS = ({"split": "train"}, {"split": "test"})
# As the release: partition 1's `train` alone is the official train split (`val` unused).
DTD_SPLITS = ({"split": "train", "partition": 1}, {"split": "test", "partition": 1})
TASKS = {
    t.name: t
    for t in [
        Task(
            name="cars",
            num_classes=196,
            templates=CARS_TEMPLATES,
            epochs=35,
            load=torchvision_loader("StanfordCars", *TV_SPLITS),
            layout="stanford_cars/{cars_train,cars_test,devkit,cars_test_annos_withlabels.mat}",
            source="a mirror, by hand (torchvision's URL is dead), e.g. Kaggle's Stanford Cars",
            split_sizes=(7330, 814, 8041),
        ),
        Task(
            name="cifar10",
            classnames=tuple("airplane automobile bird cat deer dog frog horse ship truck".split()),
            templates=PHOTO_TEMPLATES,
            epochs=10,
            load=torchvision_loader("CIFAR10", *TV_TRAIN_TEST),
            layout="cifar-10-batches-py/",
            source="torchvision.datasets.CIFAR10",
            split_sizes=(45000, 5000, 10000),
        ),
        Task(
            name="cifar100",
            num_classes=100,
            templates=PHOTO_TEMPLATES,
            epochs=10,
            load=torchvision_loader("CIFAR100", *TV_TRAIN_TEST),
            layout="cifar-100-python/",
            source="torchvision.datasets.CIFAR100",
            split_sizes=(45000, 5000, 10000),
        ),
        Task(
            name="dtd",
            num_classes=47,
            templates=DTD_TEMPLATES,
            epochs=76,
            load=torchvision_loader("DTD", *DTD_SPLITS),
            layout="dtd/dtd/{images/<class>/*.jpg,labels/}",
            source="torchvision.datasets.DTD",
            split_rule="partition 1: train minus a seeded 10% val; test = test",
            split_sizes=(1692, 188, 1880),
        ),
        Task(
            name="eurosat",
            classnames=EUROSAT_CLASSES,
            templates=EUROSAT_TEMPLATES,
            epochs=12,
            load=load_eurosat,
            layout="eurosat/2750/<class>/*.jpg",
            source="torchvision.datasets.EuroSAT",
            split_rule="seeded 80/10/10: 21600 / 2700 / 2700 (the release's split is unpublished)",
            split_sizes=(21600, 2700, 2700),
        ),
        Task(
            name="gtsrb",
            classnames=GTSRB_CLASSES,
            templates=GTSRB_TEMPLATES,
            epochs=11,
            load=torchvision_loader("GTSRB", *TV_SPLITS),
            layout="gtsrb/GTSRB/{Training,Final_Test}/",
            source="torchvision.datasets.GTSRB",
            split_sizes=(23976, 2664, 12630),
        ),
        Task(
            name="imagenet",
            classnames=tuple(open_clip.IMAGENET_CLASSNAMES),
            templates=tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES),
            epochs=10,
            load=load_imagenet,
            layout="imagenet/{train,val}/<wnid>/*.JPEG",
            source="image-net.org, by hand (ILSVRC2012), val sorted into wnid folders",
            split_sizes=(1261167, 20000, 50000),
        ),
        Task(
            name="mnist",
            classnames=tuple("0123456789"),
            templates=DIGIT_TEMPLATES,
            epochs=10,
            load=torchvision_loader("MNIST", *TV_TRAIN_TEST),
            layout="MNIST/raw/",
            source="torchvision.datasets.MNIST",
            split_sizes=(54000, 6000, 10000),
        ),
        Task(
            name="resisc45",
            classnames=resisc45_classes,
            num_classes=45,
            templates=SATELLITE_TEMPLATES,
            epochs=15,
            load=load_resisc45,
            split_files=resisc45_split_files,
            layout="resisc45/NWPU-RESISC45/<class>/*.jpg (+ resisc45-{train,test}.txt)",
            source="NWPU-RESISC45, by hand (e.g. via torchgeo), with the standard split files",
            split_rule="train file minus a seeded 10% val; test file (else seeded 60/20/20)",
            split_sizes=(17010, 1890, 6300),  # with the split files or without
        ),
        Task(
            name="sun397",
            classnames=sun397_classes,
            num_classes=397,
            epochs=14,
            load=load_sun397,
            split_files=sun397_partition_1,
            templates=("a photo of a {}.", "a photo of the {}."),
            layout="SUN397/{ClassName.txt,Training_01.txt,Testing_01.txt,<letter>/<class>/*.jpg}",
            source="torchvision.datasets.SUN397 (37 GB) and Partitions.zip",
            split_rule="partition 1: train minus a seeded 10% val; test (else seeded 80/10/10)",
        ),
        Task(
            name="svhn",
            classnames=tuple("0123456789"),
            templates=DIGIT_TEMPLATES,
            epochs=10,
            load=torchvision_loader("SVHN", *TV_SPLITS, subdir="svhn"),
            layout="svhn/{train,test}_32x32.mat",
            source="torchvision.datasets.SVHN",
            split_sizes=(65932, 7325, 26032),
        ),
        Task(
            name="synthetic",
            classnames=tuple(SYNTHETIC_COLOURS),
            epochs=3,
            recipe=TINY_RECIPE,
            templates=("a photo of a {} square.",),
            load=synthetic_loader("colour"),
            split_rule="fixed seeds per split: 2400 / 240 / 600",
        ),
        Task(
            name="synthetic-stripes",
            classnames=tuple(f"{s} stripes" for s in SYNTHETIC_STRIPES),
            templates=("a photo of {}.",),
            epochs=3,
            load=synthetic_loader("stripes"),
            recipe=TINY_RECIPE,
            split_rule="fixed seeds per split: 2400 / 240 / 600",
        ),
    ]
}


# ------------------------------------------------------------------------- checkpoints

RUN_FLAGS = "lam l2sp label_smoothing reference model pretrained head seed batch_size lr wd warmup"
RUN_FLAGS = RUN_FLAGS.split() + ["grad_clip"]


def run_config(stage, args):
    """What a resumed stage must share with its checkpoint: these flags, and the task,
    length and taps the stage derived from them."""
    derived = {"task": stage.task.name, "epochs": stage.epochs, "total_steps": stage.total_steps}
    return {**{k: getattr(args, k) for k in RUN_FLAGS}, **derived, "taps": list(stage.taps)}


def is_checkpoint_step(step, n, stage, args):
    epoch_end = step % (n // args.batch_size) == 0
    periodic = args.save_every and step % args.save_every == 0
    return epoch_end or periodic or step == stage.total_steps


def save_checkpoint(classifier, optimizer, init_head, step, stage, args):
    """Everything a bitwise-identical resume needs, as state dicts and plain values only."""
    if stage.rank != 0:
        return
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    checkpoint = dict(model=classifier.state_dict(), optimizer=optimizer.state_dict(), step=step)
    rng = {"cpu": torch.get_rng_state(), "cuda": cuda}
    checkpoint.update(init_head=init_head, config=run_config(stage, args), rng=rng)
    atomic_save(checkpoint, stage.out / "checkpoint.pt")


def load_checkpoint(stage, args):
    """The stage's checkpoint for --resume, after checking it belongs to this run."""
    path = stage.out / "checkpoint.pt"
    try:
        checkpoint = torch.load(path, map_location=args.device, weights_only=True)
        saved = checkpoint["config"]
    except Exception as e:  # truncated, corrupt or not ours
        raise UserError(
            f"cannot read checkpoint {path}: {one_line(e)}; delete it to start over"
        ) from e
    check_same_run(saved, "checkpoint", stage, args)
    return checkpoint


def check_same_run(saved, source, stage, args):
    """--resume must continue the run it finds: `saved`, the run_config its `source` recorded."""
    ours = run_config(stage, args)
    changed = [
        f"{flag_name(k)} {v} ({source}: {saved.get(k)})"
        for k, v in ours.items()
        if saved.get(k) != v
    ]
    if changed:
        raise UsageError(
            f"--resume with settings that differ from the {source}'s: {', '.join(changed)}"
        )


def flag_name(key):
    if key == "total_steps":
        return "total steps (from --epochs, --max-steps)"
    return "--" + key.replace("_", "-")


def restore(checkpoint, classifier, optimizer, stage):
    """Load a checkpoint into the model and optimizer, restore the RNG, and drop the log lines
    written after it (the resumed run writes them again); return the step and initial head."""
    classifier.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["cpu"].cpu())
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():  # GPUs not here are dropped
        states = checkpoint["rng"]["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([state.cpu() for state in states])
    log = stage.out / "log.jsonl"
    if log.exists() and stage.rank == 0:
        lines = log.read_text().splitlines()
        kept = [line for line in lines if logged_step(line) <= checkpoint["step"]]
        atomic_write(log, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
    return checkpoint["step"], checkpoint["init_head"]


def logged_step(line):
    """A log line's step, or infinity for a line cut short (by a full disk, say): written
    after the last checkpoint, it is dropped, and the resumed run writes it again."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return json.loads(line)["step"]
    return math.inf


def run_files_in(out):
    """The checkpoints and metrics of a run, or of its stages, in `out`: a finished run whose
    checkpoints were deleted to save space is still a run."""
    names = ("checkpoint.pt", "metrics.json", "*/checkpoint.pt", "*/metrics.json")
    return [path for name in names for path in out.glob(name)]


def check_out(tasks, args):
    """Without --resume, never overwrite a run; with it, there must be one, of these tasks."""
    check_writable(args.out, f"--out {args.out}")
    found = run_files_in(args.out)
    if args.resume and not found:
        raise UsageError(f"--resume: no run in {args.out}; run without --resume to start")
    ours = [path for path in found if part_of_run(path, tasks, args)]
    if not args.resume and ours:
        raise UsageError(
            f"{args.out} already holds a run; to continue it, pass --resume with the flags it "
            "was run with; else choose another --out"
        )
    other = sorted({p.relative_to(args.out).parts[0] for p in found if p not in ours})
    if other:  # such as --out runs, the folder of the default --out's
        hint = "pass the --task it was run with, or " if args.resume else ""
        raise UsageError(
            f"{args.out} holds another run ({', '.join(other)}); {hint}choose another --out"
        )


def holding(out):
    """Hold --out while this process works in it: the same command started twice (in another
    terminal, or a requeued job whose first copy still runs) would train over one run's
    files."""
    out.mkdir(parents=True, exist_ok=True)
    return locked(out / ".lock", functools.partial(in_use, out))


def in_use(out):
    raise UsageError(
        f"{out} is in use by another ldifs.py; wait for it to end, or choose another --out"
    )


@contextlib.contextmanager
def locked(path, when_held):
    """Hold a POSIX lock on the file `path` for the block: the OS lets go when the process
    ends, however it ends, and forked loader workers do not inherit it. If another process
    holds it, when_held() raises (to refuse) or returns (to wait). Where there are no such
    locks (Windows, a network file system without them), or where `path` cannot be written
    (a data folder this user may only read), the block runs unlocked."""
    with contextlib.ExitStack() as held:
        with contextlib.suppress(ImportError, OSError):
            import fcntl

            file = held.enter_context(open(path, "a"))
            try:
                fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held
                when_held()
                fcntl.lockf(file, fcntl.LOCK_EX)
        yield


RUN_FILES = "checkpoint.pt log.jsonl metrics.json head.pt open_clip_pytorch_model.bin"
RUN_FILES = (*RUN_FILES.split(), "open_clip_config.json")


def delete_killed_writes(out):
    """Delete what `atomic_write`s killed midway (SIGKILL, the OOM killer: no `finally` runs)
    left in `out` and its stages' folders, each temporary file as big as the file it wrote.
    Called holding --out: no other run writes there."""
    for path in [*out.glob("*.tmp"), *out.glob("*/*.tmp")]:
        # atomic_write's name.<host>-<pid>.tmp, or an older ldifs.py's name.<pid>.tmp
        ours = re.fullmatch(r"(.+)\.(\w*-)?\d+\.tmp", path.name)
        if ours and ours[1] in RUN_FILES:
            path.unlink(missing_ok=True)


def delete_dead_writes(folder):
    """Delete what `atomic_write`s of processes on this machine that were killed midway left
    in a shared `folder`, such as the feature cache: 2.6 GB each for ViT-B/32 on ImageNet.
    The writes of other machines that share it are left alone: they may still run."""
    if os.name != "posix":  # Windows' os.kill(pid, 0) would end the process
        return
    for path in folder.glob(f"*.{HOST}-*.tmp"):
        pid = path.name.removesuffix(".tmp").rsplit("-", 1)[1]
        if pid.isdigit() and not running(int(pid)):
            path.unlink(missing_ok=True)


def running(pid):
    """Whether process `pid` runs on this machine: signal 0 sends nothing, only checks."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def check_writable(folder, what):
    """Refuse, before the work, a `folder` that cannot be made or written in: the first of it
    and its parents that exists is a file, or this user cannot write in it (no permission, a
    read-only mount). The write that ends the work would fail."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise UsageError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what}: cannot write in {existing}")


def part_of_run(path, tasks, args):
    """Whether a run file in --out belongs to this run: to one of its stages or, for a
    continual run, to the summary of a sequence that this one repeats or extends."""
    if len(tasks) == 1:
        return path.parent == args.out
    names = [task.name for task in tasks]
    if path == args.out / "metrics.json":
        recorded = read_metrics(args.out).get("tasks")
        return recorded is not None and names[: len(recorded)] == recorded
    return path.parent.name in [stage_folder(k, name) for k, name in enumerate(names)]


def save_outputs(clip, classifier, classnames, init_head, metrics, stage, args):
    """Write what a user keeps: the CLIP weights, whose clip.visual is the classifier's
    fine-tuned encoder, as an open_clip checkpoint (loadable with create_model(name,
    pretrained=path) or create_model('local-dir:' + out)), the head with its initial value
    (WiSE-FT mixes both), and metrics.json."""
    atomic_save(clip.state_dict(), stage.out / "open_clip_pytorch_model.bin")
    head = {k: v.detach().cpu() for k, v in classifier.head.state_dict().items()}
    init = {f"init_{k}": v.cpu() for k, v in init_head.items()}
    atomic_save({**head, **init, "classnames": list(classnames)}, stage.out / "head.pt")
    config = open_clip.get_model_config(args.model)
    if config is not None:
        quick_gelu = needs_quick_gelu(args.model, args.pretrained)
        config["quick_gelu"] = config.get("quick_gelu") or quick_gelu
        both = {"model_cfg": config, "preprocess_cfg": clip.visual.preprocess_cfg}
        write_json(both, stage.out / "open_clip_config.json")
    write_json(metrics, stage.out / "metrics.json")


def write_json(obj, path):
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


HOST = re.sub(r"\W", "_", socket.gethostname())  # in temporary files' names, with the pid


def atomic_write(path, write):
    """write(tmp), then rename tmp to path: a killed run keeps the old file, never half of one,
    and so does a machine that loses power, as tmp is on the disk before the rename."""
    tmp = path.with_name(f"{path.name}.{HOST}-{os.getpid()}.tmp")  # ranks, machines may race
    try:
        write(tmp)
        with open(tmp, "rb+") as written:  # else the rename can reach the disk before the data
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after Ctrl-C or a full disk: it is as big as a checkpoint


def read_metrics(out):
    return read_json_object(out / "metrics.json")


def read_json_object(path):
    """The JSON object in `path`, {} if there is no such file, or one line if it holds none."""
    try:
        value = json.loads(path.read_text()) if path.exists() else {}
    except ValueError as e:  # a run copied in part, or edited by hand
        raise UserError(f"cannot read {path}: {one_line(e)}; fix or delete it") from e
    if not isinstance(value, dict):  # valid JSON, but no fields to read: [], null
        raise UserError(f"cannot read {path}: not a JSON object; fix or delete it")
    return value


def load_finished_stage(clip, stage, args):
    """A stage that already finished: its encoder into clip.visual, and its head."""
    check_same_run(read_metrics(stage.out), "metrics.json", stage, args)
    load = functools.partial(torch.load, map_location=args.device, weights_only=True)
    try:
        clip.load_state_dict(load(stage.out / "open_clip_pytorch_model.bin"))
        head = load_head(stage.out / "head.pt", load)
    except Exception as e:  # missing, truncated or corrupt: a run copied in part
        raise UserError(
            f"cannot load the finished run in {stage.out}: {one_line(e)}; copy it again"
        ) from e
    done = f"already finished in {stage.out}; loaded it"
    if stage.rank == 0 and len(stage.sequence) > 1:
        print(f"{stage.task.name}: stage {stage.index} {done}")
    elif stage.rank == 0:  # nothing is left to run, not even a new --eval-tasks
        more = f"python eval.py {stage.out} --tasks a,b measures it on other eval tasks"
        print(f"{stage.task.name}: {done} ({more})")
    return linear_head(head["weight"], head["bias"])


def load_head(path, load):
    """A run's head.pt, as `save_outputs` writes it (eval.py's WiSE-FT reads init_*)."""
    head = load(path)
    keys = ("weight", "bias", "init_weight", "init_bias")
    missing = [k for k in keys if not isinstance(head, dict) or k not in head]
    if missing:
        raise ValueError(f"{path.name} holds no {', '.join(missing)}")
    return head


# ---------------------------------------------------------------------- the command line


class UserError(Exception):
    """A problem the user can fix; main prints it as one line, without a traceback."""


class UsageError(UserError):
    """A bad flag or argument: exit status 2, as argparse uses."""


class DataMissing(UserError):
    pass


@contextlib.contextmanager
def one_line_errors(prog, after_interrupt=lambda: ""):
    """End the program on a UserError, an OSError such as a full disk or an unwritable --out,
    running out of GPU memory, or a data-loading worker the OS killed, with one line and no
    traceback: exit 2 for bad usage, else 1;
    on Ctrl-C (or SIGTERM, which ldifs.py's main turns into one), 130, with what
    `after_interrupt()` returns said after "interrupted"."""
    try:
        yield
    except KeyboardInterrupt:  # files are written atomically: none is half-written
        if not other_rank():  # torchrun stops the others when one rank fails: not their line
            print(f"{prog}: interrupted{after_interrupt()}", file=sys.stderr)
        sys.exit(130)
    except torch.OutOfMemoryError as e:
        # --resume refuses another --batch-size: it changes the schedule the checkpoint is on
        hint = "lower --batch-size (in a new run) or --eval-batch-size (then --resume)"
        print(f"{prog}: error: {one_line(e)}; {hint}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # OutOfMemoryError is one: it comes first
        if not str(e).startswith("DataLoader worker"):  # killed by the OOM killer, a full shm
            raise
        hint = "lower --workers, or give them more memory (Docker: --shm-size)"
        print(f"{prog}: error: {one_line(e).strip()}; {hint}", file=sys.stderr)
        sys.exit(1)
    except (UserError, OSError) as e:
        message = str(e)
        if "Original Traceback" in message:  # re-raised by a DataLoader worker: ours is last
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)


def one_line(error, limit=200):
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


DATA_ROOT = os.environ.get("LDIFS_DATA") or "~/data"  # set but empty: as unset
CACHE_DIR = os.environ.get("LDIFS_CACHE") or "~/.cache/ldifs"
# The cores this process may use; macOS has no sched_getaffinity.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
WORKERS = min(8, CORES or 1)
DEFAULT_EVAL_TASKS = "cifar10,cifar100,mnist,svhn,gtsrb,dtd,eurosat"  # torchvision downloads them
RELEASE_RECIPE = dict(model="ViT-B-32", pretrained="openai", lr=1e-5, warmup=500, batch_size=128)
RELEASE_RECIPE["eval_tasks"] = DEFAULT_EVAL_TASKS


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, description):
        super().__init__(description=description, formatter_class=DefaultsHelpFormatter)

    def error(self, message):  # one line, not argparse's usage block; exit 2 as argparse does
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except None, '', [] and booleans: an unset flag's
    value comes from the task's recipe, shown in [..], and --no-download's True would mislead."""

    def _get_help_string(self, action):
        silent = action.default in (None, "", []) or isinstance(action.default, bool)
        return action.help if silent else super()._get_help_string(action)


def parse_args(argv=None):
    about = "Fine-tune CLIP with LDIFS and measure concept forgetting. [..]: the task's recipe."
    p = ArgumentParser(about)
    add = p.add_argument
    add("--task", default="eurosat", help="a task, a,b,c for a continual run, or folder:PATH")
    add("--lam", type=weight, default=10.0, help="weight of the LDIFS distance; 0: plain FT")
    add("--l2sp", type=weight, default=0.0, help="L2-SP baseline weight (the release uses 0.5)")
    add("--label-smoothing", type=weight, default=0.0, help="label-smoothing baseline's epsilon")
    ref = "continual runs: reference for task k = the encoder after task k-1, or the original"
    add("--reference", choices=["previous", "pretrained"], default="previous", help=ref)
    model = "open_clip model, hf-hub:org/repo or local-dir:PATH [ViT-B-32]"
    add("--model", type=model_name, help=model)
    add("--pretrained", help="open_clip tag, checkpoint path, or 'none' [openai]")
    taps = "comma-separated tower submodules LDIFS compares [the tower's default]"
    add("--taps", type=tap_list, help=taps)
    add("--head", choices=["lp", "zs"], default="lp", help="head init: linear probe or zero-shot")
    add("--templates", type=user_path, help="prompt templates file, one a line with {} [task's]")
    where = "where data is read and downloaded ($LDIFS_DATA)"
    add("--data-root", type=user_path, default=DATA_ROOT, help=where)
    add("--out", type=user_path, help="run directory [runs/<task>-lam<lam>[-l2sp<a>][-ls<e>]]")
    add("--epochs", type=int, help="training epochs per task [the release's for each task]")
    add("--max-steps", type=int, help="stop after this many optimizer steps")
    add("--batch-size", type=int, help="global batch size [128]")
    add("--lr", type=float, help="peak AdamW learning rate [1e-5]")
    add("--wd", type=float, default=0.1, help="AdamW weight decay")
    add("--warmup", type=int, help="linear warm-up steps before the cosine decay [500]")
    add("--grad-clip", type=float, default=1.0, help="gradient-norm clip")
    add("--seed", type=int, default=0, help="seed for init, data order and augmentation")
    add("--device", type=pick_device, default="", help="torch device [cuda if available, else cpu]")
    add("--workers", type=int, default=WORKERS, help="data-loading worker processes")
    add("--eval-batch-size", type=int, default=256, help="batch size for feature extraction")
    add("--log-every", type=int, default=10, help="steps between log lines")
    add("--save-every", type=int, default=1000, help="steps between checkpoints (and each epoch)")
    add("--resume", action="store_true", help="continue the run in --out")
    add("--no-download", dest="download", action="store_false", help="never download data")
    add("--eval-tasks", help=f"tasks to measure forgetting on, or 'none' [{DEFAULT_EVAL_TASKS}]")
    cache = "cache of pre-trained features ($LDIFS_CACHE)"
    add("--cache-dir", type=user_path, default=CACHE_DIR, help=cache)
    add("--list-tasks", action="store_true", help="list the tasks and where their data goes")
    return p.parse_args(argv)


def list_tasks(root):
    print(f"{'task':17} {'classes':>7} {'templates':>9} {'download':>8}  data expected at")
    for t in TASKS.values():
        where = os.path.join(os.path.expanduser(root), t.layout) if t.layout else "(generated)"
        fetch = "auto" if t.downloads else "manual" if t.layout else "-"
        print(
            f"{t.name:17} {t.num_classes:>7} {len(t.templates):>9} {fetch:>8}  {where}  "
            f"[split: {t.split_rule}]"
        )
    print("folder:PATH: your own images in PATH/{train,test}/<class>/* (val/ optional)")


def resolve_args(args):
    """Fill the unset flags from the first task's recipe and check them, once; return the
    tasks to fine-tune on, in order."""
    tasks = [get_task(name) for name in task_names(args.task)]
    if args.templates:
        tasks = [dataclasses.replace(t, templates=read_templates(args.templates)) for t in tasks]
    names = [task.name for task in tasks]
    if len(set(names)) < len(names):
        raise UsageError(f"--task {args.task!r} repeats a task; a sequence visits each task once")
    if (args.model or "").startswith(OWN_WEIGHTS):  # open_clip ignores --pretrained for them
        if args.pretrained not in (None, "none"):
            raise UsageError(
                f"--pretrained {args.pretrained}: an hf-hub: or local-dir: model loads its own "
                "weights; leave --pretrained out"
            )
        args.pretrained = "none"
    typed_eval_tasks = args.eval_tasks  # None unless typed: the recipe fills it in below
    recipe = {**RELEASE_RECIPE, **tasks[0].recipe}
    if args.model not in (None, recipe["model"]):  # a recipe's weights are those of its model
        recipe["pretrained"] = RELEASE_RECIPE["pretrained"]
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    weights_file = Path(args.pretrained).expanduser()  # '' is refused in check_args
    if weights_file.is_file():  # recorded absolute, so eval.py finds it from anywhere
        args.pretrained = os.path.abspath(weights_file)
    if args.model.startswith("local-dir:"):  # the same for a folder of weights
        args.model = "local-dir:" + os.path.abspath(Path(args.model.split(":", 1)[1]).expanduser())
    named = parse_eval_tasks(args.eval_tasks)
    args.eval_tasks = [n for n in named if n not in names]
    if typed_eval_tasks and named and not args.eval_tasks:
        warn_once(
            f"--eval-tasks {typed_eval_tasks} names only tasks trained on, whose test accuracy "
            "is reported anyway: forgetting is not measured"
        )
    args.out = args.out or default_out(names, args)
    check_args(args)
    return tasks


def default_out(names, args):
    """runs/<tasks>-lam<lam>, plus the baselines' weights when set: an L2-SP or label-smoothing
    run with --lam 0 must not land on plain fine-tuning's folder."""
    baselines = {"l2sp": args.l2sp, "ls": args.label_smoothing}
    parts = ["+".join(map(file_safe, names)), f"lam{args.lam:g}"]
    name = "-".join(parts + [f"{k}{v:g}" for k, v in baselines.items() if v])
    if len(os.fsencode(name)) > 255:  # folder tasks' names add up; the OS would refuse it
        raise UsageError(
            f"the default --out, runs/{name[:40]}..., is over the 255 bytes a file name may "
            "have; choose a shorter one with --out"
        )
    return Path("runs") / name


def parse_eval_tasks(value, flag="--eval-tasks"):
    """The eval tasks named in `value` ('a,b' or 'none'), each once. An empty list (an unset
    $EVAL) is refused: 'none' says it."""
    if value == "none":
        return []
    names = [get_task(name).name for name in task_names(value) if name]
    if not names:
        raise UsageError(f"{flag} {value!r} names no task; name some (a,b) or 'none'")
    return list(dict.fromkeys(names))


def task_names(value):
    """The names in 'a,b' ("a, b" as in prose). A folder:PATH may hold commas: a part that
    names no built-in task nor another folder belongs to the folder before it."""
    names = []
    for part in value.split(","):
        name = part.strip()
        joins = names and names[-1].lstrip().startswith("folder:") and name
        if joins and name.lower() not in TASKS and not name.startswith("folder:"):
            names[-1] += "," + part
        else:
            names.append(part)
    return [name.strip() for name in names]


def read_templates(path):
    """--templates FILE: one prompt template a line, each with {} for the class name."""
    try:  # -sig: without the byte-order mark Windows editors start UTF-8 files with
        text = Path(path).read_text("utf-8-sig")
    except (OSError, ValueError) as e:  # missing, or not UTF-8 text (e.g. UTF-16 from Notepad)
        raise UsageError(f"--templates {path}: {one_line(e)}") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--templates {path}: no templates; write one a line, with {{}}")
    for line in lines:
        with contextlib.suppress(IndexError, KeyError, ValueError):  # {} twice, {kind}, a lone {
            if "\0" in line.format("\0"):  # open_clip formats each template so: the name is in
                continue
        raise UsageError(
            f"--templates {path}: {line!r} needs one {{}} for the class name and no other {{...}}"
        )
    return tuple(lines)


def check_args(args):
    check_model(args.model, args.pretrained)  # before any data is downloaded
    positive = "batch_size epochs max_steps log_every eval_batch_size grad_clip".split()
    non_negative = "lam l2sp label_smoothing lr wd warmup workers save_every seed".split()
    problems = out_of_range(args, positive, non_negative)
    if args.label_smoothing >= 1:
        problems.append(f"--label-smoothing must be below 1, got {args.label_smoothing}")
    if args.seed >= 2**64:  # torch seeds its generators with 64 bits
        problems.append(f"--seed must be below 2**64, got {args.seed}")
    largest = torch.finfo(torch.float32).max  # past it, AdamW's lr * update overflows
    too_big = [k for k in ("lam", "l2sp", "lr", "wd") if abs(getattr(args, k)) > largest]
    problems += [
        f"{flag_name(k)} must be finite in float32, got {getattr(args, k)}" for k in too_big
    ]
    if problems:
        raise UsageError("; ".join(problems))


def out_of_range(args, positive, non_negative):
    """A message for each flag in `positive` that is set and not > 0, and each flag in
    `non_negative` that is < 0, or NaN in either."""
    value = functools.partial(getattr, args)
    problems = [
        f"{flag_name(k)} must be positive, got {value(k)}"
        for k in positive
        if value(k) is not None and not value(k) > 0
    ]
    return problems + [
        f"{flag_name(k)} must be >= 0, got {value(k)}" for k in non_negative if not value(k) >= 0
    ]


def weight(text):
    """A loss weight; -0 is read as 0, else --lam -0 would name the folder, the table and the
    label lam-0."""
    return float(text) + 0.0


def user_path(text):
    """A path flag, ~ expanded: the shell leaves the ~ of --out=~/runs/x as it is. An empty one
    (an unset $OUT in a script) would be the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text).expanduser()


def tap_list(text):
    """--taps: an empty list ("$TAPS" unset) would silently mean the tower's default."""
    if not text.replace(",", "").strip():
        raise argparse.ArgumentTypeError("names no submodule; name some (a,b), or leave it out")
    return text


def model_name(text):
    """--model: hf-hub: and local-dir: need what follows them (local-dir:$RUN with RUN unset
    would be the current folder)."""
    if text in OWN_WEIGHTS:
        example = "hf-hub:org/repo or local-dir:runs/eurosat-lam10"
        raise argparse.ArgumentTypeError(f"nothing after {text}; e.g. {example}")
    return text


def pick_device(name):
    """--device: cuda if available, else cpu, for '' or None; else a device this machine has."""
    gpus, reason = unusable_gpus() if not name or name.startswith("cuda") else (0, "")
    if gpus:
        raise argparse.ArgumentTypeError(
            f"this torch build (CUDA {torch.version.cuda}) cannot use this machine's NVIDIA "
            f"GPUs ({gpus}): {reason}; install its CUDA 12.6 build: {cuda12_install()}; or pass "
            "--device cpu"
        )
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        message = f"unknown device {name!r}; e.g. cpu, cuda, cuda:1, mps"
        raise argparse.ArgumentTypeError(message) from None
    # Else a backend the build lacks (mps, xpu...) fails in load_clip, as if the model had.
    accelerator = torch.accelerator.current_accelerator()  # the build's; it touches no GPU
    backends = ["cpu"] + ([accelerator.type] if accelerator else [])
    if device.type not in backends:
        raise argparse.ArgumentTypeError(
            f"{name}: this torch build runs on {' and '.join(backends)}"
        )
    visible = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= visible:
        raise argparse.ArgumentTypeError(f"{name}: this machine has {visible} visible CUDA GPUs")
    return device


def setup_distributed(args):
    """Under torchrun (RANK is set), join the process group, NCCL on GPUs and gloo on CPUs;
    return this process's rank and the number of processes."""
    if "RANK" not in os.environ:
        return 0, 1
    cuda = args.device.type == "cuda"
    if cuda:  # "cuda" is then this process's GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # Ranks other than 0 wait while rank 0 downloads and evaluates: allow that an hour.
    timeout = datetime.timedelta(hours=1)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    world_size = torch.distributed.get_world_size()
    if args.batch_size % world_size:
        raise UsageError(
            f"--batch-size {args.batch_size} (the global batch) must divide by the "
            f"{world_size} processes"
        )
    return torch.distributed.get_rank(), world_size


def stage_folder(k, name):
    """Where stage k of a continual run writes, inside --out."""
    return f"{k}-{file_safe(name)}"


def plan_stage(k, tasks, n_train, taps, shard, args):
    """Stage k of the run: its task, folder, length and taps, on this process's shard."""
    task = tasks[k]
    epochs = task.epochs if args.epochs is None else args.epochs
    steps = epochs * (n_train // args.batch_size)
    out = args.out / stage_folder(k, task.name) if len(tasks) > 1 else args.out
    sequence = tuple(t.name for t in tasks)
    total_steps = min(steps, args.max_steps or steps)
    if args.warmup > total_steps:
        warn_once(f"{task.name}: --warmup {args.warmup} > its {total_steps} steps: lr never peaks")
    return Stage(task, k, sequence, out, epochs, total_steps, tuple(taps), *shard)


def run(args):
    """Fine-tune on each task in turn (one task: a plain run), then summarise."""
    tasks = resolve_args(args)
    shard = setup_distributed(args)
    check_out(tasks, args)
    data = fetch_data(tasks, shard[0], args)
    check_batches_fill(data, args)
    torch.manual_seed(args.seed)
    clip, *transforms = load_clip(args.model, args.pretrained, args.device)
    taps = tap_names(clip.visual, args.taps)
    if args.taps:  # the default taps run in every open_clip tower: tested
        check_taps_run(clip.visual, taps)
    if args.eval_tasks or args.head == "zs":  # an hf-hub: model's needs show once it loads
        tokenizer_of(args.model)
    pretrained = frozen_copy(clip.visual)
    heads, matrix, main = {}, [], shard[0] == 0
    with holding(args.out) if main else contextlib.nullcontext():
        check_out(tasks, args)  # again, held: a run on --out may have ended while this loaded
        if main:
            delete_killed_writes(args.out)
        for k, task in enumerate(tasks):
            stage = plan_stage(k, tasks, len(data[task.name][0]), taps, shard, args)
            previous = k > 0 and args.reference == "previous"
            reference = frozen_copy(clip.visual) if previous else pretrained
            heads[task.name] = finetune(
                clip, reference, pretrained, data[task.name], transforms, stage, args
            )
            if len(tasks) > 1 and main:
                seen, test = tasks[: k + 1], transforms[1]
                matrix.append(seen_task_accuracies(clip.visual, seen, heads, data, test, args))
        if len(tasks) > 1 and main:
            summarise_sequence(tasks, matrix, args)


def fetch_data(tasks, rank, args):
    """{task: (train, test)} datasets, downloaded (or found) before the model is. Under
    torchrun rank 0 fetches first and the others wait; if it fails, every rank fails with
    its error, rather than on the broken connection."""
    load = functools.partial(get_dataset, root=args.data_root, download=args.download)
    fetch = lambda: {t.name: (load(t, "train"), load(t, "test")) for t in tasks}  # noqa: E731
    if not torch.distributed.is_initialized():
        return fetch()
    failure = [None]
    if rank == 0:
        try:
            data = fetch()
        except UserError as e:
            failure = [e]
    torch.distributed.broadcast_object_list(failure, src=0)
    if failure[0]:
        raise failure[0]
    return data if rank == 0 else fetch()


def check_batches_fill(data, args):
    """Every task's training images fill a batch: checked before the model loads and the
    first stage trains, not as a later stage starts (a resume cannot change the batch)."""
    for name, (train, _) in data.items():
        if len(train) < args.batch_size:
            raise UsageError(
                f"--batch-size {args.batch_size} exceeds the {len(train)} training images of {name}"
            )


def finetune(clip, reference, pretrained, data, transforms, stage, args):
    """One stage: train clip.visual and a new head on the stage's (train, test) `data` (or
    load a finished stage), save, evaluate; return the head."""
    (train_images, test_data), (train_transform, eval_transform) = data, transforms
    resume = args.resume and (stage.out / "checkpoint.pt").exists()
    checkpoint = load_checkpoint(stage, args) if resume else None  # it checks the flags
    if args.resume and finished(read_metrics(stage.out)):  # checkpoint kept or not
        return load_finished_stage(clip, stage, args)
    stage.out.mkdir(parents=True, exist_ok=True)
    classnames = class_names(stage.task, args.data_root)
    if checkpoint:
        head = linear_head(checkpoint["model"]["head.weight"], checkpoint["model"]["head.bias"])
    else:
        head = initial_head(clip, stage.task, classnames, eval_transform, stage, args)
    classifier = ImageClassifier(clip.visual, head)
    optimizer = make_optimizer(classifier.parameters(), args)
    if checkpoint:
        start_step, init_head = restore(checkpoint, classifier, optimizer, stage)
    else:
        start_step, init_head = 0, {k: v.detach().clone() for k, v in head.state_dict().items()}
    start, images = time.perf_counter(), Augmented(train_images, train_transform, args.seed)
    metrics = train(classifier, reference, images, optimizer, init_head, start_step, stage, args)
    if stage.rank == 0:
        metrics.update(train_seconds=time.perf_counter() - start, **run_config(stage, args))
        if start_step == stage.total_steps:  # resumed only to evaluate: nothing was measured
            metrics.update(measured_before(stage.out, args.eval_tasks))
        metrics.update(eval_tasks=args.eval_tasks, world_size=stage.world_size)
        metrics.update(data_root=os.path.abspath(args.data_root))  # eval.py reads it there
        metrics.update(stage=stage.index, sequence=list(stage.sequence))
        save_outputs(clip, classifier, classnames, init_head, metrics, stage, args)  # nothing lost
        report(clip, classifier, pretrained, test_data, eval_transform, metrics, stage, args)
    return head


def finished(metrics):
    """Whether a stage's metrics.json is a finished stage's: a stage killed while measuring
    forgetting has its test accuracy but no forgetting table yet."""
    return "test_accuracy" in metrics and ("forgetting" in metrics or not metrics.get("eval_tasks"))


def measured_before(out, eval_tasks):
    """The training figures that an earlier run of this stage wrote to metrics.json, if any,
    and the forgetting rows it measured, if forgetting is to be measured now."""
    measures = ["train_seconds", "train_images_per_second", "peak_memory_mb"]
    measures += ["forgetting_so_far"] if eval_tasks else []
    return {k: v for k, v in read_metrics(out).items() if k in measures}


def report(clip, classifier, pretrained, test_data, transform, metrics, stage, args):
    """Evaluate the saved stage: target accuracy and the forgetting table against the
    original pre-trained encoder."""
    test = extract_features(classifier.encoder, Transformed(test_data, transform), args)
    metrics["test_accuracy"] = probe_accuracy(classifier.head, *test)
    write_json(metrics, stage.out / "metrics.json")  # kept if killed in the long part below
    rate = metrics["train_images_per_second"]
    shown = "-" if rate is None else f"{rate:.1f}"
    print(
        f"{stage.task.name}: test accuracy {metrics['test_accuracy']:.4f} after "
        f"{metrics['steps']} steps ({shown} images/s); outputs in {stage.out}"
    )
    if not args.eval_tasks:
        return
    metrics["forgetting"] = evaluate_forgetting(
        pretrained, classifier.encoder, clip, transform, metrics, stage.out, args
    )
    write_json(metrics, stage.out / "metrics.json")  # before printing: stdout may be closed
    print(
        f"\nConcept forgetting after fine-tuning on {stage.task.name} (lam {args.lam:g}), "
        "accuracy in %:\n"
    )
    print(forgetting_table(metrics["forgetting"]))


def sigterm_as_ctrl_c():
    """End on SIGTERM (kill, Slurm, torchrun, `timeout`) as on Ctrl-C."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def quiet_worker_exit(_worker_id):
    """A data-loading worker ends quietly on Ctrl-C or SIGTERM, which reach it with the main
    process when sent to the whole process group (a terminal, timeout, scancel): the main
    process alone says one line. Killed by SIGTERM, workers made the main process report a
    traceback, which could become the run's error."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, end_worker)
    sys.excepthook = unless_the_main_process_left


def end_worker(*_):
    """As Ctrl-C does: torch's worker loop catches the KeyboardInterrupt and exits with status
    0, its locks released (an os._exit could leave the loader's shutdown event locked, and the
    main process waiting on it for ever). Its stderr goes first: its dying threads would print
    tracebacks after the main process's line."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    raise KeyboardInterrupt


def unless_the_main_process_left(kind, error, trace):
    """A worker's fd-sharing thread reports, with a traceback, a main process that hung up
    mid-batch, as an ending one does; any other error is printed as ever."""
    if not issubclass(kind, (ConnectionError, EOFError)):
        sys.__excepthook__(kind, error, trace)


def main(argv=None):
    logging.basicConfig(level=logging.CRITICAL)  # open_clip logs errors we re-state in one line
    sigterm_as_ctrl_c()
    args = parse_args(argv)
    try:
        with one_line_errors("ldifs.py", lambda: what_resumes(args.out)):
            if args.list_tasks:  # inside: `| head` closes its stdout
                return list_tasks(args.data_root)
            run(args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def what_resumes(out):
    """What Ctrl-C says comes next: --resume refuses an --out with no checkpoint yet."""
    if out and run_files_in(out):
        return "; --resume continues from the last checkpoint"
    return " before the first checkpoint; run the same command to start again"


if __name__ == "__main__":
    main()
