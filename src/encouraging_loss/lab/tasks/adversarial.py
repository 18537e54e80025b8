"""Adversarial robustness: robust accuracy under FGSM and PGD-L∞ over an ε grid, per loss.

Reads top-down: presets → data (pixels in [0, 1]; the model standardises inside) → for each
loss and seed: model → train (optionally PGD adversarial training) → attacks over the ε grid →
report with a plot of robust accuracy against ε.

Attacks come from ``torchattacks`` (FGSM; PGD with a uniform random start in the ε-ball,
``--pgd-steps`` steps of size ``α = 2.5 ε / steps``, Madry et al.'s rule, so the iterate can
cross the ball). torchattacks declares a dependency on torchvision (which pins its own torch)
but none of its FGSM/PGD code imports it, so install it with ``pip install --no-deps
torchattacks`` (it also needs scipy, tqdm, requests and numpy, which the lab's extras bring).
Without torchattacks the task falls back to :func:`fgsm` and :func:`pgd` below, the same
algorithms in a few lines (``config.attack_backend`` records which one ran).

``pgd-margin`` is the same PGD on the margin (CW) loss ``max_{j≠y} z_j − z_y`` instead of CE
(built in; torchattacks has no L∞ version). CE's gradient vanishes in float32 once the softmax
saturates, and EL trains larger logits than CE, so a CE-gradient attack can find nothing to
follow on very confident examples (gradient masking); the margin loss has no such plateau, so
it is the check on whether a robustness gain under FGSM/PGD is real.

ε is in pixel units of [0, 1] images. Metrics: ``clean_accuracy``,
``robust_accuracy/<attack>/<ε>`` (ε written with ``%.4g``, e.g. ``robust_accuracy/pgd/0.3``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .. import data as lab_data
from .. import diagnostics, report, runs
from ..losses import build_bonus_schedule, build_criterion, parse_loss_list
from ..models import build_model
from ..trainer import TrainConfig, finish_distributed, rank, resolve_device, set_seed, train

TASK = "adversarial"
ATTACKS = ("fgsm", "pgd", "pgd-margin")


# --- presets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How one preset trains and attacks.

    Attributes:
        dataset: dataset name.
        model: ``mlp``, ``cnn`` or ``resnet18``.
        max_train: training images (validation included); ``None`` = all.
        max_test: test images attacked; ``None`` = all.
        epsilons: the ε grid (pixel units of [0, 1] images).
        key_epsilon: the ε whose robust accuracy the paper's direction is checked on.
        pgd_steps: PGD iterations (step size ``2.5 ε / steps``).
        adv_train_epsilon: ε of PGD adversarial training (``--adv-train``).
        adv_train_steps: PGD iterations during adversarial training.
        train: optimiser/schedule settings.
        val_fraction: share of the training images held out for model selection.
        threads: CPU threads (``None`` = torch's default).
    """

    dataset: str
    model: str
    max_train: int | None
    max_test: int | None
    epsilons: tuple[float, ...]
    key_epsilon: float
    pgd_steps: int
    train: TrainConfig
    adv_train_epsilon: float = 0.3
    adv_train_steps: int = 10
    val_fraction: float = 0.1
    threads: int | None = 1


