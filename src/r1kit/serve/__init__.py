"""OpenAI-compatible serving of r1kit models: ``r1kit serve MODEL`` (see ``app.py``)."""
