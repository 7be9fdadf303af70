"""Written by storydiff's save_pretrained so that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`
finds the pipeline class. It holds no code of its own: it imports the class from the installed storydiff package
(pip install storydiff). `ClassConditionalPipeline.from_pretrained(folder)` does not read this file."""

from storydiff import ClassConditionalPipeline  # noqa: F401
