"""Webhooks: a signed ``request.finished`` call to the client, retried until delivered.

- ``payload.py``: the JSON body of the event, built when the request is closed.
- ``signing.py``: Standard Webhooks signatures and the secrets that make them.
- ``schedule.py``: when the next attempt happens (backoff with jitter, Retry-After).
- ``sender.py``: one HTTP attempt under the address policy of image sources.
- ``dispatcher.py``: the loop in every worker process that claims due deliveries.

The deliveries themselves live in the database (``db/deliveries.py``).
"""
