"""vlmr1-plugin-template: an example vlmr1 plugin providing the ``keyword`` reward."""

__version__ = "0.2.0"
