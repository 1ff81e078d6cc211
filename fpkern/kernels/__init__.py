"""Triton kernels and their launchers. Imported lazily: importing fpkern never imports triton."""
