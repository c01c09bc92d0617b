# Types for the part of flask-smorest 0.47 that b24scribe uses (the package ships no py.typed).
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import flask
from apispec import APISpec
from marshmallow import Schema

_F = TypeVar("_F", bound=Callable[..., Any])
_SchemaArg = type[Schema] | Schema | str | dict[str, Any] | None

class Blueprint(flask.Blueprint):
    def __init__(
        self, name: str, import_name: str, *args: Any, description: str | None = ..., **kwargs: Any
    ) -> None: ...
    def response(
        self,
        status_code: int | str,
        schema: _SchemaArg = ...,
        *,
        description: str | None = ...,
        example: Any = ...,
        examples: Mapping[str, Any] | None = ...,
        headers: Mapping[str, Any] | None = ...,
    ) -> Callable[[_F], _F]: ...
    def alt_response(
        self,
        status_code: int | str,
        response: str | None = ...,
        *,
        schema: _SchemaArg = ...,
        description: str | None = ...,
        example: Any = ...,
        examples: Mapping[str, Any] | None = ...,
        headers: Mapping[str, Any] | None = ...,
        success: bool = ...,
        content_type: str | None = ...,
    ) -> Callable[[_F], _F]: ...
    @staticmethod
    def doc(**kwargs: Any) -> Callable[[_F], _F]: ...

class Api:
    spec: APISpec
    ERROR_SCHEMA: type[Schema]
    def __init__(
        self, app: flask.Flask | None = ..., *, spec_kwargs: Mapping[str, Any] | None = ..., config_prefix: str = ...
    ) -> None: ...
    def init_app(self, app: flask.Flask, *, spec_kwargs: Mapping[str, Any] | None = ...) -> None: ...
    def register_blueprint(self, blp: Blueprint, *, parameters: Any = ..., **options: Any) -> None: ...
    def register_field(self, field: type[Any], *args: Any) -> None: ...
    def _register_error_handlers(self) -> None: ...
