"""Measurements behind the paper's three claims, plus calibration.

* margin ``z_y - max_{j != y} z_j`` (mean, quantiles, per-example values for histograms);
* energy ``-z_y`` and ``-logsumexp(z)`` (mean, per-example values);
* representation quality: a linear probe on frozen penultimate features (fit on train, scored on
  test) and classifier re-training (cRT: only the last layer re-trained with CE);
* calibration: expected calibration error and a reliability diagram's bins.

The share of gradient norm from well-classified examples is measured during training, in
``trainer.train``, from the per-example gradient with respect to the logits.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _check_logits_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (N, C), got shape {tuple(logits.shape)}")
    if targets.ndim != 1 or len(targets) != len(logits):
        raise ValueError(
            f"targets: expected ({len(logits)},) class indices, got shape {tuple(targets.shape)}"
        )
    if logits.shape[1] < 2:
        raise ValueError(f"logits: need at least 2 classes, got {logits.shape[1]}")


def margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example margins ``z_y - max_{j != y} z_j`` of ``(N, C)`` logits and ``(N,)`` targets.

    Returns:
        ``(N,)`` margins, positive where correctly classified.

    Raises:
        ValueError: on mismatched shapes.
    """
    _check_logits_targets(logits, targets)
    logits = logits.float()
    true = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return true - others.max(dim=1).values


def energies(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example energies ``-z_y`` and ``-logsumexp(z)`` of ``(N, C)`` logits, ``(N,)`` targets.

    Returns:
        ``(energy_true, energy_free)``, each ``(N,)``.

    Raises:
        ValueError: on mismatched shapes.
    """
    _check_logits_targets(logits, targets)
    logits = logits.float()
    return -logits.gather(1, targets[:, None]).squeeze(1), -torch.logsumexp(logits, dim=1)


def summarize(values: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean, std and quantiles of a 1-D tensor as ``{prefix_mean, prefix_q05, ...}``.

    Raises:
        ValueError: if ``values`` is empty or not 1-D.
    """
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"values: expected non-empty 1-D, got shape {tuple(values.shape)}")
    values = values.double()
    out = {f"{prefix}_mean": values.mean().item(), f"{prefix}_std": values.std().item()}
    qs = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64))
    for q, v in zip(QUANTILES, qs.tolist(), strict=True):
        out[f"{prefix}_q{int(round(q * 100)):02d}"] = v
    return out


