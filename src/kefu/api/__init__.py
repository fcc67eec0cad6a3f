"""The REST API (``/api/v1``) and its OpenAPI document (``/api/openapi.json``)."""

from kefu.api.openapi import openapi_document
from kefu.api.routes import ROUTES, add_routes

__all__ = ["ROUTES", "add_routes", "openapi_document"]
