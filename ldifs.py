"""LDIFS: fine-tune CLIP on one task without forgetting the others.

Mukhoti, Gal, Torr, Dokania, "Fine-tuning can cripple your foundation model; preserving
features may be the solution" (TMLR 2024). The loss is

    loss = CE(head(f(x)), y) + lam * D(x),   D = ldifs_distance(taps(f, x), taps(f0, x))

where f is the trainable image encoder, f0 a frozen copy of the pre-trained one and the
taps are intermediate activations (see `ldifs_distance`). lam=0 is plain fine-tuning;
--loss flyp or flyp-ce trains both towers with the release's FLYP losses in place of CE.

    python ldifs.py --task eurosat --lam 10            # CLIP ViT-B/32 (OpenAI) on EuroSAT
    python ldifs.py --task eurosat --lam 0             # plain fine-tuning, for comparison
    python ldifs.py --task eurosat --loss flyp --lam 0 # FLYP, the release's contrastive baseline
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
import json
import logging
import math
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
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
    quarters = lambda blocks, n: [f"{blocks}.{n * k // 4 - 1}" for k in (1, 2, 3, 4)]  # noqa: E731
    if hasattr(trunk, "ln_pre") and hasattr(trunk, "transformer"):
        return ["ln_pre"] + quarters("transformer.resblocks", len(trunk.transformer.resblocks))
    if hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):
        first = "norm_pre" if getattr(trunk, "norm_pre", None) is not None else "patch_embed"
        return [prefix + first] + quarters(prefix + "blocks", len(trunk.blocks))
    if hasattr(trunk, "layer4"):
        return ["avgpool", "layer1", "layer2", "layer3", "layer4"]  # avgpool ends the stem
    stem = next((n for n in ("stem", "patch_embed") if hasattr(trunk, n)), None)
    stages = next((n for n in ("stages", "layers") if hasattr(trunk, n)), None)
    if not (stem and stages):
        children = ", ".join(name for name, _ in encoder.named_children())
        raise UsageError(f"no default taps for this tower; name some of {children} with --taps")
    return [prefix + stem] + [f"{prefix}{stages}.{i}" for i in range(len(getattr(trunk, stages)))]


def frozen_copy(module):
    """A deep copy that never trains: eval mode (batch norm keeps its statistics), no grad."""
    reference = copy.deepcopy(module).eval()
    reference.requires_grad_(False)
    return reference


# ---------------------------------------------------------------------------- training


def ldifs_loss(model, reference, taps, ref_taps, batch, args, clip_loss=None):
    """The fine-tuning loss of a batch (images, labels, prompts) and its LDIFS distance D, from
    one trainable pass (speed-up, same maths: the release runs the trainable encoder twice).
    lam 0 never runs the reference."""
    loss = fine_tuning_loss(model, *batch, args, clip_loss)
    if args.lam == 0:
        return loss, torch.zeros((), device=loss.device)
    with torch.no_grad():
        reference(batch[0])
    return loss, ldifs_distance(list(taps.values()), list(ref_taps.values()))


def fine_tuning_loss(model, images, labels, prompts, args, clip_loss=None):
    """--loss ce: the head's cross-entropy. flyp-ce: the cross-entropy of logit_scale.exp() times
    the cosine similarities to one prompt per class. flyp: CLIP's contrastive loss between each
    image and its own prompt, over the global batch (`clip_loss`: open_clip's ClipLoss)."""
    smoothed = functools.partial(F.cross_entropy, label_smoothing=args.label_smoothing)
    if args.loss == "ce":
        return smoothed(model(images), labels)
    image, text, scale = model(images, prompts)[:3]  # normalised embeddings, logit_scale.exp()
    if args.loss == "flyp-ce":
        return smoothed(scale * image @ text.T, labels)
    # The release passes logit_scale.item(), a constant: detach() is the same, with no sync.
    per_image, per_text = clip_loss.get_logits(image, text, scale.detach())
    targets = clip_loss.get_ground_truth(images.device, len(per_image))
    return (smoothed(per_image, targets) + smoothed(per_text, targets)) / 2


def step_prompts(tokens, labels, step, stage, args):
    """The step's prompts from `tokens` (classes, templates, length): for FLYP a template drawn
    per image of the global batch (this rank's share) with its class, for FLYP-CE one per
    class. Drawn as seeded by the step, so a resume and any number of ranks draw the same."""
    if tokens is None:
        return None
    g = torch.Generator().manual_seed(hash((args.seed, step, -1)))  # -1: no image's crop seed
    classes, templates = tokens.shape[:2]
    if args.loss == "flyp-ce":
        drawn = tokens[torch.arange(classes), torch.randint(templates, (classes,), generator=g)]
    else:
        per_image = torch.randint(templates, (args.batch_size,), generator=g)
        drawn = tokens[labels, per_image[stage.rank :: stage.world_size]]
    return drawn.to(args.device, non_blocking=True)


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


def train(model, reference, data, tokens, optimizer, init_head, start_step, stage, args):
    """Fine-tune `model` (an ImageClassifier, or for FLYP the whole CLIP) with its loss + lam * D
    (+ the L2-SP term) from `start_step` to the stage's last step, checkpointing as it goes;
    return throughput metrics. `tokens`: every class's prompts for FLYP, else None."""
    trained = torch.nn.parallel.DistributedDataParallel(model) if stage.world_size > 1 else model
    batches = step_batches(len(data), args.batch_size, args.seed, start_step, stage.total_steps)
    pin = args.device.type == "cuda"
    shard = (batch[stage.rank :: stage.world_size] for batch in batches)  # this rank's share
    log = TrainLog(start_step, stage, args)
    nhwc = getattr(getattr(reference, "trunk", reference), "output_fmt", "") == "NHWC"  # Swin
    ref_names = stage.taps if args.lam > 0 else []
    clip_loss = open_clip.ClipLoss(
        gather_with_grad=True, rank=stage.rank, world_size=stage.world_size
    )
    model.train()
    with (
        recorded_taps(model.visual, stage.taps, nhwc) as taps,
        recorded_taps(reference, ref_names, nhwc) as ref_taps,
        contextlib.closing(log),
        tf32_matmuls(),
    ):
        loader = DataLoader(data, batch_sampler=shard, num_workers=args.workers, pin_memory=pin)
        for step, (images, labels) in enumerate(loader, start_step):
            prompts = step_prompts(tokens, labels, step, stage, args)
            images = data.finish(images.to(args.device, non_blocking=True))
            labels = labels.to(args.device, non_blocking=True)
            lr = lr_at(step, args.lr, args.warmup, stage.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(args.device):
                batch = (images, labels, prompts)
                loss, distance = ldifs_loss(
                    trained, reference, taps, ref_taps, batch, args, clip_loss
                )
            penalty = l2sp_penalty(model.visual, reference) if args.l2sp else 0 * loss
            optimizer.zero_grad(set_to_none=True)
            (loss + args.lam * distance + args.l2sp * penalty).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            log.record(step, loss, distance, penalty, lr)
            if is_checkpoint_step(step + 1, len(data), stage, args):
                log.check_finite(log.sums, step + 1, model)
                save_checkpoint(model, optimizer, init_head, step + 1, stage, args)
    rate, memory = log.images_per_second(), peak_memory_mb(args.device)
    return {"steps": stage.total_steps, "train_images_per_second": rate, "peak_memory_mb": memory}


def step_batches(n, batch_size, seed, start_step, total_steps):
    """Each step's batch: every epoch a seeded permutation of the n images, less the last
    partial batch, so a batch depends on its step alone. Indices: epoch * n + image."""
    steps_per_epoch = n // batch_size
    epoch, order = None, None
    for step in range(start_step, total_steps):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(hash((seed, epoch))))
        k = step % steps_per_epoch
        yield (epoch * n + order[k * batch_size : (k + 1) * batch_size]).tolist()


class Transformed(Dataset):
    """`data` with open_clip's `transform` applied in two parts: the loader's workers run it up
    to its ToTensor and hand over uint8 images (a quarter of the bytes); `finish` scales and
    normalises whole batches on the device, bitwise the same on the CPU. With a `seed`, image
    i of epoch e (index e * n + i) is augmented as seeded by (seed, e, i): any resume, any
    worker count and any number of ranks see the same batches."""

    def __init__(self, data, transform, seed=None):
        steps = transform.transforms
        cut = next(k for k, step in enumerate(steps) if isinstance(step, ToTensor))
        self.data, self.on_workers = data, Compose([*steps[:cut], PILToTensor()])
        self.on_device, self.seed = Compose(steps[cut + 1 :]), seed

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        epoch, i = divmod(index, len(self.data))
        # The CPU generator alone, which the crop draws from: torch.manual_seed also seeds
        # every other device, at 50 times the cost per image.
        state = torch.default_generator.get_state()
        torch.default_generator.manual_seed(hash((self.seed, epoch, i)))
        try:
            image, label = self.data[i]
            return self.on_workers(image), label
        finally:
            torch.default_generator.set_state(state)

    def finish(self, images):
        return self.on_device(images.float() / 255)


def make_optimizer(params, args):
    fused = args.device.type == "cuda"  # one kernel for the whole AdamW update
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.wd, fused=fused)


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on the CPU, where bf16 is slower."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


