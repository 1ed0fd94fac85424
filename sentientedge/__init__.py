"""SentientEdge: a message router for drone fleets.

The pure core (codec, protocol, topics, ring, auth, rate limits, routing, virtual actors) lives
here with no Ray and no sockets; ``server`` runs the WebSocket ingress, ``store`` talks to Redis,
``client`` is the asyncio client library, ``cli`` the ``sentientedge`` command. The Ray actors
are in the top-level ``actors`` package.
"""

__version__ = "0.1.0"
