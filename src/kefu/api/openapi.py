"""The OpenAPI 3.1 document of the REST API, built from :data:`kefu.api.routes.ROUTES`.

Schemas come from the msgspec Structs of :mod:`kefu.api.schemas` (msgspec writes JSON
Schema 2020-12, which OpenAPI 3.1 uses as is).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from kefu import __version__
from kefu.api import schemas as s
from kefu.api.routes import PREFIX, ROUTES, Route

LIST_RESPONSES = {"/groups", "/agents", "/canned-responses"}
ERRORS = {
    "400": "Invalid request (code invalid_argument, bad_frame or bad_json)",
    "401": "Missing, invalid or expired token",
    "403": "The token's role may not use this route, or the resource is not theirs",
    "404": "No such conversation, group, agent or canned response",
    "409": "The state does not allow it (invalid_transition, conflict)",
    "503": "The store is unavailable or overloaded: retry",
}


def _operation_id(route: Route) -> str:
    words = re.sub(r"[{}]", "", route.path).strip("/").replace("-", "_").split("/")
    return route.method.lower() + "_" + "_".join(words)


def openapi_document() -> dict[str, Any]:
    structs: list[Any] = [s.ErrorResponse]
    for route in ROUTES:
        if route.body is not None:
            structs.append(route.body)
        if route.response is not None:
            structs.append(route.response)
    schemas, components = msgspec.json.schema_components(
        structs, ref_template="#/components/schemas/{name}"
    )
    refs = dict(zip(structs, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        op: dict[str, Any] = {
            "operationId": _operation_id(route),
            "summary": route.summary,
            "description": "Roles: " + ", ".join(sorted(r.value for r in route.roles)) + ".",
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.where == "path",
                    "description": p.description,
                    "schema": {"type": p.kind, **({"enum": list(p.enum)} if p.enum else {})},
                }
                for p in route.params
            ],
            "responses": {
                code: {
                    "description": text,
                    "content": {"application/json": {"schema": refs[s.ErrorResponse]}},
                }
                for code, text in ERRORS.items()
            },
        }
        if route.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[route.body]}},
            }
        if route.response is not None:
            schema = refs[route.response]
            if route.method == "GET" and route.path in LIST_RESPONSES:
                schema = {"type": "array", "items": schema}
            content: dict[str, Any] = {"application/json": {"schema": schema}}
            if route.csv:
                content["text/csv"] = {"schema": {"type": "string"}}
            op["responses"][str(route.status)] = {"description": "OK", "content": content}
        paths.setdefault(PREFIX + route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Kefu REST API",
            "version": __version__,
            "description": "Customer-service administration and reporting. The WebSocket "
            "protocol (docs/protocol.md) carries the live chat.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
