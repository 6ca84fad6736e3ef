"""The toy world, as nanoGPT keeps its data preparation under data/: everything the CPU-only path needs that is not
the method. world.py draws captioned 64x64 scenes and the 30 held-out subjects (painted by paint.py); toy.py pretrains
the toy SD model and its evaluators on them and measures the ceiling chain. Run them from the repository root:

    python -m toyworld.world --grid /tmp/grid.png
    python -m toyworld.toy --report
"""
