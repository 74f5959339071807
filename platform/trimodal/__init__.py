"""trimodal: train and serve a text + image + audio -> text language model on Ray."""

__version__ = "0.1.0"
