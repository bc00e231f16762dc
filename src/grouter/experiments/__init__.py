"""Experiments: the pipeline run end to end at a chosen size, each driven by a config file in
``configs/`` (``grouter demo``, ``grouter reproduce``, ``grouter reproduce --study``).

They sit outside the library's core: they use the stages (through :mod:`grouter.runner`, like the
command line) and never the other way round. docs/RESULTS.md and docs/study.md hold their results.
"""
