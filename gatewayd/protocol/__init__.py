"""Wire protocols spoken by the gateway, as pure functions and classes, no I/O; depends
on nothing of ours. Sockets, trio and the decisions about what to answer live with the
callers; these modules only turn bytes into values and values into bytes."""
