"""HTTP: the QuartTrio app with the core error shape and the admin token, strict JSON
bodies, hypercorn serving in-process, the public URL. Each service's admin routes live in
its own package (``devices/http.py``, ``alerts/http.py``, ``ota/http.py``).
"""
