"""``python -m encouraging_loss.lab`` runs the ``encouraging-loss`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
