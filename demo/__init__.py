"""See what the service sees: a local demo page (``server``, ``static/``) and annotated files (``annotate``)."""
