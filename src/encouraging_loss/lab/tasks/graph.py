"""Graph classification: CE vs EL on TU datasets (PROTEINS by default) with GIN or GCN.

Reads top-down: presets → data (TUDataset, stratified 80/10/10 split per seed) → model (PyG
GIN/GCN layers + global pooling) → train (the lab's shared trainer) → diagnostics → report.

The protocol follows the paper's graph experiments: a random stratified split per seed, model
selection on validation accuracy, test accuracy reported, encouraging loss with ``log_end=0.5``
and its bonus switched on late in training through the core's :class:`BonusSchedule`
(``el:log_end=0.5,start=0.5,ramp=0.2`` = bonus scale 0 for the first half, then a linear ramp
to 1 over the next 20% of training).

Needs ``torch_geometric`` (pure Python; the compiled ``torch-scatter``/``torch-sparse`` extras
are not used).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .. import data as lab_data
from .. import diagnostics, report
from ..losses import LossSpec, build_bonus_schedule, build_criterion, parse_loss_list
from ..trainer import TrainConfig, finish_distributed, rank, set_seed, train, world_size

TASK = "graph"
DATASETS = ("PROTEINS", "MUTAG", "ENZYMES", "AIDS", "Mutagenicity")
MODELS = ("gin", "gcn")
DEFAULT_DATASET = "PROTEINS"
DEFAULT_LOSSES = "ce,el:log_end=0.5,start=0.5,ramp=0.2"
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
TABLE_METRICS = (
    ("test_accuracy", "test acc", True),
    ("val_accuracy", "val acc", True),
    ("margin_mean", "margin", True),
    ("energy_mean", "energy −lse", False),
    ("probe_accuracy", "probe acc", True),
    ("ece", "ECE", False),
    ("grad_share_well_classified_last", "grad share p_y>0.5", True),
)
TABLE_NOTE = (
    "Mean ± std over seeds (one random stratified 80/10/10 split per seed, shared by every loss "
    "of that seed); test metrics of the epoch with the best validation accuracy. margin = "
    "z_y − max_{j≠y} z_j; energy −lse = −logsumexp(z); probe = linear probe on the frozen "
    "pooled graph embeddings; grad share = share of the per-example logit-gradient norm from "
    "graphs with p_y > 0.5 in the last training epoch. Test splits are small (about 111 graphs "
    "for PROTEINS), so one graph is ~0.9 points of accuracy."
)


# --- presets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphRecipe:
    """How one preset trains.

    Attributes:
        model: ``gin`` or ``gcn``.
        hidden: width of every graph layer and of the head.
        layers: number of message-passing layers.
        dropout: dropout before the classifier.
        seeds: default number of seeds.
        train: optimiser and schedule (seed filled in per run).
        max_graphs: use a fixed random subset of this many graphs (``None`` = all).
        threads: torch CPU threads (``None`` = torch's default).
    """

    model: str
    hidden: int
    layers: int
    dropout: float
    seeds: int
    train: TrainConfig
    max_graphs: int | None = None
    threads: int | None = 1


PRESETS: dict[str, GraphRecipe] = {
    # ≤ 3 minutes on 2 CPU cores for the default 2 losses × 3 seeds on PROTEINS.
    "quick": GraphRecipe(
        model="gin",
        hidden=32,
        layers=3,
        dropout=0.5,
        seeds=3,
        train=TrainConfig(
            epochs=60,
            batch_size=64,
            optimizer="adamw",
            lr=0.01,
            weight_decay=1e-4,
            schedule="cosine",
            eval_batch_size=512,
        ),
    ),
    # The paper-sized protocol for a GPU (or a patient CPU): 10 seeds, wider GIN, 300 epochs.
    "full": GraphRecipe(
        model="gin",
        hidden=64,
        layers=5,
        dropout=0.5,
        seeds=10,
        threads=None,
        train=TrainConfig(
            epochs=300,
            batch_size=32,
            optimizer="adamw",
            lr=0.01,
            weight_decay=1e-4,
            schedule="cosine",
            device="auto",
            eval_batch_size=512,
        ),
    ),
}
LR_NOTE = (
    "AdamW lr {lr:g}, weight decay {wd:g}, cosine decay, for every loss: one rate keeps the "
    "comparison paired (same seed = same split, initialisation and batches)."
)


@dataclass
class GraphOptions:
    """Everything one ``run graph`` invocation needs; ``None`` fields use the preset's."""

    losses: str = DEFAULT_LOSSES
    seeds: int | None = None
    preset: str = "quick"
    dataset: str | None = None
    model: str | None = None
    data_root: str | None = None
    out: str | None = None
    resume: bool = False
    lr: float | None = None
    clip_grad_norm: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    max_graphs: int | None = None
    device: str | None = None
    amp: bool = True
    threads: int | None = None
    progress: bool = True
    stop_after_epochs: int | None = None


def options_from_args(args: argparse.Namespace) -> GraphOptions:
    """Build :class:`GraphOptions` from the ``run`` sub-command's parsed arguments.

    ``--train-size`` caps the number of graphs used (a fixed random subset, before splitting);
    ``--test-size`` has no meaning here and is refused.

    Args:
        args: parsed arguments of ``encouraging-loss run graph``.

    Returns:
        The options.

    Raises:
        ValueError: for an option the graph task does not take.
    """
    if getattr(args, "test_size", None) is not None:
        raise ValueError(
            "test-size: the graph task splits 80/10/10; use --train-size to cap graphs"
        )
    return GraphOptions(
        losses=args.losses or DEFAULT_LOSSES,
        seeds=args.seeds,
        preset=args.preset,
        dataset=args.dataset,
        model=args.model,
        data_root=args.data_root,
        out=args.out,
        resume=args.resume,
        lr=args.lr,
        clip_grad_norm=args.clip_grad_norm,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        max_graphs=args.train_size,
        device=args.device,
        amp=args.amp,
        threads=args.threads,
        progress=args.progress,
        stop_after_epochs=args.stop_after_epochs,
    )


def resolve_recipe(options: GraphOptions) -> tuple[str, GraphRecipe]:
    """Pick the preset's recipe and apply command-line overrides.

    Args:
        options: parsed options.

    Returns:
        ``(dataset, recipe)``.

    Raises:
        ValueError: naming the first bad option.
    """
    if options.preset not in PRESETS:
        raise ValueError(f"preset: graph has presets {', '.join(PRESETS)}, got {options.preset!r}")
    dataset = options.dataset or DEFAULT_DATASET
    if dataset not in DATASETS:
        raise ValueError(f"dataset: unknown TU dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if options.model is not None and options.model not in MODELS:
        raise ValueError(
            f"model: unknown graph model {options.model!r}; known: {', '.join(MODELS)}"
        )
    if options.seeds is not None and options.seeds < 1:
        raise ValueError(f"seeds: must be at least 1, got {options.seeds}")
    if options.max_graphs is not None and options.max_graphs < 20:
        raise ValueError(f"train-size: need at least 20 graphs, got {options.max_graphs}")
    if options.threads is not None and options.threads < 0:
        raise ValueError(f"threads: must be >= 0 (0 = torch default), got {options.threads}")
    recipe = PRESETS[options.preset]
    overrides = {
        key: value
        for key, value in (
            ("lr", options.lr),
            ("clip_grad_norm", options.clip_grad_norm),
            ("epochs", options.epochs),
            ("batch_size", options.batch_size),
            ("optimizer", options.optimizer),
            ("schedule", options.schedule),
            ("weight_decay", options.weight_decay),
            ("device", options.device),
        )
        if value is not None
    }
    train_config = replace(recipe.train, **overrides, amp=recipe.train.amp and options.amp)
    train_config.validate()
    recipe = replace(
        recipe,
        model=options.model or recipe.model,
        seeds=options.seeds or recipe.seeds,
        train=train_config,
        max_graphs=options.max_graphs if options.max_graphs is not None else recipe.max_graphs,
        threads=recipe.threads if options.threads is None else (options.threads or None),
    )
    return dataset, recipe


def describe_presets() -> str:
    """One line per preset (for ``--help``)."""
    lines = []
    for name, r in PRESETS.items():
        t = r.train
        lines.append(
            f"graph {name}/{DEFAULT_DATASET}: {r.model} {r.layers}x{r.hidden}, {r.seeds} seeds, "
            f"{t.epochs} epochs, batch {t.batch_size}, {t.optimizer} lr {t.lr:g} ({t.schedule})"
        )
    return "\n".join(lines)


# --- data --------------------------------------------------------------------------------


def _require_pyg():
    try:
        import torch_geometric  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "the graph task needs torch_geometric: pip install torch_geometric "
            "(or the project's [lab] extra)"
        ) from error


def load_tu_dataset(name: str, data_root: str | None = None, max_graphs: int | None = None):
    """Load a TU dataset from ``DATA_ROOT/tu/NAME/raw`` into memory as a list of graphs.

    PyG's ``TUDataset`` writes ``processed/`` next to ``raw/``; the shared data folder is
    read-only, so ``raw/`` is copied into a private temporary folder, processed there, and the
    folder removed once the graphs are in memory (each process does its own: no races under
    ``torchrun``). Node features are PyG's defaults (one-hot node labels); a dataset without
    node features gets a constant feature.

    Args:
        name: one of :data:`DATASETS`.
        data_root: data root holding ``tu/NAME/raw`` (``None`` = the lab's default root).
        max_graphs: keep a fixed random subset (seed 0) of this many graphs; ``None`` = all.

    Returns:
        ``(graphs, num_features, num_classes, source_folder)``.

    Raises:
        ValueError: for an unknown name or a bad ``max_graphs``.
        lab_data.DatasetNotFoundError: if the raw files are missing.
        RuntimeError: if torch_geometric is not installed.
    """
    if name not in DATASETS:
        raise ValueError(f"name: unknown TU dataset {name!r}; known: {', '.join(DATASETS)}")
    if max_graphs is not None and max_graphs < 1:
        raise ValueError(f"max_graphs: must be positive or None, got {max_graphs}")
    folder = lab_data.find_data_folder(
        f"tu/{name}",
        (f"raw/{name}_A.txt", f"raw/{name}_graph_indicator.txt", f"raw/{name}_graph_labels.txt"),
        data_root,
    )
    _require_pyg()
    from torch_geometric.datasets import TUDataset

    with tempfile.TemporaryDirectory(prefix="el-tu-") as cache:
        shutil.copytree(folder / "raw", Path(cache) / name / "raw")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            dataset = TUDataset(cache, name)  # prints "Processing..." otherwise
        graphs = [dataset[i] for i in range(len(dataset))]
        num_classes = int(dataset.num_classes)
    if graphs[0].x is None:
        for graph in graphs:
            graph.x = torch.ones(graph.num_nodes, 1)
    for graph in graphs:
        graph.edge_attr = None  # GIN/GCN here use node features only
        graph.y = graph.y.view(-1).long()
    if max_graphs is not None and max_graphs < len(graphs):
        keep = torch.randperm(len(graphs), generator=torch.Generator().manual_seed(0))[:max_graphs]
        graphs = [graphs[i] for i in sorted(keep.tolist())]
    return graphs, int(graphs[0].x.shape[1]), num_classes, folder


def stratified_split(
    labels: torch.Tensor, seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random stratified train/val/test indices (each class split by ``fractions``).

    Args:
        labels: ``(N,)`` class labels.
        seed: seed of the split.
        fractions: train, validation and test shares, summing to 1.

    Returns:
        ``(train_idx, val_idx, test_idx)``, each sorted.

    Raises:
        ValueError: if ``fractions`` do not sum to 1 or a split would be empty.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions: expected three positive shares summing to 1, got {fractions}")
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[], [], []]
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).view(-1)
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        n_val = int(round(len(members) * fractions[1]))
        n_test = int(round(len(members) * fractions[2]))
        parts[1] += members[:n_val]
        parts[2] += members[n_val : n_val + n_test]
        parts[0] += members[n_val + n_test :]
    for name, part in zip(("train", "val", "test"), parts, strict=True):
        if not part:
            raise ValueError(f"labels: {len(labels)} graphs leave the {name} split empty")
    return tuple(torch.tensor(sorted(p), dtype=torch.long) for p in parts)  # type: ignore[return-value]


