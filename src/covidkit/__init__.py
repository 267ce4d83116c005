"""covidkit: SIIM-FISABIO-RSNA COVID-19 detection, CogSeg and DeCoVNet."""

__version__ = "0.1.0"
