"""p2ptrain: train a DiPaCo grid of language-model modules with volunteers over hivemind."""

__version__ = "0.1.0"
