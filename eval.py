"""Compare saved ldifs.py runs for concept forgetting, as the paper's tables do.

    python eval.py runs/eurosat-lam0 runs/eurosat-lam10
    python eval.py RUN [RUN ...] [--tasks a,b] [--wise-ft 0.25,0.5,0.75] [--json F] [--plot F.png]

Rows: the pre-trained model the runs started from, each run, and each run's WiSE-FT mixes
((1 - alpha) * start + alpha * fine-tuned CLIP and head, the start being the pre-trained
CLIP, or for stage k > 0 of a continual run stage k-1's). Columns: the run's own test
accuracy on its target task, the linear-probe accuracy A_LP on every eval task, Delta_LP =
A_LP(row) - A_LP(pre-trained), and their averages over the eval tasks other than the run's
target, as the paper's. Runs may have different target tasks, but must share the model and
pre-trained weights. --by-method prints the paper's table: one row per method, averaged over
the runs' target tasks.
"""

import argparse
import copy
import functools
import json
import logging
import os
import sys
from pathlib import Path

import torch

import ldifs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.formatter_class = ldifs.HelpFormatter
    add = p.add_argument
    add("runs", nargs="+", type=Path, help="run directories written by ldifs.py")
    tasks = "comma-separated eval tasks [those the runs were evaluated on]"
    add("--tasks", "--eval-tasks", help=tasks)  # the second as ldifs.py names it
    add("--wise-ft", type=mixing_weights, help="WiSE-FT weights alpha, e.g. 0.25,0.5 [none]")
    add("--by-method", action="store_true", help="also a row per method over its target tasks")
    add("--json", type=Path, help="also write the results here")
    add("--plot", type=Path, help="also plot accuracy against forgetting: PNG, PDF...")
    add("--plot-x", choices=["delta_lp", "a_lp"], default="delta_lp", help="the plot's x axis")
    data = "where the data is [the runs' own, else $LDIFS_DATA or ~/data, as in ldifs.py]"
    add("--data-root", help=data)
    add("--cache-dir", default=ldifs.CACHE_DIR, help="as in ldifs.py ($LDIFS_CACHE)")
    add("--no-download", dest="download", action="store_false", help="never download data")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    add("--device", type=torch.device, default=device, help="torch device")
    add("--workers", type=ldifs.COUNT, default=ldifs.WORKERS, help="data-loading workers")
    batch = "batch size for feature extraction"
    add("--eval-batch-size", type=ldifs.POSITIVE, default=256, help=batch)
    return p.parse_args(argv)


def mixing_weights(text):
    """--wise-ft: comma-separated alphas in [0, 1]."""
    alphas = [float(a) for a in text.split(",")]
    if not all(0 <= a <= 1 for a in alphas):
        raise argparse.ArgumentTypeError(f"the weights must lie in [0, 1], got {text}")
    return alphas


def load_run(path):
    """A run's metrics, CLIP weights and head; a continual run's folder stands for its last
    stage."""
    if not (path / "metrics.json").is_file():
        raise ldifs.UsageError(f"{path} is no finished run of ldifs.py (no metrics.json)")
    metrics = ldifs.read_metrics(path)
    if "accuracy_matrix" in metrics:  # a continual run's summary
        tasks = metrics["tasks"]
        return load_run(path / ldifs.stage_folder(len(tasks) - 1, tasks[-1]))
    load = functools.partial(torch.load, map_location="cpu", weights_only=True, mmap=True)
    weights, head = load(path / "open_clip_pytorch_model.bin"), load(path / "head.pt")
    start = start_weights(path, metrics, load)
    return {"path": path, "metrics": metrics, "weights": weights, "head": head, "start": start}


def start_weights(path, metrics, load):
    """The CLIP weights stage k > 0 of a continual run started from, stage k-1's; None for a
    run that started from the pre-trained weights."""
    k = metrics.get("stage", 0)
    if not k:
        return None
    previous = path.parent / ldifs.stage_folder(k - 1, metrics["sequence"][k - 1])
    return load(previous / "open_clip_pytorch_model.bin")


def data_root(args, runs):
    """--data-root, or the first run's own (ldifs.py records it) that is there: eval.py reads
    the data the runs were trained with rather than download it again elsewhere."""
    recorded = [run["metrics"].get("data_root") or "" for run in runs]
    return args.data_root or next((r for r in recorded if os.path.isdir(r)), ldifs.DATA_ROOT)


