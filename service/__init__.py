"""maml-service control plane: settings, persistence, the job manager, the model registry, adaptation.

The HTTP layer lives in ``api/``; everything here is usable without it (the CLI, tests, scripts).
"""
