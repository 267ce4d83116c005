"""The CT methods beside the radiograph pipeline, each a package of its own (they share nothing):

- ``cogseg``: CogSeg (Sang et al., ICASSP 2021), CT lesion segmentation co-learned with super-resolution and
  edge-guided RMI (notebook 10, ``covidkit.stages.ct_cogseg``);
- ``decovnet``: DeCoVNet (Wang et al., IEEE TMI 2020), CT volume classification with lesion localization
  (notebook 11, ``covidkit.stages.ct_decovnet``).
"""
