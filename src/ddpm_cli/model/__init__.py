"""The network: the paper's U-Net built from a ModelConfig (`unet`), the named presets and the
recipe each trains with (`presets`), and the network as sampling runs it: precision, compile,
CUDA graphs and classifier-free guidance (`forward`). Device-specific fast paths live in
`kernels`, apart from the architecture.

It may import `config`, `device`, `errors` and `runtime`; never data, files, training,
generation, evaluation or the CLI.
"""
