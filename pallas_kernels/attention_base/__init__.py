"""The shared base of the attention kernels (dense attention, sparse attention, lightning indexer).

`common`: masking rules, reference helpers, the rows layout, online softmax and window geometry;
`window_gpu` / `window_tpu`: the sliding-window loops of the Triton and Mosaic-TPU kernels.
"""
