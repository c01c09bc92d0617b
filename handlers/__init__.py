"""Flask blueprints: thin views that read the request, call the core and map the outcome."""
