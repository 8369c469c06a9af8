"""HTTP serving of each domain's champion: ``create_app(ServingConfig(...))``, run by ``domainflow serve``."""

from serving.app import create_app
from serving.auth import ApiKeys, AuthConfigError
from serving.config import ServingConfig

__all__ = ["ApiKeys", "AuthConfigError", "ServingConfig", "create_app"]
