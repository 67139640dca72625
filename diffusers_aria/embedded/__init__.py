"""The embedded default that runs offline on a CPU: the tiny teacher and its helpers, the built-in prompt pool."""
