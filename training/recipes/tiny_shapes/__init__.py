"""The tiny-shapes demo model's recipe (``weights/tiny-shapes/``): captioned shapes, their judge, the
components and the config that trains the transformer.

* :mod:`.shapes`: the scene generator and its caption grammar (the data; ``data`` writes an image folder).
* :mod:`.evaluator`: the judge, which checks an image against its caption (``mmdit-flow eval``).
* :mod:`.tokenizers`, :mod:`.text_train`, :mod:`.vae_train`: the tokenizers, the T5 tagger and the VAE,
  built by :mod:`.components` into the diffusers SD3 layout.
* :mod:`.ship`: the training data and staging folder, the config (``config.yaml``) and the assembly of the
  shipped folder.

Every command runs as ``python -m mmdit_flow.training.recipes.tiny_shapes COMMAND`` (``--help`` lists them);
docs/quality.md has the whole recipe with its wall times, docs/tiny-shapes.md the components.
"""
