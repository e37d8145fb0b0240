"""The diffusion math: named beta schedules and their float64 tables (`schedules`), the forward
process, its posterior and the training losses (`process`), the samplers that walk explicit
(t, t_prev) pairs (`samplers`), the edits that change their walk (`editing`: RePaint, SDEdit,
ILVR), and previews of the forward process (`preview`).

Pure functions of tensors: nothing here reads or writes files, prints, or knows the network.
It may import torch, `config`, `device` and `errors`, nothing else of the package.
"""
