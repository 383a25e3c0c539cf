"""The all-families table (SPEC P3, issue 17 point 7): every generative family at one CPU budget, one protocol.

    genlab bench families --data mnist --minutes 3 --n 2000 --out runs/families

For each family (:data:`FAMILIES`) the driver trains the data set's small preset (``METHOD_DATA_small``
where it exists, else ``METHOD_small``) on one torch thread, stopped by ``train.time_limit`` after the
family's budget of ``--minutes`` CPU-minutes; scores it with ``genlab eval``'s generation protocol (the
same N, reference split ``DATA:test``, evaluator and evaluation seed for every family, each run's own
default sampler; class-conditional runs are asked for every class equally often); and writes
``families-DATA.json`` (every number), ``families-DATA.md`` (the table) and ``families-DATA.png``
(FID against milliseconds per sample, marker area proportional to training minutes).

**Budget accounting.** The budget is optimisation time as the trainer counts it (``train.time_clock``):
by default the training process's CPU time (``cpu_seconds`` of the newest checkpoint, summed over
launches), so every family gets the same compute however many other jobs share the cores; ``--clock
wall`` counts wall time instead (``elapsed_seconds``), fair only on an otherwise idle machine. Data
loading, model building and the final preview grid are outside the budget. A family with a frozen parent (latent diffusion on a kl-ae; the PixelCNN and GPT priors
on a VQ-VAE) spends ``parent_share`` of the budget on the parent and the rest, ``minutes`` minus the
parent's *measured* minutes, on the child, so parent + child = the budget. The two priors share one
VQ-VAE run and each counts its minutes in full. A preset whose ``train.steps`` end before the budget
stops there (its minutes say so): the presets' recipes (LR schedules included) are used as they are.

**Resumable.** Runs live in ``OUT/DATA/METHOD-sSEED``. A run whose checkpoint has used its budget (or
reached its ``train.steps``) is not trained again; an interrupted one is resumed for the minutes it has
left; a run already scored under the same protocol (reference, N, seed, checkpoint step, extractor) is
not sampled again. Rerunning the command after a crash costs only what was lost.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from genlab.errors import ConfigError, GenlabError

CLOCKS = ("cpu", "wall")  # what a budget's minutes count (train.time_clock)
GENERATION = ("fid", "kid", "is", "precision", "recall", "density", "coverage")
# A run that has trained this close to its budget is done: the trainer stops after the step that crosses
# the limit, so a finished run is at or just past it; a resume for a few seconds would only add noise.
BUDGET_TOLERANCE_MIN = 0.05


@dataclass(frozen=True)
class Family:
    """One column of the comparison: a generating method and, for two-stage models, its frozen parent."""

    name: str  # the label in the table
    method: str  # the method that draws the images (declares Generates)
    parent: str | None = None  # method of the parent run trained first (ldm: kl-ae; priors: vqvae)
    role: str | None = None  # the child's config key naming the parent: model.<role>=RUN
    native_sampler: str | None = None  # how a family without a `sampler` setting draws, for the table


FAMILIES = (
    Family("ddpm", "ddpm"),
    Family("dit", "dit"),
    Family("ldm", "ldm", parent="kl-ae", role="autoencoder"),
    Family("vae", "vae", native_sampler="one pass"),
    Family("vqvae+pixelcnn", "pixelcnn", parent="vqvae", role="codes", native_sampler="code by code"),
    Family("vqvae+gpt", "gpt", parent="vqvae", role="codes", native_sampler="code by code"),
    Family("gan", "gan", native_sampler="one pass"),
    Family("stylegan", "stylegan", native_sampler="one pass"),
)


def select_families(names: str | Sequence[str] | None) -> tuple[Family, ...]:
    """The families named (comma-separated, by table name or method), in :data:`FAMILIES` order; all for None."""
    if names is None:
        return FAMILIES
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    known = {f.name: f for f in FAMILIES} | {f.method: f for f in FAMILIES}
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ConfigError(f"--families {','.join(unknown) or '(empty)'}: unknown; choose from "
                          f"{','.join(f.name for f in FAMILIES)} (or their methods pixelcnn, gpt)")
    chosen = {known[n] for n in wanted}
    return tuple(f for f in FAMILIES if f in chosen)


# ---------------------------------------------------------------------------------------------- budget


def parent_budget(minutes: float, parent_share: float) -> float:
    """Minutes the frozen parent of a two-stage family may train: its share of the family's budget."""
    if not 0 < parent_share < 1:
        raise ConfigError(f"--parent-share {parent_share:g}: give a fraction strictly between 0 and 1 (e.g. 0.33)")
    return minutes * parent_share


