"""Input pipelines (grain): sources.py, transforms.py, video.py, pipeline.py; statistics in stats.py."""
from amd_jax.data.pipeline import eval_is_train
from amd_jax.data.pipeline import make_eval_dataset
from amd_jax.data.pipeline import make_train_dataset
from amd_jax.data.pipeline import num_classes
from amd_jax.data.pipeline import num_examples
from amd_jax.data.pipeline import validate_data_config
from amd_jax.data.sources import skipped_files
