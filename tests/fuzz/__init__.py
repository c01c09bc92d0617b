"""The fuzz suite: schemathesis on the OpenAPI document, hypothesis on every route, a hostile corpus.

Every case is held to the two rules of contract §12: never a 5xx, and every 2xx becomes a call, a
transcript or jobs that the worker can process. `scripts/fuzz` runs it and prints the counts.
"""