class GraphBatches:
    """A list of graphs indexed like a tensor of examples: ``view[index]`` is one PyG ``Batch``.

    This lets the lab's shared trainer, which draws ``train_x[index]`` and slices
    ``val_x[i:j]``, train graph models unchanged.

    Args:
        graphs: PyG ``Data`` objects.
    """

    def __init__(self, graphs: list):
        self.graphs = list(graphs)

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index):
        from torch_geometric.data import Batch

        if isinstance(index, slice):
            chosen = self.graphs[index]
        elif isinstance(index, torch.Tensor):
            chosen = [self.graphs[i] for i in index.view(-1).tolist()]
        else:
            chosen = [self.graphs[int(i)] for i in index]
        return Batch.from_data_list(chosen)


@dataclass
class GraphSplits:
    """One seed's split in the layout the shared trainer expects (``train_x``/``train_y``...)."""

    train_x: GraphBatches
    train_y: torch.Tensor
    val_x: GraphBatches
    val_y: torch.Tensor
    test_x: GraphBatches
    test_y: torch.Tensor
    num_classes: int


def make_graph_splits(graphs: list, num_classes: int, seed: int) -> GraphSplits:
    """Split graphs 80/10/10 (stratified, seeded) into :class:`GraphSplits`.

    Args:
        graphs: the dataset's graphs.
        num_classes: number of classes.
        seed: split seed (the run's seed: every loss of one seed sees the same split).

    Returns:
        The splits.
    """
    labels = torch.cat([g.y for g in graphs])
    parts = stratified_split(labels, seed)
    views = [GraphBatches([graphs[i] for i in p.tolist()]) for p in parts]
    return GraphSplits(
        train_x=views[0],
        train_y=labels[parts[0]],
        val_x=views[1],
        val_y=labels[parts[1]],
        test_x=views[2],
        test_y=labels[parts[2]],
        num_classes=num_classes,
    )