def calibration(
    logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15
) -> tuple[float, dict[str, list[float]]]:
    """Expected calibration error over ``n_bins`` equal-width confidence bins on ``[0, 1]``.

    Args:
        logits: ``(N, C)`` logits of ``(N,)`` class indices ``targets``.

    Returns:
        ``(ece, bins)`` where ``bins`` has ``edges``, ``confidence``, ``accuracy``, ``count``
        (empty bins get confidence and accuracy ``NaN``).

    Raises:
        ValueError: on mismatched shapes or ``n_bins < 1``.
    """
    _check_logits_targets(logits, targets)
    if n_bins < 1:
        raise ValueError(f"n_bins: must be at least 1, got {n_bins}")
    probs = logits.float().softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # Bin i holds confidences in (edges[i], edges[i+1]]; confidence is >= 1/C > 0.
    which = torch.bucketize(confidence.double(), edges[1:-1], right=False)
    ece = 0.0
    bins = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    for i in range(n_bins):
        mask = which == i
        count = int(mask.sum())
        # The mean of an empty bin is NaN.
        conf, acc = confidence[mask].double().mean().item(), correct[mask].mean().item()
        bins["count"].append(count)
        bins["confidence"].append(conf)
        bins["accuracy"].append(acc)
        if count:
            ece += count / len(targets) * abs(conf - acc)
    return ece, bins


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the ``with`` block with ``model`` in eval mode, then restore its training mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def extract_features(
    model: nn.Module, x: torch.Tensor, batch_size: int = 1024, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and logits ``(features, logits)`` of a lab model on ``x``, in eval
    mode, as float32 on the CPU.

    Raises:
        ValueError: if the model lacks ``features``/``classifier``.
    """
    if not (hasattr(model, "features") and hasattr(model, "classifier")):
        raise ValueError("model: needs features(x) and a classifier layer (see lab.models)")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    with eval_mode(model):
        feats, logits = [], []
        for i in range(0, len(x), batch_size):
            f = model.features(x[i : i + batch_size].to(device))
            feats.append(f.float().cpu())
            logits.append(model.classifier(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


def _check_features(train_x, train_y, test_x, test_y) -> int:
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_features/test_features: expected (N, D) with equal D, got "
            f"{tuple(train_x.shape)} and {tuple(test_x.shape)}"
        )
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("train_labels/test_labels: lengths must match their features")
    return int(max(train_y.max().item(), test_y.max().item())) + 1


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
) -> float:
    """Test accuracy of a multinomial logistic regression on frozen, standardised features.

    The probe is fit on train features with full-batch L-BFGS (deterministic, no
    scikit-learn needed) and scored on test features.

    Args:
        train_features: ``(N, D)`` features of the training split (labels ``train_labels``).
        test_features: ``(M, D)`` features of the test split (labels ``test_labels``).
        weight_decay: L2 penalty on the probe's weights.
        max_iter: L-BFGS iterations.
        seed: seed of the probe's initialisation.

    Raises:
        ValueError: on mismatched shapes or a negative ``weight_decay``.
    """
    num_classes = _check_features(train_features, train_labels, test_features, test_labels)
    if weight_decay < 0:
        raise ValueError(f"weight_decay: must be non-negative, got {weight_decay}")
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True).clamp_min(1e-6)
    train_z = ((train_features - mean) / std).double()
    test_z = ((test_features - mean) / std).double()
    generator = torch.Generator().manual_seed(seed)
    probe = nn.Linear(train_z.shape[1], num_classes).double()
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.LBFGS(
        probe.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(probe(train_z), train_labels)
        loss = loss + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (probe(test_z).argmax(1) == test_labels).double().mean().item()


def classifier_retraining_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 10,
    lr: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Classifier re-training (cRT, Kang et al. 2020): a fresh last layer trained with CE.

    As in the decoupling experiments, the representation is frozen, the linear classifier is
    re-initialised and trained with plain cross-entropy under class-balanced sampling, and the
    test accuracy is returned.

    Args:
        train_features: ``(N, D)`` frozen penultimate features of the training split (labels
            ``train_labels``).
        test_features: ``(M, D)`` features of the test split (labels ``test_labels``).
        epochs: passes over the training features.
        lr: SGD learning rate (momentum 0.9, cosine decay).
        batch_size: mini-batch size.
        seed: seed of initialisation and sampling.

    Raises:
        ValueError: on mismatched shapes or non-positive ``epochs``/``lr``/``batch_size``.
    """
    num_classes = _check_features(train_features, train_labels, test_features, test_labels)
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"epochs/lr/batch_size: must be positive, got {epochs}/{lr}/{batch_size}")
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(train_features.shape[1], num_classes)
    bound = 1.0 / train_features.shape[1] ** 0.5
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.zero_()
    counts = torch.bincount(train_labels, minlength=num_classes).double()
    sample_weight = (1.0 / counts.clamp_min(1))[train_labels]
    steps_per_epoch = max(1, len(train_labels) // batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    for _ in range(total):
        index = torch.multinomial(sample_weight, batch_size, replacement=True, generator=generator)
        loss = nn.functional.cross_entropy(layer(train_features[index]), train_labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    with torch.no_grad():
        return (layer(test_features).argmax(1) == test_labels).double().mean().item()


def logit_diagnostics(logits: torch.Tensor, targets: torch.Tensor, prefix: str = "") -> dict:
    """Accuracy, NLL, margin and energy summaries and ECE of one split's logits.

    Args:
        prefix: prepended to every metric name (e.g. ``"train_"``); test metrics use ``""``.

    Returns:
        Flat metric dict: ``accuracy``, ``nll``, ``margin_*``, ``energy_*`` (free energy
        ``-logsumexp``), ``energy_true_*`` (``-z_y``), ``ece``.

    Raises:
        ValueError: on mismatched shapes.
    """
    energy_true, energy_free = energies(logits, targets)  # checks the shapes
    logits = logits.float()
    metrics = {
        "accuracy": (logits.argmax(1) == targets).float().mean().item(),
        "nll": nn.functional.cross_entropy(logits, targets).item(),
        **summarize(margins(logits, targets), "margin"),
        **summarize(energy_free, "energy"),
        **summarize(energy_true, "energy_true"),
        "ece": calibration(logits, targets)[0],
    }
    return {f"{prefix}{name}": value for name, value in metrics.items()}


def histogram_arrays(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-example ``margin``, free ``energy`` and ``energy_true`` as numpy arrays.

    What a task saves (``io.save_arrays``) for the report's margin and energy histograms.

    Raises:
        ValueError: on mismatched shapes.
    """
    energy_true, energy_free = energies(logits, targets)  # checks the shapes
    return {
        "margin": margins(logits, targets).numpy(),
        "energy": energy_free.numpy(),
        "energy_true": energy_true.numpy(),
    }


def classifier_diagnostics(
    model: nn.Module,
    train: tuple,
    test: tuple,
    batch_size: int,
    device: str | torch.device,
    seed: int,
    retrain_classifier: bool = False,
) -> tuple[dict, torch.Tensor]:
    """The three claims' measurements of a trained classifier on train and test.

    Args:
        model: a lab model (``features`` and ``classifier``).
        train: ``(inputs, labels)`` the probe (and cRT) are fit on; ``train_*`` metrics.
        test: ``(inputs, labels)`` scored.
        seed: seed of the probe and of cRT.
        retrain_classifier: also measure ``crt_accuracy`` (classifier re-training).

    Returns:
        ``(metrics, test_logits)``: ``test_accuracy``, ``test_nll``, the test
        :func:`logit_diagnostics`, the ``train_`` ones, ``probe_accuracy`` [, ``crt_accuracy``].

    Raises:
        ValueError: if ``train``/``test`` are not pairs, or on mismatched shapes.
    """
    for name, pair in (("train", train), ("test", test)):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"{name}: expected (inputs, labels), got {type(pair).__name__}")
    (train_x, train_y), (test_x, test_y) = train, test
    train_features, train_logits = extract_features(model, train_x, batch_size, device)
    test_features, test_logits = extract_features(model, test_x, batch_size, device)
    scored = logit_diagnostics(test_logits, test_y)
    metrics = {
        "test_accuracy": scored.pop("accuracy"),
        "test_nll": scored.pop("nll"),
        **scored,
        **logit_diagnostics(train_logits, train_y, prefix="train_"),
        "probe_accuracy": linear_probe_accuracy(
            train_features, train_y, test_features, test_y, seed=seed
        ),
    }
    if retrain_classifier:
        metrics["crt_accuracy"] = classifier_retraining_accuracy(
            train_features, train_y, test_features, test_y, seed=seed
        )
    return metrics, test_logits
