"""CPU fast paths for the network's layers, kept out of the architecture: Winograd's 3x3
convolution (`winograd`) and GroupNorm through an NCHW copy for bf16 (`groupnorm`).
`policy.install` gives them to a built network, once; each keeps its place by a measured gain on
a whole training step or sampling run (docs/benchmarks.md).
"""
