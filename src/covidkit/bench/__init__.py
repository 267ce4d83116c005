"""Benchmarks (``covidkit bench ...``), one module each: ``prepare`` (DICOM to PNG against a naive loop),
``predict`` (per-image latency of a models folder), ``scale`` (the cheap stages at the competition's size),
``models`` (a training step of each full-size model), ``estimate`` (the full run on the real data, on paper, from
``models`` and ``prepare``), ``seeds`` (the pipeline on several synthetic seeds: each figure as mean +- sd);
CogSeg's and DeCoVNet's are in their packages. Speed is
measured here, never in the tests.
"""
