"""The shipped config files, installed with the library as the package `amd_jax.configs`.

Each file's get_config(arg) returns an ml_collections ConfigDict. They are found by name as well as by path:
`python -m amd_jax.main --config amd_vit_s_ssv2:runlocal ...` (see amd_jax/config_files.py).
"""
