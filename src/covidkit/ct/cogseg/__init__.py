"""CogSeg: CT lesion segmentation with super-resolution and infection edge-guided co-learning (notebook 10).

Modules:

- ``medseg``: the MedSeg 100-slice and Radiopaedia 9-volume sets (NIfTI), splits, the paper's augmentation,
  the training dataset (input downsampled by 2, full-resolution image and mask);
- ``model``: the network (shared U-Net encoder, segmentation and super-resolution decoders);
- ``losses``: RMI, edge-guided RMI and the combined CogSeg loss;
- ``metrics``: mIoU, DSC, sensitivity, specificity;
- ``plots``: predicted masks over slices;
- ``bench``: throughput of inference and of a training step.

The ablation of the paper's tables is stage 10, ``covidkit.stages.ct_cogseg``.
"""
