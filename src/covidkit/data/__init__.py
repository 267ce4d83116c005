"""Datasets and file layouts, one module per source (SIIM, NIH, RSNA)."""
