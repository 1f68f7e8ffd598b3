"""Synthetic geo-tagged world: procedural 2.5-D region, aerial tiles and street panoramas.

Entry points: ``python -m worldgen`` (``worldgen.cli:main``) writes a data set directory in the
layout of ``docs/INTERFACES.md``; ``python -m worldgen.preview DIR --out sheet.png`` draws a
contact sheet. Library use::

    from worldgen.world import generate_world
    from worldgen.render import render_aerial, render_pano
"""

FORMAT_VERSION = 1

__all__ = ["FORMAT_VERSION"]