def child_budget(minutes: float, parent_minutes: float) -> float:
    """Minutes left for the child once its parent has trained ``parent_minutes``: parent + child = ``minutes``."""
    left = minutes - parent_minutes
    if left <= BUDGET_TOLERANCE_MIN:
        raise ConfigError(f"the parent run trained {parent_minutes:.2f} of the family's {minutes:g} minutes, leaving "
                          "none for the child; lower --parent-share or raise --minutes")
    return left


@dataclass
class Trained:
    """Where a run's training stands: its newest intact checkpoint's step and minutes, and its planned steps."""

    step: int
    minutes: float
    planned_steps: int


def trained_state(run_dir: Path, clock: str = "cpu") -> Trained | None:
    """The run's newest intact checkpoint as :class:`Trained` (minutes on ``clock``: cpu or wall), or None
    when there is no run (or no checkpoint)."""
    from genlab.config import read_config_file
    from genlab.train.checkpoint import find_checkpoint, verify_checkpoint

    if not (run_dir / "config.yaml").is_file():
        return None
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        return None
    _, state = verify_checkpoint(checkpoint)
    planned = read_config_file(run_dir / "config.yaml")["train"]["steps"]
    seconds = state.get("cpu_seconds" if clock == "cpu" else "elapsed_seconds", 0.0)
    return Trained(int(state["step"]), float(seconds) / 60, int(planned))


def minutes_left(state: Trained | None, budget: float) -> float:
    """Training minutes a run still needs: the whole budget for no run, 0 when done (budget or steps used)."""
    if state is None:
        return budget
    if state.step >= state.planned_steps or budget - state.minutes <= BUDGET_TOLERANCE_MIN:
        return 0.0
    return budget - state.minutes


# ---------------------------------------------------------------------------------------------- driving


@dataclass
class Job:
    """One (family, seed) cell of the table and where its runs live."""

    family: Family
    data: str
    seed: int
    minutes: float
    parent_share: float
    out: Path
    clock: str = "cpu"  # what the minutes count: the process's CPU time, or wall time

    def run_dir(self, method: str) -> Path:
        return self.out / self.data / f"{method}-s{self.seed}"


@dataclass
class Row:
    """Every number of one cell (the JSON's rows): training, sampling and the generation metrics."""

    family: str
    method: str
    data: str
    seed: int
    budget_min: float
    run: str
    clock: str = "cpu"
    parent: str | None = None
    parent_run: str | None = None
    parent_min: float | None = None
    child_min: float | None = None
    train_min: float | None = None  # parent + child
    cpu_share: float | None = None  # process CPU s per wall s of the child's training launches (1 = a whole core)
    steps: int | None = None
    planned_steps: int | None = None
    parent_steps: int | None = None
    preset: str | None = None
    parent_preset: str | None = None
    sampler: str | None = None
    sample_steps: int | None = None
    class_conditional: bool = False
    n: int | None = None
    ms_per_sample: float | None = None  # wall time of sampling N, per sample (batches of 500)
    sample_cpu_ms: float | None = None  # the same times the evaluation's CPU share: load-independent
    metrics: dict[str, float] = field(default_factory=dict)
    reference: str | None = None
    extractor: str | None = None
    extractor_sha256: str | None = None
    error: str | None = None


def _preset_name(method: str, data: str) -> str:
    from genlab.api import resolve_preset

    return f"{method.replace('-', '_')}_{resolve_preset(method, data, 'small')}"


def _train(method: str, run_dir: Path, data: str, budget: float, seed: int, threads: int, data_root: str | None,
           parents: Sequence[str] = (), say: Callable[[str], None] = print, clock: str = "cpu") -> Trained:
    """Train (or resume) ``run_dir`` until it has used ``budget`` minutes or its preset's steps; its state after."""
    from genlab import api

    state = trained_state(run_dir, clock)
    left = minutes_left(state, budget)
    if left > 0:
        overrides = [f"train.time_limit={left:.4f}", f"train.time_clock={clock}", f"train.threads={threads}"]
        if state is None:  # a resumed run keeps its seed and parents (both are in its config)
            overrides += [*parents, f"train.seed={seed}"]
        say(f"train {method} for {left:.2f} {'CPU-' if clock == 'cpu' else ''}min"
            f"{' (resumed at step %d)' % state.step if state else ''}")
        with _cpu_account(run_dir):
            api.train(method, data=None if state else data, preset=None if state else "small", overrides=overrides,
                      run_dir=run_dir, resume=state is not None, data_root=data_root, progress=False,
                      announce=lambda line: None)
        state = trained_state(run_dir, clock)
    return state


