"""CT lesion segmentation: CogSeg (Sang et al., ICASSP 2021), super-resolution and edge-guided RMI co-learning.

Modules:

- ``medseg``: the MedSeg 100-slice and Radiopaedia 9-volume sets (NIfTI), splits, the paper's augmentation,
  the training dataset (input downsampled by 2, full-resolution image and mask);
- ``cogseg``: the model (shared U-Net encoder, segmentation and super-resolution decoders);
- ``losses``: RMI, edge-guided RMI and the combined CogSeg loss;
- ``metrics``: mIoU, DSC, sensitivity, specificity;
- ``cogseg_train``: the ablation of the paper's tables, trained with :mod:`covidkit.train`;
- ``plots``: predicted masks over slices, training curves;
- ``bench``: throughput of inference and of a training step.
"""
