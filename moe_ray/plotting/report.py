"""The report: every figure and table the stores hold, in paper order, in `OUT/index.html` with each
store's provenance (model, reference, spec, moe-ray version, creation date) and, for every section, a
plain statement of which store lacks it and how to compute it.
"""
from __future__ import annotations

import contextlib
import html
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoeRayError
from ..outdir import PLOT_OUTPUT, claim_output_dir
from . import causal as K
from . import dynamic as D
from . import findings as F
from . import static as S
from . import tables as T
from .common import DPI, Figure, StoreView, Table, pages, token_label, unique_labels


@dataclass(frozen=True)
class Section:
    """One section of the report: what it needs from a store and the function that draws it."""

    key: str
    title: str
    caption: str
    parent: str            # "static", "reorder" or "dynamic"
    array: str | None      # an array the group must hold (any input/mode for reorder and dynamic)
    draw: Callable[[list[StoreView], Path], list[Figure]] | None = None
    table: Callable[[list[StoreView]], list[Table]] | None = None
    per_store: bool = False
    """Drawn store by store even with a shared colour scale (nothing to share: scatter plots, line plots)."""
    paged_by: tuple[str, ...] | None = ("static",)
    """Groups ("{input}" for each dynamic input) whose layers the section pages over, one drawing task per
    page of layers; None: one image of every layer."""
    also: tuple[str, ...] = ()
    """Dynamic arrays that give the section too when the store has no `parent` group (the per-layer means
    of a store with dynamic analyses only)."""


HOW = {"static": "analyses = [\"static\"]", "reorder": "analyses = [\"reorder\"]",
       "dynamic": "analyses = [\"dynamic\"]", "causal": "analyses = [\"causal\"]"}

SECTIONS = [
    Section("fig1", "Fig 1: matrix-level similarity", "Cosine similarity between the flattened W_up, W_gate, "
            "W_down of every pair of experts, per layer (§4.1.1); F = the dense reference FFN, SE = the shared "
            "expert where its matrices have the experts' shape.", "static", "matrix_similarity",
            draw=S.fig1_matrix_similarity),
    Section("fig6", "Fig 6: PCA of expert matrices", "Each expert's flattened matrix, standardised, projected on "
            "2 principal components (App A.1). The paper removed DBSCAN outliers (eps 50) for DeepSeek only; each "
            "panel of a store where DBSCAN ran names the experts it removed.", "static", "matrix_pca",
            draw=S.fig6_matrix_pca, per_store=True),
    Section("fig7", "Fig 7: PCA of expert neurons", "Every neuron (row of W_up/W_gate, column of W_down) as a "
            "point, standardised, on 2 principal components, coloured by expert (App A.2).", "static",
            "neuron_pca", draw=S.fig7_neuron_pca, per_store=True),
    Section("fig7_3d", "Fig 7 (3-D): PCA of expert neurons", "The same neurons on the first three components.",
            "static", "neuron_pca", draw=S.fig7_neuron_pca_3d, per_store=True),
    Section("fig8", "Fig 8: gate embedding and neuron averaging", "Cosine similarity of the router's rows X "
            "(left, its own colour bar) beside that of the experts' mean neurons Y_up, Y_gate, Y_down (§4.2, "
            "App B, App C).", "static", "gate_embedding_similarity", draw=S.fig8_gate_and_neuron_avg),
    Section("tab2", "Tab 2: neuron reordering", "The permutation of expert j's neurons that maximises the "
            "flattened cosine with expert i's, solved exactly (Jonker-Volgenant), for every layer and pair i<j "
            "(§4.1.2).", "reorder", "growth", table=T.tab2_reorder, paged_by=None),
    Section("tab3", "Tab 3: mean R²", "R² between the i<j entries of X and Y_m, averaged over layers (§4.2).",
            "static", "gate_weight_r2_mean", table=T.tab3_r2, paged_by=None),
    Section("tab4", "Tab 4: R per layer", "Pearson R between X and Y_m per layer (App C).", "static",
            "gate_weight_correlation", table=T.tab4_r_per_layer, paged_by=None),
    Section("causal_weight_output", "Beside Tab 4: weights vs outputs (beyond the paper)", "§6 'Correlation "
            "measurement': per layer, Pearson R between S1's matrix-level similarity of the routed experts and their "
            "outputs' similarity averaged over a corpus (D1 cosine, D2 angular), from the causal checks.", "causal",
            "agreement/correlation", draw=K.weight_output, table=K.weight_output_table, per_store=True, paged_by=None),
    Section("fig2", "Fig 2: expert-output similarity per token", "Cosine similarity between all experts' "
            "outputs (Topk = ALL) for each of the input's first tokens (§5.1); each token's top-k above its map.",
            "dynamic", "expert_output_similarity", draw=D.fig2_output_similarity, paged_by=("dynamic/{input}",)),
    Section("fig3", "Fig 3: averaged angular similarity", "1 - arccos(cos)/π of two experts' outputs averaged "
            "over the input's tokens (§5.1), beside the matrix-level similarity of the same layer.", "dynamic",
            "expert_output_angular_mean", draw=D.fig3_angular, paged_by=("dynamic/{input}", "static")),
    Section("fig4", "Fig 4: output norms and gate scores", "L2 norm of every expert's output and the router's "
            "score for it, per token (§5.2); dots mark each token's top-k experts.", "dynamic",
            "expert_output_norms", draw=D.fig4_norms_scores, paged_by=("dynamic/{input}",)),
    Section("fig9", "Fig 9: norm rank vs score rank", "Counts of (output-norm rank, gate-score rank) over the "
            "input's tokens and the routed experts (App D).", "dynamic", "norm_score_rank_counts",
            draw=D.fig9_rank_counts, paged_by=("dynamic/{input}",)),
    Section("fig5", "Fig 5: intermediate states", "|act(W_gate x)| per expert and neuron for the first tokens "
            "(§5.3); vertical lines across experts are neurons with the same index active alike.", "dynamic",
            "intermediate_states", draw=D.fig5_intermediate, paged_by=("dynamic/{input}",)),
    Section("activation", "Activation ratio", "Fraction of act(W_gate x) elements with |value| > 1e-3, mean over "
            "tokens (§5.3).", "dynamic", "activation_ratio", draw=D.activation_ratio_map, table=T.activation_ratios,
            paged_by=None),
    Section("fig10", "Fig 10: routing pattern", "Each token's top-k experts and their routing weights (App E): "
            "the family's own top-k weights, or the softmax gate scores where a store has none; other cells "
            "blank.", "dynamic", "topk_experts", draw=D.fig10_routing, paged_by=("dynamic/{input}",)),
    Section("trends", "Per-layer means", "The mean expert-expert (S_ee) and expert-F (S_ef) similarity per layer, "
            "of the weights (Fig 1) and of the outputs (Fig 3): the paper finds both fall with depth, the last "
            "layer an outlier (§4.3, §5.4); and the experts' output norms, which the paper finds grow with depth "
            "(§5.2, §5.4).", "static", "matrix_similarity", draw=S.layer_trends, per_store=True, paged_by=None,
            also=("expert_output_angular_mean", "expert_output_norms")),
    Section("comparison", "Comparison across models", "Headline numbers side by side.", "static",
            "matrix_similarity", table=T.comparison, paged_by=None,
            also=("expert_output_similarity", "gate_scores", "activation_ratio")),
    Section("findings", "Findings: the paper's observations tested on each model", "Each observation the paper "
            "summarises (§4.3 for the weights, §5.4 for the outputs, with §5.2–§5.3's numbers), the number of this "
            "model that tests it, whether it holds (by the threshold stated), and the paper's number for its model of "
            "the same family.", "static", "matrix_similarity", table=F.findings_tables, paged_by=None,
            also=("expert_output_norms", "expert_output_angular_mean", "intermediate_states")),
    Section("causal_summary", "Causal checks (beyond the paper)", "What the paper suggests, tested by intervening: "
            "the model's next-token loss over a corpus with its routing changed, every expert of every layer "
            "computed as in §5 (Topk = ALL). Losses in nats per predicted token; intervals are percentile "
            "bootstraps over the corpus's sequences.", "causal", "causal/loss", table=K.summary_table, paged_by=None),
    Section("causal_norm_routing", "Norm routing (§5.2, §6)", "The paper: the gate tends to pick the experts with "
            "the largest output norms, so 'employing the norm as the routing mechanism is reasonable'. Left: how often "
            "the gate's top-k are the top-k by output norm; right: the change of the loss when a layer, or every "
            "layer, routes by output norm instead (weights as the family weighs a choice).", "causal",
            "norm_routing/agreement", draw=K.norm_routing, table=K.norm_routing_table, per_store=True, paged_by=None),
    Section("causal_ablation", "Expert ablation", "The change of the loss with one expert (and the shared expert "
            "SE) removed from one layer's routing, the family renormalising over the rest: which experts the model "
            "relies on.", "causal", "ablation/delta_loss", draw=K.ablation, table=K.ablation_table, per_store=True,
            paged_by=None),
]