# --- model -------------------------------------------------------------------------------


class GraphClassifier(nn.Module):
    """GIN (sum pooling) or GCN (mean pooling) with a two-layer head, from PyG layers.

    ``features(batch)`` is the penultimate graph embedding and ``classifier`` the last linear
    layer, the interface the lab's diagnostics use.

    Args:
        kind: ``"gin"`` or ``"gcn"``.
        in_features: node feature size.
        num_classes: number of classes.
        hidden: layer width.
        layers: message-passing layers.
        dropout: dropout before the classifier.

    Raises:
        ValueError: for an unknown ``kind`` or non-positive sizes.
    """

    def __init__(
        self,
        kind: str,
        in_features: int,
        num_classes: int,
        hidden: int = 32,
        layers: int = 3,
        dropout: float = 0.5,
    ):
        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"kind: unknown graph model {kind!r}; known: {', '.join(MODELS)}")
        for arg, value in (("in_features", in_features), ("hidden", hidden), ("layers", layers)):
            if value < 1:
                raise ValueError(f"{arg}: must be positive, got {value}")
        if num_classes < 2:
            raise ValueError(f"num_classes: need at least 2, got {num_classes}")
        from torch_geometric.nn import GCNConv, GINConv, global_add_pool, global_mean_pool

        self.kind = kind
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        width = in_features
        for _ in range(layers):
            if kind == "gin":
                mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
                self.convs.append(GINConv(mlp, train_eps=True))
            else:
                self.convs.append(GCNConv(width, hidden))
            self.norms.append(nn.BatchNorm1d(hidden))
            width = hidden
        self.pool = global_add_pool if kind == "gin" else global_mean_pool
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, num_classes)

    def features(self, batch) -> torch.Tensor:
        """Penultimate graph embeddings ``(num_graphs, hidden)``."""
        x = batch.x.float()
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = torch.relu(norm(conv(x, batch.edge_index)))
        return self.head(self.pool(x, batch.batch, size=batch.num_graphs))

    def forward(self, batch) -> torch.Tensor:
        """Logits ``(num_graphs, num_classes)``."""
        return self.classifier(self.features(batch))


