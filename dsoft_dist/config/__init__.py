"""Typed configuration: schema dataclasses, YAML loading and dotted overrides."""
from dsoft_dist.config.loader import apply_overrides, config_from_dict, config_to_dict, dump_config, load_config
from dsoft_dist.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    HeadConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
)
from dsoft_dist.errors import ConfigError

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "HeadConfig", "LoggingConfig", "ModelConfig",
    "OptimizerConfig", "ParallelConfig", "ScheduleConfig", "apply_overrides", "config_from_dict",
    "config_to_dict", "dump_config", "load_config",
]