def check_same_start(runs):
    """The model, weights and seed the runs started from: their `ldifs.weights_key`s match."""
    starts = {}
    for run in runs:
        m = run["metrics"]
        key = ldifs.weights_key(m["model"], m["pretrained"], m["seed"])
        starts[json.dumps(key, sort_keys=True)] = m["model"], m["pretrained"], key.get("seed")
    if len(starts) > 1:
        seeded = [f"{m} / {p}" + f" (seed {s})" * (s is not None) for m, p, s in starts.values()]
        raise ldifs.UsageError(f"runs start from different weights: {'; '.join(seeded)}")
    return starts.popitem()[1]


def method_label(metrics):
    """FT, LDIFS, L2-SP, LS (label smoothing), FLYP or FLYP-CE, as the paper names them; the
    head init when it is not LP-init; a frozen head; and for a continual stage, the sequence."""
    lam, alpha, eps = metrics["lam"], metrics.get("l2sp", 0), metrics.get("label_smoothing", 0)
    loss = metrics.get("loss", "ce")
    methods = [loss.upper()] * (loss != "ce") + [f"LDIFS (lam {lam:g})"] * bool(lam)
    methods += [f"L2-SP (alpha {alpha:g})"] * bool(alpha) + [f"LS (eps {eps:g})"] * bool(eps)
    label = " + ".join(methods) or "FT"
    if metrics.get("head") == "zs" and loss == "ce":
        label += ", ZS-init"
    if metrics.get("freeze_head"):
        label += ", frozen head"
    sequence = metrics.get("sequence") or []
    if len(sequence) > 1:
        label += f", continual {' > '.join(sequence[: metrics['stage'] + 1])}"
    return label


def run_labels(runs):
    """Each run's row label: its task and method, and its folder where runs share them (two
    seeds, say), so that no two rows read alike."""
    labels = [f"{run['metrics']['task']} {method_label(run['metrics'])}" for run in runs]
    return [
        label if labels.count(label) == 1 else f"{label} ({run['path']})"
        for label, run in zip(labels, runs, strict=True)
    ]


def wise_ft(pretrained, finetuned, alpha):
    """WiSE-FT: (1 - alpha) * pretrained + alpha * finetuned, tensor by tensor."""
    mix = lambda k: torch.lerp(pretrained[k].float(), finetuned[k].float(), alpha)  # noqa: E731
    return {k: mix(k).to(pretrained[k].dtype) for k in pretrained}


def mixed_head(clip, head, alpha, metrics, args):
    """The head of a WiSE-FT mix: the initial and final heads mixed alike or, for FLYP, which
    trains no head, the zero-shot head of the mixed text tower (the WiSE-FT paper's way)."""
    if metrics.get("loss", "ce") == "ce":
        mixed = [torch.lerp(head[f"init_{k}"], head[k], alpha) for k in ("weight", "bias")]
        return ldifs.linear_head(*mixed).to(args.device)
    tokenizer = ldifs.tokenizer_of(metrics["model"])
    names, templates = head["classnames"], metrics["templates"]
    return ldifs.zero_shot_head(clip, tokenizer, names, templates, args.device)


def probe_row(encoder, tasks, transform, args, weights=None):
    """{task: A_LP} of the encoder, cached under `weights`, the pre-trained encoder's
    `weights_key` (its features are cached too), or else under a digest of the encoder."""
    named = weights or ldifs.encoder_digest(encoder)
    return {
        name: ldifs.cached_linear_probe(
            encoder, ldifs.get_task(name), transform, args, named, weights
        )
        for name in tasks
    }


def eval_tasks(runs, args):
    """--tasks, or the tasks the runs were evaluated on; one whose data is missing is skipped
    with a warning."""
    if args.tasks is not None:
        names = ldifs.parse_eval_tasks(args.tasks)
    else:
        names = list(dict.fromkeys(t for r in runs for t in r["metrics"].get("eval_tasks", [])))
    kept = []
    for name in names:
        try:
            ldifs.get_dataset(name, "test", args.data_root, download=args.download)
            kept.append(name)
        except ldifs.DataMissing as e:
            print(f"eval.py: warning: skipping {name}: {e}", file=sys.stderr)
    return kept


