"""Compare saved ldifs.py runs for concept forgetting, as the paper's tables do.

    python eval.py runs/eurosat-lam0 runs/eurosat-lam10
    python eval.py RUN [RUN ...] [--tasks a,b] [--wise-ft 0.25,0.5,0.75] [--json F] [--plot F.png]

Rows: the pre-trained model the runs started from, each run, and each run's WiSE-FT mixes
((1 - alpha) * start + alpha * fine-tuned image encoder and head, the start being the
pre-trained encoder, or for stage k > 0 of a continual run stage k-1's). Columns: the run's
own test accuracy on its target task, the linear-probe accuracy A_LP on every eval task,
Delta_LP = A_LP(row) - A_LP(pre-trained), and the averages. Runs may have different target
tasks, but must share the model and pre-trained weights.
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
    p = ldifs.ArgumentParser(__doc__.split("\n\n")[0])
    add = p.add_argument
    add("runs", nargs="+", type=ldifs.user_path, help="run directories written by ldifs.py")
    tasks = "comma-separated eval tasks [those the runs were evaluated on]"
    add("--tasks", "--eval-tasks", help=tasks)  # the second as ldifs.py names it
    add("--wise-ft", type=mixing_weights, default=[], help="WiSE-FT weights alpha, e.g. 0.25,0.5")
    add("--json", type=ldifs.user_path, help="also write the results here")
    add("--plot", type=ldifs.user_path, help="also plot accuracy against forgetting: PNG, PDF...")
    add("--plot-x", choices=["delta_lp", "a_lp"], default="delta_lp", help="the plot's x axis")
    data = "where the data is [the runs' own, else $LDIFS_DATA or ~/data, as in ldifs.py]"
    cache = "as in ldifs.py ($LDIFS_CACHE)"
    add("--data-root", type=ldifs.user_path, help=data)
    add("--cache-dir", type=ldifs.user_path, default=ldifs.CACHE_DIR, help=cache)
    add("--no-download", dest="download", action="store_false", help="never download data")
    add("--device", type=ldifs.pick_device, default="", help="torch device [cuda if available]")
    add("--workers", type=int, default=ldifs.WORKERS, help="data-loading worker processes")
    add("--eval-batch-size", type=int, default=256, help="batch size for feature extraction")
    args = p.parse_args(argv)
    problems = ldifs.out_of_range(args, ["eval_batch_size"], ["workers"])  # as ldifs.py checks
    if problems:
        p.error("; ".join(problems))
    return args


def mixing_weights(text):
    """--wise-ft: comma-separated alphas in [0, 1]."""
    try:
        alphas = [float(a) for a in text.split(",") if a]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None
    if not alphas:  # --wise-ft "$ALPHAS" with ALPHAS unset: not a silent run without WiSE-FT
        raise argparse.ArgumentTypeError("names no weight; e.g. 0.25,0.5")
    if any(not 0 <= a <= 1 for a in alphas):
        raise argparse.ArgumentTypeError(f"the weights must lie in [0, 1], got {text}")
    return alphas


def load_run(path):
    """A run's metrics, CLIP weights and head, or a UsageError if `path` is not a run. A
    continual run's folder stands for its last stage."""
    if not (path / "metrics.json").is_file():
        raise ldifs.UsageError(not_a_run(path))
    metrics = ldifs.read_metrics(path)
    problem = wrong_type(metrics) or continual_problem(metrics)
    if problem:  # a field edited by hand; said before the weights load
        raise ldifs.UserError(f"{path / 'metrics.json'}: {problem}; fix it or run ldifs.py again")
    if "accuracy_matrix" in metrics:  # a continual run's summary: its last stage stands for it
        tasks = metrics["tasks"]
        return load_run(path / ldifs.stage_folder(len(tasks) - 1, tasks[-1]))
    missing = [key for key in ("lam", "model", "pretrained", "seed", "task") if key not in metrics]
    if missing:  # what the table and the start check read; said before the weights load
        raise ldifs.UserError(
            f"{path / 'metrics.json'} has no {', '.join(missing)}: written by an older "
            "ldifs.py; run it again"
        )
    try:
        load = functools.partial(torch.load, map_location="cpu", weights_only=True, mmap=True)
        weights = load(path / "open_clip_pytorch_model.bin")
        head = ldifs.load_head(path / "head.pt", load)
        start = start_weights(path, metrics, load)
    except Exception as e:  # truncated, corrupt or foreign files
        raise ldifs.UserError(f"cannot read run {path}: {ldifs.one_line(e)}") from e
    return {"path": path, "metrics": metrics, "weights": weights, "head": head, "start": start}