def _has(view: StoreView, section: Section) -> tuple[bool, str]:
    """(whether the store can give this section, why not)."""
    if section.also and any(name in view.dataset(f"dynamic/{inp}") for inp in view.groups("dynamic")
                            for name in section.also):
        return True, ""
    if section.parent == "causal":  # array is "<group>/<array>" below causal/ ("causal/..." for the root)
        sub, name = section.array.rsplit("/", 1)
        path = sub if sub == "causal" else f"causal/{sub}"
        if not view.has(path):
            what = "causal checks" if sub == "causal" else f"causal {sub.replace('_', ' ')} results"
            return False, f"no {what} (run with {HOW['causal']})"
        if not K.done(view, path):
            return False, f"{path} not finished (rerun the same spec to resume)"
        return name in view.dataset(path), f"{path}/{name} not in the store"
    if section.parent == "static":
        if not view.has("static"):
            return False, f"no static analyses (run with {HOW['static']})"
        ds = view.dataset("static")
        if section.array not in ds:
            return False, f"static/{section.array} not in the store"
        if "layer" in ds[section.array].dims and not view.done_layers("static")[0]:
            return False, "no static layer finished yet (resume the run)"
        return True, ""
    subs = view.groups(section.parent)
    if not subs:
        return False, f"no {section.parent} analyses (run with {HOW[section.parent]})"
    if not any(section.array in view.dataset(f"{section.parent}/{s}") for s in subs):
        return False, f"{section.array} not in any {section.parent} group ({', '.join(subs)})"
    return True, ""


@dataclass(frozen=True)
class StoreState:
    """What a store holds: the run's `state` (complete, running, failed or unknown), its one-line error, and
    units done / planned per analysis (store.store_progress)."""

    label: str
    state: str
    error: str | None
    progress: dict[str, tuple[int, int]]

    @property
    def partial(self) -> dict[str, tuple[int, int]]:
        """Analyses with units not done."""
        return {a: (d, n) for a, (d, n) in self.progress.items() if d < n}

    def text(self) -> str:
        """One phrase: "complete", "partial (reorder 76/168 units)", "failed: <error> (static 2/4 units)"."""
        units = ", ".join(f"{a} {d}/{n}" for a, (d, n) in self.partial.items())
        if self.state == "failed":
            return f"failed: {self.error or 'no error recorded'}" + (f" ({units} units done)" if units else "")
        if self.state == "running":
            return "still running or interrupted" + (f" ({units} units done)" if units else "")
        return f"partial ({units} units done)" if units else "complete"


