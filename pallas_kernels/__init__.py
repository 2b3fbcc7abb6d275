"""Pallas kernels of DeepSeek-V4, each package beside a pure-JAX reference with the same signature.

* `sparse_attention`: sliding window plus the top-k selected compressed entries (CSA layers).
* `dense_attention`: sliding window plus every admissible compressed entry (HCA layers, CSA's dense phase,
  sliding-window layers with no entries).
* `lightning_indexer`: the top-k selection of `sparse_attention`.
* `expert_matmul`: grouped low-precision matmul over experts.
Shared: `attention_base` (masking rules, window loops), `formats` (FP8 / MXFP4), `dispatch` (`impl` rule),
`autodiff` (the custom-VJP wrapper of every differentiable kernel), `testing`. Kernels import only JAX, numpy
and ml_dtypes (never the model or its mesh layout rules) and see local shards only: the caller runs them under
`shard_map`. Contracts: docs/kernels.md.
"""
