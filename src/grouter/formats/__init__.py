"""The on-disk formats, one module each: its reader, its writer and its manifest.

- :mod:`~grouter.formats.dataset`: packed token datasets (``grouter data``);
- :mod:`~grouter.formats.targets`: a source's captured router scores (``grouter capture``);
- :mod:`~grouter.formats.grouter`: a Grouter's config and weights (distill, fold, tune);
- :mod:`~grouter.formats.store`: routing stores (``grouter dispatch``);
- :mod:`~grouter.formats.plan`: placement plans and their sampler (``grouter place``);
- :mod:`~grouter.formats.run`: training run directories (train, distill, ep).

They import no stage and none of scipy, matplotlib or transformers (tests/test_structure.py checks),
so an engine adapter that reads a store and a plan pulls in nothing else. The stages that write
them (capture, place, ...) keep the algorithms.
"""