def store_state(view: StoreView) -> StoreState:
    """The store's state from its root attributes and live unit counts."""
    from ..store import store_progress

    state = str(view.attrs.get("state") or "unknown")
    return StoreState(view.label, state, view.attrs.get("error"), store_progress(view.url))


@dataclass
class Report:
    """What `render` produced: the index page, every figure (with the data it drew) and table."""

    index: Path
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    states: list[StoreState] = field(default_factory=list)
    pages: list[Path] = field(default_factory=list)
    """Every HTML page written: index.html first, then each model's page(s)."""

    def summary(self) -> str:
        """One line: where the report is, what it holds, how long it took, and every store not complete."""
        line = f"wrote {self.index}: {len(self.figures)} figures, {len(self.tables)} tables in {self.seconds:.1f} s"
        unfinished = [f"{s.label} {s.text()}" for s in self.states if s.text() != "complete"]
        return line + (f"; {'; '.join(unfinished)}" if unfinished else "")


PARALLEL = ("auto", "ray", "processes", "none")
"""How `render` draws its sections: `ray` as Ray tasks (the session this process is connected to),
`processes` in a pool of forked processes (one per usable CPU), `none` one after another here;
`auto` picks Ray when this process's session spans more CPUs than this machine has (a cluster), else
processes when more than one CPU is idle (then one per idle CPU): on one machine, forked processes
share the opened stores and matplotlib's import, and drew the demo's report 0.4-1.7 s sooner than Ray
tasks."""

SECTION_BY_KEY = {s.key: s for s in SECTIONS}


StoreRef = tuple[str, str, "tuple[str, ...] | None", "list[int] | None", "list[int] | str | None"]
"""What a drawing task gets of a store: (url, label, the dynamic inputs and the layers it draws, None
for all; the tokens per-token figures draw, see StoreView.tokens)."""
Task = tuple[str, "list[StoreRef]"]
"""One unit of drawing: a section key and the stores it draws side by side."""


def section_tasks(section: Section, views: list[StoreView], shared_scale: bool = False) -> list[Task]:
    """A section split into independent drawing tasks, in the report's order: one per dynamic input, per
    store (all stores together when they share colour scales) and per page of layers."""
    inputs = D.ordered_inputs(i for v in views for i in v.groups("dynamic")) if section.parent == "dynamic" else [None]
    groups = [views] if shared_scale and not section.per_store else [[v] for v in views]
    tasks = []
    for inp in inputs:
        for group in groups:
            group = [v for v in group if inp is None or _input_has(v, inp, section.array)]
            for page in _task_pages(section, group, inp):
                tasks.append((section.key, [(v.url, v.label, None if inp is None else (inp,), page, v.tokens)
                                             for v in group]))
    return tasks


def _input_has(view: StoreView, inp: str, array: str) -> bool:
    return inp in view.groups("dynamic") and array in view.dataset(f"dynamic/{inp}")


def _task_pages(section: Section, views: list[StoreView], inp: str | None) -> list[list[int] | None]:
    """The pages of layers the section draws for these stores (pages of the union of their done layers)."""
    if not views:
        return []
    if section.paged_by is None:
        return [None]
    names = [name.format(input=inp) for name in section.paged_by]
    layers = sorted({l for v in views for name in names if v.has(name) for l in v.done_layers(name)[0]})
    return pages(layers) or [None]


_OPENED: dict[str, StoreView] = {}
"""The stores `render` is drawing, opened: drawing tasks in this process and in the processes it forks
share them (each task opening every group again cost a tenth of the report); Ray tasks open their own."""


@contextlib.contextmanager
def _sharing(views: list[StoreView]):
    """Drawing tasks started inside share these opened views (see _OPENED)."""
    _OPENED.update({v.url: v for v in views})
    try:
        yield
    finally:
        _OPENED.clear()


def draw_section(key: str, stores: list[StoreRef]) -> list[tuple[Figure, bytes]]:
    """Draw one section for `stores` into a scratch directory: its figures and their PNG bytes, so a
    worker needs no access to the report directory (a Ray task may run on another node)."""
    views = []
    for url, label, inputs, layers, tokens in stores:
        view = _OPENED[url].restricted(label, inputs, layers) if url in _OPENED else StoreView(url, label, inputs, layers)
        view.tokens = tokens
        views.append(view)
    with tempfile.TemporaryDirectory(prefix="moe-ray-plot-") as scratch:
        figures = SECTION_BY_KEY[key].draw(views, Path(scratch))
        for f in figures:
            f.store = figure_store(f, [v.label for v in views])
        return [(f, f.path.read_bytes()) for f in figures]


def figure_store(figure: Figure, labels: list[str]) -> str:
    """The label of the store an image shows: the only one drawn, else the one whose name is in its file
    name (every figure is named `<figure>_..._<store>_<layers>.png`; the longest match wins)."""
    if len(labels) == 1:
        return labels[0]
    name = figure.path.name
    matches = [lab for lab in labels if f"_{S.slug(lab)}_" in name or f"_{S.slug(lab)}." in name]
    return max(matches, key=len) if matches else labels[0]