# What each metrics.json field that eval.py reads holds, as ldifs.py writes it
KINDS = {  # by exact type: JSON's true and false load as bools, which isinstance counts as ints
    "a number": lambda value: type(value) in (int, float),
    "an integer": lambda value: type(value) is int,
    "a string": lambda value: isinstance(value, str),
    "a list of names": lambda names: (
        isinstance(names, list) and all(isinstance(name, str) for name in names)
    ),
}
FIELD_KINDS = dict.fromkeys(["lam", "l2sp", "label_smoothing"], "a number")
FIELD_KINDS |= dict.fromkeys(["seed", "stage"], "an integer")
FIELD_KINDS |= dict.fromkeys(["model", "pretrained", "task", "head", "data_root"], "a string")
FIELD_KINDS |= dict.fromkeys(["sequence", "eval_tasks", "tasks"], "a list of names")


def wrong_type(metrics):
    """The first field edited by hand into another type, if any: "lam": "10" would end in a
    traceback, and "sequence": "synthetic" label the run "continual s"."""
    for field, kind in FIELD_KINDS.items():
        if field in metrics and not KINDS[kind](metrics[field]):
            return f"{field} is not {kind}"
    return None


def continual_problem(metrics):
    """A continual summary's tasks name the stage that stands for it, and a stage's place in
    its sequence names its label and the weights it started from: removed or edited by hand,
    they ended in a traceback or a misleading error."""
    sequence = metrics.get("sequence") or []
    if "accuracy_matrix" in metrics and not metrics.get("tasks"):
        return "tasks is missing or empty"
    if len(sequence) > 1 and metrics.get("stage") not in range(len(sequence)):
        return f"stage is missing or not 0 to {len(sequence) - 1}, a place in the sequence"
    return None


def resolve_data_root(args, runs):
    """Fill an unset --data-root, once: the first run's own (ldifs.py records it) that is
    there, so eval.py reads the data the runs were trained with rather than downloading it
    again elsewhere; ldifs.py's default for older runs and runs copied from another machine."""
    if args.data_root is None:
        recorded = [run["metrics"].get("data_root") or "" for run in runs]
        there = [Path(root) for root in recorded if os.path.isdir(root)]
        args.data_root = there[0] if there else ldifs.user_path(ldifs.DATA_ROOT)


def not_a_run(path):
    """Why `path`, which has no metrics.json, is no run: it is missing (a typo), a file, a run
    still training, a run killed before it finished (its checkpoint, or its stages' folders,
    named k-task), the folder that holds runs, or none of these."""
    if not path.exists():
        return f"no such folder: {path}"
    if path.is_file():  # a run's metrics.json, or a file that runs/* caught
        return f"{path} is a file, not a run directory of ldifs.py"
    if training(path):  # --resume, the advice for a killed run, would be refused
        return f"{path} is a run that ldifs.py is still training; name it once it ends"
    files = ldifs.run_files_in(path)
    if any(p.parent == path or p.parent.name.partition("-")[0].isdigit() for p in files):
        return f"{path} is an unfinished run: finish it with ldifs.py --resume (no metrics.json)"
    if files:
        return f"{path} holds runs but is not one; name them, e.g. {min(files).parent}"
    return f"{path} is not a run directory of ldifs.py (no metrics.json)"


def training(path):
    """Whether an ldifs.py run holds `path` now, as it does while it trains there."""
    if not (path / ".lock").is_file():  # else locked() would make one
        return False
    try:
        with ldifs.locked(path / ".lock", functools.partial(ldifs.in_use, path)):
            return False
    except ldifs.UsageError:
        return True


def check_named_once(paths, runs):
    """A run named twice, under any spelling of its path or as a continual run's folder and
    its last stage's, would be evaluated and tabled twice."""
    seen = {}
    for path, run in zip(paths, runs, strict=True):
        key = run["path"].resolve()
        if key in seen:
            raise ldifs.UsageError(f"{path} is {seen[key]} again; name each run once")
        seen[key] = path


