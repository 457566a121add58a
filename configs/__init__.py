"""Experiment presets: each file's ``get_config()`` returns an ExperimentConfig (``python train.py --config
configs/NAME.py``). They build on :mod:`configs.common` by setting values; any field can then be overridden on
the command line (``--config.model.cem.enabled=false``)."""