@contextlib.contextmanager
def tf32_matmuls():
    """TF32 for training's fp32 matmuls on CUDA; evaluation stays fp32, as the release's."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class TrainLog:
    """Loss parts, lr and images/s every --log-every steps, summed on the device meanwhile."""

    def __init__(self, start_step, stage, args):
        self.stage, self.args, self.first = stage, args, start_step
        self.sums = torch.zeros(3, device=args.device)  # CE, D and L2-SP since the last line
        self.since, self.clock = 0, None
        mode = "a" if start_step else "w"  # from step 0: over a run killed before a checkpoint
        self.file = open(stage.out / "log.jsonl", mode) if stage.rank == 0 else None
        name = f"train {stage.task.name}"
        self.bar = progress_bar(total=stage.total_steps, initial=start_step, desc=name)

    def record(self, step, ce, distance, penalty, lr):
        self.sums += torch.stack([ce, distance, penalty]).detach()
        self.since += 1
        self.bar.update()
        if step == self.first + 1:  # steady state starts after two steps
            self.clock = sync_time(self.args.device)
        if (step + 1) % self.args.log_every == 0 or step + 1 == self.stage.total_steps:
            self.write(step + 1, lr)

    def write(self, step, lr):
        sums = self.sums.clone()
        if self.stage.world_size > 1:  # the mean over ranks: a NaN on one stops every rank
            torch.distributed.all_reduce(sums)
        self.check_finite(sums, step)
        (ce, d, penalty), lam = (sums / self.since / self.stage.world_size).tolist(), self.args.lam
        rate = self.images_per_second(step - 1)
        line = {"step": step, "lr": lr, "loss/ce": ce, "loss/ldifs": lam * d, "ldifs_distance": d}
        line.update({"loss/l2sp": self.args.l2sp * penalty, "images_per_second": rate})
        if self.file:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
        shown = "-" if rate is None else f"{rate:.1f}"
        self.bar.set_postfix(ce=f"{ce:.3f}", ldifs=f"{lam * d:.4f}", img_s=shown, refresh=False)
        self.sums.zero_()
        self.since = 0

    def check_finite(self, sums, step, model=None):
        """Stop before a non-finite loss or weight can reach a checkpoint."""
        loss = sums.isfinite().all()
        if not (loss and (model is None or all(p.isfinite().all() for p in model.parameters()))):
            what = "weights" if loss else "loss"
            kept = f"the last checkpoint in {self.stage.out} is kept; try a lower --lr"
            raise UserError(f"the {what} became non-finite by step {step}; {kept}")

    def images_per_second(self, step=None):
        """Throughput from the second step to `step` (the last), or None (JSON's null) before."""
        step = self.stage.total_steps - 1 if step is None else step
        if self.clock is None or step <= self.first + 1:
            return None
        elapsed = sync_time(self.args.device) - self.clock
        return (step - self.first - 1) * self.args.batch_size / elapsed

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


def sync_time(device):
    if device.type != "cpu":  # the device that trains, not the current GPU
        torch.accelerator.synchronize(device)
    return time.perf_counter()


def other_rank():
    """Whether this is a torchrun rank other than 0: rank 0 alone draws bars and warns."""
    return torch.distributed.is_initialized() and torch.distributed.get_rank() > 0


def peak_memory_mb(device):
    """CUDA's peak allocated memory, or on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def progress_bar(iterable=None, **kwargs):
    if other_rank():  # only then: tqdm's own TQDM_* environment variables still apply
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


# -------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def extract_features(encoder, data, args):
    """L2-normalised image embeddings and labels of `data`, in fp32 as the release's."""
    encoder.eval()
    loader = DataLoader(data, batch_size=args.eval_batch_size, num_workers=args.workers)
    xs, ys = [], []
    finish = data.finish if isinstance(data, Transformed) else lambda images: images
    for images, labels in progress_bar(loader, desc="features", unit="batch", leave=False):
        embedding = image_embedding(encoder, finish(images.to(args.device)))
        xs.append(F.normalize(embedding.float(), dim=-1))
        ys.append(labels.to(args.device))
    return torch.cat(xs), torch.cat(ys)


PROBE_LRS = (0.01, 0.05, 0.1, 0.5, 1.0)  # the release's sweep, picked on val
PROBE_STEPS = 1000  # the release's full-batch AdamW steps per fit
PROBE_LOGITS = 2**27  # at most this many logits at once: probes share a pass while they fit


def fit_linear_probes(x, y, num_classes, lrs, steps=None):
    """The release's probes, one per lr: nn.Linear from its default init (seeded), fit
    full-batch on the L2-normalised features by AdamW (weight decay 0.01) for 1000 steps.
    Speed-up, same maths: they fit side by side in one matmul, each in its own param group."""
    steps, g = steps or PROBE_STEPS, torch.Generator().manual_seed(0)
    x, y = F.normalize(x.clone(), dim=-1), y.clone()  # inference tensors cannot enter autograd
    head, bound = torch.nn.Linear(x.shape[1], num_classes), x.shape[1] ** -0.5
    with torch.no_grad():  # nn.Linear's own init, U(-1/sqrt(dim), 1/sqrt(dim)), seeded
        for p in head.parameters():
            p.uniform_(-bound, bound, generator=g)
    heads = [copy.deepcopy(head).to(x.device) for _ in lrs]
    at_once = max(1, PROBE_LOGITS // (len(x) * num_classes))
    bar = progress_bar(total=steps * len(lrs), desc="linear probe", leave=False)
    for k in range(0, len(lrs), at_once):  # a group of probes at a time: ImageNet's logits
        group, rates = heads[k : k + at_once], lrs[k : k + at_once]
        params = [{"params": h.parameters(), "lr": lr} for h, lr in zip(group, rates, strict=True)]
        optimizer, targets = torch.optim.AdamW(params), y[:, None].expand(-1, len(group))
        with torch.enable_grad():
            for _ in range(steps):
                weight = torch.cat([h.weight for h in group])
                bias = torch.cat([h.bias for h in group])
                logits = F.linear(x, weight, bias).view(len(x), len(group), -1).transpose(1, 2)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(logits, targets, reduction="none").mean(0).sum().backward()
                optimizer.step()
                bar.update(len(group))
    bar.close()
    return heads


@torch.no_grad()
def probe_accuracy(head, x, y):
    """Top-1 accuracy (a fraction) of the linear head on features x."""
    return head(x).argmax(1).eq(y).float().mean().item()


def select_probe(train, val, num_classes):
    """The release's probe: a fit on `train` per lr, the best on `val` (the first of ties)."""
    # Its "refit on train + val" refits on train alone (XValVal resolves to XVal), from a new
    # init: a draw of the same procedure, so we keep this fit (a speed-up).
    heads = fit_linear_probes(*train, num_classes, PROBE_LRS)
    return max(heads, key=lambda head: probe_accuracy(head, *val))


def weights_key(model, pretrained, seed):
    """What pre-trained features depend on: a model, and a tag, weight files or random seed."""
    if model.startswith("local-dir:"):
        return {"model": model, "files": files_digest(Path(model.split(":", 1)[1]).iterdir())}
    if os.path.isfile(pretrained):
        return {"model": model, "files": files_digest([pretrained])}
    if pretrained == "none" and not model.startswith("hf-hub:"):
        return {"model": model, "pretrained": pretrained, "seed": seed}
    return {"model": model, "pretrained": pretrained}


def files_digest(paths):
    """A digest of the files' paths, sizes and mtimes: it changes when one does."""
    stats = [(str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in sorted(paths)]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def cached(key, compute, args):
    """compute(), kept in --cache-dir under `key`, which names a task and a split."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = f"{file_safe(key['task'])}-{key['split']}-{digest}.pt"
    path = Path(args.cache_dir).expanduser() / name
    with contextlib.suppress(Exception):  # missing, truncated, corrupt: all mean recompute
        entry = torch.load(path, map_location=args.device, weights_only=True)
        if entry["key"] == key:
            return entry["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"key": key, "value": value}, path)
    return value


def task_features(encoder, task, transform, args, weights=None, splits=("train", "val", "test")):
    """{split: (features, labels)}, cached under `weights` (the pre-trained encoder's) if given."""
    features = {}
    for split in splits:
        data = get_dataset(task, split, args.data_root, transform, args.download)
        extract = functools.partial(extract_features, encoder, data, args)
        key = {**(weights or {}), "task": task.name, "split": split, "images": len(data)}
        features[split] = cached(key, extract, args) if weights else extract()
    return features


def cached_linear_probe(encoder, task, transform, args, named, weights=None, test=None):
    """A_LP on `task`, cached under `named` (a `weights_key` or `encoder_digest`)."""

    def fit():
        splits = ("train", "val") if test else ("train", "val", "test")
        f = {"test": test, **task_features(encoder, task, transform, args, weights, splits)}
        num_classes = int(torch.cat([f[split][1] for split in f]).max()) + 1
        return probe_accuracy(select_probe(f["train"], f["val"], num_classes), *f["test"])

    images = len(get_dataset(task, "test", args.data_root, download=args.download))
    return cached({**named, "task": task.name, "split": "a_lp", "images": images}, fit, args)


def encoder_digest(encoder):
    """A digest of the encoder's layers and weights, which its features depend on."""
    digest = hashlib.sha256(repr(encoder).encode())
    for name, tensor in encoder.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"encoder": digest.hexdigest()}


def forgetting_on(task, pretrained, clip, digest, transform, args):
    """ZS and LP accuracy on `task` of the pre-trained and fine-tuned CLIPs, and the deltas. Each
    scores zero-shot with its own text tower: a FLYP run's has trained too."""
    weights = weights_key(args.model, args.pretrained, args.seed)
    models = {"pretrained": (pretrained, weights), "finetuned": (clip, None)}
    get_dataset(task, "test", args.data_root, download=args.download)  # fetched first
    row = {}
    for which, (model, key) in models.items():
        test = task_features(model.visual, task, transform, args, key, ("test",))["test"]
        row[f"zs_{which}"] = probe_accuracy(task_zero_shot_head(model, task, args), *test)
        row[f"lp_{which}"] = cached_linear_probe(
            model.visual, task, transform, args, key or digest, key, test
        )
    row["delta_zs"] = row["zs_finetuned"] - row["zs_pretrained"]
    row["delta_lp"] = row["lp_finetuned"] - row["lp_pretrained"]
    return row


def evaluate_forgetting(pretrained, clip, transform, metrics, out, args):
    """forgetting_on each eval task, saved as it goes; a task without data is skipped."""
    rows = metrics.setdefault("forgetting_so_far", {})
    digest = encoder_digest(clip.visual)
    for name in args.eval_tasks:
        if name in rows and "skipped" not in rows[name]:  # measured before the run was killed
            continue
        try:
            task = get_task(name)
            rows[name] = forgetting_on(task, pretrained, clip, digest, transform, args)
        except DataMissing as e:
            print(f"ldifs.py: warning: skipping eval task {name}: {e}", file=sys.stderr)
            rows[name] = {"skipped": str(e)}
        write_json(metrics, out / "metrics.json")
    del metrics["forgetting_so_far"]
    return {name: rows[name] for name in args.eval_tasks}


FORGETTING_COLUMNS = [
    c for m in ("zs", "lp") for c in (f"{m}_pretrained", f"{m}_finetuned", f"delta_{m}")
]


def forgetting_table(results):
    """The forgetting results as a Markdown table, in percent, with the average."""
    header = ["task", "ZS pre", "ZS ft", "Δ_ZS", "LP pre", "LP ft", "Δ_LP"]
    skipped = ["skipped (data missing)"] + [""] * 5

    def pct(row):  # in percent, the deltas signed
        return [f"{100 * row[c]:{'+' * c.startswith('delta')}.1f}" for c in FORGETTING_COLUMNS]

    rows = [[name, *(skipped if "skipped" in r else pct(r))] for name, r in results.items()]
    done = [row for row in results.values() if "skipped" not in row]
    if done:
        rows.append(
            ["**average**", *pct({c: sum(r[c] for r in done) / len(done) for c in done[0]})]
        )
    return markdown_table(header, rows)


def markdown_table(header, rows):
    """A Markdown table of cells, every column but the first right-aligned."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|---|" + "---:|" * (len(header) - 1), *lines[1:]])


def summarise_sequence(tasks, matrix, args):
    """The accuracy matrix, average accuracy and backward transfer: mean_i<T acc(T,i) - acc(i,i)."""
    names, last = [t.name for t in tasks], matrix[-1]
    transfer = sum(last[i] - matrix[i][i] for i in range(len(names) - 1)) / (len(names) - 1)
    summary = dict(tasks=names, accuracy_matrix=matrix, average_accuracy=sum(last) / len(last))
    summary.update(backward_transfer=transfer, lam=args.lam, l2sp=args.l2sp)
    write_json(summary, args.out / "metrics.json")
    rows = [
        [f"{k}: {names[k]}", *(f"{100 * a:.1f}" for a in row), *[""] * (len(names) - len(row))]
        for k, row in enumerate(matrix)
    ]
    print(f"\nContinual fine-tuning, test accuracy in % (lam {args.lam:g}, l2sp {args.l2sp:g}):\n")
    print(markdown_table(["after stage", *names], rows))
    average = 100 * summary["average_accuracy"]
    print(f"\naverage accuracy {average:.1f}, backward transfer {100 * transfer:+.1f}")
    return summary


# --------------------------------------------------------------------- models and heads


class ImageClassifier(torch.nn.Module):
    """The image tower (`visual`, as CLIP names it) and a linear head (with bias) on its
    L2-normalised features."""

    def __init__(self, visual, head):
        super().__init__()
        self.visual, self.head = visual, head

    def forward(self, images):
        return self.head(F.normalize(image_embedding(self.visual, images), dim=-1))


def image_embedding(encoder, images):
    """The image tower's embedding; CoCa's towers return (embedding, tokens)."""
    output = encoder(images)
    return output[0] if isinstance(output, tuple) else output


def linear_head(weight, bias=None):
    """An nn.Linear holding `weight` (classes, dim) and `bias` (0 if None), on weight's device."""
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device)
    head.load_state_dict(
        {"weight": weight, "bias": torch.zeros(len(weight)) if bias is None else bias}
    )
    return head


def zero_shot_head(clip, tokenizer, classnames, templates, device):
    """CLIP's zero-shot classifier: prompts' text embeddings times logit_scale.exp(), bias 0."""
    weights = open_clip.build_zero_shot_classifier(
        clip, tokenizer, classnames, templates, device=device
    )
    return linear_head(weights.T * clip.logit_scale.exp().detach())


def task_zero_shot_head(clip, task, args):
    """The zero-shot head of `clip`'s text tower on `task`, from the task's templates."""
    names = class_names(task, args.data_root)
    return zero_shot_head(clip, tokenizer_of(args.model), names, task.templates, args.device)


def initial_head(clip, task, transform, stage, args):
    """The zero-shot head (FLYP's always), or (LP-init) the release's probe; features cached
    at the first stage."""
    if args.head == "zs" or args.loss != "ce":
        return task_zero_shot_head(clip, task, args)
    weights = weights_key(args.model, args.pretrained, args.seed) if stage.index == 0 else None
    f = task_features(clip.visual, task, transform, args, weights, splits=("train", "val"))
    return select_probe(f["train"], f["val"], task.num_classes)


def scoring_head(clip, head, task, args):
    """The head a stage is scored with: its own, or for FLYP, which trains no head, the
    zero-shot head of its fine-tuned text tower, as the release scores FLYP."""
    return head if args.loss == "ce" else task_zero_shot_head(clip, task, args)


def prompt_tokens(classnames, templates, model):
    """Every class's prompts, tokenized: (classes, templates, context length)."""
    texts = [template.format(name) for name in classnames for template in templates]
    return tokenizer_of(model)(texts).view(len(classnames), len(templates), -1)


TINY_CLIP = "ldifs-tiny"
TINY_CLIP_CONFIG = {  # a 4-block ViT and 2-block text tower for offline runs and tests
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


OWN_WEIGHTS = ("hf-hub:", "local-dir:")  # models whose weights come with them


def needs_quick_gelu(name, pretrained):
    """OpenAI weights lose accuracy silently without QuickGELU; a run's config says so too."""
    if pretrained and os.path.isfile(pretrained):
        saved = Path(pretrained).with_name("open_clip_config.json")
        config = json.loads(saved.read_text())["model_cfg"] if saved.is_file() else {}
    else:
        config = (open_clip.get_pretrained_cfg(name, pretrained) if pretrained else None) or {}
    return bool(config.get("quick_gelu"))


def load_clip(name, pretrained, device="cpu"):
    """An open_clip CLIP and its train and eval preprocessing, failing rather than random."""
    check_model(name, pretrained)
    tag = None if pretrained == "none" else pretrained
    required = bool(tag) or name.startswith(OWN_WEIGHTS)
    quick = needs_quick_gelu(name, tag)
    try:
        return open_clip.create_model_and_transforms(
            name, tag, device=device, force_quick_gelu=quick, require_pretrained=required
        )
    except Exception as e:  # open_clip raises bare RuntimeErrors for all of these
        raise UserError(f"could not load {name} weights {pretrained}: {one_line(e)}") from e


def check_model(name, pretrained):
    """Refuse an unknown model or tag before any download; register the tiny CLIP."""
    if TINY_CLIP not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as folder:  # open_clip reads the file once, here
            Path(folder, f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
            open_clip.add_model_config(Path(folder, f"{TINY_CLIP}.json"))
    if name.startswith(OWN_WEIGHTS):
        return
    if open_clip.get_model_config(name) is None:
        raise UsageError(f"unknown model {name!r}; see open_clip.list_models(), e.g. ViT-B-32")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained != "none" and not open_clip.get_pretrained_cfg(name, pretrained):
        if not os.path.isfile(pretrained):
            ours = ", ".join(tags) or "none"
            raise UsageError(f"--pretrained {pretrained!r} is no file nor tag of {name} ({ours})")


@functools.cache  # one load a run, however many zero-shot heads it builds
def tokenizer_of(name):
    return open_clip.get_tokenizer(name)


# ---------------------------------------------------------------------- tasks and data


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    classnames: tuple | None  # in label order; None: as the release, the data's own .classes
    num_classes: int
    templates: tuple
    epochs: int  # the release's epochs for this task
    load: Callable  # load(root, split, download) -> Dataset of (PIL image, label)
    layout: str = ""  # where the data lives under --data-root ('' for generated data)
    source: str = "generated"  # where to get it; "torchvision...": it downloads by itself
    split_rule: str = "official train minus a seeded 10% val (at most 20000); test"
    recipe: dict = dataclasses.field(default_factory=dict)  # overrides of the release's recipe


def seeded_split(n, split, fractions=None, seed=0):
    """Indices of `split` in a seeded permutation of n images, cut by `fractions` (train,
    val, rest), else as the release's `random_split(train, [n - n_val, n_val],
    Generator().manual_seed(0))` with n_val = min(int(0.1 n), 20000): val is its END."""
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
    """train and val from the official train split make(True), test from make(False)."""
    if split == "test":
        return make(False)
    full = make(True)
    return Subset(full, seeded_split(len(full), split))


class Samples(Dataset):
    """(path, label) pairs read as RGB PIL images, and the class names of the labels."""

    def __init__(self, samples, classes):
        self.samples, self.classes = samples, classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return torchvision.datasets.folder.default_loader(path), label
        except OSError as e:  # PIL's UnidentifiedImageError is one
            raise UserError(f"cannot decode image {path}: {one_line(e)}; fix or remove it") from e


def image_files(folder):
    """The images under `folder` in ImageFolder's order, less hidden ones (.ipynb_checkpoints)."""
    found = []
    for parent, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        extensions = torchvision.datasets.folder.IMG_EXTENSIONS
        found += [(parent, f) for f in files if f.lower().endswith(extensions) and f[0] != "."]
    return [os.path.join(parent, name) for parent, name in sorted(found)]


def folder_samples(folder, classes):
    """(path, label) pairs of the images in folder/<class>/, labels by position in `classes`."""
    return [(path, k) for k, name in enumerate(classes) for path in image_files(Path(folder, name))]


def subfolders(path):
    """The folders in `path`, sorted, less hidden ones such as .ipynb_checkpoints/: no class."""
    return sorted(d.name for d in Path(path).iterdir() if d.is_dir() and d.name[0] != ".")


def require(path):
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found")
    return path


def load_eurosat(root, split, download):
    # EuroSAT has no official split, and the release's 21600/2700/2700 files were never
    # published: ours is a seeded 80/10/10 of its 27000 images, of the same sizes.
    full = torchvision.datasets.EuroSAT(root, download=download)
    return Subset(full, seeded_split(len(full), split, (0.8, 0.1, 0.1)))


def load_resisc45(root, split, download):
    # As the release: the split files resisc45-{train,test}.txt (18900 / 6300) are the
    # official splits, and the class names are the sorted folder names, '_' read as ' '.
    base = Path(root) / "resisc45"
    folders = subfolders(require(base / "NWPU-RESISC45"))
    samples = folder_samples(base / "NWPU-RESISC45", folders)
    classes = [name.replace("_", " ") for name in folders]

    def make(train):
        keep = set(
            require(base / f"resisc45-{'train' if train else 'test'}.txt").read_text().split()
        )
        return Samples([s for s in samples if Path(s[0]).name in keep], classes)

    return official_split(make, split)


SUN397_PARTITIONS = "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip"


def load_sun397(root, split, download):
    # This literature's split: the official partition 1 (Training_01 / Testing_01).
    base = Path(root) / "SUN397"
    if download:
        torchvision.datasets.SUN397(root, download=True)
        if not (base / "Training_01.txt").exists():
            torchvision.datasets.utils.download_and_extract_archive(SUN397_PARTITIONS, base)
    lines = require(base / "ClassName.txt").read_text().split()
    label = {line: i for i, line in enumerate(lines)}  # '/a/abbey' -> 0
    # As the release: '/a/apartment_building/outdoor' -> 'apartment building outdoor'.
    classes = [line[3:].replace("_", " ").replace("/", " ") for line in lines]

    def make(train):
        name = f"{'Training' if train else 'Testing'}_01.txt"
        where = [base / name, base / "Partitions" / name]  # wherever Partitions.zip unpacked
        files = require(next((p for p in where if p.exists()), where[0])).read_text().split()
        samples = [(str(base / f.lstrip("/")), label[f.rsplit("/", 1)[0]]) for f in files]
        return Samples(samples, classes)

    return official_split(make, split)


def load_imagenet(root, split, download):
    # Read from folders the user places; the official val split is our test split. The images
    # and labels of the release's ImageFolder, in its order, less hidden files (a bug fix).
    base = Path(root) / "imagenet"

    def make(train):
        folder = require(base / ("train" if train else "val"))
        return Samples(folder_samples(folder, subfolders(folder)), IMAGENET_CLASSES)

    return official_split(make, split)


def class_names(task, root):
    """The task's class names in label order, read from the data where the task says so."""
    if task.classnames:
        return task.classnames
    try:
        return tuple(task.load(os.path.expanduser(root), "test", False).classes)
    except (OSError, RuntimeError) as e:
        raise data_missing(task, root, e, download=False) from e


def get_dataset(task, split, root, transform=None, download=True):
    """The (image, label) pairs of `task`'s `split` in `root`, downloaded if need be."""
    task = get_task(task) if isinstance(task, str) else task
    root = os.path.expanduser(root)
    try:
        data = task.load(root, split, download and task.source.startswith("torchvision"))
    except (OSError, RuntimeError) as e:
        raise data_missing(task, root, e, download) from e
    return Transformed(data, transform) if transform else data


def data_missing(task, root, error, download):
    if not task.source.startswith("torchvision"):
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
    """The built-in task `name`, in any case (EuroSAT, as the paper writes it), or folder:PATH."""
    if name.lower() in TASKS:
        return TASKS[name.lower()]
    if name.startswith("folder:"):
        return folder_task(name)
    raise UsageError(f"unknown task {name!r}; choose from {', '.join(TASKS)}, or folder:PATH")


def folder_task(name):
    """Your images in PATH/{train,test,val (optional)}/<class>/*, class names '_' read as ' '."""
    root = Path(name.split(":", 1)[1]).expanduser().resolve()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UsageError(f"folder:{root}: no {split}/ folder of {split}/<class>/* images")
    classes = subfolders(root / "train")
    if len(classes) < 2:  # every head is right on one class: 100% having learnt nothing
        raise UsageError(f"folder:{root}: train/ needs a folder of images per class, two at least")
    names = tuple(c.replace("_", " ") for c in classes)

    def load(_, split, download):
        read = lambda folder: Samples(folder_samples(root / folder, classes), names)  # noqa: E731
        if (root / "val").is_dir() or split == "test":
            return read(split)
        return official_split(lambda train: read("train"), split)

    return Task(f"folder:{root}", names, len(names), PHOTO_TEMPLATES, 10, load, str(root), "yours")


def file_safe(name):
    """A task's name in a file name: folder:PATH as folder-<last folder>-<hash of PATH>."""
    if name in TASKS:
        return name
    tail = re.sub(r"[^\w.-]+", "_", Path(name.split(":", 1)[-1]).name).strip("._") or "data"
    return f"folder-{tail}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


SYNTHETIC_COLOURS = dict(red=(220, 50, 50), green=(50, 190, 70), blue=(60, 80, 230))
SYNTHETIC_COLOURS.update(yellow=(230, 210, 60), purple=(150, 60, 200), orange=(240, 140, 40))
SYNTHETIC_STRIPES = ("horizontal", "vertical", "diagonal", "anti-diagonal")
SYNTHETIC_SIZES = {"train": 2400, "val": 240, "test": 600}


class SyntheticImages(Dataset):
    """Fixed 64x64 striped squares on noise: `concept` is their colour or stripes' direction."""

    def __init__(self, concept, split):
        self.concept, self.split = concept, split

    def __len__(self):
        return SYNTHETIC_SIZES[self.split]

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1_000_003 * list(SYNTHETIC_SIZES).index(self.split) + i)
        colour = int(torch.randint(len(SYNTHETIC_COLOURS), (), generator=g))
        stripes = int(torch.randint(len(SYNTHETIC_STRIPES), (), generator=g))
        ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        angle = math.pi / 4 * [0, 2, 1, 3][stripes]
        period = 6 + 4 * float(torch.rand((), generator=g))
        wave = torch.sin((xs * math.sin(angle) + ys * math.cos(angle)) * 2 * math.pi / period)
        side = int(64 * (0.5 + 0.3 * float(torch.rand((), generator=g))))
        x0, y0 = (int(v) for v in torch.randint(64 - side + 1, (2,), generator=g))
        inside = (xs >= x0) & (xs < x0 + side) & (ys >= y0) & (ys < y0 + side)
        rgb = torch.tensor(list(SYNTHETIC_COLOURS.values())[colour]).float()
        square = rgb * (0.6 + 0.4 * (wave > 0).float())[..., None]
        noise = 110 + 40 * torch.rand(64, 64, 3, generator=g)
        image = torch.where(inside[..., None], square, noise).clamp(0, 255).to(torch.uint8)
        return Image.fromarray(image.numpy()), colour if self.concept == "colour" else stripes


PHOTO_TEMPLATES = tuple(
    f"a {adj}photo of {art} {{}}."
    for art in ("a", "the")
    for adj in ("", *"blurry |black and white |low contrast |high contrast |bad |good ".split("|"))
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
    "bar indicating no passing for trucks has ended".split("; ")
)
IMAGENET_CLASSES = tuple(open_clip.IMAGENET_CLASSNAMES)
IMAGENET_TEMPLATES = tuple(template("{}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES)
SUN397_TEMPLATES = ("a photo of a {}.", "a photo of the {}.")
CIFAR10_CLASSES = tuple("airplane automobile bird cat deer dog frog horse ship truck".split())
TINY_RECIPE = dict(model=TINY_CLIP, pretrained="none", lr=1e-3, warmup=10, batch_size=64)
TINY_RECIPE["eval_tasks"] = "synthetic,synthetic-stripes"
TV_TRAIN_TEST = ({"train": True}, {"train": False})
TV_SPLITS = ({"split": "train"}, {"split": "test"})
# As the release: partition 1's `train` alone is the official train split (`val` unused).
DTD_SPLITS = ({"split": "train", "partition": 1}, {"split": "test", "partition": 1})


def tv(name, dataset, classes, templates, epochs, layout, splits=TV_TRAIN_TEST, **task):
    """A torchvision.datasets task; `classes`: the names, or how many the data names."""
    names, n = (None, classes) if isinstance(classes, int) else (classes, len(classes))
    cls, subdir = getattr(torchvision.datasets, dataset), task.pop("subdir", "")

    def load(root, split, download):  # splits: the (train, test) keyword arguments
        folder = Path(root, subdir)
        make = lambda train: cls(folder, **splits[not train], download=download)  # noqa: E731
        return official_split(make, split)

    source = task.pop("source", f"torchvision.datasets.{dataset}")
    return Task(name, names, n, templates, epochs, load, layout, source, **task)


def synthetic(name, concept, classes, template):
    load = lambda root, split, download: SyntheticImages(concept, split)  # noqa: E731
    rule = "fixed seeds per split: 2400 / 240 / 600"
    return Task(
        name, classes, len(classes), (template,), 3, load, split_rule=rule, recipe=TINY_RECIPE
    )


PARTITION_1 = "partition 1: train minus a seeded 10% val; test"
# fmt: off
TASKS = {t.name: t for t in [  # tv(name, dataset, classes, templates, epochs, layout, splits)
    tv("cars", "StanfordCars", 196, CARS_TEMPLATES, 35, "stanford_cars/", TV_SPLITS,
       source="a mirror, by hand (torchvision's URL is dead), e.g. Kaggle's Stanford Cars"),
    tv("cifar10", "CIFAR10", CIFAR10_CLASSES, PHOTO_TEMPLATES, 10, "cifar-10-batches-py/"),
    tv("cifar100", "CIFAR100", 100, PHOTO_TEMPLATES, 10, "cifar-100-python/"),
    tv("dtd", "DTD", 47, DTD_TEMPLATES, 76, "dtd/dtd/", DTD_SPLITS, split_rule=PARTITION_1),
    Task("eurosat", EUROSAT_CLASSES, 10, EUROSAT_TEMPLATES, epochs=12, load=load_eurosat,
         layout="eurosat/2750/<class>/*.jpg", source="torchvision.datasets.EuroSAT",
         split_rule="seeded 80/10/10: 21600 / 2700 / 2700 (the release's is unpublished)"),
    tv("gtsrb", "GTSRB", GTSRB_CLASSES, GTSRB_TEMPLATES, 11, "gtsrb/GTSRB/", TV_SPLITS),
    Task("imagenet", IMAGENET_CLASSES, 1000, IMAGENET_TEMPLATES, epochs=10, load=load_imagenet,
         layout="imagenet/{train,val}/<wnid>/*.JPEG",
         source="image-net.org, by hand (ILSVRC2012), val sorted into wnid folders"),
    tv("mnist", "MNIST", tuple("0123456789"), DIGIT_TEMPLATES, 10, "MNIST/raw/"),
    Task("resisc45", None, 45, SATELLITE_TEMPLATES, epochs=15, load=load_resisc45,
         layout="resisc45/{NWPU-RESISC45/<class>/*.jpg,resisc45-train.txt,resisc45-test.txt}",
         source="NWPU-RESISC45 with its resisc45-{train,test}.txt, by hand (e.g. via torchgeo)",
         split_rule="train file minus a seeded 10% val; test file"),
    Task("sun397", None, 397, SUN397_TEMPLATES, epochs=14, load=load_sun397,
         layout="SUN397/{ClassName.txt,Training_01.txt,Testing_01.txt,<letter>/<class>/*.jpg}",
         source="torchvision.datasets.SUN397 (37 GB) and Partitions.zip", split_rule=PARTITION_1),
    tv("svhn", "SVHN", tuple("0123456789"), DIGIT_TEMPLATES, 10, "svhn/", TV_SPLITS, subdir="svhn"),
    synthetic("synthetic", "colour", tuple(SYNTHETIC_COLOURS), "a photo of a {} square."),
    synthetic("synthetic-stripes", "stripes", SYNTHETIC_STRIPES, "a photo of {} stripes."),
]}
# fmt: on


# ------------------------------------------------------------------------- checkpoints

RUN_FLAGS = "loss lam l2sp label_smoothing freeze_head reference model pretrained head seed"
RUN_FLAGS = RUN_FLAGS.split() + ["batch_size", "lr", "wd", "warmup", "grad_clip"]


def run_config(stage, args):
    """What a resumed stage must share with its checkpoint: flags, task, templates (eval.py
    rebuilds FLYP's head from them), length and taps."""
    derived = {"task": stage.task.name, "templates": list(stage.task.templates)}
    derived.update(epochs=stage.epochs, total_steps=stage.total_steps, taps=list(stage.taps))
    return {**{k: getattr(args, k) for k in RUN_FLAGS}, **derived}


def is_checkpoint_step(step, n, stage, args):
    epoch_end = step % (n // args.batch_size) == 0
    periodic = args.save_every and step % args.save_every == 0
    return epoch_end or periodic or step == stage.total_steps


def save_checkpoint(model, optimizer, init_head, step, stage, args):
    """Everything a bitwise-identical resume needs, as state dicts and plain values only."""
    if stage.rank != 0:
        return
    # No RNG state: batches and augmentations are seeded by the step and the image.
    checkpoint = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step)
    checkpoint.update(init_head=init_head, config=run_config(stage, args))
    atomic_save(checkpoint, stage.out / "checkpoint.pt")


def load_checkpoint(stage, args):
    """The stage's checkpoint for --resume, after checking it belongs to this run."""
    path = stage.out / "checkpoint.pt"
    try:
        checkpoint = torch.load(path, map_location=args.device, weights_only=True)
    except Exception as e:  # truncated or corrupt
        raise UserError(f"cannot read {path}: {one_line(e)}; delete it to start over") from e
    check_same_run(checkpoint["config"], "checkpoint", stage, args)
    return checkpoint


def check_same_run(saved, source, stage, args):
    """--resume must continue the run it finds: `saved`, the run_config its `source` recorded."""
    ours = run_config(stage, args)
    changed = [f"{k} {v} ({source}: {saved.get(k)})" for k, v in ours.items() if saved.get(k) != v]
    if changed:
        raise UsageError(f"--resume with other settings than the {source}: {', '.join(changed)}")


def restore(checkpoint, model, optimizer, stage):
    """Load a checkpoint, drop the log lines written after it; return its step."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    log = stage.out / "log.jsonl"
    if log.exists() and stage.rank == 0:
        lines = log.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= checkpoint["step"]]
        atomic_write(log, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
    return checkpoint["step"]


def check_out(args):
    """Without --resume, never overwrite a run (or a stage's); with it, there must be one."""
    found = [*args.out.glob("metrics.json"), *args.out.glob("*/metrics.json")]
    found += [*args.out.glob("checkpoint.pt"), *args.out.glob("*/checkpoint.pt")]
    if args.resume and not found:
        raise UsageError(f"--resume: no run in {args.out}; run without --resume to start")
    if found and not args.resume:
        raise UsageError(
            f"{args.out} holds a run: --resume it (same flags) or choose another --out"
        )


def save_outputs(clip, classifier, classnames, init_head, metrics, stage, args):
    """The fine-tuned CLIP as open_clip loads it, the head and its init (for WiSE-FT), metrics."""
    atomic_save(clip.state_dict(), stage.out / "open_clip_pytorch_model.bin")
    head = {k: v.detach().cpu() for k, v in classifier.head.state_dict().items()}
    init = {f"init_{k}": v.cpu() for k, v in init_head.items()}
    atomic_save({**head, **init, "classnames": list(classnames)}, stage.out / "head.pt")
    config = open_clip.get_model_config(args.model)
    if args.model.startswith("local-dir:"):  # its config, as it came
        config = json.loads(Path(args.model[10:], "open_clip_config.json").read_text())["model_cfg"]
    if config is not None:
        quick = needs_quick_gelu(args.model, args.pretrained)
        config["quick_gelu"] = config.get("quick_gelu", False) or quick
        both = {"model_cfg": config, "preprocess_cfg": clip.visual.preprocess_cfg}
        write_json(both, stage.out / "open_clip_config.json")
    write_json(metrics, stage.out / "metrics.json")


def write_json(obj, path):
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write(path, write):
    """write(tmp), then rename tmp to path: a killed run keeps the old file, never half of one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # runs sharing a cache may race
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after Ctrl-C or a full disk: it is as big as a checkpoint


def read_metrics(out):
    path = out / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load_finished_stage(clip, stage, args):
    """A stage that already finished: its encoder into clip.visual, and its head."""
    check_same_run(read_metrics(stage.out), "metrics.json", stage, args)
    load = functools.partial(torch.load, map_location=args.device, weights_only=True)
    clip.load_state_dict(load(stage.out / "open_clip_pytorch_model.bin"))
    head = load(stage.out / "head.pt")
    if stage.rank == 0:
        print(f"{stage.task.name}: already finished in {stage.out}; eval.py measures it further")
    return linear_head(head["weight"], head["bias"])


# ---------------------------------------------------------------------- the command line


class UserError(Exception):
    """A problem the user can fix; main prints it as one line, without a traceback."""


class UsageError(UserError):
    """A bad flag or argument: exit status 2, as argparse uses."""


class DataMissing(UserError):
    """A task's data is not there and cannot be fetched."""


@contextlib.contextmanager
def one_line_errors(prog):
    """A UserError, OSError or CUDA OOM as one line and exit 2 (bad usage) or 1; Ctrl-C: 130."""
    try:
        yield
    except KeyboardInterrupt:
        if not other_rank():  # torchrun stops the others when one rank fails: not their line
            print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except (UserError, OSError, torch.OutOfMemoryError) as e:
        message = str(e)
        if "Original Traceback" in message:  # re-raised by a DataLoader worker: ours is last
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        if isinstance(e, torch.OutOfMemoryError):  # a resume keeps its batch: its schedule
            message = f"{one_line(e)}; lower --batch-size (in a new run) or --eval-batch-size"
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)


def one_line(error, limit=200):
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


DATA_ROOT = os.environ.get("LDIFS_DATA", "~/data")
CACHE_DIR = os.environ.get("LDIFS_CACHE", "~/.cache/ldifs")
WORKERS = min(8, len(os.sched_getaffinity(0)))
DEFAULT_EVAL_TASKS = "cifar10,cifar100,mnist,svhn,gtsrb,dtd,eurosat"  # torchvision downloads them
RELEASE_RECIPE = dict(model="ViT-B-32", pretrained="openai", lr=1e-5, warmup=500, batch_size=128)
RELEASE_RECIPE["eval_tasks"] = DEFAULT_EVAL_TASKS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with defaults, but for switches and unset flags (the task's recipe, in [..])."""

    def _get_help_string(self, action):
        silent = action.default in (None, "") or isinstance(action.default, bool)
        return action.help if silent else super()._get_help_string(action)


def bounded(cast, low, inclusive=True, below=math.inf):
    """An argparse type: `cast(text)` >= low (> low unless `inclusive`) and < below; not NaN."""

    def parse(text):
        value = cast(text) + 0  # -0.0 is read as 0: --lam -0 would name its folder lam-0
        if not ((value >= low if inclusive else value > low) and value < below):
            limit = f"{'>=' if inclusive else '>'} {low}" + f" and < {below}" * (below < math.inf)
            raise argparse.ArgumentTypeError(f"must be {limit}, got {text}")
        return value

    parse.__name__ = cast.__name__  # argparse names it in "invalid float value"
    return parse


POSITIVE, COUNT, WEIGHT = bounded(int, 0, inclusive=False), bounded(int, 0), bounded(float, 0)


def parse_args(argv=None):
    about = "Fine-tune CLIP with LDIFS and measure concept forgetting. [..]: the task's recipe."
    p = argparse.ArgumentParser(description=about, formatter_class=HelpFormatter)
    add = p.add_argument
    add("--task", default="eurosat", help="a task, a,b,c for a continual run, or folder:PATH")
    add("--lam", type=WEIGHT, default=10.0, help="weight of the LDIFS distance; 0: plain FT")
    losses = "ce: the head's cross-entropy; flyp, flyp-ce: the release's FLYP (both towers train)"
    add("--loss", choices=["ce", "flyp", "flyp-ce"], default="ce", help=losses)
    add("--l2sp", type=WEIGHT, default=0.0, help="L2-SP baseline weight (the release uses 0.5)")
    smoothing = bounded(float, 0, below=1)
    add("--label-smoothing", type=smoothing, default=0.0, help="label-smoothing baseline's eps")
    ref = "continual runs: reference for task k = the encoder after task k-1, or the original"
    add("--reference", choices=["previous", "pretrained"], default="previous", help=ref)
    add("--model", help="open_clip model, hf-hub:org/repo or local-dir:PATH [ViT-B-32]")
    add("--pretrained", help="open_clip tag, checkpoint path, or 'none' [openai]")
    add("--taps", help="comma-separated tower submodules LDIFS compares [the tower's default]")
    head = "head init: linear probe or zero-shot (FLYP's is zero-shot: it trains no head)"
    add("--head", choices=["lp", "zs"], default="lp", help=head)
    add("--freeze-head", action="store_true", help="keep the head at its init (--loss ce)")
    add("--templates", help="prompt templates file, one a line with {} [the task's]")
    where = "where data is read and downloaded ($LDIFS_DATA)"
    add("--data-root", default=DATA_ROOT, help=where)
    add("--out", type=Path, help="run directory [runs/<task>-lam<lam>[-<loss>][-l2sp<a>]...]")
    add("--epochs", type=POSITIVE, help="training epochs per task [the release's for each task]")
    add("--max-steps", type=POSITIVE, help="stop after this many optimizer steps")
    add("--batch-size", type=POSITIVE, help="global batch size [128]")
    add("--lr", type=WEIGHT, help="peak AdamW learning rate [1e-5]")
    add("--wd", type=WEIGHT, default=0.1, help="AdamW weight decay")
    add("--warmup", type=COUNT, help="linear warm-up steps before the cosine decay [500]")
    add("--grad-clip", type=bounded(float, 0, False), default=1.0, help="gradient-norm clip")
    add("--seed", type=COUNT, default=0, help="seed for init, data order and augmentation")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    add("--device", type=torch.device, default=device, help="torch device")
    add("--workers", type=COUNT, default=WORKERS, help="data-loading worker processes")
    add("--eval-batch-size", type=POSITIVE, default=256, help="batch size for feature extraction")
    add("--log-every", type=POSITIVE, default=10, help="steps between log lines")
    add("--save-every", type=COUNT, default=1000, help="steps between checkpoints (and each epoch)")
    add("--resume", action="store_true", help="continue the run in --out")
    add("--no-download", dest="download", action="store_false", help="never download data")
    add("--eval-tasks", help=f"tasks to measure forgetting on, or 'none' [{DEFAULT_EVAL_TASKS}]")
    add("--cache-dir", default=CACHE_DIR, help="cache of pre-trained features ($LDIFS_CACHE)")
    add("--list-tasks", action="store_true", help="list the tasks and where their data goes")
    return p.parse_args(argv)


def list_tasks(root):
    print(f"{'task':17} {'classes':>7} {'templates':>9} {'download':>8}  data expected at")
    for t in TASKS.values():
        where = os.path.join(os.path.expanduser(root), t.layout) if t.layout else "(generated)"
        fetch = "auto" if t.source.startswith("torchvision") else "manual" if t.layout else "-"
        counts = f"{t.num_classes:>7} {len(t.templates):>9} {fetch:>8}"
        print(f"{t.name:17} {counts}  {where}  [split: {t.split_rule}]")
    print("folder:PATH: your own images in PATH/{train,test}/<class>/* (val/ optional)")


def resolve_args(args):
    """Fill the unset flags from the first task's recipe, once; return the tasks, in order."""
    tasks = [get_task(name.strip()) for name in args.task.split(",")]
    if args.templates:
        tasks = [dataclasses.replace(t, templates=read_templates(args.templates)) for t in tasks]
    names = [task.name for task in tasks]
    if len(set(names)) < len(names):
        raise UsageError(f"--task {args.task!r} repeats a task; a sequence visits each task once")
    if args.freeze_head and args.loss != "ce":
        raise UsageError(f"--freeze-head: --loss {args.loss} trains no head (FLYP has none)")
    recipe = {**RELEASE_RECIPE, **tasks[0].recipe}
    if args.model not in (None, recipe["model"]):  # a recipe's weights are those of its model
        recipe["pretrained"] = RELEASE_RECIPE["pretrained"]
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model.startswith(OWN_WEIGHTS):  # open_clip loads their own weights, not a tag
        args.pretrained = "none"
    if os.path.isfile(args.pretrained):  # recorded absolute, so eval.py finds it from anywhere
        args.pretrained = os.path.abspath(args.pretrained)
    if args.model.startswith("local-dir:"):  # the same for a folder of weights
        args.model = "local-dir:" + os.path.abspath(args.model.split(":", 1)[1])
    args.eval_tasks = [n for n in parse_eval_tasks(args.eval_tasks) if n not in names]
    if args.out is None:  # the loss and baselines too: an L2-SP run at --lam 0 is not FT's
        baselines = {"l2sp": args.l2sp, "ls": args.label_smoothing}
        parts = ["+".join(map(file_safe, names)), f"lam{args.lam:g}"]
        parts += [args.loss] * (args.loss != "ce") + ["frozen-head"] * args.freeze_head
        parts += [f"{k}{v:g}" for k, v in baselines.items() if v]
        args.out = Path("runs", "-".join(parts))
    check_model(args.model, args.pretrained)  # before any data is downloaded
    return tasks


def parse_eval_tasks(value):
    """The eval tasks named in `value` ('a,b' or 'none'), each once."""
    if value == "none":
        return []
    return list(dict.fromkeys(get_task(name.strip()).name for name in value.split(",")))


def read_templates(path):
    """--templates FILE: one prompt template a line, each with {} for the class name."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines or any("{}" not in line for line in lines):
        raise UsageError(f"--templates {path}: write one template a line, each with {{}}")
    return tuple(lines)


def setup_distributed(args):
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPUs); (rank, world)."""
    if "RANK" not in os.environ:
        return 0, 1
    cuda = args.device.type == "cuda"
    if cuda:  # "cuda" is then this process's GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # The other ranks wait while rank 0 downloads and evaluates: allow that an hour.
    timeout = datetime.timedelta(hours=1)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    world_size = torch.distributed.get_world_size()
    if args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size} must divide by the {world_size} ranks")
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
    if args.warmup > total_steps and not other_rank():
        warning = f"--warmup {args.warmup} > its {total_steps} steps: lr never peaks"
        print(f"ldifs.py: warning: {task.name}: {warning}", file=sys.stderr)
    return Stage(task, k, sequence, out, epochs, total_steps, tuple(taps), *shard)


def run(args):
    """Fine-tune on each task in turn (one task: a plain run), then summarise."""
    tasks = resolve_args(args)
    shard = setup_distributed(args)
    check_out(args)
    data = fetch_data(tasks, shard[0], args)
    torch.manual_seed(args.seed)
    clip, *transforms = load_clip(args.model, args.pretrained, args.device)
    taps = args.taps.split(",") if args.taps else default_tap_names(clip.visual)
    pretrained = frozen_copy(clip)  # both towers: FLYP trains the text tower too
    heads, matrix, main = {}, [], shard[0] == 0
    for k, task in enumerate(tasks):
        stage = plan_stage(k, tasks, len(data[task.name][0]), taps, shard, args)
        previous = k > 0 and args.reference == "previous"
        reference = frozen_copy(clip.visual) if previous else pretrained.visual
        heads[task.name] = finetune(
            clip, reference, pretrained, data[task.name], transforms, stage, args
        )
        if len(tasks) > 1 and main:  # test accuracy on each task so far, with its own head
            matrix.append([])
            for seen in tasks[: k + 1]:
                test = Transformed(data[seen.name][1], transforms[1])
                features = extract_features(clip.visual, test, args)
                head = scoring_head(clip, heads[seen.name], seen, args)  # FLYP: today's towers
                matrix[-1].append(probe_accuracy(head, *features))
    if len(tasks) > 1 and main:
        summarise_sequence(tasks, matrix, args)


def fetch_data(tasks, rank, args):
    """{task: (train, test)}, fetched before the model (under torchrun rank 0 first)."""
    if rank > 0:
        torch.distributed.barrier()
    load = functools.partial(get_dataset, root=args.data_root, download=args.download)
    data = {t.name: (load(t, "train"), load(t, "test")) for t in tasks}
    if rank == 0 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    for name, (train, _) in data.items():  # checked before any stage trains
        if len(train) < args.batch_size:
            raise UsageError(f"--batch-size {args.batch_size} > the {len(train)} images of {name}")
    return data


def finetune(clip, reference, pretrained, data, transforms, stage, args):
    """One stage: train (or load) clip.visual and a head, or for FLYP both towers, on (train,
    test) `data`; save, report; return the stage's head."""
    (train_images, test_data), (train_transform, eval_transform) = data, transforms
    resume = args.resume and (stage.out / "checkpoint.pt").exists()
    checkpoint = load_checkpoint(stage, args) if resume else None  # it checks the flags
    if args.resume and finished(read_metrics(stage.out)):  # checkpoint kept or not
        return load_finished_stage(clip, stage, args)
    stage.out.mkdir(parents=True, exist_ok=True)
    if checkpoint:  # restore() loads the trained head over its init
        head = linear_head(checkpoint["init_head"]["weight"], checkpoint["init_head"]["bias"])
    else:
        head = initial_head(clip, stage.task, eval_transform, stage, args)
    init_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
    head.requires_grad_(not args.freeze_head)
    clip.logit_scale.requires_grad_(args.loss != "flyp")  # FLYP's is a constant, as in the release
    model = ImageClassifier(clip.visual, head) if args.loss == "ce" else clip
    optimizer = make_optimizer(model.parameters(), args)
    start_step = restore(checkpoint, model, optimizer, stage) if checkpoint else 0
    classnames = class_names(stage.task, args.data_root)
    flyp = args.loss != "ce"
    tokens = prompt_tokens(classnames, stage.task.templates, args.model) if flyp else None
    start, images = time.perf_counter(), Transformed(train_images, train_transform, args.seed)
    metrics = train(model, reference, images, tokens, optimizer, init_head, start_step, stage, args)
    classifier = ImageClassifier(clip.visual, scoring_head(clip, head, stage.task, args))
    if stage.rank == 0:
        metrics.update(train_seconds=time.perf_counter() - start, **run_config(stage, args))
        if start_step == stage.total_steps:  # resumed only to evaluate: nothing was measured
            metrics.update(measured_before(stage.out, args.eval_tasks))
        metrics.update(eval_tasks=args.eval_tasks, world_size=stage.world_size)
        metrics.update(data_root=os.path.abspath(os.path.expanduser(args.data_root)))
        metrics.update(stage=stage.index, sequence=list(stage.sequence))
        save_outputs(clip, classifier, classnames, init_head, metrics, stage, args)  # nothing lost
        report(clip, classifier, pretrained, test_data, eval_transform, metrics, stage, args)
    return classifier.head


def finished(metrics):
    """Whether a stage finished: one killed while measuring forgetting has no table yet."""
    return "test_accuracy" in metrics and ("forgetting" in metrics or not metrics.get("eval_tasks"))


def measured_before(out, eval_tasks):
    """The figures and forgetting rows that an earlier, killed process of this stage saved."""
    measures = ["train_seconds", "train_images_per_second", "peak_memory_mb"]
    measures += ["forgetting_so_far"] if eval_tasks else []
    return {k: v for k, v in read_metrics(out).items() if k in measures}


def report(clip, classifier, pretrained, test_data, transform, metrics, stage, args):
    """The saved stage's target accuracy and forgetting against the pre-trained encoder."""
    test = extract_features(classifier.visual, Transformed(test_data, transform), args)
    metrics["test_accuracy"] = probe_accuracy(classifier.head, *test)
    write_json(metrics, stage.out / "metrics.json")  # kept if killed in the long part below
    rate = metrics["train_images_per_second"]
    shown = "-" if rate is None else f"{rate:.1f}"
    accuracy = f"test accuracy {metrics['test_accuracy']:.4f} after {metrics['steps']} steps"
    print(f"{stage.task.name}: {accuracy} ({shown} images/s); outputs in {stage.out}")
    if not args.eval_tasks:
        return
    metrics["forgetting"] = evaluate_forgetting(
        pretrained, clip, transform, metrics, stage.out, args
    )
    write_json(metrics, stage.out / "metrics.json")
    print(f"\nConcept forgetting after fine-tuning on {stage.task.name} (lam {args.lam:g}), %:\n")
    print(forgetting_table(metrics["forgetting"]))


def main(argv=None):
    logging.basicConfig(level=logging.CRITICAL)  # open_clip logs errors we re-state in one line
    args = parse_args(argv)
    try:
        with one_line_errors("ldifs.py"):
            if args.list_tasks:
                return list_tasks(args.data_root)
            run(args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