MNIST_EPSILONS = (0.0, 0.05, 0.1, 0.2, 0.3)
CIFAR_EPSILONS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)
PRESETS: dict[str, Recipe] = {
    # The MLP keeps 2 losses x 3 seeds (training + 8 attacks on 1,000 images) near 3 minutes on
    # one busy CPU core; the small CNN of the standard preset is the default model.
    "quick": Recipe(
        dataset="mnist",
        model="mlp",
        max_train=None,
        max_test=1000,
        epsilons=MNIST_EPSILONS,
        key_epsilon=0.1,
        pgd_steps=10,
        adv_train_epsilon=0.1,
        adv_train_steps=5,
        train=TrainConfig(
            epochs=5, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4, schedule="cosine"
        ),
    ),
    # The small CNN: ~3 minutes per (loss, seed) on one busy CPU core (docs/lab-robustness.md).
    "standard": Recipe(
        dataset="mnist",
        model="cnn",
        max_train=None,
        max_test=1000,
        epsilons=MNIST_EPSILONS,
        key_epsilon=0.1,
        pgd_steps=10,
        train=TrainConfig(
            epochs=5,
            batch_size=128,
            optimizer="sgd",
            lr=0.05,
            weight_decay=5e-4,
            schedule="cosine",
        ),
    ),
    # CIFAR-10 ResNet-18 at ε = 8/255 (PGD-10 with α = 2/255), the standard CIFAR recipe.
    "full": Recipe(
        dataset="cifar10",
        model="resnet18",
        max_train=None,
        max_test=None,
        epsilons=CIFAR_EPSILONS,
        key_epsilon=8 / 255,
        pgd_steps=10,
        adv_train_epsilon=8 / 255,
        adv_train_steps=10,
        threads=None,
        train=TrainConfig(
            epochs=200,
            batch_size=128,
            optimizer="sgd",
            lr=0.1,
            weight_decay=5e-4,
            schedule="cosine",
            augment=True,
            device="auto",
        ),
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this task's options to the ``run`` parser."""
    group = parser.add_argument_group("adversarial task", "attacks: fgsm, pgd, pgd-margin (L∞)")
    group.add_argument(
        "--epsilons",
        metavar="LIST",
        help="ε grid in pixel units, e.g. 0,0.05,0.1,0.2,0.3 or 0,2/255,8/255 "
        "(default: the preset's)",
    )
    group.add_argument(
        "--attacks",
        metavar="LIST",
        help="comma-separated attacks from fgsm,pgd,pgd-margin (default all three)",
    )
    group.add_argument("--pgd-steps", type=int, metavar="K", help="PGD iterations")
    group.add_argument(
        "--adv-train",
        action="store_true",
        help="PGD adversarial training (ε and steps of the preset, --adv-epsilon to change ε)",
    )
    group.add_argument("--adv-epsilon", metavar="EPS", help="ε of adversarial training")


# --- model -----------------------------------------------------------------------------------
class Standardized(nn.Module):
    """Wrap a lab model so that it takes pixels in [0, 1] (what attacks perturb).

    Args:
        model: a model trained on standardised inputs.
        mean: per-channel mean, ``(1, C, 1, 1)``.
        std: per-channel std, ``(1, C, 1, 1)``.
    """

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of pixels ``x`` in [0, 1]."""
        return self.model((x - self.mean) / self.std)


def raw_pixels(splits: lab_data.Splits) -> lab_data.Splits:
    """The same splits with pixels back in [0, 1] (undoing the standardisation)."""

    def undo(x: torch.Tensor) -> torch.Tensor:
        return (x * splits.std + splits.mean).clamp_(0.0, 1.0)

    return replace(
        splits, train_x=undo(splits.train_x), val_x=undo(splits.val_x), test_x=undo(splits.test_x)
    )


# --- attacks ---------------------------------------------------------------------------------
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """FGSM (Goodfellow et al. 2015): one step of size ε along the sign of the CE gradient.

    Fallback when torchattacks is not installed; matches ``torchattacks.FGSM``.
    """
    x = x.clone().detach().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed CW margin ``max_{j≠y} z_j − z_y`` (positive once an example is misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return (others.max(1).values - true).sum()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    loss: str = "ce",
) -> torch.Tensor:
    """PGD-L∞ (Madry et al. 2018) with a uniform random start in the ε-ball.

    With ``loss="ce"`` this is the fallback when torchattacks is not installed and matches
    ``torchattacks.PGD``; ``loss="margin"`` ascends :func:`margin_loss` instead.
    """
    if loss not in ("ce", "margin"):
        raise ValueError(f"loss: expected ce or margin, got {loss!r}")
    objective = nn.functional.cross_entropy if loss == "ce" else margin_loss
    x = x.clone().detach()
    adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss_value = objective(model(adv), y)
        (grad,) = torch.autograd.grad(loss_value, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = (x + (adv - x).clamp(-eps, eps)).clamp(0.0, 1.0).detach()
    return adv


def attack_backend() -> str:
    """``"torchattacks"`` when it imports, else ``"builtin"``."""
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        return "builtin"
    return "torchattacks"


def make_attack(name: str, model: nn.Module, eps: float, steps: int, backend: str | None = None):
    """An attack as a callable ``attack(x, y) -> x_adv`` (the model is put in eval mode).

    Args:
        name: ``"fgsm"``, ``"pgd"`` or ``"pgd-margin"`` (always built in).
        model: takes pixels in [0, 1].
        eps: L∞ radius, non-negative.
        steps: PGD iterations, at least 1 (step size ``2.5 ε / steps``).
        backend: ``"torchattacks"``, ``"builtin"`` or ``None`` (torchattacks if installed).

    Returns:
        The attack.

    Raises:
        ValueError: naming an invalid argument.
    """
    if name not in ATTACKS:
        raise ValueError(f"attacks: unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    if not eps >= 0:
        raise ValueError(f"eps: must be non-negative, got {eps}")
    if steps < 1:
        raise ValueError(f"pgd_steps: must be at least 1, got {steps}")
    backend = backend or attack_backend()
    if backend not in ("torchattacks", "builtin"):
        raise ValueError(f"backend: expected torchattacks or builtin, got {backend!r}")
    alpha = 2.5 * eps / steps
    if backend == "torchattacks" and name != "pgd-margin":
        import torchattacks

        if name == "fgsm":
            return torchattacks.FGSM(model, eps=eps)
        return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)

    def attack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            if name == "fgsm":
                return fgsm(model, x, y, eps)
            return pgd(model, x, y, eps, alpha, steps, "margin" if name == "pgd-margin" else "ce")
        finally:
            model.train(was_training)

    return attack


def robust_accuracy(attack, model: nn.Module, x, y, batch_size: int, device) -> float:
    """Accuracy of ``model`` on ``attack``'s adversarial versions of ``(x, y)``."""
    correct = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        adv = attack(xb, yb) if attack is not None else xb
        with torch.no_grad():
            model.eval()
            correct += (model(adv).argmax(1) == yb).sum().item()
    return correct / len(y)


def eps_label(eps: float) -> str:
    """ε as written in metric names (``%.4g``: 0.1 → ``0.1``, 8/255 → ``0.03137``)."""
    return f"{eps:.4g}"


# --- task ------------------------------------------------------------------------------------
def resolve_recipe(options: runs.TaskOptions) -> tuple[Recipe, tuple[str, ...], bool]:
    """The preset's recipe with overrides, the attacks to run, and whether to adv-train.

    Raises:
        ValueError: naming a bad option.
    """
    runs.check_common(options, PRESETS)
    recipe = PRESETS[options.preset]
    epsilons = recipe.epsilons
    if options.get("epsilons"):
        epsilons = tuple(runs.parse_float_list("epsilons", options.get("epsilons")))
        if any(not 0 <= e <= 1 for e in epsilons):
            raise ValueError(f"epsilons: each must be in [0, 1] (pixel units), got {epsilons}")
    attacks = ATTACKS
    if options.get("attacks"):
        attacks = tuple(a.strip() for a in options.get("attacks").split(",") if a.strip())
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown or not attacks:
            raise ValueError(f"attacks: unknown {unknown}; known: {', '.join(ATTACKS)}")
    steps = options.get("pgd_steps", recipe.pgd_steps)
    if steps < 1:
        raise ValueError(f"pgd_steps: must be at least 1, got {steps}")
    adv_eps = recipe.adv_train_epsilon
    if options.get("adv_epsilon"):
        (adv_eps,) = runs.parse_float_list("adv_epsilon", options.get("adv_epsilon"))
        if not 0 < adv_eps <= 1:
            raise ValueError(f"adv_epsilon: must be in (0, 1], got {adv_eps}")
    dataset = options.dataset or recipe.dataset
    if dataset != recipe.dataset:
        recipe = replace(recipe, dataset=dataset)
        if dataset == "cifar10" and options.get("epsilons") is None:
            recipe = replace(recipe, epsilons=CIFAR_EPSILONS, key_epsilon=8 / 255)
    key = recipe.key_epsilon if recipe.key_epsilon in epsilons else max(epsilons)
    recipe = replace(
        recipe,
        epsilons=epsilons,
        key_epsilon=key,
        pgd_steps=int(steps),
        adv_train_epsilon=float(adv_eps),
        model=options.model or recipe.model,
        max_train=options.train_size if options.train_size is not None else recipe.max_train,
        max_test=options.test_size if options.test_size is not None else recipe.max_test,
        train=runs.override_train(recipe.train, options),
    )
    return recipe, attacks, bool(options.get("adv_train", False))


def output_dir(options: runs.TaskOptions) -> Path:
    """``--out`` or ``runs/adversarial-<preset>``."""
    return Path(options.out or f"runs/{TASK}-{options.preset}")


def run_from_args(args: argparse.Namespace) -> tuple[dict | None, Path]:
    """Entry point of ``encouraging-loss run adversarial`` (see :func:`run_adversarial`)."""
    options = runs.TaskOptions.from_args(args)
    return run_adversarial(options), output_dir(options)


def run_adversarial(options: runs.TaskOptions) -> dict | None:
    """Train every loss and seed, attack over the ε grid, and write the report.

    Args:
        options: parsed options.

    Returns:
        The results (``None`` on ranks other than 0 or after ``--stop-after-epochs``).

    Raises:
        ValueError: for bad options or loss names.
        lab_data.DatasetNotFoundError: if the dataset is missing.
    """
    # --- configuration -------------------------------------------------------------------
    specs = parse_loss_list(options.losses)
    recipe, attacks, adv_train = resolve_recipe(options)
    out_dir = output_dir(options)
    runs.apply_threads(recipe.threads, options)
    backend = attack_backend()
    started = time.perf_counter()

    # --- data ----------------------------------------------------------------------------
    dataset = lab_data.load_dataset(
        recipe.dataset, options.data_root, max_train=recipe.max_train, max_test=recipe.max_test
    )
    standardized = lab_data.make_splits(dataset, val_fraction=recipe.val_fraction)
    splits = raw_pixels(standardized)
    config = runs.base_config(
        options,
        recipe.model,
        recipe.train,
        {
            "source": str(dataset.source),
            "n_train": len(splits.train_y),
            "n_val": len(splits.val_y),
            "n_test": len(splits.test_y),
        },
    )
    config.update(
        losses=[s.name for s in specs],
        lr_by_loss={s.name: recipe.train.lr for s in specs},
        attack_backend=backend,
        attacks=list(attacks),
        epsilons=list(recipe.epsilons),
        pgd={"steps": recipe.pgd_steps, "step_size": "2.5 * eps / steps", "random_start": True},
        adversarial_training={
            "enabled": adv_train,
            "attack": "pgd",
            "epsilon": recipe.adv_train_epsilon,
            "steps": recipe.adv_train_steps,
        },
    )
    if rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    # --- one training run per loss and seed ----------------------------------------------
    records = []
    for spec in specs:
        for seed in range(options.seeds):
            record = runs.load_record(out_dir, spec.name, seed, options.resume)
            if record is None:
                record = _train_and_measure(
                    spec, seed, recipe, standardized, splits, attacks, adv_train, out_dir, options
                )
                if record == "interrupted":
                    finish_distributed()
                    return None
            if record is not None:
                records.append(record)
    finish_distributed()

    # --- report --------------------------------------------------------------------------
    config["wall_seconds"] = time.perf_counter() - started
    results = {
        "task": TASK,
        "dataset": recipe.dataset,
        "config": config,
        "runs": records,
        "report": _report_spec([s.name for s in specs], recipe, attacks, adv_train),
    }
    if rank() == 0:
        report.write_report(out_dir, results)
    return results if rank() == 0 else None


def _train_and_measure(
    spec, seed, recipe, standardized, splits, attacks, adv_train, out_dir, options
):
    """Train one (loss, seed) run and attack it; ``"interrupted"`` after a deliberate stop."""
    train_config = replace(recipe.train, seed=seed)
    set_seed(seed, train_config.deterministic)
    model = Standardized(
        build_model(recipe.model, splits.input_shape, splits.num_classes),
        standardized.mean,
        standardized.std,
    )
    perturb = None
    if adv_train:
        trainer_attack = make_attack("pgd", model, recipe.adv_train_epsilon, recipe.adv_train_steps)

        def perturb(_model, x, y):
            return trainer_attack(x, y)

    outcome = train(
        model,
        build_criterion(spec),
        splits,
        train_config,
        bonus_schedule=build_bonus_schedule(spec),
        perturb=perturb,
        checkpoint_path=runs.checkpoint_path(out_dir, spec.name, seed),
        resume=options.resume,
        stop_after_epochs=options.stop_after_epochs,
        progress=options.progress,
        description=f"{spec.name} seed {seed}",
    )
    if outcome.interrupted:
        return "interrupted"
    if rank() != 0:
        return None
    metrics: dict = {
        "diverged": outcome.diverged,
        "best_epoch": outcome.best_epoch,
        "val_accuracy": outcome.best_val_accuracy,
    }
    if not outcome.diverged:
        metrics.update(_measure(model, splits, recipe, attacks, train_config, seed))
    record = {
        "loss": spec.name,
        "seed": seed,
        "status": "diverged" if outcome.diverged else "ok",
        "lr": train_config.lr,
        "metrics": metrics,
        "history": outcome.history,
        "train_seconds": outcome.train_seconds,
    }
    runs.save_record(out_dir, record)
    return record


def _measure(model, splits, recipe, attacks, config, seed) -> dict:
    """Clean accuracy, margins and robust accuracy for every attack and ε."""
    device = resolve_device(config.device)
    model.to(device).eval()
    batch = min(config.eval_batch_size, 500)
    with torch.no_grad():
        logits = torch.cat(
            [
                model(splits.test_x[i : i + batch].to(device)).float().cpu()
                for i in range(0, len(splits.test_y), batch)
            ]
        )
    test = diagnostics.logit_diagnostics(logits, splits.test_y)
    metrics = {
        "clean_accuracy": test["accuracy"],
        "margin_mean": test["margin_mean"],
        "energy_mean": test["energy_mean"],
    }
    # A fixed seed per run: PGD's random start does not depend on what ran before.
    torch.manual_seed(10_000 + seed)
    for name in attacks:
        for eps in recipe.epsilons:
            attack = None if eps == 0 else make_attack(name, model, eps, recipe.pgd_steps)
            metrics[f"robust_accuracy/{name}/{eps_label(eps)}"] = robust_accuracy(
                attack, model, splits.test_x, splits.test_y, batch, device
            )
    return metrics


def _report_spec(losses: list[str], recipe: Recipe, attacks, adv_train: bool) -> dict:
    """Table, comparisons, the paper's direction and the robust-accuracy plot."""
    key = eps_label(recipe.key_epsilon)
    table = [["clean_accuracy", "clean acc", True]]
    for name in attacks:
        for eps in recipe.epsilons:
            if eps > 0:
                table.append(
                    [f"robust_accuracy/{name}/{eps_label(eps)}", f"{name} ε={eps_label(eps)}", True]
                )
    table.append(["margin_mean", "margin", True])
    claims = [
        [
            f"more robust ({name})",
            f"robust_accuracy/{name}/{key}",
            +1,
            f"{name.upper()} robust accuracy at ε={key} is higher",
        ]
        for name in attacks
    ]
    training = "PGD adversarial training" if adv_train else "standard training"
    return {
        "title": f"adversarial: {recipe.dataset} {recipe.model}, {training}",
        "table": table,
        "claims": claims,
        "comparisons": [[loss, "ce"] for loss in losses if loss != "ce"],
        "claim_pairs": [[loss, "ce"] for loss in losses if loss.startswith(("el", "ls-el"))],
        "notes": [
            "Mean ± std over seeds of test accuracy under attack (ε in pixel units of [0, 1] "
            f"images). FGSM: one step of size ε. PGD-L∞: {recipe.pgd_steps} steps of size "
            "2.5 ε / steps from a uniform random start in the ε-ball. FGSM and PGD ascend the "
            "CE loss of the evaluated model whatever loss trained it; pgd-margin is the same "
            "PGD on the margin max_{j≠y} z_j − z_y, which does not saturate, so a gain that "
            "holds under FGSM/PGD but not under pgd-margin is gradient masking, not robustness.",
            "The paper's argument: EL enlarges margins, so it should be harder to push an "
            f"example across the decision boundary; the direction line tests ε={key}.",
        ],
        "plots": [["accuracy curves", "accuracy_curves.png"]],
        "curves": [
            {
                "file": "robust_accuracy.png",
                "title": "robust accuracy vs ε",
                "xlabel": "ε (L∞, pixel units)",
                "ylabel": "test accuracy under attack",
                "series": [
                    {
                        "label": name,
                        "points": [
                            [eps, f"robust_accuracy/{name}/{eps_label(eps)}"]
                            for eps in recipe.epsilons
                        ],
                    }
                    for name in attacks
                ],
            }
        ],
    }