# --- run ---------------------------------------------------------------------------------


def run(options: GraphOptions) -> dict | None:
    """Run the graph task for every loss and seed and write the report.

    Args:
        options: see :class:`GraphOptions`.

    Returns:
        The results dict (``None`` on ranks other than 0, or when stopped on purpose with
        ``stop_after_epochs``).

    Raises:
        ValueError: for bad options or loss names.
        lab_data.DatasetNotFoundError: if the dataset is missing.
        RuntimeError: if torch_geometric is missing.
    """
    # --- configuration -------------------------------------------------------------------
    specs = parse_loss_list(options.losses)
    dataset_name, recipe = resolve_recipe(options)
    out_dir = Path(options.out or f"runs/{TASK}-{options.preset}-{dataset_name}")
    is_main = rank() == 0
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)

    # --- data ----------------------------------------------------------------------------
    started = time.perf_counter()
    graphs, num_features, num_classes, source = load_tu_dataset(
        dataset_name, options.data_root, recipe.max_graphs
    )
    first_split = make_graph_splits(graphs, num_classes, seed=0)
    config = {
        "preset": options.preset,
        "model": recipe.model,
        "hidden": recipe.hidden,
        "layers": recipe.layers,
        "dropout": recipe.dropout,
        "losses": [s.name for s in specs],
        "seeds": list(range(recipe.seeds)),
        "train": asdict(recipe.train),
        "lr_note": LR_NOTE.format(lr=recipe.train.lr, wd=recipe.train.weight_decay),
        "data": {
            "source": str(source),
            "n_graphs": len(graphs),
            "num_features": num_features,
            "num_classes": num_classes,
            "split": "stratified 80/10/10, re-drawn per seed",
            "n_train": len(first_split.train_y),
            "n_val": len(first_split.val_y),
            "n_test": len(first_split.test_y),
        },
        "table_metrics": [list(m) for m in TABLE_METRICS],
        "table_note": TABLE_NOTE,
        "out": str(out_dir),
        "world_size": world_size(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # --- one training run per loss and seed ----------------------------------------------
    runs = []
    for seed in range(recipe.seeds):
        splits = make_graph_splits(graphs, num_classes, seed=seed)
        for spec in specs:
            record, interrupted = _train_and_measure(
                spec, seed, recipe, splits, num_features, out_dir, options
            )
            if interrupted:
                finish_distributed()
                return None
            if record is not None:
                runs.append(record)
    finish_distributed()

    # --- report --------------------------------------------------------------------------
    config["wall_seconds"] = time.perf_counter() - started
    results = {"task": TASK, "dataset": dataset_name, "config": config, "runs": runs}
    if is_main:
        report.write_report(out_dir, results)
    return results if is_main else None


def _train_and_measure(
    spec: LossSpec,
    seed: int,
    recipe: GraphRecipe,
    splits: GraphSplits,
    num_features: int,
    out_dir: Path,
    options: GraphOptions,
) -> tuple[dict | None, bool]:
    """Train one (loss, seed) run with the shared trainer, measure it, save its record."""
    slug = report.run_slug(spec.name, seed)
    record_path = out_dir / "runs" / f"{slug}.json"
    checkpoint_path = out_dir / "checkpoints" / f"{slug}.pt"
    if options.resume and record_path.is_file():
        return json.loads(record_path.read_text(encoding="utf-8")), False

    train_config = replace(recipe.train, seed=seed)
    set_seed(seed, train_config.deterministic)
    model = GraphClassifier(
        recipe.model,
        num_features,
        splits.num_classes,
        hidden=recipe.hidden,
        layers=recipe.layers,
        dropout=recipe.dropout,
    )
    outcome = train(
        model,
        build_criterion(spec),
        splits,
        train_config,
        bonus_schedule=build_bonus_schedule(spec),
        checkpoint_path=checkpoint_path,
        resume=options.resume,
        stop_after_epochs=options.stop_after_epochs,
        progress=options.progress,
        description=f"{spec.name} seed {seed}",
    )
    if outcome.interrupted or rank() != 0:
        return None, outcome.interrupted

    metrics: dict = outcome.outcome_metrics()
    reliability = None
    if not outcome.diverged:
        metrics.update(_measure(model, splits, train_config, out_dir, spec.name, seed))
        reliability = metrics.pop("_reliability")
        metrics["grad_share_well_classified_last"] = outcome.history[-1][
            "grad_share_well_classified"
        ]
    record = {
        "loss": spec.name,
        "seed": seed,
        "status": "diverged" if outcome.diverged else "ok",
        "lr": train_config.lr,
        "metrics": metrics,
        "history": outcome.history,
        "reliability": reliability,
        "train_seconds": outcome.train_seconds,
    }
    report.atomic_write_json(record_path, record)
    if checkpoint_path.is_file():
        checkpoint_path.unlink()
    return record, False


def _measure(model, splits: GraphSplits, config: TrainConfig, out_dir: Path, loss, seed) -> dict:
    """Test accuracy, margin/energy/calibration diagnostics and a linear probe."""
    device = next(model.parameters()).device
    batch = config.eval_batch_size
    train_features, train_logits = diagnostics.extract_features(
        model, splits.train_x, batch, device
    )
    test_features, test_logits = diagnostics.extract_features(model, splits.test_x, batch, device)
    test = diagnostics.logit_diagnostics(test_logits, splits.test_y)
    metrics = {
        "test_accuracy": test.pop("accuracy"),
        "test_nll": test.pop("nll"),
        **test,
        **diagnostics.logit_diagnostics(train_logits, splits.train_y, prefix="train_"),
        "probe_accuracy": diagnostics.linear_probe_accuracy(
            train_features, splits.train_y, test_features, splits.test_y, seed=seed
        ),
    }
    metrics["_reliability"] = diagnostics.calibration(test_logits, splits.test_y)[1]
    energy_true, energy_free = diagnostics.energies(test_logits, splits.test_y)
    report.save_arrays(
        out_dir,
        loss,
        seed,
        margin=diagnostics.margins(test_logits, splits.test_y).numpy(),
        energy=energy_free.numpy(),
        energy_true=energy_true.numpy(),
    )
    return metrics
