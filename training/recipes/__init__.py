"""The recipes of the demo models that ship with mmdit-flow, one subpackage each.

Each subpackage is a shipped demo model's recipe: its data (a generator of captioned images), its judge (what
``mmdit-flow eval`` scores images with), the components it builds (tokenizers, text encoders, VAE) and the
config that trains its transformer with the general trainer (:mod:`mmdit_flow.training`), plus the commands
that assemble the shipped folder. ``python -m mmdit_flow.training.recipes.NAME`` lists a recipe's commands.

* :mod:`~mmdit_flow.training.recipes.tiny_shapes`: ``weights/tiny-shapes/``, captioned circles, squares and
  triangles.
"""
