"""SentientEdge's Ray actors: thin shells that own state and I/O and call ``sentientedge``.

- ``controller.RouterController``: creates the other actors, answers status, tears down.
- ``ingress.Ingress``: one WebSocket server (``sentientedge.ingress``) per actor.
- ``topic_shard.TopicShard``: a slice of the topic space and its virtual actors.
- ``ray_api``: every Ray API call the router makes, in one place.
"""
