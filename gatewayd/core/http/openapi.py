"""OpenAPI 3.1 documents, built from the declarations of an app's routes (`http.declare`).

    GET /openapi.json            the whole gateway (the main listener)
    GET /docs                    the same, as a page to read (no script, nothing from elsewhere)
    GET /<mount>/openapi.json    one plugin's routes; on a plugin's own listener, /openapi.json
    GET /<mount>/docs            its page

Who may read them: the admin token, or the dashboard's session cookie (so a technician
logged in to the dashboard opens /docs in the browser). They list the installed plugins,
their versions and every route: what `/api/gateway/plugins` keeps behind the token too.
A plugin whose devices' integrators need its document sets `[plugins.<name>]
public_docs = true`: its document and page are public (they say nothing its routes do
not already answer to anyone who asks).

A document is built once, the first time it is asked for (routes do not change while
the gateway runs), from the app's URL map: each rule whose view was declared with
`Routes` is an operation; undeclared and `hidden` ones are left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import msgspec
from quart import Blueprint, Request, Response, current_app, redirect, request
from werkzeug.routing import Rule

from ...protocol.strict_json import INT_MAX
from .declare import CORE, FAMILY, Answerer, ErrorBody, Operation, Raw, declared_types, operation_of
from .docs_page import render_page
from .errors import PluginUnavailable, error_response

__all__ = ["ApiDocs", "build_document"]

REF = "#/components/schemas/{name}"
_ARG = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
_IGNORED_METHODS = {"HEAD", "OPTIONS"}


def _path_schema(rule: Rule, name: str) -> dict[str, Any]:
    converter = getattr(rule, "_converters", {}).get(name)
    kind = type(converter).__name__
    if kind == "IntegerConverter":
        return {"type": "integer", "minimum": 0, "maximum": INT_MAX}
    if kind == "PathConverter":
        return {"type": "string", "minLength": 1}
    return {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}


def _operations(app: Any, keep: Callable[[Rule], bool]) -> list[tuple[Rule, str, Operation]]:
    out = []
    for rule in app.url_map.iter_rules():
        op = operation_of(app.view_functions.get(rule.endpoint))
        if op is None or op.hidden or not keep(rule):
            continue
        for method in sorted(set(rule.methods or ()) - _IGNORED_METHODS):
            out.append((rule, method, op))
    return sorted(out, key=lambda x: (x[0].rule, x[1]))


class _Schemas:
    """The JSON Schema of every declared type, from one `schema_components` call."""

    def __init__(self, types: list[Any]) -> None:
        unique = list({id(t): t for t in types}.values())
        refs, self.components = msgspec.json.schema_components(unique, ref_template=REF)
        self.of = {id(t): ref for t, ref in zip(unique, refs)}
        self.exploded: set[str] = set()

    def ref(self, tp: Any) -> dict[str, Any]:
        return dict(self.of[id(tp)])

    def query_parameters(self, tp: Any) -> list[dict[str, Any]]:
        """The query Struct's fields as OpenAPI parameters (its component is left out)."""
        name = self.of[id(tp)]["$ref"].rsplit("/", 1)[1]
        self.exploded.add(name)
        component = self.components[name]
        required = set(component.get("required", ()))
        params = []
        for field, schema in component.get("properties", {}).items():
            param: dict[str, Any] = {"name": field, "in": "query", "required": field in required, "schema": schema}
            if "description" in schema:
                param["description"] = schema["description"]
            params.append(param)
        return params

    def finished(self) -> dict[str, Any]:
        kept = {k: v for k, v in self.components.items() if k not in self.exploded}
        text = msgspec.json.encode(kept).decode()
        # A query Struct that another schema also names stays.
        return {**kept, **{k: self.components[k] for k in self.exploded if f'"{REF.format(name=k)}"' in text}}


def _content(value: Any, schemas: _Schemas) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, Raw):
        binary = not value.media_type.startswith("text/")
        return {value.media_type: {"schema": {"type": "string", **({"format": "binary"} if binary else {})}}}
    return {"application/json": {"schema": schemas.ref(value)}}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return str(status)


def _shape(answerer: Answerer, op: Operation, handles: Callable[[type[Exception]], bool]) -> Any:
    if isinstance(answerer, str):
        return ErrorBody if answerer == CORE else op.error
    return op.error if handles(answerer) else ErrorBody


def _blueprint_handles(app: Any, endpoint: str) -> Callable[[type[Exception]], bool]:
    """Whether the Blueprint of `endpoint` (or a parent) has an error handler for an
    exception type: Quart's own lookup (`_find_error_handler`), the app's handlers left out."""
    parts = endpoint.split(".")[:-1]
    names = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]

    def handles(exc: type[Exception]) -> bool:
        for name in names:
            handlers = app.error_handler_spec.get(name, {}).get(None) or {}
            if any(cls in handlers for cls in exc.__mro__):
                return True
        return False

    return handles


