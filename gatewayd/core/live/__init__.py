"""Live streams: the hub (`hub`) and its WebSocket and SSE endpoints (`http`)."""
