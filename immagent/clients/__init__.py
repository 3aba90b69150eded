"""The store-side half of each client of the event log (agents, sessions, checkpoints).

A client turns its own objects into the log's assets and states and back; it imports no
third-party SDK (the adapters in ``immagent.integrations`` do) and no other client.
"""
