"""DeCoVNet: weakly supervised COVID-19 classification and lesion localization from chest CT (notebook 11).

Modules:

- ``volumes``: CT volumes (NIfTI or DICOM series) in Hounsfield units, labels, resampling, windowing;
- ``lungmask``: the unsupervised lung mask and the 2D lung U-Net it labels;
- ``model``: the 3D network (stem, residual blocks, progressive classifier);
- ``localize``: lesion localization from the class activation map and 3D connected components;
- ``cache``: per-case caches keyed by what made them;
- ``bench``: seconds per volume of the whole inference.

Training and evaluation are stage 11, ``covidkit.stages.ct_decovnet``.
"""
