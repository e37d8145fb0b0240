"""Making images with a model: sampling jobs from a checkpoint, with their image output and
provenance (`sampling`), and the `ddpm noise` job (`noising`).

It may import the base modules, the diffusion math, the model, data and store; never the
trainer, evaluation or the CLI, so `ddpm sample` never loads training code.
"""
