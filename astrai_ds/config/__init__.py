from astrai_ds.config.base import apply_overrides, from_dict, read_config, read_json, to_dict
from astrai_ds.config.model import ModelConfig

__all__ = ["ModelConfig", "apply_overrides", "from_dict", "read_config", "read_json", "to_dict"]
