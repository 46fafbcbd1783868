"""rdsproxy: a connection-pooling proxy for PostgreSQL in the spirit of AWS RDS Proxy."""
from .config import ConfigError, ProxyConfig, config_from_dict, load_config
from .proxy import Proxy

__version__ = "0.1.0"
__all__ = ["Proxy", "ProxyConfig", "ConfigError", "config_from_dict", "load_config", "__version__"]