CPU_FILE = "bench-cpu.json"  # in a run folder: CPU and wall seconds of what this driver ran there


def _read_cpu_file(run_dir: Path) -> dict[str, dict[str, float]]:
    path = run_dir / CPU_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {"train": data} if "cpu_seconds" in data else data  # the first format held the training launches only


@contextlib.contextmanager
def _cpu_account(run_dir: Path, part: str = "train"):
    """Record this block's process CPU seconds and wall seconds under ``part`` of ``run_dir/bench-cpu.json``.

    On a shared machine a process gets less than a core: CPU / wall is the share it really had. Training
    launches add up (part "train": data loading and the final preview grid included); an evaluation
    replaces the previous one (part "eval": sampling and scoring), so a table made beside other jobs
    can say how far its wall times were from quiet-machine times.
    """
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        yield
    finally:
        parts = _read_cpu_file(run_dir)
        total = parts.get(part) if part == "train" else None
        total = dict(total or {"cpu_seconds": 0.0, "wall_seconds": 0.0})
        total["cpu_seconds"] += time.process_time() - cpu
        total["wall_seconds"] += time.perf_counter() - wall
        if run_dir.is_dir():
            (run_dir / CPU_FILE).write_text(json.dumps({**parts, part: total}) + "\n")


def cpu_share(run_dir: Path, part: str = "train") -> float | None:
    """CPU seconds per wall second of ``part`` (train or eval) as the driver ran it here (None: not run by it)."""
    total = _read_cpu_file(run_dir).get(part)
    if not total or total["wall_seconds"] <= 0:
        return None
    return total["cpu_seconds"] / total["wall_seconds"]


def _scored(run_dir: Path, protocol: dict[str, Any]) -> dict | None:
    """The newest metrics.json entry of ``run_dir`` scored under ``protocol`` (every key equal), or None."""
    from genlab.evaluation import read_metrics

    if not (run_dir / "metrics.json").is_file():
        return None
    for entry in reversed(read_metrics(run_dir)):
        p = entry["protocol"]
        if p.get("kind") == "generation" and all(p.get(k) == v for k, v in protocol.items()):
            return entry
    return None


def _evaluate(run_dir: Path, job: Job, n: int, eval_seed: int, extractor: str | None, data_root: str | None,
              say: Callable[[str], None]) -> tuple[dict, bool]:
    """The run's generation entry under the table's protocol (scored now unless stored); whether it conditions."""
    from genlab.evaluation import evaluate
    from genlab.methods.capabilities import conditions_on_classes
    from genlab.metrics.extractors import DEFAULT_EXTRACTORS
    from genlab.runs import load_run

    run = load_run(run_dir)
    conditional = conditions_on_classes(run.method)
    ref = f"{job.data}:test"
    wanted = {"reference": ref, "n": n, "seed": eval_seed, "checkpoint_step": run.step,
              "extractor": extractor or DEFAULT_EXTRACTORS[job.data]}
    entry = _scored(run_dir, wanted)
    if entry is None or ("sample_options" in entry["protocol"]) != conditional:
        say(f"sample {n} and score against {ref}")
        # A class-conditional run is asked for every class equally often (guidance scale 1: the plain
        # conditional model); its label-free branch, trained on 10 % of the batches, would be judged instead.
        with _cpu_account(run_dir, "eval"):
            entry = evaluate(run, kind="generation", ref=ref, n=n, seed=eval_seed, extractor=extractor,
                             data_root=data_root, sample_options={"labels": "all"} if conditional else None)
    return entry, conditional