def start_weights(path, metrics, load):
    """The CLIP weights stage k > 0 of a continual run started from, stage k-1's; None for a
    run that started from the pre-trained weights."""
    k = metrics.get("stage", 0)
    if not k:
        return None
    previous = path.parent / ldifs.stage_folder(k - 1, metrics["sequence"][k - 1])
    return load(previous / "open_clip_pytorch_model.bin")


def check_same_start(runs):
    """The model, weights and seed the runs started from: their `ldifs.weights_key` must
    match, which says when the seed matters and ignores what open_clip ignores."""
    starts = {}
    for run in runs:
        check_start_is_there(run)
        m = run["metrics"]
        key = ldifs.weights_key(m["model"], m["pretrained"], m["seed"])
        starts[json.dumps(key, sort_keys=True)] = m["model"], m["pretrained"], key.get("seed")
    if len(starts) > 1:
        both = "; ".join(
            f"{m} / {p}" + f" (seed {s})" * (s is not None) for m, p, s in sorted(starts.values())
        )
        raise ldifs.UsageError(
            f"runs start from different models or weights ({both}); "
            "compare runs of one pre-trained model per call"
        )
    return starts.popitem()[1]


def check_start_is_there(run):
    """The weights file or local-dir: folder a run started from (ldifs.py records them
    absolute) must still be where it was."""
    m = run["metrics"]
    local = m["model"].split(":", 1)[1] if m["model"].startswith("local-dir:") else None
    path = local or (m["pretrained"] if os.path.isabs(m["pretrained"]) else None)
    if path and not os.path.exists(path):
        raise ldifs.UserError(f"{run['path']} started from {path}, which is gone; put it back")


def method_label(metrics):
    """FT, LDIFS, L2-SP or LS (label smoothing), as the paper names them; the head init when
    it is not LP-init; and, for a stage of a continual run, the sequence up to it."""
    lam, alpha, eps = metrics["lam"], metrics.get("l2sp", 0), metrics.get("label_smoothing", 0)
    methods = [f"LDIFS (lam {lam:g})"] * bool(lam) + [f"L2-SP (alpha {alpha:g})"] * bool(alpha)
    label = " + ".join(methods + [f"LS (eps {eps:g})"] * bool(eps)) or "FT"
    if metrics.get("head") == "zs":
        label += ", ZS-init"
    sequence = metrics.get("sequence") or []
    if len(sequence) > 1:
        label += f", continual {' > '.join(sequence[: metrics['stage'] + 1])}"
    return label


def wise_ft(pretrained, finetuned, alpha):
    """WiSE-FT: (1 - alpha) * pretrained + alpha * finetuned, tensor by tensor."""
    mix = lambda k: torch.lerp(pretrained[k].float(), finetuned[k].float(), alpha)  # noqa: E731
    return {k: mix(k).to(pretrained[k].dtype) for k in pretrained}


def probe_row(encoder, tasks, transform, args, weights=None):
    """{task: A_LP} of the encoder, kept in the cache: under `weights`, the pre-trained
    encoder's `weights_key`, whose features are kept too, or else under a digest of the
    encoder (every mix's features would fill the disk)."""
    named = weights or ldifs.encoder_digest(encoder)
    return {
        name: ldifs.cached_linear_probe(
            encoder, ldifs.get_task(name), transform, args, named, weights
        )
        for name in tasks
    }


def eval_tasks(runs, args):
    """--tasks, or the tasks the runs were evaluated on; one whose data is missing, or whose
    folder is gone for a folder:PATH task the runs recorded, is skipped with a warning."""
    recorded = [t for r in runs for t in r["metrics"].get("eval_tasks", [])]
    if args.tasks is not None:  # typed, so checked; recorded ones were checked by ldifs.py
        names = ldifs.parse_eval_tasks(args.tasks, "--tasks")
    elif recorded:
        names = recorded
    else:  # not the release's seven: they are gigabytes to fetch
        print(
            "eval.py: warning: the runs were evaluated on no task; name some with --tasks",
            file=sys.stderr,
        )
        names = []
    kept = []
    for name in dict.fromkeys(names):
        try:
            ldifs.get_dataset(name, "test", args.data_root, download=args.download)
            kept.append(name)
        except ldifs.UserError as e:  # missing data, or a recorded folder task that is gone
            print(f"eval.py: warning: skipping {name}: {e}", file=sys.stderr)
    return kept


