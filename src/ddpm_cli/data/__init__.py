"""Training data: image folders, the built-in dataset and run caches decoded to uint8 images
(`folders`, `builtin`, `sources`), images in and out of PIL (`images`), and the batches the
training loop draws (`batches`).

It may import the base modules and `store` (a run's data cache is a checkpoint); never the
model, training, generation, evaluation or the CLI.
"""
