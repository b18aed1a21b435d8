"""HTTP: the QuartTrio app served in-process by hypercorn, the core error shape, the admin API."""
