"""Making images with a model: sampling jobs from a checkpoint (`sampling`, `job`), with their
image output and provenance (`output`), the inputs of image edits (`editing`: inpainting,
SDEdit, upscaling), and the `ddpm noise` job (`noising`).

It may import the base modules, the diffusion math, the model, data and store; never the
trainer, evaluation or the CLI, so `ddpm sample` never loads training code.
"""
