"""Judging and looking inside models: bits/dim from the variational bound (`likelihood`), FID
and KID (`fid`), the `ddpm eval` jobs (`evaluate`), what checkpoints and runs hold
(`inspection`) and charts (`plots`).

It may import every layer but the CLI.
"""