def usable_cpu_ids() -> set[int]:
    """The CPUs this process may run on."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    return len(usable_cpu_ids())


def idle_cpus(window: float = 0.1) -> int:
    """Usable CPUs less those other processes keep busy, at least 1: on a shared machine whose cores
    are busy, more drawing processes only contend (measured 0.8x)."""
    return max(1, min(usable_cpus(), round(usable_cpus() - busy_cpus(window))))


def busy_cpus(window: float = 0.1) -> float:
    """How many of the usable CPUs are busy over the next `window` seconds, from /proc/stat's per-CPU
    times (idle and iowait count as idle); elsewhere the 1-minute load average. Not the load average
    where /proc/stat exists: it lags by a minute (right after a run it counts work that has finished,
    and the report was drawn serially on idle cores) and counts every CPU of the machine, not ours."""
    try:
        before = _cpu_ticks()
        time.sleep(window)
        after = _cpu_ticks()
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = 0.0
    for cpu in usable_cpu_ids() & before.keys() & after.keys():
        total = sum(after[cpu]) - sum(before[cpu])
        idle = (after[cpu][3] + after[cpu][4]) - (before[cpu][3] + before[cpu][4])
        busy += 1 - idle / total if total > 0 else 0.0
    return busy


def _cpu_ticks() -> dict[int, list[int]]:
    """Each CPU's times in ticks (user nice system idle iowait), from /proc/stat's `cpuN` lines."""
    ticks = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                ticks[int(name[3:])] = [int(x) for x in fields[:5]]
    if not ticks:
        raise ValueError("no cpuN lines in /proc/stat")
    return ticks


def _ray_session():
    """The `ray` module when this process is connected to a Ray session (never imports Ray itself)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def resolve_parallel(parallel: str, tasks: int) -> tuple[str, int]:
    """(the mode `parallel` stands for here and now, the processes a pool would start; see PARALLEL)."""
    if parallel not in PARALLEL:
        raise MoeRayError(f"unknown parallel mode {parallel!r}; choose one of {', '.join(PARALLEL)}")
    if parallel != "auto":
        return parallel, min(usable_cpus(), tasks)
    ray = _ray_session()
    if ray is not None and ray.cluster_resources().get("CPU", 0) > usable_cpus():
        return "ray", 0
    idle = min(idle_cpus(), tasks)
    return ("processes", idle) if idle > 1 else ("none", 1)


FigureCallback = Callable[[int, int, str], None]
"""`on_figure(done, total, name)`: called as each image is drawn; `done` and `total` count drawing tasks
(a section's page of layers for a store: one or a few images), `name` is the image's file name."""


def start_drawing(tasks: list[Task], parallel: str, on_figure: FigureCallback | None = None
                  ) -> Callable[[], list[list[tuple[Figure, bytes]]]]:
    """Start every drawing task; returns a function that waits for them and gives each task's
    [(Figure, PNG bytes)] in task order, calling `on_figure` as each task's images arrive. The caller
    computes tables in the meantime."""
    mode, workers = resolve_parallel(parallel, len(tasks))
    if not tasks:
        return lambda: []
    finished = [0]

    def report(figures: list[tuple[Figure, bytes]]) -> list[tuple[Figure, bytes]]:
        finished[0] += 1
        if on_figure is not None:
            for figure, _ in figures:
                on_figure(finished[0], len(tasks), figure.path.name)
        return figures

    if mode == "ray":
        ray = _ray_session()
        if ray is None:
            raise MoeRayError("parallel='ray' needs a Ray session in this process (ray.init or moe_ray.run)")
        remote = ray.remote(num_cpus=1)(draw_section)
        refs = [remote.remote(key, stores) for key, stores in tasks]

        def wait_ray() -> list:
            results, pending = {}, list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                results[ready[0]] = report(ray.get(ready[0]))
            return [results[r] for r in refs]
        return wait_ray
    if mode == "processes":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # fork: the workers start with this process's imports (a fresh interpreter would take seconds)
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
        futures = [pool.submit(draw_section, key, stores) for key, stores in tasks]

        def wait() -> list:
            try:
                results = {f: report(f.result()) for f in as_completed(futures)}
                return [results[f] for f in futures]
            finally:
                pool.shutdown(cancel_futures=True)
        return wait
    return lambda: [report(draw_section(key, stores)) for key, stores in tasks]


