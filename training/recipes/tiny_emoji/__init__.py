"""The tiny-emoji model's recipe: captioned emoji from the Noto Color Emoji font and their judge.

* :mod:`.emoji_set`: the catalogue (Unicode names, groups, aliases), the renderer and the seed-deterministic
  captioned samples with their train / validation / held-out phrasings.
* :mod:`.judge`: which emoji is this image? Retrieval against the rendered set (``mmdit-flow eval``).
"""