def run_job(job: Job, n: int, eval_seed: int = 0, threads: int = 1, extractor: str | None = None,
            data_root: str | None = None, say: Callable[[str], None] = print) -> Row:
    """Train (parent first), score and describe one cell; errors of the user's kind are raised."""
    fam = job.family
    child_dir = job.run_dir(fam.method)
    row = Row(fam.name, fam.method, job.data, job.seed, job.minutes, str(child_dir), job.clock, parent=fam.parent,
              preset=_preset_name(fam.method, job.data))
    parents: list[str] = []
    budget = job.minutes
    if fam.parent is not None:
        parent_dir = job.run_dir(fam.parent)
        parent_state = _train(fam.parent, parent_dir, job.data, parent_budget(job.minutes, job.parent_share),
                              job.seed, threads, data_root, say=say, clock=job.clock)
        row.parent_run, row.parent_preset = str(parent_dir), _preset_name(fam.parent, job.data)
        row.parent_min, row.parent_steps = parent_state.minutes, parent_state.step
        budget = child_budget(job.minutes, parent_state.minutes)
        parents = [f"model.{fam.role}={parent_dir}"]
    state = _train(fam.method, child_dir, job.data, budget, job.seed, threads, data_root, parents, say=say,
                   clock=job.clock)
    row.child_min, row.steps, row.planned_steps = state.minutes, state.step, state.planned_steps
    row.train_min = state.minutes + (row.parent_min or 0.0)
    row.cpu_share = cpu_share(child_dir)
    entry, row.class_conditional = _evaluate(child_dir, job, n, eval_seed, extractor, data_root, say)
    p = entry["protocol"]
    row.n, row.reference, row.extractor, row.extractor_sha256 = p["n"], p["reference"], p["extractor"], p["extractor_sha256"]
    row.sampler, row.sample_steps = p.get("sampler"), p.get("steps")
    row.ms_per_sample = 1000 * p["seconds"]["sample"] / p["n"]
    share = cpu_share(child_dir, "eval")
    # Sampling's wall time times the evaluation's share of a core: what a sample costs on an idle core.
    row.sample_cpu_ms = None if share is None else row.ms_per_sample * min(share, 1.0)
    row.metrics = {k: float(v) for k, v in entry["metrics"].items() if k in GENERATION or k in ("class_accuracy", "class_entropy")}
    row.sampler = row.sampler or fam.native_sampler
    return row


def check_evaluator(data: str, extractor: str | None) -> None:
    """Refuse before any training when ``data`` has no evaluator to score it with (one line, with the fix)."""
    from genlab.metrics.extractors import DEFAULT_EXTRACTORS

    if extractor is None and data not in DEFAULT_EXTRACTORS:
        raise ConfigError(f"--data {data}: genlab ships no evaluator for it (shipped: "
                          f"{', '.join(sorted(set(DEFAULT_EXTRACTORS.values())))}); pass --extractor NAME or FILE "
                          "(e.g. one made with `genlab export-evaluator`)")


def plan(data: str, minutes: float, seeds: Sequence[int], families: Sequence[Family], parent_share: float,
         out: Path, clock: str = "cpu") -> list[Job]:
    """The jobs of the table, seed-major (a first seed's full table comes before any repeat)."""
    if not minutes > 0 or not math.isfinite(minutes):
        raise ConfigError(f"--minutes {minutes:g}: give a positive number of CPU-minutes per family (e.g. 3)")
    if not seeds:
        raise ConfigError("--seeds is empty: give at least one training seed (e.g. 0 or 0,1,2)")
    if clock not in CLOCKS:
        raise ConfigError(f"--clock {clock}: choose cpu (the process's CPU time) or wall (wall time)")
    parent_budget(minutes, parent_share)  # checks the share
    return [Job(f, data, s, minutes, parent_share, Path(out), clock) for s in seeds for f in families]


