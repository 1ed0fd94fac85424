"""The ingress: terminates client WebSockets and speaks to the topic shards over streams.

- ``server``: life cycle (serve, drain, stop) and what the ingress holds.
- ``connection``: one client's bytes through websockets' sans-I/O protocol; its write path.
- ``handshake``: admission (identity, limits, session resume) before any WebSocket opens.
- ``dispatch``: client frames to routing items, deliveries from shards to client frames.
- ``links``: the streams to the shards and the hash ring over them.
- ``http``: request heads, and health, metrics and admin on the same port.
"""
