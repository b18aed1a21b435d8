"""The baseline: a bare QuartTrio hello-world on hypercorn (same stack, no gateway)."""

import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

app = QuartTrio("hello")


@app.get("/")
async def hello():
    return "hello"


if __name__ == "__main__":
    config = Config()
    config.bind = [sys.argv[1]]
    config.accesslog = None
    if "--default-gc" not in sys.argv:
        from gatewayd.core.runtime import tune_gc

        tune_gc()  # the same collector settings as `gatewayd run`: a like-for-like baseline
    trio.run(serve, app, config)