def render(stores: list[str | Path], out: str | Path, parallel: str = "auto", shared_scale: bool = False,
           tokens: "list[int] | str | None" = None, on_figure: FigureCallback | None = None) -> Report:
    """Render every figure and table the stores hold into `out` and write `out/index.html`.

    Every image shows one store; its colour ranges are that store's own (the paper: figures of different
    models do not share a colour bar) unless `shared_scale`, which gives all stores' images of a figure and
    page one range. Sections are drawn in parallel (see PARALLEL); each reads only the arrays, layers and
    tokens it shows. `tokens`: the token positions Figs 2, 4, 5 and 10 draw (a list, or "all"; default each
    figure's first ones). `on_figure(done, total, name)` is called as images are drawn (FigureCallback).
    """
    started = time.monotonic()
    tokens = parse_tokens(tokens)
    if not stores:
        raise MoeRayError("no store given: moe-ray plot STORE [STORE ...] --out DIR")
    views = [StoreView(s) for s in stores]
    unique_labels(views)
    for v in views:
        v.tokens = tokens
    states = [store_state(v) for v in views]
    for v, state in zip(views, states):
        v.state = state
    status = {s.key: {v.label: _has(v, s) for v in views} for s in SECTIONS}
    have = {s.key: [v for v in views if status[s.key][v.label][0]] for s in SECTIONS}
    failed = [s for s in states if s.state == "failed"]
    if failed and not any(have.values()):
        raise MoeRayError(f"nothing to draw: {'; '.join(f'{s.label} {s.text()}' for s in failed)}")
    output = claim_output_dir(out, PLOT_OUTPUT)  # empty or moe-ray's; never over files it did not write
    out = output.path
    fig_dir, tab_dir = out / "figures", out / "tables"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tab_dir.mkdir(parents=True, exist_ok=True)
    report = Report(out / "index.html", states=states)
    tasks = [t for s in SECTIONS if s.draw is not None and have[s.key]
             for t in section_tasks(s, have[s.key], shared_scale)]
    with _sharing(views):
        wait = start_drawing(tasks, parallel, on_figure)
        try:
            tables = {s.key: section_tables(s, have[s.key], tab_dir) for s in SECTIONS
                      if s.table is not None and have[s.key]}
            inputs_html = _inputs(views, out)
        finally:
            drawn: dict[str, list[tuple[Figure, bytes]]] = {}
            for (key, _), figures in zip(tasks, wait()):
                drawn.setdefault(key, []).extend(figures)
    sections = []
    for section in SECTIONS:
        notes, remarks = _notes(section, have[section.key], status[section.key])
        report.missing[section.key] = notes
        section_tables_ = tables.get(section.key, [])
        report.tables += section_tables_
        figures = []
        for figure, png in drawn.get(section.key, []):
            figure.path = fig_dir / figure.path.name
            figure.path.write_bytes(png)
            report.figures.append(figure)
            figures.append(figure)
        sections.append(SectionOut(section, notes, remarks, section_tables_, figures, bool(have[section.key])))
    report.seconds = time.monotonic() - started
    report.pages = write_pages(views, sections, report, inputs_html, shared_scale, out)
    output.finish()  # (written into a staging folder, moved into place here)
    report.index = output.final_path(report.index)
    report.pages = [output.final_path(page) for page in report.pages]
    for figure in report.figures:
        figure.path = output.final_path(figure.path)
    for table in report.tables:
        table.csv = output.final_path(table.csv) if table.csv else table.csv
    return report


def section_tables(section: Section, views: list[StoreView], tab_dir: Path) -> list[Table]:
    tables = [t for t in section.table(views) if t.rows]
    for table in tables:
        T.write_csv(table, tab_dir)
    return tables


LEFT_OUT = {"fig1": "the maps", "fig6": "the panels", "fig7": "the panels", "fig7_3d": "the panels",
            "fig8": "the X maps"}
"""Figures that say which labels their array leaves out (its `absent_labels` entry), naming where."""


def _notes(section: Section, have: list[StoreView], status: dict[str, tuple[bool, str]]) -> tuple[list[str], list[str]]:
    """(what is missing: stores without the section and why, unfinished layers; what is left out of the
    figures on purpose and why). Labels a model does not have (SE of a model without shared experts, F
    without a reference) are said once, in the store's description, not in every section."""
    notes = [f"{label}: {why}" for label, (ok, why) in status.items() if not ok]
    analysis = section.parent
    for v in have:
        done, planned = v.state.progress.get(analysis, (0, 0)) if analysis != "static" else (0, 0)
        if done < planned:
            notes.append(f"{v.label}: partial store: {analysis} {done}/{planned} units done, so these numbers cover "
                         f"only those (rerun the same spec to resume)")
    remarks = []
    for v in have:
        if section.parent != "static" or not v.has("static"):
            continue
        missing_layers = v.done_layers("static")[1]
        if missing_layers:
            notes.append(f"{v.label}: static layers {missing_layers} not finished (not drawn)")
        if section.key not in LEFT_OUT:
            continue
        absent = (v.dataset("static").attrs.get("absent_labels") or {}).get(section.array) or {}
        for lab, why in absent.items():
            remarks.append(f"{v.label}: {lab} is not in {LEFT_OUT[section.key]}: {why}")
    return notes, remarks


def plot(stores: list[str | Path] | str | Path, out: str | Path = "report", parallel: str = "auto",
         shared_scale: bool = False, tokens: "list[int] | str | None" = None, progress: bool = True) -> Path:
    """Render the report for one or several stores (side by side); return the path of index.html.
    With `progress`, the drawing tasks are counted as they finish (`moe_ray.progress`)."""
    from ..progress import Callback

    if isinstance(stores, (str, Path)):
        stores = [stores]
    figures = Callback("report figures", "drawing task", progress)
    try:
        return render(list(stores), out, parallel, shared_scale, tokens, on_figure=figures).index
    finally:
        figures.close()


def parse_tokens(tokens: "list[int] | str | None") -> "list[int] | str | None":
    """`plot --tokens`: None (each figure's first tokens), "all", or positions as a list or text such as
    "0-6" or "0,3,10-12"; one clear error for anything else."""
    if tokens is None or tokens == "all":
        return tokens
    if isinstance(tokens, str):
        positions: list[int] = []
        for part in tokens.replace(" ", "").split(","):
            first, dash, last = part.partition("-")
            if not first.isdigit() or (dash and not last.isdigit()):
                raise MoeRayError(f"--tokens {tokens!r}: give positions such as 0-6 or 0,3,10-12, or all")
            positions += list(range(int(first), int(last) + 1)) if dash else [int(first)]
        tokens = positions
    if not tokens or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in tokens):
        raise MoeRayError(f"tokens {tokens!r}: give token positions (0 or more) or 'all'")
    return sorted(set(tokens))