def rows_for_run(run, label, clip, transform, tasks, alphas, baseline, args):
    """The run's row and one per WiSE-FT mix: target accuracy with the mixed head, A_LP. The
    mix starts (alpha 0) from the CLIP the run started from, on whose features its initial
    head was fit: the pre-trained one, or for a continual stage k > 0, stage k-1's."""
    metrics, rows, method = run["metrics"], [], method_label(run["metrics"])
    test = ldifs.get_dataset(metrics["task"], "test", args.data_root, transform, args.download)
    on_device = lambda weights: {k: v.to(args.device) for k, v in weights.items()}  # noqa: E731
    finetuned, start = on_device(run["weights"]), on_device(run["start"] or clip.state_dict())
    for alpha in dict.fromkeys([1.0, *alphas]):  # alpha 1 is the run's own row: once
        model = copy.deepcopy(clip)
        model.load_state_dict(wise_ft(start, finetuned, alpha))
        head = mixed_head(model, run["head"], alpha, metrics, args)
        accuracy = ldifs.probe_accuracy(head, *ldifs.extract_features(model.visual, test, args))
        # alpha 0 of a run from the pre-trained CLIP: its A_LP is the baseline's
        pretrained_point = alpha == 0 and run["start"] is None
        a_lp = baseline if pretrained_point else probe_row(model.visual, tasks, transform, args)
        mix = "" if alpha == 1.0 else f"WiSE-FT alpha {alpha:g} of "
        name = label if alpha == 1.0 else f"  {mix}{label}"
        row = dict(label=name, method=mix + method, run=str(run["path"]), task=metrics["task"])
        rows.append(dict(row, alpha=alpha, target_accuracy=accuracy, a_lp=a_lp))
    return rows


def mean(values):
    """The mean of the values that are there (None where none is)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def add_deltas(rows, baseline):
    """Δ_LP per task, and the averages over the tasks but a run's own target, as the paper's."""
    for row in rows:
        row["delta_lp"] = {t: row["a_lp"][t] - baseline[t] for t in baseline}
        others = [t for t in baseline if t != row.get("task")]
        row["avg_a_lp"] = mean([row["a_lp"][t] for t in others])
        row["avg_delta_lp"] = mean([row["delta_lp"][t] for t in others])


AVERAGED = ("target_accuracy", "avg_a_lp", "avg_delta_lp")


def by_method(rows):
    """The paper's table: per method (its label less the target task), the mean over target
    tasks of the mean over that task's runs (seeds, say), and how many target tasks."""
    methods = {}
    for row in rows:
        methods.setdefault(row["method"], {}).setdefault(row["task"], []).append(row)
    table = []
    for method, targets in methods.items():
        per_task = [{k: mean(r[k] for r in runs) for k in AVERAGED} for runs in targets.values()]
        means = {k: mean(p[k] for p in per_task) for k in AVERAGED}
        table.append(dict(method=method, **means, target_tasks=len(targets)))
    return table


def pct(value, sign=""):
    return "-" if value is None else f"{100 * value:{sign}.1f}"


def markdown(rows, tasks):
    head = ["model", "target acc", *(f"A_LP {t}" for t in tasks), *(f"Δ_LP {t}" for t in tasks)]
    table = []
    for i, r in enumerate(rows):
        deltas = [*r["delta_lp"].values(), r["avg_delta_lp"]] if i else [None] * (len(tasks) + 1)
        cells = [r["label"], pct(r["target_accuracy"]), *(pct(r["a_lp"][t]) for t in tasks)]
        cells += [pct(d, "+") for d in deltas[:-1]] + [pct(r["avg_a_lp"]), pct(deltas[-1], "+")]
        table.append(cells)
    return ldifs.markdown_table(head + ["avg A_LP", "avg Δ_LP"], table)


def method_markdown(table):
    head = ["method", "target tasks", "target acc", "avg A_LP", "avg Δ_LP"]
    rows = [
        [r["method"], str(r["target_tasks"]), pct(r["target_accuracy"]), pct(r["avg_a_lp"])]
        + [pct(r["avg_delta_lp"], "+")]
        for r in table
    ]
    return ldifs.markdown_table(head, rows)