def bench_families(data: str, minutes: float, n: int = 10000, seeds: Sequence[int] = (0,), families=None,
                   parent_share: float = 1 / 3, out: str | Path = "runs/families", eval_seed: int = 0,
                   threads: int = 1, extractor: str | None = None, data_root: str | None = None,
                   clock: str = "cpu", say: Callable[[str], None] = print) -> tuple[list[Row], dict[str, Path]]:
    """Drive the whole table: every job (failures recorded, the rest go on), then the JSON, table and plot."""
    import torch

    if n < 2:
        raise ConfigError(f"--n {n}: score at least 2 samples (the standard is 10000)")
    if threads < 1:
        raise ConfigError(f"--threads {threads}: give at least 1")
    check_evaluator(data, extractor)
    jobs = plan(data, minutes, list(seeds), select_families(families), parent_share, Path(out), clock)
    torch.set_num_threads(threads)
    rows: list[Row] = []
    kept = earlier_rows(Path(out), data, minutes, clock, n, jobs)
    for i, job in enumerate(jobs, 1):
        head = f"[{i}/{len(jobs)}] {job.family.name} {data} seed {job.seed}"
        start = time.perf_counter()
        try:
            row = run_job(job, n, eval_seed, threads, extractor, data_root, say=lambda line: say(f"{head}: {line}"))
        except GenlabError as e:
            row = Row(job.family.name, job.family.method, data, job.seed, minutes, str(job.run_dir(job.family.method)),
                      clock, parent=job.family.parent, error=str(e).splitlines()[0])
        except Exception as e:  # a bug in one family must not cost the others' hours: record it, go on
            message = (str(e).strip().splitlines() or [""])[0][:200]
            row = Row(job.family.name, job.family.method, data, job.seed, minutes, str(job.run_dir(job.family.method)),
                      clock, parent=job.family.parent, error=f"unexpected {type(e).__name__}: {message}")
        rows.append(row)
        wall = (time.perf_counter() - start) / 60
        if row.error:
            say(f"{head}: error: {row.error}")
        else:
            say(f"{head}: FID {row.metrics.get('fid', float('nan')):.1f}, {row.sample_cpu_ms or row.ms_per_sample:.1f} "
                f"{'CPU ' if row.sample_cpu_ms else ''}ms/sample, trained "
                f"{row.train_min:.2f} {'CPU-' if clock == 'cpu' else ''}min ({_steps_text(row)}); {wall:.1f} min wall "
                "for this line")
        paths = write_outputs(table_order(kept + rows), Path(out), data)  # after every line: an interruption keeps what was done
    return rows, paths


def earlier_rows(out: Path, data: str, minutes: float, clock: str, n: int, jobs: Sequence[Job]) -> list[Row]:
    """Rows of an earlier invocation's table that this one does not redo (other families or seeds), when it
    measured under the same budget, clock and N: so the table can be filled family by family."""
    path = out / f"families-{data}.json"
    if not path.is_file():
        return []
    doing = {(j.family.name, j.seed) for j in jobs}
    return [r for r in read_rows(path) if (r.family, r.seed) not in doing and r.error is None
            and r.budget_min == minutes and r.clock == clock and r.n == n]


def table_order(rows: Sequence[Row]) -> list[Row]:
    """Rows in :data:`FAMILIES` order, then by seed."""
    rank = {f.name: i for i, f in enumerate(FAMILIES)}
    return sorted(rows, key=lambda r: (rank.get(r.family, len(rank)), r.seed))


def _steps_text(row: Row) -> str:
    own = f"{row.steps} of {row.planned_steps} steps"
    return f"{row.parent} {row.parent_steps} steps + {own}" if row.parent else own


# ---------------------------------------------------------------------------------------------- outputs