def _figure_html(figure: Figure, anchor: str | None = None) -> str:
    name = html.escape(figure.path.name)
    width, height = figure.size_px
    caption = html.escape(figure.title) + (f"<br><span class='cap'>{html.escape(figure.caption)}</span>"
                                           if figure.caption else "")
    ident = f' id="{anchor}"' if anchor else ""
    return (f'<figure{ident}><a href="figures/{name}"><img src="figures/{name}" alt="{html.escape(figure.title)}" '
            f'width="{width}" height="{height}" data-min-font-pt="{figure.min_font_pt:g}" data-dpi="{DPI}" '
            f'loading="lazy"></a><figcaption>{caption}</figcaption></figure>')


def _text_cell(value) -> str:
    """A cell of running text (a finding's observation, its test) reads left-aligned; numbers stay right."""
    return " class='text'" if isinstance(value, str) and len(value) > 16 else ""


def _table_html(table: Table) -> str:
    formats = table.formats or [None] * len(table.columns)
    if table.header_groups:
        top = "".join(f'<th colspan="{n}">{html.escape(label)}</th>' for label, n in table.header_groups)
        sub = "".join(f"<th>{html.escape(c)}</th>" for c in (table.subheaders or table.columns))
        head = f"<tr>{top}</tr><tr>{sub}</tr>"
    else:
        head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in table.columns) + "</tr>"
    rows = "".join("<tr>" + "".join(f"<td{_text_cell(x)}>{html.escape(T.fmt(x, f))}</td>" for x, f in zip(row, formats))
                   + "</tr>" for row in table.rows)
    note = f"<p class='note'>{html.escape(table.note)}</p>" if table.note else ""
    return (f"<h3>{html.escape(table.title)}</h3><div class='scroll'><table><thead>{head}</thead><tbody>{rows}"
            f"</tbody></table></div>{note}<p><a href='tables/{table.csv.name}'>{table.csv.name}</a> (full precision)</p>")


INPUT_TEXTS = {
    "short": "the paper's short input, “As an open source alternative to”, with the tokenizer's BOS first",
    "long": "the long input: the Declaration of Independence (public domain, shipped with moe-ray), cut to "
            "dynamic.max_tokens tokens",
}


