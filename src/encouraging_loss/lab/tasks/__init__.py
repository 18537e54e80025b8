"""Lab tasks, one per module; a task never imports another task."""

TASKS = ("image", "imbalanced", "ood", "adversarial", "graph", "translation")
