"""The baseline: a bare QuartTrio hello-world on hypercorn (same stack, no gateway).

    python bench/hello_app.py HOST:PORT [--any-path] [--default-gc] [--gateway-http] [--backlog N]

`--any-path`: every path and method is answered "hello" (a body is read first), so the
streetlight fleet's requests can be pointed at it unchanged (`streetlight_bench.py
--target hello`).
`--gateway-http`: the gateway's framework changes applied (`gatewayd.core.http.lean.LeanQuart`,
`serve.GatewayConfig`, `serve.lean_framework()`): what they save on the framework alone
(bench/http_pair.py --route hello).
`--backlog N`: the listen queue (hypercorn's default, 100, unless given; the gateway's
`[http] backlog` is 1024: streetlight_bench.py gives the fleet's hello-world the same).
"""

import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio

if "--gateway-http" in sys.argv:
    from gatewayd.core.http.lean import LeanQuart
    from gatewayd.core.http.serve import GatewayConfig as Config  # noqa: F811
    from gatewayd.core.http.serve import lean_framework

    lean_framework()
    app = LeanQuart("hello")
else:
    app = QuartTrio("hello")


@app.get("/")
async def hello():
    return "hello"


async def anything(path: str = ""):
    # Read like the gateway does: hypercorn 0.18 hangs a keep-alive connection answered
    # before its request's body came in.
    await request.get_data()
    return "hello"


if __name__ == "__main__":
    if "--any-path" in sys.argv:
        methods = ["GET", "POST", "PUT"]
        app.add_url_rule("/<path:path>", "anything", anything, methods=methods)
    config = Config()
    config.bind = [sys.argv[1]]
    config.accesslog = None
    if "--backlog" in sys.argv:
        config.backlog = int(sys.argv[sys.argv.index("--backlog") + 1])
    if "--default-gc" not in sys.argv:
        from gatewayd.core.runtime import tune_gc

        tune_gc()  # the same collector settings as `gatewayd run`: a like-for-like baseline
    trio.run(serve, app, config)