def _inputs(views: list[StoreView], out: Path) -> str:
    """The dynamic inputs the stores were run on, each as the model's tokenizer split it: the short ones in
    full, every one as a text file in `inputs/` (tokens joined back)."""
    seen: dict[tuple, list[str]] = {}
    for v in views:
        for inp in D.ordered_inputs(v.groups("dynamic")):
            ds = v.dataset(D.group(inp))
            if "tokens" not in ds:
                continue
            tokens = tuple(str(t) for t in ds["tokens"].values)
            seen.setdefault((inp, tokens), []).append(v.label)
    if not seen:
        return ""
    (out / "inputs").mkdir(exist_ok=True)
    rows = []
    for n, ((inp, tokens), labels) in enumerate(seen.items()):
        name = f"{inp}.txt" if sum(1 for i, _ in seen if i == inp) == 1 else f"{inp}-{n}.txt"
        (out / "inputs" / name).write_text(decode_tokens(list(tokens)))
        what = INPUT_TEXTS.get(inp, f"the user's {inp} input")
        shown = (" · ".join(html.escape(token_label(t, 30)) for t in tokens) if len(tokens) <= 64 else
                 f"first tokens: {' · '.join(html.escape(token_label(t, 30)) for t in tokens[:16])} …")
        rows.append(f"<tr><th>{html.escape(inp)}</th><td>{html.escape(', '.join(labels))}</td><td>{len(tokens):,}</td>"
                    f"<td>{html.escape(what)}<br><span class='tokens'>{shown}</span><br>"
                    f"<a href='inputs/{name}'>inputs/{name}</a> (the text as tokenised)</td></tr>")
    return ("<h2 id='inputs'>Inputs</h2><p>Texts of the dynamic analyses (§5), as each model's tokenizer split "
            "them (␣ marks a space).</p><div class='scroll'><table class='prov'><thead><tr><th>input</th><th>stores"
            "</th><th>tokens</th><th>text</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet back to bytes (printable bytes as themselves, the rest shifted)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def decode_tokens(tokens: list[str]) -> str:
    """Tokens joined back into text: byte-level BPE ('Ġ' = space) through its byte alphabet, SentencePiece
    ('▁' = space, <0xNN> bytes) by its markers; anything else as is."""
    text = "".join(tokens)
    if "Ġ" in text or "Ċ" in text:
        decoder = _byte_decoder()
        if all(c in decoder for c in text):
            return bytes(decoder[c] for c in text).decode("utf-8", errors="replace")
    return re.sub(r"<0x([0-9A-Fa-f]{2})>", lambda m: chr(int(m.group(1), 16)), text).replace("▁", " ")


def _provenance(view: StoreView) -> str:
    a = view.attrs
    model, ref = view.model, view.reference
    identity = a.get("identity") or {}
    groups = (["static"] if view.has("static") else []) + [f"reorder/{m}" for m in view.groups("reorder")] \
        + [f"dynamic/{i}" for i in D.ordered_inputs(view.groups("dynamic"))] \
        + [f"causal/{g}" for g in view.groups("causal")]
    labels = [str(x) for x in ((view.dataset("static").attrs.get("params") or {}).get("labels") or [])] \
        if view.has("static") else []
    shared = "a shared expert (SE)" if "SE" in labels or model.get("shared_d_mid") else "no shared expert"
    rows = [("store", view.url), ("state", view.state.text() if getattr(view, "state", None) else "?")]
    if view.synthetic is not None:
        planted = view.synthetic
        detail = ", ".join(f"{k} {planted[k]}" for k in ("variant", "sigma", "seed") if k in planted)
        rows.append(("synthetic", f"yes: random weights made by moe-ray make-tiny ({detail}), not a trained model"))
    rows += [
        ("model", f"{view.location} — {model.get('family', '?')}, "
                  f"{model.get('num_layers', '?')} layers ({len(model.get('moe_layers', []))} MoE"
                  + (f"; dense FFN in layer {', '.join(map(str, view.dense_layers))}" if view.dense_layers else "")
                  + f"), {model.get('num_experts', '?')} experts, top-{model.get('top_k', '?')}, {shared}, "
                  f"d_hid {model.get('d_hid', '?')}, d_mid {model.get('d_mid', '?')}"),
        ("reference (F)", (f"{(identity.get('reference') or {}).get('location')} — {ref.get('family')}"
                           if ref else "none: no F in the figures (run with --reference DIR to compare with a dense "
                                       "model)")),
        ("routing", model.get("routing", "?")),
        ("moe-ray", (a.get("moe_ray") or {}).get("version", "?")
         + f" (schema {(a.get('moe_ray') or {}).get('schema_version', '?')})"),
        ("created", a.get("created", "?")),
        ("analyses in store", ", ".join(groups) or "none"),
    ]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    spec = html.escape(json.dumps(a.get("spec", {}), indent=2))
    return (f"<h3>{html.escape(view.label)}</h3><div class='scroll'><table class='prov'>{cells}</table></div>"
            f"<details><summary>spec</summary><pre>{spec}</pre></details>")


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}img{max-width:100%;height:auto;
border:1px solid #ddd}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;
font-size:14px;text-align:right}th{background:#f4f4f4;text-align:center}.prov th,.prov td{text-align:left}
td:first-child{text-align:left}.missing{color:#a33}.remark{color:#444}figure{margin:1.2em 0}figcaption{font-size:14px}
.cap{color:#444}.note{font-size:14px;color:#333;max-width:75em}nav a{margin-right:1em}.scroll{overflow-x:auto}
.tokens{font-family:monospace;font-size:13px}
.state{border:2px solid #c60;background:#fff4e5;padding:.2em 1em;margin:1em 0}pre{white-space:pre-wrap}
nav{position:sticky;top:0;background:#fff;padding:.3em 0;border-bottom:1px solid #ddd;z-index:1}nav a.here{font-weight:bold}
nav.sections{position:static;border:0}td.text{text-align:left}.layers a{margin-right:.6em}"""


def _state_banner(states: list[StoreState]) -> str:
    """A warning above everything when a store is partial, failed or still running: its figures and tables
    cover only the units it finished."""
    unfinished = [s for s in states if s.text() != "complete"]
    if not unfinished:
        return ""
    items = "".join(f"<li><b>{html.escape(s.label)}</b>: {html.escape(s.text())}</li>" for s in unfinished)
    return (f"<div class='state'><p>Not every store is complete: what is shown covers only the units each one "
            f"finished (rerun the same spec to resume).</p><ul>{items}</ul></div>")


PAGE_BUDGET = 5_000_000
"""Bytes a page may weigh with the images it shows: a model whose figures weigh more gets a page per section
(and a section heavier than this, pages of its images)."""


@dataclass
class SectionOut:
    """A section as drawn: its notes, tables and figures (every store's)."""

    section: Section
    notes: list[str]
    remarks: list[str]
    tables: list[Table]
    figures: list[Figure]
    present: bool


def model_page_name(label: str, part: str = "") -> str:
    return f"model-{S.slug(label)}{'-' + part if part else ''}.html"


def _layer_anchor(section: str, figure: Figure) -> str | None:
    """The figure's page of layers as an anchor id (`fig1-L4-7`), None for a figure of all layers."""
    match = re.search(r"_(L\d+(?:-\d+)?)(?:_T\d+-\d+)?\.png$", figure.path.name)
    return f"{section}-{match.group(1)}" if match else None


def _section_html(out: SectionOut, figures: list[Figure], links: dict[str, str] | None = None,
                  labels: list[str] | None = None, anchor_pages: dict[str, str] | None = None) -> str:
    """A section: title, caption, notes (only those of `labels`' stores when given), tables, figures with a
    line of layer links; `links` (model label -> page) says where its figures are when they are elsewhere."""
    section = out.section
    notes = [n for n in out.notes if labels is None or any(n.startswith(lab + ":") for lab in labels)]
    remarks = [n for n in out.remarks if labels is None or any(n.startswith(lab + ":") for lab in labels)]
    not_run = [n for n in notes if "(run with " in n]
    notes = [n for n in notes if n not in not_run]
    items = [_table_html(table) for table in out.tables] if labels is None else []
    anchors, seen = [], set()
    for figure in figures:
        anchor = _layer_anchor(section.key, figure)
        first = anchor is not None and anchor not in seen
        seen.add(anchor)
        if first:
            anchors.append(anchor)
        items.append(_figure_html(figure, anchor if first else None))
    every = anchor_pages or {a: "" for a in anchors}  # the section's layer pages, over all its HTML pages
    layer_nav = ("<p class='layers'>layers: " + " ".join(f"<a href='{page}#{a}'>{a.split('-', 1)[1]}</a>"
                                                         for a, page in every.items()) + "</p>") if len(every) > 1 else ""
    where = ""
    if links:
        where = "<p>Figures: " + " · ".join(f"<a href='{html.escape(page)}#{section.key}'>{html.escape(label)}</a>"
                                             for label, page in links.items()) + "</p>"
    if not out.present:
        items.append('<p class="remark">Not in any store.</p>')
    if links:  # the figures are on the models' pages, with what is left out of them
        remarks = []
    return (f'<section id="{section.key}"><h2>{html.escape(section.title)}</h2><p>{html.escape(section.caption)}</p>'
            + _list("missing", notes) + _list("remark", not_run + remarks) + where + layer_nav + "".join(items)
            + "</section>")


def _list(cls: str, items: list[str]) -> str:
    return f'<ul class="{cls}">' + "".join(f"<li>{html.escape(n)}</li>" for n in items) + "</ul>" if items else ""


def _split(figures: list[Figure], budget: int) -> list[list[Figure]]:
    """Figures in runs of at most `budget` bytes (a figure heavier than that alone)."""
    runs: list[list[Figure]] = [[]]
    size = 0
    for figure in figures:
        weight = figure.path.stat().st_size
        if runs[-1] and size + weight > budget:
            runs.append([])
            size = 0
        runs[-1].append(figure)
        size += weight
    return runs


def write_pages(views: list[StoreView], sections: list[SectionOut], report: Report, inputs_html: str,
                shared_scale: bool, out: Path) -> list[Path]:
    """index.html (stores, inputs, every table, where each figure is) and the models' pages: one per model
    holding its figures, or, where they weigh more than PAGE_BUDGET, one per section (and part). Every page
    has the same navigation by model and section; a section's figures are linked by their layers."""
    labels = [v.label for v in views]
    # which page holds each (model, section)'s figures
    plan: dict[str, list[tuple[str, list[tuple[SectionOut, list[Figure]]]]]] = {}
    for label in labels:
        mine = [(s, [f for f in s.figures if f.store == label]) for s in sections]
        mine = [(s, figs) for s, figs in mine if figs]
        total = sum(f.path.stat().st_size for _, figs in mine for f in figs)
        if total <= PAGE_BUDGET:
            plan[label] = [(model_page_name(label), mine)] if mine else []
        else:
            pages_: list = []
            for s, figs in mine:
                runs = _split(figs, PAGE_BUDGET)
                for n, run in enumerate(runs):
                    part = s.section.key + (f"-{n + 1}" if len(runs) > 1 else "")
                    pages_.append((model_page_name(label, part), [(s, run)]))
            plan[label] = pages_
    where = {(label, s.section.key): page for label, pages_ in plan.items() for page, held in pages_ for s, _ in held}

    index_parts = {"stores": True, "inputs": bool(inputs_html),
                   **{key: any(s.section.key == key and s.present for s in sections) for key in ("findings", "comparison")}}

    def nav(current: str) -> str:
        models = []
        for label in labels:
            first = plan[label][0][0] if plan[label] else None
            if first is None:
                continue
            cls = " class='here'" if any(page == current for page, _ in plan[label]) else ""
            models.append(f"<a href='{first}'{cls}>{html.escape(label)}</a>")
        parts = "".join(f"<a href='index.html#{key}'>{key.capitalize()}</a>" for key, shown in index_parts.items()
                        if shown)
        return f"<nav><a href='index.html'>Overview</a>{parts} | models: " + "".join(models) + "</nav>"

    def section_nav(label: str) -> str:
        links = [f"<a href='{where[(label, s.section.key)]}#{s.section.key}'>{html.escape(s.section.title.split(':')[0])}"
                 "</a>" for s in sections if (label, s.section.key) in where]
        return f"<nav class='sections'>{html.escape(label)}: {''.join(links)}</nav>" if links else ""

    written = []
    body = []
    for s in sections:
        links = {label: where[(label, s.section.key)] for label in labels if (label, s.section.key) in where}
        body.append(_section_html(s, [], links))
    title = "moe-ray report: " + ", ".join(labels)
    scale = ("All models' images of a figure share one colour range (--shared-scale)." if shared_scale else
             "Each model's images have one colour range per figure over all its layers, as in the paper (moe-ray "
             "plot --shared-scale shares one across models).")
    prov = "".join(_provenance(v) for v in views)
    model_list = "".join(f"<li>{section_nav(label)}</li>" for label in labels if plan[label])
    index = (f"<h1>{html.escape(title)}</h1><p>Figures and tables of <i>A Closer Look into Mixture-of-Experts in Large "
             f"Language Models</i> (arXiv 2406.18219); {len(report.figures)} figures on {sum(map(len, plan.values()))} "
             f"model pages, {len(report.tables)} tables, rendered in {report.seconds:.1f}s. {scale}</p>"
             f"{_state_banner(report.states)}{nav('index.html')}<h2>Models</h2><ul class='models'>{model_list}</ul>"
             f"<h2 id='stores'>Stores</h2>{prov}{inputs_html}{''.join(body)}")
    report.index.write_text(_document(title, index))
    written.append(report.index)
    anchor_pages: dict[tuple[str, str], dict[str, str]] = {}  # (model, section) -> {layer anchor: page}
    for label, pages_ in plan.items():
        for page, held in pages_:
            for s, figs in held:
                for f in figs:
                    anchor = _layer_anchor(s.section.key, f)
                    if anchor is not None:
                        anchor_pages.setdefault((label, s.section.key), {}).setdefault(anchor, page)
    for label, pages_ in plan.items():
        for page, held in pages_:
            parts = "".join(_section_html(s, figs, labels=[label], anchor_pages={
                a: ("" if p == page else p) for a, p in anchor_pages.get((label, s.section.key), {}).items()})
                for s, figs in held)
            heading = f"{label}" + (f": {held[0][0].section.title}" if len(pages_) > 1 else "")
            text = (f"<h1>{html.escape(heading)}</h1>{_state_banner([st for st in report.states if st.label == label])}"
                    f"{nav(page)}{section_nav(label)}{parts}")
            (out / page).write_text(_document(f"moe-ray report: {heading}", text))
            written.append(out / page)
    return written


def _document(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")