def _spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean, std = _spread(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """One entry per family (seeds pooled): the mean and spread of each number over its scored seeds."""
    out = []
    for name in dict.fromkeys(r.family for r in rows):
        mine = [r for r in rows if r.family == name]
        ok = [r for r in mine if r.error is None]
        entry: dict[str, Any] = {"family": name, "seeds": [r.seed for r in ok],
                                 "errors": {r.seed: r.error for r in mine if r.error}}
        for key in ("train_min", "ms_per_sample", "sample_cpu_ms", "steps", "cpu_share"):
            entry[key] = [getattr(r, key) for r in ok if getattr(r, key) is not None]
        for key in GENERATION + ("class_accuracy",):
            entry[key] = [r.metrics[key] for r in ok if key in r.metrics]
        if ok:
            first = ok[0]
            entry.update(method=first.method, parent=first.parent, preset=first.preset, parent_preset=first.parent_preset,
                         sampler=first.sampler, sample_steps=first.sample_steps, planned_steps=first.planned_steps,
                         class_conditional=first.class_conditional, parent_min=[r.parent_min for r in ok if r.parent_min])
        out.append(entry)
    return out


def markdown_table(rows: Sequence[Row]) -> str:
    """The table: one line per family, mean ± sample std over seeds where there are several, then failures."""
    unit = "CPU-min" if rows and rows[0].clock == "cpu" else "min"
    lines = [f"| family | preset (parent) | seeds | train {unit} | core share | steps | sampler | wall ms / sample | "
             "CPU ms / sample | FID | KID | IS | precision | recall | density | coverage |", "|" + "---|" * 16]
    failed = []
    for s in summarize(rows):
        if not s["seeds"]:
            failed.append(s)
            continue
        preset = s["preset"] + (f" ({s['parent_preset']})" if s["parent"] else "")
        sampler = f"{s['sampler'] or 'model'}{' ' + str(s['sample_steps']) if s['sample_steps'] else ''}"
        if s["class_conditional"]:
            sampler += ", all classes"
        minutes = _cell(s["train_min"], 2)
        if s["parent"]:
            minutes += f" (parent {statistics.fmean(s['parent_min']):.2f})"
        steps = f"{statistics.fmean(s['steps']):.0f} / {s['planned_steps']}"
        cells = [s["family"], preset, ",".join(map(str, s["seeds"])), minutes, _cell(s["cpu_share"], 2), steps, sampler,
                 _cell(s["ms_per_sample"], 1), _cell(s["sample_cpu_ms"], 1), _cell(s["fid"], 1), _cell(s["kid"], 4), _cell(s["is"], 2),
                 *(_cell(s[k], 3) for k in ("precision", "recall", "density", "coverage"))]
        lines.append("| " + " | ".join(cells) + " |")
    for s in failed:
        lines.append(f"| {s['family']} | failed: {'; '.join(f'seed {k}: {v}' for k, v in s['errors'].items())} |" +
                     " |" * 14)
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path: Path, title: str) -> Path:
    """FID against ms per sample (both log), marker area proportional to training minutes, one point per family."""
    from genlab.report.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=100)
    summary = summarize(rows)
    longest = max((statistics.fmean(s["train_min"]) for s in summary if s["train_min"]), default=1.0) or 1.0
    for s in summary:
        cost = s["sample_cpu_ms"] or s["ms_per_sample"]  # CPU time where measured (load-independent), else wall
        if not s["fid"] or not cost:
            continue
        x, y = statistics.fmean(cost), statistics.fmean(s["fid"])
        yerr = statistics.stdev(s["fid"]) if len(s["fid"]) > 1 else None
        ax.scatter([x], [y], s=120 * statistics.fmean(s["train_min"]) / longest, alpha=0.6)  # area: minutes
        if yerr is not None:
            ax.errorbar([x], [y], yerr=[[min(yerr, y * 0.99)], [yerr]], fmt="none", ecolor="black", capsize=3, lw=1)
        ax.annotate(s["family"], (x, y), textcoords="offset points", xytext=(7, 5), fontsize=9)
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 2, 5, 10, 20 rather than 2 x 10^0
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_locator(LogLocator(subs=(2, 5)))
        axis.set_minor_formatter(plain)
    ax.set_xlabel("sampling cost, CPU ms per sample (one thread); marker area = training minutes")
    ax.set_ylabel("FID (evaluator features; lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.subplots_adjust(left=0.11, right=0.97, top=0.92, bottom=0.12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def write_outputs(rows: Sequence[Row], out: Path, data: str) -> dict[str, Path]:
    """``families-DATA.json`` (rows and per-family summary), ``.md`` (the table) and ``.png`` (the plot) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"families-{data}"
    ok = [r for r in rows if r.error is None]
    protocol = ({"n": ok[0].n, "reference": ok[0].reference, "extractor": ok[0].extractor,
                 "extractor_sha256": ok[0].extractor_sha256} if ok else {})
    budget = rows[0].budget_min if rows else None
    doc = {"data": data, "budget_min": budget, "protocol": protocol, "rows": [asdict(r) for r in rows],
           "summary": summarize(rows)}
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md"), "png": stem.with_suffix(".png")}
    paths["json"].write_text(json.dumps(doc, indent=1) + "\n")
    paths["md"].write_text(markdown_table(rows))
    seeds = sorted({r.seed for r in ok})
    unit = "CPU-min" if rows and rows[0].clock == "cpu" else "wall-min"
    plot(rows, paths["png"], f"{data}: every family at {budget:g} {unit} of training (1 thread), FID of N={protocol.get('n')}, "
                             f"seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}" if rows else data)
    return paths


def read_rows(path: str | Path) -> list[Row]:
    """The rows of a ``families-DATA.json`` written by :func:`write_outputs`."""
    return [Row(**r) for r in json.loads(Path(path).read_text())["rows"]]


# ---------------------------------------------------------------------------------------------- any runs


def training_summary(run: Path) -> tuple[int, float, int | None]:
    """(steps, training minutes, torch threads) of any run, from its log (what benchmarks/family_table.py prints)."""
    from genlab.config import read_config_file
    from genlab.train.runlog import read_log

    records = read_log(run)
    steps = max((r["step"] for r in records), default=0)
    elapsed = max((r["values"].get("elapsed_s", 0.0) for r in records if r["kind"] in ("train", "end")), default=0.0)
    threads = read_config_file(run / "config.yaml")["train"].get("threads")
    return steps, elapsed / 60, threads