def check_target_data(runs, args):
    """Each run's own test data, before anything is evaluated: its target accuracy needs it."""
    for run in runs:
        task = run["metrics"]["task"]
        try:
            ldifs.get_dataset(task, "test", args.data_root, download=args.download)
        except ldifs.UserError as e:  # missing data, or a folder:PATH task whose folder moved
            raise type(e)(f"run {run['path']}: {e}") from e


def run_labels(runs):
    """Each run's row label: its task and method, and its folder where runs share them (two
    seeds, say), so that no two rows read alike."""
    labels = [f"{run['metrics']['task']} {method_label(run['metrics'])}" for run in runs]
    return [
        label if labels.count(label) == 1 else f"{label} ({run['path']})"
        for label, run in zip(labels, runs, strict=True)
    ]


def rows_for_run(run, label, pretrained, transform, tasks, alphas, baseline, args):
    """The run's row and one per WiSE-FT mix: target accuracy with the mixed head, A_LP. The
    mix starts (alpha 0) from the encoder the run started from, on whose features its
    initial head was fit: the pre-trained one, or for a continual stage k > 0, stage k-1's."""
    metrics, head, rows = run["metrics"], run["head"], []
    test = ldifs.get_dataset(metrics["task"], "test", args.data_root, transform, args.download)
    finetuned = image_encoder_weights(run["weights"], args.device)
    start = image_encoder_weights(run["start"], args.device) if run["start"] else None
    for alpha in dict.fromkeys([1.0, *alphas]):  # alpha 1 is the run's own row: once
        encoder = copy.deepcopy(pretrained)
        encoder.load_state_dict(wise_ft(start or pretrained.state_dict(), finetuned, alpha))
        mixed = [torch.lerp(head[f"init_{k}"], head[k], alpha) for k in ("weight", "bias")]
        accuracy = ldifs.probe_accuracy(
            ldifs.linear_head(*mixed).to(args.device), *ldifs.extract_features(encoder, test, args)
        )
        # alpha 0 of a run from the pre-trained encoder: its A_LP is the baseline's
        pretrained_point = alpha == 0 and start is None
        a_lp = baseline if pretrained_point else probe_row(encoder, tasks, transform, args)
        name = label if alpha == 1.0 and not rows else f"  WiSE-FT alpha {alpha:g} of {label}"
        rows.append(
            dict(
                label=name,
                run=str(run["path"]),
                task=metrics["task"],
                lam=metrics["lam"],
                alpha=alpha,
                target_accuracy=accuracy,
                a_lp=a_lp,
            )
        )
    return rows


def image_encoder_weights(clip_weights, device):
    """The clip.visual part of a CLIP state dict (loaded to the CPU), on `device`."""
    visual = {k: v for k, v in clip_weights.items() if k.startswith("visual.")}
    return {k[len("visual.") :]: v.to(device) for k, v in visual.items()}


def add_deltas(rows, baseline):
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    for row in rows:
        row["delta_lp"] = {t: row["a_lp"][t] - baseline[t] for t in baseline}
        row["avg_a_lp"], row["avg_delta_lp"] = (
            mean([*row["a_lp"].values()]),
            mean([*row["delta_lp"].values()]),
        )


def markdown(rows, tasks):
    pct = lambda v, sign="": "-" if v is None else f"{100 * v:{sign}.1f}"  # noqa: E731
    head = ["model", "target acc", *(f"A_LP {t}" for t in tasks), *(f"Δ_LP {t}" for t in tasks)]
    table = []
    for i, r in enumerate(rows):
        deltas = [*r["delta_lp"].values(), r["avg_delta_lp"]] if i else [None] * (len(tasks) + 1)
        cells = [r["label"], pct(r["target_accuracy"]), *(pct(r["a_lp"][t]) for t in tasks)]
        cells += [pct(d, "+") for d in deltas[:-1]] + [pct(r["avg_a_lp"]), pct(deltas[-1], "+")]
        table.append(cells)
    return ldifs.markdown_table(head + ["avg A_LP", "avg Δ_LP"], table)