def _operation(rule: Rule, method: str, op: Operation, schemas: _Schemas, security: dict[str, Any],
               plugin: bool, handles: Callable[[type[Exception]], bool]) -> dict[str, Any]:
    doc: dict[str, Any] = {"operationId": re.sub(r"[^A-Za-z0-9_]", "_", f"{rule.endpoint}_{method.lower()}")}
    if op.summary:
        doc["summary"] = op.summary
    if op.description:
        doc["description"] = op.description
    if op.tag:
        doc["tags"] = [op.tag]
    params = []
    for name in sorted(rule.arguments):
        schema = schemas.ref(op.path[name]) if name in op.path else _path_schema(rule, name)
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    if op.query is not None:
        params += schemas.query_parameters(op.query)
    if params:
        doc["parameters"] = params
    if op.body is not None:
        doc["requestBody"] = {"required": op.body_required, "content": _content(op.body, schemas)}
    responses: dict[str, Any] = {}
    for status, value in sorted(op.responses.items()):
        description = value.description if isinstance(value, Raw) and value.description else _phrase(status)
        response: dict[str, Any] = {"description": description}
        if (content := _content(value, schemas)) is not None:
            response["content"] = content
        responses[str(status)] = response
    errors = op.error_statuses()
    if plugin:  # a failed plugin's routes answer 503: the family's shape when its Blueprint handles it
        description, answerers = errors.get(503, ("the plugin failed to start", (FAMILY,)))
        errors[503] = (description, (*answerers, PluginUnavailable))
    for status, (description, answerers) in sorted(errors.items()):
        shapes = list({id(s): s for s in (_shape(a, op, handles) for a in answerers)}.values())
        refs = [schemas.ref(shape) for shape in shapes]
        schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
        responses.setdefault(str(status), {"description": description,
                                           "content": {"application/json": {"schema": schema}}})
    doc["responses"] = responses
    if op.auth is not None:
        security.update(op.auth.security_schemes)
        doc["security"] = op.auth.requirements()
    return doc


def build_document(app: Any, *, title: str, version: str, description: str = "",
                   keep: Callable[[Rule], bool] = lambda rule: True,
                   plugin_endpoint: Callable[[str], bool] = lambda endpoint: False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s declared routes that `keep` keeps.
    `plugin_endpoint(endpoint)`: the route is a plugin's (a failed plugin answers 503)."""
    ops = _operations(app, keep)
    schemas = _Schemas(declared_types([op for _, _, op in ops]) + [ErrorBody])
    paths: dict[str, dict[str, Any]] = {}
    security: dict[str, Any] = {}
    tags: dict[str, None] = {}
    for rule, method, op in ops:
        path = _ARG.sub(r"{\1}", rule.rule)
        paths.setdefault(path, {})[method.lower()] = _operation(rule, method, op, schemas, security,
                                                                plugin_endpoint(rule.endpoint),
                                                                _blueprint_handles(app, rule.endpoint))
        if op.tag:
            tags[op.tag] = None
    info = {"title": title, "version": version, **({"description": description} if description else {})}
    components: dict[str, Any] = {"schemas": schemas.finished()}
    if security:
        components["securitySchemes"] = dict(sorted(security.items()))
    return {"openapi": "3.1.0", "info": info, "tags": [{"name": t} for t in tags], "paths": paths,
            "components": components}


class ApiDocs:
    """Serves the documents: `blueprint()` the whole app's, `add_to(bp, ...)` a plugin's.

    `allowed(request)` tells whether a request may read a document that is not
    public; `login_url`, when set, is where a browser asking for a page is sent instead
    of getting a 401.
    """

    def __init__(self, *, title: str, version: str, description: str, allowed: Callable[[Request], bool],
                 login_url: str | None, plugin_blueprints: Callable[[], Iterable[str]]) -> None:
        self.title, self.version, self.description = title, version, description
        self.allowed = allowed
        self.login_url = login_url
        self.plugin_blueprints = plugin_blueprints
        self._cache: dict[tuple[int, str], tuple[dict[str, Any], bytes, str]] = {}

    def _is_plugin(self, endpoint: str) -> bool:
        return endpoint.split(".", 1)[0] in set(self.plugin_blueprints())

    def _built(self, blueprint: str, title: str, version: str, description: str) -> tuple[dict[str, Any], bytes, str]:
        key = (id(current_app), blueprint)
        if key not in self._cache:
            prefix = f"{blueprint}."
            doc = build_document(current_app, title=title, version=version, description=description,
                                 keep=(lambda rule: rule.endpoint.startswith(prefix)) if blueprint else (lambda r: True),
                                 plugin_endpoint=self._is_plugin)
            self._cache[key] = (doc, current_app.json.dumps(doc).encode(), render_page(doc))
        return self._cache[key]

    def _refused(self, page: bool) -> Response | None:
        if self.allowed(request):
            return None
        if page and self.login_url and any(r.rule == self.login_url for r in current_app.url_map.iter_rules()):
            return redirect(f"{self.login_url}?next={quote(request.path, safe='')}", 303)  # type: ignore[return-value]
        return error_response(401, "the API documents need the admin token (Authorization: Bearer <token>) "
                                   "or a dashboard session")

    def _serve(self, blueprint: str, title: str, version: str, description: str, public: bool,
               page: bool) -> Response:
        if not public and (refused := self._refused(page)) is not None:
            return refused
        _, body, html = self._built(blueprint, title, version, description)
        if page:
            return Response(html, content_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)
        return Response(body, content_type="application/json")

    def blueprint(self) -> Blueprint:
        """`/openapi.json` and `/docs` of the whole app."""
        bp = Blueprint("gatewayd_openapi", __name__)

        @bp.get("/openapi.json")
        async def document() -> Response:
            return self._serve("", self.title, self.version, self.description, False, False)

        @bp.get("/docs")
        async def page() -> Response:
            return self._serve("", self.title, self.version, self.description, False, True)

        return bp

    def add_to(self, bp: Blueprint, *, title: str, version: str, description: str = "",
               public: bool = False) -> None:
        """`openapi.json` and `docs` under a plugin's Blueprint: its own routes only."""

        async def document() -> Response:
            return self._serve(request.blueprint or "", title, version, description, public, False)

        async def page() -> Response:
            return self._serve(request.blueprint or "", title, version, description, public, True)

        bp.add_url_rule("/openapi.json", "gatewayd_openapi_document", document, methods=["GET"])
        bp.add_url_rule("/docs", "gatewayd_openapi_page", page, methods=["GET"])


# The page is markup only: no script runs, nothing is fetched from anywhere.
_PAGE_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
