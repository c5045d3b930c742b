"""The ``gpt`` backend: model, optimizer, token data and the step."""
