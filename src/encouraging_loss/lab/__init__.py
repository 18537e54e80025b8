"""The encouraging-loss lab: reproducible CE-vs-EL experiments (extra ``[lab]``).

Command line: ``encouraging-loss run image ...``, ``encouraging-loss reproduce``,
``encouraging-loss report DIR...`` (see ``encouraging-loss --help``). The core library never
imports this package.
"""
