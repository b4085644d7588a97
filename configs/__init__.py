"""Experiment configs: `get_config(arg)` files for `--config configs/<name>.py[:arg]` (installed as
`stego_jax.configs`, see `stego_jax.cli.packaged_config`)."""