def evaluate(args):
    runs = [load_run(path) for path in args.runs]
    args = argparse.Namespace(**{**vars(args), "data_root": data_root(args, runs)})
    model, pretrained, seed = check_same_start(runs)
    alphas = args.wise_ft or []
    if args.plot:  # the curves start at the pre-trained point: alpha 0 gives its target accuracy
        pyplot()  # matplotlib is optional: say so before the evaluation
        alphas = sorted(set(alphas) | {0.0})
    tasks = eval_tasks(runs, args)
    if args.plot and not tasks:  # its x axis averages over them
        raise ldifs.UsageError("--plot needs an eval task whose data is there; name it in --tasks")
    if seed is not None:  # random weights: draw the ones the runs started from, as ldifs.py did
        torch.manual_seed(seed)
    clip, _, transform = ldifs.load_clip(model, pretrained, args.device)
    weights = ldifs.weights_key(model, pretrained, seed)
    baseline = probe_row(clip.visual.eval(), tasks, transform, args, weights)
    rows = [{"label": baseline_label(model, pretrained), "target_accuracy": None, "a_lp": baseline}]
    for run, label in zip(runs, run_labels(runs), strict=True):
        rows += rows_for_run(run, label, clip, transform, tasks, alphas, baseline, args)
    add_deltas(rows, baseline)
    methods = by_method(rows[1:])
    if args.plot:
        plot(rows[1:], args.plot, args.plot_x)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        results = {"model": model, "pretrained": pretrained, "tasks": tasks, "rows": rows}
        ldifs.write_json({**results, "by_method": methods}, args.json)
    print(markdown(rows, tasks))
    if args.by_method:
        print(f"\nBy method, averaged over target tasks:\n\n{method_markdown(methods)}")
    return rows


def baseline_label(model, pretrained):
    """The pre-trained row's label: the model, and its weights unless they come with it."""
    if model.startswith(ldifs.OWN_WEIGHTS):
        return f"pre-trained {model}"
    return f"pre-trained {model} ({'/'.join(Path(pretrained).parts[-2:])})"


def pyplot():
    """matplotlib's pyplot, drawing to files; it is needed for --plot alone."""
    try:
        import matplotlib
    except ImportError:
        raise ldifs.UsageError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows, path, x_key):
    """Target accuracy against average A_LP or Δ_LP: per run, its WiSE-FT curve from where it
    started (alpha 0, a star) to the run (alpha 1, labelled with its method). Labels point
    inwards from the points on the right half, so none runs off the axes."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    runs = dict.fromkeys(row["run"] for row in rows)
    curves = [
        sorted((r for r in rows if r["run"] == run), key=lambda r: r["alpha"]) for run in runs
    ]
    points = [[(100 * r[f"avg_{x_key}"], 100 * r["target_accuracy"]) for r in c] for c in curves]
    lines = [axes.plot(*zip(*xy, strict=True), "o-", markersize=3)[0] for xy in points]
    for xy in points:
        axes.plot(*xy[0], "*", color="black", markersize=12)
    axes.margins(0.1, 0.15)  # room for the labels above the points
    middle = sum(axes.get_xlim()) / 2
    for curve, (x, y), line in zip(curves, [xy[-1] for xy in points], lines, strict=True):
        side = dict(ha="right", xytext=(-5, 5)) if x > middle else dict(ha="left", xytext=(5, 5))
        style = dict(color=line.get_color(), fontsize=8, textcoords="offset points", **side)
        axes.annotate(curve[-1]["label"], (x, y), **style)
    axes.plot([], [], "*", color="black", label="start (alpha 0)")
    x_name = "average Δ_LP" if x_key == "delta_lp" else "average A_LP"
    axes.set_xlabel(f"{x_name} over eval tasks (%)")
    axes.set_ylabel("target accuracy (%)")
    axes.set_title("Target accuracy against forgetting (lines: WiSE-FT)")
    axes.legend(loc="lower left")
    figure.tight_layout()
    options = dict(format=path.suffix[1:] or "png", dpi=120)  # the name's, not the .tmp file's
    path.parent.mkdir(parents=True, exist_ok=True)
    ldifs.atomic_write(path, lambda tmp: figure.savefig(tmp, **options))
    plt.close(figure)


def main(argv=None):
    logging.basicConfig(level=logging.CRITICAL)  # open_clip logs errors we re-state in one line
    args = parse_args(argv)
    with ldifs.one_line_errors("eval.py"):
        evaluate(args)


if __name__ == "__main__":
    main()