def evaluate(args):
    runs = [load_run(path) for path in args.runs]
    resolve_data_root(args, runs)
    check_named_once(args.runs, runs)
    model, pretrained, seed = check_same_start(runs)
    alphas, named = args.wise_ft, [("--json", args.json), ("--plot", args.plot)]
    outputs = {flag: path for flag, path in named if path}
    for flag, path in outputs.items():  # fail now, not after the evaluation
        if path.is_dir():
            raise ldifs.UsageError(f"{flag} {path} is a folder; name a file")
        ldifs.check_writable(path.parent, f"{flag} {path}")
    if args.plot:  # the curves start at the pre-trained point: alpha 0 gives its target accuracy
        check_plot_format(args.plot)
        alphas = sorted(set(alphas) | {0.0})
    check_target_data(runs, args)
    tasks = eval_tasks(runs, args)
    if args.plot and not tasks:  # its x axis averages over them
        raise ldifs.UsageError("--plot needs an eval task whose data is there; name it in --tasks")
    for path in outputs.values():  # after the checks: a refusal leaves no folder
        path.parent.mkdir(parents=True, exist_ok=True)
    if seed is not None:  # random weights: draw the ones the runs started from, as ldifs.py did
        torch.manual_seed(seed)
    clip, _, transform = ldifs.load_clip(model, pretrained, args.device)
    weights = ldifs.weights_key(model, pretrained, seed)
    baseline = probe_row(clip.visual.eval(), tasks, transform, args, weights)
    rows = [{"label": baseline_label(model, pretrained), "target_accuracy": None, "a_lp": baseline}]
    for run, label in zip(runs, run_labels(runs), strict=True):
        rows += rows_for_run(run, label, clip.visual, transform, tasks, alphas, baseline, args)
    add_deltas(rows, baseline)
    if args.plot:
        plot(rows[1:], args.plot, args.plot_x)
    if args.json:  # before printing: stdout may be closed (| head)
        results = {"model": model, "pretrained": pretrained, "tasks": tasks, "rows": rows}
        ldifs.write_json(results, args.json)
    print(markdown(rows, tasks))
    return rows


def baseline_label(model, pretrained):
    """The pre-trained row's label: the model, and its weights unless they come with it (a
    tag that older runs recorded for those names nothing)."""
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


def check_plot_format(path):
    """--plot FILE is written in the format its suffix names (PNG without one): one matplotlib
    cannot write would fail after the whole evaluation."""
    pyplot()  # matplotlib is optional: say so first
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix[1:].lower()
    if suffix and suffix not in formats:
        raise ldifs.UsageError(
            f"--plot {path}: matplotlib cannot write .{suffix} files; "
            f"use one of {', '.join(sorted(formats))}"
        )


def plot(rows, path, x_key):
    """Target accuracy against average A_LP or Δ_LP: per run, its WiSE-FT curve from where it
    started (alpha 0, a star) to the run (alpha 1, labelled with its method)."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    for run in dict.fromkeys(row["run"] for row in rows):
        curve = sorted((r for r in rows if r["run"] == run), key=lambda r: r["alpha"])
        xs = [100 * r[f"avg_{x_key}"] for r in curve]
        ys = [100 * r["target_accuracy"] for r in curve]
        line = axes.plot(xs, ys, "o-", markersize=3)[0]
        axes.plot(xs[0], ys[0], "*", color="black", markersize=12)
        axes.annotate(
            curve[-1]["label"],
            (xs[-1], ys[-1]),
            color=line.get_color(),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    axes.plot([], [], "*", color="black", label="start (alpha 0)")
    x_name = "average Δ_LP" if x_key == "delta_lp" else "average A_LP"
    axes.set_xlabel(f"{x_name} over eval tasks (%)")
    axes.set_ylabel("target accuracy (%)")
    axes.set_title("Target accuracy against forgetting (lines: WiSE-FT)")
    axes.legend(loc="lower left")
    figure.tight_layout()
    # bbox: the run labels may stick out; format: the name's, not the temporary file's (.tmp)
    options = dict(format=path.suffix[1:] or "png", dpi=120, bbox_inches="tight")
    ldifs.atomic_write(path, lambda tmp: figure.savefig(tmp, **options))
    plt.close(figure)


def main(argv=None):
    logging.basicConfig(level=logging.CRITICAL)  # open_clip logs errors we re-state in one line
    ldifs.sigterm_as_ctrl_c()
    args = parse_args(argv)
    with ldifs.one_line_errors("eval.py"):
        evaluate(args)


if __name__ == "__main__":
    main()
