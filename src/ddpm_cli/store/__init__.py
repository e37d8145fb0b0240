"""What ddpm keeps on disk: safetensors checkpoints with JSON metadata (`checkpoint`), diffusers
folders in and out (`interop`), and the file names, atomic writes and locks of every output
(`files`).

It may import the base modules, the diffusion math and the model; never training,
generation, evaluation or the CLI.
"""
