"""HTTP search service over an index, with a web page (`rshash serve INDEX`)."""

from rshash.service.app import ServiceConfig, create_app

__all__ = ["ServiceConfig", "create_app"]
