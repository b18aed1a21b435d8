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
    trio.run(serve, app, config)
