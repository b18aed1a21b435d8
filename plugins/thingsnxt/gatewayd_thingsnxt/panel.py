"""The site dashboard's "Virtual pins" panel: each device's pins as the server sees them,
and a form to set one, as an app does (`PUT /thingsnxt/devices/{id}/state`).

    the panel (overview)             a table: device, its pins (pending ones marked),
                                     which keys an app may set, a form: key, value, Set
    POST /thingsnxt/dashboard/pins   the form: obeyed only from a dashboard page
                                     (ctx.http.dashboard_form: session, same origin, form
                                     token), then back to the overview (303)

The security rules hold as for apps: a key the rules keep from apps is refused, and the
panel says so. A value is a number or true/false when it reads as one (`1`, `2.5`,
`true`), else text (`on`). The outcome of the last change is shown on the panel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from markupsafe import Markup
from quart import Blueprint, redirect

from gatewayd.plugins.api import BadJSON, Device, PluginContext, Routes, parse_json

from . import models
from .errors import Detail, Refused, detail
from .telemetry import DeviceState, parse_app_values, same

if TYPE_CHECKING:
    from .config import ThingsnxtConfig
    from .service import Thingsnxt

MAX_DEVICES = 100  # rows on the panel; the admin API has them all
FORM_PATH = "/dashboard/pins"


class PinsPanel:
    def __init__(self, ctx: PluginContext[ThingsnxtConfig, Thingsnxt]) -> None:
        self.ctx = ctx
        self.last: tuple[str, str] | None = None  # ("ok" | "refused", what happened), shown on the panel

    def register(self, bp: Blueprint) -> None:
        routes = Routes(bp, error=Detail, tag=self.ctx.name)
        # A form for people (the dashboard's session), in no OpenAPI document.
        routes.post(FORM_PATH, hidden=True, responses={303: None},
                    errors={403: "not sent from a dashboard page"})(self.set_pin)

    # -- the form --------------------------------------------------------------------------

    async def set_pin(self) -> Any:
        """Set one pin from the dashboard's panel; back to the overview."""
        form = await self.ctx.http.dashboard_form()
        if form is None:
            return detail("This form was not sent from the dashboard's page (log in, and use its form)"), 403
        device_id, key, text = form.get("device", ""), form.get("key", "").strip(), form.get("value", "").strip()
        try:
            device = await self.ctx.devices.get(device_id)
            if device is None:
                raise Refused(404, "Device not found")
            values = parse_app_values({"data": {key: _value(text)}}, self.ctx.state.limits)
            await self.ctx.state.set_values(device, values)
        except (Refused, BadJSON) as e:
            self.last = ("refused", f"{device_id}: {e}")
        else:
            self.last = ("ok", f"{device_id}: {key} set to {text}; the device gets it in its next answer or poll")
            self.ctx.log.info("pin set from the dashboard", device=device_id, key=key)
        return redirect(f"/#{self.ctx.name}-pins", 303)

    # -- the panel -------------------------------------------------------------------------

    async def render(self) -> Markup:
        devices = (await self.ctx.devices.list())[:MAX_DEVICES]
        if not devices:
            return Markup('<p class="muted">No {} device is registered.</p>').format(self.ctx.name)
        states = await self.ctx.storage.read(models.load_states, [d.id for d in devices])
        token = self.ctx.http.dashboard_token()
        rows = Markup("").join(self._row(d, states.get(d.id, DeviceState()), token) for d in devices)
        note = Markup("") if token else Markup('<p class="muted">Log in to the dashboard to set pins.</p>')
        last = Markup("")
        if self.last is not None:
            outcome, message = self.last
            last = Markup('<p class="pins-outcome" data-outcome="{}">{}</p>').format(outcome, message)
        head = Markup("<tr><th>device</th><th>pins</th><th>an app may set</th>{}</tr>").format(
            Markup("<th>set a pin</th>") if token else "")
        return Markup('<div id="{}-pins">{}{}<table class="pins"><thead>{}</thead><tbody>{}</tbody></table></div>'
                      ).format(self.ctx.name, last, note, head, rows)

    def _row(self, device: Device, state: DeviceState, token: str | None) -> Markup:
        policy = self.ctx.state.policy(device)
        pins = Markup(", ").join(_pin(k, v, state) for k, v in sorted(state.data.items())
                                 if not policy.app_refused({k: v})) or Markup('<span class="muted">none yet</span>')
        form = Markup("")
        if token:
            form = Markup('<td><form method="post" action="{}" class="set-pin">'
                          '<input type="hidden" name="csrf" value="{}"><input type="hidden" name="device" value="{}">'
                          '<input name="key" placeholder="v0" size="6" required aria-label="pin">'
                          '<input name="value" placeholder="1" size="8" required aria-label="value">'
                          '<button type="submit">Set</button></form></td>').format(
                              self.ctx.mount + FORM_PATH, token, device.id)
        link = Markup('<a href="/dashboard/devices/{}?family={}">{}</a>').format(device.id, self.ctx.name, device.id)
        return Markup('<tr data-pins="{}"><td>{}</td><td class="data">{}</td><td>{}</td>{}</tr>').format(
            device.id, link, pins, " ".join(policy.app_sets) or "nothing", form)


def _pin(key: str, value: Any, state: DeviceState) -> Markup:
    shown = Markup("<code>{}</code> {}").format(key, _text(value))
    if key in state.pending and same(state.pending[key], value):
        return shown + Markup(' <span class="muted" title="set by an app; the device has not reported it">'
                              '(pending)</span>')
    return shown


def _text(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def _value(text: str) -> Any:
    """What the form's value means: a number or true/false when it reads as one, else the text."""
    try:
        value = parse_json(text.encode())
    except BadJSON:
        return text
    return value if isinstance(value, (int, float, bool)) else text
