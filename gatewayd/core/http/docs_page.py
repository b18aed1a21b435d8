"""An OpenAPI document as one HTML page to read: server-drawn, no script, no fetch.

Operations grouped by tag, each with its parameters, body, answers and authentication;
then every schema as a table of its fields. Everything from the document is escaped.
"""

from __future__ import annotations

import json
from typing import Any

from markupsafe import Markup, escape

__all__ = ["render_page"]

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:72rem;padding:1rem 1.5rem;color:#1d232a}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #d9dee3;padding-bottom:.2rem;margin-top:2rem}
code,.path{font-family:ui-monospace,monospace;font-size:.92em}
.op{border:1px solid #d9dee3;border-radius:6px;margin:.8rem 0;padding:.2rem .9rem}
.op>summary{cursor:pointer;padding:.4rem 0}.m{display:inline-block;min-width:4.2rem;font-weight:700}
.get{color:#11649e}.post{color:#1b7a3a}.put,.patch{color:#8a5a00}.delete{color:#a4161a}
table{border-collapse:collapse;margin:.4rem 0 .8rem;width:100%}td,th{border-bottom:1px solid #e6e9ec;
padding:.25rem .5rem;text-align:left;vertical-align:top}th{background:#f3f5f7}.muted{color:#5f6b76}
"""


def _type(schema: Any) -> Markup:
    """A JSON Schema in a few words: `string, 1-64 characters`, `array of Device`, a link."""
    if not isinstance(schema, dict) or not schema:
        return Markup("any")
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return Markup('<a href="#schema-{0}"><code>{0}</code></a>').format(name)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return Markup(" or ").join(_type(s) for s in schema[key])
    if "enum" in schema:
        return Markup("one of ") + Markup(", ").join(Markup("<code>{}</code>").format(v) for v in schema["enum"])
    if "const" in schema:
        return Markup("<code>{}</code>").format(schema["const"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    text = Markup(escape(kind))
    if kind == "array":
        text = Markup("array of ") + _type(schema.get("items", {}))
    elif kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        text = Markup("object of ") + _type(schema["additionalProperties"])
    rules = []
    for key, word in (("minLength", "at least {} characters"), ("maxLength", "at most {} characters"),
                      ("minimum", "≥ {}"), ("exclusiveMinimum", "> {}"), ("maximum", "≤ {}"),
                      ("exclusiveMaximum", "< {}"), ("minItems", "at least {} items"),
                      ("maxItems", "at most {} items"), ("format", "{}")):
        if key in schema:
            rules.append(escape(word.format(schema[key])))
    if "pattern" in schema:
        rules.append(Markup("matching <code>{}</code>").format(schema["pattern"]))
    return text + (Markup(", ") + Markup(", ").join(rules) if rules else Markup(""))


def _fields(schema: dict[str, Any]) -> Markup:
    props = schema.get("properties", {})
    if not props:
        return Markup("")
    required = set(schema.get("required", ()))
    rows = Markup("").join(
        Markup("<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>").format(
            name, _type(s), "required" if name in required else
            (Markup("default <code>{}</code>").format(_json(s["default"])) if "default" in s else "optional"),
            s.get("description", ""))
        for name, s in props.items())
    return Markup("<table><tr><th>field</th><th>type</th><th></th><th>what</th></tr>{}</table>").format(rows)


def _json(value: Any) -> str:
    return json.dumps(value)


def _operation(path: str, method: str, op: dict[str, Any], schemes: dict[str, Any]) -> Markup:
    anchor = op.get("operationId", f"{method}-{path}")
    parts = [Markup('<details class="op" id="{}"><summary><span class="m {}">{}</span> '
                    '<span class="path">{}</span> <span class="muted">{}</span></summary>').format(
        anchor, method, method.upper(), path, op.get("summary", ""))]
    if op.get("description"):
        parts.append(Markup("<p>{}</p>").format(op["description"]))
    security = op.get("security")
    if security:
        names = [n for requirement in security for n in requirement]
        described = Markup("; ").join(Markup("<code>{}</code> ({})").format(
            n, _scheme(schemes.get(n, {}))) for n in names)
        parts.append(Markup("<p><b>Authentication:</b> {}</p>").format(described))
    else:
        parts.append(Markup("<p><b>Authentication:</b> none</p>"))
    params = op.get("parameters", [])
    if params:
        rows = Markup("").join(Markup("<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
                                      "</tr>").format(p["name"], p["in"], "required" if p.get("required") else
                                                      "optional", _type(p.get("schema")), p.get("description", ""))
                               for p in params)
        parts.append(Markup("<table><tr><th>parameter</th><th>in</th><th></th><th>type</th><th>what</th></tr>{}"
                            "</table>").format(rows))
    body = op.get("requestBody")
    if body:
        [(media, content)] = body["content"].items()
        parts.append(Markup("<p><b>Body</b> ({}, {}): {}</p>").format(
            media, "required" if body.get("required") else "optional", _type(content.get("schema"))))
    rows = []
    for status, response in op.get("responses", {}).items():
        content = response.get("content", {})
        shown = Markup("; ").join(Markup("{} <span class=muted>({})</span>").format(_type(c.get("schema")), m)
                                  for m, c in content.items()) or Markup('<span class="muted">no body</span>')
        rows.append(Markup("<tr><td><b>{}</b></td><td>{}</td><td>{}</td></tr>").format(
            status, response.get("description", ""), shown))
    parts.append(Markup("<table><tr><th>answer</th><th>when</th><th>body</th></tr>{}</table>").format(
        Markup("").join(rows)))
    parts.append(Markup("</details>"))
    return Markup("").join(parts)


def _scheme(scheme: dict[str, Any]) -> str:
    if scheme.get("type") == "http":
        what = f"Authorization: {scheme.get('scheme', '').capitalize()} <{scheme.get('bearerFormat', 'token')}>"
    elif scheme.get("type") == "apiKey":
        what = f"{scheme.get('name')} in the {scheme.get('in')}"
    else:
        what = str(scheme.get("type", ""))
    return what + (f": {scheme['description']}" if scheme.get("description") else "")


def render_page(doc: dict[str, Any]) -> str:
    """The whole page of one OpenAPI document."""
    info = doc.get("info", {})
    schemes = doc.get("components", {}).get("securitySchemes", {})
    by_tag: dict[str, list[Markup]] = {}
    for path, methods in doc.get("paths", {}).items():
        for method, op in methods.items():
            by_tag.setdefault((op.get("tags") or ["other"])[0], []).append(_operation(path, method, op, schemes))
    sections = Markup("").join(Markup('<h2 id="tag-{0}">{0}</h2>{1}').format(tag, Markup("").join(ops))
                               for tag, ops in by_tag.items())
    toc = Markup(" · ").join(Markup('<a href="#tag-{0}">{0}</a>').format(tag) for tag in by_tag)
    schemas = Markup("").join(
        Markup('<section id="schema-{0}"><h3><code>{0}</code></h3><p>{1}</p>{2}{3}</section>').format(
            name, s.get("description", ""), _fields(s),
            Markup("<p>{}</p>").format(_type(s)) if not s.get("properties") else "")
        for name, s in sorted(doc.get("components", {}).get("schemas", {}).items()))
    return str(Markup(
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><style>{style}</style></head><body>'
        '<h1>{title}</h1><p class="muted">version {version} · OpenAPI {openapi} · '
        '<a href="openapi.json">openapi.json</a></p><p>{description}</p><p>{toc}</p>{sections}'
        '<h2 id="schemas">Schemas</h2>{schemas}</body></html>').format(
        title=info.get("title", "API"), version=info.get("version", ""), openapi=doc.get("openapi", ""),
        description=info.get("description", ""), toc=toc, sections=sections, schemas=schemas,
        style=Markup(_STYLE)))
